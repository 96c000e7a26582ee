//! virtio-console with multiple ports (virtio 1.2, section 5.3): how the
//! guest command's stdout and stderr reach ember's stdout and stderr apart,
//! byte for byte, while the kernel's messages stay on the serial console.
//!
//! What the guest sees: a console device offering VIRTIO_CONSOLE_F_MULTIPORT
//! (5.3.3) with one port per host stream, named in the order given (ember:
//! port 0 `ember.stdout`, port 1 `ember.stderr`, and port 2 `ember.stdin` when
//! ember's stdin is not a terminal). Linux makes each a character
//! device /dev/vportNpM (drivers/char/virtio_console.c): not a tty, so no line
//! discipline touches the bytes, and its name is in
//! /sys/class/virtio-ports/vportNpM/name. The guest's init (guest-kernels/init)
//! opens them as the command's fds 1 and 2 (and 0).
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
//! - driver: VIRTIO_CONSOLE_PORT_OPEN (the guest opened or closed the port): noted only;
//! - device: VIRTIO_CONSOLE_PORT_OPEN = 0 for `ember.stdin` once ember's stdin has
//!   ended and the guest has every byte of it: the guest's read(2) then returns 0.
//!
//! Data path of one write: the guest's write(2) on /dev/vport0p0 adds a chain
//! to transmitq 1 and notifies -> `event_loop.rs` (`Token::Queue`) -> `mmio.rs`
//! -> [`Console`] copies the readable bytes into the port's [`StdoutSink`]
//! (a writer thread on a copy of fd 1 or 2) -> add_used -> irqfd. The event
//! loop never waits on the host's output: when a sink is full the device
//! stops taking chains, and the sink's writer thread writes the device's
//! eventfd ([`VirtioDevice::host_fd`], `Token::Tap`) once it has room.
//! Input takes the other direction: [`StdinSource`]'s thread reads stdin and
//! writes the same eventfd; the device copies what it has into the buffers the
//! guest posted on the stdin port's receiveq, and serves that queue again when
//! the guest posts more (`Token::Queue`). The other receive queues stay empty.
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
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{finish, merge, pop_chain};
use super::{QueueOutcome, VirtioDevice, guest_warn};
use crate::host::serial_sink::StdoutSink;
use crate::host::stdin_source::StdinSource;
use crate::snapshot::devices::{ConsolePortState, ConsoleState, DeviceState};

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
/// Longest port name a saved control message may carry (PORT_NAME's payload).
const MAX_PORT_NAME: usize = 256;

/// One port: its name in the guest, and where its bytes go or come from.
pub struct Port {
    name: String,
    end: PortEnd,
    /// The driver has set the port up (PORT_READY): control messages for it now reach it.
    ready: bool,
    /// A guest process has the port open (the driver's PORT_OPEN 1). Linux discards
    /// data that arrives on a closed port (virtio_console.c, `in_intr`), so input
    /// waits for this.
    guest_open: bool,
}

/// The host end of a port.
enum PortEnd {
    /// Guest output, to a sink.
    Out(StdoutSink),
    /// Guest input, from a source; `closed` once the guest was told it ended. No source yet: a
    /// VM saved for later (`ember run --save-snapshot`) has its input port unconnected, neither
    /// with data nor ended; a restore rebuilds the port with this run's stdin, or unconnected again.
    In { source: Option<StdinSource>, closed: bool },
}

impl Port {
    /// A port named `name` (e.g. `ember.stdout`) whose output goes to `sink`.
    pub fn new(name: &str, sink: StdoutSink) -> Port {
        Port { name: name.to_string(), end: PortEnd::Out(sink), ready: false, guest_open: false }
    }

    /// A port named `name` (`ember.stdin`) whose input comes from `source`.
    pub fn input(name: &str, source: StdinSource) -> Port {
        Port {
            name: name.to_string(),
            end: PortEnd::In { source: Some(source), closed: false },
            ready: false,
            guest_open: false,
        }
    }

