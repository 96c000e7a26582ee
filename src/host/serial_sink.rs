//! The host side of COM1's output: where the bytes the guest writes to THR
//! go. The guest sees none of this (devices/serial.rs is the UART).
//!
//! - [`StdoutSink`]: stdout through a writer thread and a bounded buffer. A
//!   vCPU never sits in write(2) on stdout: when nobody reads the pipe
//!   (`ember run | sleep 60`), the vCPU waits for room in the buffer, which is
//!   backpressure the guest feels as a slow console, but it stops waiting the
//!   moment the VM is asked to stop (SIGTERM, Ctrl-a x) and drops what it was
//!   printing. A write(2) that blocks forever could not be interrupted: the
//!   vCPU would never leave it, and ember never exit.
//!
//! A virtio-console port (devices/virtio/console.rs) uses the same sink from
//! the event loop, which must never wait: it asks [`StdoutSink::has_room`]
//! before taking a buffer from the guest, and when there is none the writer
//! thread signals the device's eventfd once it has made room.
//!
//! With the command's output on console ports (`--output split`) the serial
//! console is not shown; [`ConsoleTail`] keeps its last bytes, which ember
//! prints on stderr only if the guest crashed (the panic report is there).
//!
//! `--serial file:PATH` is a plain file, which `SerialOutput` (serial.rs)
//! stops growing at [`SERIAL_FILE_LIMIT`] bytes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::control::{StopReason, VmControl};
use crate::sandbox::{self, SeccompMode, ThreadKind};

/// Guest output buffered for stdout before the guest has to wait.
const STDOUT_BUFFER: usize = 64 << 10;
/// How often a waiting vCPU looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// At exit, how long buffered output may go without any progress before it
/// is dropped (a reader that stopped reading must not keep ember alive).
const FLUSH_STALL: Duration = Duration::from_secs(2);
/// `--serial file:PATH` stops growing here (README, "Using it").
pub const SERIAL_FILE_LIMIT: u64 = 64 << 20;

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// The writer thread holds bytes taken from `buf` that are not written yet.
    in_flight: bool,
    /// The reader went away (EPIPE) or stdout failed: bytes are discarded.
    closed: bool,
    /// The VM is gone: the writer thread ends once `buf` is empty.
    shutdown: bool,
    /// Bytes written to stdout so far (progress, for the flush at exit).
    written: u64,
    /// A producer found no room ([`StdoutSink::has_room`]): signal `room` when there is.
    want_room: bool,
    /// [`StdoutSink::unbounded`] was called.
    unbounded: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every change: data, room, closed, shutdown.
    changed: Condvar,
    /// Written when room appears after a producer found none (a device's host eventfd).
    room: Option<Arc<EventFd>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Only this file's code holds the lock, and none of it panics while holding it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Spawns a helper thread that blocks every signal (a thread inherits the mask
/// it is spawned with): SIGTERM and SIGINT must reach the event loop's
/// signalfd, not kill ember through a thread that did not block them.
pub(crate) fn spawn_with_signals_blocked<F: FnOnce() + Send + 'static>(name: &str, f: F) -> io::Result<()> {
    // SAFETY: sigset manipulation on locals; pthread_sigmask on this thread,
    // restored right after the spawn.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned.map(drop)
}

/// Guest output to stdout (a duplicate of fd 1), written by its own thread.
#[derive(Clone)]
pub struct StdoutSink {
    shared: Arc<Shared>,
    control: Arc<VmControl>,
}

impl StdoutSink {
    /// Starts the writer thread on `fd`, in the sandbox unless `seccomp` is off;
    /// `control` tells a waiting vCPU to give up.
    pub fn new(fd: OwnedFd, control: Arc<VmControl>, seccomp: SeccompMode) -> io::Result<Self> {
        Self::spawn(fd, control, seccomp, "serial-out", None)
    }

    /// A sink for a device that never waits: `room` is written whenever
    /// [`StdoutSink::has_room`] said no and room has appeared since.
    pub fn for_device(
        fd: OwnedFd,
        control: Arc<VmControl>,
        seccomp: SeccompMode,
        thread_name: &str,
        room: Arc<EventFd>,
    ) -> io::Result<Self> {
        Self::spawn(fd, control, seccomp, thread_name, Some(room))
    }

