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
#[command(
    name = "ember",
    version,
    about = "A small KVM hypervisor: boot a lightweight VM from the command line",
    args_conflicts_with_subcommands = true,
    subcommand_required = false
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    fc: FirecrackerArgs,
}

/// `ember --api-sock PATH` / `ember --no-api --config-file FILE`: Firecracker's command line.
#[derive(clap::Args)]
struct FirecrackerArgs {
    /// Serve Firecracker's API on this Unix socket; the VM is configured and
    /// started through it (see README, "The Firecracker API").
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    api_sock: Option<PathBuf>,
    /// Start the VM described by a Firecracker JSON config file ("boot-source",
    /// "machine-config", "drives", "network-interfaces", "logger", "metrics").
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// No API socket (with --config-file).
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// The VM's name, as `GET /` reports it (Firecracker's --id).
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// The sandbox of ember's threads: on (default) or off (debugging only).
    #[arg(long, value_enum, default_value_t = SeccompArg::On, require_equals = true, value_name = "on|off")]
    seccomp: SeccompArg,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM: the default guest (`ember run -- CMD`), a container image
    /// (`ember run IMAGE [CMD...]`), or a kernel of your own (`--kernel`).
    Run(Box<RunArgs>),
    /// Pull an image into ember's store (from a registry, or import an archive)
    /// and build its root file system.
    Pull {
        /// The image: [REGISTRY/]NAME[:TAG|@DIGEST], oci:DIR[:REF],
        /// oci-archive:FILE[:REF] or docker-archive:FILE[:REF].
        #[arg(value_name = "IMAGE")]
        image: String,
        /// Speak plain HTTP to this registry (loopback registries always are).
        #[arg(long, value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// List the images in ember's store.
    Images,
    /// Remove images from ember's store (and what no other image uses).
    Rmi {
        /// The images, as pulled.
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
    /// Print a shell completion script (e.g. `ember completions bash > /etc/bash_completion.d/ember`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Compare start-up, memory and speed of one payload on the host, in
    /// containers (crun, runc) and in VMs (ember, QEMU microvm).
    Bench(ember::bench::BenchArgs),
    /// The Linux lane's warm machine (hosts whose KVM cannot run Linux): `status`, `start`, `stop`.
    Lane {
        #[command(subcommand)]
        action: LaneAction,
    },
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

/// on|off, for `--seccomp` and `--acpi`.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum SeccompArg {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum OutputArg {
    Auto,
    Split,
    Console,
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
    /// A virtio-net device; repeatable, the first is eth0 in Linux. `user`:
    /// user-mode networking through passt (the guest reaches the host's
    /// loopback at its gateway; ports with -p); `tap=NAME`: host tap NAME
    /// (`create`: create it, as root, and remove it at exit); `none`: no
    /// network (image runs get `user` by default). `mac=`: the guest's address.
    #[arg(long, value_name = "user|tap=NAME|none[,mac=MAC][,create]")]
    net: Vec<String>,
    /// Publish a guest port on the host through --net user (passt's -t/-u);
    /// repeatable. HOSTIP defaults to every address, the protocol to tcp.
    #[arg(short = 'p', long = "publish", value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]")]
    publish: Vec<String>,
    /// Share a host directory with the guest (virtio-9p; its file server runs
    /// jailed in HOSTDIR); repeatable. `ro`: the host refuses every write.
    /// ember's init (default guest and images) mounts it at GUESTDIR.
    #[arg(short = 'v', long = "volume", value_name = "HOSTDIR:GUESTDIR[:ro]")]
    volume: Vec<String>,
    /// Give the guest a virtio-rng device even when it is not Linux.
    #[arg(long, conflicts_with = "no_rng")]
    rng: bool,
    /// No virtio-rng device (Linux guests get one by default).
    #[arg(long)]
    no_rng: bool,
    /// Where the command's output goes. `split`: its stdout to ember's stdout
    /// and its stderr to ember's stderr, byte-exact, without kernel messages
    /// (a virtio-console device; needs the default guest's init). `console`:
    /// everything on the one serial console, as on a terminal. `auto`: split
    /// for the default guest unless stdin and stdout are both terminals.
    #[arg(long, value_enum, default_value_t = OutputArg::Auto, require_equals = true, value_name = "auto|split|console")]
    output: OutputArg,
    /// ACPI tables for the guest (power-off, devices in the DSDT). `off`: the
    /// MP table and `virtio_mmio.device=` on the command line only, for a
    /// kernel built without CONFIG_ACPI (it would not find its virtio devices).
    #[arg(long, value_enum, default_value_t = SeccompArg::On, require_equals = true, value_name = "on|off")]
    acpi: SeccompArg,
    /// The sandbox of ember's threads (seccomp filters, no capabilities).
    /// `off` is for debugging only: a guest that breaks a device gets all of ember's rights.
    #[arg(long, value_enum, default_value_t = SeccompArg::On, require_equals = true, value_name = "on|off")]
    seccomp: SeccompArg,
    /// An environment variable for the image's command (KEY=VALUE, or KEY to
    /// pass ember's own); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines, # comments).
    #[arg(long, value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Boot the default guest until its init is ready for a command, then save
    /// the VM (a full snapshot) in DIR and exit 0. Restore it with --from-snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["from_snapshot", "api_sock", "volume"])]
    save_snapshot: Option<PathBuf>,
    /// Restore the VM saved in DIR (by --save-snapshot) and run `-- CMD` in it
    /// (nothing: a shell). The VM is the one saved: its memory, vCPUs and disks.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "root_disk", "disk", "net", "rng", "no_rng", "save_snapshot", "volume"
    ])]
    from_snapshot: Option<PathBuf>,
    /// Also serve Firecracker's API on this Unix socket while the VM runs
    /// (pause, resume, snapshots: README, "The Firecracker API").
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Working directory of the image's command.
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// User of the image's command: a name or UID, optionally :GROUP or :GID.
    #[arg(short = 'u', long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Replace the image's Entrypoint (and drop its Cmd); "" for none.
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// The guest's hostname (default: --name, or a random id).
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// A name for this VM (also its hostname unless --hostname is given).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Accepted for `docker run` habits: input is interactive when stdin is a terminal.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Accepted for `docker run` habits: the console is a terminal when stdin is one.
    #[arg(short = 't', long)]
    tty: bool,
    /// Speak plain HTTP to this registry (loopback registries always are).
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// `IMAGE [CMD [ARG...]]`: run a container image, CMD replacing its Cmd.
    /// `-- CMD [ARG...]`: run CMD in the default guest; nothing: a shell.
    #[arg(value_name = "IMAGE [CMD]...", trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<std::ffi::OsString>,
}