    /// An input port named `name` with nothing connected yet.
    pub fn unconnected_input(name: &str) -> Port {
        Port {
            name: name.to_string(),
            end: PortEnd::In { source: None, closed: false },
            ready: false,
            guest_open: false,
        }
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

    /// The receive queue of port `p` (5.3.2).
    pub fn rx_queue(p: usize) -> usize {
        if p == 0 { 0 } else { 2 * p + 2 }
    }

    /// The input port whose receive queue is `index`, if it is one.
    fn rx_input_port(&self, index: usize) -> Option<usize> {
        let p = match index {
            0 => 0,
            i if i >= 4 && i % 2 == 0 => (i - 2) / 2,
            _ => return None,
        };
        self.ports.get(p).is_some_and(|port| matches!(port.end, PortEnd::In { .. })).then_some(p)
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
                    self.ports[id as usize].ready = true;
                    self.close_finished_input(id as usize);
                } else {
                    guest_warn!("virtio-console: the driver could not add port {id}");
                }
            }
            VIRTIO_CONSOLE_PORT_OPEN if (id as usize) < self.ports.len() => {
                log::debug!("virtio-console: the guest {} port {id}", if value == 1 { "opened" } else { "closed" });
                self.ports[id as usize].guest_open = value == 1;
            }
            _ => guest_warn!("virtio-console: control message {event} for port {id} (value {value}): ignored"),
        }
    }

    /// Takes the driver's control messages from the control transmitq.
    fn process_control_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, ()> {
        let mut used = false;
        for _ in 0..queue.size() {
            let Some((head, descs)) = pop_chain(queue, mem, "virtio-console")? else { break };
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
            let Some((head, descs)) = pop_chain(queue, mem, "virtio-console")? else { break };
            let mut written = 0usize;
            for d in descs.iter().filter(|d| d.is_write_only()) {
                let n = (d.len() as usize).min(msg.len() - written);
                // An empty buffer is skipped, not the end of the chain (2.7.4).
                if n == 0 {
                    continue;
                }
                if mem.write_slice(&msg[written..written + n], d.addr()).is_err() {
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
        let PortEnd::Out(sink) = &self.ports[p].end else { return QueueOutcome::Quiet };
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
                let (head, descs) = match pop_chain(queue, mem, "virtio-console") {
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

    /// Copies buffered input of port `p` into the guest's receive buffers
    /// until either runs out or one queue's worth is served; once the input
    /// has ended and every byte was delivered, queues PORT_OPEN 0 for the port.
    fn process_rx(&mut self, p: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        let Some(Port { end: PortEnd::In { source: Some(source), .. }, guest_open: true, .. }) = self.ports.get(p)
        else {
            // Not an input port, or nobody in the guest reads it yet: the
            // guest's PORT_OPEN brings the queue back (process_control).
            return QueueOutcome::Quiet;
        };
        let mut used = false;
        let mut served = 0u16;
        let more = loop {
            if queue.disable_notification(mem).is_err() {
                return QueueOutcome::NeedsReset;
            }
            while served < queue.size() && source.has_data() {
                let (head, descs) = match pop_chain(queue, mem, "virtio-console") {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(()) => return QueueOutcome::NeedsReset,
                };
                let room: usize = descs.iter().filter(|d| d.is_write_only()).map(|d| d.len() as usize).sum();
                let bytes = source.take(room.min(MAX_CHAIN_BYTES));
                let written = write_chain(&descs, mem, &bytes);
                if written < bytes.len() {
                    guest_warn!("virtio-console: a receive buffer is outside guest RAM: input dropped");
                }
                if queue.add_used(mem, head, written as u32).is_err() {
                    return QueueOutcome::NeedsReset;
                }
                used = true;
                served += 1;
            }
            if served >= queue.size() && source.has_data() {
                break true;
            }
            // Out of input or out of buffers: either way, the guest's next
            // buffer (a notification) or the next input (the eventfd) brings us back.
            match queue.enable_notification(mem) {
                Ok(true) if source.has_data() => {} // buffers arrived while notifications were off
                Ok(_) => break false,
                Err(_) => return QueueOutcome::NeedsReset,
            }
        };
        self.close_finished_input(p);
        finish(queue, mem, used, more)
    }

    /// Queues PORT_OPEN 0 for input port `p` once its input has ended, every
    /// byte was delivered and the driver knows the port (a message for a port
    /// it has not added yet would be dropped, virtio_console.c
    /// `handle_control_message`).
    fn close_finished_input(&mut self, p: usize) {
        if let Some(Port { end: PortEnd::In { source: Some(source), closed }, ready: true, .. }) = self.ports.get_mut(p)
            && !*closed
            && source.finished()
        {
            *closed = true;
            self.control(p as u32, VIRTIO_CONSOLE_PORT_OPEN, 0, &[]);
        }
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
        // An input port the guest just opened may have input waiting.
        let mut outcome = QueueOutcome::Quiet;
        for p in 0..self.ports.len() {
            if matches!(self.ports[p].end, PortEnd::In { .. })
                && self.ports[p].guest_open
                && let Some(q) = queues.get_mut(Self::rx_queue(p)).filter(|q| q.ready())
            {
                outcome = merge(outcome, self.process_rx(p, q, mem));
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
        merge(outcome, if tx || rx { QueueOutcome::Interrupt } else { QueueOutcome::Quiet })
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

/// Writes `bytes` into the write-only descriptors of a chain; returns how many fit.
///
/// An empty descriptor is skipped: the chain goes on after it (virtio 1.2,
/// 2.7.4, nothing forbids one), and stopping there dropped the bytes the
/// caller had already taken for the rest of the chain (found by
/// fuzz/console_rx).
fn write_chain(descs: &[Descriptor], mem: &GuestMemoryMmap, bytes: &[u8]) -> usize {
    let mut written = 0;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        if written == bytes.len() {
            break;
        }
        let n = (d.len() as usize).min(bytes.len() - written);
        if n == 0 {
            continue;
        }
        if mem.write_slice(&bytes[written..written + n], d.addr()).is_err() {
            break;
        }
        written += n;
    }
    written
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
        match (self.tx_port(index), self.rx_input_port(index)) {
            (Some(p), _) => self.process_tx(p, queue, mem),
            (None, Some(p)) => self.process_rx(p, queue, mem),
            // Other receive queues: ember sends nothing; the control queues
            // need both of them (process_queues).
            _ => QueueOutcome::Quiet,
        }
    }

    fn process_queues(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> QueueOutcome {
        match index {
            CONTROL_RX | CONTROL_TX => self.process_control(queues, mem),
            _ => {
                let Some(q) = queues.get_mut(index) else { return QueueOutcome::Quiet };
                let outcome = self.process_queue(index, q, mem);
                // Serving a receive queue may have queued the end of the input.
                if self.pending.is_empty() { outcome } else { merge(outcome, self.process_control(queues, mem)) }
            }
        }
    }

    fn reset(&mut self) {
        self.pending.clear();
    }

    fn save_state(&self) -> Option<DeviceState> {
        let ports = self
            .ports
            .iter()
            .map(|p| ConsolePortState {
                name: p.name.clone(),
                input: matches!(p.end, PortEnd::In { .. }),
                ready: p.ready,
                guest_open: p.guest_open,
                closed: matches!(p.end, PortEnd::In { closed: true, .. }),
            })
            .collect();
        Some(DeviceState::Console(ConsoleState { ports, pending: self.pending.iter().cloned().collect() }))
    }

    /// The rebuilt console must have the saved ports (names and directions, in order); the host
    /// ends are the new ones, the driver's view of each port the saved one.
    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        let Some(DeviceState::Console(s)) = state else {
            return Err("virtio-console: the snapshot holds no console state".into());
        };
        let same = s.ports.len() == self.ports.len()
            && s.ports
                .iter()
                .zip(&self.ports)
                .all(|(a, b)| a.name == b.name && a.input == matches!(b.end, PortEnd::In { .. }));
        if !same {
            let names = |v: Vec<&str>| v.join(", ");
            return Err(format!(
                "virtio-console: the snapshot's ports ({}) are not the rebuilt ones ({})",
                names(s.ports.iter().map(|p| p.name.as_str()).collect()),
                names(self.ports.iter().map(|p| p.name.as_str()).collect())
            ));
        }
        if s.pending.iter().any(|m| m.len() < CONTROL_LEN || m.len() > CONTROL_LEN + MAX_PORT_NAME) {
            return Err("virtio-console: a saved control message has an impossible size".into());
        }
        for (port, saved) in self.ports.iter_mut().zip(&s.ports) {
            port.ready = saved.ready;
            port.guest_open = saved.guest_open;
            if let PortEnd::In { closed, .. } = &mut port.end {
                *closed = saved.closed;
            }
        }
        self.pending = s.pending.iter().cloned().collect();
        Ok(())
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.room.as_raw_fd())
    }

    /// A sink made room or input arrived: serve every port's queue again.
    fn process_host_event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> QueueOutcome {
        let _ = self.room.read();
        let mut outcome = QueueOutcome::Quiet;
        for p in 0..self.ports.len() {
            let (index, input) = match self.ports[p].end {
                PortEnd::Out(_) => (Self::tx_queue(p), false),
                PortEnd::In { .. } => (Self::rx_queue(p), true),
            };
            if let Some(q) = queues.get_mut(index).filter(|q| q.ready()) {
                let served = if input { self.process_rx(p, q, mem) } else { self.process_tx(p, q, mem) };
                outcome = merge(outcome, served);
            }
        }
        if !self.pending.is_empty() {
            outcome = merge(outcome, self.process_control(queues, mem));
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
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

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
    fn input_waits_for_the_guest_then_arrives_exact_then_the_port_closes() {
        let (r, w) = pipe();
        let room = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let control = Arc::new(VmControl::new().unwrap());
        let source = StdinSource::spawn(OwnedFd::from(r), control, SeccompMode::Off, room.clone()).unwrap();
        let mut c = Console::new(vec![Port::input("ember.stdin", source)], room);
        assert_eq!(c.rx_input_port(0), Some(0));
        assert_eq!(c.tx_port(1), Some(0));
        let data = b"raw\r\x03\x04 bytes\n";
        std::fs::File::from(w).write_all(data).unwrap(); // and closes: the end of the input
        let PortEnd::In { source: Some(source), .. } = &c.ports[0].end else { unreachable!() };
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !source.has_data() || !source.shared_eof_for_test() {
            assert!(std::time::Instant::now() < end, "the reader thread never saw the input");
            std::thread::yield_now();
        }

        let mem = testutil::memory();
        let mut q = testutil::queue(16);
        let mut avail = 0;
        desc(&mem, 0, DATA, 8, W, 0);
        desc(&mem, 1, DATA + 0x100, 64, W, 0);
        publish(&mem, &mut avail, &[0, 1]);
        c.handle_control(ctrl(0, VIRTIO_CONSOLE_DEVICE_READY, 1));
        c.handle_control(ctrl(0, VIRTIO_CONSOLE_PORT_READY, 1));
        assert_eq!(c.process_queue(0, &mut q, &mem), QueueOutcome::Quiet, "nobody has the port open yet");
        assert_eq!(used(&mem).0, 0, "Linux would discard input on a closed port");
        assert!(!c.pending.iter().any(|m| m[..] == ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 0)));

        c.handle_control(ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1));
        c.process_queue(0, &mut q, &mem);
        let (idx, elems) = used(&mem);
        assert_eq!(idx, 2);
        assert_eq!(elems, vec![(0, 8), (1, data.len() as u32 - 8)]);
        let mut got = vec![0u8; data.len()];
        mem.read_slice(&mut got[..8], GuestAddress(DATA)).unwrap();
        mem.read_slice(&mut got[8..], GuestAddress(DATA + 0x100)).unwrap();
        assert_eq!(&got, data);
        assert_eq!(c.pending.back().map(|m| &m[..]), Some(&ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 0)[..]), "then the end");
    }

    #[test]
    fn an_empty_buffer_in_a_chain_loses_no_bytes() {
        let mem = testutil::memory();
        let bytes = b"0123456789";
        desc(&mem, 0, DATA, 4, W | NEXT, 1);
        desc(&mem, 1, DATA + 0x100, 0, W | NEXT, 2);
        desc(&mem, 2, DATA + 0x200, 64, W, 0);
        let mut q = testutil::queue(16);
        let mut avail = 0;
        publish(&mem, &mut avail, &[0]);
        let (_, descs) = pop_chain(&mut q, &mem, "test").unwrap().unwrap();
        assert_eq!(write_chain(&descs, &mem, bytes), bytes.len(), "the empty buffer ended the chain");
        let mut got = [0u8; 10];
        mem.read_slice(&mut got[..4], GuestAddress(DATA)).unwrap();
        mem.read_slice(&mut got[4..], GuestAddress(DATA + 0x200)).unwrap();
        assert_eq!(&got, bytes);

        // A control message, the same way.
        let (mut c, _r, _s) = console();
        c.handle_control(ctrl(0, VIRTIO_CONSOLE_DEVICE_READY, 1));
        let mut q = testutil::queue(16);
        let mut avail = 0;
        desc(&mem, 0, DATA, 0, W | NEXT, 1);
        desc(&mem, 1, DATA + 0x100, 8, W, 0);
        publish(&mem, &mut avail, &[0]);
        assert_eq!(c.process_control_rx(&mut q, &mem), Ok(true));
        assert_eq!(used(&mem).1, vec![(0, 8)], "the message was cut by the empty buffer");
    }

    /// A console with an output port and an unconnected input port, as a VM to be saved has.
    fn saved_kind() -> (Console, std::fs::File) {
        let (mut c, r, _s) = console();
        c.ports.push(Port::unconnected_input("ember.stdin"));
        c.queue_sizes = vec![QUEUE_SIZE; 2 * c.ports.len() + 2];
        (c, r)
    }

    #[test]
    fn state_round_trips_and_an_unconnected_input_neither_has_data_nor_ends() {
        let (mut c, _r) = saved_kind();
        c.handle_control(ctrl(0, VIRTIO_CONSOLE_DEVICE_READY, 1));
        c.handle_control(ctrl(1, VIRTIO_CONSOLE_PORT_READY, 1));
        c.handle_control(ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1));
        // Ready, but nothing connected: no PORT_OPEN 0 (end of input) is queued for it.
        assert_eq!(c.pending.len(), 2 + 2, "DEVICE_ADD per port, then PORT_NAME and PORT_OPEN 1 for port 1");
        let saved = c.save_state();
        assert!(saved.is_some(), "a console keeps state");
        let Some(DeviceState::Console(s)) = &saved else { unreachable!() };
        assert_eq!(
            s.ports[1],
            ConsolePortState { name: "ember.stdin".into(), input: true, ready: true, guest_open: false, closed: false }
        );
        assert!(s.ports[0].guest_open && !s.ports[0].ready);

        let (mut fresh, _r2) = saved_kind();
        fresh.restore_state(saved.as_ref()).unwrap();
        assert_eq!(fresh.save_state(), saved);
        // A restore with this run's stdin behind the port (here one that has ended): the end is
        // told to the guest, after the saved messages.
        let (mut fresh, _r3, _s3) = console();
        let (r, w) = pipe();
        drop(w);
        let control = Arc::new(VmControl::new().unwrap());
        let source = StdinSource::spawn(OwnedFd::from(r), control, SeccompMode::Off, fresh.room.clone()).unwrap();
        fresh.ports.push(Port::input("ember.stdin", source));
        fresh.restore_state(saved.as_ref()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while fresh.pending.len() == 4 && std::time::Instant::now() < deadline {
            fresh.close_finished_input(1);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(fresh.pending.back().map(|m| m[..8].to_vec()), Some(ctrl(1, VIRTIO_CONSOLE_PORT_OPEN, 0).to_vec()));
    }

    #[test]
    fn a_restore_refuses_other_ports_and_impossible_messages() {
        let (c, _r) = saved_kind();
        let saved = c.save_state();
        let (mut other, _r2, _s) = console();
        let err = other.restore_state(saved.as_ref()).unwrap_err();
        assert!(err.contains("ember.stdin"), "{err}");
        assert!(other.restore_state(None).is_err(), "a console without saved state");
        let Some(DeviceState::Console(mut s)) = saved else { unreachable!() };
        s.pending.push(vec![0; 3]);
        let (mut fresh, _r3) = saved_kind();
        assert!(fresh.restore_state(Some(&DeviceState::Console(s))).is_err());
    }
}
