//! A Docker engine for `ember bench`: the one that is already reachable, or,
//! when none is and dockerd is installed, ember bench's own, started on a
//! private socket with private data and exec roots and stopped when the tier
//! ends. It gets no network of its own (`--bridge none`, no iptables rules):
//! the bench runs every container with `--network none`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `DOCKER_HOST` of ember bench's own engine, once started.
static OWN_HOST: OnceLock<String> = OnceLock::new();

/// A `docker` command talking to the engine the bench uses.
pub fn docker() -> Command {
    let mut c = Command::new("docker");
    if let Some(h) = OWN_HOST.get() {
        c.env("DOCKER_HOST", h);
    }
    c
}

fn engine_answers() -> bool {
    docker().arg("info").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// ember bench's own dockerd; stopped (and its files removed) on drop.
pub struct OwnEngine {
    child: Child,
    dir: PathBuf,
}

impl Drop for OwnEngine {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes sure an engine answers: Ok(None) when one already did, Ok(Some) for
/// one started here, Err(why) when there is none to be had.
pub fn ensure(work: &std::path::Path) -> Result<Option<OwnEngine>, String> {
    if Command::new("docker").arg("--version").output().is_err() {
        return Err("docker not installed".into());
    }
    if engine_answers() {
        return Ok(None);
    }
    if Command::new("dockerd").arg("--version").output().is_err() {
        return Err("no engine, and no dockerd to start one (apt-get install docker.io)".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("no engine (starting one needs root)".into());
    }
    let dir = work.join("dockerd");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let sock = dir.join("docker.sock");
    let log = std::fs::File::create(dir.join("log")).map_err(|e| format!("dockerd log: {e}"))?;
    let child = Command::new("dockerd")
        .arg("--host")
        .arg(format!("unix://{}", sock.display()))
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("pid"))
        .args(["--bridge", "none", "--iptables=false", "--ip-masq=false", "--userland-proxy=false"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start dockerd: {e}"))?;
    let _ = OWN_HOST.set(format!("unix://{}", sock.display()));
    let mut engine = OwnEngine { child, dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if engine_answers() {
            return Ok(Some(engine));
        }
        if let Ok(Some(status)) = engine.child.try_wait() {
            let log = std::fs::read_to_string(engine.dir.join("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(format!("dockerd exited ({status}): {}", tail.join(" | ")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err("dockerd did not answer within 60 s".into())
}
