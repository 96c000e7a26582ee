//! The nested lane's outer machine: a QEMU TCG machine with an emulated AMD SVM CPU, inside which
//! `/dev/kvm` is real KVM (`kvm_amd npt=0`: shadow paging, see guest-kernels/lane/build-outer.sh) and ember boots Linux guests.
//!
//! What the outer machine is (built by `guest-kernels/lane/build-outer.sh`, embedded here):
//! Debian's stock kernel, an initramfs with busybox, the virtio/9p/kvm modules and `init` (the agent).
//! The host's root is shared read-only over 9p and the agent chroots into it for every invocation, so
//! ember's binary, its shared libraries and every path named in its arguments work unchanged inside.
//! Writes go to writable 9p shares mounted over the same paths (the lane's work dir, `/tmp` by
//! default), or to tmpfs.
//!
//! How a run travels:
//! 1. The host writes `<lanedir>/req/<id>/{run.sh,stdin}` (see [`wire::render_run_script`]).
//! 2. The host sends `run <id> <timeout>` on the control port (virtio-serial port `ember.ctl`, a unix
//!    socket `<lanedir>/ctl.sock` on the host side).
//! 3. The agent runs `timeout -s KILL <timeout> chroot /host /bin/sh run.sh`; the script redirects the
//!    program's stdout/stderr to files in the request dir, which is on a 9p share without caching, so
//!    the bytes are on the host when the program has exited.
//! 4. The agent answers `done <id> <status>`; the host reads the two files.
//!
//! Streamed runs (`ember run`'s, through [`super::warm`]) use three more ports per [`Slot`]
//! (`ember.in<k>`, `ember.out<k>`, `ember.err<k>`) connected to the user's stdin/stdout/stderr, and an
//! end marker on each output port so the host knows it has every byte before it returns the exit status.
//!
//! Host taps ([`LaneConfig::host_taps`]): QEMU opens each as the backend of a virtio-net NIC
//! (`-netdev tap,ifname=NAME`; with `,create` QEMU's open creates it, and it vanishes when QEMU exits).
//! After `ready` the host sends `net <id> <mac> <NAME>` per tap; the agent finds the NIC by its MAC
//! ([`wire::outer_nic_mac`]), creates a tap NAME and puts both on a bridge. A frame from the inner guest
//! travels: inner ember -> tap NAME (outer) -> bridge -> NIC -> QEMU -> tap NAME (host).

use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::wire::{self, AgentMessage, LineBuffer, MarkerStripper, Redirect};
use super::{Invocation, LaneConfig, LaneError, Outcome};
use crate::host::tap::{self, TapError};

/// The outer machine's build script, embedded so an installed ember needs no source tree.
const BUILD_SCRIPT: &str = include_str!("../../guest-kernels/lane/build-outer.sh");
/// The outer machine's init and agent, written beside the script.
const INIT: &str = include_str!("../../guest-kernels/lane/init");

/// How long the agent may stay silent past an invocation's own timeout before the machine is
/// considered wedged and is killed.
const AGENT_GRACE: Duration = Duration::from_secs(30);
/// How often a waiting host asks the agent whether its loop still runs.
pub const PING_EVERY: Duration = Duration::from_secs(5);
/// Silence after which the outer machine counts as wedged and is killed.
pub const WEDGE_AFTER: Duration = Duration::from_secs(60);
/// Shell status of a program killed by SIGKILL (what `timeout -s KILL` leaves).
const STATUS_SIGKILL: i32 = 128 + libc::SIGKILL;

/// The files the outer machine boots from.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The outer kernel (Debian's `/boot/vmlinuz-*`).
    pub kernel: PathBuf,
    /// The outer initramfs (cached under `~/.cache/ember/lane-<hash>/`).
    pub initramfs: PathBuf,
    /// The outer kernel's release, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// The QEMU binary.
    pub qemu: PathBuf,
}

