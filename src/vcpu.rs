//! One vCPU, one thread: the KVM_RUN loop (KVM api.rst, 4.10 KVM_RUN, 5 "The
//! kvm_run structure").
//!
//! The loop only routes: port I/O exits to the PIO bus, MMIO exits to the MMIO
//! bus, and the exits that end a VM (triple fault, internal error, reset) to
//! [`VmControl::stop`]. Port numbers and device logic never appear here. What
//! each exit means is one table, the pure function [`route`]: a [`RunExit`]
//! in, the [`ExitKind`] it is counted as ([`ExitCounts::count`]) and the
//! [`Action`] the loop takes out.
//!
//! Stopping a vCPU that sits inside KVM_RUN (a halted AP, a guest spinning in
//! its own code) takes a signal, [`kick_signal`] (`SIGRTMIN`), sent to the
//! thread: by the main thread once its event loop has returned, until the
//! thread ends (`stop_vcpus` in vmm.rs), and by the event loop's request
//! handler to pause the VM (requests.rs). The handler sets
//! `kvm_run.immediate_exit`, so KVM_RUN returns EINTR now, or at its next
//! entry if the signal landed just before it (api.rst, "immediate_exit").

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use kvm_bindings::{CpuId, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use crate::boot::BootInfo;
use crate::bus::Bus;
use crate::control::{StopReason, VmControl};
use crate::layout::BOOT_STACK_POINTER;
use crate::pause::PauseGate;
use crate::snapshot;
use crate::stats::{Exit, ExitKind, ExitObservation, ExitObserver, ExitStats};
use crate::timeline::Timeline;
use crate::x86::{cpuid, msr, regs};

/// Errors setting up a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {id}")]
    Create {
        /// vCPU index.
        id: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM_SET_* ioctl failed.
    #[error("cannot set {what} of vCPU {id}")]
    Setup {
        /// Which state.
        what: &'static str,
        /// vCPU index.
        id: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted only {set} of {total} boot MSRs on vCPU {id}")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many we asked for.
        total: usize,
    },
    /// Writing boot structures to guest memory failed.
    #[error("cannot write boot page tables or GDT")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// A snapshot's vCPU state could not be loaded.
    #[error("cannot restore vCPU {id} from the snapshot: {why}")]
    Restore {
        /// vCPU index.
        id: u8,
        /// What KVM or the snapshot said.
        why: String,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
}

/// How many exits of each kind a vCPU took: the cost model of a VM in one line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// `IN` instructions.
    pub io_in: u64,
    /// `OUT` instructions.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// HLT with no in-kernel LAPIC to handle it.
    pub hlt: u64,
    /// Kicks, system events, the exits that end a VM and everything else.
    pub other: u64,
}

impl ExitCounts {
    /// Counts one exit of `kind`. The one place that maps the exit kinds of
    /// `--stats` ([`ExitKind`]) onto these counters: a new kind must be given
    /// a counter here before ember compiles.
    pub fn count(&mut self, kind: ExitKind) {
        let counter = match kind {
            ExitKind::IoIn => &mut self.io_in,
            ExitKind::IoOut => &mut self.io_out,
            ExitKind::MmioRead => &mut self.mmio_read,
            ExitKind::MmioWrite => &mut self.mmio_write,
            ExitKind::Hlt => &mut self.hlt,
            ExitKind::Shutdown
            | ExitKind::InternalError
            | ExitKind::SystemEvent
            | ExitKind::FailEntry
            | ExitKind::Interrupted
            | ExitKind::Other => &mut self.other,
        };
        *counter += 1;
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.io_in + self.io_out + self.mmio_read + self.mmio_write + self.hlt + self.other
    }
}

/// The special registers of a vCPU when it stopped: which mode the guest
/// left it in (Intel SDM vol. 3, 2.5 "Control Registers"; EFER in 2.2.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegSnapshot {
    /// Instruction pointer.
    pub rip: u64,
    /// CR0 (PE bit 0, PG bit 31).
    pub cr0: u64,
    /// CR3: the page-table root.
    pub cr3: u64,
    /// CR4 (PAE bit 5).
    pub cr4: u64,
    /// IA32_EFER (LME bit 8, LMA bit 10).
    pub efer: u64,
    /// CS selector.
    pub cs_selector: u16,
    /// CS base.
    pub cs_base: u64,
    /// CS.L: 64-bit code.
    pub cs_long: bool,
    /// CS.D: 32-bit default operand size.
    pub cs_32: bool,
}

