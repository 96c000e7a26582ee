//! virtio-console with multiple ports (virtio 1.2, section 5.3): how the
//! guest command's stdout and stderr reach ember's stdout and stderr apart,
//! byte for byte, while the kernel's messages stay on the serial console.
//!
//! What the guest sees: a console device offering VIRTIO_CONSOLE_F_MULTIPORT
//! (5.3.3) with one port per host stream, named in the order given (ember:
//! port 0 `ember.stdout`, port 1 `ember.stderr`). Linux makes each a character
//! device /dev/vportNpM (drivers/char/virtio_console.c): not a tty, so no line
//! discipline touches the bytes, and its name is in
//! /sys/class/virtio-ports/vportNpM/name. The guest's init (guest-kernels/init)
//! opens them as the command's fds 1 and 2.
//!
//! Queues (5.3.2): port 0 receiveq 0 and transmitq 1; the control receiveq 2
//! (device -> driver) and transmitq 3 (driver -> device); port N >= 1 has
//! receiveq 2N+2 and transmitq 2N+3.
//!
//! The control protocol (5.3.6.2), as ember plays it:
//! - driver: VIRTIO_CONSOLE_DEVICE_READY -> device: VIRTIO_CONSOLE_DEVICE_ADD per port;
//! - driver: VIRTIO_CONSOLE_PORT_READY for a port -> device: VIRTIO_CONSOLE_PORT_NAME
//!   (the name follows the 8-byte header), then VIRTIO_CONSOLE_PORT_OPEN = 1 (the
//!   host end is open: Linux blocks writers until it is);
//! - driver: VIRTIO_CONSOLE_PORT_OPEN (the guest opened or closed the port): noted only.
//!
//! Data path of one write: the guest's write(2) on /dev/vport0p0 adds a chain
//! to transmitq 1 and notifies -> `event_loop.rs` (`Token::Queue`) -> `mmio.rs`
//! -> [`Console`] copies the readable bytes into the port's [`StdoutSink`]
//! (a writer thread on a copy of fd 1 or 2) -> add_used -> irqfd. The event
//! loop never waits on the host's output: when a sink is full the device
//! stops taking chains, and the sink's writer thread writes the device's
//! eventfd ([`VirtioDevice::host_fd`], `Token::Tap`) once it has room.
//! Receive queues are never filled (stdin stays on the serial line).
//!
//! At the end of the VM, `Vmm::run` serves the transmit queues once more, so
//! what the guest wrote just before it stopped the VM is not lost.
//!
//! Everything from the guest is untrusted: control messages for ports that do
//! not exist are ignored, a chain carries at most [`MAX_CHAIN_BYTES`] (the
//! rest is dropped with a warning), and broken chains make the device need a
//! reset (2.1.2), as in the other devices.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::block::{collect_chain, finish};
use super::{QueueOutcome, VirtioDevice, guest_warn};
use crate::devices::serial_sink::StdoutSink;

/// Feature bit: the device has multiple ports and a control queue pair (5.3.3).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1;
/// Control events (5.3.6.2; names of Linux's include/uapi/linux/virtio_console.h).
pub const VIRTIO_CONSOLE_DEVICE_READY: u16 = 0;
/// The device announces a port.
pub const VIRTIO_CONSOLE_DEVICE_ADD: u16 = 1;
/// The driver has set up a port.
pub const VIRTIO_CONSOLE_PORT_READY: u16 = 3;
/// One end of a port opened (value 1) or closed (value 0).
pub const VIRTIO_CONSOLE_PORT_OPEN: u16 = 6;
/// The device names a port; the name follows the header.
pub const VIRTIO_CONSOLE_PORT_NAME: u16 = 7;

