//! The VMM's one event loop, on the main thread: epoll over every file
//! descriptor that can wake ember while the vCPUs run (KVM api.rst says nothing
//! here; this is plain Linux epoll(7)).
//!
//! Sources, named by [`Token`]: the stop eventfd (some thread ended the VM),
//! stdin (bytes for the guest's UART), the UART's "input drained" eventfd
//! (room in the receive FIFO again), a signalfd for SIGINT/SIGTERM/SIGHUP,
//! each virtqueue's ioeventfd, and each virtio-net device's tap
//! (edge-triggered: the device reads until the tap is empty or the guest has
//! no receive buffers; see devices/virtio/net.rs).
//!
//! Input flow control: host bytes are pushed into the 64-byte receive FIFO; what
//! does not fit waits in `pending`, and stdin is taken out of the epoll set
//! until the guest drains the FIFO, so a fast producer (`cat big | ember run`)
//! never loses a byte and never makes ember spin.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::console::Escape;
use crate::control::{StopReason, VmControl};
use crate::devices::serial::Serial;
use crate::devices::virtio::mmio::MmioTransport;
use crate::requests::Controller;
use crate::sandbox::{self, SeccompMode, ThreadKind};

/// Every event source the loop knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// `VmControl::stop_evt`.
    Stop,
    /// Host input for the UART.
    Stdin,
    /// The UART's receive FIFO was emptied.
    InputDrained,
    /// SIGINT, SIGTERM or SIGHUP arrived.
    Signal,
    /// The guest notified a virtqueue: entry N of the [`QueueEvent`] list.
    Queue(u32),
    /// A device's tap has frames: entry N of the [`TapEvent`] list.
    Tap(u32),
    /// A request from the API waits (requests.rs).
    Requests,
}

/// Epoll data of `Token::Queue(n)`: this bit plus n; the fixed tokens are 0..=3.
const QUEUE_TOKEN_BIT: u64 = 1 << 32;
/// Epoll data of `Token::Tap(n)`: this bit plus n.
const TAP_TOKEN_BIT: u64 = 1 << 33;

impl Token {
    fn to_u64(self) -> u64 {
        match self {
            Token::Stop => 0,
            Token::Stdin => 1,
            Token::InputDrained => 2,
            Token::Signal => 3,
            Token::Requests => 4,
            Token::Queue(n) => QUEUE_TOKEN_BIT | u64::from(n),
            Token::Tap(n) => TAP_TOKEN_BIT | u64::from(n),
        }
    }

    fn from_u64(v: u64) -> Option<Token> {
        match v {
            0 => Some(Token::Stop),
            1 => Some(Token::Stdin),
            2 => Some(Token::InputDrained),
            3 => Some(Token::Signal),
            4 => Some(Token::Requests),
            _ if v & QUEUE_TOKEN_BIT != 0 => u32::try_from(v & !QUEUE_TOKEN_BIT).ok().map(Token::Queue),
            _ if v & TAP_TOKEN_BIT != 0 => u32::try_from(v & !TAP_TOKEN_BIT).ok().map(Token::Tap),
            _ => None,
        }
    }
}

/// One virtqueue's notification: the ioeventfd KVM signals when the guest
/// writes the queue's index to VIRTIO_MMIO_QUEUE_NOTIFY, and who serves it.
pub struct QueueEvent {
    /// The ioeventfd (registered with KVM before the first KVM_RUN).
    pub evt: EventFd,
    /// The device's transport.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The queue index within the device.
    pub queue: u32,
}