impl RegSnapshot {
    /// "real mode", "16-bit protected mode", "32-bit protected mode", "32-bit
    /// protected mode with paging", "long mode (64-bit)" or "compatibility mode".
    pub fn mode(&self) -> &'static str {
        const EFER_LMA: u64 = 1 << 10;
        match (self.cr0 & 1 != 0, self.efer & EFER_LMA != 0, self.cs_long, self.cs_32) {
            (false, _, _, _) => "real mode",
            (true, true, true, _) => "long mode (64-bit)",
            (true, true, false, _) => "compatibility mode",
            (true, false, _, false) => "16-bit protected mode",
            (true, false, _, true) if self.cr0 & (1 << 31) != 0 => "32-bit protected mode with paging",
            (true, false, _, true) => "32-bit protected mode",
        }
    }
}

/// What a vCPU thread hands back when the VM stops.
#[derive(Debug, Default)]
pub struct VcpuReport {
    /// Exits by kind.
    pub counts: ExitCounts,
    /// Exit statistics, with `--stats`.
    pub stats: Option<Box<ExitStats>>,
    /// The registers at stop, when asked (`ExitObservation::snapshot_registers`).
    pub registers: Option<RegSnapshot>,
}

/// The access of one exit, copied out of `kvm_run` for the observer (at most
/// 8 data bytes); [`route`] gives its kind.
struct ObservedExit {
    addr: u64,
    data: [u8; 8],
    len: usize,
}

impl ObservedExit {
    /// An exit without an address or data.
    const NONE: ObservedExit = ObservedExit { addr: 0, data: [0; 8], len: 0 };

    fn access(addr: u64, d: &[u8]) -> Self {
        let len = d.len().min(8);
        let mut data = [0; 8];
        data[..len].copy_from_slice(&d[..len]);
        ObservedExit { addr, data, len }
    }
}

/// Why KVM_RUN returned, as [`route`] sees it: the exit without its data
/// (KVM api.rst, 5 "The kvm_run structure", `exit_reason`; errno of KVM_RUN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// KVM_EXIT_IO, in (already served by the PIO bus).
    IoIn,
    /// KVM_EXIT_IO, out (already served by the PIO bus).
    IoOut,
    /// KVM_EXIT_MMIO read (already served by the MMIO bus).
    MmioRead,
    /// KVM_EXIT_MMIO write (already served by the MMIO bus).
    MmioWrite,
    /// KVM_EXIT_HLT.
    Hlt,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// KVM_EXIT_SYSTEM_EVENT of this type.
    SystemEvent(u32),
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError,
    /// KVM_EXIT_FAIL_ENTRY: the hardware reason and the host CPU.
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// The host CPU.
        cpu: u32,
    },
    /// KVM_EXIT_INTR.
    Intr,
    /// KVM_RUN returned EINTR or EAGAIN: a kick (`immediate_exit`).
    Kicked,
    /// An exit ember does not expect (logged; the guest goes on).
    Unexpected,
    /// KVM_RUN failed with this errno.
    RunFailed(i32),
}

/// What the vCPU loop does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again (after checking the stop and pause flags).
    Continue,
    /// A kick: clear `kvm_run.immediate_exit`, then go on as for `Continue`.
    ClearKick,
    /// End the VM ([`VmControl::stop`]).
    Stop(Stop),
}

