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
use crate::bus::{Bus, BusDevice, BusError};
use crate::config::KernelSource;
use crate::config::NetBackendConfig;
use crate::config::{self, ConfigError, IrqchipMode, RngMode, SerialMode, ShareConfig, ValidConfig, VmConfig};
use crate::console::{self, RawTerminal};
use crate::control::{StopReason, VmControl};
use crate::devices::acpi_sleep::AcpiSleep;
use crate::devices::exit::ExitDevice;
use crate::devices::i8042::I8042;
use crate::devices::irq::IrqLine;
use crate::devices::pci_host::PciHost;
use crate::devices::serial::{LineObserver, Serial, SerialOutput};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::console::{Console, Port};
use crate::devices::virtio::mmio::{self as virtio_mmio, MmioTransport};
use crate::devices::virtio::net::{self, Net};
use crate::devices::virtio::p9::P9;
use crate::devices::virtio::rng::Rng;
use crate::event_loop::{self, ConsoleInput, EventLoopError, QueueEvent, TapEvent};
use crate::extras::{ExtraPioDevice, Extras};
use crate::host::frame_stream::FrameStream;
use crate::host::net_backend::NetBackend;
use crate::host::p9_server::{FsServer, FsServerError};
use crate::host::passt::{Endpoint, GuestIpv4, Passt, PasstError};
use crate::host::serial_sink::{ConsoleTail, SERIAL_FILE_LIMIT, StdoutSink};
use crate::host::stdin_source::StdinSource;
use crate::host::tap::{Tap, TapError};
use crate::layout;
use crate::memory::{self, GuestRam, MemoryError};
use crate::pause::PauseGate;
use crate::requests::{self, Controller, RequestReceiver, RequestSender};
use crate::sandbox::{self, SeccompMode, ThreadKind};
use crate::snapshot::devices::SerialState;
use crate::snapshot::{self, DiskSpec, Machine, NetSpec, SnapshotError};
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
    /// A snapshot could not be read or loaded.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
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
    /// A shared folder's file server cannot be started (`-v`).
    #[error(transparent)]
    FsServer(#[from] FsServerError),
    /// `--net stream=PATH` cannot be opened.
    #[error("--net stream={}: cannot connect", path.display())]
    NetStream {
        /// The path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM was built but could not start (a vCPU refused its snapshot state); nothing ran.
    #[error("{0}")]
    Start(String),
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
    /// Exit statistics per vCPU (with `Extras::observe.stats`).
    pub stats: Vec<Option<Box<ExitStats>>>,
    /// Registers per vCPU at stop (with `Extras::observe.snapshot_registers`).
    pub registers: Vec<Option<RegSnapshot>>,
    /// Guest RAM the host backed by the end (touched pages), in bytes.
    pub guest_resident_bytes: u64,
}

/// Called once by [`Vmm::run`] with whether the VM started.
pub type StartHook = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A built VM, ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs and the VM before guest memory.
    vcpus: Vec<Vcpu>,
    vm: VmFd,
    _kvm: Kvm,
    /// The virtqueues' ioeventfds, for the event loop.
    queue_events: Vec<QueueEvent>,
    /// The taps of virtio-net devices, for the event loop.
    tap_events: Vec<TapEvent>,
    control: Arc<VmControl>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    /// The virtio-mmio transports, in bus order.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The pause handshake with the vCPUs.
    gate: Arc<PauseGate>,
    /// What the VM is made of, for a snapshot.
    machine: Machine,
    /// Requests from the API, if it has one (`Vmm::request_sender`).
    requests: Option<RequestReceiver>,
    /// Told whether the VM started, once every vCPU holds its state (`Vmm::on_start`).
    on_start: Option<StartHook>,
    /// Bytes for the guest's console before anything from stdin (`Vmm::queue_console_input`).
    console_prefill: Vec<u8>,
    /// The stdout writer behind the serial console (`--serial stdio`).
    stdout_sink: Option<StdoutSink>,
    /// The writers behind the console ports (`VmConfig::split_output`): stdout, stderr.
    port_sinks: Vec<StdoutSink>,
    /// The serial console's last bytes when it is not shown (split output).
    console_tail: ConsoleTail,
    input_drained: Arc<EventFd>,
    serial_mode: SerialMode,
    /// stdin goes to the guest through the console's `ember.stdin` port, not the serial line.
    stdin_on_port: bool,
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
    /// Builds the VM described by `cfg`, with what a tool adds to it (`extras`; ember's own
    /// commands: `Extras::default()` or exit recording), recording each step on `timeline`.
    pub fn new(cfg: &ValidConfig, extras: &Extras, timeline: Arc<Timeline>) -> Result<Self, VmmError> {
        // Check the files before touching KVM: a typo should not cost a VM.
        let format = boot::probe_kernel(&cfg.kernel)?;
        if let Some(initrd) = &cfg.initrd {
            boot::open_initrd(initrd)?;
        }
        let linux = !matches!(format, KernelFormat::Elf { linux_note: false });
        let rng = wants_rng(cfg, linux);
        let mut passts = Vec::new();
        let mut virtio = open_virtio_devices(cfg, rng, &mut passts)?;
        let control = Arc::new(VmControl::new().map_err(|e| VmmError::Host("an eventfd", e))?);
        let mut port_sinks = Vec::new();
        let stdin_port = cfg.split_output && linux && !cfg.for_saving && stdin_wants_port(&cfg.serial);
        if cfg.split_output && linux {
            let mut ports = vec![("ember.stdout", PortHost::Stdout), ("ember.stderr", PortHost::Stderr)];
            if stdin_port {
                ports.push(("ember.stdin", PortHost::Stdin));
            } else if cfg.for_saving {
                ports.push(("ember.stdin", PortHost::Unconnected));
            }
            let (console, sinks) = create_console(&control, cfg.seccomp, &ports)?;
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
        let mut cmdline = cmdline_with_virtio(&cfg.cmdline, if acpi { 0 } else { virtio.len() });
        if linux && !acpi && !cmdline.split(' ').any(|w| w.starts_with("acpi=")) {
            // No tables to find: without this a kernel with CONFIG_ACPI scans
            // for an RSDP and prints a KERN_ERR "A valid RSDP was not found".
            cmdline.push_str(" acpi=off");
        }
        if stdin_port {
            // Tells ember's init to wait for the `ember.stdin` port too (guest-kernels/init).
            cmdline.push_str(" ember.stdin=port");
        }
        if linux && !cfg.shares.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&mounts_param(&cfg.shares));
        }
        boot::check_cmdline(&cmdline)?;

        // 1. /dev/kvm
        let kvm = open_kvm()?;
        timeline.mark("ember: /dev/kvm opened");

        // 2. The VM.
        let vm = create_vm(&kvm)?;
        timeline.mark("ember: VM created");

        // 3. Guest RAM, then (when needed) the in-kernel interrupt controllers.
        let mem = memory::create_guest_memory(cfg.mem_size_bytes)?;
        memory::register_guest_memory(&vm, &mem)?;
        if irqchip {
            create_irqchip(&vm)?;
        }
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
        let machine = Machine {
            cpus: cfg.cpus,
            mem_size_bytes: cfg.mem_size_bytes,
            irqchip,
            disks: cfg
                .disks
                .iter()
                .map(|d| DiskSpec { path: d.path.display().to_string(), read_only: d.read_only, id: d.id.clone() })
                .collect(),
            nets: cfg
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    // A snapshot reopens taps by name; a passt (`--net user`) is not carried over.
                    let tap = match &n.backend {
                        NetBackendConfig::Tap { name, .. } => name.clone(),
                        _ => String::new(),
                    };
                    NetSpec { id: tap.clone(), tap, mac: n.mac.unwrap_or_else(|| net::default_mac(&n.mac_seed(), i)) }
                })
                .collect(),
            rng,
            linux,
            console: !port_sinks.is_empty(),
        };
        let spec = DeviceSpec {
            serial: &cfg.serial,
            irqchip,
            seccomp: cfg.seccomp,
            extra_pio: &extras.pio,
            console_ports: !port_sinks.is_empty(),
        };
        let mut devices = create_devices(&vm, &mem, &spec, virtio, None, &control, &timeline)?;

        // 7. vCPUs.
        let gate = Arc::new(PauseGate::new(usize::from(cfg.cpus), false));
        let shared = vcpu_shared(&kvm, &mut devices, irqchip, cfg.cpus, &extras.observe, &control, &timeline, &gate)?;
        let vcpus = (0..cfg.cpus).map(|id| Vcpu::new(&vm, id, &shared, &boot)).collect::<Result<Vec<_>, _>>()?;
        timeline.mark("ember: vCPUs configured");

        let mut vmm = Vmm::assemble(
            kvm,
            vm,
            mem,
            vcpus,
            devices,
            control,
            gate,
            machine,
            boot,
            cfg.serial.clone(),
            cfg.seccomp,
            timeline,
            port_sinks,
            passts,
        );
        vmm.stdin_on_port = stdin_port;
        Ok(vmm)
    }

    /// Rebuilds the VM a snapshot describes, in the state it was taken in: the parallel of
    /// [`Vmm::new`]'s recipe, with the state loaded where the boot recipe loads a kernel.
    pub fn restore(r: &RestoreConfig, timeline: Arc<Timeline>) -> Result<Self, VmmError> {
        // Check the files before touching KVM: another format, a damaged file, another CPU,
        // a memory file that does not fit, a disk or tap that is gone.
        let snap = snapshot::read_state(&r.state)?;
        snap.cpu.check_compatible(&snapshot::CpuModel::host())?;
        let mut machine = snap.machine.clone();
        for (id, tap) in &r.tap_overrides {
            let spec = machine.nets.iter_mut().find(|n| &n.id == id).ok_or_else(|| {
                SnapshotError::State(format!("network override for `{id}`: the snapshot has no such interface"))
            })?;
            spec.tap = tap.clone();
        }
        let mem_file = std::fs::File::open(&r.memory).map_err(|source| SnapshotError::Io {
            what: "cannot open the memory file",
            path: r.memory.display().to_string(),
            source,
        })?;
        let mem_len = mem_file.metadata().map(|m| m.len()).unwrap_or(0);
        if mem_len != machine.mem_size_bytes {
            return Err(SnapshotError::MemorySize {
                path: r.memory.display().to_string(),
                found: mem_len,
                expected: machine.mem_size_bytes,
            }
            .into());
        }
        if snap.vcpus.len() != usize::from(machine.cpus) || snap.transports.len() != machine.virtio_count() {
            return Err(
                SnapshotError::State("the snapshot's vCPU or device count does not match its machine".into()).into()
            );
        }
        let mut cfg = VmConfig::new(KernelSource::Builtin(&[]));
        cfg.cpus = machine.cpus;
        cfg.mem_size_bytes = machine.mem_size_bytes;
        cfg.disks = machine.disk_configs();
        cfg.nets = machine.net_configs();
        let mut virtio = open_virtio_devices(&cfg, machine.rng, &mut Vec::new())?;
        let control = Arc::new(VmControl::new().map_err(|e| VmmError::Host("an eventfd", e))?);
        // The console of a split-output guest: the same ports, on this run's stdout and stderr;
        // its input port on this run's stdin when that is how the command is fed, else unconnected.
        let mut port_sinks = Vec::new();
        let mut stdin_port = false;
        if machine.console {
            let saved = machine.console_ports(&snap.transports).ok_or_else(|| {
                SnapshotError::State("the snapshot's machine has a console but no console state".into())
            })?;
            stdin_port = r.split_output && saved.iter().any(|p| p.input) && stdin_wants_port(&r.serial);
            let ports: Vec<(&str, PortHost)> = saved
                .iter()
                .map(|p| {
                    let host = match (p.input, p.name.as_str()) {
                        (true, _) if stdin_port => PortHost::Stdin,
                        (true, _) => PortHost::Unconnected,
                        (false, "ember.stderr") => PortHost::Stderr,
                        (false, _) => PortHost::Stdout,
                    };
                    (p.name.as_str(), host)
                })
                .collect();
            let (console, sinks) = create_console(&control, r.seccomp, &ports)?;
            virtio.push(("virtio-console", Box::new(console)));
            port_sinks = sinks;
        }
        timeline.mark("ember: snapshot read, devices reopened");

        // 1-2. /dev/kvm, the VM.
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm)?;
        timeline.mark("ember: VM created");

        // 3. Guest RAM, from the memory file (copy on write), then the interrupt controllers.
        let mem = memory::create_guest_memory_from_file(machine.mem_size_bytes, &mem_file)?;
        snapshot::memory::prefetch(&mem, &snap.memory_extents);
        memory::register_guest_memory(&vm, &mem)?;
        if machine.irqchip {
            create_irqchip(&vm)?;
        }
        timeline.mark("ember: guest memory mapped from the snapshot");

        // 4-5. Nothing to load: the kernel and its structures are in guest RAM.
        // 6. Devices, in their saved state.
        let spec = DeviceSpec {
            serial: &r.serial,
            irqchip: machine.irqchip,
            seccomp: r.seccomp,
            extra_pio: &[],
            console_ports: machine.console && r.split_output,
        };
        let mut devices = create_devices(&vm, &mem, &spec, virtio, Some(&snap.serial), &control, &timeline)?;
        lock_device(&devices.i8042)?.restore_state(&snap.i8042);
        for (t, state) in devices.transports.iter().zip(&snap.transports) {
            lock_device(t)?.restore_state(state).map_err(SnapshotError::State)?;
        }
        snapshot::vm::restore(&vm, &snap.vm).map_err(SnapshotError::State)?;

        // 7. vCPUs: each loads its saved state on its own thread (`Vmm::run`).
        let gate = Arc::new(PauseGate::new(usize::from(machine.cpus), !r.resume));
        let observe = crate::stats::ExitObservation::default();
        let shared =
            vcpu_shared(&kvm, &mut devices, machine.irqchip, machine.cpus, &observe, &control, &timeline, &gate)?;
        let vcpus = snap
            .vcpus
            .into_iter()
            .enumerate()
            .map(|(id, state)| Vcpu::restored(&vm, id as u8, &shared, state))
            .collect::<Result<Vec<_>, _>>()?;
        // Work the driver had posted and the event loop not yet served is still in the rings:
        // one notification per active queue, served once the VM runs.
        for q in &devices.queue_events {
            if lock_device(&q.transport)?.is_active() {
                let _ = q.evt.write(1);
            }
        }
        timeline.mark("ember: vCPUs configured");

        // A restored VM loaded no kernel: its "boot" is where it stood.
        let boot = BootInfo {
            mode: regs::EntryMode::Long64,
            entry: vm_memory::GuestAddress(0),
            boot_info: vm_memory::GuestAddress(0),
            kernel_range: (0, 0),
            initrd: None,
        };
        let mut vmm = Vmm::assemble(
            kvm,
            vm,
            mem,
            vcpus,
            devices,
            control,
            gate,
            machine,
            boot,
            r.serial.clone(),
            r.seccomp,
            timeline,
            port_sinks,
            Vec::new(),
        );
        vmm.stdin_on_port = stdin_port;
        Ok(vmm)
    }

    /// Whether the VM has the virtio-console of split output (a restored one: whether it was
    /// saved with one).
    pub fn has_console_ports(&self) -> bool {
        self.machine.console
    }

    /// Whether the guest command's stdin is the console's `ember.stdin` port, fed from ember's stdin.
    pub fn stdin_on_port(&self) -> bool {
        self.stdin_on_port
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        kvm: Kvm,
        vm: VmFd,
        mem: GuestRam,
        vcpus: Vec<Vcpu>,
        devices: Devices,
        control: Arc<VmControl>,
        gate: Arc<PauseGate>,
        machine: Machine,
        boot: BootInfo,
        serial_mode: SerialMode,
        seccomp: SeccompMode,
        timeline: Arc<Timeline>,
        port_sinks: Vec<StdoutSink>,
        passts: Vec<Passt>,
    ) -> Vmm {
        Vmm {
            vcpus,
            vm,
            _kvm: kvm,
            mem,
            queue_events: devices.queue_events,
            tap_events: devices.tap_events,
            control,
            serial: devices.serial,
            i8042: devices.i8042,
            transports: devices.transports,
            stdout_sink: devices.stdout_sink,
            port_sinks,
            console_tail: devices.console_tail,
            input_drained: devices.input_drained,
            serial_mode,
            stdin_on_port: false,
            seccomp,
            timeline,
            irqchip: machine.irqchip,
            boot,
            _passts: passts,
            gate,
            machine,
            requests: None,
            on_start: None,
            console_prefill: Vec::new(),
        }
    }

    /// Names the VM's network interfaces, in order, for a snapshot's `network_overrides` (the API
    /// knows them as Firecracker's `iface_id`).
    pub fn name_interfaces(&mut self, ids: &[String]) {
        for (spec, id) in self.machine.nets.iter_mut().zip(ids) {
            spec.id = id.clone();
        }
    }

    /// `hook` learns, from [`Vmm::run`], whether the VM started: every vCPU loaded its state
    /// (a restored VM's may be refused by KVM). On an error `run` returns [`VmmError::Start`]
    /// without running the guest.
    pub fn on_start(&mut self, hook: StartHook) {
        self.on_start = Some(hook);
    }

    /// Queues `bytes` for the guest's console (`--serial stdio`), ahead of stdin: how
    /// `ember run --from-snapshot DIR -- CMD` hands the command to the restored init.
    pub fn queue_console_input(&mut self, bytes: &[u8]) {
        self.console_prefill.extend_from_slice(bytes);
    }

    /// Hands each line the guest prints on COM1 to `observer` (on a vCPU thread, under the UART's
    /// lock: it must not block; `RequestSender::post` does not). The default guest's init markers
    /// are observers of this kind (guest/init.rs).
    pub fn observe_serial_lines(&self, observer: LineObserver) {
        if let Ok(mut serial) = self.serial.lock() {
            serial.output_mut().observe_lines(observer);
        }
    }

    /// A channel for requests to this VM while it runs (pause, resume, snapshot: requests.rs),
    /// served by its event loop. Call before [`Vmm::run`].
    pub fn request_sender(&mut self) -> Result<RequestSender, VmmError> {
        let (tx, rx) = requests::channel().map_err(|e| VmmError::Host("an eventfd", e))?;
        self.requests = Some(rx);
        Ok(tx)
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
        // With stdin on the console's port, the serial console only gets the bytes queued for it
        // (a restored init's command line), not stdin.
        let console = (self.serial_mode == SerialMode::Stdio
            && (!self.stdin_on_port || !self.console_prefill.is_empty()))
        .then(|| ConsoleInput {
            serial: self.serial.clone(),
            fd: (!self.stdin_on_port).then_some(stdin_fd),
            // Also when the Linux lane's client, which holds the user's terminal, says so: there
            // this ember's stdin is a pipe from that terminal (lane::warm::ESCAPE_ENV).
            escape: console::is_tty(stdin_fd)
                || std::env::var_os(crate::lane::warm::ESCAPE_ENV).is_some_and(|v| v == "1"),
            drained: self.input_drained.clone(),
            prefill: std::mem::take(&mut self.console_prefill),
        });

        // Each vCPU thread enters its sandbox, then waits for the main thread
        // to be in its own (or to give up: the sender dropped) before its
        // first KVM_RUN: the guest runs only once every thread is confined.
        let mut handles: Vec<JoinHandle<VcpuReport>> = Vec::new();
        let mut gates = Vec::new();
        let seccomp = self.seccomp;
        let (loaded_tx, loaded) = std::sync::mpsc::channel::<Result<(), String>>();
        let count = self.vcpus.len();
        for (i, mut v) in self.vcpus.drain(..).enumerate() {
            let control = self.control.clone();
            let loaded_tx = loaded_tx.clone();
            let (gate, wait) = std::sync::mpsc::channel::<()>();
            gates.push(gate);
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    vcpu::run_catching(&control, &format!("vCPU {i}"), || {
                        // A restored vCPU's state is set on its own thread, before the sandbox.
                        let state = v.load_snapshot_state().map_err(|e| e.to_string());
                        let failed = state.is_err();
                        let _ = loaded_tx.send(state);
                        drop(loaded_tx);
                        if failed {
                            return VcpuReport::default();
                        }
                        if let Err(e) = sandbox::enter(ThreadKind::Vcpu, seccomp) {
                            control.stop(StopReason::EmberFailed(format!("vCPU {i}: {e}")));
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
        drop(loaded_tx);
        // Every vCPU has its state (a restored VM) before anyone is told the VM started.
        let mut started: Result<(), String> = Ok(());
        for _ in 0..count {
            match loaded.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => started = started.and(Err(e)),
                Err(_) => started = started.and(Err("a vCPU thread failed before it ran".into())),
            }
        }
        if let Some(hook) = self.on_start.take() {
            hook(started.clone());
        }
        if let Err(e) = started {
            self.control.stop(StopReason::EmberFailed(e.clone()));
            drop(gates);
            stop_vcpus(handles);
            return Err(VmmError::Start(e));
        }

        let mut controller = self.requests.as_ref().map(|receiver| Controller {
            receiver,
            vm: &self.vm,
            irqchip: self.irqchip,
            mem: &self.mem,
            gate: &self.gate,
            vcpu_threads: handles.iter().map(|h| h.as_pthread_t()).collect(),
            control: &self.control,
            serial: &self.serial,
            i8042: &self.i8042,
            transports: &self.transports,
            machine: &self.machine,
        });
        let result = vcpu::run_catching(&self.control, "the event loop", || {
            let queues = &self.queue_events;
            let sources = event_loop::Sources { queues, taps: &self.tap_events, requests: controller.as_mut() };
            event_loop::run(&self.control, console, &signals, sources, seccomp, move || drop(gates))
        })
        .unwrap_or_else(|| {
            Ok(self.control.reason().unwrap_or(StopReason::EmberFailed("the event loop failed".into())))
        });
        if result.is_err() {
            self.control.stop(StopReason::EmberFailed("the event loop failed".into()));
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

/// What a snapshot restore needs besides the snapshot: where it is, and the host side of the
/// new VM (its console, its sandbox), and whether it runs at once or waits paused.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// The state file.
    pub state: std::path::PathBuf,
    /// The memory file.
    pub memory: std::path::PathBuf,
    /// Serial console routing.
    pub serial: SerialMode,
    /// The sandbox.
    pub seccomp: SeccompMode,
    /// Run at once (else: paused until a resume request).
    pub resume: bool,
    /// A saved console's ports carry the command's stdout and stderr (`--output split`); else
    /// the serial console carries everything and the ports stay unused.
    pub split_output: bool,
    /// (interface id, tap): attach these interfaces to other taps than at the snapshot.
    pub tap_overrides: Vec<(String, String)>,
}

/// Whether the VM gets a virtio-rng device.
fn wants_rng(cfg: &VmConfig, linux: bool) -> bool {
    match cfg.rng {
        RngMode::On => true,
        RngMode::Off => false,
        // See devices/virtio/rng.rs for why Linux gets one; not without an
        // irqchip the user asked to do without.
        RngMode::Auto => linux && cfg.irqchip != IrqchipMode::Off,
    }
}

/// Opens the virtio devices `cfg` asks for, in bus order: the disks (the
/// first becomes /dev/vda), the NICs (the first is eth0), then the entropy
/// device if `rng`. Host files, taps and passts are checked (started) here, before any KVM call.
fn open_virtio_devices(cfg: &VmConfig, rng: bool, passts: &mut Vec<Passt>) -> Result<Vec<NamedDevice>, VmmError> {
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
    for (i, share) in cfg.shares.iter().enumerate() {
        let server = FsServer::start(&share.host, share.read_only)?;
        log::debug!("virtio-9p: {} served by pid {}", share.host.display(), server.pid());
        devices.push(("virtio-9p", Box::new(P9::new(&ShareConfig::tag(i), Box::new(server)))));
    }
    if rng {
        devices.push(("virtio-rng", Box::new(Rng::new())));
    }
    if devices.len() > config::MAX_VIRTIO_DEVICES {
        return Err(ConfigError::TooManyDevices(devices.len()).into());
    }
    Ok(devices)
}

/// Whether ember's stdin goes to the guest command through the console's
/// `ember.stdin` port (bytes unchanged, then end of file, as `docker run -i`)
/// rather than the serial console: when the serial console is ember's stdio
/// and stdin is not a terminal. A terminal keeps the console (line editing,
/// Ctrl-C, `Ctrl-a x`), as does the Linux lane's inner ember whose client
/// holds one (`lane::warm::ESCAPE_ENV`).
fn stdin_wants_port(serial: &SerialMode) -> bool {
    // SAFETY: F_GETFD only asks whether fd 0 is open.
    let open = unsafe { libc::fcntl(0, libc::F_GETFD) } != -1;
    *serial == SerialMode::Stdio
        && open
        && !console::is_tty(0)
        && std::env::var_os(crate::lane::warm::ESCAPE_ENV).is_none_or(|v| v != "1")
}

/// The host end of one console port.
#[derive(Clone, Copy)]
enum PortHost {
    /// Guest output to a copy of fd 1, through its own writer thread.
    Stdout,
    /// Guest output to a copy of fd 2.
    Stderr,
    /// Guest input from a copy of fd 0, through a reader thread.
    Stdin,
    /// Guest input with nothing behind it yet (a VM to be saved).
    Unconnected,
}

/// The virtio-console device of `VmConfig::split_output`, with `ports` in order: `ember run`
/// gives `ember.stdout`, `ember.stderr` and, when the command reads ember's stdin, `ember.stdin`.
fn create_console(
    control: &Arc<VmControl>,
    seccomp: SeccompMode,
    ports: &[(&str, PortHost)],
) -> Result<(Console, Vec<StdoutSink>), VmmError> {
    let room = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?);
    let mut made = Vec::new();
    let mut sinks = Vec::new();
    for &(name, host) in ports {
        let mut out = |fd, thread| -> Result<Port, VmmError> {
            let sink = StdoutSink::for_device(dup_fd(fd)?, control.clone(), seccomp, thread, room.clone())
                .map_err(|e| VmmError::Host("a console output thread", e))?;
            sinks.push(sink.clone());
            Ok(Port::new(name, sink))
        };
        made.push(match host {
            PortHost::Stdout => out(1, "console-out")?,
            PortHost::Stderr => out(2, "console-err")?,
            PortHost::Stdin => {
                let source = StdinSource::spawn(dup_fd(0)?, control.clone(), seccomp, room.clone())
                    .map_err(|e| VmmError::Host("the console's stdin thread", e))?;
                Port::input(name, source)
            }
            PortHost::Unconnected => Port::unconnected_input(name),
        });
    }
    Ok((Console::new(made, room), sinks))
}

/// Step 2 of both recipes: KVM_CREATE_VM.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    kvm.create_vm().map_err(|source| VmmError::Kvm { what: "create a VM", source })
}

/// Step 3's end: the in-kernel PICs, IOAPIC, LAPICs and PIT. After guest RAM is registered, not
/// before: with an irqchip, that memslot change waited out an SRCU grace period on kvm_pvm (5-8 ms;
/// `kvm_swap_active_memslots`), against 0.1 ms before the irqchip exists. A tiny 2-vCPU VM's whole
/// run here: 11.6 -> 8.5 ms (median of 150 interleaved). Firecracker also registers memory first.
/// (Leaving the PIT out for guests that ignore it, as a hardware-reduced ACPI Linux does, was
/// tried: 15.8 ms, its teardown waiting longer in KVM's SRCU and irqfd clean-up instead.)
fn create_irqchip(vm: &VmFd) -> Result<(), VmmError> {
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(|source| VmmError::Kvm { what: "set the TSS address", source })?;
    vm.create_irq_chip().map_err(|source| VmmError::Kvm { what: "create the in-kernel irqchip", source })?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|source| VmmError::Kvm { what: "create the in-kernel PIT", source })?;
    Ok(())
}

/// How the devices of step 6 are wired to the host.
struct DeviceSpec<'a> {
    serial: &'a SerialMode,
    irqchip: bool,
    seccomp: SeccompMode,
    extra_pio: &'a [ExtraPioDevice],
    /// The guest's stdout/stderr go to virtio-console ports: the serial console (kernel
    /// messages) is kept aside, its tail shown only if the guest crashes.
    console_ports: bool,
}

