//! The Linux lane: run ember invocations on a machine that can run Linux guests.
//!
//! On a host with hardware virtualization (`kvm_intel`, `kvm_amd`) that machine is the host itself and
//! an invocation is a plain child process. On a host whose KVM is software (`kvm_pvm`) or missing,
//! Linux guests cannot run directly, so the lane boots an *outer machine* once — QEMU TCG with an
//! emulated AMD SVM CPU running Debian's stock kernel with `kvm_amd npt=0` — and runs each invocation
//! inside it, where `/dev/kvm` is real KVM. The outer machine sees the host's files at the same paths
//! (read-only root over 9p; writable: `/tmp` for [`LinuxLane`], exactly the paths a run names for the
//! warm machine of `ember run`), so arguments need no translation. Host taps named by
//! `--net tap=NAME` are handed to the outer machine as NICs and bridged inside to taps of the same
//! names ([`LaneConfig::host_taps`]), so the inner ember's `--net` reaches the user's tap unchanged.
//!
//! Code map:
//! - [`fallback`]: `ember run`'s way here: whether the host's KVM can run the guest, and the inner
//!   ember's command line (resolved kernel and image, `--net user` through the host's passt).
//! - [`flavour`]: which KVM the host has, and whether Linux guests need the nested lane.
//! - [`keeper`]: idle VMs the outer machine holds so inner boots never flip KVM's static keys.
//! - [`nested`]: the outer machine: artifacts (`guest-kernels/lane/build-outer.sh`), QEMU, the agent.
//! - [`warm`]: the per-user daemon that keeps one outer machine running between `ember run`s, and gives
//!   each run write access to exactly the host paths it names.
//! - [`wire`]: the formats between host and agent, unit-tested without a machine.
//!
//! Tests start the lane once per test binary and run many invocations through it:
//!
//! ```no_run
//! use std::sync::{Mutex, OnceLock};
//! use ember::lane::{Invocation, LinuxLane};
//!
//! static LANE: OnceLock<Mutex<LinuxLane>> = OnceLock::new();
//!
//! fn lane() -> std::sync::MutexGuard<'static, LinuxLane> {
//!     LANE.get_or_init(|| {
//!         // In an integration test: `env!("CARGO_BIN_EXE_ember")`.
//!         let bin = std::path::Path::new("target/release/ember");
//!         Mutex::new(LinuxLane::start(bin).unwrap_or_else(|e| panic!("Linux lane: {e}")))
//!     })
//!     .lock()
//!     // A test that panicked while holding the lane leaves it usable.
//!     .unwrap_or_else(|poisoned| poisoned.into_inner())
//! }
//!
//! // A #[test] in tests/:
//! fn boots_to_init() {
//!     let out = lane().run(&Invocation::new(["run", "--memory", "512M", "--", "echo", "hi"])).unwrap();
//!     assert_eq!(out.status, 0, "{}", out.stderr_lossy());
//! }
//! ```
//! A lane held in a `static` is never dropped; its QEMU still dies with the test process
//! (PR_SET_PDEATHSIG) and its work dir is removed by the next lane that starts.

pub mod fallback;
pub mod flavour;
pub mod keeper;
pub mod nested;
pub mod warm;
pub mod wire;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use flavour::KvmFlavour;
use nested::OuterMachine;
pub use wire::HostTap;

/// Errors of the Linux lane.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The lane cannot start on this host; the message says why and what fixes it.
    #[error("the Linux lane is unavailable: {0}")]
    Unavailable(String),
    /// The outer machine failed to boot or died.
    #[error("the Linux lane's outer machine failed: {reason}\n{log}")]
    OuterMachine {
        /// What went wrong.
        reason: String,
        /// The tail of the outer console and of QEMU's messages.
        log: String,
    },
    /// A program could not be started.
    #[error("cannot start {what}")]
    Spawn {
        /// Which program.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Host-side I/O failed.
    #[error("Linux lane: {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The invocation ran longer than its timeout and was killed; the lane stays usable.
    #[error("the invocation was killed after its timeout of {after:?}")]
    Timeout {
        /// The timeout.
        after: Duration,
        /// What it printed on stdout before it was killed.
        stdout: Vec<u8>,
        /// What it printed on stderr before it was killed.
        stderr: Vec<u8>,
    },
    /// A host tap cannot be handed to the outer machine (missing, or existing despite `,create`).
    #[error(transparent)]
    Tap(#[from] crate::host::tap::TapError),
    /// What the warm lane's daemon reported (already a whole message).
    #[error("{0}")]
    Daemon(String),
    /// The outer machine stopped answering; it was killed and the next `run` boots a new one.
    #[error("the outer machine stopped answering after {after:?}; it was killed (the next run restarts it)\n{log}")]
    Wedged {
        /// How long the invocation had been running.
        after: Duration,
        /// The tail of the outer console.
        log: String,
    },
}

/// Where a long run's stderr goes as it is written ([`LinuxLane::run_with_progress`]).
pub type Progress<'a> = &'a mut dyn FnMut(&[u8]);

/// One run of the ember binary.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// Arguments to the ember binary.
    pub args: Vec<OsString>,
    /// Bytes fed to its stdin (then EOF).
    pub stdin: Vec<u8>,
    /// Environment variables, on top of a clean `PATH` and `HOME`.
    pub env: Vec<(String, String)>,
}

