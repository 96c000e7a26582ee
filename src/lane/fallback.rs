//! `ember run`'s fallback to the Linux lane: when this host's KVM cannot run a Linux guest (software
//! virtualization such as kvm_pvm, see [`super::flavour`]), the same `ember run` is run again by an
//! inner ember inside the lane's outer machine ([`super::run_interactive`]).
//!
//! Deciding, and rewriting the command line for the inner ember, happen here:
//! - the inner ember gets the kernel and initrd the outer one resolved (it never builds or looks up
//!   the default guest inside the machine), and the `--output` it resolved (its own stdin and stdout
//!   are never terminals);
//! - an image run is resolved on the host side (store and cache are shared read-only with the
//!   machine, the run's initrd through /tmp): the inner ember gets plain VM options ([`vm_args`]);
//! - `--net user`: passt runs here, on the host, so the guest's gateway is this host and published
//!   ports are on this host's addresses; its socket becomes the outer machine's virtio-serial port
//!   [`super::USER_NET_PORT`], which the inner ember opens as `--net stream=` ([`rewrite_user_net`]).
//!   `--net tap=NAME` stays as it is: the lane bridges the host's tap into the machine.
//!
//! main.rs fills a [`RunRequest`] from its clap arguments and calls [`run_in_lane_if_needed`] (or
//! [`restore_in_lane_if_needed`] for `--from-snapshot`) after it built and validated the VM's
//! configuration; `Ok(None)` means: boot the VM here.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::boot::{KernelFormat, probe_kernel};
use crate::config::{self, KernelSource, NetBackendConfig, NetConfig, VmConfig};
use crate::host::passt::{GuestIpv4, Passt, PasstError};

use super::flavour::KvmFlavour;
use super::{LaneError, USER_NET_PORT};