/// One of ember's own port-I/O devices: first port, count, name, the device.
type PioDevice = (u16, u16, &'static str, Arc<Mutex<dyn BusDevice>>);

/// The devices of one VM, on their buses.
struct Devices {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    queue_events: Vec<QueueEvent>,
    tap_events: Vec<TapEvent>,
    stdout_sink: Option<StdoutSink>,
    console_tail: ConsoleTail,
    input_drained: Arc<EventFd>,
}

/// Step 6 of both recipes: COM1 (in `serial_state` if given), the i8042, the exit device and any
/// extra port devices on the PIO bus; the virtio devices behind virtio-mmio transports on the MMIO bus.
fn create_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    spec: &DeviceSpec,
    virtio: Vec<NamedDevice>,
    serial_state: Option<&SerialState>,
    control: &Arc<VmControl>,
    timeline: &Arc<Timeline>,
) -> Result<Devices, VmmError> {
    let input_drained = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?);
    let mut stdout_sink = None;
    let console_tail = ConsoleTail::default();
    let sink: Box<dyn Write + Send> = match spec.serial {
        SerialMode::Stdio if spec.console_ports => Box::new(console_tail.clone()),
        SerialMode::Stdio => {
            let out = StdoutSink::new(dup_stdout()?, control.clone(), spec.seccomp)
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
    let irq = if spec.irqchip {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?;
        vm.register_irqfd(&evt, layout::COM1_IRQ)
            .map_err(|source| VmmError::Kvm { what: "register the serial irqfd", source })?;
        IrqLine::Irqfd(evt)
    } else {
        IrqLine::None
    };
    let mut out = SerialOutput::new(sink, timeline.clone());
    out.observe_lines(crate::control::linux_console_observer(control.clone(), timeline.clone()));
    if matches!(spec.serial, SerialMode::File(_)) {
        out = out.with_limit(SERIAL_FILE_LIMIT);
    }
    let drained = Some(input_drained.clone());
    let serial = match serial_state {
        None => Serial::new(irq, out, drained),
        Some(state) => Serial::with_state(irq, out, drained, state).map_err(SnapshotError::State)?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(I8042::new(control.clone())));
    // The port-I/O map (layout.rs has the numbers): first port, count, name, device.
    let fixed: [PioDevice; 5] = [
        (layout::COM1_PORT, 8, "serial (COM1)", serial.clone()),
        (layout::I8042_DATA_PORT, 5, "i8042", i8042.clone()),
        (
            layout::EXIT_PORT,
            layout::EXIT_PORT_LEN,
            "exit device",
            Arc::new(Mutex::new(ExitDevice::new(control.clone()))),
        ),
        (
            layout::ACPI_SLEEP_CONTROL_PORT,
            layout::ACPI_SLEEP_PORT_LEN,
            "ACPI sleep registers",
            Arc::new(Mutex::new(AcpiSleep::new(control.clone()))),
        ),
        (layout::PCI_CONF1_PORT, layout::PCI_CONF1_PORT_LEN, "PCI host bridge", Arc::new(Mutex::new(PciHost::new()))),
    ];
    let mut pio = Bus::with_control(control.clone());
    for (port, len, name, device) in fixed {
        pio.insert(u64::from(port), u64::from(len), name, device)?;
    }
    for extra in spec.extra_pio {
        pio.insert(u64::from(extra.port), u64::from(extra.len), extra.name, extra.device.clone())?;
    }
    let mut mmio = Bus::with_control(control.clone());
    let (queue_events, tap_events, transports) = create_virtio_transports(vm, mem, &mut mmio, virtio)?;
    Ok(Devices {
        pio,
        mmio,
        serial,
        i8042,
        transports,
        queue_events,
        tap_events,
        stdout_sink,
        console_tail,
        input_drained,
    })
}

/// Step 7's shared part: the buses, and the CPUID and MSR list every vCPU starts from.
#[allow(clippy::too_many_arguments)]
fn vcpu_shared(
    kvm: &Kvm,
    devices: &mut Devices,
    irqchip: bool,
    cpus: u8,
    observe: &crate::stats::ExitObservation,
    control: &Arc<VmControl>,
    timeline: &Arc<Timeline>,
    gate: &Arc<PauseGate>,
) -> Result<VcpuShared, VmmError> {
    let mut base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmmError::Kvm { what: "report its supported CPUID", source })?;
    // What KVM leaves to userspace (x86/cpuid.rs): the TSC-deadline bit, the host's brand string
    // and L1 cache leaf, the paravirtual features that need the in-kernel LAPIC.
    let vm_features =
        cpuid::VmFeatures { in_kernel_lapic: irqchip, tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer) };
    cpuid::adjust_for_vm(base_cpuid.as_mut_slice(), vm_features, cpuid::host_cpuid);
    // The MSRs a snapshot saves (api.rst 4.3 KVM_GET_MSR_INDEX_LIST); none if KVM will not say.
    let msr_indices = kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).unwrap_or_default();
    Ok(VcpuShared {
        pio: Arc::new(std::mem::take(&mut devices.pio)),
        mmio: Arc::new(std::mem::take(&mut devices.mmio)),
        control: control.clone(),
        timeline: timeline.clone(),
        base_cpuid,
        count: cpus,
        irqchip,
        observe: observe.clone(),
        trace_left: Arc::new(std::sync::atomic::AtomicU64::new(observe.trace_exits)),
        gate: gate.clone(),
        msr_indices,
    })
}