/// Size of every queue.
pub const QUEUE_SIZE: u16 = 128;
/// Bytes of one chain passed on to the host (Linux writes at most 32 KiB a chain).
pub const MAX_CHAIN_BYTES: usize = 64 << 10;
/// Control receiveq index.
const CONTROL_RX: usize = 2;
/// Control transmitq index.
const CONTROL_TX: usize = 3;
/// Size of `struct virtio_console_control` (le32 id, le16 event, le16 value).
const CONTROL_LEN: usize = 8;

/// One port: its name in the guest and where its output goes.
pub struct Port {
    name: String,
    sink: StdoutSink,
}

impl Port {
    /// A port named `name` (e.g. `ember.stdout`) whose output goes to `sink`.
    pub fn new(name: &str, sink: StdoutSink) -> Port {
        Port { name: name.to_string(), sink }
    }
}

/// The multiport console device.
pub struct Console {
    ports: Vec<Port>,
    queue_sizes: Vec<u16>,
    /// Control messages waiting for a buffer on the control receiveq.
    pending: VecDeque<Vec<u8>>,
    /// Written by the ports' sinks when they have room again.
    room: Arc<EventFd>,
}

impl Console {
    /// A console with `ports` (port N is `ports[N]`); `room` is the eventfd
    /// their sinks were given ([`StdoutSink::for_device`]).
    pub fn new(ports: Vec<Port>, room: Arc<EventFd>) -> Console {
        let queue_sizes = vec![QUEUE_SIZE; 2 * ports.len().max(1) + 2];
        Console { ports, queue_sizes, pending: VecDeque::new(), room }
    }

    /// The transmit queue of port `p` (5.3.2).
    pub fn tx_queue(p: usize) -> usize {
        if p == 0 { 1 } else { 2 * p + 3 }
    }

    /// The port whose transmit queue is `index`, if it is one.
    fn tx_port(&self, index: usize) -> Option<usize> {
        let p = match index {
            1 => 0,
            i if i >= 5 && i % 2 == 1 => (i - 3) / 2,
            _ => return None,
        };
        (p < self.ports.len()).then_some(p)
    }

    fn control(&mut self, id: u32, event: u16, value: u16, extra: &[u8]) {
        let mut m = Vec::with_capacity(CONTROL_LEN + extra.len());
        m.extend_from_slice(&id.to_le_bytes());
        m.extend_from_slice(&event.to_le_bytes());
        m.extend_from_slice(&value.to_le_bytes());
        m.extend_from_slice(extra);
        self.pending.push_back(m);
    }

    /// Serves one message from the driver.
    fn handle_control(&mut self, msg: [u8; CONTROL_LEN]) {
        let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let event = u16::from_le_bytes([msg[4], msg[5]]);
        let value = u16::from_le_bytes([msg[6], msg[7]]);
        match event {
            VIRTIO_CONSOLE_DEVICE_READY if value == 1 => {
                for p in 0..self.ports.len() as u32 {
                    self.control(p, VIRTIO_CONSOLE_DEVICE_ADD, 0, &[]);
                }
            }
            VIRTIO_CONSOLE_DEVICE_READY => guest_warn!("virtio-console: the driver could not set up the device"),
            VIRTIO_CONSOLE_PORT_READY if (id as usize) < self.ports.len() => {
                if value == 1 {
                    let name = self.ports[id as usize].name.clone().into_bytes();
                    self.control(id, VIRTIO_CONSOLE_PORT_NAME, 1, &name);
                    self.control(id, VIRTIO_CONSOLE_PORT_OPEN, 1, &[]);
                } else {
                    guest_warn!("virtio-console: the driver could not add port {id}");
                }
            }
            VIRTIO_CONSOLE_PORT_OPEN if (id as usize) < self.ports.len() => {
                log::debug!("virtio-console: the guest {} port {id}", if value == 1 { "opened" } else { "closed" });
            }
            _ => guest_warn!("virtio-console: control message {event} for port {id} (value {value}): ignored"),
        }
    }

