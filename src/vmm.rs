//! The boot recipe, top to bottom (`Vmm::new`), and the run (`Vmm::run`).
//!
//! ```text
//! 1. open /dev/kvm, check the API version          KVM api.rst 4.1
//! 2. KVM_CREATE_VM; in-kernel PIC/IOAPIC/PIT       api.rst 4.2, 4.24, 4.68
//! 3. map guest RAM, KVM_SET_USER_MEMORY_REGION     memory.rs
//! 4. load kernel, initrd, cmdline, boot_params     boot.rs (Linux boot.rst / PVH)
//! 5. GDT, page tables, MP table, ACPI tables       x86/regs.rs, x86/mptable.rs, x86/acpi.rs
//! 6. devices on the PIO bus: COM1, i8042, exit,    devices/
//!    ACPI sleep registers; virtio-mmio on MMIO
//! 7. vCPUs: CPUID, MSRs, registers, LAPIC          vcpu.rs, x86/
//! 8. one thread per vCPU, the event loop on main   vcpu.rs, event_loop.rs
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, BootError, BootInfo, KernelFormat};
use crate::bus::{Bus, BusError};
use crate::config::NetBackendConfig;
use crate::config::{self, ConfigError, IrqchipMode, RngMode, SerialMode, VmConfig};
use crate::console::{self, RawTerminal};
use crate::control::{StopReason, VmControl};
use crate::devices::acpi_sleep::AcpiSleep;
use crate::devices::exit::ExitDevice;
use crate::devices::frame_stream::FrameStream;
use crate::devices::i8042::I8042;
use crate::devices::net_backend::NetBackend;
use crate::devices::passt::{Endpoint, GuestIpv4, Passt, PasstError};
use crate::devices::serial::{IrqLine, Serial, SerialOutput};
use crate::devices::serial_sink::{ConsoleTail, SERIAL_FILE_LIMIT, StdoutSink};
use crate::devices::tap::{Tap, TapError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::console::{Console, Port};
use crate::devices::virtio::mmio::{self as virtio_mmio, MmioTransport};
use crate::devices::virtio::net::{self, Net};
use crate::devices::virtio::rng::Rng;
use crate::event_loop::{self, ConsoleInput, EventLoopError, QueueEvent, TapEvent};
use crate::layout;
use crate::memory::{self, GuestRam, MemoryError};
use crate::sandbox::{self, SeccompMode, ThreadKind};
use crate::stats::ExitStats;
use crate::timeline::Timeline;
use crate::vcpu::{self, ExitCounts, RegSnapshot, Vcpu, VcpuError, VcpuReport, VcpuShared};
use crate::x86::{acpi, cpuid, mptable, regs};

/// Where KVM may put the TSS it needs for real-mode emulation on Intel
/// (api.rst 4.43 KVM_SET_TSS_ADDR): three pages just below the BIOS area, in the MMIO gap.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Everything that can go wrong building or running a VM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// /dev/kvm cannot be used.
    #[error("{0}")]
    KvmUnusable(String),
    /// A KVM VM-level ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we tried.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel/initrd loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Boot structures in guest memory.
    #[error("cannot write boot structures into guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Device wiring.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The event loop.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The serial output file.
    #[error("cannot open serial output file {path}")]
    SerialFile {
        /// The path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk image cannot be used.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A tap cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// passt (`--net user`) cannot be started.
    #[error(transparent)]
    Passt(#[from] PasstError),
    /// `--net stream=PATH` cannot be opened.
    #[error("--net stream={}: cannot connect", path.display())]
    NetStream {
        /// The path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A host resource (eventfd, thread) could not be created.
    #[error("cannot create {0}")]
    Host(&'static str, #[source] std::io::Error),
}

impl VmmError {
    /// True when the problem is /dev/kvm itself.
    pub fn is_kvm_unusable(&self) -> bool {
        matches!(self, VmmError::KvmUnusable(_))
    }
}

/// How a run ended, with what ember saw on the way.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the VM stopped.
    pub reason: StopReason,
    /// Exits per vCPU.
    pub exits: Vec<ExitCounts>,
    /// Exit statistics per vCPU (with `VmConfig::observe.stats`).
    pub stats: Vec<Option<Box<ExitStats>>>,
    /// Registers per vCPU at stop (with `VmConfig::observe.snapshot_registers`).
    pub registers: Vec<Option<RegSnapshot>>,
    /// Guest RAM the host backed by the end (touched pages), in bytes.
    pub guest_resident_bytes: u64,
}

/// A built VM, ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs and the VM before guest memory.
    vcpus: Vec<Vcpu>,
    _vm: VmFd,
    _kvm: Kvm,
    /// The virtqueues' ioeventfds, for the event loop.
    queue_events: Vec<QueueEvent>,
    /// The taps of virtio-net devices, for the event loop.
    tap_events: Vec<TapEvent>,
    control: Arc<VmControl>,
    serial: Arc<Mutex<Serial>>,
    /// The stdout writer behind the serial console (`--serial stdio`).
    stdout_sink: Option<StdoutSink>,
    /// The writers behind the console ports (`VmConfig::split_output`): stdout, stderr.
    port_sinks: Vec<StdoutSink>,
    /// The serial console's last bytes when it is not shown (split output).
    console_tail: ConsoleTail,
    input_drained: Arc<EventFd>,
    serial_mode: SerialMode,
    seccomp: SeccompMode,
    timeline: Arc<Timeline>,
    /// What was loaded, for `ember demo`'s narration.
    pub boot: BootInfo,
    /// Whether the in-kernel irqchip was created.
    pub irqchip: bool,
    /// The passt processes of `--net user` devices: stopped and reaped on drop.
    _passts: Vec<Passt>,
    /// Guest RAM: last, so it is unmapped after every device and vCPU that holds a view of it.
    mem: GuestRam,
}

/// Opens /dev/kvm, turning the usual failures into advice.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    match Kvm::new() {
        Ok(kvm) => {
            let v = kvm.get_api_version();
            if v != 12 {
                return Err(VmmError::KvmUnusable(format!(
                    "/dev/kvm speaks KVM API version {v}, ember needs version 12"
                )));
            }
            Ok(kvm)
        }
        Err(e) => Err(VmmError::KvmUnusable(match e.errno() {
            libc::ENOENT => "/dev/kvm does not exist: this host has no KVM. Load the module \
                 (modprobe kvm_intel or kvm_amd), or enable virtualization in the firmware / \
                 nested virtualization in the cloud VM"
                .into(),
            libc::EACCES | libc::EPERM => "permission denied opening /dev/kvm: add yourself to the \
                 `kvm` group (sudo usermod -aG kvm $USER, then log in again) or run as root"
                .into(),
            _ => format!("cannot open /dev/kvm: {e}"),
        })),
    }
}

