//! The split virtqueue as every ember device walks it (virtio 1.2, 2.7
//! "Split Virtqueues"): the helpers virtio-blk, virtio-net, virtio-rng,
//! virtio-console and virtio-9p share, so that each device file only says
//! what one request means.
//!
//! - `collect_chain` walks one descriptor chain (2.7.5 "The Virtqueue
//!   Descriptor Table") through our own bounded walk: at most the queue's
//!   size of descriptors, at most 4 GiB in all (2.7.5.2), and no indirect
//!   table (2.7.5.3: VIRTIO_RING_F_INDIRECT_DESC is never offered);
//!   `pop_chain` takes the next one from the available ring (2.7.6).
//! - `drain_queue` and `drain_queue_while` pop, serve and return chains
//!   to the used ring (2.7.8), with notifications off while they work
//!   (2.7.10 "Available Buffer Notification Suppression"), at most one
//!   queue's worth per call.
//! - `finish` asks whether the driver wants an interrupt for what was used
//!   (2.7.7 "Used Buffer Notification Suppression", VIRTIO_F_EVENT_IDX
//!   aside); `merge` combines the outcomes of several queues.
//! - `read_config_bytes` reads a device configuration space (2.5).
//!
//! virtio-queue's `Queue` holds the ring indices and does the ring
//! arithmetic; nothing here trusts a value read from guest memory.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{QueueOutcome, guest_warn};

/// Why a descriptor chain cannot be served: both break the queue (DEVICE_NEEDS_RESET).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// A loop, more descriptors than the queue holds, a head or next index
    /// past the table, a table outside guest RAM, or more than 4 GiB in all
    /// (virtio 1.2, 2.7.5.2).
    Broken,
    /// A descriptor with VIRTQ_DESC_F_INDIRECT: ember does not offer
    /// VIRTIO_RING_F_INDIRECT_DESC, and "the driver MUST NOT set the
    /// VIRTQ_DESC_F_INDIRECT flag unless the VIRTIO_F_INDIRECT_DESC feature was
    /// negotiated" (virtio 1.2, 2.7.5.3.1). Followed, one such descriptor
    /// would make a request of up to 65536 more descriptors.
    Indirect,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChainError::Broken => "loops, is too long or leaves guest RAM",
            ChainError::Indirect => "uses an indirect table, and VIRTIO_RING_F_INDIRECT_DESC was not negotiated",
        })
    }
}

/// Walks the chain that starts at descriptor `head` of `queue`'s table, in
/// order. Our own walk rather than virtio-queue's iterator, which follows
/// indirect tables on its own: a chain here is at most `queue.size()`
/// descriptors of the table itself (virtio 1.2, 2.7.5).
pub(crate) fn collect_chain(queue: &Queue, mem: &GuestMemoryMmap, head: u16) -> Result<Vec<Descriptor>, ChainError> {
    let size = queue.size();
    let mut descs = Vec::new();
    let mut index = head;
    let mut bytes: u32 = 0;
    loop {
        if index >= size || descs.len() >= usize::from(size) {
            return Err(ChainError::Broken);
        }
        let at = queue.desc_table().checked_add(16 * u64::from(index)).map(GuestAddress).ok_or(ChainError::Broken)?;
        let d: Descriptor = mem.read_obj(at).map_err(|_| ChainError::Broken)?;
        if d.refers_to_indirect_table() {
            return Err(ChainError::Indirect);
        }
        bytes = bytes.checked_add(d.len()).ok_or(ChainError::Broken)?;
        descs.push(d);
        if !d.has_next() {
            return Ok(descs);
        }
        index = d.next();
    }
}

/// Pops the next available chain of `queue`: its head index and its
/// descriptors ([`collect_chain`]); `Ok(None)` when the driver has made none
/// available. `Err` (logged, as `name`) for a broken available ring or chain:
/// the queue needs a reset.
pub(crate) fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    name: &str,
) -> Result<Option<(u16, Vec<Descriptor>)>, ()> {
    let chain = match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => {
            guest_warn!("{name}: available ring is broken: {e}");
            return Err(());
        }
    };
    let Some(chain) = chain else { return Ok(None) };
    let head = chain.head_index();
    match collect_chain(queue, mem, head) {
        Ok(descs) => Ok(Some((head, descs))),
        Err(e) => {
            guest_warn!("{name}: descriptor chain from head {head} {e}");
            Err(())
        }
    }
}

/// Pops and serves the available chains of `queue` with `serve`, with
/// notifications off while it works (the driver need not notify a queue
/// being drained); shared by the block, entropy and network (transmit) devices.
///
/// One call serves at most `queue.size()` chains, as Cloud Hypervisor's block
/// device does: a guest that keeps posting requests must not hold the one
/// event loop (stdin, signals, other devices) for as long as it likes. With
/// chains left, the answer is [`QueueOutcome::More`] and notifications stay
/// off: the event loop calls again after its other sources.
pub(crate) fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    name: &str,
    mut serve: impl FnMut(&[Descriptor]) -> u32,
) -> QueueOutcome {
    drain_queue_while(queue, mem, name, &mut (), |_| true, |_, descs| serve(descs))
}

