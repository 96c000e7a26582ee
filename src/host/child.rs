//! A helper process ember starts for one VM (passt for `--net user`, a
//! shared folder's file server), held through a pidfd (pidfd_open(2)).
//!
//! Why a pidfd and not `std::process::Child`: once set-up is done, the main
//! thread's seccomp filter (src/sandbox) lets it signal and reap only through
//! the pidfds it holds (`pidfd_send_signal` with SIGTERM, `waitid(P_PIDFD)`),
//! never `kill(2)` on a PID that might have been reused.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Child;

/// A child process, stopped (SIGTERM) and reaped when dropped.
pub struct ChildProcess {
    pid: u32,
    pidfd: OwnedFd,
}

impl ChildProcess {
    /// Takes over `child` (not yet reaped). On failure the child is killed and reaped.
    pub fn adopt(mut child: Child) -> io::Result<ChildProcess> {
        let pid = child.id();
        // SAFETY: pidfd_open on our own child, not yet reaped.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        // The Child handle is not needed any more: the pidfd stops and reaps.
        drop(child);
        // SAFETY: a fresh descriptor, owned from here on.
        Ok(ChildProcess { pid, pidfd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// The process ID (for messages).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGTERM (harmless once it has exited).
    pub fn terminate(&self) {
        // SAFETY: signals the process the pidfd refers to, our child.
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGTERM, std::ptr::null::<u8>(), 0)
        };
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.terminate();
        // SAFETY: reaps the process the pidfd refers to; `info` is ours to fill.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            loop {
                let r = libc::waitid(libc::P_PIDFD, self.pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED);
                if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_child_is_stopped_and_reaped() {
        let child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let p = ChildProcess::adopt(child).unwrap();
        let pid = p.pid();
        drop(p);
        // Reaped: the PID no longer names our child (waitpid says ECHILD).
        // SAFETY: waitpid with WNOHANG on a PID, no memory handed over.
        let r = unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(r, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::ECHILD));
    }
}
