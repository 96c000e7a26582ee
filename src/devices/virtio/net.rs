//! virtio-net (virtio 1.2, section 5.1): an Ethernet NIC in the guest (eth0
//! in Linux) whose other end is on the host ([`crate::host::net_backend`]):
//! a tap interface ([`crate::host::tap`]) or a stream of frames to passt
//! ([`crate::host::frame_stream`]).
//!
//! What the guest sees: device ID 1, two queues (0 receiveq1, 1 transmitq1),
//! a configuration space with the MAC and the link status (always up), and
//! the features VERSION_1, MAC, STATUS, MRG_RXBUF, CSUM, GUEST_CSUM,
//! HOST_TSO4/6, GUEST_TSO4/6, HOST_ECN and GUEST_ECN. Every frame in either
//! direction starts with the 12-byte `struct virtio_net_hdr_v1` (5.1.6), and
//! the tap is opened with the same header, so checksum and segmentation
//! offload information passes between the guest and the host kernel
//! untouched: a 64 KiB TCP segment crosses as one frame, in one copy.
//! A frame stream carries no such header, so on one the device offers only
//! VERSION_1, MAC, STATUS and MRG_RXBUF: the guest checksums and segments
//! itself (passt hands out a 65520-byte MTU, so frames are large anyway).
//! A stream can also hold a frame back (written in part): then the transmit
//! queue is left alone until the stream takes the rest, which the event loop
//! reports as a host event (the descriptor became writable).
//!
//! Data paths:
//! - TX: the guest writes QUEUE_NOTIFY 1 -> ioeventfd -> `event_loop.rs`
//!   (`Token::Queue`) -> `mmio.rs` (notify) -> [`Net::process_queue`]: gather
//!   the chain into one buffer, check the header, write(2) it to the tap,
//!   add_used -> irqfd.
//! - RX: the tap becomes readable -> `event_loop.rs` (`Token::Tap`,
//!   edge-triggered) -> `mmio.rs` (host_event) -> [`Net::process_rx`]: read a
//!   frame, copy it into as many receive chains as it needs (MRG_RXBUF:
//!   `num_buffers` says how many), add_used -> irqfd. Reading goes on until
//!   the tap is empty or the guest has no receive buffers left. In the latter
//!   case the frame already read is kept (`rx_pending`) and nothing more is
//!   read: the rest waits in the host kernel's queue (which drops only when
//!   its own queue is full, as a real NIC's would), and ember neither drops
//!   nor spins. The guest's next receive-queue notify (it kicks after every
//!   refill: receive notifications are never suppressed) resumes reading.
//!
//! The guest is not trusted. A chain that loops, leaves the descriptor table
//! or runs past guest RAM breaks the queue (DEVICE_NEEDS_RESET, as for the
//! block device). Per frame, as 5.1.6 allows: a transmit chain with a
//! device-writable descriptor, more than [`MAX_FRAME_LEN`] bytes, no room for
//! an Ethernet header, or a header that asks for an offload the driver did
//! not negotiate or points past the frame (checksum start/offset, `hdr_len`,
//! an unknown `gso_type`) is dropped and returned used; a receive chain
//! with a device-readable or out-of-RAM buffer is returned with length 0;
//! a frame larger than every buffer the guest could give is dropped.

use std::os::fd::RawFd;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::queue::{collect_chain, drain_queue_while, finish, merge, read_config_bytes};
use super::{QueueOutcome, VirtioDevice, guest_warn};
use crate::host::net_backend::NetBackend;
use crate::host::tap::VNET_HDR_LEN;

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest frame, vnet header included: 5.1.6.3.1's 65562 for a driver
/// without MRG_RXBUF that negotiates GUEST_TSO (12 + 14 + 4 VLAN + 65535 IP,
/// rounded as in the spec).
pub const MAX_FRAME_LEN: usize = 65562;
/// Smallest frame: the vnet header and an Ethernet header.
const MIN_FRAME_LEN: usize = VNET_HDR_LEN + 14;
/// The configuration space: mac[6], status (u16).
const CONFIG_SIZE: usize = 8;

/// The features ember offers (besides VERSION_1).
pub const OFFERED_FEATURES: u64 = 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN;