/// A device's host descriptor (virtio-net's tap or frame stream), watched edge-triggered.
pub struct TapEvent {
    /// The descriptor (owned by the device, which lives as long as the transport).
    pub fd: RawFd,
    /// Report it becoming writable too (a frame stream holding a frame back).
    pub writable: bool,
    /// The device's transport.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Errors of the event loop itself (host failures).
#[derive(Debug, Error)]
pub enum EventLoopError {
    /// An epoll call failed.
    #[error("epoll failed")]
    Epoll(#[source] std::io::Error),
    /// The signalfd could not be created.
    #[error("cannot create a signalfd")]
    Signalfd(#[source] std::io::Error),
    /// The main thread could not enter its sandbox.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// The devices' event sources, and the API's requests if the VM has an API.
pub struct Sources<'a, 'b> {
    /// Each virtqueue's notification.
    pub queues: &'a [QueueEvent],
    /// Each virtio-net device's tap.
    pub taps: &'a [TapEvent],
    /// Requests to the VM (pause, resume, snapshot), served between two events.
    pub requests: Option<&'a mut Controller<'b>>,
}

/// Console input wiring for the loop.
pub struct ConsoleInput {
    /// The UART that receives the bytes.
    pub serial: Arc<Mutex<Serial>>,
    /// The descriptor to read host input from; None: only `prefill` (stdin goes elsewhere).
    pub fd: Option<RawFd>,
    /// Interpret `Ctrl-a x` (only on a terminal).
    pub escape: bool,
    /// The UART's drained eventfd.
    pub drained: Arc<EventFd>,
    /// Bytes to give the guest before anything read from `fd`.
    pub prefill: Vec<u8>,
}

/// The signals the loop turns into a clean stop. Block them in every thread
/// (call before spawning vCPUs) so they are only ever read from the signalfd.
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn signalfd(set: &libc::sigset_t) -> Result<OwnedFd, EventLoopError> {
    // SAFETY: creates a new descriptor from a valid sigset.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(EventLoopError::Signalfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a signalfd.
fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let n = unsafe { libc::read(fd.as_raw_fd(), &mut info as *mut _ as *mut libc::c_void, size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// If `fd` cannot be polled (a regular file, /dev/null), copy it through a pipe
/// from a helper thread, so the loop sees one kind of input.
fn pollable(epoll: &Epoll, fd: RawFd, seccomp: SeccompMode) -> Result<(RawFd, Option<OwnedFd>), EventLoopError> {
    let probe = EpollEvent::new(EventSet::IN, Token::Stdin.to_u64());
    match epoll.ctl(ControlOperation::Add, fd, probe) {
        Ok(()) => Ok((fd, None)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let mut fds = [0; 2];
            // SAFETY: pipe2 fills two new descriptors.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(EventLoopError::Epoll(std::io::Error::last_os_error()));
            }
            // SAFETY: both descriptors are fresh and owned here.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let src = fd;
            std::thread::spawn(move || {
                // Should the sandbox fail here, the copy is not made: the
                // guest sees an input that never comes, and the VM runs on.
                if let Err(e) = sandbox::enter(ThreadKind::StdinCopy, seccomp) {
                    log::warn!("stdin is not forwarded to the guest: {e}");
                    return;
                }
                let mut w = std::fs::File::from(w);
                // SAFETY: `src` is stdin (or the caller's fd), valid for the process lifetime;
                // ManuallyDrop keeps us from closing it.
                let mut input = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(src) });
                let _ = std::io::copy(&mut *input, &mut w);
            });
            epoll.ctl(ControlOperation::Add, r.as_raw_fd(), probe).map_err(EventLoopError::Epoll)?;
            Ok((r.as_raw_fd(), Some(r)))
        }
        Err(e) => Err(EventLoopError::Epoll(e)),
    }
}

/// Runs until the VM is asked to stop; returns why. Once every source is
/// registered, before the first event is served, the calling thread enters the
/// sandbox (`seccomp`) and calls `ready`.
pub fn run(
    control: &VmControl,
    console: Option<ConsoleInput>,
    signals: &libc::sigset_t,
    sources: Sources,
    seccomp: SeccompMode,
    ready: impl FnOnce(),
) -> Result<StopReason, EventLoopError> {
    let Sources { queues, taps, mut requests } = sources;
    let epoll = Epoll::new().map_err(EventLoopError::Epoll)?;
    let add = |fd: RawFd, t: Token| {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, t.to_u64())).map_err(EventLoopError::Epoll)
    };
    add(control.stop_evt.as_raw_fd(), Token::Stop)?;
    for (n, q) in queues.iter().enumerate() {
        // A count that piled up before this point is still there: nothing is lost.
        add(q.evt.as_raw_fd(), Token::Queue(n as u32))?;
    }
    for (n, t) in taps.iter().enumerate() {
        // Edge-triggered: a tap the device stopped reading (no receive
        // buffers) does not wake the loop again until a new frame arrives.
        let mut set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if t.writable {
            set |= EventSet::OUT;
        }
        let ev = EpollEvent::new(set, Token::Tap(n as u32).to_u64());
        epoll.ctl(ControlOperation::Add, t.fd, ev).map_err(EventLoopError::Epoll)?;
    }
    let sigfd = signalfd(signals)?;
    add(sigfd.as_raw_fd(), Token::Signal)?;
    if let Some(r) = &requests {
        add(r.fd(), Token::Requests)?;
    }
    // While the VM is paused (pause.rs) no queue or tap is served: their
    // events wait here, and are served at the resume.
    let mut paused = requests.as_ref().is_some_and(|r| r.paused());
    let mut deferred: Vec<Token> = Vec::new();

    let mut input_fd = None;
    let mut _pipe_keepalive = None;
    if let Some(c) = &console {
        add(c.drained.as_raw_fd(), Token::InputDrained)?;
        if let Some(fd) = c.fd {
            let (fd, pipe) = pollable(&epoll, fd, seccomp)?;
            input_fd = Some(fd);
            _pipe_keepalive = pipe;
        }
    }
    let mut stdin_polled = input_fd.is_some();
    let mut pending: VecDeque<u8> = console.as_ref().map(|c| c.prefill.iter().copied().collect()).unwrap_or_default();
    let mut escape = Escape::default();
    let mut events = vec![EpollEvent::default(); 8];
    // Queues and taps whose device stopped at its budget with work left
    // (`QueueOutcome::More`): served again after the next look at every other
    // source, so one busy queue cannot starve stdin, signals or other devices.
    let mut again: Vec<Token> = Vec::new();
    // Pending input could not be fed because a vCPU held the UART: retry soon.
    let mut feed_retry = !pending.is_empty();
    /// How soon a busy UART is tried again, in milliseconds.
    const FEED_RETRY_MS: i32 = 10;
    let mut buf = [0u8; 4096];
    let mut filtered = Vec::with_capacity(4096);
    sandbox::enter(ThreadKind::Main, seccomp)?;
    ready();

    loop {
        if control.is_stopped() {
            break;
        }
        // With work left over, only look: do not sleep.
        let timeout = match (again.is_empty(), feed_retry) {
            (false, _) => 0,
            (true, true) => FEED_RETRY_MS,
            (true, false) => -1,
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventLoopError::Epoll(e)),
        };
        let ready = events[..n].iter().map(|ev| Token::from_u64(ev.data()).ok_or(ev.data()));
        for token in ready.chain(std::mem::take(&mut again).into_iter().map(Ok)) {
            match token.ok() {
                Some(Token::Stop) => {
                    let _ = control.stop_evt.read();
                }
                Some(Token::Signal) => {
                    if let Some(sig) = read_signal(&sigfd) {
                        control.stop(StopReason::UserQuit(sig));
                    }
                }
                Some(Token::InputDrained) => {
                    if let Some(c) = &console {
                        let _ = c.drained.read();
                        feed_retry = !feed(c, &mut pending);
                        if pending.is_empty()
                            && !stdin_polled
                            && let Some(fd) = input_fd
                        {
                            add(fd, Token::Stdin)?;
                            stdin_polled = true;
                        }
                    }
                }
                Some(Token::Stdin) => {
                    let (Some(c), Some(fd)) = (&console, input_fd) else { continue };
                    // SAFETY: reads into our buffer from a readable descriptor.
                    let got = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                    if got < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    if got <= 0 {
                        // EOF (or an error) on input: the guest keeps running without it.
                        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        stdin_polled = false;
                        input_fd = None;
                        continue;
                    }
                    let got = &buf[..got as usize];
                    filtered.clear();
                    if c.escape {
                        if escape.filter(got, &mut filtered) {
                            control.stop(StopReason::UserQuit(0));
                        }
                    } else {
                        filtered.extend_from_slice(got);
                    }
                    pending.extend(filtered.iter());
                    feed_retry = !feed(c, &mut pending);
                    if !pending.is_empty() {
                        // Wait for the guest to drain the FIFO before reading more.
                        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        stdin_polled = false;
                    }
                }
                Some(Token::Requests) => {
                    if let Some(r) = requests.as_deref_mut() {
                        r.serve();
                        let now = r.paused();
                        if paused && !now {
                            again.append(&mut deferred);
                        }
                        paused = now;
                    }
                }
                Some(t @ (Token::Queue(_) | Token::Tap(_))) if paused => {
                    if let Token::Queue(n) = t
                        && let Some(q) = queues.get(n as usize)
                    {
                        let _ = q.evt.read();
                    }
                    if !deferred.contains(&t) {
                        deferred.push(t);
                    }
                }
                Some(Token::Queue(n)) => {
                    let Some(q) = queues.get(n as usize) else { continue };
                    // One read takes every notify since the last one: the
                    // device serves the queue below, up to its budget.
                    let _ = q.evt.read();
                    let Some(mut transport) = lock_or_stop(&q.transport, control) else { continue };
                    if transport.notify(q.queue) && !again.contains(&Token::Queue(n)) {
                        again.push(Token::Queue(n));
                    }
                }
                Some(Token::Tap(n)) => {
                    let Some(t) = taps.get(n as usize) else { continue };
                    let Some(mut transport) = lock_or_stop(&t.transport, control) else { continue };
                    if transport.host_event() && !again.contains(&Token::Tap(n)) {
                        again.push(Token::Tap(n));
                    }
                }
                None => log::warn!("event loop: unknown token {:?}", token),
            }
        }
        if feed_retry && let Some(c) = &console {
            feed_retry = !feed(c, &mut pending);
            if pending.is_empty()
                && !stdin_polled
                && let Some(fd) = input_fd
            {
                add(fd, Token::Stdin)?;
                stdin_polled = true;
            }
        }
    }
    Ok(control.reason().unwrap_or(StopReason::EmberFailed("the VM stopped without a reason".into())))
}

/// Locks a device's transport; a poisoned lock (the device panicked in a
/// vCPU thread, which stopped the VM) stops the VM here too instead of
/// panicking the event loop (see `Bus::lock`).
fn lock_or_stop<'a>(m: &'a Mutex<MmioTransport>, control: &VmControl) -> Option<MutexGuard<'a, MmioTransport>> {
    match m.lock() {
        Ok(guard) => Some(guard),
        Err(_) => {
            control.stop(StopReason::EmberFailed("a virtio device failed (it panicked): the VM cannot go on".into()));
            None
        }
    }
}

