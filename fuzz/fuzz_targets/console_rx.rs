//! virtio-console's receive side behind the virtio-mmio transport: host
//! bytes (ember's piped stdin: a pipe read by `StdinSource`'s reader, here on
//! the fuzzing thread, `StdinSource::read_whole`: the whole input is in the
//! pipe before the device starts either way) into the `ember.stdin` port, and the control queues (virtio 1.2, 5.3.6.2),
//! driven by a driver whose every step comes from the input: receive chains
//! of 1-4 descriptors of any length and direction (some pointing outside
//! guest RAM), control receive buffers, control messages (DEVICE_READY,
//! PORT_READY, PORT_OPEN and others, for any port id), notifies of any queue,
//! and the host's "input arrived" event, in any order.
//!
//! Invariants, beyond "no panic", checked after every step:
//! - every used entry, on any queue, names a head the driver offered and has
//!   not had back yet (each chain comes back at most once);
//! - a used length never exceeds the chain's device-writable bytes;
//! - the bytes the guest receives on the stdin port are the host's bytes, in
//!   order, unchanged and at most once (a prefix of the input), as long as no
//!   chain pointed outside RAM (then the device drops that chain's bytes, as
//!   documented, and only lengths are checked);
//! - no byte arrives before the driver's PORT_OPEN 1 for the port was served,
//!   nor while its last served PORT_OPEN says closed (Linux discards them,
//!   virtio_console.c `in_intr`);
//! - the device's PORT_OPEN 0 for the stdin port comes once, after the
//!   driver's PORT_READY, and only when every host byte was delivered;
//!   DEVICE_ADD only after DEVICE_READY, PORT_NAME only after the port's
//!   PORT_READY and with the port's name.
#![no_main]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use ember::bus::BusDevice;
use ember::control::VmControl;
use ember::devices::irq::IrqLine;
use ember::host::serial_sink::StdoutSink;
use ember::host::stdin_source::StdinSource;
use ember::devices::virtio::console::{
    Console, Port, VIRTIO_CONSOLE_DEVICE_ADD, VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_PORT_READY,
};
use ember::devices::virtio::mmio::MmioTransport;
use ember::sandbox::SeccompMode;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest RAM: rings below `DATA_START` (one 4 KiB page per queue), buffers above.
const MEM_SIZE: u64 = 128 << 10;
const DATA_START: u64 = 0x8000;
/// An address no guest RAM has.
const OUTSIDE: u64 = 0x7fff_0000_0000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;

fn w(t: &mut MmioTransport, reg: u32, value: u32) {
    t.write(u64::from(reg), &value.to_le_bytes());
}

fn take(input: &mut &[u8], n: usize) -> u64 {
    let n = n.min(input.len());
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&input[..n]);
    *input = &input[n..];
    u64::from_le_bytes(b)
}

/// The driver's view of one queue.
struct Ring {
    size: u16,
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    /// Offered chains not yet returned: head -> (addr, len, writable) of each descriptor.
    outstanding: BTreeMap<u16, Vec<(u64, u32, bool)>>,
}

impl Ring {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x800
    }
    fn used(&self) -> u64 {
        self.base + 0xa00
    }

    /// Writes a chain into the descriptor table and offers it; None when the table is full.
    fn offer(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> Option<u16> {
        if descs.is_empty() || usize::from(self.next_desc) + descs.len() > usize::from(self.size) {
            return None;
        }
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == descs.len();
            let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let d = self.desc() + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(d)).expect("ring in RAM");
            mem.write_obj(len, GuestAddress(d + 8)).expect("ring in RAM");
            mem.write_obj(flags, GuestAddress(d + 12)).expect("ring in RAM");
            mem.write_obj(if last { 0 } else { idx + 1 }, GuestAddress(d + 14)).expect("ring in RAM");
        }
        self.next_desc += descs.len() as u16;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).expect("ring in RAM");
        self.avail_idx += 1;
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2)).expect("ring in RAM");
        self.outstanding.insert(head, descs.to_vec());
        Some(head)
    }

    /// New used entries since the last look: (descriptors of the chain, used length).
    fn new_used(&mut self, mem: &GuestMemoryMmap, q: usize) -> Vec<(Vec<(u64, u32, bool)>, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used() + 2)).expect("ring in RAM");
        let fresh = idx.wrapping_sub(self.used_seen);
        assert!(fresh <= self.avail_idx.wrapping_sub(self.used_seen), "queue {q}: used index {idx} runs ahead");
        let mut out = Vec::new();
        for i in 0..fresh {
            let e = self.used() + 4 + 8 * u64::from(self.used_seen.wrapping_add(i) % self.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).expect("ring in RAM");
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).expect("ring in RAM");
            let descs = u16::try_from(id)
                .ok()
                .and_then(|h| self.outstanding.remove(&h))
                .unwrap_or_else(|| panic!("queue {q}: used entry names head {id}, not offered or already returned"));
            let room: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            assert!(u64::from(len) <= room, "queue {q}: used length {len} > {room} writable bytes");
            out.push((descs, len));
        }
        self.used_seen = idx;
        out
    }
}