/// Why an exit ends the VM; `Vcpu::stop_reason` turns it into a
/// [`StopReason`] with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// HLT, and no interrupt controller can ever wake the vCPU.
    HaltedForever,
    /// A triple fault.
    TripleFault,
    /// KVM_SYSTEM_EVENT_RESET or KVM_SYSTEM_EVENT_SHUTDOWN: a reboot.
    Reset,
    /// Another system event.
    SystemEvent(u32),
    /// KVM's emulator or event delivery failed.
    InternalError,
    /// KVM could not enter the guest.
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// The host CPU.
        cpu: u32,
    },
    /// KVM_RUN itself failed (errno).
    RunFailed(i32),
}

/// The exit router: what an exit means for the loop, and the kind it is
/// counted and observed as. A plain function, so that every exit's fate is
/// written (and tested) in one table, without KVM. `hlt_is_final`: no
/// in-kernel LAPIC, so nothing wakes a halted vCPU.
pub fn route(exit: RunExit, hlt_is_final: bool) -> (ExitKind, Action) {
    use Action::{ClearKick, Continue};
    match exit {
        RunExit::IoIn => (ExitKind::IoIn, Continue),
        RunExit::IoOut => (ExitKind::IoOut, Continue),
        RunExit::MmioRead => (ExitKind::MmioRead, Continue),
        RunExit::MmioWrite => (ExitKind::MmioWrite, Continue),
        RunExit::Hlt if hlt_is_final => (ExitKind::Hlt, Action::Stop(Stop::HaltedForever)),
        RunExit::Hlt => (ExitKind::Hlt, Continue),
        RunExit::Shutdown => (ExitKind::Shutdown, Action::Stop(Stop::TripleFault)),
        RunExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET | kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN) => {
            (ExitKind::SystemEvent, Action::Stop(Stop::Reset))
        }
        RunExit::SystemEvent(kind) => (ExitKind::SystemEvent, Action::Stop(Stop::SystemEvent(kind))),
        RunExit::InternalError => (ExitKind::InternalError, Action::Stop(Stop::InternalError)),
        RunExit::FailEntry { reason, cpu } => (ExitKind::FailEntry, Action::Stop(Stop::FailEntry { reason, cpu })),
        RunExit::Intr => (ExitKind::Interrupted, Continue),
        RunExit::Kicked => (ExitKind::Interrupted, ClearKick),
        RunExit::Unexpected => (ExitKind::Other, Continue),
        RunExit::RunFailed(errno) => (ExitKind::Other, Action::Stop(Stop::RunFailed(errno))),
    }
}

/// A configured vCPU, ready to run in its own thread.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    control: Arc<VmControl>,
    timeline: Arc<Timeline>,
    /// No in-kernel LAPIC: a HLT can never be woken up.
    hlt_is_final: bool,
    /// `--stats` / `--trace-exits`: None (the usual case) costs one branch per exit.
    observer: Option<Box<ExitObserver>>,
    snapshot_registers: bool,
    /// Where this vCPU parks while the VM is paused (pause.rs).
    gate: Arc<PauseGate>,
    /// What a snapshot needs besides KVM's registers: the CPUID given, the MSRs to read.
    cpuid: CpuId,
    msr_indices: Vec<u32>,
    lapic: bool,
    /// A snapshot's state, loaded on this vCPU's thread before it first runs.
    restore: Option<Box<snapshot::vcpu::VcpuState>>,
}