/// Moves as many pending bytes as fit into the UART. Returns false if a vCPU
/// holds the UART: it may be waiting for room to print (stdout not read,
/// host/serial_sink.rs), and the loop must never wait for it, or it would
/// not hear the signal or the `Ctrl-a x` that ends that wait. It tries again
/// shortly.
fn feed(c: &ConsoleInput, pending: &mut VecDeque<u8>) -> bool {
    if pending.is_empty() {
        return true;
    }
    let mut serial = match c.serial.try_lock() {
        Ok(serial) => serial,
        Err(TryLockError::WouldBlock) => return false,
        // A vCPU panicked inside the UART: it stopped the VM (vcpu.rs); the input is moot.
        Err(TryLockError::Poisoned(_)) => {
            pending.clear();
            return true;
        }
    };
    let room = serial.input_room().min(pending.len());
    if room == 0 {
        return true;
    }
    let chunk: Vec<u8> = pending.drain(..room).collect();
    let taken = serial.enqueue_input(&chunk);
    // Put back what the UART refused, in order.
    for b in chunk[taken..].iter().rev() {
        pending.push_front(*b);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Stop,
            Token::Stdin,
            Token::InputDrained,
            Token::Signal,
            Token::Requests,
            Token::Queue(0),
            Token::Queue(u32::MAX),
            Token::Tap(0),
            Token::Tap(7),
        ] {
            assert_eq!(Token::from_u64(t.to_u64()), Some(t));
        }
        assert_eq!(Token::from_u64(5), None);
    }
}