impl Invocation {
    /// An invocation with these arguments, empty stdin and no extra environment.
    pub fn new<I: IntoIterator<Item = S>, S: Into<OsString>>(args: I) -> Invocation {
        Invocation { args: args.into_iter().map(Into::into).collect(), ..Default::default() }
    }
}

/// What an invocation did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// ember's exit code (128+N when it was killed by signal N).
    pub status: i32,
    /// Everything it wrote on stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote on stderr.
    pub stderr: Vec<u8>,
    /// From sending the invocation to having its results.
    pub elapsed: Duration,
}

impl Outcome {
    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// How the lane is set up. `Default` reads the `EMBER_LANE*` environment variables.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    /// Force a lane: `Some(true)` nested, `Some(false)` direct, `None` by host flavour
    /// (`EMBER_LANE=nested|direct`).
    pub force_nested: Option<bool>,
    /// Per-invocation timeout (`EMBER_LANE_TIMEOUT`, seconds; default 120).
    pub timeout: Duration,
    /// Time allowed for the outer machine to boot (default 180 s).
    pub boot_timeout: Duration,
    /// Outer machine memory; an inner guest with `--memory 3584M` must fit (default 6144; TCG
    /// allocates lazily).
    pub memory_mib: u32,
    /// Outer machine vCPUs (default 2).
    pub cpus: u32,
    /// QEMU `-cpu` model; it must offer SVM (default `EPYC,+svm`).
    pub cpu_model: String,
    /// Host directories the outer machine may write, at the same paths (default: the temp dir, plus
    /// `EMBER_LANE_WRITABLE`, colon-separated). Everything else is read-only inside.
    pub writable: Vec<PathBuf>,
    /// Host taps (in this process's network namespace) given to the outer machine as virtio-net NICs;
    /// inside, each is bridged to a new tap of the same name for the inner ember to open (default none).
    pub host_taps: Vec<HostTap>,
    /// A host directory shared writable as the tag `window` (mounted at `/window` inside), through which
    /// the warm lane gives each run write access to exactly the paths it names (`lane::warm`).
    pub window: Option<PathBuf>,
    /// Host paths whose content never changes in place (ember's content-addressed cache, the ember
    /// binary the warm machine serves), seen inside through a second read-only share with the outer
    /// kernel's page cache on (9p `cache=loose`), so a warm machine reads a guest kernel or the binary
    /// over 9p once, not on every run.
    pub cached: Vec<PathBuf>,
    /// A Unix socket on the host (a passt listening there, for `--net user`) that becomes the outer
    /// machine's virtio-serial port `ember.net0`, which the inner ember opens as
    /// `--net stream=/dev/virtio-ports/ember.net0` ([`USER_NET_PORT`]; default none).
    pub user_net: Option<PathBuf>,
    /// The ember binary the outer machine runs as its KVM keeper ([`keeper`]): `ember_keeper=` on its
    /// command line. [`LinuxLane`] and the warm daemon set it to the ember they serve (default none).
    pub keeper: Option<PathBuf>,
}

/// Inside the outer machine: the virtio-serial port that carries `--net user`'s frames to the host's
/// passt (see [`LaneConfig::user_net`]).
pub const USER_NET_PORT: &str = "/dev/virtio-ports/ember.net0";