/// `struct virtio_net_hdr_v1` (5.1.6), little endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// VIRTIO_NET_HDR_F_*.
    pub flags: u8,
    /// VIRTIO_NET_HDR_GSO_*, with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size (payload bytes per segment).
    pub gso_size: u16,
    /// Where checksumming starts (from the start of the Ethernet frame).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// RX, MRG_RXBUF: how many buffers the frame spans.
    pub num_buffers: u16,
}

impl VnetHeader {
    /// Parses the first 12 bytes of `b` (which must have them).
    pub fn parse(b: &[u8]) -> VnetHeader {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// Checks a header the guest sent with `frame_len` bytes of Ethernet frame
    /// after it, against the features it negotiated (5.1.6.2.1: the driver
    /// MUST NOT use an offload it did not negotiate). Err: why the frame is dropped.
    pub fn check_tx(&self, frame_len: usize, acked: u64) -> Result<(), &'static str> {
        let has = |f: u32| acked & (1 << f) != 0;
        let known = (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8;
        if self.flags & !known != 0 {
            return Err("unknown flags");
        }
        let needs_csum = self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0;
        if needs_csum {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err("NEEDS_CSUM without VIRTIO_NET_F_CSUM");
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err("checksum start/offset past the frame");
            }
        }
        let ecn = self.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
        let gso = u32::from(self.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8));
        let feature = match gso {
            VIRTIO_NET_HDR_GSO_NONE => {
                return if ecn { Err("ECN bit without segmentation") } else { Ok(()) };
            }
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            _ => return Err("unknown or not offered gso_type"),
        };
        if !has(feature) {
            return Err("segmentation offload the driver did not negotiate");
        }
        if ecn && !has(VIRTIO_NET_F_HOST_ECN) {
            return Err("ECN segmentation without VIRTIO_NET_F_HOST_ECN");
        }
        if !needs_csum {
            return Err("segmentation without NEEDS_CSUM");
        }
        if self.gso_size == 0 {
            return Err("segmentation with gso_size 0");
        }
        if usize::from(self.hdr_len) > frame_len {
            return Err("hdr_len past the frame");
        }
        Ok(())
    }
}

/// The default MAC of device `index` on tap `tap`. "Stable" means: the same
/// tap name and device index give the same address on every run, host and
/// ember version (FNV-1a is fixed, unlike std's hasher), so a guest's DHCP
/// lease or a host's ARP/neighbour entry survives a restart; two devices of
/// one VM differ (different taps), and two VMs on one host differ because
/// a tap serves one VM at a time. The prefix 52:54:00 is locally
/// administered (bit 1 of the first octet) and unicast (bit 0 clear).
pub fn default_mac(tap: &str, index: usize) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in tap.bytes().chain([0u8]).chain((index as u32).to_le_bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x52, 0x54, 0x00, b[1], b[2], b[3] ^ b[0]]
}

/// How delivering one received frame went.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Copied into the guest's buffers.
    Delivered,
    /// Not enough receive buffers yet: nothing was consumed.
    NoBuffers,
    /// The frame can never fit what the guest gives: dropped.
    TooBig,
    /// The queue is broken.
    Broken,
}

/// The features offered on a backend without offloads (a frame stream).
pub const STREAM_FEATURES: u64 = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF;

/// A virtio-net device backed by a tap or a frame stream.
pub struct Net {
    backend: NetBackend,
    config: [u8; CONFIG_SIZE],
    acked: u64,
    /// A frame read from the tap that waits for receive buffers: its length in `rx_buf`.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Frames dropped so far (both directions), for the log.
    dropped: u64,
}

