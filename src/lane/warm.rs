//! The warm lane: one outer machine per user, kept running between `ember run`s (as `podman machine`
//! keeps its VM on macOS), so only the first run on a host like kvm_pvm pays for the outer boot.
//!
//! Who is who:
//! - The **daemon** (`ember lane serve`, started detached by the first `ember run` that needs it) boots an
//!   [`OuterMachine`] with [`SLOTS`] sets of stdin/stdout/stderr ports and serves runs on a Unix socket
//!   in the user's state dir ([`state_dir`]). It stops after [`idle_limit`] without runs, on
//!   `ember lane stop`, or when its machine dies or wedges.
//! - The **client** (`ember run`'s fallback) sends one [`Request::Run`] with its own stdin, stdout and
//!   stderr attached (SCM_RIGHTS), so the guest's bytes go straight to the user's terminal or pipes;
//!   it gets back the exit status. When stdin is a terminal the client puts it in raw mode and asks the
//!   inner ember to honour `Ctrl-a x` on its (piped) stdin, as it would on a terminal.
//!
//! Writable paths: the outer machine sees the host's `/` read-only. A run that names files it writes
//! (a read-write `--disk`, `--serial file:`) lists them in [`RunRequest::writable`]; the daemon, in its
//! own mount namespace, bind-mounts each onto `<state>/window/<id>/<n>`, a directory shared writable
//! with the machine, and the agent binds `/window/<id>/<n>` over the same path inside a mount namespace
//! of that run only (guest-kernels/lane/init). So a run may write exactly what it named, and nothing
//! else on the host is writable from the machine.
//!
//! A wedge: the daemon pings the agent every [`PING_EVERY`]; no answer for [`WEDGE_AFTER`] (or
//! `EMBER_LANE_WEDGE_SECS`) kills the
//! machine and fails the runs on it with a message saying so. The next `ember run` boots a new one.
//!
//! Frames on the socket: `EMB1`, a 32-bit big-endian length, then that much JSON ([`Request`] one way,
//! [`Reply`] the other). A run's three descriptors ride on its header.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::nested::{self, OuterMachine, Slot};
use super::wire::{AgentMessage, HostTap, LineBuffer};
use super::{Invocation, LaneConfig, LaneError};
use crate::host::poll::poll_one;

/// Streamed runs one warm machine serves at once (each needs three virtio-serial ports).
pub const SLOTS: usize = 4;
use nested::{PING_EVERY, WEDGE_AFTER};
/// Default idle time before the daemon stops its machine (`EMBER_LANE_IDLE`, seconds).
const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// Frame header magic.
const MAGIC: &[u8; 4] = b"EMB1";
/// Largest frame accepted (a run request is a command line and some paths).
const MAX_FRAME: u32 = 4 << 20;
/// Environment variable that makes the inner ember treat its piped stdin as the user's terminal for
/// the `Ctrl-a x` escape (set by the client when its own stdin is a terminal).
pub const ESCAPE_ENV: &str = "EMBER_CONSOLE_ESCAPE";

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Which build of ember the daemon runs, and its pid.
    Hello,
    /// What the daemon is doing.
    Status,
    /// Stop the machine and exit.
    Stop,
    /// Run ember inside the machine with the three descriptors sent alongside.
    Run(RunRequest),
}

/// One `ember` invocation for the machine. Byte strings, since paths and arguments need not be UTF-8.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunRequest {
    /// The ember binary (a host path; the machine sees it at the same path).
    pub program: Vec<u8>,
    /// Its arguments.
    pub args: Vec<Vec<u8>>,
    /// Environment on top of a clean `PATH`/`HOME`.
    pub env: Vec<(String, String)>,
    /// The working directory.
    pub cwd: Vec<u8>,
    /// Absolute host paths (existing files or directories) the run writes.
    pub writable: Vec<Vec<u8>>,
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// The daemon's build id and pid.
    Hello {
        /// See [`build_id`].
        build: String,
        /// The daemon's pid.
        pid: u32,
    },
    /// What `ember lane status` prints.
    Status(String),
    /// The daemon is stopping.
    Stopping,
    /// The run ended with this status (128+N when killed by signal N).
    Exit(i32),
    /// The run could not be done: why, in one message for the user.
    Error(String),
}

/// Where the per-user daemon keeps its socket, log and window: `$XDG_RUNTIME_DIR/ember-lane`, else
/// `<tmp>/ember-lane-warm-<uid>` (mode 0700).
pub fn state_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ember-lane"),
        // SAFETY: getuid cannot fail.
        _ => std::env::temp_dir().join(format!("ember-lane-warm-{}", unsafe { libc::getuid() })),
    }
}