impl RunArgs {
    /// Splits `rest` like `docker run`: `(Some(IMAGE), CMD)` when the first
    /// word after the options is an image, `(None, CMD)` when `--` came first.
    /// clap drops a `--` before the first positional, so the raw argv tells.
    fn image_and_command(&self, raw: &[std::ffi::OsString]) -> (Option<String>, Vec<std::ffi::OsString>) {
        let n = self.rest.len();
        if n == 0 {
            return (None, vec![]);
        }
        if raw.len() > n && raw[raw.len() - n - 1] == "--" && raw[raw.len() - n..] == self.rest[..] {
            return (None, self.rest.clone());
        }
        let image = self.rest[0].to_string_lossy().into_owned();
        let mut cmd = self.rest[1..].to_vec();
        if cmd.first().is_some_and(|c| c == "--") {
            cmd.remove(0);
        }
        (Some(image), cmd)
    }
}

impl RunArgs {
    /// What the Linux lane's fallback needs from these arguments, as plain data.
    fn lane_request(&self) -> ember::lane::fallback::RunRequest {
        use ember::lane::fallback::{RunRequest, VmOptions};
        let on_off = |a: IrqchipArg| match a {
            IrqchipArg::Auto => "auto",
            IrqchipArg::On => "on",
            IrqchipArg::Off => "off",
        };
        RunRequest {
            argv: std::env::args_os().skip(1).collect(),
            no_fallback: self.no_fallback,
            kernel_given: self.kernel.is_some(),
            initrd_given: self.initrd.is_some(),
            output_auto: self.output == OutputArg::Auto,
            save_snapshot: self.save_snapshot.clone(),
            vm: VmOptions {
                cpus: self.cpus,
                memory: self.memory.clone(),
                serial: self.serial.clone(),
                disks: self.disk.clone(),
                irqchip: on_off(self.irqchip),
                timeline: self.timeline.map(|t| match t {
                    TimelineFormat::Table => "table",
                    TimelineFormat::Json => "json",
                }),
                stats: self.stats,
                trace_exits: self.trace_exits,
                rng: self.rng,
                no_rng: self.no_rng,
                seccomp_off: self.seccomp == SeccompArg::Off,
                acpi_off: self.acpi == SeccompArg::Off,
            },
        }
    }
}