impl Net {
    /// A NIC with address `mac` on `backend`.
    pub fn new(backend: NetBackend, mac: [u8; 6]) -> Net {
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            backend,
            config,
            acked: 0,
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME_LEN + 4096],
            tx_buf: Vec::with_capacity(MAX_FRAME_LEN),
            dropped: 0,
        }
    }

    fn mrg_rxbuf(&self) -> bool {
        self.acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    fn drop_frame(&mut self, why: std::fmt::Arguments) {
        self.dropped += 1;
        guest_warn!("virtio-net: frame dropped: {why} ({} dropped so far)", self.dropped);
    }

    /// Gathers one transmit chain into `tx_buf`; Err: why it is dropped.
    fn gather_tx(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<(), String> {
        self.tx_buf.clear();
        for d in descs {
            if d.is_write_only() {
                return Err("device-writable descriptor in a transmit chain".into());
            }
            let len = d.len() as usize;
            if self.tx_buf.len() + len > MAX_FRAME_LEN {
                return Err(format!("transmit chain longer than {MAX_FRAME_LEN} bytes"));
            }
            let at = self.tx_buf.len();
            self.tx_buf.resize(at + len, 0);
            if mem.read_slice(&mut self.tx_buf[at..], d.addr()).is_err() {
                return Err(format!("buffer at {:#x}+{len} is outside guest RAM", d.addr().0));
            }
        }
        if self.tx_buf.len() < MIN_FRAME_LEN {
            return Err(format!("{} bytes: shorter than a vnet and an Ethernet header", self.tx_buf.len()));
        }
        let hdr = VnetHeader::parse(&self.tx_buf);
        hdr.check_tx(self.tx_buf.len() - VNET_HDR_LEN, self.acked)
            .map_err(|e| format!("bad vnet header ({e}): {hdr:?}"))
    }

    /// Sends one transmit chain to the tap; the chain is always returned with length 0.
    fn transmit(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        match self.gather_tx(descs, mem) {
            Ok(()) => {
                if let Err(e) = self.backend.write_frame(&mut self.tx_buf) {
                    // The host refused it (EAGAIN: its queue is full; EIO: the link is down; EINVAL;
                    // EPIPE: passt is gone).
                    self.dropped += 1;
                    log::debug!(
                        "virtio-net: {} refused a {}-byte frame: {e}",
                        self.backend.describe(),
                        self.tx_buf.len()
                    );
                }
            }
            Err(why) => self.drop_frame(format_args!("{why}")),
        }
        0
    }

    /// Sends the transmit queue's chains to the backend, at most a queue's
    /// worth, and none while the backend holds a frame back.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        drain_queue_while(
            queue,
            mem,
            "virtio-net",
            self,
            |net| !net.backend.tx_blocked(),
            |net, descs| net.transmit(descs, mem),
        )
    }

    /// Moves frames from the tap into the receive queue until the tap is empty
    /// or the guest has no buffers left (see the module docs).
    ///
    /// At most one queue's worth of frames per call (`queue.size()`): a host
    /// that floods the tap must not hold the event loop; with frames left
    /// the answer is [`QueueOutcome::More`] and the event loop calls again
    /// (the tap is edge-triggered and would not wake it).
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        let mut used = false;
        let mut delivered: u16 = 0;
        loop {
            if delivered == queue.size() {
                return finish(queue, mem, used, true);
            }
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(Some(len)) if len < MIN_FRAME_LEN => {
                        log::debug!("virtio-net: a {len}-byte frame from the tap: dropped");
                        continue;
                    }
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("virtio-net: reading {}: {e}", self.backend.describe());
                        break;
                    }
                },
            };
            let mrg = self.mrg_rxbuf();
            match deliver(queue, mem, &mut self.rx_buf[..len], mrg) {
                Delivery::Delivered => {
                    used = true;
                    delivered += 1;
                }
                Delivery::NoBuffers => {
                    self.rx_pending = Some(len);
                    break;
                }
                Delivery::TooBig => self.drop_frame(format_args!("{len} bytes do not fit the guest's receive buffers")),
                Delivery::Broken => return QueueOutcome::NeedsReset,
            }
        }
        finish(queue, mem, used, false)
    }
}

/// One receive chain: its head and its device-writable buffers.
struct RxChain {
    head: u16,
    bufs: Vec<Descriptor>,
    capacity: usize,
}