/// [`drain_queue`] for a device that can run out of room on the host side:
/// before each chain `ready(ctx)` is asked; false leaves the chain (and the
/// rest) in the ring, with notifications off, for a later call (virtio-net on
/// a stream that holds a frame back resumes when the stream is writable).
pub(crate) fn drain_queue_while<C: ?Sized>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    name: &str,
    ctx: &mut C,
    ready: impl Fn(&C) -> bool,
    mut serve: impl FnMut(&mut C, &[Descriptor]) -> u32,
) -> QueueOutcome {
    let budget = queue.size();
    // Chains served, plus rounds that found the avail index moved: a ring
    // that moves under the device without giving it a chain (a used ring laid
    // over the avail ring: re-enabling notifications rewrites avail.idx)
    // must not keep it here either.
    let mut served: u16 = 0;
    let mut used = false;
    let more = loop {
        if queue.disable_notification(mem).is_err() {
            guest_warn!("{name}: used ring is not writable");
            return QueueOutcome::NeedsReset;
        }
        loop {
            if served >= budget {
                break;
            }
            if !ready(ctx) {
                return finish(queue, mem, used, false);
            }
            let (head, descs) = match pop_chain(queue, mem, name) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(()) => return QueueOutcome::NeedsReset,
            };
            let len = serve(ctx, &descs);
            if queue.add_used(mem, head, len).is_err() {
                guest_warn!("{name}: cannot add head {head} to the used ring");
                return QueueOutcome::NeedsReset;
            }
            served += 1;
            used = true;
        }
        if served >= budget {
            break true;
        }
        match queue.enable_notification(mem) {
            Ok(true) => served += 1, // more arrived while notifications were off
            Ok(false) => break false,
            Err(_) => return QueueOutcome::NeedsReset,
        }
    };
    finish(queue, mem, used, more)
}

/// The outcome of a pass over `queue`: whether the driver wants an interrupt
/// for the buffers used (`used`), and whether work is left (`more`).
pub(crate) fn finish(queue: &mut Queue, mem: &GuestMemoryMmap, used: bool, more: bool) -> QueueOutcome {
    let interrupt = match queue.needs_notification(mem) {
        Ok(wanted) => wanted && used,
        Err(_) => return QueueOutcome::NeedsReset,
    };
    match (more, interrupt) {
        (true, interrupt) => QueueOutcome::More { interrupt },
        (false, true) => QueueOutcome::Interrupt,
        (false, false) => QueueOutcome::Quiet,
    }
}

/// One outcome for a call that served several queues: a reset wins, then
/// "more", and an interrupt if either wants one.
pub(crate) fn merge(a: QueueOutcome, b: QueueOutcome) -> QueueOutcome {
    use QueueOutcome::*;
    let irq = |o: QueueOutcome| matches!(o, Interrupt | More { interrupt: true });
    match (a, b) {
        (NeedsReset, _) | (_, NeedsReset) => NeedsReset,
        (More { .. }, _) | (_, More { .. }) => More { interrupt: irq(a) || irq(b) },
        _ if irq(a) || irq(b) => Interrupt,
        _ => Quiet,
    }
}

/// Copies `config[offset..]` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{self, DATA, desc, publish, used};

    #[test]
    fn a_drain_serves_at_most_a_queue_of_chains_per_call() {
        // A guest that posts a new request for each one served (here: the
        // closure publishes head 0 again) gets 16 (the queue size) per call;
        // the rest waits for the next call and none is lost.
        let mem = testutil::memory();
        let mut q = testutil::queue(16);
        desc(&mem, 0, DATA, 512, 0, 0);
        let mut avail = 0u16;
        publish(&mem, &mut avail, &[0; 16]);
        let mut published = 16;
        let mut served = 0;
        let mut call = |q: &mut Queue| {
            drain_queue(q, &mem, "test", |_| {
                served += 1;
                if published < 40 {
                    publish(&mem, &mut avail, &[0]);
                    published += 1;
                }
                0
            })
        };
        assert_eq!(call(&mut q), QueueOutcome::More { interrupt: true });
        assert_eq!(call(&mut q), QueueOutcome::More { interrupt: true });
        assert_eq!(call(&mut q), QueueOutcome::Interrupt);
        assert_eq!(call(&mut q), QueueOutcome::Quiet);
        assert_eq!(served, 40);
        assert_eq!(used(&mem).0, 40);
    }

    #[test]
    fn a_used_ring_over_the_avail_ring_does_not_hold_the_device() {
        // Found by fuzz/virtio_blk: used.flags over avail.idx, so each
        // disable/enable of notifications moves avail.idx and the drain saw
        // "more" forever without a chain to serve. The budget counts those rounds.
        let mem = testutil::memory();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(testutil::DESC as u32), Some(0));
        q.set_avail_ring_address(Some(testutil::AVAIL as u32 + 2), Some(0));
        q.set_used_ring_address(Some(testutil::AVAIL as u32 + 4), Some(0));
        q.set_ready(true);
        desc(&mem, 0, DATA, 512, 0, 0);
        let mut served = 0;
        let out = drain_queue(&mut q, &mem, "test", |_| {
            served += 1;
            0
        });
        assert!(matches!(out, QueueOutcome::More { .. } | QueueOutcome::NeedsReset), "{out:?}");
        assert!(served <= 16);
    }

    #[test]
    fn merge_keeps_the_strongest() {
        use QueueOutcome::*;
        assert_eq!(merge(Quiet, Interrupt), Interrupt);
        assert_eq!(merge(More { interrupt: false }, Interrupt), More { interrupt: true });
        assert_eq!(merge(More { interrupt: false }, Quiet), More { interrupt: false });
        assert_eq!(merge(More { interrupt: true }, More { interrupt: false }), More { interrupt: true });
        assert_eq!(merge(Quiet, NeedsReset), NeedsReset);
        assert_eq!(merge(Quiet, Quiet), Quiet);
    }

    #[test]
    fn config_bytes_past_the_end_read_as_zero() {
        let mut b = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut b);
        assert_eq!(b, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
