//! The host side of the console's `ember.stdin` port (devices/virtio/console.rs):
//! ember's stdin, read by a thread of its own into a bounded buffer that the
//! device empties into the guest's receive buffers.
//!
//! Why a port and not the serial line: when ember's stdin is a pipe or a file
//! (`cat data | ember run -- sort`), the guest command must get the bytes
//! unchanged and then end of file, as `docker run -i` gives a container. A tty
//! (the serial console) cannot do either: its line discipline turns `\r` into
//! `\n`, `^C` into SIGINT and `^D` into EOF only at the start of a line. A
//! virtio-console port passes bytes as they are, and when the host end closes
//! (VIRTIO_CONSOLE_PORT_OPEN 0, virtio 1.2 5.3.6.2) a guest read(2) that finds no
//! data returns 0 (Linux drivers/char/virtio_console.c, `port_fops_read`).
//!
//! Why a thread: stdin may be a regular file, which epoll refuses, and a
//! blocking read(2) works on anything. The thread never touches the guest: it
//! fills the buffer, waits while it is full, and writes the device's eventfd
//! when there is something new (data, or the end of the input).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::control::{StopReason, VmControl};
use crate::host::serial_sink::spawn_with_signals_blocked;
use crate::sandbox::{self, SeccompMode, ThreadKind};

/// Input read ahead of the guest before the reader waits.
const STDIN_BUFFER: usize = 64 << 10;

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// The input ended (EOF or a read error).
    eof: bool,
    /// The device is gone: the reader stops at its next look.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the device takes bytes (room for the reader).
    room: Condvar,
    /// Written when there is news for the device: data, or the end.
    news: Arc<EventFd>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Only this file's code holds the lock, and none of it panics while holding it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// ember's stdin as a source of bytes for a console port.
pub struct StdinSource {
    shared: Arc<Shared>,
}

impl StdinSource {
    /// Starts the reader thread on `fd` (in the sandbox unless `seccomp` is
    /// off); `news` is the console device's host eventfd.
    pub fn spawn(fd: OwnedFd, control: Arc<VmControl>, seccomp: SeccompMode, news: Arc<EventFd>) -> io::Result<Self> {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), room: Condvar::new(), news });
        let for_thread = shared.clone();
        spawn_with_signals_blocked("console-in", move || {
            if let Err(e) = sandbox::enter(ThreadKind::StdinCopy, seccomp) {
                control.stop(StopReason::EmberFailed(format!("the stdin thread: {e}")));
            }
            read_in(fd, &for_thread);
        })?;
        Ok(StdinSource { shared })
    }

    /// Reads `fd` to its end on the calling thread, with the reader [`StdinSource::spawn`] runs on
    /// its own, for an input that is already whole: a pipe whose writers are all closed, holding
    /// at most the 64 KiB the buffer takes (more would wait for room forever; refused). `news` is
    /// written as the thread would write it. For fuzz/console_rx, which makes thousands of
    /// sources a second: a thread each would cost more than the device it tests.
    pub fn read_whole(fd: OwnedFd, news: Arc<EventFd>) -> io::Result<Self> {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int, into `queued`.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if queued as usize > STDIN_BUFFER {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "more input than the buffer takes"));
        }
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), room: Condvar::new(), news });
        read_in(fd, &shared);
        Ok(StdinSource { shared })
    }

    /// Takes up to `max` buffered bytes.
    pub fn take(&self, max: usize) -> Vec<u8> {
        let mut s = self.shared.lock();
        let n = max.min(s.buf.len());
        // Copied a slice at a time rather than drained byte by byte.
        let (front, back) = s.buf.as_slices();
        let k = n.min(front.len());
        let mut out = Vec::with_capacity(n);
        out.extend_from_slice(&front[..k]);
        out.extend_from_slice(&back[..n - k]);
        s.buf.drain(..n);
        if n > 0 {
            self.shared.room.notify_all();
        }
        out
    }

    /// Whether bytes are waiting.
    pub fn has_data(&self) -> bool {
        !self.shared.lock().buf.is_empty()
    }

    /// The reader has seen the end of the input (bytes may still be waiting).
    #[cfg(test)]
    pub fn shared_eof_for_test(&self) -> bool {
        self.shared.lock().eof
    }

    /// The input has ended and every byte of it was taken.
    pub fn finished(&self) -> bool {
        let s = self.shared.lock();
        s.eof && s.buf.is_empty()
    }
}

