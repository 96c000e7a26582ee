//! The runtimes `ember bench` compares, how each one is probed, launched and cleaned up.
//!
//! Every runtime runs the same payload with the same limits where it has them:
//! - tiny tier: `busybox echo <marker>` on the host and in containers; ember's built-in PVH test
//!   `echo` guest (src/demo/echo.S: prints its command line, the marker, then writes the exit port) in the VMs;
//! - Linux tier: a busybox `sh -c` script (see [`linux_script`]) on the host, in containers, and
//!   as the command of the default Linux guest's init in the VMs.
//!
//! ember and QEMU are driven through their binaries only, never through ember's library.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::oci::{self, Limits};

/// A way to run the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// A plain process.
    Host,
    /// An OCI container run by crun.
    Crun,
    /// An OCI container run by runc.
    Runc,
    /// An ember VM.
    Ember,
    /// `qemu-system-x86_64 -M microvm` with KVM.
    QemuMicrovm,
    /// A Docker container (when an engine is reachable).
    Docker,
}

impl Runtime {
    /// All runtimes, in report order.
    pub const ALL: [Runtime; 6] =
        [Runtime::Host, Runtime::Crun, Runtime::Runc, Runtime::Ember, Runtime::QemuMicrovm, Runtime::Docker];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Host => "host",
            Runtime::Crun => "crun",
            Runtime::Runc => "runc",
            Runtime::Ember => "ember",
            Runtime::QemuMicrovm => "qemu-microvm",
            Runtime::Docker => "docker",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Runtime> {
        Runtime::ALL.into_iter().find(|r| r.name() == s)
    }

    /// A container runtime (crun, runc, docker).
    pub fn is_container(self) -> bool {
        matches!(self, Runtime::Crun | Runtime::Runc | Runtime::Docker)
    }

    /// A VM.
    pub fn is_vm(self) -> bool {
        matches!(self, Runtime::Ember | Runtime::QemuMicrovm)
    }

    /// The exit status of a successful run (QEMU's isa-debug-exit reports `(byte << 1) | 1`).
    pub fn ok_status(self) -> i32 {
        if self == Runtime::QemuMicrovm { 1 } else { 0 }
    }
}

/// The two payload tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// Print a line and exit: the floor of each runtime.
    Tiny,
    /// The default Linux guest running busybox, with the in-payload workloads.
    Linux,
    /// A container image's command (`ember bench --image`): the same root file
    /// system in every runtime.
    Image,
}

impl Tier {
    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Tiny => "tiny",
            Tier::Linux => "linux",
            Tier::Image => "image",
        }
    }
}

/// The image tier's payload, prepared once: one root file system for every runtime.
#[derive(Clone, Debug)]
pub struct ImagePayload {
    /// The reference as the user gave it (ember runs it by that name).
    pub reference: String,
    /// The command after `--` (empty: the image's own).
    pub command: Vec<String>,
    /// The process as Docker rules make it: Entrypoint + Cmd, Env, working directory.
    pub argv: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// The image's squashfs root (QEMU's disk).
    pub sqfs: PathBuf,
    /// The default guest's initramfs with the run spec appended (QEMU's initrd).
    pub initrd: PathBuf,
    /// The same root unpacked (crun, runc, docker import).
    pub rootfs_dir: PathBuf,
}

/// The line host and container payloads print first.
pub const MARKER: &str = "ember-bench: payload up";
/// Prefix of the Linux payload's phase lines.
pub const PHASE: &str = "ember-bench: phase ";

/// The in-payload workloads, timed from outside by when each phase line arrives.
/// Returns (phase name, what one unit is, units) for the report, and the script.
/// `getpid` is where the runtime finds `ember-getpid` (guest-kernels/ember-getpid.c).
pub fn linux_script(io_dir: &str, getpid: &str) -> String {
    format!(
        "echo '{MARKER}'; \
         echo '{PHASE}cpu'; awk 'BEGIN{{for(i=0;i<{CPU_ITERS};i++)s+=i*i; print s}}' >/dev/null; \
         echo '{PHASE}syscall'; {getpid} {SYSCALL_CALLS}; \
         echo '{PHASE}membw'; dd if=/dev/zero of=/dev/null bs=1M count={MEMBW_MIB} 2>/dev/null; \
         echo '{PHASE}fileio'; dd if=/dev/zero of={io_dir}/ember-bench-io bs=1M count={FILEIO_MIB} conv=fsync 2>/dev/null; \
         rm -f {io_dir}/ember-bench-io; \
         echo '{PHASE}end'"
    )
}