/// Why a run could not go to the Linux lane.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// The host cannot run the Linux guest itself, and `--no-fallback` forbids the lane.
    #[error("this host's KVM is {0}; it cannot run a Linux guest, and --no-fallback forbids the emulated machine")]
    Refused(KvmFlavour),
    /// The private directory for passt's socket.
    #[error("cannot create {0}")]
    Create(PathBuf, #[source] std::io::Error),
    /// `--net user`: the host's passt did not start.
    #[error(transparent)]
    Passt(#[from] PasstError),
    /// The inner ember is this binary.
    #[error("cannot find my own binary")]
    OwnBinary(#[source] std::io::Error),
    /// The outer machine, or the run in it.
    #[error("the Linux lane failed")]
    Lane(#[from] LaneError),
}

impl FallbackError {
    /// Whether the error says that this host's KVM cannot run the guest (exit 126, not 125).
    pub fn is_kvm_unusable(&self) -> bool {
        matches!(self, FallbackError::Refused(_))
    }
}

/// What the fallback needs from `ember run`'s command line, as plain data.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// ember's arguments as given, without the program's name.
    pub argv: Vec<OsString>,
    /// `--no-fallback`.
    pub no_fallback: bool,
    /// `--kernel` was given.
    pub kernel_given: bool,
    /// `--initrd` was given.
    pub initrd_given: bool,
    /// `--output=auto` (the default).
    pub output_auto: bool,
    /// `--save-snapshot DIR`.
    pub save_snapshot: Option<PathBuf>,
    /// The VM options an image run's inner ember gets again, as given.
    pub vm: VmOptions,
}

/// The VM options of `ember run` that an image run's inner ember gets as they were typed (the rest it
/// gets resolved, from the [`VmConfig`]).
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// `--cpus`.
    pub cpus: u32,
    /// `--memory`.
    pub memory: String,
    /// `--serial`.
    pub serial: String,
    /// Each `--disk`.
    pub disks: Vec<String>,
    /// `--irqchip`: auto, on or off.
    pub irqchip: &'static str,
    /// `--timeline=`: table or json.
    pub timeline: Option<&'static str>,
    /// `--stats`.
    pub stats: bool,
    /// `--trace-exits=N`.
    pub trace_exits: Option<u64>,
    /// `--rng`.
    pub rng: bool,
    /// `--no-rng`.
    pub no_rng: bool,
    /// `--seccomp=off`.
    pub seccomp_off: bool,
    /// `--acpi=off`.
    pub acpi_off: bool,
}

/// Whether `cfg`'s kernel is a Linux guest that this host's KVM cannot run: the flavour, when so.
fn needs_lane(cfg: &VmConfig) -> Option<KvmFlavour> {
    let linux = matches!(probe_kernel(&cfg.kernel), Ok(KernelFormat::BzImage | KernelFormat::Elf { linux_note: true }));
    if !linux {
        // Every KVM runs a freestanding guest: no need to look at this one (an open of /dev/kvm and
        // sysfs lookups: a tiny guest's run 0.99x as long, 200 interleaved pairs).
        return None;
    }
    let flavour = KvmFlavour::detect();
    matches!(flavour, KvmFlavour::Pvm | KvmFlavour::Other).then_some(flavour)
}

/// Runs the VM of `cfg` (built and validated from `req`) inside the Linux lane when this host's KVM
/// cannot run it: `Ok(Some(exit status))` of the inner ember, or `Ok(None)` when the VM boots here.
/// `image_disk` is an image run's root file system disk (`--disk` syntax), the first of `cfg.disks`.
pub fn run_in_lane_if_needed(
    req: &RunRequest,
    cfg: &VmConfig,
    image_disk: Option<&str>,
) -> Result<Option<i32>, FallbackError> {
    let Some(flavour) = needs_lane(cfg) else { return Ok(None) };
    if req.no_fallback {
        return Err(FallbackError::Refused(flavour));
    }
    let exe = std::env::current_exe().map_err(FallbackError::OwnBinary)?;
    // Said when the run boots a machine; a run that reuses the warm one starts as quietly as a direct one.
    if !super::warm::reuses_running_machine(&exe, !cfg.nets.is_empty()) {
        eprintln!(
            "ember: this host's KVM ({flavour}) cannot run a Linux guest's user space: running the VM inside an \
             emulated SVM machine instead (QEMU TCG, a slower guest; the first run boots it, later runs reuse it: \
             `ember lane status`; --no-fallback refuses)"
        );
    }
    let (nets, user_net) = user_net_on_host(&cfg.nets)?;
    let Some(inner) = inner_args(req, cfg, &nets, image_disk, user_net.is_some()) else { return Ok(None) };
    let mut writable = cfg.writable_host_paths();
    if let Some(dir) = &req.save_snapshot {
        // The saved VM's files are written there, inside the machine.
        let _ = std::fs::create_dir_all(dir);
        writable.extend(std::path::absolute(dir).ok());
    }
    let sock = user_net.as_ref().map(|u| u.sock.as_path());
    Ok(Some(super::run_interactive(&exe, &inner, &writable, sock)?))
}

/// `--from-snapshot`: a Linux guest saved inside the nested lane is restored there, by the inner ember
/// with the same arguments. `writable`: the saved VM's read-write disks (the machine may write those and
/// nothing else). `Ok(None)`: restore it here.
pub fn restore_in_lane_if_needed(
    argv: &[OsString],
    linux: bool,
    no_fallback: bool,
    writable: &[PathBuf],
) -> Result<Option<i32>, FallbackError> {
    if !linux || no_fallback || !KvmFlavour::detect().needs_nested_lane() {
        return Ok(None);
    }
    let exe = std::env::current_exe().map_err(FallbackError::OwnBinary)?;
    Ok(Some(super::run_interactive(&exe, argv, writable, None)?))
}

/// A passt on the host for `--net user`, and the private directory of its socket (removed at drop).
struct UserNet {
    _passt: Passt,
    sock: PathBuf,
    dir: PathBuf,
}

impl Drop for UserNet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the host's passt for a `--net user` NIC and turns that NIC into a stream to
/// [`USER_NET_PORT`] with passt's addresses (and the MAC the guest would have had).
fn user_net_on_host(nets: &[NetConfig]) -> Result<(Vec<NetConfig>, Option<UserNet>), FallbackError> {
    let mut nets = nets.to_vec();
    let mut user_net = None;
    for (i, n) in nets.iter_mut().enumerate() {
        let NetBackendConfig::User { publish, guest } = &n.backend else { continue };
        let guest = match guest {
            Some(g) => *g,
            None => GuestIpv4::from_host()?,
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("ember-lane-net-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| FallbackError::Create(dir.clone(), e))?;
        let sock = dir.join("passt.sock");
        let started = Passt::start(&guest, publish, Some(&sock));
        match started {
            Ok((passt, _)) => user_net = Some(UserNet { _passt: passt, sock, dir }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        }
        let mac = n.mac.unwrap_or_else(|| crate::devices::virtio::net::default_mac(&n.mac_seed(), i));
        *n = NetConfig {
            backend: NetBackendConfig::Stream { path: USER_NET_PORT.into(), guest: Some(guest) },
            mac: Some(mac),
        };
    }
    Ok((nets, user_net))
}

/// The inner ember's arguments: [`vm_args`] for an image run; otherwise the command line as given,
/// `--net user` rewritten, with the resolved kernel, initrd and `--output` put after `run`. `None`
/// when the kernel is not a file (a built-in guest, which never needs the lane).
fn inner_args(
    req: &RunRequest,
    cfg: &VmConfig,
    nets: &[NetConfig],
    image_disk: Option<&str>,
    user_net: bool,
) -> Option<Vec<OsString>> {
    let KernelSource::Path(kernel) = &cfg.kernel else { return None };
    if let Some(disk) = image_disk {
        return Some(vm_args(&req.vm, cfg, nets, disk));
    }
    let mut inner = req.argv.clone();
    if user_net {
        let stream = nets.iter().find(|n| matches!(n.backend, NetBackendConfig::Stream { .. }));
        inner = rewrite_user_net(inner, &stream.map(config::render_net).unwrap_or_default());
    }
    let at = inner.iter().position(|a| a == "run").map_or(0, |i| i + 1);
    let mut extra: Vec<OsString> = Vec::new();
    if !req.kernel_given {
        extra.extend(["--kernel".into(), kernel.clone().into_os_string()]);
        if let (false, Some(i)) = (req.initrd_given, &cfg.initrd) {
            extra.extend(["--initrd".into(), i.clone().into_os_string()]);
        }
    }
    if req.output_auto {
        extra.push(output_arg(cfg).into());
    }
    inner.splice(at..at, extra);
    Some(inner)
}

/// The VM options of an image run as command-line words, for the inner ember when the outer one has
/// resolved the image into kernel, initrd and disk.
fn vm_args(o: &VmOptions, cfg: &VmConfig, nets: &[NetConfig], image_disk: &str) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["run".into()];
    let KernelSource::Path(k) = &cfg.kernel else { return v };
    v.extend(["--kernel".into(), k.clone().into_os_string()]);
    if let Some(i) = &cfg.initrd {
        v.extend(["--initrd".into(), i.clone().into_os_string()]);
    }
    let mut push = |k: &str, val: String| {
        v.push(k.into());
        v.push(val.into());
    };
    push("--cmdline", cfg.cmdline.clone());
    push("--cpus", o.cpus.to_string());
    push("--memory", o.memory.clone());
    push("--serial", o.serial.clone());
    push("--disk", image_disk.to_string());
    for d in &o.disks {
        push("--disk", d.clone());
    }
    for n in nets {
        push("--net", config::render_net(n));
    }
    for sh in &cfg.shares {
        let mode = if sh.read_only { ":ro" } else { "" };
        push("--volume", format!("{}:{}{mode}", sh.host.display(), sh.guest));
    }
    push("--irqchip", o.irqchip.to_string());
    if let Some(t) = o.timeline {
        v.push(format!("--timeline={t}").into());
    }
    if o.stats {
        v.push("--stats".into());
    }
    if let Some(n) = o.trace_exits {
        v.push(format!("--trace-exits={n}").into());
    }
    let flags =
        [(o.rng, "--rng"), (o.no_rng, "--no-rng"), (o.seccomp_off, "--seccomp=off"), (o.acpi_off, "--acpi=off")];
    v.extend(flags.iter().filter(|(on, _)| *on).map(|(_, f)| OsString::from(f)));
    v.push(output_arg(cfg).into());
    v
}

/// `--output=` as the outer ember resolved it, for the inner ember (whose stdin and stdout are never
/// terminals, and whose kernel and initrd are given explicitly).
fn output_arg(cfg: &VmConfig) -> &'static str {
    if cfg.split_output { "--output=split" } else { "--output=console" }
}

/// `ember run` arguments (before `--`) for the inner ember: the `--net user...` value becomes `stream`
/// and `-p`/`--publish` go, as the host's passt publishes the ports.
fn rewrite_user_net(args: Vec<OsString>, stream: &str) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        if s == "--" {
            out.push(a);
            out.extend(it);
            break;
        }
        let is_user = |v: &str| v == "user" || v.starts_with("user,");
        if s == "--net" {
            let v = it.next().unwrap_or_default();
            out.push(a);
            out.push(if is_user(&v.to_string_lossy()) { stream.into() } else { v });
        } else if let Some(v) = s.strip_prefix("--net=") {
            out.push(if is_user(v) { format!("--net={stream}").into() } else { a });
        } else if s == "-p" || s == "--publish" {
            it.next();
        } else if !(s.starts_with("--publish=") || (s.starts_with("-p") && s.len() > 2 && !s.starts_with("--"))) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    const STREAM: &str = "stream=/dev/virtio-ports/ember.net0,guest=10.0.2.15/24";

    #[test]
    fn user_net_becomes_the_stream_and_publish_goes() {
        let out =
            rewrite_user_net(words("run --net user -p 8080:80 --publish=9000:90 --memory 512M -- echo -p x"), STREAM);
        assert_eq!(out, words(&format!("run --net {STREAM} --memory 512M -- echo -p x")));
        let out = rewrite_user_net(words("run --net=user,mac=52:54:00:00:00:01 -p8080:80 --publish 1:2"), STREAM);
        assert_eq!(out, words(&format!("run --net={STREAM}")));
    }

    #[test]
    fn taps_and_the_command_stay_as_they_are() {
        let argv = words("run --net tap=t0 --net=tap=t1,create -- sh -c --net=user");
        assert_eq!(rewrite_user_net(argv.clone(), STREAM), argv);
    }

    fn image_cfg() -> VmConfig {
        let mut cfg = VmConfig::new(KernelSource::Path("/k/vmlinux".into()));
        cfg.initrd = Some("/tmp/run/initrd".into());
        cfg.cmdline = "console=ttyS0 quiet".into();
        cfg.split_output = true;
        cfg
    }

    #[test]
    fn an_image_run_gets_plain_vm_options() {
        let o = VmOptions {
            cpus: 2,
            memory: "512M".into(),
            serial: "stdio".into(),
            disks: vec!["/d.img,ro".into()],
            irqchip: "auto",
            timeline: Some("json"),
            stats: true,
            trace_exits: Some(5),
            no_rng: true,
            acpi_off: true,
            ..Default::default()
        };
        let v = vm_args(&o, &image_cfg(), &[], "/store/root.sqfs,ro,id=ember-image");
        let want: Vec<OsString> = [
            "run",
            "--kernel",
            "/k/vmlinux",
            "--initrd",
            "/tmp/run/initrd",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--serial",
            "stdio",
            "--disk",
            "/store/root.sqfs,ro,id=ember-image",
            "--disk",
            "/d.img,ro",
            "--irqchip",
            "auto",
            "--timeline=json",
            "--stats",
            "--trace-exits=5",
            "--no-rng",
            "--acpi=off",
            "--output=split",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        assert_eq!(v, want);
    }

    #[test]
    fn the_default_guest_gets_its_kernel_initrd_and_output_after_run() {
        let req = RunRequest {
            argv: words("--seccomp=off run --cpus 2 -- echo hi"),
            output_auto: true,
            ..Default::default()
        };
        let inner = inner_args(&req, &image_cfg(), &[], None, false).expect("a kernel file");
        assert_eq!(
            inner,
            words("--seccomp=off run --kernel /k/vmlinux --initrd /tmp/run/initrd --output=split --cpus 2 -- echo hi")
        );
        let given = RunRequest { kernel_given: true, ..req };
        assert_eq!(
            inner_args(&given, &image_cfg(), &[], None, false),
            Some(words("--seccomp=off run --output=split --cpus 2 -- echo hi"))
        );
    }
}