/// Runs the embedded `build-outer.sh` (from a copy in `scratch`) and parses its `KEY=value` output.
pub fn build_artifacts(scratch: &Path) -> Result<Artifacts, LaneError> {
    let dir = scratch.join("build");
    let io = |what: &str| {
        let what = format!("{what} in {}", dir.display());
        move |source| LaneError::Io { what, source }
    };
    fs::create_dir_all(&dir).map_err(io("creating the build dir"))?;
    fs::write(dir.join("build-outer.sh"), BUILD_SCRIPT).map_err(io("writing build-outer.sh"))?;
    fs::write(dir.join("init"), INIT).map_err(io("writing init"))?;
    let out = Command::new("bash")
        .arg(dir.join("build-outer.sh"))
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LaneError::Spawn { what: "bash (build-outer.sh)".into(), source })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(LaneError::Unavailable(format!("building the outer machine failed ({}): {stderr}", out.status)));
    }
    let kv = wire::parse_kv(&String::from_utf8_lossy(&out.stdout));
    let get = |key: &str| {
        kv.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| LaneError::Unavailable(format!("build-outer.sh printed no {key}= ({stderr})")))
    };
    Ok(Artifacts {
        kernel: get("LANE_KERNEL")?.into(),
        initramfs: get("LANE_INITRAMFS")?.into(),
        kernel_version: get("LANE_KERNEL_VERSION")?,
        qemu: get("LANE_QEMU")?.into(),
    })
}

/// The host ends of one set of streamed-run ports (`ember.in<k>`, `ember.out<k>`, `ember.err<k>`).
///
/// QEMU connects to the input port's socket with `reconnect=1`: a run's end of input is the host closing
/// that connection (the guest reads EOF), and QEMU connects again within a second for the next run.
pub struct Slot {
    /// `k`: which ports these are.
    pub index: usize,
    input_listener: UnixListener,
    input: Option<UnixStream>,
    output: UnixStream,
    error: UnixStream,
}

impl Slot {
    /// Whether QEMU's input connection is there (accepting it if it just arrived).
    pub fn input_ready(&mut self) -> bool {
        if self.input.is_none() {
            let _ = self.input_listener.set_nonblocking(true);
            if let Ok((s, _)) = self.input_listener.accept() {
                let _ = s.set_nonblocking(false);
                self.input = Some(s);
            }
        }
        self.input.is_some()
    }

    /// Second handles on the output and error ports, for a run's pumps.
    pub(super) fn output_ports(&self) -> io::Result<(UnixStream, UnixStream)> {
        Ok((self.output.try_clone()?, self.error.try_clone()?))
    }

    /// The input connection, for one run: closing it is the run's EOF (QEMU reconnects afterwards).
    pub(super) fn take_input(&mut self) -> Option<UnixStream> {
        self.input.take()
    }

