//! Teardown: what is running now, so Ctrl-C and timeouts can kill it and clean up (process groups,
//! containers, cgroups, bundles), and no new launch starts after a Ctrl-C.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::runtimes::Cleanup;
use super::{oci, runtimes};

// ---------------------------------------------------------------------------------------------
// Teardown: what is running now, for Ctrl-C and timeouts.

pub(super) struct Active {
    pub(super) pid: Option<u32>,
    pub(super) cleanup: Cleanup,
    pub(super) deadline: Instant,
}

pub(super) static ACTIVE: Mutex<Option<HashMap<u64, Active>>> = Mutex::new(None);
pub(super) static SEQ: AtomicU64 = AtomicU64::new(0);
pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);
pub(super) static WORK_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Cgroup directories a runtime may create above the containers' cgroups (removed at the end).
pub(super) static CGROUP_PREFIXES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// After a Ctrl-C nothing new starts: the calling thread waits for the exit.
pub(super) fn stop_if_interrupted() {
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::park();
    }
}

pub(super) fn active() -> std::sync::MutexGuard<'static, Option<HashMap<u64, Active>>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn kill_and_clean(a: &Active) {
    if let Some(pid) = a.pid {
        // SAFETY: kill has no memory-safety preconditions; the group is the child's own.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
    if let Some(c) = &a.cleanup.container {
        runtimes::delete_container(c.runtime, &c.id);
    }
}

/// Blocks SIGINT/SIGTERM in this (the main) thread, so threads spawned later inherit it, and
/// starts the thread that waits for them and enforces timeouts. Children get an empty mask.
pub(super) fn install_signal_thread() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        loop {
            let ts = libc::timespec { tv_sec: 0, tv_nsec: 100_000_000 };
            // SAFETY: waits for the signals blocked above; no info struct requested.
            let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
            if sig > 0 {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("\nember bench: interrupted: tearing down what is running");
                let all: Vec<Active> = active().take().map(|m| m.into_values().collect()).unwrap_or_default();
                for a in &all {
                    kill_and_clean(a);
                }
                // Give the launching threads a moment to reap their children.
                std::thread::sleep(Duration::from_millis(200));
                for a in &all {
                    runtimes::finish(&a.cleanup);
                }
                for d in WORK_DIRS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    let _ = std::fs::remove_dir_all(d);
                }
                // Twice: a launch being prepared when the signal came may have made its cgroup since.
                for _ in 0..2 {
                    oci::sweep_cgroups(&oci::own_memory_cgroup(), &format!("ember-bench-{}-", std::process::id()));
                    std::thread::sleep(Duration::from_millis(100));
                }
                oci::remove_empty_dirs(&CGROUP_PREFIXES.lock().unwrap_or_else(|p| p.into_inner()));
                std::process::exit(128 + sig);
            }
            let now = Instant::now();
            if let Some(m) = active().as_mut() {
                for a in m.values_mut().filter(|a| a.deadline < now && a.pid.is_some()) {
                    log::warn!("bench: a launch passed its deadline: killing it");
                    kill_and_clean(a);
                    a.pid = None;
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