    fn spawn(
        fd: OwnedFd,
        control: Arc<VmControl>,
        seccomp: SeccompMode,
        thread_name: &str,
        room: Option<Arc<EventFd>>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), changed: Condvar::new(), room });
        let for_thread = shared.clone();
        let stop = control.clone();
        spawn_with_signals_blocked(thread_name, move || {
            if let Err(e) = sandbox::enter(ThreadKind::SerialOut, seccomp) {
                stop.stop(StopReason::EmberFailed(format!("the serial output thread: {e}")));
            }
            write_out(File::from(fd), &for_thread)
        })?;
        Ok(StdoutSink { shared, control })
    }

    /// True when [`StdoutSink::push`] may take more bytes now (or the reader
    /// is gone and bytes are dropped anyway). When false, the room eventfd is
    /// written once the writer thread has taken the buffer.
    pub fn has_room(&self) -> bool {
        let mut s = self.shared.lock();
        if s.closed || s.unbounded || s.buf.len() < STDOUT_BUFFER {
            return true;
        }
        s.want_room = true;
        false
    }

    /// From now on [`StdoutSink::has_room`] always says yes: for the last
    /// drain of a device once the VM has stopped (the guest adds nothing more).
    pub fn unbounded(&self) {
        self.shared.lock().unbounded = true;
    }

    /// Queues `bytes` without waiting (the caller asked [`StdoutSink::has_room`]).
    pub fn push(&self, bytes: &[u8]) {
        let mut s = self.shared.lock();
        if !s.closed {
            s.buf.extend(bytes);
            self.shared.changed.notify_all();
        }
    }

    /// At the end of the VM: waits until what the guest printed is written,
    /// unless `drop_pending` (the user quit), or stdout makes no progress for
    /// [`FLUSH_STALL`]. Returns how many bytes were dropped.
    pub fn finish(&self, drop_pending: bool) -> usize {
        let mut s = self.shared.lock();
        s.shutdown = true;
        self.shared.changed.notify_all();
        let mut last = (s.written, Instant::now());
        while !drop_pending && !s.closed && (!s.buf.is_empty() || s.in_flight) {
            if s.written != last.0 {
                last = (s.written, Instant::now());
            } else if last.1.elapsed() >= FLUSH_STALL {
                break;
            }
            s = self.shared.changed.wait_timeout(s, STOP_POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
        let dropped = s.buf.len();
        s.buf.clear();
        dropped
    }
}

impl Write for StdoutSink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut s = self.shared.lock();
        while !s.closed && s.buf.len() + bytes.len() > STDOUT_BUFFER.max(bytes.len()) {
            if self.control.is_stopped() {
                // The stop wins over output nobody reads.
                return Ok(bytes.len());
            }
            s = self.shared.changed.wait_timeout(s, STOP_POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
        if !s.closed {
            s.buf.extend(bytes);
            self.shared.changed.notify_all();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread: moves `buf` to `out` until shutdown.
fn write_out(mut out: File, shared: &Shared) {
    let mut chunk = Vec::with_capacity(STDOUT_BUFFER);
    loop {
        {
            let mut s = shared.lock();
            while s.buf.is_empty() && !s.shutdown {
                s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.buf.is_empty() {
                return;
            }
            chunk.clear();
            chunk.extend(s.buf.drain(..));
            s.in_flight = true;
            if std::mem::take(&mut s.want_room)
                && let Some(room) = &shared.room
            {
                // A full counter (2^64-2 writes unread) is the only failure; one is enough.
                let _ = room.write(1);
            }
            shared.changed.notify_all();
        }
        let result = out.write_all(&chunk);
        let mut s = shared.lock();
        s.in_flight = false;
        match result {
            Ok(()) => s.written += chunk.len() as u64,
            Err(e) => {
                // A closed pipe (`ember run | head -1`) is not an error of the VM.
                if e.kind() != io::ErrorKind::BrokenPipe {
                    log::warn!("serial: cannot write the guest's output to stdout: {e}; the rest is dropped");
                }
                s.closed = true;
                s.buf.clear();
                if std::mem::take(&mut s.want_room)
                    && let Some(room) = &shared.room
                {
                    let _ = room.write(1);
                }
            }
        }
        shared.changed.notify_all();
    }
}

/// The last [`ConsoleTail::CAPACITY`] bytes of a console nobody is shown.
#[derive(Clone, Default)]
pub struct ConsoleTail {
    bytes: Arc<Mutex<VecDeque<u8>>>,
}

impl ConsoleTail {
    /// Bytes kept.
    pub const CAPACITY: usize = 16 << 10;

    /// What was kept, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let keep = &data[data.len().saturating_sub(Self::CAPACITY)..];
        let excess = (b.len() + keep.len()).saturating_sub(Self::CAPACITY);
        b.drain(..excess);
        b.extend(keep);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fresh descriptors, owned below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors from pipe2.
        unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_stalled_reader_does_not_hold_a_stopped_vm() {
        let (reader, w) = pipe();
        let control = Arc::new(VmControl::new().unwrap());
        let mut sink = StdoutSink::new(w, control.clone(), SeccompMode::On).unwrap();
        // Nobody reads: the pipe (64 KiB) and the buffer fill, then a write waits...
        let c = control.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.stop(crate::control::StopReason::UserQuit(libc::SIGTERM));
        });
        let start = Instant::now();
        for _ in 0..1024 {
            sink.write_all(&[b'x'; 1024]).unwrap();
        }
        // ...until the stop, after which output is dropped.
        assert!(control.is_stopped(), "1 MiB cannot fit; the writes ended because of the stop");
        assert!(start.elapsed() < Duration::from_secs(10));
        stopper.join().unwrap();
        assert!(sink.finish(true) > 0, "buffered output is dropped when the user quits");
        drop(reader);
    }

    #[test]
    fn the_console_tail_keeps_the_last_bytes() {
        let mut t = ConsoleTail::default();
        for i in 0..40_000u32 {
            t.write_all(format!("{}\n", i % 10).as_bytes()).unwrap();
        }
        let c = t.contents();
        assert_eq!(c.len(), ConsoleTail::CAPACITY);
        assert!(c.ends_with(b"8\n9\n"));
    }

    #[test]
    fn output_is_flushed_at_the_end() {
        let (mut reader, w) = pipe();
        let control = Arc::new(VmControl::new().unwrap());
        let mut sink = StdoutSink::new(w, control, SeccompMode::On).unwrap();
        let t = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        for i in 0..200u32 {
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert_eq!(sink.finish(false), 0);
        drop(sink);
        let all = String::from_utf8(t.join().unwrap()).unwrap();
        assert_eq!(all.lines().count(), 200);
        assert!(all.ends_with("line 199\n"));
    }
}