/// Idle time after which the daemon stops (`EMBER_LANE_IDLE` seconds; default 10 minutes).
pub fn idle_limit() -> Duration {
    std::env::var("EMBER_LANE_IDLE").ok().and_then(|s| s.parse().ok()).map_or(DEFAULT_IDLE, Duration::from_secs)
}

/// Identifies the ember binary: a daemon started by another build (the binary was rebuilt or another
/// copy is used) is replaced rather than reused.
pub fn build_id(exe: &Path) -> String {
    let m = fs::metadata(exe);
    let (size, mtime) = m.map_or((0, 0), |m| (m.size(), m.mtime_nsec() as u64 ^ (m.mtime() as u64) << 20));
    format!("{}:{size}:{mtime:x}", exe.display())
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LaneError {
    let what = what.into();
    move |source| LaneError::Io { what, source }
}

// ---------------------------------------------------------------------------------------------------
// Frames

fn write_frame(s: &UnixStream, value: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(value).map_err(io::Error::other)?;
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(MAGIC);
    header[4..].copy_from_slice(&(body.len() as u32).to_be_bytes());
    if fds.is_empty() {
        (&*s).write_all(&header)?;
    } else {
        let n = s.send_with_fds(&[&header[..]], fds).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if n != header.len() {
            return Err(io::Error::other("short write of a frame header"));
        }
    }
    (&*s).write_all(&body)
}

/// Reads one frame and up to three descriptors sent with its header. `Ok(None)` at a clean EOF.
fn read_frame<T: for<'de> Deserialize<'de>>(s: &UnixStream) -> io::Result<Option<(T, Vec<File>)>> {
    let mut header = [0u8; 8];
    let mut raw = [-1 as RawFd; 3];
    let mut iov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() }];
    // SAFETY: the iovec points at `header`, which we own and may be overwritten with any bytes.
    let (got, nfds) =
        unsafe { s.recv_with_fds(&mut iov, &mut raw) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the first `nfds` descriptors were just received and are owned by nothing else.
    let files: Vec<File> = raw[..nfds].iter().map(|&fd| unsafe { File::from_raw_fd(fd) }).collect();
    if got == 0 {
        return Ok(None);
    }
    if got < header.len() {
        (&*s).read_exact(&mut header[got..])?;
    }
    if &header[..4] != MAGIC {
        return Err(io::Error::other("not an ember lane frame"));
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_FRAME {
        return Err(io::Error::other(format!("frame of {len} bytes refused")));
    }
    let mut body = vec![0u8; len as usize];
    (&*s).read_exact(&mut body)?;
    let value = serde_json::from_slice(&body).map_err(io::Error::other)?;
    Ok(Some((value, files)))
}

// ---------------------------------------------------------------------------------------------------
// The client: `ember run`'s side

/// Runs `ember <args>` in the warm lane with this process's stdin/stdout/stderr, starting the daemon
/// if needed; returns the exit status. `writable` lists the host paths the run writes. With host
/// taps, or `EMBER_LANE_WARM=0`, a private machine is started for this run only and stopped after it.
pub fn run(
    ember_bin: &Path,
    args: Vec<OsString>,
    writable: &[PathBuf],
    taps: &[HostTap],
    user_net: Option<&Path>,
) -> Result<i32, LaneError> {
    // A machine's NICs and ports are fixed when it boots: a run that brings its own gets its own.
    let private = gets_own_machine(!taps.is_empty() || user_net.is_some());
    let (sock, _private_dir) = if private {
        let dir = private_state_dir()?;
        let s = start_daemon(ember_bin, &dir, true, taps, user_net)?;
        (s, Some(PrivateDir(dir)))
    } else {
        (connect_or_start(ember_bin, &state_dir())?, None)
    };
    let mut env = Vec::new();
    for key in ["TERM", "RUST_LOG", "RUST_BACKTRACE"] {
        if let Ok(v) = std::env::var(key) {
            env.push((key.to_string(), v));
        }
    }
    let tty = crate::console::is_tty(libc::STDIN_FILENO);
    if tty {
        env.push((ESCAPE_ENV.to_string(), "1".to_string()));
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let req = RunRequest {
        program: ember_bin.as_os_str().as_bytes().to_vec(),
        args: args.into_iter().map(OsString::into_vec).collect(),
        env,
        cwd: cwd.into_os_string().into_vec(),
        writable: writable.iter().map(|p| p.as_os_str().as_bytes().to_vec()).collect(),
    };
    let raw = crate::console::RawTerminal::enable_keeping_output(libc::STDIN_FILENO);
    let sent = write_frame(&sock, &Request::Run(req), &[libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO]);
    let reply = sent.and_then(|_| read_frame::<Reply>(&sock));
    drop(raw);
    match reply {
        Ok(Some((Reply::Exit(status), _))) => Ok(status),
        Ok(Some((Reply::Error(message), _))) => Err(LaneError::Daemon(message)),
        Ok(Some((other, _))) => Err(LaneError::Daemon(format!("the lane daemon answered {other:?}"))),
        Ok(None) | Err(_) => Err(LaneError::Daemon(format!(
            "the lane daemon went away during the run{}",
            log_tail(&state_dir()).map(|t| format!("; its log ends:\n{t}")).unwrap_or_default()
        ))),
    }
}

/// Whether a run gets a machine of its own: it brings NICs (`--net`), or `EMBER_LANE_WARM=0`.
fn gets_own_machine(nics: bool) -> bool {
    nics || std::env::var("EMBER_LANE_WARM").as_deref() == Ok("0")
}

/// Whether a run of `ember_bin` (with `nics`: any `--net`) is served at once by the user's warm
/// machine, already up for this build: then nothing boots, and `ember run` has nothing to announce.
pub fn reuses_running_machine(ember_bin: &Path, nics: bool) -> bool {
    !gets_own_machine(nics) && hello(&state_dir()).is_some_and(|(_, build, _)| build == build_id(ember_bin))
}

/// A private daemon's state dir, removed when the run is over.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn private_state_dir() -> Result<PathBuf, LaneError> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ember-lane-once-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    Ok(dir)
}

fn ensure_state_dir(dir: &Path) -> Result<(), LaneError> {
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(format!("chmod {}", dir.display())))
}