/// Why `ember run` could not make a VM out of its command line (exit 125): one typed error per
/// cause, printed once, with its causes, by [`chain`] as `ember: ...`.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// Options that do not go together.
    #[error("{0}")]
    Usage(String),
    /// A value or limit `config` checks.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// `--memory`'s value.
    #[error("--memory")]
    Memory(#[source] config::ConfigError),
    /// Pulling or preparing the image.
    #[error(transparent)]
    Image(#[from] ember::image::ImageError),
    /// The default guest (building it, or encoding the command for its init).
    #[error(transparent)]
    Guest(#[from] ember::guest::GuestError),
    /// `--net user`: passt, or the host's addresses it hands out.
    #[error(transparent)]
    Passt(#[from] ember::host::passt::PasstError),
    /// A file or directory the run makes for itself.
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] std::io::Error),
}

impl RunError {
    fn usage(msg: impl Into<String>) -> RunError {
        RunError::Usage(msg.into())
    }
}

/// A run's own temporary files (an image run's initrd, a `dir:` image's disk),
/// in a private directory under the temp dir (which the Linux lane shares),
/// removed when the run ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, RunError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("ember-run-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| RunError::Create(dir.clone(), e))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM to boot, and for image runs what must live as long as it.
struct Plan {
    cfg: config::ValidConfig,
    /// Temporary files of an image run.
    _scratch: Option<Scratch>,
    /// The image's root file system disk (first in `cfg.disks`).
    image_disk: Option<String>,
}

/// An error with its chain of causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    ember::error_chain(e)
}

/// The image part of an image run: pull/import, root file system, the init's
/// spec appended to the initramfs.
fn prepare_image(
    a: &RunArgs,
    image: &str,
    cmd: &[std::ffi::OsString],
) -> Result<(Scratch, ember::image::spec::RunSpec, PathBuf), RunError> {
    use ember::image;
    let scratch = Scratch::new()?;
    let opts = image::PullOptions { insecure: a.insecure_registry.clone(), refresh: false };
    let prepared = image::prepare(image, &opts, &scratch.0)?;
    let run = image::spec::RunOptions {
        env: a.env.clone(),
        env_files: a.env_file.clone(),
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        entrypoint: a.entrypoint.clone(),
        hostname: a.hostname.clone(),
        name: a.name.clone(),
    };
    let spec = image::spec::make_spec(&prepared.config, &run, cmd)?;
    Ok((scratch, spec, prepared.rootfs))
}

