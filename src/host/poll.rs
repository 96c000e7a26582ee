//! Waiting on one descriptor with poll(2) (POSIX poll, Linux poll(2)): for the threads that wait on a
//! single descriptor outside the event loop's epoll set (the stdin reader, the Linux lane's input
//! pump and warm daemon), where an epoll instance would be one more descriptor for one wait.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Waits until `fd` has one of `events` (POLLIN, ...; 0 asks only for POLLHUP and POLLERR, which
/// poll(2) always reports) or `timeout` passes (`None`: no limit). Returns the descriptor's revents,
/// 0 when the time ran out; EINTR is an error like any other, for the caller to retry or not.
pub fn poll_one(fd: &impl AsRawFd, events: libc::c_short, timeout: Option<Duration>) -> io::Result<libc::c_short> {
    let timeout_ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readable_times_out_and_hangs_up() {
        let (mut a, b) = UnixStream::pair().unwrap();
        assert_eq!(poll_one(&b, libc::POLLIN, Some(Duration::ZERO)).unwrap(), 0, "nothing to read yet");
        a.write_all(b"x").unwrap();
        assert_ne!(poll_one(&b, libc::POLLIN, None).unwrap() & libc::POLLIN, 0);
        drop(a);
        assert_ne!(poll_one(&b, 0, Some(Duration::from_millis(10))).unwrap() & libc::POLLHUP, 0);
    }
}