/// The first `len` bytes of a chain's writable buffers.
fn written(mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)], len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = len as usize;
    for &(addr, n, _) in descs.iter().filter(|d| d.2) {
        let k = left.min(n as usize);
        let mut b = vec![0u8; k];
        mem.read_slice(&mut b, GuestAddress(addr)).expect("a used buffer in RAM");
        out.extend(b);
        left -= k;
    }
    out
}

fn pipe() -> (OwnedFd, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh descriptors, owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    // SAFETY: fresh descriptors from pipe2, each owned once.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// What the host sends is a window (from the input's seed) of this: a
/// xorshift stream, so input delivered out of order, twice or shifted shows.
/// Built once.
fn host_bytes() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..(16 << 10) + 256)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    })
}

/// Guest RAM, mapped once and zeroed at the start of every run (cheaper than
/// a fresh mapping and its page faults each time); a run's transport holds a
/// clone only until the run ends.
fn guest_memory() -> GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    static ZEROS: [u8; MEM_SIZE as usize] = [0; MEM_SIZE as usize];
    let mem = MEM
        .get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory"));
    mem.write_slice(&ZEROS, GuestAddress(0)).expect("all of guest RAM");
    mem.clone()
}

/// The output ports' sinks (to /dev/null, their writer threads made once for
/// the process: this target offers nothing on their transmit queues, so they
/// never hold a byte from one run to the next).
fn output_sinks(control: &Arc<VmControl>, room: &Arc<EventFd>) -> &'static [StdoutSink; 2] {
    static SINKS: OnceLock<[StdoutSink; 2]> = OnceLock::new();
    SINKS.get_or_init(|| {
        ["fuzz-out", "fuzz-err"].map(|name| {
            let null = File::options().write(true).open("/dev/null").expect("/dev/null");
            StdoutSink::for_device(null.into(), control.clone(), SeccompMode::Off, name, room.clone())
                .expect("the writer thread")
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let shape = take(&mut input, 1) as u8;
    let seed = take(&mut input, 1) as u8;
    // Host input: at most one read(2) of the reader (16 KiB), so all of it is
    // buffered, and the end seen, before the driver starts.
    let host_len = take(&mut input, 2) as usize % (16 << 10);
    let host = &host_bytes()[usize::from(seed)..][..host_len];

    // Ports as ember makes them: stdin alone at port 0, or after stdout and stderr (port 2).
    let room = Arc::new(EventFd::new(EFD_NONBLOCK).expect("an eventfd"));
    let control = Arc::new(VmControl::new().expect("an eventfd"));
    let (r, mut wr) = pipe();
    wr.write_all(host).expect("the pipe takes 16 KiB");
    drop(wr);
    let source = StdinSource::read_whole(r, room.clone()).expect("the whole input fits the buffer");
    let mut ports = Vec::new();
    if shape & 1 != 0 {
        for (name, sink) in ["ember.stdout", "ember.stderr"].into_iter().zip(output_sinks(&control, &room)) {
            ports.push(Port::new(name, sink.clone()));
        }
    }
    let stdin_port = ports.len();
    ports.push(Port::input("ember.stdin", source));
    let names: Vec<&str> = ["ember.stdout", "ember.stderr", "ember.stdin"][3 - ports.len()..].to_vec();
    // The reader told the device: one event for the data (if any), one for the end.
    let want = if host.is_empty() { 1 } else { 2 };
    assert_eq!(room.read().unwrap_or(0), want, "the stdin reader's events");
    let _ = room.write(1); // what the event loop would have seen

    let mem = guest_memory();
    let queues = 2 * ports.len() + 2;
    let rx = if stdin_port == 0 { 0 } else { 2 * stdin_port + 2 };
    let mut t = MmioTransport::new(
        Box::new(Console::new(ports, room)),
        mem.clone(),
        IrqLine::Irqfd(EventFd::new(EFD_NONBLOCK).expect("an eventfd")),
    );
    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(&mut t, VIRTIO_MMIO_STATUS, status);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 1); // VIRTIO_CONSOLE_F_MULTIPORT (5.3.3)
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
    let mut rings = Vec::new();
    for q in 0..queues {
        let size = 1u16 << (take(&mut input, 1) % 8);
        let ring = Ring {
            size,
            base: 0x1000 * q as u64,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            outstanding: BTreeMap::new(),
        };
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, ring.desc() as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, ring.avail() as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, ring.used() as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        rings.push(ring);
    }
    w(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);

    let mut next_data = DATA_START;
    let mut alloc = |len: u32| {
        let at = next_data;
        next_data += u64::from(len);
        (next_data <= MEM_SIZE).then_some(at)
    };
    // What the driver did and learned.
    let mut delivered: Vec<u8> = Vec::new();
    let mut lost = false; // a chain pointed outside RAM: its bytes were dropped
    let mut device_ready_sent = false;
    let mut port_ready_sent = vec![false; names.len()];
    let mut served_ready = false; // the device served PORT_READY 1 for the stdin port
    let mut served_open = false; // the last PORT_OPEN for the stdin port the device served
    let mut closed_by_device = false;

    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        match op % 6 {
            0 => {
                // Receive buffers for the stdin port.
                let n = 1 + usize::from((op >> 3) % 4);
                let mut descs = Vec::new();
                for _ in 0..n {
                    let len = (take(&mut input, 2) % 4097) as u32;
                    let kind = take(&mut input, 1) as u8;
                    let addr = if kind % 8 == 0 { Some(OUTSIDE) } else { alloc(len) };
                    let Some(addr) = addr else { break };
                    descs.push((addr, len, kind % 8 != 1));
                }
                rings[rx].offer(&mem, &descs);
            }
            1 => {
                // A control receive buffer, big enough or not for a message.
                let len = (take(&mut input, 1) % 48) as u32;
                if let Some(addr) = alloc(len) {
                    rings[CONTROL_RX].offer(&mem, &[(addr, len, true)]);
                }
            }
            2 => {
                // A control message from the driver.
                let id = match (op >> 3) % 4 {
                    0 => stdin_port as u32,
                    1 => 0,
                    2 => take(&mut input, 1) as u32 % 4,
                    _ => take(&mut input, 4) as u32,
                };
                let event = match take(&mut input, 1) % 6 {
                    0 => VIRTIO_CONSOLE_DEVICE_READY,
                    1 => VIRTIO_CONSOLE_PORT_READY,
                    2 | 3 => VIRTIO_CONSOLE_PORT_OPEN,
                    4 => VIRTIO_CONSOLE_DEVICE_ADD,
                    _ => take(&mut input, 2) as u16,
                };
                let value = if op & 0x80 == 0 { 1 } else { take(&mut input, 2) as u16 };
                let mut msg = [0u8; 8];
                msg[..4].copy_from_slice(&id.to_le_bytes());
                msg[4..6].copy_from_slice(&event.to_le_bytes());
                msg[6..].copy_from_slice(&value.to_le_bytes());
                // Whole, or split over two descriptors (Linux sends it whole).
                let split = if op & 0x40 != 0 { take(&mut input, 1) as usize % 9 } else { 8 };
                let Some(addr) = alloc(8) else { continue };
                mem.write_slice(&msg, GuestAddress(addr)).expect("in RAM");
                let descs = if split == 8 {
                    vec![(addr, 8, false)]
                } else {
                    vec![(addr, split as u32, false), (addr + split as u64, 8 - split as u32, false)]
                };
                if rings[CONTROL_TX].offer(&mem, &descs).is_some() {
                    device_ready_sent |= event == VIRTIO_CONSOLE_DEVICE_READY && value == 1;
                    if event == VIRTIO_CONSOLE_PORT_READY && value == 1 && (id as usize) < names.len() {
                        port_ready_sent[id as usize] = true;
                    }
                }
            }
            3 => {
                let q = u32::from(op >> 3) % (queues as u32 + 1);
                w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, q);
            }
            4 => {
                t.host_event();
            }
            _ => {
                // Something for the stdout ports' transmit queues is not this
                // target's business; a notify of an unready or absent queue is.
                w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, take(&mut input, 2) as u32);
            }
        }

        // What the device did, in the order it does it: the control
        // messages it took, then input, then its own messages.
        // Within one step the device may serve the receive queue before or
        // after the control messages (a notify of the receive queue serves
        // it, then the control queues): the port must have been open at some
        // moment of the step.
        let mut open_in_step = served_open;
        for (descs, _) in rings[CONTROL_TX].new_used(&mem, CONTROL_TX) {
            let mut msg = Vec::new();
            for &(addr, len, _) in &descs {
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, GuestAddress(addr)).expect("in RAM");
                msg.extend(b);
            }
            if msg.len() == 8 && u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize == stdin_port {
                let (event, value) = (u16::from_le_bytes([msg[4], msg[5]]), u16::from_le_bytes([msg[6], msg[7]]));
                if event == VIRTIO_CONSOLE_PORT_OPEN {
                    served_open = value == 1;
                    open_in_step |= served_open;
                }
                served_ready |= event == VIRTIO_CONSOLE_PORT_READY && value == 1;
            }
        }
        for (descs, len) in rings[rx].new_used(&mem, rx) {
            if len > 0 {
                assert!(open_in_step, "input delivered while the guest has the port closed");
            }
            if descs.iter().any(|d| d.0 == OUTSIDE) {
                lost = true;
            }
            if !lost {
                delivered.extend(written(&mem, &descs, len));
                assert!(delivered.len() <= host.len(), "more bytes delivered than the host sent");
                assert!(delivered == host[..delivered.len()], "input reordered, changed or repeated");
            }
        }
        for (descs, len) in rings[CONTROL_RX].new_used(&mem, CONTROL_RX) {
            // Every message but PORT_NAME is 8 bytes (5.3.6.2).
            let m = written(&mem, &descs, len);
            let room: u32 = descs.iter().filter(|d| d.2).map(|d| d.1).sum();
            if m.len() < 8 {
                assert_eq!(len, room, "a control message cut short with room left");
                continue;
            }
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize;
            let (event, value) = (u16::from_le_bytes([m[4], m[5]]), u16::from_le_bytes([m[6], m[7]]));
            assert!(id < names.len(), "a message for port {id}, which does not exist");
            if event != VIRTIO_CONSOLE_PORT_NAME {
                assert_eq!(len, room.min(8), "a control message cut short or padded");
            }
            match event {
                VIRTIO_CONSOLE_DEVICE_ADD => assert!(device_ready_sent, "DEVICE_ADD before DEVICE_READY"),
                VIRTIO_CONSOLE_PORT_NAME => {
                    assert!(port_ready_sent[id], "PORT_NAME before PORT_READY");
                    let name = names[id].as_bytes();
                    assert_eq!(len, room.min(8 + name.len() as u32), "PORT_NAME cut short with room left");
                    let n = (m.len() - 8).min(name.len());
                    assert_eq!(&m[8..8 + n], &name[..n], "port {id}'s name");
                }
                VIRTIO_CONSOLE_PORT_OPEN if value == 0 => {
                    assert_eq!(id, stdin_port, "an output port closed");
                    assert!(served_ready, "the stdin port closed before its PORT_READY");
                    assert!(!closed_by_device, "the stdin port closed twice");
                    closed_by_device = true;
                    if !lost {
                        assert_eq!(delivered.len(), host.len(), "the port closed before every byte arrived");
                    }
                }
                VIRTIO_CONSOLE_PORT_OPEN => assert!(port_ready_sent[id], "PORT_OPEN 1 before PORT_READY"),
                e => panic!("the device sent control event {e}"),
            }
        }
    }
    drop(t);
});
