//! virtio-rng and virtio-net behind the virtio-mmio transport, over guest
//! memory built from the input (as fuzz_targets/virtio_blk.rs): the driver's
//! setup with queue sizes and ring addresses from the input, then notifies
//! of every queue, and for virtio-net frames arriving on the "tap" (one end
//! of a SOCK_SEQPACKET pair, as in the device's unit tests).
//!
//! Invariants, beyond "no panic": every used-ring entry names a chain head
//! the driver offered in its available ring, and the device never returns
//! more chains than were offered; virtio-rng never reports more than
//! `MAX_BYTES_PER_REQUEST` bytes for one request; virtio-net never puts more
//! than one frame's worth on the tap per transmitted chain.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;

use ember::bus::BusDevice;
use ember::devices::irq::IrqLine;
use ember::host::net_backend::NetBackend;
use ember::host::tap::Tap;
use ember::devices::virtio::mmio::MmioTransport;
use ember::devices::virtio::net::Net;
use ember::devices::virtio::rng::{MAX_BYTES_PER_REQUEST, Rng};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest RAM: 256 KiB, the input copied in from address 0.
const MEM_SIZE: usize = 256 << 10;

fn w(t: &mut MmioTransport, reg: u32, value: u32) {
    t.write(u64::from(reg), &value.to_le_bytes());
}