/// Iterations of the awk CPU loop.
pub const CPU_ITERS: u64 = 300_000;
/// getpid(2) calls made by `ember-getpid`.
pub const SYSCALL_CALLS: u64 = 200_000;
/// Where `ember-getpid` sits in a container's root and in the default guest.
pub const GETPID_PATH: &str = "/sbin/ember-getpid";
/// MiB copied from /dev/zero to /dev/null.
pub const MEMBW_MIB: u64 = 256;
/// MiB written (and fsynced) to the runtime's disk.
pub const FILEIO_MIB: u64 = 32;

/// Everything a launch needs, prepared once per bench run.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The ember binary.
    pub ember: PathBuf,
    /// Scratch directory (bundles, rootfs, guest image).
    pub work: PathBuf,
    /// The busybox rootfs (containers, and the host's busybox).
    pub rootfs: PathBuf,
    /// ember's `echo` guest (PVH; prints its command line and exits).
    pub tiny_guest: PathBuf,
    /// The default Linux guest (Linux and image tiers).
    pub linux: Option<crate::guest::GuestArtifacts>,
    /// The image tier's payload.
    pub image: Option<ImagePayload>,
    /// Limits for every runtime that has them.
    pub limits: Limits,
    /// The tier.
    pub tier: Tier,
    /// `--memory` as ember spells it.
    pub mem_arg: String,
    /// ember bench's own memory cgroup, under which it makes the launches' cgroups.
    pub cgroup_base: String,
}

/// What to undo after a launch, and where its memory was counted.
#[derive(Clone, Debug, Default)]
pub struct Cleanup {
    /// The launch's own memory cgroup (relative name, memory-hierarchy directory).
    pub launch_cgroup: Option<(String, PathBuf)>,
    /// The container, for container runtimes.
    pub container: Option<Container>,
}

/// A container to delete.
#[derive(Clone, Debug)]
pub struct Container {
    /// crun, runc or docker.
    pub runtime: Runtime,
    /// Container id (unique per bench run).
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Parent cgroup of the container's cgroup (relative name, in every hierarchy).
    pub cgroup: String,
    /// That parent in the memory hierarchy (for its peak).
    pub mem_cgroup: Option<PathBuf>,
}

/// One launch, ready to go.
pub struct Prepared {
    /// The command to time.
    pub cmd: Command,
    /// The line that means "the payload is up".
    pub marker: &'static str,
    /// What to undo afterwards.
    pub cleanup: Cleanup,
    /// The cost of joining the launch's cgroup, to leave out of its timings.
    pub join_timer: Option<std::sync::Arc<oci::JoinTimer>>,
}

/// Probes whether `rt` can run here: Ok(version) or Err(reason to skip).
pub fn probe(rt: Runtime) -> Result<String, String> {
    let version = |prog: &str, arg: &str| -> Result<String, String> {
        let out = Command::new(prog).arg(arg).output().map_err(|e| format!("{prog} not installed ({e})"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or("").trim().to_string())
    };
    let kvm = || -> Result<(), String> {
        match crate::lane::KvmFlavour::detect() {
            crate::lane::KvmFlavour::Absent { .. } => Err("no /dev/kvm".into()),
            crate::lane::KvmFlavour::NotPermitted => Err("/dev/kvm not permitted for this user".into()),
            _ => Ok(()),
        }
    };
    let root = || -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 { Err("needs root (rootful OCI containers)".into()) } else { Ok(()) }
    };
    match rt {
        Runtime::Host => {
            if Path::new("/bin/busybox").is_file() {
                version("/bin/busybox", "--help")
            } else {
                Err("no /bin/busybox".into())
            }
        }
        Runtime::Crun => {
            root()?;
            version("crun", "--version")
        }
        Runtime::Runc => {
            root()?;
            version("runc", "--version")
        }
        Runtime::Ember => {
            kvm()?;
            Ok(format!("ember {}", env!("CARGO_PKG_VERSION")))
        }
        Runtime::QemuMicrovm => {
            kvm()?;
            version("qemu-system-x86_64", "--version")
        }
        Runtime::Docker => {
            let v = version("docker", "--version")?;
            let info = super::docker::docker().arg("info").stdout(Stdio::null()).stderr(Stdio::null()).status();
            match info {
                Ok(s) if s.success() => Ok(v),
                _ => Err("no engine".into()),
            }
        }
    }
}

/// How to install what `rt` needs (for `--check`).
pub fn install_hint(rt: Runtime) -> &'static str {
    match rt {
        Runtime::Host => "apt-get install -y busybox-static",
        Runtime::Crun => "apt-get install -y crun (and run as root)",
        Runtime::Runc => "apt-get install -y runc (and run as root)",
        Runtime::Ember => "load a KVM module (kvm_intel / kvm_amd) and give this user /dev/kvm",
        Runtime::QemuMicrovm => "apt-get install -y qemu-system-x86, and /dev/kvm",
        Runtime::Docker => "apt-get install -y docker.io (ember bench starts its own dockerd as root when none runs)",
    }
}