/// Everything the vCPUs of one VM share at setup.
pub struct VcpuShared {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Stop flag and reason.
    pub control: Arc<VmControl>,
    /// Boot timeline.
    pub timeline: Arc<Timeline>,
    /// The supported CPUID, adjusted for this VM ([`cpuid::adjust_for_vm`]), to adapt per vCPU.
    pub base_cpuid: CpuId,
    /// Number of vCPUs.
    pub count: u8,
    /// Whether the in-kernel irqchip exists.
    pub irqchip: bool,
    /// What to record about exits.
    pub observe: ExitObservation,
    /// Trace lines left for the whole VM (`--trace-exits=N`).
    pub trace_left: Arc<AtomicU64>,
    /// The pause handshake (pause.rs).
    pub gate: Arc<PauseGate>,
    /// The MSRs a snapshot reads (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Vec<u32>,
}

impl Vcpu {
    /// Creates vCPU `id` and loads its boot state. vCPU 0 starts at the kernel
    /// entry; the others wait in KVM for INIT/SIPI from vCPU 0.
    pub fn new(vm: &VmFd, id: u8, shared: &VcpuShared, boot: &BootInfo) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|source| VcpuError::Create { id, source })?;
        let setup = |what| move |source| VcpuError::Setup { what, id, source };

        let mut cpuid = shared.base_cpuid.clone();
        cpuid::adjust_for_vcpu(cpuid.as_mut_slice(), id, shared.count);
        fd.set_cpuid2(&cpuid).map_err(setup("CPUID"))?;

        let msrs = msr::boot_msrs();
        let set = fd.set_msrs(&msrs).map_err(setup("MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs { id, set, total: msrs.as_slice().len() });
        }

        if shared.irqchip {
            let mut lapic = fd.get_lapic().map_err(setup("LAPIC"))?;
            regs::setup_lint(&mut lapic.regs);
            fd.set_lapic(&lapic).map_err(setup("LAPIC"))?;
        }

        if id == 0 {
            fd.set_fpu(&regs::boot_fpu()).map_err(setup("FPU"))?;
            let mut sregs = fd.get_sregs().map_err(setup("special registers"))?;
            regs::setup_sregs(&mut sregs, boot.mode);
            fd.set_sregs(&sregs).map_err(setup("special registers"))?;
            let r = regs::boot_regs(boot.mode, boot.entry, boot.boot_info, BOOT_STACK_POINTER);
            fd.set_regs(&r).map_err(setup("registers"))?;
        }

        Ok(Vcpu::with_fd(fd, id, shared, cpuid, None))
    }

    /// Creates vCPU `id` of a restored VM: the snapshot's CPUID now, the rest of `state` on the
    /// vCPU's own thread ([`Vcpu::load_snapshot_state`]).
    pub fn restored(
        vm: &VmFd,
        id: u8,
        shared: &VcpuShared,
        state: snapshot::vcpu::VcpuState,
    ) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|source| VcpuError::Create { id, source })?;
        let cpuid = snapshot::vcpu::cpuid_of(&state).map_err(|why| VcpuError::Restore { id, why })?;
        fd.set_cpuid2(&cpuid).map_err(|source| VcpuError::Setup { what: "CPUID", id, source })?;
        Ok(Vcpu::with_fd(fd, id, shared, cpuid, Some(Box::new(state))))
    }

    fn with_fd(
        fd: VcpuFd,
        id: u8,
        shared: &VcpuShared,
        cpuid: CpuId,
        restore: Option<Box<snapshot::vcpu::VcpuState>>,
    ) -> Self {
        Vcpu {
            fd,
            id,
            pio: shared.pio.clone(),
            mmio: shared.mmio.clone(),
            control: shared.control.clone(),
            timeline: shared.timeline.clone(),
            hlt_is_final: !shared.irqchip,
            observer: ExitObserver::new(id, &shared.observe, &shared.trace_left),
            snapshot_registers: shared.observe.snapshot_registers,
            gate: shared.gate.clone(),
            cpuid,
            msr_indices: shared.msr_indices.clone(),
            lapic: shared.irqchip,
            restore,
        }
    }

    /// Loads the snapshot state this vCPU was created with, if any. Call on the vCPU's own
    /// thread, before [`Vcpu::run`] (and before the thread enters its sandbox: these are KVM_SET_*
    /// calls the vCPU filter does not allow).
    pub fn load_snapshot_state(&mut self) -> Result<(), VcpuError> {
        match self.restore.take() {
            Some(s) => snapshot::vcpu::restore(&self.fd, &s).map_err(|why| VcpuError::Restore { id: self.id, why }),
            None => Ok(()),
        }
    }

    /// Parks this vCPU while the VM is paused (pause.rs): completes the access KVM may have left
    /// half done, saves the state a snapshot needs, waits for the resume.
    fn park(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // Returns EINTR at once, after finishing a pending IN or MMIO read (api.rst 5).
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let state = snapshot::vcpu::save(&self.fd, &self.cpuid, &mut self.msr_indices, self.lapic);
        self.gate.park(self.id, state, &self.control);
    }

    /// Runs the guest until the VM stops; returns what this vCPU saw.
    pub fn run(mut self) -> VcpuReport {
        let kvm_run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(kvm_run));
        // Declared after `self`, so dropped before it, on return and on unwind.
        let _forget_kvm_run = ForgetKvmRun;
        let mut counts = ExitCounts::default();
        let mut observer = self.observer.take();
        let first_run = format!("vcpu{}: first KVM_RUN", self.id);
        self.timeline.mark(first_run);
        while !self.control.is_stopped() {
            if self.gate.requested() {
                self.park();
                continue;
            }
            let id = self.id;
            let result = self.fd.run();
            // The clock is read only when someone asked (--stats, --trace-exits).
            let start = observer.is_some().then(Instant::now);
            // First the access, to the bus that owns it; then the router decides.
            let (exit, seen) = match result {
                Ok(VcpuExit::IoOut(port, data)) => {
                    // SAFETY: `kvm_run` is this vCPU's live mapping and KVM filled
                    // its `io` member for this KVM_EXIT_IO.
                    let size = unsafe { (*kvm_run).__bindgen_anon_1.io.size };
                    if !pio_out(&self.pio, port, data, size) {
                        log::debug!("vcpu{id}: OUT to unmapped port {port:#x} ignored");
                    }
                    (RunExit::IoOut, ObservedExit::access(u64::from(port), data))
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    // SAFETY: as for IoOut.
                    let size = unsafe { (*kvm_run).__bindgen_anon_1.io.size };
                    if !pio_in(&self.pio, port, data, size) {
                        log::debug!("vcpu{id}: IN from unmapped port {port:#x} reads 0xff");
                    }
                    (RunExit::IoIn, ObservedExit::access(u64::from(port), data))
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    let mapped = self.mmio.read(addr, data);
                    if !mapped {
                        data.fill(0xff);
                    }
                    let seen = ObservedExit::access(addr, data);
                    if !mapped {
                        self.bus_fault("read", addr, seen.len);
                    }
                    (RunExit::MmioRead, seen)
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let seen = ObservedExit::access(addr, data);
                    if !self.mmio.write(addr, data) {
                        self.bus_fault("write", addr, seen.len);
                    }
                    (RunExit::MmioWrite, seen)
                }
                Ok(VcpuExit::Hlt) => (RunExit::Hlt, ObservedExit::NONE),
                Ok(VcpuExit::Shutdown) => (RunExit::Shutdown, ObservedExit::NONE),
                Ok(VcpuExit::SystemEvent(kind, _)) => (RunExit::SystemEvent(kind), ObservedExit::NONE),
                Ok(VcpuExit::InternalError) => (RunExit::InternalError, ObservedExit::NONE),
                Ok(VcpuExit::FailEntry(reason, cpu)) => (RunExit::FailEntry { reason, cpu }, ObservedExit::NONE),
                Ok(VcpuExit::Intr) => (RunExit::Intr, ObservedExit::NONE),
                Ok(exit) => {
                    log::warn!("vcpu{id}: unexpected exit {exit:?}, resuming");
                    (RunExit::Unexpected, ObservedExit::NONE)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    (RunExit::Kicked, ObservedExit::NONE)
                }
                Err(e) => (RunExit::RunFailed(e.errno()), ObservedExit::NONE),
            };
            let (kind, action) = route(exit, self.hlt_is_final);
            counts.count(kind);
            match action {
                Action::Continue => {}
                Action::ClearKick => self.fd.set_kvm_immediate_exit(0),
                Action::Stop(stop) => {
                    let reason = self.stop_reason(stop);
                    self.control.stop(reason);
                }
            }
            if let (Some(o), Some(start)) = (observer.as_deref_mut(), start) {
                let took = start.elapsed();
                let device = match kind {
                    ExitKind::IoIn | ExitKind::IoOut => self.pio.device_name(seen.addr),
                    ExitKind::MmioRead | ExitKind::MmioWrite => self.mmio.device_name(seen.addr),
                    _ => None,
                };
                let exit = Exit { kind, addr: seen.addr, data: &seen.data[..seen.len], device };
                o.observe(&exit, took);
            }
        }
        let registers = if self.snapshot_registers { self.snapshot() } else { None };
        VcpuReport { counts, stats: observer.and_then(|o| o.stats.map(Box::new)), registers }
    }

    /// The message of an exit that ends the VM. Reads RIP (KVM_GET_REGS) and
    /// KVM's internal-error suberror only for the exits whose message has them.
    fn stop_reason(&mut self, stop: Stop) -> StopReason {
        let id = self.id;
        StopReason::GuestCrash(match stop {
            Stop::Reset => return StopReason::Reset,
            Stop::RunFailed(errno) => {
                let e = kvm_ioctls::Error::new(errno);
                return StopReason::EmberFailed(format!("KVM_RUN failed on vCPU {id}: {e}"));
            }
            Stop::HaltedForever => format!(
                "vCPU {id} executed HLT and this VM has no interrupt controller to wake it \
                 (the guest should write its status to the exit device instead)"
            ),
            Stop::TripleFault => format!("vCPU {id} triple-faulted (KVM_EXIT_SHUTDOWN) near RIP {:#x}", self.rip()),
            Stop::SystemEvent(kind) => format!("vCPU {id}: KVM system event {kind}"),
            Stop::InternalError => {
                // SAFETY: KVM filled the `internal` member of the union for
                // KVM_EXIT_INTERNAL_ERROR, the exit being handled (no KVM_RUN since).
                let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = match sub {
                    kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
                    kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
                    kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
                    _ => "unknown suberror",
                };
                format!("KVM internal error on vCPU {id} at RIP {:#x}: {what} (suberror {sub})", self.rip())
            }
            Stop::FailEntry { reason, cpu } => {
                format!("KVM could not enter vCPU {id} (hardware reason {reason:#x} on host CPU {cpu})")
            }
        })
    }

    /// The guest's instruction pointer, for a message (0 if KVM cannot say).
    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Reads the special registers (one KVM_GET_SREGS and one KVM_GET_REGS).
    fn snapshot(&self) -> Option<RegSnapshot> {
        let s = self.fd.get_sregs().ok()?;
        let r = self.fd.get_regs().ok()?;
        Some(RegSnapshot {
            rip: r.rip,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs_selector: s.cs.selector,
            cs_base: s.cs.base,
            cs_long: s.cs.l != 0,
            cs_32: s.cs.db != 0,
        })
    }

    /// An MMIO access that no device owns: on real hardware a bus error, here
    /// the end of the VM with a message that says where.
    fn bus_fault(&mut self, dir: &str, addr: u64, len: usize) {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        self.control.stop(StopReason::GuestCrash(format!(
            "vCPU {} {dir} {len} bytes of unmapped MMIO at {addr:#x} (RIP {rip:#x}): no device or RAM there",
            self.id
        )));
    }
}