fn build_config(a: &RunArgs, timeline: &Timeline) -> Result<Plan, RunError> {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (image, command) = a.image_and_command(&raw);
    if image.is_none() {
        let docker_only = [
            (!a.env.is_empty(), "-e/--env"),
            (!a.env_file.is_empty(), "--env-file"),
            (a.workdir.is_some(), "-w/--workdir"),
            (a.user.is_some(), "-u/--user"),
            (a.entrypoint.is_some(), "--entrypoint"),
            (a.hostname.is_some(), "--hostname"),
        ];
        if let Some((_, flag)) = docker_only.iter().find(|(given, _)| *given) {
            return Err(RunError::usage(format!(
                "{flag} applies to container images: ember run [OPTIONS] IMAGE [CMD...]"
            )));
        }
    } else if a.root_disk.is_some() {
        return Err(RunError::usage("--root-disk cannot be combined with an image: the image is the root"));
    }
    if a.save_snapshot.is_some() && (image.is_some() || !command.is_empty()) {
        return Err(RunError::usage(
            "--save-snapshot saves the default guest before it runs a command: give the command to \
             `ember run --from-snapshot DIR -- CMD`",
        ));
    }
    // The image first: its errors come before any kernel build.
    let prepared = match &image {
        Some(i) => {
            let p = prepare_image(a, i, &command)?;
            timeline.mark("image: in the store, root file system built");
            Some(p)
        }
        None => None,
    };
    let (kernel, mut initrd) = match &a.kernel {
        Some(k) => (k.clone(), a.initrd.clone()),
        None => {
            let g = ember::guest::default_guest(false)?;
            // A root disk carries the whole user space; the initramfs would shadow it.
            let initrd =
                if a.root_disk.is_some() { a.initrd.clone() } else { Some(a.initrd.clone().unwrap_or(g.initramfs)) };
            (g.vmlinux, initrd)
        }
    };
    let mut scratch = None;
    let mut image_disk = None;
    if let Some((s, spec, rootfs)) = prepared {
        let base = initrd
            .clone()
            .ok_or_else(|| RunError::usage("an image run needs an initramfs with ember's init (--initrd)"))?;
        let combined = s.0.join("initrd");
        ember::image::spec::write_initrd(&base, &spec, &combined)?;
        timeline.mark("image: run spec appended to the initramfs");
        initrd = Some(combined);
        image_disk = Some(format!("{},ro,id=ember-image", rootfs.display()));
        scratch = Some(s);
    }
    let mut cfg = VmConfig::new(KernelSource::Path(kernel));
    cfg.initrd = initrd;
    cfg.cmdline = a.cmdline.clone().unwrap_or_else(|| ember::guest::DEFAULT_CMDLINE.to_string());
    if a.save_snapshot.is_some() {
        // guest-kernels/init, "The snapshot protocol": wait for the command on the console.
        cfg.cmdline = format!("{} {}", cfg.cmdline, ember::guest::init::SNAPSHOT_PARAM);
    }
    if image.is_none() && !command.is_empty() {
        use std::os::unix::ffi::OsStrExt;
        let args: Vec<&[u8]> = command.iter().map(|s| s.as_bytes()).collect();
        let argv = ember::guest::encode_argv(&args)?;
        cfg.cmdline = format!("{} {argv}", cfg.cmdline);
    }
    cfg.cpus = match u8::try_from(a.cpus) {
        Ok(n) => n,
        Err(_) => return Err(config::ConfigError::TooManyCpus(a.cpus).into()),
    };
    cfg.mem_size_bytes = config::parse_size(&a.memory).map_err(RunError::Memory)?;
    cfg.serial = config::parse_serial(&a.serial)?;
    cfg.irqchip = match a.irqchip {
        IrqchipArg::Auto => IrqchipMode::Auto,
        IrqchipArg::On => IrqchipMode::On,
        IrqchipArg::Off => IrqchipMode::Off,
    };
    if let Some(d) = &image_disk {
        cfg.disks.push(config::parse_disk(d)?);
    }
    if let Some(root) = &a.root_disk {
        let disk = config::parse_disk_as("--root-disk", root)?;
        cfg.cmdline = format!("{} root=/dev/vda {}", cfg.cmdline, if disk.read_only { "ro" } else { "rw" });
        cfg.disks.push(disk);
    }
    for d in &a.disk {
        cfg.disks.push(config::parse_disk(d)?);
    }
    for v in &a.volume {
        cfg.shares.push(config::parse_share(v)?);
    }
    cfg.nets = nets(a, image.is_some())?;
    // The default guest's init configures eth0 from ember.net= (see
    // guest-kernels/init): the addresses passt hands out, or DHCP.
    if let Some(first) = cfg.nets.first()
        && !cfg.cmdline.contains("ember.net=")
    {
        match (first.guest_ipv4(), &first.backend) {
            (Some(g), _) => cfg.cmdline = format!("{} {}", cfg.cmdline, g.kernel_param()),
            (None, config::NetBackendConfig::Stream { .. }) => cfg.cmdline += " ember.net=dhcp",
            _ => {}
        }
    }
    cfg.rng = match (a.rng, a.no_rng) {
        (true, _) => RngMode::On,
        (_, true) => RngMode::Off,
        _ => RngMode::Auto,
    };
    if a.seccomp == SeccompArg::Off {
        cfg.seccomp = ember::sandbox::SeccompMode::Off;
    }
    cfg.acpi = a.acpi == SeccompArg::On;
    cfg.split_output = match a.output {
        OutputArg::Split => true,
        OutputArg::Console => false,
        // Only ember's own init (the default initramfs, image runs included)
        // knows the console ports; another init would print into the void.
        OutputArg::Auto => {
            a.kernel.is_none()
                && a.initrd.is_none()
                && a.root_disk.is_none()
                && cfg.serial == config::SerialMode::Stdio
                && !(ember::console::is_tty(0) && ember::console::is_tty(1))
        }
    };
    if a.save_snapshot.is_some() {
        // A saved default guest keeps the virtio-console of split output (its state is in the
        // snapshot), whatever this run's terminal: each `--from-snapshot` run chooses whether the
        // command's stdio use its ports (it tells the init: `guest::init::restored_line`). The run that
        // saves shows nothing of the guest's console either way.
        cfg.for_saving = true;
        if a.output == OutputArg::Auto {
            cfg.split_output = a.kernel.is_none()
                && a.initrd.is_none()
                && a.root_disk.is_none()
                && cfg.serial == config::SerialMode::Stdio;
        }
    }
    Ok(Plan { cfg: cfg.validate()?, _scratch: scratch, image_disk })
}

/// Whether `ember run IMAGE` gets `--net user` without asking, as `docker run`
/// gives a container a network (see README: what it costs at start-up).
const IMAGE_RUNS_GET_USER_NET: bool = true;