impl Default for LaneConfig {
    fn default() -> LaneConfig {
        let force_nested = match std::env::var("EMBER_LANE").as_deref() {
            Ok("nested") => Some(true),
            Ok("direct") => Some(false),
            _ => None,
        };
        let timeout = std::env::var("EMBER_LANE_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(120), Duration::from_secs);
        let mut writable = vec![std::env::temp_dir()];
        if let Ok(extra) = std::env::var("EMBER_LANE_WRITABLE") {
            writable.extend(extra.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
        }
        LaneConfig {
            force_nested,
            timeout,
            boot_timeout: Duration::from_secs(180),
            memory_mib: 6144,
            cpus: 2,
            cpu_model: "EPYC,+svm".into(),
            writable,
            host_taps: Vec::new(),
            window: None,
            cached: Vec::new(),
            user_net: None,
            keeper: None,
        }
    }
}

/// Where the lane runs its guests: on this host's KVM, or inside the nested outer machine.
enum GuestHost {
    Direct,
    Nested { machine: Option<Box<OuterMachine>>, boots: u32, last_boot: Duration },
}

/// A machine that can run Linux guests, and the way to run ember invocations on it.
pub struct LinuxLane {
    ember_bin: PathBuf,
    config: LaneConfig,
    flavour: KvmFlavour,
    host: GuestHost,
}

impl LinuxLane {
    /// Starts the lane for `ember_bin` with [`LaneConfig::default`]: direct on VMX/SVM hosts; otherwise
    /// boots the outer machine (once; later [`run`](Self::run)s reuse it).
    pub fn start(ember_bin: &Path) -> Result<LinuxLane, LaneError> {
        Self::start_with(ember_bin, LaneConfig::default())
    }

    /// Like [`start`](Self::start) with an explicit configuration.
    pub fn start_with(ember_bin: &Path, config: LaneConfig) -> Result<LinuxLane, LaneError> {
        let ember_bin = std::path::absolute(ember_bin)
            .map_err(|source| LaneError::Io { what: format!("resolving {}", ember_bin.display()), source })?;
        if !ember_bin.is_file() {
            return Err(LaneError::Unavailable(format!("no ember binary at {}", ember_bin.display())));
        }
        let mut config = config;
        config.keeper.get_or_insert_with(|| ember_bin.clone());
        let flavour = KvmFlavour::detect();
        let nested = config.force_nested.unwrap_or(flavour.needs_nested_lane());
        let host = if nested {
            let machine = OuterMachine::boot(&config, 0)?;
            let last_boot = machine.boot_time;
            log::info!("lane: outer machine ready in {last_boot:?} (kernel {})", machine.release);
            GuestHost::Nested { machine: Some(Box::new(machine)), boots: 1, last_boot }
        } else {
            GuestHost::Direct
        };
        Ok(LinuxLane { ember_bin, config, flavour, host })
    }

    /// Sets the per-invocation timeout for later runs.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.config.timeout = timeout;
    }

    /// Runs ember with `inv` under the configured timeout.
    pub fn run(&mut self, inv: &Invocation) -> Result<Outcome, LaneError> {
        let timeout = self.config.timeout;
        self.run_with_timeout(inv, timeout)
    }

    /// Runs ember with `inv`, killing it after `timeout` ([`LaneError::Timeout`]; the lane stays
    /// usable). If the outer machine itself stops answering it is killed ([`LaneError::Wedged`]) and
    /// the next run boots a fresh one.
    pub fn run_with_timeout(&mut self, inv: &Invocation, timeout: Duration) -> Result<Outcome, LaneError> {
        let bin = self.ember_bin.clone();
        self.run_program(&bin, inv, timeout)
    }

    /// Like [`run`](Self::run), passing ember's stderr to `progress` as it is written (nested lane) or
    /// once it has exited (direct lane), for long runs that report progress.
    pub fn run_with_progress(
        &mut self,
        inv: &Invocation,
        progress: &mut dyn FnMut(&[u8]),
    ) -> Result<Outcome, LaneError> {
        let bin = self.ember_bin.clone();
        let timeout = self.config.timeout;
        self.run_inner(&bin, inv, timeout, Some(progress))
    }

    /// Runs any host `program` (e.g. `/bin/sh` with a script that sets up a network namespace and
    /// runs ember inside it) on the lane's machine, like [`LinuxLane::run_with_timeout`] runs ember.
    pub fn run_program(&mut self, program: &Path, inv: &Invocation, timeout: Duration) -> Result<Outcome, LaneError> {
        self.run_inner(program, inv, timeout, None)
    }

    fn run_inner(
        &mut self,
        program: &Path,
        inv: &Invocation,
        timeout: Duration,
        progress: Option<Progress<'_>>,
    ) -> Result<Outcome, LaneError> {
        match &mut self.host {
            GuestHost::Direct => {
                let out = run_direct(program, inv, timeout);
                if let (Some(f), Ok(o)) = (progress, &out) {
                    f(&o.stderr);
                }
                out
            }
            GuestHost::Nested { machine, boots, last_boot } => {
                if machine.is_none() {
                    let m = OuterMachine::boot(&self.config, 0)?;
                    *boots += 1;
                    *last_boot = m.boot_time;
                    *machine = Some(Box::new(m));
                }
                let Some(m) = machine.as_mut() else { unreachable!("booted above") };
                let result = m.run(program, inv, timeout, progress);
                if matches!(result, Err(LaneError::Wedged { .. } | LaneError::OuterMachine { .. })) {
                    *machine = None; // dropping kills it
                }
                result
            }
        }
    }

    /// The outer machine's QEMU process, when the lane is nested and its machine runs.
    pub fn outer_machine_pid(&self) -> Option<u32> {
        match &self.host {
            GuestHost::Nested { machine: Some(m), .. } => Some(m.qemu_pid()),
            _ => None,
        }
    }

    /// Which lane this is, in one line.
    pub fn describe(&self) -> String {
        match &self.host {
            GuestHost::Direct => format!("direct: {}", self.flavour),
            GuestHost::Nested { machine, boots, last_boot } => {
                let release = machine.as_ref().map_or("(stopped)", |m| m.release.as_str());
                format!(
                    "nested: QEMU TCG {}, kvm_amd npt=0, {} GiB, {} vCPUs, outer kernel {release}, booted in {:.1} s{}; host: {}",
                    self.config.cpu_model,
                    f64::from(self.config.memory_mib) / 1024.0,
                    self.config.cpus,
                    last_boot.as_secs_f64(),
                    if *boots > 1 { format!(" ({boots} boots)") } else { String::new() },
                    self.flavour,
                )
            }
        }
    }
}

fn run_direct(bin: &Path, inv: &Invocation, timeout: Duration) -> Result<Outcome, LaneError> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(&inv.args)
        .env_clear()
        .env("PATH", wire::INNER_PATH)
        .env("HOME", std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LaneError::Spawn { what: bin.display().to_string(), source })?;
    let mut stdin = child.stdin.take();
    let data = inv.stdin.clone();
    let feeder = std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(&data);
        }
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped")));
    let err = reader(Box::new(child.stderr.take().expect("piped")));
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(s)) => break (s, false),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                break (
                    child.wait().map_err(|source| LaneError::Io { what: "waiting for ember".into(), source })?,
                    true,
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(source) => {
                return Err(LaneError::Io { what: "waiting for ember".into(), source });
            }
        }
    };
    let _ = feeder.join();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if timed_out {
        return Err(LaneError::Timeout { after: timeout, stdout, stderr });
    }
    use std::os::unix::process::ExitStatusExt;
    let status = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(Outcome { status, stdout, stderr, elapsed: start.elapsed() })
}

