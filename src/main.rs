//! The `ember` command line: parse, build a `VmConfig`, run, turn the outcome
//! into an exit code (see README, "Exit codes").

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

use ember::config::{self, IrqchipMode, KernelSource, RngMode, VmConfig};
use ember::control::StopReason;
use ember::timeline::Timeline;
use ember::vmm::{Vmm, VmmError};

/// Exit code: ember itself failed (bad input, host error).
const EXIT_VMM_ERROR: u8 = 125;
/// Exit code: /dev/kvm is missing or not usable.
const EXIT_KVM_UNUSABLE: u8 = 126;
/// Exit code: the guest crashed (triple fault, KVM internal error, kernel panic, bus fault).
const EXIT_GUEST_CRASH: u8 = 123;

#[derive(Parser)]
#[command(name = "ember", version, about = "A small KVM hypervisor: boot a lightweight VM from the command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM.
    Run(RunArgs),
    /// Compare start-up, memory and speed of one payload on the host, in
    /// containers (crun, runc) and in VMs (ember, QEMU microvm).
    Bench(ember::bench::BenchArgs),
    /// Boot a tiny guest built into ember and show what each layer did.
    Demo {
        /// A chapter (number or name, see --list); none: the hello guest.
        #[arg(value_name = "CHAPTER")]
        chapter: Option<String>,
        /// List the chapters.
        #[arg(long)]
        list: bool,
        /// Only the guest's own output.
        #[arg(long)]
        quiet: bool,
        /// Write the built-in guest's ELF image to PATH instead of booting it
        /// (it also boots under `qemu-system-x86_64 -M microvm -kernel PATH`).
        #[arg(long, value_name = "PATH")]
        save_guest: Option<PathBuf>,
        /// Which built-in guest --save-guest writes: hello (the demo) or echo
        /// (prints its command line and exits 0, like `echo`).
        #[arg(long, value_enum, default_value_t = SavedGuest::Hello, requires = "save_guest")]
        guest: SavedGuest,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SavedGuest {
    Hello,
    Echo,
}

#[derive(Clone, Copy, ValueEnum)]
enum IrqchipArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TimelineFormat {
    Table,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: an ELF vmlinux (64-bit or PVH entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Guest RAM, e.g. 256M, 2G.
    #[arg(long, default_value = "256M", value_name = "SIZE")]
    memory: String,
    /// Serial console: stdio, none or file:PATH.
    #[arg(long, default_value = "stdio", value_name = "MODE")]
    serial: String,
    /// In-kernel interrupt controllers: auto (for Linux or SMP), on, off.
    #[arg(long, value_enum, default_value_t = IrqchipArg::Auto)]
    irqchip: IrqchipArg,
    /// Print the boot timeline at exit (table, or json).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "table", require_equals = true)]
    timeline: Option<TimelineFormat>,
    /// Print a table of VM exits at exit: by reason, port/address and device,
    /// per vCPU, with ember's handling time.
    #[arg(long)]
    stats: bool,
    /// Print the first N VM exits (default 100), one per line, on stderr.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "100", require_equals = true)]
    trace_exits: Option<u64>,
    /// Never run a Linux guest in the emulated SVM machine: fail instead when
    /// this host's KVM cannot run Linux itself (e.g. kvm_pvm).
    #[arg(long)]
    no_fallback: bool,
    /// A raw disk image as a virtio-blk device; repeatable, the first disk is
    /// /dev/vda in Linux. `ro`: read-only; `id=NAME`: the serial (20 bytes at most).
    #[arg(long, value_name = "PATH[,ro][,id=NAME]")]
    disk: Vec<String>,
    /// Boot from this disk image: it becomes /dev/vda (before any --disk),
    /// `root=/dev/vda rw` (or `ro`) is added to the command line, and the
    /// default guest starts without its initramfs (see guest-kernels/rootfs.sh).
    #[arg(long, value_name = "PATH[,ro][,id=NAME]")]
    root_disk: Option<String>,
    /// A virtio-net device on host tap NAME; repeatable, the first is eth0 in
    /// Linux. `mac=`: the guest's address (default: derived from NAME and the
    /// device's position); `create`: create the tap (root) and remove it at exit.
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,create]")]
    net: Vec<String>,
    /// Give the guest a virtio-rng device even when it is not Linux.
    #[arg(long, conflicts_with = "no_rng")]
    rng: bool,
    /// No virtio-rng device (Linux guests get one by default).
    #[arg(long)]
    no_rng: bool,
    /// Command for the default guest's init to run (after `--`); none: a shell.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

/// The kernel command line a Linux guest gets unless --cmdline says otherwise:
/// console on COM1 only, reboot through the i8042 (ember exits 0), a panic
/// resets at once (ember reports a crash), no boot chatter.
const DEFAULT_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 quiet";

fn build_config(a: &RunArgs) -> Result<VmConfig, String> {
    let (kernel, initrd) = match &a.kernel {
        Some(k) => (k.clone(), a.initrd.clone()),
        None => {
            let g = ember::guest::default_guest(false).map_err(|e| format!("{e}"))?;
            // A root disk carries the whole user space; the initramfs would shadow it.
            let initrd =
                if a.root_disk.is_some() { a.initrd.clone() } else { Some(a.initrd.clone().unwrap_or(g.initramfs)) };
            (g.vmlinux, initrd)
        }
    };
    let mut cfg = VmConfig::new(KernelSource::Path(kernel));
    cfg.initrd = initrd;
    cfg.cmdline = a.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if !a.command.is_empty() {
        use std::os::unix::ffi::OsStrExt;
        let args: Vec<&[u8]> = a.command.iter().map(|s| s.as_bytes()).collect();
        let argv = ember::guest::encode_argv(&args).map_err(|e| e.to_string())?;
        cfg.cmdline = format!("{} {argv}", cfg.cmdline);
    }
    cfg.cpus = match u8::try_from(a.cpus) {
        Ok(n) => n,
        Err(_) => return Err(config::ConfigError::TooManyCpus(a.cpus).to_string()),
    };
    cfg.mem_size_bytes = config::parse_size(&a.memory).map_err(|e| format!("--memory: {e}"))?;
    cfg.serial = config::parse_serial(&a.serial).map_err(|e| e.to_string())?;
    cfg.observe.stats = a.stats;
    cfg.observe.trace_exits = a.trace_exits.unwrap_or(0);
    cfg.irqchip = match a.irqchip {
        IrqchipArg::Auto => IrqchipMode::Auto,
        IrqchipArg::On => IrqchipMode::On,
        IrqchipArg::Off => IrqchipMode::Off,
    };
    if let Some(root) = &a.root_disk {
        let disk = config::parse_disk(root).map_err(|e| e.to_string().replace("--disk", "--root-disk"))?;
        cfg.cmdline = format!("{} root=/dev/vda {}", cfg.cmdline, if disk.read_only { "ro" } else { "rw" });
        cfg.disks.push(disk);
    }
    for d in &a.disk {
        cfg.disks.push(config::parse_disk(d).map_err(|e| e.to_string())?);
    }
    for n in &a.net {
        cfg.nets.push(config::parse_net(n).map_err(|e| e.to_string())?);
    }
    cfg.rng = match (a.rng, a.no_rng) {
        (true, _) => RngMode::On,
        (_, true) => RngMode::Off,
        _ => RngMode::Auto,
    };
    Ok(cfg)
}

/// Prints an error with its chain of causes.
fn report(e: &VmmError) {
    let mut msg = format!("ember: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        // Some libraries (linux-loader) repeat their cause in their own
        // message: print each cause once.
        let text = s.to_string();
        if !msg.contains(&text) {
            msg += &format!(": {text}");
        }
        src = s.source();
    }
    eprintln!("{msg}");
}

fn exit_code_for(reason: &StopReason) -> u8 {
    match reason {
        StopReason::GuestExit(s) => *s,
        StopReason::Reset => 0,
        StopReason::GuestCrash(what) => {
            eprintln!("ember: the guest crashed: {what}");
            EXIT_GUEST_CRASH
        }
        StopReason::UserQuit(0) => {
            eprintln!("\r\nember: quit (Ctrl-a x)");
            130
        }
        StopReason::UserQuit(sig) => 128u8.wrapping_add(*sig as u8),
        StopReason::VmmError(what) => {
            eprintln!("ember: {what}");
            EXIT_VMM_ERROR
        }
    }
}

fn error_code(e: &VmmError) -> u8 {
    report(e);
    if e.is_kvm_unusable() { EXIT_KVM_UNUSABLE } else { EXIT_VMM_ERROR }
}

/// On hosts whose KVM cannot run an unmodified Linux guest (software
/// virtualization such as kvm_pvm), a Linux kernel is booted inside the Linux
/// lane's emulated SVM machine instead (`ember::lane`). Returns the exit code
/// when that path was taken.
fn maybe_fallback(args: &RunArgs, cfg: &VmConfig) -> Option<u8> {
    use ember::boot::{KernelFormat, probe_kernel};
    use ember::lane::flavour::KvmFlavour;
    let linux = matches!(probe_kernel(&cfg.kernel), Ok(KernelFormat::BzImage | KernelFormat::Elf { linux_note: true }));
    let flavour = KvmFlavour::detect();
    if !linux || !matches!(flavour, KvmFlavour::Pvm | KvmFlavour::Other) {
        return None;
    }
    if args.no_fallback {
        eprintln!(
            "ember: this host's KVM is {flavour}; it cannot run a Linux guest, and --no-fallback forbids the emulated machine"
        );
        return Some(EXIT_KVM_UNUSABLE);
    }
    eprintln!(
        "ember: this host's KVM ({flavour}) cannot run a Linux guest's user space: running the VM inside an \
         emulated SVM machine instead (QEMU TCG: a few seconds more to start, a slower guest; --no-fallback refuses)"
    );
    // The inner ember gets the resolved kernel and initrd, so it never has to
    // build or look up the default guest inside the machine. `--net` taps stay
    // as they are: the lane hands each host tap to the machine and bridges it
    // to a tap of the same name inside.
    let mut inner: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.kernel.is_none() {
        let at = inner.iter().position(|a| a == "run").map_or(0, |i| i + 1);
        let KernelSource::Path(k) = &cfg.kernel else { return None };
        let mut extra = vec!["--kernel".into(), k.clone().into_os_string()];
        if let (None, Some(i)) = (&args.initrd, &cfg.initrd) {
            extra.extend(["--initrd".into(), i.clone().into_os_string()]);
        }
        inner.splice(at..at, extra);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ember: cannot find my own binary: {e}");
            return Some(EXIT_VMM_ERROR);
        }
    };
    match ember::lane::run_interactive(&exe, &inner) {
        Ok(code) => Some(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ember: the emulated SVM machine failed: {e}");
            Some(EXIT_VMM_ERROR)
        }
    }
}

fn run(args: RunArgs, start: Instant) -> u8 {
    let cfg = match build_config(&args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("ember: {msg}");
            return EXIT_VMM_ERROR;
        }
    };
    if let Err(e) = cfg.validate() {
        eprintln!("ember: {e}");
        return EXIT_VMM_ERROR;
    }
    if let Some(code) = maybe_fallback(&args, &cfg) {
        return code;
    }
    let timeline = Arc::new(Timeline::new(start));
    let outcome = Vmm::new(&cfg, timeline.clone()).and_then(|vmm| vmm.run());
    timeline.mark("ember: VM torn down");
    let code = match &outcome {
        Ok(o) => exit_code_for(&o.reason),
        Err(e) => error_code(e),
    };
    if let Ok(o) = &outcome {
        if let Some(n) = args.trace_exits {
            let total: u64 = o.exits.iter().map(|c| c.total()).sum();
            eprintln!("ember: --trace-exits: printed the first {} of {total} exits", n.min(total));
        }
        if args.stats {
            eprint!("{}", ember::stats::render_table(&o.stats));
        }
    }
    timeline.mark("ember: exit");
    match args.timeline {
        Some(TimelineFormat::Table) => eprint!("{}", timeline.render_table()),
        Some(TimelineFormat::Json) => eprintln!("{}", timeline.render_json()),
        None => {}
    }
    if let (Some(_), Ok(o)) = (args.timeline, &outcome) {
        eprintln!("ember: guest memory touched: {} KiB", o.guest_resident_bytes >> 10);
    }
    code
}

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).format_timestamp(None).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A usage mistake is bad input: 125 like every other (README, "Exit
            // codes"), not clap's 2; --help and --version are not mistakes.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_VMM_ERROR } else { 0 });
        }
    };
    let code = match cli.command {
        Command::Run(args) => run(args, start),
        Command::Bench(args) => ember::bench::main(args),
        Command::Demo { save_guest: Some(path), guest, .. } => match std::fs::write(
            &path,
            match guest {
                SavedGuest::Hello => ember::demo::HELLO_GUEST,
                SavedGuest::Echo => ember::demo::ECHO_GUEST,
            },
        ) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("ember: cannot write {}: {e}", path.display());
                EXIT_VMM_ERROR
            }
        },
        Command::Demo { list: true, .. } => {
            print!("{}", ember::demo::chapters::list());
            0
        }
        Command::Demo { chapter: Some(name), quiet, save_guest: None, .. } => {
            match ember::demo::chapters::find(&name) {
                Some(ch) => match ember::demo::chapters::run_chapter(ch, start, quiet) {
                    Ok(o) => exit_code_for(&o.reason),
                    Err(e) => error_code(&e),
                },
                None => {
                    eprintln!("ember: no demo chapter `{name}`; `ember demo --list` shows them");
                    EXIT_VMM_ERROR
                }
            }
        }
        Command::Demo { quiet, save_guest: None, .. } => match ember::demo::run_demo(start, quiet) {
            Ok(o) => exit_code_for(&o.reason),
            Err(e) => error_code(&e),
        },
    };
    ExitCode::from(code)
}