/// Prepares launch `seq` of `rt` (bundle and cgroup for containers).
pub fn prepare(rt: Runtime, s: &Setup, seq: u64) -> std::io::Result<Prepared> {
    let tiny = s.tier == Tier::Tiny;
    let io_dir = s.work.join("io");
    let payload: Vec<String> = match (&s.image, tiny) {
        (Some(img), _) => img.argv.clone(),
        (None, true) => vec!["/bin/echo".into(), MARKER.into()],
        (None, false) => vec!["/bin/sh".into(), "-c".into(), linux_script("/tmp", GETPID_PATH)],
    };
    // The image tier's start-up is the command's first line, whatever it says.
    let marker: &'static str = if s.image.is_some() { "" } else { MARKER };
    let mut cleanup = Cleanup::default();
    let base = s.cgroup_base.as_str();
    let (mut cmd, marker) = match rt {
        Runtime::Host => {
            let mut c = Command::new(s.rootfs.join("bin/busybox"));
            if tiny {
                c.args(["echo", MARKER]);
            } else {
                std::fs::create_dir_all(&io_dir)?;
                let getpid = s.rootfs.join(GETPID_PATH.trim_start_matches('/'));
                c.args(["sh", "-c", &linux_script(&io_dir.to_string_lossy(), &getpid.to_string_lossy())]);
            }
            (c, MARKER)
        }
        Runtime::Crun | Runtime::Runc => {
            let id = format!("ember-bench-{}-{}-{seq}", std::process::id(), rt.name());
            let cgroup = format!("{base}/ember-bench-{}-c{seq}", std::process::id());
            let mem_cgroup = oci::create_memory_cgroup(&cgroup).ok();
            let bundle = s.work.join("bundles").join(&id);
            let rootfs = s.image.as_ref().map_or(&s.rootfs, |i| &i.rootfs_dir);
            oci::create_bundle(&bundle, rootfs, &payload, s.limits, &format!("{cgroup}/{id}"))?;
            if let Some(img) = &s.image {
                oci::set_process(&bundle, &img.env, &img.cwd)?;
            }
            let mut c = Command::new(rt.name());
            c.args(["run", "-b"]).arg(&bundle).arg(&id);
            if rt == Runtime::Crun && oci::unified_has_controllers() {
                // SAFETY: the hook makes only async-signal-safe system calls.
                unsafe { c.pre_exec(oci::hide_unified_cgroup) };
            }
            cleanup.container = Some(Container { runtime: rt, id, bundle, cgroup, mem_cgroup });
            (c, marker)
        }
        Runtime::Docker => {
            let id = format!("ember-bench-{}-{seq}", std::process::id());
            let mut c = super::docker::docker();
            c.args(["run", "--rm", "--network", "none", "--name", &id]).args([
                "--cpus",
                &s.limits.cpus.to_string(),
                "--memory",
                &s.limits.mem_bytes.to_string(),
            ]);
            match &s.image {
                Some(img) => {
                    for e in &img.env {
                        c.args(["-e", e]);
                    }
                    c.args(["-w", &img.cwd]).arg(DOCKER_IMAGE_TIER_IMAGE);
                }
                None => {
                    c.arg(DOCKER_IMAGE);
                }
            }
            c.args(&payload);
            cleanup.container =
                Some(Container { runtime: rt, id, bundle: PathBuf::new(), cgroup: String::new(), mem_cgroup: None });
            (c, marker)
        }
        Runtime::Ember => {
            let mut c = Command::new(&s.ember);
            c.args(["run", "--memory", &s.mem_arg, "--cpus", &s.limits.cpus.to_string(), "--timeline=json"]);
            if let Some(img) = &s.image {
                // As a user types it: the image by name (served from the store), the command after it.
                c.arg("--no-fallback").arg(&img.reference).args(&img.command);
                (c, marker)
            } else if tiny {
                c.args(["--cmdline", MARKER, "--kernel"]).arg(&s.tiny_guest);
                (c, MARKER)
            } else {
                let g = s.linux.as_ref().expect("Linux tier has the guest");
                c.arg("--no-fallback").arg("--kernel").arg(&g.vmlinux).arg("--initrd").arg(&g.initramfs);
                c.arg("--").args(&payload[..]);
                (c, MARKER)
            }
        }
        Runtime::QemuMicrovm => {
            let mut c = Command::new("qemu-system-x86_64");
            // acpi=off: the guest kernel has no ACPI, and only without it does QEMU describe
            // its virtio-mmio devices on the kernel command line (virtio_mmio.device=), as ember does.
            c.args(["-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off"])
                .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", &s.mem_arg])
                .args(["-smp", &s.limits.cpus.to_string()])
                .args(["-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-serial", "stdio"])
                .args(["-no-reboot", "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-kernel"]);
            if let Some(img) = &s.image {
                let g = s.linux.as_ref().expect("the image tier has the guest");
                let drive = format!("id=image,file={},format=raw,if=none,readonly=on", img.sqfs.display());
                c.arg(&g.bzimage).arg("-initrd").arg(&img.initrd).args([
                    "-append",
                    crate::guest::DEFAULT_CMDLINE,
                    "-drive",
                    &drive,
                    "-device",
                    "virtio-blk-device,drive=image",
                ]);
                (c, marker)
            } else if tiny {
                c.arg(&s.tiny_guest).args(["-append", MARKER]);
                (c, MARKER)
            } else {
                let g = s.linux.as_ref().expect("Linux tier has the guest");
                let argv = crate::guest::encode_argv(&payload).map_err(std::io::Error::other)?;
                c.arg(&g.bzimage)
                    .arg("-initrd")
                    .arg(&g.initramfs)
                    .arg("-append")
                    .arg(format!("{} {argv}", crate::guest::DEFAULT_CMDLINE));
                (c, MARKER)
            }
        }
    };
    // Its own process group: a Ctrl-C on the terminal reaches ember bench only, which then
    // tears everything down itself.
    cmd.process_group(0);
    // Its own memory cgroup, joined before exec: it counts what this launch charges, nothing
    // inherited from ember bench.
    let launch = format!("{base}/ember-bench-{}-{seq}", std::process::id());
    let mut join_timer = None;
    if let Ok(dir) = oci::create_memory_cgroup(&launch) {
        let procs = std::ffi::CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())
            .map_err(std::io::Error::other)?;
        let timer = std::sync::Arc::new(oci::JoinTimer::new()?);
        let t = timer.clone();
        // SAFETY: the hook makes only async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                t.record(0);
                let r = oci::join_cgroup(&procs);
                t.record(1);
                r
            })
        };
        join_timer = Some(timer);
        cleanup.launch_cgroup = Some((launch, dir));
    }
    Ok(Prepared { cmd, marker, cleanup, join_timer })
}