/// The VM's NICs from `--net` and `-p`: `none` drops the image run's default
/// user network; `-p` goes to the user network, whose guest addresses are
/// taken from this host's default route (where passt will run).
fn nets(a: &RunArgs, image: bool) -> Result<Vec<config::NetConfig>, RunError> {
    let mut nets = Vec::new();
    let mut none = false;
    for n in &a.net {
        if n == "none" {
            none = true;
        } else {
            nets.push(config::parse_net(n)?);
        }
    }
    let publish = a.publish.iter().map(|p| config::parse_publish(p)).collect::<Result<Vec<_>, _>>()?;
    let is_user = |n: &config::NetConfig| matches!(n.backend, config::NetBackendConfig::User { .. });
    // An image run's default network is best effort: without passt or a
    // default route the image runs without a network, as with --net none.
    if image && a.net.is_empty() && IMAGE_RUNS_GET_USER_NET && ember::host::passt::find_binary().is_ok() {
        match ember::host::passt::GuestIpv4::from_host() {
            Ok(g) => nets.push(config::NetConfig {
                backend: config::NetBackendConfig::User { publish: vec![], guest: Some(g) },
                mac: None,
            }),
            Err(e) if publish.is_empty() => log::info!("no default network for the image: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    let user = nets.iter_mut().find(|n| is_user(n));
    match user {
        Some(config::NetConfig { backend: config::NetBackendConfig::User { publish: p, guest }, .. }) => {
            *p = publish;
            // Said first: without passt, nothing else about the network matters.
            ember::host::passt::find_binary()?;
            if guest.is_none() {
                *guest = Some(ember::host::passt::GuestIpv4::from_host()?);
            }
        }
        _ if !publish.is_empty() => return Err(config::ConfigError::PublishWithoutUser.into()),
        _ => {}
    }
    if none && !nets.is_empty() && nets.iter().any(is_user) {
        return Err(RunError::usage("--net none cannot be combined with --net user"));
    }
    Ok(nets)
}

/// Prints an error with its chain of causes.
fn report(e: &VmmError) {
    eprintln!("ember: {}", chain(e));
}

fn exit_code_for(reason: &StopReason) -> u8 {
    match reason {
        StopReason::GuestExit(s) => *s,
        StopReason::Reset | StopReason::PowerOff => 0,
        StopReason::GuestCrash(what) => {
            eprintln!("ember: the guest crashed: {what}");
            EXIT_GUEST_CRASH
        }
        StopReason::UserQuit(0) => {
            eprintln!("\r\nember: quit (Ctrl-a x)");
            130
        }
        StopReason::UserQuit(sig) => 128u8.wrapping_add(*sig as u8),
        StopReason::EmberFailed(what) => {
            eprintln!("ember: {what}");
            EXIT_VMM_ERROR
        }
    }
}

/// The exit code of a run that could not go to the Linux lane, its error printed.
fn fallback_error_code(e: &ember::lane::fallback::FallbackError) -> u8 {
    eprintln!("ember: {}", chain(e));
    if e.is_kvm_unusable() { EXIT_KVM_UNUSABLE } else { EXIT_VMM_ERROR }
}

fn error_code(e: &VmmError) -> u8 {
    report(e);
    if e.is_kvm_unusable() { EXIT_KVM_UNUSABLE } else { EXIT_VMM_ERROR }
}

/// The two files of a saved VM in `--save-snapshot`/`--from-snapshot`'s DIR.
fn snapshot_files(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    (dir.join("state"), dir.join("memory"))
}

/// `ember run --save-snapshot DIR`: the state and memory files, created (and the memory file
/// sized) now, before the sandbox, for the event loop to fill at the snapshot point.
fn open_snapshot_files(dir: &std::path::Path, mem_bytes: u64) -> Result<(std::fs::File, std::fs::File), RunError> {
    std::fs::create_dir_all(dir).map_err(|e| RunError::Create(dir.to_path_buf(), e))?;
    let (state, memory) = snapshot_files(dir);
    let open = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| RunError::Create(p.to_path_buf(), e))
    };
    let (state, memory) = (open(&state)?, open(&memory)?);
    memory.set_len(mem_bytes).map_err(|e| RunError::Create(snapshot_files(dir).1, e))?;
    Ok((state, memory))
}

/// `ember run --from-snapshot DIR [-- CMD]`: restore the saved VM, hand its init the command.
fn run_from_snapshot(args: &RunArgs, dir: &std::path::Path, start: Instant) -> u8 {
    let timeline = Arc::new(Timeline::new(start));
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (image, command) = args.image_and_command(&raw);
    if image.is_some() {
        eprintln!(
            "ember: --from-snapshot runs a command in the saved VM: write `ember run --from-snapshot DIR -- CMD`"
        );
        return EXIT_VMM_ERROR;
    }
    let (state, memory) = snapshot_files(dir);
    let machine = match ember::snapshot::read_state(&state) {
        Ok(s) => s.machine,
        Err(e) => {
            eprintln!("ember: --from-snapshot: {}", chain(&e));
            return EXIT_VMM_ERROR;
        }
    };
    // A Linux guest saved inside the nested lane is restored there, by the inner ember; the machine
    // may write the saved VM's read-write disks (and nothing else).
    let writable: Vec<PathBuf> =
        machine.disks.iter().filter(|d| !d.read_only).map(|d| PathBuf::from(&d.path)).collect();
    let mut inner: Vec<std::ffi::OsString> = raw.into_iter().skip(1).collect();
    // The inner ember's stdio are never terminals: it gets `--output` as resolved here.
    if args.output == OutputArg::Auto
        && let Some(at) = inner.iter().position(|a| a == "run")
    {
        let serial = config::parse_serial(&args.serial).unwrap_or(config::SerialMode::Stdio);
        let split = restore_splits_output(args, &serial);
        inner.insert(at + 1, if split { "--output=split" } else { "--output=console" }.into());
    }
    match ember::lane::fallback::restore_in_lane_if_needed(&inner, machine.linux, args.no_fallback, &writable) {
        Ok(None) => {}
        Ok(Some(code)) => return code.clamp(0, 255) as u8,
        Err(e) => return fallback_error_code(&e),
    }
    let serial = match config::parse_serial(&args.serial) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ember: {e}");
            return EXIT_VMM_ERROR;
        }
    };
    let split_output = restore_splits_output(args, &serial);
    let restore = ember::vmm::RestoreConfig {
        state,
        memory,
        serial,
        seccomp: if args.seccomp == SeccompArg::Off {
            ember::sandbox::SeccompMode::Off
        } else {
            ember::sandbox::SeccompMode::On
        },
        resume: true,
        split_output,
        tap_overrides: Vec::new(),
    };
    // The init reads one line: the command as `ember.argv=...`, or nothing for a shell.
    let line = if command.is_empty() {
        String::new()
    } else {
        use std::os::unix::ffi::OsStrExt;
        let words: Vec<&[u8]> = command.iter().map(|s| s.as_bytes()).collect();
        match ember::guest::encode_argv(&words) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("ember: {e}");
                return EXIT_VMM_ERROR;
            }
        }
    };
    let outcome = Vmm::restore(&restore, timeline.clone()).and_then(|mut vmm| {
        let line = ember::guest::init::restored_line(&line, restored_stdio(&vmm, restore.split_output));
        vmm.observe_serial_lines(ember::guest::init::mark_ready(timeline.clone()));
        vmm.queue_console_input(format!("{line}\n").as_bytes());
        vmm.run()
    });
    timeline.mark("ember: VM torn down");
    let code = match &outcome {
        Ok(o) => exit_code_for(&o.reason),
        Err(e) => error_code(e),
    };
    print_timeline(args, &timeline, &outcome);
    code
}

