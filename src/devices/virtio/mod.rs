//! virtio devices (virtio 1.2) on the virtio-mmio transport (section 4.2).
//!
//! Split in two, as in the spec: the transport ([`mmio::MmioTransport`],
//! the register file the guest's virtio_mmio driver programs) owns the
//! virtqueues and the interrupt; a device ([`block::Block`], [`net::Net`], [`rng::Rng`])
//! only says who it is and serves its queues, through [`VirtioDevice`]
//! ([`console::Console`] carries the guest command's stdout and stderr,
//! [`p9::P9`] a shared folder). They walk their queues with the helpers of
//! [`queue`] (chains, drains, outcomes).
//! A device with a host-side event source ([`net::Net`]'s tap) names its
//! descriptor with [`VirtioDevice::host_fd`]; the event loop watches it
//! (`Token::Tap`) and calls [`mmio::MmioTransport::host_event`].
//!
//! Data path of one request: the guest writes VIRTIO_MMIO_QUEUE_NOTIFY, KVM
//! signals that queue's ioeventfd -> `event_loop.rs` (`Token::Queue`) ->
//! [`mmio::MmioTransport::notify`] -> [`VirtioDevice::process_queue`] (pops
//! chains, does the I/O, `add_used`) -> the transport sets INTERRUPT_STATUS
//! and signals the device's irqfd. A notify that KVM did not match (another
//! width or value) arrives as a trapped MMIO write and takes the same path.
//!
//! Everything read from the guest (descriptors, addresses, lengths, indices,
//! register values) is untrusted: memory goes through vm-memory's
//! bounds-checked accessors, chains through `queue::collect_chain` (bounded
//! by the queue size; indirect tables, never offered, are refused), one
//! notification serves at most one queue's worth of chains, and a mistake is
//! answered as the spec says; it never panics or stops ember.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod p9;
pub mod queue;
pub mod rng;

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::snapshot::devices::DeviceState;

/// A device asks the transport for this after serving a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueOutcome {
    /// Nothing to tell the driver (nothing used, or it asked for no interrupt).
    Quiet,
    /// Buffers were used and the driver wants to hear about it.
    Interrupt,
    /// The device served as much as one call may (one queue's worth of
    /// chains or frames) and more is waiting: the event loop serves the queue
    /// again once it has looked at its other sources. `interrupt`: as for
    /// `Interrupt`, for what was used so far.
    More {
        /// The driver wants an interrupt for the buffers used so far.
        interrupt: bool,
    },
    /// The queue is broken beyond a per-request answer (a looping or
    /// out-of-memory descriptor table, an unwritable used ring, an avail index
    /// that runs ahead by more than the queue size): the device stops serving
    /// it and sets DEVICE_NEEDS_RESET (virtio 1.2, 2.1.2).
    NeedsReset,
}

/// One virtio device type, as the transport sees it (virtio 1.2, section 5).
pub trait VirtioDevice: Send {
    /// The virtio device ID (5 "Device Types"): 2 block, 4 entropy.
    fn device_type(&self) -> u32;
    /// The feature bits the device offers, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// The maximum size of each of its virtqueues (QueueNumMax).
    fn queue_max_sizes(&self) -> &[u16];
    /// The guest reads `data.len()` bytes of the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The guest writes the configuration space (ignored by read-only configs).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with these negotiated features.
    fn activate(&mut self, acked_features: u64);
    /// Serves the available buffers of queue `index`, at most one queue's
    /// worth per call (then [`QueueOutcome::More`]).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome;
    /// Serves queue `index` with every queue at hand, for a device whose
    /// queues work in pairs (virtio-console's control queues answer on the
    /// other one); by default [`VirtioDevice::process_queue`] on that queue.
    fn process_queues(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> QueueOutcome {
        match queues.get_mut(index) {
            Some(q) => self.process_queue(index, q, mem),
            None => QueueOutcome::Quiet,
        }
    }
    /// The driver reset the device (status 0): forget negotiated state.
    fn reset(&mut self);
    /// A host descriptor the event loop should watch for this device
    /// (readable, edge-triggered), e.g. virtio-net's tap; None for most devices.
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Whether the event loop should also report `host_fd` becoming writable
    /// (virtio-net on a frame stream, which can hold a frame back).
    fn host_fd_writable(&self) -> bool {
        false
    }
    /// `host_fd` became readable (or writable, see `host_fd_writable`): serve
    /// it with the device's `queues`.
    fn process_host_event(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> QueueOutcome {
        QueueOutcome::Quiet
    }
    /// What the device keeps between requests beyond its transport's registers and queues, for
    /// a snapshot; None for the stateless devices (block, rng, net: snapshot/devices.rs).
    fn save_state(&self) -> Option<DeviceState> {
        None
    }
    /// Takes back what [`VirtioDevice::save_state`] gave (None for a stateless device).
    fn restore_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        match state {
            None => Ok(()),
            Some(_) => Err(format!("virtio device type {} keeps no state of its own", self.device_type())),
        }
    }
}

/// How many guest-caused warnings were logged so far (all devices).
static GUEST_WARNINGS: AtomicU64 = AtomicU64::new(0);

/// Logs a mistake of the guest's driver at warn level: the first 20, then one
/// in every 1000, so a hostile guest cannot flood the host's log.
pub(crate) fn guest_warn_args(args: std::fmt::Arguments) {
    let n = GUEST_WARNINGS.fetch_add(1, Ordering::Relaxed);
    if n < 20 || n.is_multiple_of(1000) {
        log::warn!("{args} (guest warning #{})", n + 1);
    }
}

/// `guest_warn!("fmt", args)`: a rate-limited warning about the guest.
macro_rules! guest_warn {
    ($($t:tt)*) => { $crate::devices::virtio::guest_warn_args(format_args!($($t)*)) };
}
pub(crate) use guest_warn;

#[cfg(test)]
pub(crate) mod testutil {
    //! Hand-built split virtqueues in a `GuestMemoryMmap`, for the device tests.
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Descriptor table, avail ring and used ring addresses of the test queue.
    pub const DESC: u64 = 0x1000;
    /// Available ring.
    pub const AVAIL: u64 = 0x2000;
    /// Used ring.
    pub const USED: u64 = 0x3000;
    /// Where test data buffers start.
    pub const DATA: u64 = 0x10000;

    /// 1 MiB of guest RAM.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A ready queue of `size` at the addresses above.
    pub fn queue(size: u16) -> Queue {
        let mut q = Queue::new(size).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i`.
    pub fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(Descriptor::new(addr, len, flags, next), GuestAddress(DESC + 16 * u64::from(i))).unwrap();
    }

    /// Appends `heads` to the avail ring of a 16-entry queue whose avail.idx
    /// is `*idx`, and publishes the new avail.idx.
    pub fn publish(mem: &GuestMemoryMmap, idx: &mut u16, heads: &[u16]) {
        for h in heads {
            mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * u64::from(*idx % 16))).unwrap();
            *idx = idx.wrapping_add(1);
        }
        mem.write_obj(*idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// used.idx and the used elements (id, len).
    pub fn used(mem: &GuestMemoryMmap) -> (u16, Vec<(u32, u32)>) {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let elems = (0..idx.min(16))
            .map(|n| {
                let a = USED + 4 + 8 * u64::from(n);
                (mem.read_obj(GuestAddress(a)).unwrap(), mem.read_obj(GuestAddress(a + 4)).unwrap())
            })
            .collect();
        (idx, elems)
    }
}