/// Copies `frame` (vnet header first) into the next receive chain(s) of
/// `queue`: one chain without MRG_RXBUF, as many as it takes with it (then
/// `num_buffers` says how many). Nothing is consumed unless it all fits.
fn deliver(queue: &mut Queue, mem: &GuestMemoryMmap, frame: &mut [u8], mrg: bool) -> Delivery {
    let mut chains: Vec<RxChain> = Vec::new();
    let mut capacity = 0usize;
    let mut popped = 0u16;
    // Chains looked at for this frame, the returned ones included: at most
    // two rings' worth, so a ring that keeps moving under the device (a used
    // ring laid over the avail ring) cannot keep it here.
    let mut examined = 0u32;
    let rewind = |queue: &mut Queue, n: u16| (0..n).for_each(|_| queue.go_to_previous_position());
    while capacity < frame.len() {
        examined += 1;
        if examined > 2 * u32::from(queue.size()) {
            rewind(queue, popped);
            return Delivery::NoBuffers;
        }
        if popped >= queue.size() {
            // Every buffer the ring can hold is not enough: waiting cannot help.
            rewind(queue, popped);
            return Delivery::TooBig;
        }
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                guest_warn!("virtio-net: receive ring is broken: {e}");
                return Delivery::Broken;
            }
        };
        let Some(chain) = chain else {
            rewind(queue, popped);
            return Delivery::NoBuffers;
        };
        popped += 1;
        let head = chain.head_index();
        let descs = match collect_chain(queue, mem, head) {
            Ok(descs) => descs,
            Err(e) => {
                guest_warn!("virtio-net: receive chain from head {head} {e}");
                return Delivery::Broken;
            }
        };
        let valid = descs.iter().all(|d| d.is_write_only() && mem.get_slice(d.addr(), d.len() as usize).is_ok());
        if !valid {
            // A buffer the device cannot write: give it back empty (the
            // driver counts a length error), with the chains taken before it
            // for this frame (they cannot be put back behind a used one), and
            // start the frame again with the next chain.
            guest_warn!("virtio-net: receive chain from head {head} has a read-only or out-of-RAM buffer");
            for h in chains.drain(..).map(|c| c.head).chain([head]) {
                if queue.add_used(mem, h, 0).is_err() {
                    return Delivery::Broken;
                }
            }
            capacity = 0;
            popped = 0;
            continue;
        }
        let cap: usize = descs.iter().map(|d| d.len() as usize).sum();
        capacity += cap;
        chains.push(RxChain { head, bufs: descs, capacity: cap });
        if !mrg {
            break;
        }
    }
    if capacity < frame.len() {
        // Without MRG_RXBUF one chain must hold the frame (5.1.6.3.1).
        rewind(queue, popped);
        return Delivery::TooBig;
    }
    let n = chains.len() as u16;
    frame[10..12].copy_from_slice(&n.to_le_bytes());
    let mut rest: &[u8] = frame;
    for c in &chains {
        let mut written = 0usize;
        for d in &c.bufs {
            if rest.is_empty() {
                break;
            }
            let k = rest.len().min(d.len() as usize);
            if mem.write_slice(&rest[..k], d.addr()).is_err() {
                return Delivery::Broken; // checked above; guest RAM does not shrink
            }
            rest = &rest[k..];
            written += k;
        }
        debug_assert!(written <= c.capacity);
        if queue.add_used(mem, c.head, written as u32).is_err() {
            return Delivery::Broken;
        }
    }
    Delivery::Delivered
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        let offered = if self.backend.offloads() { OFFERED_FEATURES } else { STREAM_FEATURES };
        1 << VIRTIO_F_VERSION_1 | offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only for legacy drivers; we are VERSION_1 only.
        guest_warn!("virtio-net: write to read-only configuration space at {offset:#x}: ignored");
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked = acked_features;
        let has = |f: u32| acked_features & (1 << f) != 0;
        // What the host kernel may send us is what the guest accepts on receive.
        let mut offload = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            offload |= libc::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                offload |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                offload |= libc::TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_ECN) && offload & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
                offload |= libc::TUN_F_TSO_ECN;
            }
        }
        if let Err(e) = self.backend.set_offload(offload) {
            // The guest still works, with the host segmenting and checksumming for it.
            log::error!("virtio-net: {e}");
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        match index {
            RX_QUEUE => self.process_rx(queue, mem),
            _ => self.process_tx(queue, mem),
        }
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.backend.fd())
    }

    fn host_fd_writable(&self) -> bool {
        self.backend.wants_writable()
    }

    fn process_host_event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> QueueOutcome {
        // A stream that took the rest of a held-back frame: the transmit
        // queue, left alone meanwhile, goes on.
        let mut tx = QueueOutcome::Quiet;
        if self.backend.tx_blocked() {
            if let Err(e) = self.backend.flush() {
                log::error!("virtio-net: writing to {}: {e}", self.backend.describe());
            }
            if !self.backend.tx_blocked()
                && let Some(q) = queues.get_mut(TX_QUEUE).filter(|q| q.ready())
            {
                tx = self.process_tx(q, mem);
            }
        }
        let rx = match queues.get_mut(RX_QUEUE) {
            Some(q) if q.ready() => self.process_rx(q, mem),
            // No receive queue yet: frames wait in the tap until the driver kicks one.
            _ => QueueOutcome::Quiet,
        };
        merge(tx, rx)
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.rx_pending = None;
        if let Err(e) = self.backend.set_offload(0) {
            log::error!("virtio-net: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{self, DATA, desc, publish, used};
    use std::os::fd::FromRawFd;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const ALL: u64 = 1 << VIRTIO_F_VERSION_1 | OFFERED_FEATURES;

    /// A device on one end of a SOCK_SEQPACKET pair; the test holds the other ("the host").
    fn rig(features: u64) -> (Net, std::fs::File, GuestMemoryMmap, Queue) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two fresh descriptors, owned below.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors from socketpair.
        let (a, b) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        let mut net = Net::new(NetBackend::Tap(crate::host::tap::Tap::fake(a)), [0x52, 0x54, 0, 1, 2, 3]);
        net.activate(features);
        (net, b, testutil::memory(), testutil::queue(16))
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len - VNET_HDR_LEN).map(|i| fill.wrapping_add(i as u8)));
        f
    }

    fn host_send(host: &std::fs::File, f: &[u8]) {
        use std::io::Write;
        (&*host).write_all(f).unwrap();
    }

    fn host_recv(host: &std::fs::File) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut b = vec![0u8; 1 << 17];
        match (&*host).read(&mut b) {
            Ok(n) => Some(b[..n].to_vec()),
            Err(_) => None,
        }
    }

    fn read(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }

    #[test]
    fn config_space_and_features() {
        let (net, _h, _m, _q) = rig(0);
        let mut b = [0u8; 8];
        net.read_config(0, &mut b);
        assert_eq!(b, [0x52, 0x54, 0, 1, 2, 3, 1, 0], "MAC, then status LINK_UP");
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        assert_eq!(net.features() & (1 << VIRTIO_NET_F_GUEST_UFO | 1 << VIRTIO_NET_F_CTRL_VQ), 0);
    }

    #[test]
    fn default_macs_are_stable_unicast_and_distinct() {
        let a = default_mac("tap0", 0);
        assert_eq!(a, default_mac("tap0", 0));
        assert_ne!(a, default_mac("tap0", 1));
        assert_ne!(a, default_mac("tap1", 0));
        assert_eq!(a[0] & 3, 2, "locally administered, unicast");
        assert_eq!(&a[..3], &[0x52, 0x54, 0]);
        // Pinned: a change of algorithm would change users' MACs.
        assert_eq!(default_mac("tap0", 0), [0x52, 0x54, 0x00, 0xf4, 0x66, 0x5f]);
    }

    #[test]
    fn vnet_header_checks() {
        let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        let ok = VnetHeader {
            flags: csum,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        assert_eq!(ok.check_tx(60000, ALL), Ok(()));
        assert_eq!(VnetHeader::default().check_tx(60, 1 << VIRTIO_F_VERSION_1), Ok(()), "plain frame, no offloads");
        assert!(ok.check_tx(60000, 1 << VIRTIO_NET_F_CSUM).is_err(), "TSO4 not negotiated");
        assert!(ok.check_tx(40, ALL).is_err(), "hdr_len and checksum past the frame");
        for bad in [
            VnetHeader { gso_type: 3, ..ok },    // UDP (UFO) not offered
            VnetHeader { gso_type: 0x7f, ..ok }, // garbage
            VnetHeader { gso_type: 0x80, ..ok }, // ECN alone
            VnetHeader { gso_size: 0, ..ok },
            VnetHeader { flags: 0, ..ok },    // GSO without NEEDS_CSUM
            VnetHeader { flags: 0x80, ..ok }, // unknown flag
            VnetHeader { csum_start: 0xffff, csum_offset: 0xffff, ..ok },
            VnetHeader { hdr_len: 60001, ..ok },
        ] {
            assert!(bad.check_tx(60000, ALL).is_err(), "{bad:?}");
        }
        assert_eq!(VnetHeader { gso_type: 0x81, ..ok }.check_tx(60000, ALL), Ok(()), "TCPv4 with ECN");
        assert!(VnetHeader { gso_type: 0x81, ..ok }.check_tx(60000, ALL & !(1 << VIRTIO_NET_F_HOST_ECN)).is_err());
        let b: Vec<u8> = (1..=12).collect();
        let h = VnetHeader::parse(&b);
        assert_eq!((h.flags, h.gso_type, h.hdr_len, h.num_buffers), (1, 2, 0x0403, 0x0c0b));
    }

    #[test]
    fn tx_chain_is_gathered_and_sent_unchanged() {
        let (mut net, host, mem, mut q) = rig(ALL);
        let f = frame(100, 7);
        // Header and the first 30 bytes in one buffer, the rest in two more.
        mem.write_slice(&f[..42], GuestAddress(DATA)).unwrap();
        mem.write_slice(&f[42..70], GuestAddress(DATA + 0x100)).unwrap();
        mem.write_slice(&f[70..], GuestAddress(DATA + 0x200)).unwrap();
        desc(&mem, 0, DATA, 42, N, 1);
        desc(&mem, 1, DATA + 0x100, 28, N, 2);
        desc(&mem, 2, DATA + 0x200, 30, 0, 0);
        let mut avail = 0;
        publish(&mem, &mut avail, &[0]);
        assert_eq!(net.process_queue(TX_QUEUE, &mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(host_recv(&host).unwrap(), f, "byte for byte, vnet header included");
        assert_eq!(used(&mem).1, vec![(0, 0)]);
    }

    #[test]
    fn malformed_tx_chains_are_dropped_and_returned() {
        let (mut net, host, mem, mut q) = rig(1 << VIRTIO_F_VERSION_1);
        let mut avail = 0;
        // A writable descriptor in a TX chain.
        desc(&mem, 0, DATA, 60, W, 0);
        // Too short for an Ethernet header.
        desc(&mem, 1, DATA, 20, 0, 0);
        // Outside guest RAM.
        desc(&mem, 2, 0xff_fff0, 100, 0, 0);
        // A TSO frame from a driver that did not negotiate HOST_TSO4.
        let mut f = frame(200, 1);
        f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        f[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        mem.write_slice(&f, GuestAddress(DATA + 0x1000)).unwrap();
        desc(&mem, 3, DATA + 0x1000, 200, 0, 0);
        // Longer than any frame: two 40 KiB buffers.
        desc(&mem, 4, DATA, 40 << 10, N, 5);
        desc(&mem, 5, DATA, 40 << 10, 0, 0);
        publish(&mem, &mut avail, &[0, 1, 2, 3, 4]);
        assert_eq!(net.process_queue(TX_QUEUE, &mut q, &mem), QueueOutcome::Interrupt);
        assert!(host_recv(&host).is_none(), "nothing reached the host");
        assert_eq!(used(&mem).1, vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]);
        // A loop breaks the queue.
        desc(&mem, 6, DATA, 60, N, 6);
        publish(&mem, &mut avail, &[6]);
        assert_eq!(net.process_queue(TX_QUEUE, &mut q, &mem), QueueOutcome::NeedsReset);
        // A head past the table too.
        let (mut net, _h, mem, mut q) = rig(ALL);
        let mut avail = 0;
        publish(&mem, &mut avail, &[200]);
        assert_eq!(net.process_queue(TX_QUEUE, &mut q, &mem), QueueOutcome::NeedsReset);
    }

    #[test]
    fn rx_without_mrg_uses_one_chain_and_sets_num_buffers_1() {
        let (mut net, host, mem, mut q) = rig(1 << VIRTIO_F_VERSION_1);
        let f = frame(300, 9);
        host_send(&host, &f);
        // No buffers yet: nothing read is lost, nothing used.
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::Quiet);
        assert_eq!(used(&mem).0, 0);
        assert!(net.rx_pending.is_some());
        // A two-descriptor chain of 1 KiB.
        desc(&mem, 0, DATA, 12, W | N, 1);
        desc(&mem, 1, DATA + 0x100, 1024, W, 0);
        let mut avail = 0;
        publish(&mem, &mut avail, &[0]);
        assert_eq!(net.process_queue(RX_QUEUE, &mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).1, vec![(0, 300)]);
        let mut want = f.clone();
        want[10] = 1;
        let mut got = read(&mem, DATA, 12);
        got.extend(read(&mem, DATA + 0x100, 288));
        assert_eq!(got, want);
        // A frame bigger than the one buffer: dropped, the buffer kept for the next.
        host_send(&host, &frame(2000, 1));
        host_send(&host, &frame(100, 2));
        desc(&mem, 2, DATA + 0x1000, 1500, W, 0);
        publish(&mem, &mut avail, &[2]);
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).1[1], (2, 100));
        assert_eq!(read(&mem, DATA + 0x1000 + 12, 1), vec![2]);
    }

    #[test]
    fn rx_serves_at_most_a_queue_of_frames_per_call() {
        // 16 buffers (the queue size) and 20 frames: one call delivers 16 and
        // says there is more; the next, with buffers refilled, the other 4.
        let (mut net, host, mem, mut q) = rig(1 << VIRTIO_F_VERSION_1);
        for i in 0..20 {
            host_send(&host, &frame(100, i));
        }
        let mut avail = 0;
        for i in 0..16 {
            desc(&mem, i, DATA + 0x200 * u64::from(i), 0x200, W, 0);
        }
        publish(&mem, &mut avail, &(0..16).collect::<Vec<_>>());
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::More { interrupt: true });
        assert_eq!(used(&mem).0, 16);
        publish(&mem, &mut avail, &(0..4).collect::<Vec<_>>());
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).0, 20);
        assert_eq!(read(&mem, 3 * 0x200 + DATA + 12, 1), vec![19], "the last frame in the fourth buffer");
    }

    #[test]
    fn rx_with_mrg_spans_chains() {
        let (mut net, host, mem, mut q) = rig(ALL);
        let mut avail = 0;
        // Three chains of 512 bytes; a 1200-byte frame needs all three.
        for i in 0..3u16 {
            desc(&mem, i, DATA + 0x1000 * u64::from(i), 512, W, 0);
        }
        publish(&mem, &mut avail, &[0, 1]);
        let f = frame(1200, 3);
        host_send(&host, &f);
        // Two chains are not enough: wait, consume nothing.
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::Quiet);
        assert_eq!(used(&mem).0, 0);
        publish(&mem, &mut avail, &[2]);
        assert_eq!(net.process_queue(RX_QUEUE, &mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).1, vec![(0, 512), (1, 512), (2, 176)]);
        let mut got = Vec::new();
        for i in 0..3 {
            got.extend(read(&mem, DATA + 0x1000 * i, 512));
        }
        let mut want = f.clone();
        want[10] = 3;
        assert_eq!(&got[..1200], &want[..]);
        // Several small frames in one go.
        for i in 3..6u16 {
            desc(&mem, i, DATA + 0x1000 * u64::from(i), 2048, W, 0);
        }
        publish(&mem, &mut avail, &[3, 4, 5]);
        host_send(&host, &frame(60, 1));
        host_send(&host, &frame(70, 2));
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(&used(&mem).1[3..], &[(3, 60), (4, 70)]);
        assert_eq!(read(&mem, DATA + 0x3000 + 10, 2), vec![1, 0], "num_buffers 1");
    }

    #[test]
    fn bad_rx_chains() {
        let (mut net, host, mem, mut q) = rig(ALL);
        let mut avail = 0;
        // A read-only chain and an out-of-RAM one are returned empty; the frame goes to the third.
        desc(&mem, 0, DATA, 2048, 0, 0);
        desc(&mem, 1, 0xff_f000, 0x2000, W, 0);
        desc(&mem, 2, DATA + 0x1000, 2048, W, 0);
        publish(&mem, &mut avail, &[0, 1, 2]);
        host_send(&host, &frame(100, 5));
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).1, vec![(0, 0), (1, 0), (2, 100)]);
        // A ring full of tiny buffers can never hold a big frame: it is dropped, not waited for.
        let (mut net, host, mem, mut q) = rig(ALL);
        let mut avail = 0;
        for i in 0..16u16 {
            desc(&mem, i, DATA + 0x100 * u64::from(i), 16, W, 0);
        }
        publish(&mem, &mut avail, &(0..16).collect::<Vec<_>>());
        host_send(&host, &frame(1000, 5));
        host_send(&host, &frame(30, 6));
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).1, vec![(0, 16), (1, 14)], "the small frame still arrives");
        // A looping receive chain breaks the queue.
        let (mut net, host, mem, mut q) = rig(ALL);
        let mut avail = 0;
        desc(&mem, 0, DATA, 64, W | N, 0);
        publish(&mem, &mut avail, &[0]);
        host_send(&host, &frame(100, 5));
        assert_eq!(net.process_rx(&mut q, &mem), QueueOutcome::NeedsReset);
    }
}