impl Vmm {
    /// Builds the VM described by `cfg`, recording each step on `timeline`.
    pub fn new(cfg: &VmConfig, timeline: Arc<Timeline>) -> Result<Self, VmmError> {
        cfg.validate()?;
        // Check the files before touching KVM: a typo should not cost a VM.
        let format = boot::probe_kernel(&cfg.kernel)?;
        if let Some(initrd) = &cfg.initrd {
            boot::open_initrd(initrd)?;
        }
        let linux = !matches!(format, KernelFormat::Elf { linux_note: false });
        let mut passts = Vec::new();
        let mut virtio = open_virtio_devices(cfg, linux, &mut passts)?;
        let control = Arc::new(VmControl::new().map_err(|e| VmmError::Host("an eventfd", e))?);
        let mut port_sinks = Vec::new();
        if cfg.split_output && linux {
            let (console, sinks) = create_console(&control, cfg.seccomp)?;
            virtio.push(("virtio-console", Box::new(console)));
            port_sinks = sinks;
            if virtio.len() > config::MAX_VIRTIO_DEVICES {
                return Err(ConfigError::TooManyDevices(virtio.len()).into());
            }
        }
        let irqchip = match cfg.irqchip {
            IrqchipMode::On => true,
            IrqchipMode::Off => false,
            // A Linux kernel needs its timer and interrupts; a tiny one-vCPU
            // guest does not, and skipping them makes VM teardown much cheaper.
            // virtio devices interrupt through irqfds, which need it too.
            IrqchipMode::Auto => cfg.cpus > 1 || linux || !virtio.is_empty(),
        };
        // With ACPI tables the DSDT describes the virtio devices. Not on the
        // command line too: there Linux would register each window twice, and
        // a hardware-reduced ACPI machine has no legacy IRQ numbers for the
        // command-line copies, which fail to probe and can hold the window.
        let acpi = irqchip && cfg.acpi;
        let cmdline = cmdline_with_virtio(&cfg.cmdline, if acpi { 0 } else { virtio.len() })?;

        // 1. /dev/kvm
        let kvm = open_kvm()?;
        timeline.mark("ember: /dev/kvm opened");

        // 2. The VM and, when needed, the in-kernel interrupt controllers.
        let vm = kvm.create_vm().map_err(|source| VmmError::Kvm { what: "create a VM", source })?;
        if irqchip {
            vm.set_tss_address(KVM_TSS_ADDRESS)
                .map_err(|source| VmmError::Kvm { what: "set the TSS address", source })?;
            vm.create_irq_chip().map_err(|source| VmmError::Kvm { what: "create the in-kernel irqchip", source })?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            vm.create_pit2(pit).map_err(|source| VmmError::Kvm { what: "create the in-kernel PIT", source })?;
        }
        timeline.mark("ember: VM created");

        // 3. Guest RAM.
        let mem = memory::create_guest_memory(cfg.mem_size_bytes)?;
        memory::register_guest_memory(&vm, &mem)?;
        timeline.mark("ember: guest memory registered");

        // 4-5. Kernel and boot structures.
        let boot = boot::load_kernel(&mem, &cfg.kernel, cfg.initrd.as_deref(), &cmdline)?;
        regs::setup_gdt_idt(&mem)?;
        if boot.mode == regs::EntryMode::Long64 {
            regs::setup_page_tables(&mem)?;
        }
        if irqchip {
            // Both: a kernel without CONFIG_ACPI reads the MP table, one with it the ACPI tables.
            mptable::setup_mptable(&mem, cfg.cpus)?;
        }
        if acpi {
            let slots: Vec<acpi::MmioSlot> = (0..virtio.len())
                .map(|i| {
                    let (base, gsi) = virtio_slot(i);
                    acpi::MmioSlot { base, size: layout::VIRTIO_MMIO_SIZE, gsi }
                })
                .collect();
            acpi::setup_acpi(&mem, cfg.cpus, &slots)?;
        }
        timeline.mark("ember: kernel loaded");

        // 6. Devices.
        let input_drained = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?);
        let mut stdout_sink = None;
        let console_tail = ConsoleTail::default();
        let sink: Box<dyn Write + Send> = match &cfg.serial {
            // The console's output (kernel messages) mixes into neither stream;
            // its tail is shown only if the guest crashes.
            SerialMode::Stdio if !port_sinks.is_empty() => Box::new(console_tail.clone()),
            SerialMode::Stdio => {
                let out = StdoutSink::new(dup_stdout()?, control.clone(), cfg.seccomp)
                    .map_err(|e| VmmError::Host("the serial output thread", e))?;
                stdout_sink = Some(out.clone());
                Box::new(out)
            }
            SerialMode::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmmError::SerialFile { path: path.clone(), source })?,
            ),
            SerialMode::None => Box::new(std::io::sink()),
        };
        let irq = if irqchip {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?;
            vm.register_irqfd(&evt, layout::COM1_IRQ)
                .map_err(|source| VmmError::Kvm { what: "register the serial irqfd", source })?;
            IrqLine::Irqfd(evt)
        } else {
            IrqLine::None
        };
        let mut out = SerialOutput::new(sink, control.clone(), timeline.clone());
        if matches!(cfg.serial, SerialMode::File(_)) {
            out = out.with_limit(SERIAL_FILE_LIMIT);
        }
        let serial = Arc::new(Mutex::new(Serial::new(irq, out, Some(input_drained.clone()))));
        let mut pio = Bus::with_control(control.clone());
        pio.insert(u64::from(layout::COM1_PORT), 8, "serial (COM1)", serial.clone())?;
        pio.insert(u64::from(layout::I8042_DATA_PORT), 5, "i8042", Arc::new(Mutex::new(I8042::new(control.clone()))))?;
        pio.insert(
            u64::from(layout::EXIT_PORT),
            u64::from(layout::EXIT_PORT_LEN),
            "exit device",
            Arc::new(Mutex::new(ExitDevice::new(control.clone()))),
        )?;
        pio.insert(
            u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
            u64::from(layout::ACPI_SLEEP_PORT_LEN),
            "ACPI sleep registers",
            Arc::new(Mutex::new(AcpiSleep::new(control.clone()))),
        )?;
        for extra in &cfg.extra_pio {
            pio.insert(u64::from(extra.port), u64::from(extra.len), extra.name, extra.device.clone())?;
        }
        let mut mmio = Bus::with_control(control.clone());
        let (queue_events, tap_events) = create_virtio_transports(&vm, &mem, &mut mmio, virtio)?;

        // 7. vCPUs.
        let mut base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmmError::Kvm { what: "report its supported CPUID", source })?;
        // What KVM leaves to userspace (x86/cpuid.rs): the TSC-deadline bit, the host's brand string
        // and L1 cache leaf, the paravirtual features that need the in-kernel LAPIC.
        let vm_features = cpuid::VmFeatures {
            in_kernel_lapic: irqchip,
            tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        cpuid::adjust_for_vm(base_cpuid.as_mut_slice(), vm_features, cpuid::host_cpuid);
        let shared = VcpuShared {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            control: control.clone(),
            timeline: timeline.clone(),
            base_cpuid,
            count: cfg.cpus,
            irqchip,
            observe: cfg.observe.clone(),
            trace_left: Arc::new(std::sync::atomic::AtomicU64::new(cfg.observe.trace_exits)),
        };
        let vcpus = (0..cfg.cpus).map(|id| Vcpu::new(&vm, id, &shared, &boot)).collect::<Result<Vec<_>, _>>()?;
        timeline.mark("ember: vCPUs configured");

        Ok(Vmm {
            vcpus,
            _vm: vm,
            _kvm: kvm,
            mem,
            queue_events,
            tap_events,
            control,
            serial,
            stdout_sink,
            port_sinks,
            console_tail,
            input_drained,
            serial_mode: cfg.serial.clone(),
            seccomp: cfg.seccomp,
            timeline,
            boot,
            irqchip,
            _passts: passts,
        })
    }

    /// Runs the VM until it stops; returns why and what the vCPUs saw.
    pub fn run(mut self) -> Result<RunOutcome, VmmError> {
        // Signals that end the VM are read from a signalfd by the event loop;
        // block them before spawning so no vCPU thread receives them.
        let signals = event_loop::block_stop_signals();
        vcpu::install_kick_handler()?;

        let stdin_fd = std::io::stdin().as_raw_fd();
        let _raw = match self.serial_mode {
            SerialMode::Stdio => RawTerminal::enable(stdin_fd),
            _ => None,
        };
        let console = (self.serial_mode == SerialMode::Stdio).then(|| ConsoleInput {
            serial: self.serial.clone(),
            fd: stdin_fd,
            // Also when the Linux lane's client, which holds the user's terminal, says so: there
            // this ember's stdin is a pipe from that terminal (lane::warm::ESCAPE_ENV).
            escape: console::is_tty(stdin_fd) || std::env::var_os(crate::lane::warm::ESCAPE_ENV).is_some_and(|v| v == "1"),
            drained: self.input_drained.clone(),
        });

        // Each vCPU thread enters its sandbox, then waits for the main thread
        // to be in its own (or to give up: the sender dropped) before its
        // first KVM_RUN: the guest runs only once every thread is confined.
        let mut handles: Vec<JoinHandle<VcpuReport>> = Vec::new();
        let mut gates = Vec::new();
        let seccomp = self.seccomp;
        for (i, v) in self.vcpus.drain(..).enumerate() {
            let control = self.control.clone();
            let (gate, wait) = std::sync::mpsc::channel::<()>();
            gates.push(gate);
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    vcpu::run_catching(&control, &format!("vCPU {i}"), || {
                        if let Err(e) = sandbox::enter(ThreadKind::Vcpu, seccomp) {
                            control.stop(StopReason::VmmError(format!("vCPU {i}: {e}")));
                            return VcpuReport::default();
                        }
                        let _ = wait.recv();
                        v.run()
                    })
                    .unwrap_or_default()
                })
                .map_err(|e| VmmError::Host("a vCPU thread", e))?;
            handles.push(h);
        }

        let result = vcpu::run_catching(&self.control, "the event loop", || {
            let queues = &self.queue_events;
            event_loop::run(&self.control, console, &signals, queues, &self.tap_events, seccomp, move || drop(gates))
        })
        .unwrap_or_else(|| Ok(self.control.reason().unwrap_or(StopReason::VmmError("the event loop failed".into()))));
        if result.is_err() {
            self.control.stop(StopReason::VmmError("the event loop failed".into()));
        }
        if let Some((at, why)) = self.control.requested() {
            self.timeline.mark_at(format!("{why}: stop requested"), at);
        }
        self.timeline.mark("ember: event loop saw the stop");
        let reports = stop_vcpus(handles);
        self.timeline.mark("ember: vCPUs joined");
        self.finish_console_ports();
        self.finish_serial_output();
        let reason = result?;
        let exits = reports.iter().map(|r| r.counts).collect();
        let registers = reports.iter().map(|r| r.registers).collect();
        let stats = reports.into_iter().map(|r| r.stats).collect();
        let guest_resident_bytes = crate::memory::resident_bytes(&self.mem);
        Ok(RunOutcome { reason, exits, stats, registers, guest_resident_bytes })
    }

    /// The console ports' last output: what the guest wrote just before it
    /// stopped the VM may still be in a transmit queue the event loop has not
    /// served. The VM is stopped, so the sinks may grow now; then they are
    /// written out like the serial console's (unless the user quit).
    fn finish_console_ports(&self) {
        if self.port_sinks.is_empty() {
            return;
        }
        let quit = matches!(self.control.reason(), Some(StopReason::UserQuit(_)));
        if !quit {
            self.port_sinks.iter().for_each(StdoutSink::unbounded);
            let consoles =
                self.tap_events.iter().map(|t| &t.transport).filter(|t| {
                    t.lock().is_ok_and(|t| t.device_type() == virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE)
                });
            for t in consoles {
                // Each call serves one queue's worth per port; a stopped guest adds nothing.
                while let Ok(mut t) = t.lock()
                    && t.host_event()
                {}
            }
        }
        for sink in &self.port_sinks {
            let dropped = sink.finish(quit);
            if dropped > 0 && !quit {
                log::warn!(
                    "console: output is not being read: the last {dropped} bytes of the guest's output are dropped"
                );
            }
        }
        // After the command's own output: ember's report comes last.
        if let Some(StopReason::GuestCrash(_)) = self.control.reason() {
            let tail = self.console_tail.contents();
            let tail = String::from_utf8_lossy(&tail);
            eprintln!("ember: the guest crashed; the end of its console:\n{}", tail.trim_end());
        }
    }

    /// Writes out what the guest printed (unless the user quit: then it is
    /// dropped) and says how much of its output was lost, if any.
    fn finish_serial_output(&self) {
        let quit = matches!(self.control.reason(), Some(StopReason::UserQuit(_)));
        if let Some(out) = &self.stdout_sink {
            let dropped = out.finish(quit);
            if dropped > 0 && !quit {
                log::warn!(
                    "serial: stdout is not being read: the last {dropped} bytes of the guest's output are dropped"
                );
            }
        }
        let dropped = self.serial.lock().map(|s| s.output().dropped()).unwrap_or(0);
        if dropped > 0 {
            log::warn!("serial: {dropped} bytes of the guest's output were dropped in all");
        }
    }

    /// The shared stop control (for tests and tools that stop a VM from outside).
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }
}

