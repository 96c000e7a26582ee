//! One vCPU, one thread: the KVM_RUN loop (KVM api.rst, 4.10 KVM_RUN, 5 "The
//! kvm_run structure").
//!
//! The loop only routes: port I/O exits to the PIO bus, MMIO exits to the MMIO
//! bus, and the exits that end a VM (triple fault, internal error, reset) to
//! [`VmControl::stop`]. Port numbers and device logic never appear here.
//!
//! Stopping a vCPU that sits inside KVM_RUN (a halted AP, a guest spinning in
//! its own code) takes a signal: the event loop sends `SIGRTMIN` to the
//! thread; its handler sets `kvm_run.immediate_exit`, so KVM_RUN returns EINTR
//! now, or at its next entry if the signal landed just before it (api.rst,
//! "immediate_exit").

use std::cell::Cell;
use std::sync::Arc;

use kvm_bindings::{CpuId, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use crate::boot::BootInfo;
use crate::bus::Bus;
use crate::control::{StopReason, VmControl};
use crate::layout::BOOT_STACK_POINTER;
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
    /// Signals, system events and everything else.
    pub other: u64,
}

impl ExitCounts {
    /// All exits.
    pub fn total(&self) -> u64 {
        self.io_in + self.io_out + self.mmio_read + self.mmio_write + self.hlt + self.other
    }

    /// Adds another vCPU's counts.
    pub fn add(&mut self, o: &ExitCounts) {
        self.io_in += o.io_in;
        self.io_out += o.io_out;
        self.mmio_read += o.mmio_read;
        self.mmio_write += o.mmio_write;
        self.hlt += o.hlt;
        self.other += o.other;
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
    /// The supported CPUID to adapt per vCPU.
    pub base_cpuid: CpuId,
    /// Number of vCPUs.
    pub count: u8,
    /// Whether the in-kernel irqchip exists.
    pub irqchip: bool,
}

impl Vcpu {
    /// Creates vCPU `id` and loads its boot state. vCPU 0 starts at the kernel
    /// entry; the others wait in KVM for INIT/SIPI from vCPU 0.
    pub fn new(vm: &VmFd, id: u8, shared: &VcpuShared, boot: &BootInfo) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|source| VcpuError::Create { id, source })?;
        let setup = |what| move |source| VcpuError::Setup { what, id, source };

        let mut cpuid = shared.base_cpuid.clone();
        cpuid::adjust_for_vcpu(cpuid.as_mut_slice(), id, shared.count);
        if !shared.irqchip {
            cpuid::drop_irqchip_features(cpuid.as_mut_slice());
        }
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

        Ok(Vcpu {
            fd,
            id,
            pio: shared.pio.clone(),
            mmio: shared.mmio.clone(),
            control: shared.control.clone(),
            timeline: shared.timeline.clone(),
            hlt_is_final: !shared.irqchip,
        })
    }

    /// Runs the guest until the VM stops; returns this vCPU's exit counts.
    pub fn run(mut self) -> ExitCounts {
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut counts = ExitCounts::default();
        let first_run = format!("vcpu{}: first KVM_RUN", self.id);
        self.timeline.mark(first_run);
        while !self.control.is_stopped() {
            let id = self.id;
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    counts.io_out += 1;
                    if !self.pio.write(u64::from(port), data) {
                        log::debug!("vcpu{id}: OUT to unmapped port {port:#x} ignored");
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    counts.io_in += 1;
                    if !self.pio.read(u64::from(port), data) {
                        // Nothing drives the ISA bus: it floats high.
                        data.fill(0xff);
                        log::debug!("vcpu{id}: IN from unmapped port {port:#x} reads 0xff");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    counts.mmio_read += 1;
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                        let len = data.len();
                        self.bus_fault("read", addr, len);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    counts.mmio_write += 1;
                    if !self.mmio.write(addr, data) {
                        let len = data.len();
                        self.bus_fault("write", addr, len);
                    }
                }
                Ok(VcpuExit::Hlt) => {
                    counts.hlt += 1;
                    if self.hlt_is_final {
                        self.control.stop(StopReason::GuestCrash(format!(
                            "vCPU {id} executed HLT and this VM has no interrupt controller to wake it \
                             (the guest should write its status to the exit device instead)"
                        )));
                    }
                }
                Ok(VcpuExit::Shutdown) => {
                    counts.other += 1;
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    self.control.stop(StopReason::GuestCrash(format!(
                        "vCPU {id} triple-faulted (KVM_EXIT_SHUTDOWN) near RIP {rip:#x}"
                    )));
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    counts.other += 1;
                    let reason = match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET | kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                            StopReason::Reset
                        }
                        _ => StopReason::GuestCrash(format!("vCPU {id}: KVM system event {kind}")),
                    };
                    self.control.stop(reason);
                }
                Ok(VcpuExit::InternalError) => {
                    counts.other += 1;
                    // SAFETY: KVM filled the `internal` member of the union for
                    // KVM_EXIT_INTERNAL_ERROR, which is the exit we are handling.
                    let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    let what = match sub {
                        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
                        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
                        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
                        _ => "unknown suberror",
                    };
                    self.control.stop(StopReason::GuestCrash(format!(
                        "KVM internal error on vCPU {id} at RIP {rip:#x}: {what} (suberror {sub})"
                    )));
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    self.control.stop(StopReason::GuestCrash(format!(
                        "KVM could not enter vCPU {id} (hardware reason {reason:#x} on host CPU {cpu})"
                    )));
                }
                Ok(VcpuExit::Intr) => counts.other += 1,
                Ok(exit) => {
                    counts.other += 1;
                    log::warn!("vcpu{id}: unexpected exit {exit:?}, resuming");
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    counts.other += 1;
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    self.control.stop(StopReason::VmmError(format!("KVM_RUN failed on vCPU {id}: {e}")));
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        counts
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

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
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