/// Locks a device at build time (nothing else holds it yet).
fn lock_device<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, VmmError> {
    m.lock().map_err(|_| SnapshotError::State("a device lock is poisoned".into()).into())
}

/// `ember.mounts=TAG:x<hex GUESTDIR>[:ro],...`: where ember's init mounts each
/// shared folder (guest-kernels/init; the path hex-encoded as in ember.argv,
/// so any byte survives the command line).
fn mounts_param(shares: &[ShareConfig]) -> String {
    let fields: Vec<String> = shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let hex: String = s.guest.bytes().map(|b| format!("{b:02x}")).collect();
            format!("{}:x{hex}{}", ShareConfig::tag(i), if s.read_only { ":ro" } else { "" })
        })
        .collect();
    format!("ember.mounts={}", fields.join(","))
}

/// The guest address and IRQ of virtio-mmio device `i` (public for fuzz/boot_tables).
pub fn virtio_slot(i: usize) -> (u64, u32) {
    (layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE, layout::VIRTIO_IRQ_START + i as u32)
}

/// `cmdline` plus one `virtio_mmio.device=<size>@<base>:<irq>` per device
/// (Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, drivers/virtio/virtio_mmio.c),
/// added here so that `--cmdline` users get them too.
pub fn cmdline_with_virtio(cmdline: &str, count: usize) -> String {
    let mut out = cmdline.to_string();
    for i in 0..count {
        let (base, irq) = virtio_slot(i);
        if !out.is_empty() {
            out.push(' ');
        }
        out += &format!("virtio_mmio.device={}K@{base:#x}:{irq}", layout::VIRTIO_MMIO_SIZE >> 10);
    }
    out
}