    /// Takes the driver's control messages from the control transmitq.
    fn process_control_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, ()> {
        let mut used = false;
        for _ in 0..queue.size() {
            let Some((head, descs)) = pop(queue, mem)? else { break };
            let mut msg = [0u8; CONTROL_LEN];
            let mut got = 0;
            for d in descs.iter().filter(|d| !d.is_write_only()) {
                let n = (d.len() as usize).min(CONTROL_LEN - got);
                if mem.read_slice(&mut msg[got..got + n], d.addr()).is_err() {
                    guest_warn!("virtio-console: control buffer outside guest RAM");
                    break;
                }
                got += n;
            }
            if got == CONTROL_LEN {
                self.handle_control(msg);
            } else {
                guest_warn!("virtio-console: control message of {got} bytes: ignored");
            }
            queue.add_used(mem, head, 0).map_err(|_| ())?;
            used = true;
        }
        Ok(used)
    }

    /// Hands pending control messages to the driver, one receive buffer each.
    fn process_control_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, ()> {
        let mut used = false;
        while let Some(msg) = self.pending.front() {
            let Some((head, descs)) = pop(queue, mem)? else { break };
            let mut written = 0usize;
            for d in descs.iter().filter(|d| d.is_write_only()) {
                let n = (d.len() as usize).min(msg.len() - written);
                if n == 0 || mem.write_slice(&msg[written..written + n], d.addr()).is_err() {
                    break;
                }
                written += n;
            }
            if written < msg.len() {
                guest_warn!("virtio-console: control receive buffer of {written} bytes is too small");
            }
            queue.add_used(mem, head, written as u32).map_err(|_| ())?;
            self.pending.pop_front();
            used = true;
        }
        Ok(used)
    }

    /// Moves port `p`'s output to its sink until the queue is empty, one
    /// queue's worth is served (`Ok(Some(true))`: more), or the sink is full
    /// (`Ok(Some(false))`: the sink's room event brings the device back).
    fn process_tx(&mut self, p: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        let mut used = false;
        let mut served = 0u16;
        let sink = &self.ports[p].sink;
        let more = loop {
            if queue.disable_notification(mem).is_err() {
                return QueueOutcome::NeedsReset;
            }
            let mut blocked = false;
            loop {
                if served >= queue.size() {
                    break;
                }
                if !sink.has_room() {
                    blocked = true;
                    break;
                }
                let (head, descs) = match pop(queue, mem) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(()) => return QueueOutcome::NeedsReset,
                };
                sink.push(&read_chain(&descs, mem));
                if queue.add_used(mem, head, 0).is_err() {
                    return QueueOutcome::NeedsReset;
                }
                used = true;
                served += 1;
            }
            if blocked {
                // Notifications stay off: the room event serves the queue next.
                return finish(queue, mem, used, false);
            }
            if served >= queue.size() {
                break true;
            }
            match queue.enable_notification(mem) {
                Ok(true) => {} // more arrived while notifications were off
                Ok(false) => break false,
                Err(_) => return QueueOutcome::NeedsReset,
            }
        };
        finish(queue, mem, used, more)
    }

    /// Serves the control queues: messages in, then pending messages out.
    fn process_control(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> QueueOutcome {
        let mut used = false;
        if let Some(q) = queues.get_mut(CONTROL_TX).filter(|q| q.ready()) {
            match self.process_control_tx(q, mem) {
                Ok(u) => used |= u,
                Err(()) => return QueueOutcome::NeedsReset,
            }
        }
        let mut rx_used = false;
        if let Some(q) = queues.get_mut(CONTROL_RX).filter(|q| q.ready()) {
            match self.process_control_rx(q, mem) {
                Ok(u) => rx_used = u,
                Err(()) => return QueueOutcome::NeedsReset,
            }
        }
        let wants = |q: Option<&mut Queue>, u: bool| u && q.is_some_and(|q| q.needs_notification(mem).unwrap_or(true));
        let tx = wants(queues.get_mut(CONTROL_TX), used);
        let rx = wants(queues.get_mut(CONTROL_RX), rx_used);
        if tx || rx { QueueOutcome::Interrupt } else { QueueOutcome::Quiet }
    }
}