impl Drop for StdinSource {
    fn drop(&mut self) {
        // A reader blocked in read(2) stays there until input or EOF comes;
        // it holds no guest state and ends with the process.
        self.shared.lock().closed = true;
        self.shared.room.notify_all();
    }
}

/// The reader thread: read, append, tell the device; wait while the buffer is full.
///
/// While it waits it also watches for a hang-up (POLLHUP): the Linux lane's
/// ports (lane/warm.rs) end a run's input by closing the host side, and QEMU
/// reconnects that side for the next run about a second later. A reader that
/// was waiting for room at that moment, not sitting in read(2), would miss the
/// end and wait forever. Once a hang-up was seen, the reader takes what is
/// left without blocking, and then ends the input.
fn read_in(fd: OwnedFd, shared: &Shared) {
    let mut chunk = vec![0u8; 16 << 10];
    let mut hung_up = false;
    loop {
        // Looked at before every read, not only while waiting: a reader whose
        // waits always end with room (the guest consuming quickly) would
        // otherwise never look, and could sleep through the whole hang-up.
        if !hung_up {
            hung_up = poll_now(&fd, 0).is_some_and(|r| r & libc::POLLHUP != 0);
        }
        if hung_up && poll_now(&fd, libc::POLLIN).is_none_or(|r| r & libc::POLLIN == 0) {
            return end(shared, None);
        }
        // SAFETY: reads into our own buffer from a descriptor this thread owns.
        let got = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if got < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if got <= 0 {
            return end(shared, (got < 0).then(io::Error::last_os_error));
        }
        let mut s = shared.lock();
        while s.buf.len() >= STDIN_BUFFER && !s.closed {
            let (guard, _) = shared.room.wait_timeout(s, HUP_POLL).unwrap_or_else(|p| p.into_inner());
            s = guard;
            if !hung_up {
                hung_up = poll_now(&fd, 0).is_some_and(|r| r & libc::POLLHUP != 0);
            }
        }
        if s.closed {
            return;
        }
        s.buf.extend(&chunk[..got as usize]);
        drop(s);
        let _ = shared.news.write(1);
    }
}

/// How often a reader waiting for room looks for a hang-up.
const HUP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// `fd`'s revents for `events` right now, without waiting; None on error.
fn poll_now(fd: &OwnedFd, events: libc::c_short) -> Option<libc::c_short> {
    crate::host::poll::poll_one(fd, events, Some(std::time::Duration::ZERO)).ok()
}

/// Marks the end of the input (after a read error, with a warning) and tells the device.
fn end(shared: &Shared, error: Option<io::Error>) {
    if let Some(e) = error {
        log::warn!("stdin: {e}; the guest sees the end of its input");
    }
    shared.lock().eof = true;
    let _ = shared.news.write(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn wait_for(what: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < end, "timed out");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn bytes_then_the_end_arrive_in_order_and_exact() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        let news = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let control = Arc::new(VmControl::new().unwrap());
        let src = StdinSource::spawn(r, control, SeccompMode::Off, news.clone()).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut w = w;
                w.write_all(&data).unwrap();
            })
        };
        let mut got = Vec::new();
        while !src.finished() {
            got.extend(src.take(4096));
            std::thread::sleep(Duration::from_micros(200));
        }
        writer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "every byte, in order, unchanged (\\r, ^C and ^D included)");
        assert!(news.read().unwrap() > 0, "the device was told");
    }

    #[test]
    fn an_empty_input_ends_at_once() {
        let fd = std::fs::File::open("/dev/null").unwrap();
        let news = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let src = StdinSource::spawn(fd.into(), Arc::new(VmControl::new().unwrap()), SeccompMode::Off, news).unwrap();
        wait_for(|| src.finished());
        assert!(!src.has_data());
    }
}