/// Whether a restored guest's command writes to the console's ports (`--output`, as for a
/// booted one: split unless ember's stdin and stdout are both terminals).
fn restore_splits_output(args: &RunArgs, serial: &config::SerialMode) -> bool {
    match args.output {
        OutputArg::Split => true,
        OutputArg::Console => false,
        OutputArg::Auto => {
            *serial == config::SerialMode::Stdio && !(ember::console::is_tty(0) && ember::console::is_tty(1))
        }
    }
}

/// How the restored command's stdio are wired (told to the init: `guest::init::restored_line`).
fn restored_stdio(vmm: &Vmm, split: bool) -> ember::guest::init::RestoredStdio {
    use ember::guest::init::RestoredStdio;
    match (vmm.has_console_ports(), split, vmm.stdin_on_port()) {
        (false, _, _) => RestoredStdio::NoPorts,
        (true, false, _) => RestoredStdio::Console,
        (true, true, false) => RestoredStdio::Split,
        (true, true, true) => RestoredStdio::SplitWithStdin,
    }
}

/// `--timeline`'s report at the end of a run (booted or restored): the
/// timeline with its last mark, and how much guest memory was touched.
fn print_timeline(args: &RunArgs, timeline: &Timeline, outcome: &Result<ember::vmm::RunOutcome, VmmError>) {
    timeline.mark("ember: exit");
    match args.timeline {
        Some(TimelineFormat::Table) => eprint!("{}", timeline.render_table()),
        Some(TimelineFormat::Json) => eprintln!("{}", timeline.render_json()),
        None => {}
    }
    if let (Some(_), Ok(o)) = (args.timeline, outcome) {
        eprintln!("ember: guest memory touched: {} KiB", o.guest_resident_bytes >> 10);
    }
}