/// Connects to the user's daemon, replacing one from another build, or starts one.
fn connect_or_start(ember_bin: &Path, dir: &Path) -> Result<UnixStream, LaneError> {
    ensure_state_dir(dir)?;
    let want = build_id(ember_bin);
    let lock = File::create(dir.join("lane.lock")).map_err(io_err("creating the lane's lock file"))?;
    // Only one client at a time checks and starts the daemon; the others wait here, then connect.
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if let Some((s, build, pid)) = hello(dir) {
        if build == want {
            return Ok(s);
        }
        log::info!("lane: replacing the daemon of another ember build ({build})");
        stop_pid(&s, pid);
    }
    start_daemon(ember_bin, dir, false, &[], None)
}

/// `Some((socket, build, pid))` when a daemon answers in `dir`.
fn hello(dir: &Path) -> Option<(UnixStream, String, u32)> {
    let s = UnixStream::connect(dir.join("lane.sock")).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(300)));
    write_frame(&s, &Request::Hello, &[]).ok()?;
    match read_frame::<Reply>(&s).ok()?? {
        (Reply::Hello { build, pid }, _) => {
            let _ = s.set_read_timeout(None);
            Some((s, build, pid))
        }
        _ => None,
    }
}

/// Asks the daemon behind `s` to stop and waits (up to 10 s) until process `pid` is gone.
fn stop_pid(s: &UnixStream, pid: u32) {
    let _ = write_frame(s, &Request::Stop, &[]);
    let _ = read_frame::<Reply>(s);
    let end = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < end {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `ember lane serve` detached (its own session; output to `<dir>/lane.log`) and connects.
fn start_daemon(
    ember_bin: &Path,
    dir: &Path,
    once: bool,
    taps: &[HostTap],
    user_net: Option<&Path>,
) -> Result<UnixStream, LaneError> {
    let sock = dir.join("lane.sock");
    let _ = fs::remove_file(&sock);
    let log = File::create(dir.join("lane.log")).map_err(io_err("creating lane.log"))?;
    let log2 = log.try_clone().map_err(io_err("dup lane.log"))?;
    let mut cmd = Command::new(ember_bin);
    cmd.args(["lane", "serve", "--state-dir"]).arg(dir).args(["--build", &build_id(ember_bin)]);
    if once {
        cmd.arg("--once");
    }
    if let Some(sock) = user_net {
        cmd.arg("--user-net").arg(sock);
    }
    for t in taps {
        cmd.arg("--tap").arg(if t.create { format!("{},create", t.name) } else { t.name.clone() });
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: setsid is async-signal-safe; the daemon must outlive this process and its terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| LaneError::Spawn { what: ember_bin.display().to_string(), source })?;
    // The daemon listens before it boots the machine; a connection waits in the backlog meanwhile.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            // Reap the child in the background if it exits while we still run (a private daemon).
            thread::spawn(move || child.wait());
            return Ok(s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LaneError::Daemon(format!(
                "the lane daemon exited at start ({status}){}",
                log_tail(dir).map(|t| format!(":\n{t}")).unwrap_or_default()
            )));
        }
        if Instant::now() > end {
            let _ = child.kill();
            return Err(LaneError::Daemon("the lane daemon did not open its socket within 20 s".into()));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn log_tail(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("lane.log")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    (!lines.is_empty()).then(|| lines[lines.len().saturating_sub(30)..].join("\n"))
}

/// `ember lane status`: one paragraph.
pub fn status() -> String {
    let dir = state_dir();
    let Some((s, _, _)) = hello(&dir) else {
        return format!("warm lane: not running (state dir {})", dir.display());
    };
    match write_frame(&s, &Request::Status, &[]).ok().and_then(|_| read_frame::<Reply>(&s).ok().flatten()) {
        Some((Reply::Status(text), _)) => text,
        _ => "warm lane: running, but it did not answer `status`".into(),
    }
}

/// `ember lane stop`: true when a daemon was running (it is gone now).
pub fn stop() -> bool {
    match hello(&state_dir()) {
        Some((s, _, pid)) => {
            stop_pid(&s, pid);
            true
        }
        None => false,
    }
}

/// `ember lane start`: starts the daemon (if it is not running) and waits until its machine is ready.
pub fn start(ember_bin: &Path) -> Result<String, LaneError> {
    let s = connect_or_start(ember_bin, &state_dir())?;
    write_frame(&s, &Request::Status, &[]).map_err(io_err("asking the lane daemon"))?;
    match read_frame::<Reply>(&s) {
        Ok(Some((Reply::Status(text), _))) => Ok(text),
        Ok(Some((Reply::Error(e), _))) => Err(LaneError::Daemon(e)),
        _ => Err(LaneError::Daemon(format!(
            "the lane daemon went away{}",
            log_tail(&state_dir()).map(|t| format!("; its log ends:\n{t}")).unwrap_or_default()
        ))),
    }
}

// ---------------------------------------------------------------------------------------------------
// The daemon

/// Options of `ember lane serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The state dir (socket, log, window).
    pub state_dir: PathBuf,
    /// The build id the starter expects (answered to `Hello`).
    pub build: String,
    /// Serve one run, then stop (a private machine).
    pub once: bool,
    /// Host taps for the machine (`NAME` or `NAME,create`).
    pub taps: Vec<HostTap>,
    /// A passt's socket on the host, for the machine's `ember.net0` port (`--net user`).
    pub user_net: Option<PathBuf>,
}

/// The warm machine and what its runs share.
struct Warm {
    machine: Mutex<OuterMachine>,
    waiters: Mutex<HashMap<u64, mpsc::Sender<i32>>>,
    slots: Mutex<Vec<Slot>>,
    slot_freed: Condvar,
    /// Why the machine is no longer usable, once it is not.
    dead: Mutex<Option<String>>,
    last_pong: Mutex<Instant>,
    active: AtomicUsize,
    last_active: Mutex<Instant>,
    runs: AtomicU64,
    stop: AtomicBool,
    window: PathBuf,
    sock: PathBuf,
    sock_ino: u64,
    started: Instant,
    boot_time: Duration,
    release: String,
    build: String,
}

/// `ember lane serve`: the daemon's main. Must run before any other thread exists (it may create a
/// user namespace).
pub fn serve(opts: ServeOptions) -> Result<(), LaneError> {
    isolate_mounts()?;
    let dir = opts.state_dir.clone();
    ensure_state_dir(&dir)?;
    let sock = dir.join("lane.sock");
    let _ = fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(io_err(format!("binding {}", sock.display())))?;
    let sock_ino = fs::metadata(&sock).map(|m| m.ino()).unwrap_or(0);
    // A daemon that is going away may still clean up its own window: each has its own.
    let window = dir.join(format!("window-{}", std::process::id()));
    remove_stale_windows(&dir);
    fs::create_dir_all(&window).map_err(io_err("creating the window dir"))?;

    // Content-addressed or rebuilt-means-restart (the build id): safe to cache inside across runs.
    let mut cached: Vec<PathBuf> = vec![crate::guest::cache_dir()];
    cached.extend(std::env::current_exe().ok());
    cached.retain(|p| p.exists() && !p.to_str().unwrap_or(",").contains([',', ' ', '\t', '\n', '"', '\'']));
    let config = LaneConfig {
        writable: Vec::new(),
        host_taps: opts.taps.clone(),
        user_net: opts.user_net.clone(),
        window: Some(window.clone()),
        keeper: std::env::current_exe().ok(),
        cached,
        ..LaneConfig::default()
    };
    eprintln!("lane daemon {}: booting the outer machine", std::process::id());
    let slots = if opts.once { 1 } else { SLOTS };
    let mut machine = match OuterMachine::boot(&config, slots) {
        Ok(m) => m,
        Err(e) => {
            let message = crate::error_chain(&e);
            eprintln!("{message}");
            answer_errors(&listener, &message);
            remove_if_ours(&sock, sock_ino);
            let _ = fs::remove_dir_all(&window);
            return Err(e);
        }
    };
    eprintln!("lane daemon: outer machine ready in {:.1} s ({})", machine.boot_time.as_secs_f64(), machine.release);
    let reader = machine.ctl_reader()?;
    let warm = Arc::new(Warm {
        slots: Mutex::new(machine.take_slots()),
        boot_time: machine.boot_time,
        release: machine.release.clone(),
        machine: Mutex::new(machine),
        waiters: Mutex::new(HashMap::new()),
        slot_freed: Condvar::new(),
        dead: Mutex::new(None),
        last_pong: Mutex::new(Instant::now()),
        active: AtomicUsize::new(0),
        last_active: Mutex::new(Instant::now()),
        runs: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        window,
        sock: sock.clone(),
        sock_ino,
        started: Instant::now(),
        build: opts.build.clone(),
    });
    {
        let w = warm.clone();
        thread::spawn(move || w.read_agent(reader));
        let w = warm.clone();
        thread::spawn(move || w.heartbeat());
    }
    let idle = idle_limit();
    listener.set_nonblocking(true).map_err(io_err("listener"))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let w = warm.clone();
                let once = opts.once;
                thread::spawn(move || {
                    w.client(s);
                    if once {
                        w.stop.store(true, Ordering::SeqCst);
                    }
                });
            }
            // Nothing to accept: sleep in poll(2) until a client connects, or a quarter second passes
            // to look at the flags below (an idle daemon wakes 4 times a second, not 50).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A client, or the next look at the idle time (an error: the same).
                let _ = poll_one(&listener, libc::POLLIN, Some(Duration::from_millis(250)));
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
        let dead = warm.dead.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(why) = dead {
            eprintln!("lane daemon: stopping: {why}");
            break;
        }
        let quiet = warm.active.load(Ordering::SeqCst) == 0;
        if warm.stop.load(Ordering::SeqCst) && quiet {
            eprintln!("lane daemon: stopping on request");
            break;
        }
        let idle_for = warm.last_active.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        if quiet && idle_for >= idle {
            eprintln!("lane daemon: stopping after {} s without runs", idle_for.as_secs());
            break;
        }
    }
    remove_if_ours(&sock, sock_ino);
    drop(listener);
    // Let runs that are failing (a dead machine) answer their clients before the machine goes away.
    let end = Instant::now() + Duration::from_secs(5);
    while warm.active.load(Ordering::SeqCst) > 0 && Instant::now() < end {
        thread::sleep(Duration::from_millis(20));
    }
    warm.machine.lock().unwrap_or_else(|p| p.into_inner()).kill();
    let _ = fs::remove_dir_all(&warm.window);
    Ok(())
}