    /// Waits up to `timeout` for QEMU's input connection.
    pub(super) fn wait_input(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.input_ready() {
            if Instant::now() > end {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// A running outer machine and its agent.
pub struct OuterMachine {
    child: Child,
    keeper: Option<Keeper>,
    ctl: UnixStream,
    lines: LineBuffer,
    slots: Vec<Slot>,
    dir: PathBuf,
    next_id: u64,
    /// The outer kernel's release, as the agent reported it.
    pub release: String,
    /// From spawning QEMU to the agent's `ready`.
    pub boot_time: Duration,
}

/// Why waiting for the agent stopped.
enum Wait {
    Message(AgentMessage),
    Deadline,
    Gone,
}

impl OuterMachine {
    /// Builds the artifacts, starts QEMU and waits until the agent is ready. The machine gets `slots`
    /// sets of stdin/stdout/stderr ports for streamed runs ([`Slot`], used by `lane::warm`).
    pub fn boot(config: &LaneConfig, slots: usize) -> Result<OuterMachine, LaneError> {
        let dir = create_lane_dir()?;
        match Self::boot_in(config, slots, dir.clone()) {
            Ok(m) => Ok(m),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn boot_in(config: &LaneConfig, slots: usize, dir: PathBuf) -> Result<OuterMachine, LaneError> {
        let t = Instant::now();
        let artifacts = build_artifacts(&dir)?;
        log::debug!("lane: artifacts ready in {:?}: {artifacts:?}", t.elapsed());
        for p in config.writable.iter().chain([&dir]) {
            check_share_path(p)?;
            if !p.is_dir() {
                return Err(LaneError::Unavailable(format!("writable share {} is not a directory", p.display())));
            }
        }
        for p in &config.cached {
            check_share_path(p)?;
        }
        check_host_taps(config)?;
        let io = |what: String| move |source| LaneError::Io { what, source };
        let listen = |name: &str| {
            let path = dir.join(format!("{name}.sock"));
            UnixListener::bind(&path).map_err(io(format!("binding {}", path.display())))
        };
        let ctl_listener = listen("ctl")?;
        let mut stream_listeners = Vec::new();
        for k in 0..slots {
            stream_listeners.push([
                listen(&format!("in{k}"))?,
                listen(&format!("out{k}"))?,
                listen(&format!("err{k}"))?,
            ]);
        }

        let mut cmd = qemu_command(config, &artifacts, &dir, slots);
        let log = fs::File::create(dir.join("qemu.log")).map_err(io("creating qemu.log".into()))?;
        let log2 = log.try_clone().map_err(io("dup qemu.log".into()))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let (child, keeper) = spawn_kept(cmd, &artifacts.qemu)?;
        let mut child = child;
        let deadline = start + config.boot_timeout;

        let accept = |l: &UnixListener, child: &mut Child| accept_until(l, child, deadline, &dir);
        let ctl = match accept(&ctl_listener, &mut child) {
            Ok(s) => s,
            Err(e) => {
                stop_child(&mut child, keeper);
                return Err(qemu_tap_error(config, &dir).map_or(e, LaneError::Tap));
            }
        };
        let mut streams = Vec::new();
        for (index, [i, o, e]) in stream_listeners.into_iter().enumerate() {
            let slot = (|| {
                let input = Some(accept(&i, &mut child)?);
                Ok(Slot {
                    index,
                    input,
                    output: accept(&o, &mut child)?,
                    error: accept(&e, &mut child)?,
                    input_listener: i,
                })
            })();
            match slot {
                Ok(s) => streams.push(s),
                Err(e) => {
                    stop_child(&mut child, keeper);
                    return Err(e);
                }
            }
        }

        let mut machine = OuterMachine {
            child,
            keeper: Some(keeper),
            ctl,
            lines: LineBuffer::default(),
            slots: streams,
            dir,
            next_id: 1,
            release: String::new(),
            boot_time: Duration::ZERO,
        };
        match machine.wait(Some(deadline)) {
            Wait::Message(AgentMessage::Ready { release }) => {
                log::debug!("lane: agent ready {:?} after QEMU started", start.elapsed());
                machine.release = release;
                machine.bridge_host_taps(config, deadline)?;
                machine.boot_time = start.elapsed();
                Ok(machine)
            }
            Wait::Message(AgentMessage::Fail(reason)) => Err(machine.fail(&reason)),
            Wait::Message(other) => Err(machine.fail(&format!("unexpected agent message {other:?}"))),
            Wait::Deadline => Err(machine.fail(&format!("no `ready` within {:?}", config.boot_timeout))),
            Wait::Gone => Err(qemu_tap_error(config, &machine.dir)
                .map_or_else(|| machine.fail("QEMU exited or closed the control port before `ready`"), LaneError::Tap)),
        }
    }

    /// Asks the agent to bridge each host tap's NIC to a tap of the same name inside; brings taps that
    /// QEMU created (`,create`) up on the host, as ember does for a tap it creates.
    fn bridge_host_taps(&mut self, config: &LaneConfig, deadline: Instant) -> Result<(), LaneError> {
        for t in &config.host_taps {
            if t.create {
                tap::set_link_up(&t.name)?;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.send(&wire::net_line(id, &wire::outer_nic_mac(&t.name), &t.name))?;
            match self.wait(Some(deadline)) {
                Wait::Message(AgentMessage::Done { id: got, status: 0 }) if got == id => {
                    log::debug!("lane: host tap {} bridged", t.name);
                }
                Wait::Message(AgentMessage::Done { status, .. }) => {
                    return Err(
                        self.fail(&format!("bridging host tap {} inside the machine failed (status {status})", t.name))
                    );
                }
                _ => {
                    return Err(self.fail(&format!("no answer to bridging host tap {}", t.name)));
                }
            }
        }
        Ok(())
    }

    /// The QEMU process's id.
    pub fn qemu_pid(&self) -> u32 {
        self.child.id()
    }

    /// The host directory holding this machine's sockets, logs and requests.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An error for `reason`, preferring the agent's own `FAIL:` line on the console (it cannot use the
    /// control port before the virtio modules are loaded).
    fn fail(&self, reason: &str) -> LaneError {
        let console = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let reason = console
            .lines()
            .find_map(|l| l.split_once("ember-lane-init: FAIL: ").map(|(_, r)| r.to_string()))
            .unwrap_or_else(|| reason.to_string());
        LaneError::OuterMachine { reason, log: console_tail(&self.dir) }
    }

    /// Waits for the next control message, until `deadline` or until QEMU goes away.
    fn wait(&mut self, deadline: Option<Instant>) -> Wait {
        let mut buf = [0u8; 256];
        loop {
            if let Some(line) = self.lines.next_line() {
                match AgentMessage::parse(&line) {
                    Some(m) => return Wait::Message(m),
                    None => {
                        log::debug!("lane: ignoring agent line {line:?}");
                        continue;
                    }
                }
            }
            let slice = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(Duration::from_millis(500)),
                    _ => return Wait::Deadline,
                },
                None => Duration::from_millis(500),
            };
            let _ = self.ctl.set_read_timeout(Some(slice));
            match self.ctl.read(&mut buf) {
                Ok(0) => return Wait::Gone,
                Ok(n) => self.lines.push(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    if !matches!(self.child.try_wait(), Ok(None)) {
                        return Wait::Gone;
                    }
                }
                Err(_) => return Wait::Gone,
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<(), LaneError> {
        self.ctl
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|source| LaneError::Io { what: "writing to the agent's control port".into(), source })
    }

    fn new_request(
        &mut self,
        program: &Path,
        inv: &Invocation,
        redirect_files: bool,
    ) -> Result<(u64, PathBuf), LaneError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        self.new_request_in(program, inv, redirect_files, &cwd)
    }

    fn new_request_in(
        &mut self,
        program: &Path,
        inv: &Invocation,
        redirect_files: bool,
        cwd: &Path,
    ) -> Result<(u64, PathBuf), LaneError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = self.dir.join("req").join(id.to_string());
        let io = |what: &'static str| move |source| LaneError::Io { what: what.into(), source };
        fs::create_dir_all(&req).map_err(io("creating a request dir"))?;
        let redirect = if redirect_files { Redirect::Files(&req) } else { Redirect::Inherit };
        let script = wire::render_run_script(cwd, &inv.env, program, &inv.args, redirect);
        fs::write(req.join("run.sh"), script).map_err(io("writing run.sh"))?;
        if redirect_files {
            fs::write(req.join("stdin"), &inv.stdin).map_err(io("writing the invocation's stdin"))?;
        }
        Ok((id, req))
    }

    /// Runs `program` with `inv` inside the machine. `Err(LaneError::Wedged)` means the agent did not
    /// answer in time (its `ping`s went unanswered for [`WEDGE_AFTER`], or the run outlived its timeout
    /// by [`AGENT_GRACE`]) and the machine must be discarded. `progress` gets the program's stderr as
    /// it is written, while it runs.
    pub fn run(
        &mut self,
        program: &Path,
        inv: &Invocation,
        timeout: Duration,
        mut progress: Option<super::Progress<'_>>,
    ) -> Result<Outcome, LaneError> {
        let (id, req) = self.new_request(program, inv, true)?;
        let start = Instant::now();
        self.send(&format!("run {id} {}", timeout.as_secs_f64().ceil().max(1.0) as u64))?;
        let deadline = start + timeout + AGENT_GRACE;
        let (mut last_ping, mut last_pong) = (Instant::now(), Instant::now());
        let mut seen = 0usize;
        let status = loop {
            match self.wait(Some((Instant::now() + Duration::from_secs(1)).min(deadline))) {
                Wait::Message(AgentMessage::Done { id: got, status }) if got == id => break status,
                Wait::Message(AgentMessage::Pong) => last_pong = Instant::now(),
                Wait::Message(other) => log::warn!("lane: unexpected agent message {other:?}"),
                Wait::Deadline => {
                    if Instant::now() >= deadline || last_pong.elapsed() > WEDGE_AFTER {
                        return Err(LaneError::Wedged { after: start.elapsed(), log: console_tail(&self.dir) });
                    }
                    if let Some(f) = progress.as_mut() {
                        // The request dir is a 9p share without caching: the bytes are here as written.
                        if let Ok(all) = fs::read(req.join("stderr"))
                            && all.len() > seen
                        {
                            f(&all[seen..]);
                            seen = all.len();
                        }
                    }
                    if last_ping.elapsed() >= PING_EVERY {
                        self.send("ping")?;
                        last_ping = Instant::now();
                    }
                }
                Wait::Gone => return Err(self.fail("the outer machine died during an invocation")),
            }
        };
        let elapsed = start.elapsed();
        let read = |name: &str| {
            fs::read(req.join(name))
                .map_err(|source| LaneError::Io { what: format!("reading the invocation's {name}"), source })
        };
        let (stdout, stderr) = (read("stdout")?, read("stderr")?);
        let _ = fs::remove_dir_all(&req);
        if status == STATUS_SIGKILL && elapsed + Duration::from_millis(500) >= timeout {
            return Err(LaneError::Timeout { after: timeout, stdout, stderr });
        }
        Ok(Outcome { status, stdout, stderr, elapsed })
    }

    /// The streamed-run port sets, for `lane::warm` to hand out (empty after the first call).
    pub(super) fn take_slots(&mut self) -> Vec<Slot> {
        std::mem::take(&mut self.slots)
    }

    /// A second handle on the control port, for a thread that only reads it.
    pub(super) fn ctl_reader(&self) -> Result<UnixStream, LaneError> {
        let s =
            self.ctl.try_clone().map_err(|source| LaneError::Io { what: "cloning the control port".into(), source })?;
        let _ = s.set_read_timeout(None);
        Ok(s)
    }

    /// Writes one line to the agent.
    pub(super) fn send_line(&mut self, line: &str) -> Result<(), LaneError> {
        self.send(line)
    }

    /// Writes `<lanedir>/req/<id>/run.sh` for a streamed run (stdio inherited from the agent's ports)
    /// that starts in `cwd`.
    pub(super) fn new_stream_request_in(
        &mut self,
        program: &Path,
        inv: &Invocation,
        cwd: &Path,
    ) -> Result<(u64, PathBuf), LaneError> {
        self.new_request_in(program, inv, false, cwd)
    }

    /// Whether QEMU is still running.
    pub(super) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills QEMU now (the machine is wedged or its owner is going away); sockets close, so every pump
    /// and reader sees EOF.
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Powers the machine off (killing it if it does not stop within a second) and removes its dir.
    pub fn shutdown(mut self) {
        self.shutdown_in_place();
    }

    fn shutdown_in_place(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            let _ = self.send("poweroff");
            let end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            stop_child(&mut self.child, keeper);
            let _ = fs::remove_dir_all(&self.dir);
            log::debug!("lane: outer machine stopped");
        }
    }
}

impl Drop for OuterMachine {
    fn drop(&mut self) {
        self.shutdown_in_place();
    }
}

fn qemu_command(config: &LaneConfig, a: &Artifacts, dir: &Path, slots: usize) -> Command {
    let rw: Vec<String> = config.writable.iter().map(|p| p.display().to_string()).collect();
    // loglevel=4: the outer kernel's errors and worse (a soft lockup, a hung task, an RCU stall, a
    // panic) land in console.log, whose tail a wedged or dead machine's error shows (#15).
    let mut append =
        format!("console=ttyS0 quiet loglevel=4 panic=-1 ember_lanedir={} ember_rw={}", dir.display(), rw.join(","));
    if config.window.is_some() {
        append.push_str(" ember_window=1");
    }
    let cached: Vec<String> = config.cached.iter().map(|p| p.display().to_string()).collect();
    if !cached.is_empty() {
        append.push_str(&format!(" ember_cached={}", cached.join(",")));
    }
    // A path the kernel command line cannot carry as one word gets no keeper (the lane still works);
    // `EMBER_LANE_KEEPER=0` turns it off, to measure what it saves.
    let keeper = config.keeper.as_ref().filter(|_| std::env::var_os("EMBER_LANE_KEEPER").is_none_or(|v| v != "0"));
    if let Some(k) = keeper.and_then(|k| k.to_str()).filter(|k| !k.contains(char::is_whitespace)) {
        append.push_str(&format!(" ember_keeper={k}"));
    }
    let mut cmd = Command::new(&a.qemu);
    // QEMU's own seccomp filter (#11: the helpers ember starts get the least they need). `on` denies
    // the syscalls a device model never needs (reboot, swapon, kexec, module loading, ...); on top,
    // `obsolete` (old calls), `elevateprivileges` (setuid and friends), `spawn` (fork/exec: taps are
    // opened with script=no, so QEMU starts nothing) and `resourcecontrol` (affinity, priorities).
    // QEMU stays root: its 9p shares (security_model=none) must read what the user names.
    cmd.args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", &config.cpu_model])
        .args(["-smp", &config.cpus.to_string(), "-m", &format!("{}M", config.memory_mib)])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initramfs)
        .args(["-append", &append])
        .args(["-serial", &format!("file:{}", dir.join("console.log").display())])
        // Port 0 is reserved for a console; then one control port and three per slot (at most 31).
        .args(["-device", &format!("virtio-serial-pci,max_ports={}", (2 + 3 * slots).clamp(8, 31))]);
    let mut port = |name: &str, extra: &str| {
        let path = dir.join(format!("{name}.sock"));
        cmd.args(["-chardev", &format!("socket,id={name},path={}{extra}", path.display())]);
        cmd.args(["-device", &format!("virtserialport,chardev={name},name=ember.{name}")]);
    };
    port("ctl", "");
    for k in 0..slots.min(9) {
        // The host closes an input port to give the guest EOF; QEMU then connects again.
        port(&format!("in{k}"), ",reconnect=1");
        port(&format!("out{k}"), "");
        port(&format!("err{k}"), "");
    }
    if let Some(sock) = &config.user_net {
        // A client of the host's passt; inside, /dev/virtio-ports/ember.net0 (lane init).
        cmd.args(["-chardev", &format!("socket,id=net0,path={}", sock.display())]);
        cmd.args(["-device", "virtserialport,chardev=net0,name=ember.net0"]);
    }
    let mut share = |path: &str, tag: &str, ro: bool| {
        let ro = if ro { ",readonly=on" } else { "" };
        cmd.args(["-virtfs", &format!("local,path={path},mount_tag={tag},security_model=none,multidevs=remap{ro}")]);
    };
    share("/", "hostroot", true);
    if !config.cached.is_empty() {
        // A virtio 9p channel serves one mount: the cached view needs its own device.
        share("/", "hostcache", true);
    }
    for (i, p) in rw.iter().enumerate() {
        share(p, &format!("rw{i}"), false);
    }
    share(&dir.display().to_string(), "lanework", false);
    if let Some(w) = &config.window {
        share(&w.display().to_string(), "window", false);
    }
    for (i, t) in config.host_taps.iter().enumerate() {
        // QEMU's option syntax escapes a comma by doubling it.
        let name = t.name.replace(',', ",,");
        cmd.args(["-netdev", &format!("tap,id=hn{i},ifname={name},script=no,downscript=no,vhost=off")]);
        cmd.args(["-device", &format!("virtio-net-pci,netdev=hn{i},mac={}", wire::outer_nic_mac(&t.name))]);
    }
    cmd
}

/// Refuses host taps the way ember's own open would (`host::tap::Tap::open`): without `,create`
/// the tap must exist (QEMU would silently create a fresh one), with `,create` it must not.
fn check_host_taps(config: &LaneConfig) -> Result<(), LaneError> {
    for t in &config.host_taps {
        if !tap::valid_name(&t.name) {
            return Err(TapError::BadName(t.name.clone()).into());
        }
        match (tap::interface_exists(&t.name), t.create) {
            (false, false) => return Err(TapError::Missing(t.name.clone()).into()),
            (true, true) => return Err(TapError::Exists(t.name.clone()).into()),
            _ => {}
        }
    }
    Ok(())
}

/// When QEMU died at start-up because it could not open a host tap, the error ember itself would give.
fn qemu_tap_error(config: &LaneConfig, dir: &Path) -> Option<TapError> {
    let log = fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
    config.host_taps.iter().find_map(|t| {
        let line = log.lines().find(|l| l.contains(&format!("({})", t.name)))?;
        let name = t.name.clone();
        if line.contains("busy") {
            Some(TapError::Busy(name))
        } else if line.contains("not permitted") || line.contains("denied") {
            let what = if t.create { "create" } else { "open" };
            Some(TapError::Permission { name, what })
        } else {
            None
        }
    })
}

/// Paths go into QEMU's comma-separated options and the space-separated kernel command line.
fn check_share_path(p: &Path) -> Result<(), LaneError> {
    let s = p.to_str().unwrap_or("");
    if !p.is_absolute() || s.is_empty() || s == "/" || s.contains([',', ' ', '\t', '\n', '"', '\'']) {
        return Err(LaneError::Unavailable(format!(
            "cannot share {} into the outer machine: it must be an absolute directory path other than / \
             without commas, quotes or spaces",
            p.display()
        )));
    }
    Ok(())
}

/// The thread QEMU was spawned from, and the sender whose drop ends it.
type Keeper = (mpsc::Sender<()>, JoinHandle<()>);

/// Spawns `cmd` from a thread that lives until the machine is stopped: PR_SET_PDEATHSIG fires when
/// the *thread* that forked the child exits, so QEMU dies with this process (also when a lane in a
/// `static` is never dropped, or a test panics) but not when the thread that started it ends.
fn spawn_kept(mut cmd: Command, qemu: &Path) -> Result<(Child, Keeper), LaneError> {
    let (child_tx, child_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let handle = thread::Builder::new()
        .name("ember-lane-qemu".into())
        .spawn(move || {
            let _ = child_tx.send(cmd.spawn());
            let _ = stop_rx.recv();
        })
        .map_err(|source| LaneError::Spawn { what: "the lane's keeper thread".into(), source })?;
    let spawned = child_rx.recv().unwrap_or_else(|_| Err(io::Error::other("keeper thread died")));
    match spawned {
        Ok(child) => Ok((child, (stop_tx, handle))),
        Err(source) => {
            drop(stop_tx);
            let _ = handle.join();
            Err(LaneError::Spawn { what: format!("{} (apt-get install -y qemu-system-x86)", qemu.display()), source })
        }
    }
}

fn stop_child(child: &mut Child, keeper: Keeper) {
    let _ = child.kill();
    let _ = child.wait();
    drop(keeper.0);
    let _ = keeper.1.join();
}

fn accept_until(l: &UnixListener, child: &mut Child, deadline: Instant, dir: &Path) -> Result<UnixStream, LaneError> {
    l.set_nonblocking(true).map_err(|source| LaneError::Io { what: "listener".into(), source })?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(LaneError::Io { what: "accepting QEMU's chardev connection".into(), source });
            }
        }
        if !matches!(child.try_wait(), Ok(None)) || Instant::now() > deadline {
            return Err(LaneError::OuterMachine {
                reason: "QEMU did not connect its chardev sockets (it exited or hung at startup)".into(),
                log: console_tail(dir),
            });
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Copies an output port to `to` until the end marker.
pub(super) fn pump_output(mut from: UnixStream, mut to: Box<dyn Write + Send>, marker: &[u8]) {
    let mut strip = MarkerStripper::new(marker);
    let mut buf = vec![0u8; 64 * 1024];
    while !strip.is_done() {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let pass = strip.feed(&buf[..n]);
                if !pass.is_empty() && to.write_all(&pass).and_then(|_| to.flush()).is_err() {
                    // The reader went away (e.g. `| head`): keep draining so the guest is not blocked.
                    to = Box::new(io::sink());
                }
            }
        }
    }
}

/// Copies `from` (the user's stdin) to the input port until EOF (then closes the port, which the guest sees
/// as EOF) or until `stop` becomes readable (the run is over).
///
/// QEMU drops a chardev connection as soon as it sees the peer hang up, discarding what it has not read
/// yet, and it reads only as much as the guest has buffers for. So after stdin's EOF the socket is
/// closed only once QEMU has taken every byte (the send queue, `SIOCOUTQ`, is empty); the guest then
/// reads the rest of the data before it sees EOF.
pub(super) fn pump_input(from: std::os::fd::RawFd, mut to: UnixStream, stop: fs::File) {
    let mut buf = vec![0u8; 64 * 1024];
    // Ready, or poll failed: either way the pump stops waiting.
    let stopped = |timeout: Duration| !matches!(crate::host::poll::poll_one(&stop, libc::POLLIN, Some(timeout)), Ok(0));
    loop {
        let mut fds = [
            libc::pollfd { fd: from, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents != 0 {
            // SAFETY: reads into a buffer we own, of the given length.
            let got = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
            if got == 0 {
                while unsent_bytes(&to) > 0 && !stopped(Duration::from_millis(2)) {}
                break;
            }
            if got < 0 || to.write_all(&buf[..got as usize]).is_err() {
                break;
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Bytes written to `s` that the peer has not read yet (0 on error).
fn unsent_bytes(s: &UnixStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r == 0 { n } else { 0 }
}

/// A pipe whose read end becomes readable (EOF) when the write end is dropped.
pub(super) fn stop_pipe() -> Result<(fs::File, fs::File), LaneError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(LaneError::Io { what: "pipe2".into(), source: io::Error::last_os_error() });
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (fs::File::from_raw_fd(fds[1]), fs::File::from_raw_fd(fds[0])) })
}

pub(super) fn end_marker() -> String {
    let mut bytes = [0u8; 16];
    if fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let t = now.map_or(0, |d| d.as_nanos()) ^ u128::from(std::process::id());
        bytes.copy_from_slice(&t.to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("ember-lane-end-{hex}")
}

/// `<tmp>/ember-lane-<pid>-<n>`, after removing dirs left by lanes of processes that are gone.
fn create_lane_dir() -> Result<PathBuf, LaneError> {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ember-lane-")) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = tmp.join(format!("ember-lane-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("req"))
        .map_err(|source| LaneError::Io { what: format!("creating {}", dir.display()), source })?;
    Ok(dir)
}

/// The last lines of the outer console and QEMU's own messages, for error reports.
pub(super) fn console_tail(dir: &Path) -> String {
    let mut out = String::new();
    for (name, title) in [("qemu.log", "QEMU"), ("console.log", "outer console")] {
        let text = fs::read_to_string(dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("TCG doesn't support requested feature")).collect();
        if !lines.is_empty() {
            out.push_str(&format!("--- {title} (last lines) ---\n"));
            for l in &lines[lines.len().saturating_sub(25)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}