fn run(args: RunArgs, start: Instant) -> u8 {
    if let Some(dir) = args.from_snapshot.clone() {
        return run_from_snapshot(&args, &dir, start);
    }
    let timeline = Arc::new(Timeline::new(start));
    let mut plan = match build_config(&args, &timeline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ember: {}", chain(&e));
            return EXIT_VMM_ERROR;
        }
    };
    // A Linux guest this host's KVM cannot run goes to the Linux lane (lane/fallback.rs).
    match ember::lane::fallback::run_in_lane_if_needed(&args.lane_request(), &plan.cfg, plan.image_disk.as_deref()) {
        Ok(None) => {}
        Ok(Some(code)) => return code.clamp(0, 255) as u8,
        Err(e) => return fallback_error_code(&e),
    }
    let save = match args.save_snapshot.as_deref().map(|d| open_snapshot_files(d, plan.cfg.mem_size_bytes)).transpose()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ember: --save-snapshot: {}", chain(&e));
            return EXIT_VMM_ERROR;
        }
    };
    let listener = match args.api_sock.as_deref().map(ember::api::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ember: {}", chain(&e));
            return EXIT_VMM_ERROR;
        }
    };
    // The run's temporary files are open (or read) once the VM is built:
    // removed before it runs, as the sandboxed main thread could not.
    let scratch = plan._scratch.take();
    let mut extras = ember::extras::Extras::default();
    extras.observe.stats = args.stats;
    extras.observe.trace_exits = args.trace_exits.unwrap_or(0);
    let outcome = Vmm::new(&plan.cfg, &extras, timeline.clone()).and_then(|mut vmm| {
        drop(scratch);
        vmm.observe_serial_lines(ember::guest::init::mark_ready(timeline.clone()));
        if let (Some((state, memory)), Some(dir)) = (save, &args.save_snapshot) {
            let sender = vmm.request_sender()?;
            let state_path = snapshot_files(dir).0.display().to_string();
            vmm.observe_serial_lines(ember::guest::init::at_snapshot_point(Box::new(move || {
                sender.post(ember::requests::VmRequest::SaveAndStop { state, state_path, memory })
            })));
        }
        if let Some(listener) = listener {
            let sender = vmm.request_sender()?;
            let cfg = &plan.cfg;
            let kernel = match &cfg.kernel {
                KernelSource::Path(p) => Some(p.display().to_string()),
                KernelSource::Builtin(_) => None,
            };
            let taps: Vec<String> = cfg.nets.iter().map(|n| n.mac_seed()).collect();
            let resources = ember::api::model::VmResources::describe(
                kernel.as_deref(),
                &cfg.cmdline,
                cfg.cpus,
                cfg.mem_size_bytes,
                &cfg.disks,
                &taps,
            );
            let options = ember::api::ApiOptions { serial: cfg.serial.clone(), seccomp: cfg.seccomp, id: None };
            if let Err(e) = ember::api::spawn(listener, resources, Some(sender), options) {
                eprintln!("ember: {}", chain(&e));
            }
        }
        vmm.run()
    });
    timeline.mark("ember: VM torn down");
    let code = match &outcome {
        Ok(o) => exit_code_for(&o.reason),
        Err(e) => error_code(e),
    };
    if let (Some(dir), Ok(o)) = (&args.save_snapshot, &outcome) {
        if o.reason == StopReason::GuestExit(0) {
            eprintln!("ember: saved; `ember run --from-snapshot {} -- CMD` runs CMD in it", dir.display());
        } else {
            eprintln!("ember: the guest ended before its snapshot point: nothing was saved");
        }
    }
    if let Ok(o) = &outcome {
        if let Some(n) = args.trace_exits {
            let total: u64 = o.exits.iter().map(|c| c.total()).sum();
            eprintln!("ember: --trace-exits: printed the first {} of {total} exits", n.min(total));
        }
        if args.stats {
            eprint!("{}", ember::stats::render_table(&o.stats));
        }
    }
    print_timeline(&args, &timeline, &outcome);
    code
}

/// `ember lane ...`.
#[derive(Subcommand)]
enum LaneAction {
    /// Whether this user's warm machine runs, since when, how many runs it served.
    Status,
    /// Boot the warm machine now (the first `ember run` that needs it does otherwise).
    Start,
    /// Stop the warm machine (it also stops by itself after EMBER_LANE_IDLE seconds without runs).
    Stop,
    /// The daemon itself (started by `ember run`; not for people).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        state_dir: std::path::PathBuf,
        #[arg(long)]
        build: String,
        #[arg(long)]
        once: bool,
        #[arg(long)]
        tap: Vec<String>,
        #[arg(long)]
        user_net: Option<std::path::PathBuf>,
    },
}

fn lane(action: LaneAction) -> u8 {
    use ember::lane::warm;
    match action {
        LaneAction::Status => {
            println!("{}", warm::status());
            0
        }
        LaneAction::Stop => {
            println!("{}", if warm::stop() { "warm lane: stopped" } else { "warm lane: not running" });
            0
        }
        LaneAction::Start => {
            let started = std::env::current_exe()
                .map_err(|e| e.to_string())
                .and_then(|exe| warm::start(&exe).map_err(|e| chain(&e)));
            match started {
                Ok(status) => {
                    println!("{status}");
                    0
                }
                Err(e) => {
                    eprintln!("ember: {e}");
                    EXIT_VMM_ERROR
                }
            }
        }
        LaneAction::Serve { state_dir, build, once, tap, user_net } => {
            let taps = tap
                .iter()
                .map(|t| match t.strip_suffix(",create") {
                    Some(name) => ember::lane::HostTap { name: name.to_string(), create: true },
                    None => ember::lane::HostTap { name: t.clone(), create: false },
                })
                .collect();
            match warm::serve(warm::ServeOptions { state_dir, build, once, taps, user_net }) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("ember: {}", chain(&e));
                    EXIT_VMM_ERROR
                }
            }
        }
    }
}