/// The next available chain of `queue`, or None; Err for a broken ring or chain.
fn pop(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<(u16, Vec<Descriptor>)>, ()> {
    let chain = match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => {
            guest_warn!("virtio-console: available ring is broken: {e}");
            return Err(());
        }
    };
    let Some(chain) = chain else { return Ok(None) };
    let head = chain.head_index();
    match collect_chain(queue, mem, head) {
        Ok(descs) => Ok(Some((head, descs))),
        Err(e) => {
            guest_warn!("virtio-console: descriptor chain from head {head} {e}");
            Err(())
        }
    }
}

/// The readable bytes of a chain, at most [`MAX_CHAIN_BYTES`].
fn read_chain(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = Vec::new();
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let room = MAX_CHAIN_BYTES - out.len();
        let n = (d.len() as usize).min(room);
        if n < d.len() as usize {
            guest_warn!("virtio-console: a chain of more than {MAX_CHAIN_BYTES} bytes: the rest is dropped");
        }
        let start = out.len();
        out.resize(start + n, 0);
        if mem.read_slice(&mut out[start..], d.addr()).is_err() {
            guest_warn!("virtio-console: buffer at {:#x}+{n} is outside guest RAM", d.addr().0);
            out.truncate(start);
            break;
        }
        if out.len() == MAX_CHAIN_BYTES {
            break;
        }
    }
    out
}