/// Removes the socket at `path` if it is still the one this daemon bound (inode `ino`): a new daemon
/// may already have replaced it.
fn remove_if_ours(path: &Path, ino: u64) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino) {
        let _ = fs::remove_file(path);
    }
}

/// Removes the windows of daemons that are gone (`window-<pid>`), unmounting what they left.
fn remove_stale_windows(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("window-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Bind mounts of a dead daemon died with its mount namespace; what is left are directories.
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Answers clients that connected while the machine failed to boot, so none waits forever.
fn answer_errors(listener: &UnixListener, message: &str) {
    let _ = listener.set_nonblocking(true);
    while let Ok((s, _)) = listener.accept() {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        // Whatever it asked (a hello, a run), the answer is the boot's error, which the client reports.
        let _ = read_frame::<Request>(&s);
        let _ = write_frame(&s, &Reply::Error(message.to_string()), &[]);
    }
}

/// A private mount namespace for the daemon (and its QEMU), where it may bind-mount the paths runs
/// write into the window. Root needs only CLONE_NEWNS; anyone else gets a user namespace mapping them
/// to root in it (Debian 12 allows unprivileged user namespaces).
fn isolate_mounts() -> Result<(), LaneError> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: getegid cannot fail.
    let gid = unsafe { libc::getegid() };
    let flags = if uid == 0 { libc::CLONE_NEWNS } else { libc::CLONE_NEWNS | libc::CLONE_NEWUSER };
    // SAFETY: unshare only changes this (still single-threaded) process's namespaces.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(LaneError::Io {
            what: "unshare (a mount namespace for the lane)".into(),
            source: io::Error::last_os_error(),
        });
    }
    if uid != 0 {
        let _ = fs::write("/proc/self/setgroups", "deny");
        fs::write("/proc/self/uid_map", format!("0 {uid} 1")).map_err(io_err("writing uid_map"))?;
        fs::write("/proc/self/gid_map", format!("0 {gid} 1")).map_err(io_err("writing gid_map"))?;
    }
    // Mounts made here must not show on the host.
    // SAFETY: the strings are NUL-terminated literals; null pointers are allowed for unused arguments.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(LaneError::Io {
            what: "making / private in the lane's mount namespace".into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Warm {
    fn set_dead(&self, why: String) {
        let mut d = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            eprintln!("lane daemon: {why}");
            *d = Some(why);
            // The next `ember run` must not connect here: it starts a new daemon.
            remove_if_ours(&self.sock, self.sock_ino);
        }
        drop(d);
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.slot_freed.notify_all();
    }

    fn dead_reason(&self) -> Option<String> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn send(&self, line: &str) -> Result<(), LaneError> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner()).send_line(line)
    }

    /// Reads the control port: `done` to the waiting run, `pong` to the wedge detector.
    fn read_agent(&self, mut ctl: UnixStream) {
        let mut lines = LineBuffer::default();
        let mut buf = [0u8; 512];
        loop {
            while let Some(line) = lines.next_line() {
                match AgentMessage::parse(&line) {
                    Some(AgentMessage::Done { id, status }) => {
                        if let Some(tx) = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                            let _ = tx.send(status);
                        }
                    }
                    Some(AgentMessage::Pong) => {
                        *self.last_pong.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now()
                    }
                    _ => log::debug!("lane: ignoring agent line {line:?}"),
                }
            }
            match ctl.read(&mut buf) {
                Ok(0) | Err(_) => {
                    self.set_dead("the outer machine closed its control port (QEMU exited)".into());
                    return;
                }
                Ok(n) => lines.push(&buf[..n]),
            }
        }
    }

    /// Pings the agent; kills a machine that stopped answering.
    fn heartbeat(&self) {
        let wedge_after = std::env::var("EMBER_LANE_WEDGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(WEDGE_AFTER, Duration::from_secs);
        loop {
            thread::sleep(PING_EVERY);
            if self.dead_reason().is_some() {
                return;
            }
            let _ = self.send("ping");
            let silent = self.last_pong.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
            if silent > wedge_after {
                let mut m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
                let tail = nested::console_tail(m.dir());
                m.kill();
                drop(m);
                self.set_dead(format!(
                    "the Linux lane's outer machine stopped answering for {} s (wedged); it was killed, and the \
                     next run boots a new one\n{tail}",
                    silent.as_secs()
                ));
                return;
            }
            if !self.machine.lock().unwrap_or_else(|p| p.into_inner()).is_running() {
                self.set_dead("QEMU exited".into());
                return;
            }
        }
    }

    /// Serves one client connection: requests until EOF.
    fn client(&self, s: UnixStream) {
        loop {
            let (req, fds) = match read_frame::<Request>(&s) {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err(e) => {
                    let _ = write_frame(&s, &Reply::Error(format!("bad request: {e}")), &[]);
                    return;
                }
            };
            let reply = match req {
                Request::Hello => Reply::Hello { build: self.build.clone(), pid: std::process::id() },
                Request::Status => Reply::Status(self.describe()),
                Request::Stop => {
                    self.stop.store(true, Ordering::SeqCst);
                    Reply::Stopping
                }
                Request::Run(run) => {
                    let Ok([stdin, stdout, stderr]) = <[File; 3]>::try_from(fds) else {
                        let _ = write_frame(&s, &Reply::Error("a run needs stdin, stdout and stderr".into()), &[]);
                        return;
                    };
                    self.active.fetch_add(1, Ordering::SeqCst);
                    let result = self.run(run, stdin, stdout, stderr, &s);
                    self.runs.fetch_add(1, Ordering::SeqCst);
                    *self.last_active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    self.active.fetch_sub(1, Ordering::SeqCst);
                    match result {
                        Ok(status) => Reply::Exit(status),
                        Err(e) => Reply::Error(e),
                    }
                }
            };
            if write_frame(&s, &reply, &[]).is_err() {
                return;
            }
        }
    }

    fn describe(&self) -> String {
        let idle = self.last_active.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        format!(
            "warm lane: running (daemon pid {}), outer machine: QEMU TCG, kernel {}, booted in {:.1} s, up {} s; \
             {} runs served, {} running, idle {} s (stops after {} s idle; EMBER_LANE_IDLE)",
            std::process::id(),
            self.release,
            self.boot_time.as_secs_f64(),
            self.started.elapsed().as_secs(),
            self.runs.load(Ordering::SeqCst),
            self.active.load(Ordering::SeqCst),
            if self.active.load(Ordering::SeqCst) > 0 { 0 } else { idle.as_secs() },
            idle_limit().as_secs(),
        )
    }

    /// Takes a free slot, preferring one whose input port QEMU has already reconnected.
    fn take_slot(&self) -> Result<Slot, String> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(why) = self.dead_reason() {
                return Err(why);
            }
            if !slots.is_empty() {
                let i = slots.iter_mut().position(|s| s.input_ready()).unwrap_or(0);
                return Ok(slots.swap_remove(i));
            }
            slots =
                self.slot_freed.wait_timeout(slots, Duration::from_millis(500)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn give_back(&self, slot: Slot) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).push(slot);
        self.slot_freed.notify_one();
    }

    fn run(
        &self,
        req: RunRequest,
        stdin: File,
        stdout: File,
        stderr: File,
        client: &UnixStream,
    ) -> Result<i32, String> {
        let mut slot = self.take_slot()?;
        let result = self.run_in(&mut slot, req, stdin, stdout, stderr, client);
        self.give_back(slot);
        result
    }

    fn run_in(
        &self,
        slot: &mut Slot,
        req: RunRequest,
        stdin: File,
        stdout: File,
        stderr: File,
        client: &UnixStream,
    ) -> Result<i32, String> {
        if !slot.wait_input(Duration::from_secs(5)) {
            return Err("the lane's input port did not reconnect".into());
        }
        let inv = Invocation {
            args: req.args.into_iter().map(OsString::from_vec).collect(),
            stdin: Vec::new(),
            env: req.env,
        };
        let program = PathBuf::from(OsString::from_vec(req.program));
        let cwd = PathBuf::from(OsString::from_vec(req.cwd));
        let (id, req_dir) = {
            let mut m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
            m.new_stream_request_in(&program, &inv, &cwd).map_err(|e| crate::error_chain(&e))?
        };
        let binds = Binds::make(&self.window, id, &req.writable, &req_dir);
        let result = match binds {
            Ok(binds) => {
                let r = self.stream(slot, id, stdin, stdout, stderr, client);
                drop(binds);
                r
            }
            Err(e) => Err(e),
        };
        let _ = fs::remove_dir_all(&req_dir);
        result
    }

    fn stream(
        &self,
        slot: &mut Slot,
        id: u64,
        stdin: File,
        stdout: File,
        stderr: File,
        client: &UnixStream,
    ) -> Result<i32, String> {
        let marker = nested::end_marker();
        let (out_port, err_port) = slot.output_ports().map_err(|e| format!("the lane's output ports: {e}"))?;
        let (tx, rx) = mpsc::channel();
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let pump = |from: UnixStream, to: File, marker: String| {
            thread::spawn(move || nested::pump_output(from, Box::new(to), marker.as_bytes()))
        };
        let out = pump(out_port, stdout, marker.clone());
        let err = pump(err_port, stderr, marker.clone());
        let (stop_tx, stop_rx) = nested::stop_pipe().map_err(|e| crate::error_chain(&e))?;
        let input_port = slot.take_input();
        let input = thread::spawn(move || {
            if let Some(port) = input_port {
                nested::pump_input(stdin.as_raw_fd(), port, stop_rx);
            }
            drop(stdin);
        });
        let sent = self.send(&format!("stream {id} {marker} {}", slot.index));
        // The run may not have started inside yet when its client goes: ask again every second.
        let mut last_kill: Option<Instant> = None;
        let result = match sent {
            Err(e) => Err(crate::error_chain(&e)),
            Ok(()) => loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(status) => break Ok(status),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(self.dead_reason().unwrap_or_else(|| "the outer machine went away".into()));
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Some(why) = self.dead_reason() {
                            break Err(why);
                        }
                        if last_kill.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) && hung_up(client) {
                            log::info!("lane: the client of run {id} went away; killing the run");
                            let _ = self.send(&format!("kill {id}"));
                            last_kill = Some(Instant::now());
                        }
                    }
                }
            },
        };
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if result.is_err() {
            // The markers will not come: the machine is dead or being killed; its sockets close.
            self.machine.lock().unwrap_or_else(|p| p.into_inner()).kill();
        }
        let _ = out.join();
        let _ = err.join();
        drop(stop_tx);
        let _ = input.join();
        result
    }
}