/// `ember --api-sock PATH [--config-file FILE]` and `ember --no-api --config-file FILE`: a VM
/// configured the way Firecracker is.
fn firecracker(fc: FirecrackerArgs, start: Instant) -> u8 {
    use ember::api;
    if fc.api_sock.is_none() && !fc.no_api {
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        eprintln!(
            "\nember: say what to do: a command (e.g. `ember run -- CMD`), or --api-sock PATH for Firecracker's API"
        );
        return EXIT_VMM_ERROR;
    }
    let timeline = Arc::new(Timeline::new(start));
    let seccomp =
        if fc.seccomp == SeccompArg::Off { ember::sandbox::SeccompMode::Off } else { ember::sandbox::SeccompMode::On };
    let options = api::ApiOptions { serial: config::SerialMode::Stdio, seccomp, id: fc.id.clone() };
    let fail = |msg: String| {
        eprintln!("ember: {msg}");
        EXIT_VMM_ERROR
    };
    let resources = match fc.config_file.as_deref().map(api::read_config_file).transpose() {
        Ok(r) => r,
        Err(e) => return fail(chain(&e)),
    };
    let listener = match fc.api_sock.as_deref().map(api::bind).transpose() {
        Ok(l) => l,
        Err(e) => return fail(chain(&e)),
    };
    let vmm = match resources {
        // A config file: the VM starts at once, the API (if any) serves it running.
        Some(resources) => {
            let cfg = match resources.vm_config(&options.serial, seccomp) {
                Ok(c) => c,
                Err(e) => return fail(format!("--config-file: {e}")),
            };
            let mut vmm = match Vmm::new(&cfg, &ember::extras::Extras::default(), timeline.clone()) {
                Ok(v) => v,
                Err(e) => return error_code(&e),
            };
            vmm.name_interfaces(&resources.nets.iter().map(|n| n.iface_id.clone()).collect::<Vec<_>>());
            if let Some(listener) = listener {
                let sender = match vmm.request_sender() {
                    Ok(s) => s,
                    Err(e) => return error_code(&e),
                };
                if let Err(e) = api::spawn(listener, resources, Some(sender), options) {
                    return fail(chain(&e));
                }
            }
            vmm
        }
        None => {
            let Some(listener) = listener else { return fail("--no-api needs --config-file".into()) };
            let boots = match api::spawn(listener, Default::default(), None, options) {
                Ok(b) => b,
                Err(e) => return fail(chain(&e)),
            };
            loop {
                let Some(vmm) = api::wait_for_boot(&boots, &timeline) else {
                    return fail("the API thread stopped before a VM was started".into());
                };
                match vmm.run() {
                    // The API answered the client with a 400: wait for another try.
                    Err(VmmError::Start(e)) => log::warn!("the VM did not start: {e}"),
                    Ok(o) => return exit_code_for(&o.reason),
                    Err(e) => return error_code(&e),
                }
            }
        }
    };
    match vmm.run() {
        Ok(o) => exit_code_for(&o.reason),
        Err(e) => error_code(&e),
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    // A shared folder's file server (`-v`): this binary, started by a VM's
    // ember, jailed in the folder before it reads a request (host/p9_server.rs).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == ember::host::p9_server::SERVER_ARG) {
        return ExitCode::from(ember::host::p9_server::server_main(&argv[2..]).clamp(0, 255) as u8);
    }
    // Inside the Linux lane's outer machine: the idle VMs that keep KVM's static keys still (lane/keeper.rs).
    if argv.get(1).is_some_and(|a| a == ember::lane::keeper::KEEPER_ARG) {
        return ExitCode::from(ember::lane::keeper::keeper_main().clamp(0, 255) as u8);
    }
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
    let Some(command) = cli.command else {
        return ExitCode::from(firecracker(cli.fc, start));
    };
    let code = match command {
        Command::Run(args) => run(*args, start),
        Command::Bench(args) => ember::bench::main(args),
        Command::Lane { action } => lane(action),
        Command::Pull { image, insecure_registry } => {
            let o = ember::image::PullOptions { insecure: insecure_registry, refresh: true };
            match ember::image::pull(&image, &o) {
                Ok(rec) => {
                    println!("{} {}", rec.name, rec.manifest_digest);
                    0
                }
                Err(e) => {
                    eprintln!("ember: {}", chain(&e));
                    EXIT_VMM_ERROR
                }
            }
        }
        Command::Images => match ember::image::list_table() {
            Ok(t) => {
                print!("{t}");
                0
            }
            Err(e) => {
                eprintln!("ember: {}", chain(&e));
                EXIT_VMM_ERROR
            }
        },
        Command::Rmi { images } => {
            let mut code = 0;
            for i in images {
                match ember::image::remove(&i) {
                    Ok(rec) => println!("removed {} ({})", rec.name, rec.config_digest),
                    Err(e) => {
                        eprintln!("ember: {}", chain(&e));
                        code = EXIT_VMM_ERROR;
                    }
                }
            }
            code
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ember", &mut std::io::stdout());
            0
        }
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