/// `ember run`'s fallback where Linux guests need the nested lane: runs `ember <args>` in the outer
/// machine with this process's stdin, stdout and stderr, and returns its exit status. The machine is the
/// warm one of this user ([`warm`]: booted by the first run, reused by the next ones); runs that bring
/// host taps, or `EMBER_LANE_WARM=0`, get a private machine for this run only. Silent itself: the outer
/// kernel's console goes to a log file that is only shown if the machine fails. When stdin is a terminal
/// it is put in raw mode for the run (as ember does for a guest console), so keys such as Ctrl-C reach
/// the guest, and `Ctrl-a x` still quits. On hosts that run Linux directly, runs `ember_bin` here.
///
/// `writable` lists the host paths the run writes (read-write disks, a serial file): the machine may
/// write those and nothing else. Each `--net tap=NAME` in `ember_args` names a tap on this host: it
/// becomes a NIC of the outer machine, bridged inside to a tap NAME that the inner ember opens (see
/// [`LaneConfig::host_taps`]).
///
/// `user_net`: the socket of a passt on this host that the inner ember's `--net stream=`[`USER_NET_PORT`]
/// reaches (see [`LaneConfig::user_net`]); [`fallback`] starts that passt and rewrites `--net user`.
pub fn run_interactive(
    ember_bin: &Path,
    ember_args: &[OsString],
    writable: &[PathBuf],
    user_net: Option<&Path>,
) -> Result<i32, LaneError> {
    let config = LaneConfig::default();
    if !config.force_nested.unwrap_or(KvmFlavour::detect().needs_nested_lane()) {
        use std::os::unix::process::ExitStatusExt;
        let status = Command::new(ember_bin)
            .args(ember_args)
            .status()
            .map_err(|source| LaneError::Spawn { what: ember_bin.display().to_string(), source })?;
        return Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
    }
    let ember_bin = std::path::absolute(ember_bin)
        .map_err(|source| LaneError::Io { what: format!("resolving {}", ember_bin.display()), source })?;
    let (host_taps, ember_args) =
        wire::host_taps(ember_args).map_err(|e| LaneError::Unavailable(format!("--net: {e}")))?;
    warm::run(&ember_bin, ember_args, writable, &host_taps, user_net)
}