/// `--net stream=PATH`: connects to a Unix stream socket, or opens a
/// character device (a virtio-serial port), non-blocking either way.
fn open_stream(path: &std::path::Path) -> Result<FrameStream, VmmError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let err = |source| VmmError::NetStream { path: path.to_path_buf(), source };
    let kind = std::fs::metadata(path).map_err(err)?.file_type();
    let file = if kind.is_socket() {
        let s = std::os::unix::net::UnixStream::connect(path).map_err(err)?;
        s.set_nonblocking(true).map_err(err)?;
        std::fs::File::from(std::os::fd::OwnedFd::from(s))
    } else if kind.is_char_device() {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(err)?
    } else {
        return Err(err(std::io::Error::other("neither a Unix socket nor a character device")));
    };
    Ok(FrameStream::new(file, path.display().to_string()))
}

/// A virtio device with the name its bus slot shows (in `--stats`, messages).
type NamedDevice = (&'static str, Box<dyn VirtioDevice>);

/// Opens the virtio devices `cfg` asks for, in bus order: the disks (the
/// first becomes /dev/vda), the NICs (the first is eth0), then the entropy
/// device. Host files and taps are checked here, before any KVM call.
fn open_virtio_devices(cfg: &VmConfig, linux: bool, passts: &mut Vec<Passt>) -> Result<Vec<NamedDevice>, VmmError> {
    let mut devices: Vec<NamedDevice> = Vec::new();
    for disk in &cfg.disks {
        devices.push(("virtio-blk", Box::new(Block::open(disk)?)));
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        let backend = match &n.backend {
            NetBackendConfig::Tap { name, create } => NetBackend::Tap(Tap::open(name, *create)?),
            NetBackendConfig::User { publish, guest } => {
                let guest = match guest {
                    Some(g) => *g,
                    None => GuestIpv4::from_host()?,
                };
                let (p, endpoint) = Passt::start(&guest, publish, None)?;
                let Endpoint::Socket(socket) = endpoint else {
                    // Passt::start without a path always gives a socket.
                    return Err(VmmError::Host("passt's socket", std::io::Error::other("no socket pair")));
                };
                let name = format!("passt (pid {})", p.pid());
                passts.push(p);
                NetBackend::Stream(FrameStream::new(socket, name))
            }
            NetBackendConfig::Stream { path, .. } => NetBackend::Stream(open_stream(path)?),
        };
        let mac = n.mac.unwrap_or_else(|| net::default_mac(&n.mac_seed(), i));
        devices.push(("virtio-net", Box::new(Net::new(backend, mac))));
    }
    let rng = match cfg.rng {
        RngMode::On => true,
        RngMode::Off => false,
        // See devices/virtio/rng.rs for why Linux gets one; not without an
        // irqchip the user asked to do without.
        RngMode::Auto => linux && cfg.irqchip != IrqchipMode::Off,
    };
    if rng {
        devices.push(("virtio-rng", Box::new(Rng::new())));
    }
    if devices.len() > config::MAX_VIRTIO_DEVICES {
        return Err(ConfigError::TooManyDevices(devices.len()).into());
    }
    Ok(devices)
}

/// The virtio-console device of `VmConfig::split_output`: port 0
/// `ember.stdout` to a copy of fd 1, port 1 `ember.stderr` to a copy of fd 2,
/// each through its own writer thread.
fn create_console(control: &Arc<VmControl>, seccomp: SeccompMode) -> Result<(Console, Vec<StdoutSink>), VmmError> {
    let room = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?);
    let mut ports = Vec::new();
    let mut sinks = Vec::new();
    for (fd, name, thread) in [(1, "ember.stdout", "console-out"), (2, "ember.stderr", "console-err")] {
        let sink = StdoutSink::for_device(dup_fd(fd)?, control.clone(), seccomp, thread, room.clone())
            .map_err(|e| VmmError::Host("a console output thread", e))?;
        ports.push(Port::new(name, sink.clone()));
        sinks.push(sink);
    }
    Ok((Console::new(ports, room), sinks))
}