/// The stronger of two outcomes, for a call that served several queues.
fn merge(a: QueueOutcome, b: QueueOutcome) -> QueueOutcome {
    use QueueOutcome::*;
    match (a, b) {
        (NeedsReset, _) | (_, NeedsReset) => NeedsReset,
        (More { interrupt: x }, More { interrupt: y }) => More { interrupt: x || y },
        (More { interrupt }, o) | (o, More { interrupt }) => More { interrupt: interrupt || o == Interrupt },
        (Interrupt, _) | (_, Interrupt) => Interrupt,
        (Quiet, Quiet) => Quiet,
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// `struct virtio_console_config` (5.3.4): cols, rows (unused without
    /// VIRTIO_CONSOLE_F_SIZE), max_nr_ports, emerg_wr (not offered).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).and_then(|o| config.get(o as usize)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("virtio-console: write to its configuration space at {offset:#x}: ignored");
    }

    fn activate(&mut self, _acked_features: u64) {}

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        match self.tx_port(index) {
            Some(p) => self.process_tx(p, queue, mem),
            // Receive queues: ember sends nothing; the control queues need
            // both of them (process_queues).
            None => QueueOutcome::Quiet,
        }
    }

    fn process_queues(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> QueueOutcome {
        match index {
            CONTROL_RX | CONTROL_TX => self.process_control(queues, mem),
            _ => match queues.get_mut(index) {
                Some(q) => self.process_queue(index, q, mem),
                None => QueueOutcome::Quiet,
            },
        }
    }

    fn reset(&mut self) {
        self.pending.clear();
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.room.as_raw_fd())
    }

    /// A sink made room: serve every port's transmit queue again.
    fn process_host_event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> QueueOutcome {
        let _ = self.room.read();
        let mut outcome = QueueOutcome::Quiet;
        for p in 0..self.ports.len() {
            if let Some(q) = queues.get_mut(Self::tx_queue(p)).filter(|q| q.ready()) {
                outcome = merge(outcome, self.process_tx(p, q, mem));
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::VmControl;
    use crate::devices::virtio::testutil::{self, DATA, desc, publish, used};
    use crate::sandbox::SeccompMode;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fresh descriptors, owned below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors from pipe2.
        unsafe { (std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn console() -> (Console, std::fs::File, StdoutSink) {
        let (r, w) = pipe();
        let room = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let control = Arc::new(VmControl::new().unwrap());
        let sink = StdoutSink::for_device(w, control, SeccompMode::Off, "test-out", room.clone()).unwrap();
        (Console::new(vec![Port::new("ember.stdout", sink.clone())], room), r, sink)
    }

    fn ctrl(id: u32, event: u16, value: u16) -> [u8; 8] {
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&event.to_le_bytes());
        m[6..].copy_from_slice(&value.to_le_bytes());
        m
    }

    #[test]
    fn queue_layout_and_config() {
        let (c, _r, _s) = console();
        assert_eq!(c.queue_max_sizes().len(), 4);
        assert_eq!(Console::tx_queue(0), 1);
        assert_eq!(Console::tx_queue(1), 5);
        assert_eq!(c.tx_port(1), Some(0));
        assert_eq!(c.tx_port(5), None, "port 1 does not exist here");
        assert_eq!(c.tx_port(3), None, "the control transmitq is no port's");
        let mut b = [0u8; 4];
        c.read_config(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "max_nr_ports");
        let mut far = [0xffu8; 2];
        c.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0, 0]);
        assert_ne!(c.features() & 1 << VIRTIO_CONSOLE_F_MULTIPORT, 0);
    }

    #[test]
    fn control_handshake_adds_names_and_opens_the_port() {
        let (mut c, _r, _s) = console();
        c.handle_control(ctrl(0, VIRTIO_CONSOLE_DEVICE_READY, 1));
        c.handle_control(ctrl(0, VIRTIO_CONSOLE_PORT_READY, 1));
        c.handle_control(ctrl(9, VIRTIO_CONSOLE_PORT_READY, 1)); // no such port
        let msgs: Vec<Vec<u8>> = c.pending.iter().cloned().collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0], ctrl(0, VIRTIO_CONSOLE_DEVICE_ADD, 0));
        assert_eq!(&msgs[1][..8], ctrl(0, VIRTIO_CONSOLE_PORT_NAME, 1));
        assert_eq!(&msgs[1][8..], b"ember.stdout");
        assert_eq!(msgs[2], ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1));

        // The messages go out one per receive buffer on the control receiveq.
        let mem = testutil::memory();
        let mut q = testutil::queue(16);
        let mut avail = 0;
        desc(&mem, 0, DATA, 64, W, 0);
        desc(&mem, 1, DATA + 0x100, 64, W, 0);
        publish(&mem, &mut avail, &[0, 1]);
        assert_eq!(c.process_control_rx(&mut q, &mem), Ok(true));
        let (idx, elems) = used(&mem);
        assert_eq!(idx, 2);
        assert_eq!(elems, vec![(0, 8), (1, 20)]);
        let mut name = [0u8; 12];
        mem.read_slice(&mut name, GuestAddress(DATA + 0x108)).unwrap();
        assert_eq!(&name, b"ember.stdout");
        assert_eq!(c.pending.len(), 1, "PORT_OPEN waits for the next buffer");
    }

    #[test]
    fn output_reaches_the_sink_byte_exact() {
        let (mut c, mut r, sink) = console();
        let mem = testutil::memory();
        let mut q = testutil::queue(16);
        let mut avail = 0;
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        desc(&mem, 0, DATA, 1000, 0, 0);
        desc(&mem, 1, DATA + 1000, 2000, 0, 0);
        publish(&mem, &mut avail, &[0, 1]);
        let outcome = c.process_queue(1, &mut q, &mem);
        assert!(matches!(outcome, QueueOutcome::Interrupt | QueueOutcome::Quiet));
        assert_eq!(used(&mem).0, 2);
        assert_eq!(sink.finish(false), 0);
        drop(c);
        drop(sink);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn merge_keeps_the_strongest() {
        use QueueOutcome::*;
        assert_eq!(merge(Quiet, Interrupt), Interrupt);
        assert_eq!(merge(More { interrupt: false }, Interrupt), More { interrupt: true });
        assert_eq!(merge(Quiet, NeedsReset), NeedsReset);
    }
}