/// The image `docker` runs: the busybox rootfs, imported once.
pub const DOCKER_IMAGE: &str = "ember-bench-busybox:latest";
/// The image tier's root file system, imported into Docker.
pub const DOCKER_IMAGE_TIER_IMAGE: &str = "ember-bench-image:latest";

/// Imports `rootfs` as Docker image `name`.
pub fn docker_import(rootfs: &Path, name: &str) -> std::io::Result<bool> {
    let mut tar = Command::new("tar").arg("-C").arg(rootfs).args(["-c", "."]).stdout(Stdio::piped()).spawn()?;
    let stdin = tar.stdout.take().map(Stdio::from).unwrap_or_else(Stdio::null);
    let ok = super::docker::docker().args(["import", "-", name]).stdin(stdin).stdout(Stdio::null()).status()?.success();
    Ok(tar.wait()?.success() && ok)
}

/// Reads what only the cleanup can see (the peaks of the launch's and the container's cgroups,
/// KiB), then undoes everything `c` names.
pub fn finish(c: &Cleanup) -> (Option<u64>, Option<u64>) {
    let launch_peak = c.launch_cgroup.as_ref().and_then(|(_, dir)| oci::cgroup_peak_kib(dir));
    let mut container_peak = None;
    match &c.container {
        None => {}
        Some(Container { runtime: Runtime::Docker, id, .. }) => {
            let _ = super::docker::docker().args(["rm", "-f", id]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        Some(Container { runtime, id, bundle, cgroup, mem_cgroup }) => {
            container_peak = mem_cgroup.as_deref().and_then(oci::cgroup_peak_kib);
            delete_container(*runtime, id);
            let _ = std::fs::remove_dir_all(bundle);
            oci::remove_cgroup_everywhere(cgroup);
        }
    }
    if let Some((name, _)) = &c.launch_cgroup {
        oci::remove_cgroup_everywhere(name);
    }
    (launch_peak, container_peak)
}

/// `crun|runc delete -f ID`, quietly (a no-op when `run` already removed it).
pub fn delete_container(rt: Runtime, id: &str) {
    if !Path::new("/run").join(rt.name()).join(id).exists() {
        return;
    }
    let mut c = Command::new(rt.name());
    c.args(["delete", "-f", id]).stdout(Stdio::null()).stderr(Stdio::null());
    if rt == Runtime::Crun && oci::unified_has_controllers() {
        // SAFETY: the hook makes only async-signal-safe system calls.
        unsafe { c.pre_exec(oci::hide_unified_cgroup) };
    }
    let _ = c.status();
}