/// The guest address and IRQ of virtio-mmio device `i`.
fn virtio_slot(i: usize) -> (u64, u32) {
    (layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE, layout::VIRTIO_IRQ_START + i as u32)
}

/// `cmdline` plus one `virtio_mmio.device=<size>@<base>:<irq>` per device
/// (Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, drivers/virtio/virtio_mmio.c),
/// added here so that `--cmdline` users get them too.
pub fn cmdline_with_virtio(cmdline: &str, count: usize) -> Result<String, ConfigError> {
    let mut out = cmdline.to_string();
    for i in 0..count {
        let (base, irq) = virtio_slot(i);
        if !out.is_empty() {
            out.push(' ');
        }
        out += &format!("virtio_mmio.device={}K@{base:#x}:{irq}", layout::VIRTIO_MMIO_SIZE >> 10);
    }
    if out.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(ConfigError::CmdlineTooLong { len: out.len() });
    }
    Ok(out)
}

/// Puts each device on the MMIO bus behind a virtio-mmio transport, with an
/// irqfd for its interrupt line and an ioeventfd per queue (datamatch on the
/// queue index written to VIRTIO_MMIO_QUEUE_NOTIFY). All of it is registered
/// with KVM here, before the first KVM_RUN.
fn create_virtio_transports(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    devices: Vec<NamedDevice>,
) -> Result<(Vec<QueueEvent>, Vec<TapEvent>), VmmError> {
    let mut events = Vec::new();
    let mut taps = Vec::new();
    for (i, (name, device)) in devices.into_iter().enumerate() {
        let (base, irq) = virtio_slot(i);
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?;
        vm.register_irqfd(&irq_evt, irq).map_err(|source| VmmError::Kvm { what: "register a virtio irqfd", source })?;
        let mut transport = MmioTransport::new(device, mem.clone(), irq_evt);
        let queues = transport.queue_count();
        let host_fd = transport.host_fd();
        let writable = transport.host_fd_writable();
        let mut queue_evts = Vec::with_capacity(queues);
        for q in 0..queues as u32 {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?;
            let addr = IoEventAddress::Mmio(virtio_mmio::notify_address(vm_memory::GuestAddress(base)));
            vm.register_ioevent(&evt, &addr, q)
                .map_err(|source| VmmError::Kvm { what: "register a virtio ioeventfd", source })?;
            transport.set_queue_event(q as usize, evt.try_clone().map_err(|e| VmmError::Host("an eventfd", e))?);
            queue_evts.push(evt);
        }
        let transport = Arc::new(Mutex::new(transport));
        if let Some(fd) = host_fd {
            taps.push(TapEvent { fd, writable, transport: transport.clone() });
        }
        for (q, evt) in queue_evts.into_iter().enumerate() {
            events.push(QueueEvent { evt, transport: transport.clone(), queue: q as u32 });
        }
        mmio.insert(base, layout::VIRTIO_MMIO_SIZE, name, transport)?;
    }
    Ok((events, taps))
}

/// Kicks every vCPU thread out of KVM_RUN until it returns, then joins it.
/// The first kicks come 50 us apart (a vCPU in KVM_RUN leaves at once); a
/// vCPU that takes longer (a device call in progress) is kicked less and less
/// often, up to every 10 ms, so a slow stop does not burn a host core.
fn stop_vcpus(handles: Vec<JoinHandle<VcpuReport>>) -> Vec<VcpuReport> {
    let mut exits = Vec::with_capacity(handles.len());
    for h in handles {
        let mut pause = Duration::from_micros(50);
        while !h.is_finished() {
            // SAFETY: the thread is alive (not finished), so its pthread_t is valid.
            unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::kick_signal()) };
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        exits.push(h.join().unwrap_or_default());
    }
    exits
}

fn dup_stdout() -> Result<OwnedFd, VmmError> {
    dup_fd(1)
}

/// A copy of descriptor `src` (1 or 2), which the writer threads own.
fn dup_fd(src: RawFd) -> Result<OwnedFd, VmmError> {
    // SAFETY: dup of an fd returns a new descriptor (or -1) that we then own.
    let fd = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(VmmError::Host("a copy of stdout or stderr", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is fresh and owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