/// Whether the peer of `s` has closed its end (the client process is gone).
fn hung_up(s: &UnixStream) -> bool {
    poll_one(s, libc::POLLIN | libc::POLLRDHUP, Some(Duration::ZERO))
        .is_ok_and(|r| r & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0)
}

/// The host paths one run may write, bind-mounted into the window while it runs.
struct Binds {
    mounts: Vec<PathBuf>,
    dir: PathBuf,
}

impl Binds {
    fn make(window: &Path, id: u64, writable: &[Vec<u8>], req_dir: &Path) -> Result<Binds, String> {
        let dir = window.join(id.to_string());
        let mut binds = Binds { mounts: Vec::new(), dir: dir.clone() };
        if writable.is_empty() {
            return Ok(binds);
        }
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut list = Vec::new();
        for (n, raw) in writable.iter().enumerate() {
            let path = PathBuf::from(OsString::from_vec(raw.clone()));
            if !path.is_absolute() || raw.iter().any(|&b| b == b'\n' || b == b'\t') {
                return Err(format!(
                    "cannot give the Linux lane write access to {}: not a plain absolute path",
                    path.display()
                ));
            }
            let meta = fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mp = dir.join(n.to_string());
            let made = if meta.is_dir() { fs::create_dir(&mp) } else { File::create(&mp).map(drop) };
            made.map_err(|e| format!("creating {}: {e}", mp.display()))?;
            bind_mount(&path, &mp)
                .map_err(|e| format!("giving the Linux lane write access to {}: {e}", path.display()))?;
            binds.mounts.push(mp);
            list.extend_from_slice(format!("{n}\t").as_bytes());
            list.extend_from_slice(raw);
            list.push(b'\n');
        }
        fs::write(req_dir.join("binds"), list).map_err(|e| format!("writing the run's binds: {e}"))?;
        Ok(binds)
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        for mp in &self.mounts {
            if let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_bytes()) {
                // SAFETY: a NUL-terminated path; MNT_DETACH never blocks on busy mounts.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn bind_mount(from: &Path, to: &Path) -> io::Result<()> {
    let from = std::ffi::CString::new(from.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: NUL-terminated paths; no data argument for a bind mount.
    let r = unsafe { libc::mount(from.as_ptr(), to.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let req = Request::Run(RunRequest {
            program: b"/usr/bin/ember".to_vec(),
            args: vec![b"run".to_vec(), vec![0xff, b'x']],
            env: vec![("TERM".into(), "xterm".into())],
            cwd: b"/root".to_vec(),
            writable: vec![b"/root/disk.img".to_vec()],
        });
        let f = File::open("/dev/null").unwrap();
        write_frame(&a, &req, &[f.as_raw_fd(), f.as_raw_fd(), f.as_raw_fd()]).unwrap();
        let (got, fds) = read_frame::<Request>(&b).unwrap().unwrap();
        assert_eq!(fds.len(), 3);
        let Request::Run(r) = got else { panic!("not a run: {got:?}") };
        assert_eq!(r.args[1], vec![0xff, b'x']);
        assert_eq!(r.writable, vec![b"/root/disk.img".to_vec()]);
        drop(a);
        assert!(read_frame::<Request>(&b).unwrap().is_none(), "EOF is a clean end");
    }

    #[test]
    fn oversized_and_foreign_frames_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"EMB1\xff\xff\xff\xff").unwrap();
        assert!(read_frame::<Request>(&b).is_err());
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"GET / HTTP/1.1\r\n").unwrap();
        assert!(read_frame::<Request>(&b).is_err());
    }

    #[test]
    fn a_closed_client_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!hung_up(&b));
        drop(a);
        assert!(hung_up(&b));
    }
}
