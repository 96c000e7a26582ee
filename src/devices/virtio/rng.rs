//! virtio-rng, the entropy device (virtio 1.2, section 5.4): the guest hands
//! over device-writable buffers on its one queue and gets them back filled
//! with random bytes from the host's getrandom(2).
//!
//! Why a Linux guest gets one by default: a microVM has no other good entropy
//! source at boot (no disk activity, no interrupts from real hardware), and
//! without one, getrandom() in the guest may block until the kernel's CRNG is
//! seeded. Linux's virtio-rng driver (drivers/char/hw_random/virtio-rng.c)
//! seeds it as soon as the device is probed.
//!
//! Data path: ioeventfd -> `event_loop.rs` -> `mmio.rs` (notify) ->
//! [`Rng::process_queue`] (fill, add_used) -> irqfd. There is no configuration
//! space and no device-specific feature. Readable descriptors are skipped;
//! at most [`MAX_BYTES_PER_REQUEST`] bytes are written per request, so a
//! guest cannot make one notify cost the host more than that per buffer.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::queue::drain_queue;
use super::{QueueOutcome, VirtioDevice, guest_warn};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Largest number of random bytes handed out per request.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// The entropy device.
#[derive(Default)]
pub struct Rng;

impl Rng {
    /// A new entropy device.
    pub fn new() -> Rng {
        Rng
    }
}

/// Fills the writable buffers of one request; returns how many bytes were written.
fn fill(descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
    let mut budget = MAX_BYTES_PER_REQUEST;
    let mut written = 0u32;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        let len = (d.len() as usize).min(budget);
        if len == 0 {
            break;
        }
        let Ok(slice) = mem.get_slice(d.addr(), len) else {
            guest_warn!("virtio-rng: buffer at {:#x}+{len} is outside guest RAM", d.addr().0);
            break;
        };
        let guard = slice.ptr_guard_mut();
        // SAFETY: `guard` covers `len` bytes of guest RAM mapped in this
        // process (vm-memory checked the range); getrandom writes at most `len`.
        let n = unsafe { libc::getrandom(guard.as_ptr() as *mut libc::c_void, len, 0) };
        if n <= 0 {
            log::error!("virtio-rng: getrandom failed: {}", std::io::Error::last_os_error());
            break;
        }
        written += n as u32;
        budget -= n as usize;
        if (n as usize) < len {
            break;
        }
    }
    written
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("virtio-rng: write to its (empty) configuration space at {offset:#x}: ignored");
    }

    fn activate(&mut self, _acked_features: u64) {}

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        drain_queue(queue, mem, "virtio-rng", |descs| fill(descs, mem))
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{self, DATA, desc, publish, used};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    #[test]
    fn fills_writable_buffers_only() {
        let mem = testutil::memory();
        let mut q = testutil::queue(16);
        let mut avail = 0;
        let mut rng = Rng::new();
        desc(&mem, 0, DATA, 64, N, 1); // readable: skipped
        desc(&mem, 1, DATA + 0x100, 256, W, 0);
        publish(&mem, &mut avail, &[0]);
        assert_eq!(rng.process_queue(0, &mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).1, vec![(0, 256)]);
        let mut b = [0u8; 256];
        mem.read_slice(&mut b, GuestAddress(DATA + 0x100)).unwrap();
        assert!(b.iter().any(|&x| x != 0), "256 random bytes are not all zero");
        let mut r = [0u8; 64];
        mem.read_slice(&mut r, GuestAddress(DATA)).unwrap();
        assert_eq!(r, [0; 64], "the readable buffer is untouched");

        // Outside guest RAM: nothing written, the chain still comes back.
        desc(&mem, 2, 0xff_ff00, 0x1000, W, 0);
        publish(&mem, &mut avail, &[2]);
        rng.process_queue(0, &mut q, &mem);
        assert_eq!(used(&mem).1[1], (2, 0));
        // Huge buffers are capped.
        desc(&mem, 3, DATA, 0x8_0000, W, 0);
        publish(&mem, &mut avail, &[3]);
        rng.process_queue(0, &mut q, &mem);
        assert_eq!(used(&mem).1[2], (3, MAX_BYTES_PER_REQUEST as u32));
        // A loop needs a reset.
        desc(&mem, 4, DATA, 16, W | N, 4);
        publish(&mem, &mut avail, &[4]);
        assert_eq!(rng.process_queue(0, &mut q, &mem), QueueOutcome::NeedsReset);
    }
}