/// What [`create_virtio_transports`] wired: the queue notifications, the taps and the transports.
type VirtioWiring = (Vec<QueueEvent>, Vec<TapEvent>, Vec<Arc<Mutex<MmioTransport>>>);

/// Puts each device on the MMIO bus behind a virtio-mmio transport, with an
/// irqfd for its interrupt line and an ioeventfd per queue (datamatch on the
/// queue index written to VIRTIO_MMIO_QUEUE_NOTIFY). All of it is registered
/// with KVM here, before the first KVM_RUN.
fn create_virtio_transports(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    devices: Vec<NamedDevice>,
) -> Result<VirtioWiring, VmmError> {
    let mut events = Vec::new();
    let mut taps = Vec::new();
    let mut transports = Vec::new();
    for (i, (name, device)) in devices.into_iter().enumerate() {
        let (base, irq) = virtio_slot(i);
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Host("an eventfd", e))?;
        vm.register_irqfd(&irq_evt, irq).map_err(|source| VmmError::Kvm { what: "register a virtio irqfd", source })?;
        let mut transport = MmioTransport::new(device, mem.clone(), IrqLine::Irqfd(irq_evt));
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
        mmio.insert(base, layout::VIRTIO_MMIO_SIZE, name, transport.clone())?;
        transports.push(transport);
    }
    Ok((events, taps, transports))
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