/// Runs `f` (a vCPU's run loop, or the event loop) for `who`. A panic in it
/// (a bug in ember or in a device) stops the VM with an error (exit code 125)
/// instead of leaving the other threads running a VM that lost a vCPU, or
/// waiting forever for a stop that thread would have made. None: it panicked.
pub fn run_catching<T>(control: &VmControl, who: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            control.stop(StopReason::EmberFailed(format!("{who} failed: internal error in ember: {what}")));
            None
        }
    }
}

/// Port I/O as KVM reports it (api.rst, KVM_EXIT_IO): `data` holds `count`
/// elements of `size` bytes. String I/O (`rep outsb`, `outsw`, ...) comes as
/// one exit with `count` > 1; each element is its own access to the device,
/// as on the ISA bus, never one wide access. Returns false if any element
/// fell on an unmapped port.
fn pio_out(bus: &Bus, port: u16, data: &[u8], size: u8) -> bool {
    let mut mapped = true;
    for element in data.chunks(usize::from(size.max(1))) {
        mapped &= bus.write(u64::from(port), element);
    }
    mapped
}

/// The `IN` side of [`pio_out`]: an element no device answers floats high (0xff).
fn pio_in(bus: &Bus, port: u16, data: &mut [u8], size: u8) -> bool {
    let mut mapped = true;
    for element in data.chunks_mut(usize::from(size.max(1))) {
        if !bus.read(u64::from(port), element) {
            // Nothing drives the ISA bus: it floats high.
            element.fill(0xff);
            mapped = false;
        }
    }
    mapped
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Clears this thread's `KVM_RUN_PTR` when dropped, on return and on unwind
/// alike: after a panic in `Vcpu::run` the vCPU (and its kvm_run mapping) is
/// dropped while `stop_vcpus` may still kick the thread, and the handler must
/// then find nothing to write to.
struct ForgetKvmRun;

impl Drop for ForgetKvmRun {
    fn drop(&mut self) {
        let _ = KVM_RUN_PTR.try_with(|p| p.set(std::ptr::null_mut()));
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a plain store: async-signal-safe. `try_with` fails only during
    // thread teardown, when there is nothing left to kick.
    let _ = KVM_RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` points at this thread's live kvm_run mapping, set by
            // `Vcpu::run` before the first KVM_RUN and cleared after the last.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    // SAFETY: a zeroed sigaction is valid; we set the handler and flags, and
    // `handle_kick` only performs an async-signal-safe store.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handle_kick as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(VcpuError::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::Mutex;

    /// Counts accesses; reads return the access number.
    #[derive(Default)]
    struct Counter {
        accesses: Vec<(u64, usize)>,
    }
    impl BusDevice for Counter {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.accesses.push((offset, data.len()));
            data.fill(self.accesses.len() as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.accesses.push((offset, data.len()));
        }
    }

    #[test]
    fn a_panicking_vcpu_stops_the_vm_with_an_error() {
        let control = VmControl::new().unwrap();
        let got: Option<VcpuReport> = run_catching(&control, "vCPU 3", || panic!("device bug"));
        assert!(got.is_none());
        assert!(control.is_stopped());
        assert_eq!(
            control.reason(),
            Some(StopReason::EmberFailed("vCPU 3 failed: internal error in ember: device bug".into()))
        );
        assert_eq!(run_catching(&control, "vCPU 0", || 7), Some(7));
    }

    #[test]
    fn every_exit_has_one_route() {
        use Action::{ClearKick, Continue};
        let reset = kvm_bindings::KVM_SYSTEM_EVENT_RESET;
        let off = kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN;
        let crash = kvm_bindings::KVM_SYSTEM_EVENT_CRASH;
        let fail = RunExit::FailEntry { reason: 7, cpu: 1 };
        for (exit, lapic, want) in [
            (RunExit::IoIn, true, (ExitKind::IoIn, Continue)),
            (RunExit::IoOut, true, (ExitKind::IoOut, Continue)),
            (RunExit::MmioRead, true, (ExitKind::MmioRead, Continue)),
            (RunExit::MmioWrite, true, (ExitKind::MmioWrite, Continue)),
            (RunExit::Hlt, true, (ExitKind::Hlt, Continue)),
            (RunExit::Hlt, false, (ExitKind::Hlt, Action::Stop(Stop::HaltedForever))),
            (RunExit::Shutdown, true, (ExitKind::Shutdown, Action::Stop(Stop::TripleFault))),
            (RunExit::SystemEvent(reset), true, (ExitKind::SystemEvent, Action::Stop(Stop::Reset))),
            (RunExit::SystemEvent(off), true, (ExitKind::SystemEvent, Action::Stop(Stop::Reset))),
            (RunExit::SystemEvent(crash), true, (ExitKind::SystemEvent, Action::Stop(Stop::SystemEvent(crash)))),
            (RunExit::InternalError, true, (ExitKind::InternalError, Action::Stop(Stop::InternalError))),
            (fail, true, (ExitKind::FailEntry, Action::Stop(Stop::FailEntry { reason: 7, cpu: 1 }))),
            (RunExit::Intr, true, (ExitKind::Interrupted, Continue)),
            (RunExit::Kicked, true, (ExitKind::Interrupted, ClearKick)),
            (RunExit::Unexpected, true, (ExitKind::Other, Continue)),
            (RunExit::RunFailed(libc::EFAULT), true, (ExitKind::Other, Action::Stop(Stop::RunFailed(libc::EFAULT)))),
        ] {
            assert_eq!(route(exit, !lapic), want, "{exit:?}, in-kernel LAPIC {lapic}");
        }
    }

    #[test]
    fn every_exit_kind_is_counted_once() {
        let all = [
            ExitKind::IoIn,
            ExitKind::IoOut,
            ExitKind::MmioRead,
            ExitKind::MmioWrite,
            ExitKind::Hlt,
            ExitKind::Shutdown,
            ExitKind::InternalError,
            ExitKind::SystemEvent,
            ExitKind::FailEntry,
            ExitKind::Interrupted,
            ExitKind::Other,
        ];
        let mut counts = ExitCounts::default();
        for (n, kind) in all.into_iter().enumerate() {
            counts.count(kind);
            assert_eq!(counts.total(), n as u64 + 1, "{kind:?}");
        }
        let one = ExitCounts { io_in: 1, io_out: 1, mmio_read: 1, mmio_write: 1, hlt: 1, other: 6 };
        assert_eq!(counts, one);
    }

    #[test]
    fn string_io_is_one_access_per_element() {
        let dev = Arc::new(Mutex::new(Counter::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, "uart", dev.clone()).unwrap();
        // `rep insb` of 4 from 0x3fd: four 1-byte reads at offset 5, not one 4-byte read.
        let mut data = [0u8; 4];
        assert!(pio_in(&bus, 0x3fd, &mut data, 1));
        assert_eq!(data, [1, 2, 3, 4]);
        assert_eq!(std::mem::take(&mut dev.lock().unwrap().accesses), vec![(5, 1); 4]);
        // `rep outsw` of 3 to 0x3f8: three 2-byte writes.
        assert!(pio_out(&bus, 0x3f8, &[0; 6], 2));
        assert_eq!(std::mem::take(&mut dev.lock().unwrap().accesses), vec![(0, 2); 3]);
        // A plain `in al, dx` is a count of 1.
        let mut one = [0u8; 1];
        assert!(pio_in(&bus, 0x3ff, &mut one, 1));
        // Unmapped elements float high.
        let mut data = [0u8; 2];
        assert!(!pio_in(&bus, 0x80, &mut data, 1));
        assert_eq!(data, [0xff, 0xff]);
    }
}