/// A queue as the driver set it up.
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    fn from_input(data: &[u8], at: usize) -> Ring {
        let word = |i: usize| u32::from_le_bytes([data[at + i], data[at + i + 1], data[at + i + 2], data[at + i + 3]]);
        Ring {
            size: 1 << (data[at] % 9),
            desc: u64::from((word(1) % MEM_SIZE as u32) & !15),
            avail: u64::from((word(5) % MEM_SIZE as u32) & !1),
            used: u64::from((word(9) % MEM_SIZE as u32) & !3),
        }
    }

    fn regions(&self) -> [(u64, u64); 3] {
        let n = u64::from(self.size);
        [(self.desc, self.desc + 16 * n), (self.avail, self.avail + 6 + 2 * n), (self.used, self.used + 6 + 8 * n)]
    }

    /// The descriptor table as it stands: (addr, len, flags, next) of each
    /// entry, read once (a walk per chain reading guest memory link by link
    /// cost more than the device); an entry outside RAM reads as
    /// (0, 0, 0, u16::MAX), what a failed read of each field gave.
    fn table(&self, mem: &GuestMemoryMmap) -> Vec<(u64, u32, u16, u16)> {
        let n = usize::from(self.size);
        let mut raw = vec![0u8; 16 * n];
        let whole = mem.read_slice(&mut raw, GuestAddress(self.desc)).is_ok();
        (0..n)
            .map(|i| {
                let d = &mut raw[16 * i..16 * i + 16];
                if !whole && mem.read_slice(d, GuestAddress(self.desc + 16 * i as u64)).is_err() {
                    return (0, 0, 0, u16::MAX);
                }
                let d = &*d;
                (
                    u64::from_le_bytes(d[..8].try_into().expect("8 bytes")),
                    u32::from_le_bytes(d[8..12].try_into().expect("4 bytes")),
                    u16::from_le_bytes([d[12], d[13]]),
                    u16::from_le_bytes([d[14], d[15]]),
                )
            })
            .collect()
    }

    /// Device-writable buffers of the chains at `heads` (a walk of the
    /// descriptor table as the driver wrote it, at most `size` links each;
    /// each distinct head walked once: the same walk gives the same buffers).
    fn writable(&self, mem: &GuestMemoryMmap, heads: &[u16]) -> Vec<(u64, u64)> {
        let table = self.table(mem);
        let mut walked = vec![false; usize::from(self.size)];
        let mut out = Vec::new();
        for &h in heads {
            if h >= self.size || std::mem::replace(&mut walked[usize::from(h)], true) {
                continue;
            }
            let mut i = h;
            for _ in 0..self.size {
                if i >= self.size {
                    break;
                }
                let (addr, len, flags, next) = table[usize::from(i)];
                if flags & 2 != 0 {
                    out.push((addr, addr.saturating_add(u64::from(len))));
                }
                if flags & 1 == 0 {
                    break;
                }
                i = next;
            }
        }
        out
    }

    /// Chain heads offered (available ring entries up to its index), if the index is sane.
    fn offered(&self, mem: &GuestMemoryMmap) -> Option<Vec<u16>> {
        let idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).ok()?;
        if idx > self.size {
            return None;
        }
        // One read of the entries: it fails exactly when one of them lies outside RAM.
        let mut raw = vec![0u8; 2 * usize::from(idx)];
        mem.read_slice(&mut raw, GuestAddress(self.avail + 4)).ok()?;
        Some(raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
    }

    /// (head, len) of each used entry.
    fn used_entries(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0);
        let n = usize::from(idx.min(self.size));
        let mut raw = vec![0u8; 8 * n];
        if mem.read_slice(&mut raw, GuestAddress(self.used + 4)).is_ok() {
            return raw
                .chunks_exact(8)
                .map(|e| (u32::from_le_bytes([e[0], e[1], e[2], e[3]]), u32::from_le_bytes([e[4], e[5], e[6], e[7]])))
                .collect();
        }
        (0..n as u64)
            .map(|i| {
                let e = self.used + 4 + 8 * i;
                (mem.read_obj(GuestAddress(e)).unwrap_or(u32::MAX), mem.read_obj(GuestAddress(e + 4)).unwrap_or(0))
            })
            .collect()
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 40 {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(&data[..data.len().min(MEM_SIZE)], GuestAddress(0)).expect("in range");
    let net = data[0] & 1 != 0;
    let mut peer = None;
    let (device, queues): (Box<dyn ember::devices::virtio::VirtioDevice>, usize) = if net {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two new descriptors, owned below.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0, "socketpair");
        // SAFETY: both descriptors are fresh and owned here.
        let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        peer = Some(b);
        (Box::new(Net::new(NetBackend::Tap(Tap::fake(a)), [0x52, 0x54, 0, 0x12, 0x34, 0x56])), 2)
    } else {
        (Box::new(Rng::new()), 1)
    };
    let irq = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    let mut t = MmioTransport::new(device, mem.clone(), IrqLine::Irqfd(irq));

    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(&mut t, VIRTIO_MMIO_STATUS, status);
    // Features: VERSION_1, and for net whatever the input's word 1 says (offloads, MRG_RXBUF, ...).
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::from_le_bytes([data[1], data[2], data[3], data[4]]));
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
    let rings: Vec<Ring> = (0..queues).map(|q| Ring::from_input(data, 5 + 13 * q)).collect();
    for (q, r) in rings.iter().enumerate() {
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::from(r.size));
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, r.desc as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, r.avail as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, r.used as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    // A driver hands over a zeroed used ring: the index counts from 0.
    for r in &rings {
        mem.write_obj(0u16, GuestAddress(r.used + 2)).expect("in range");
    }
    let offered: Vec<Option<Vec<u16>>> = rings.iter().map(|r| r.offered(&mem)).collect();
    w(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);

    // Frames from the host, cut from the input's tail.
    if let Some(p) = &peer {
        let tail = &data[40..];
        for frame in tail.chunks(1 + usize::from(data[39]) * 7).take(4) {
            // SAFETY: a send of a live buffer on our own socket.
            unsafe { libc::send(std::os::fd::AsRawFd::as_raw_fd(p), frame.as_ptr().cast(), frame.len(), 0) };
        }
        t.host_event();
    }
    for round in 0..=data[38] % 4 {
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(round) % queues as u32);
    }

    // Checked only when nothing the device writes (used rings, writable
    // buffers) overlaps what the driver wrote (rings): otherwise the device
    // rightly serves what it finds there by then, not what was offered.
    let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1;
    // (region, index of itself in `driver` for a used ring)
    let mut written: Vec<((u64, u64), Option<usize>)> = Vec::new();
    for (q, r) in rings.iter().enumerate() {
        written.push((r.regions()[2], Some(3 * q + 2)));
        if let Some(heads) = &offered[q] {
            written.extend(r.writable(&mem, heads).into_iter().map(|b| (b, None)));
        }
    }
    let driver: Vec<(u64, u64)> = rings.iter().flat_map(|r| r.regions()).collect();
    let apart = written
        .iter()
        .all(|(w, own)| driver.iter().enumerate().filter(|(i, _)| Some(*i) != *own).all(|(_, d)| !overlap(*w, *d)));
    for (q, r) in rings.iter().enumerate() {
        let Some(heads) = &offered[q] else { continue };
        if !apart {
            continue;
        }
        let used = r.used_entries(&mem);
        assert!(used.len() <= heads.len(), "queue {q}: {} used of {} offered", used.len(), heads.len());
        for (i, (id, len)) in used.iter().enumerate() {
            assert!(*id < u32::from(r.size), "queue {q}: used id {id} past the queue size {}", r.size);
            assert!(heads.contains(&(*id as u16)), "queue {q}: used entry {i} names head {id}, never offered");
            if !net {
                assert!(*len as usize <= MAX_BYTES_PER_REQUEST, "rng reported {len} bytes");
            }
        }
    }
    // What the guest transmitted reached the tap as whole frames, one per
    // chain at most (again only when received frames cannot have rewritten
    // the transmit ring).
    if let (Some(p), Some(Some(heads)), true) = (&peer, offered.get(1), apart) {
        let mut frames = 0;
        // A frame is at most 64 KiB (MAX_FRAME_LEN); one buffer for every run.
        static BUF: std::sync::Mutex<[u8; 128 << 10]> = std::sync::Mutex::new([0; 128 << 10]);
        let mut buf = BUF.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: a non-blocking recv into a live buffer.
        while unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(p), buf.as_mut_ptr().cast(), buf.len(), 0) } >= 0 {
            frames += 1;
        }
        assert!(frames <= heads.len(), "{frames} frames from {} chains", heads.len());
    }
});
