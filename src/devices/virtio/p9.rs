//! virtio-9p, a shared folder (`-v HOSTDIR:GUESTDIR[:ro]`): the transport of
//! the 9P2000.L file protocol (virtio 1.2 lists device ID 9; the device
//! itself is specified by QEMU's and Linux's implementations,
//! net/9p/trans_virtio.c). One queue; each chain is one request: the driver's
//! readable buffers hold a 9P T-message, its writable buffers get the
//! R-message. The configuration space is the mount tag (`le16 tag_len; u8
//! tag[tag_len]`, offered with feature bit 0, VIRTIO_9P_MOUNT_TAG): the guest
//! mounts it with `mount -t 9p -o trans=virtio TAG DIR`.
//!
//! Why 9p and not virtio-fs: virtio-fs needs either a vhost-user daemon
//! (virtiofsd, a separate install, with guest memory shared through a memfd)
//! or an in-process FUSE server (`fuse-backend-rs`, whose transport is tied
//! to exact virtio-queue and vm-memory versions and which, like every
//! passthrough server, must be jailed). The `p9` crate speaks through plain
//! `Read`/`Write`, so its server can run in a separate, jailed process behind
//! one socket ([`crate::host::p9_server`]) and this device stays a
//! 100-line byte mover. The price is speed (no DAX window, a round trip per
//! 64 KiB): measured in the README.
//!
//! Data path: ioeventfd -> `event_loop.rs` -> `mmio.rs` (notify) ->
//! [`P9::process_queue`] -> the server process (one request, one reply) ->
//! reply into the chain, add_used -> irqfd. Requests are served one at a
//! time, in order; the server answers each at once (it never blocks on a
//! FIFO, see p9_server.rs), and one that does not answer within 30 s gives
//! the folder up: every later request fails with EIO, the VM runs on.

use std::io;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::queue::{drain_queue, read_config_bytes};
use super::{QueueOutcome, VirtioDevice, guest_warn};
use crate::host::p9_server::{self, FsServer, MAX_MESSAGE};

/// The virtio device ID of a 9P transport.
pub const VIRTIO_ID_9P: u32 = 9;
/// Feature bit: the configuration space holds a mount tag.
const VIRTIO_9P_MOUNT_TAG: u64 = 1 << 0;
/// Size of the request queue: Linux's 9p client keeps up to this many
/// requests in flight (net/9p/trans_virtio.c's VIRTQUEUE_NUM is 128).
pub const QUEUE_SIZE: u16 = 128;

/// Where requests go: the jailed server, or a stand-in in tests.
pub trait P9Backend: Send {
    /// One T-message in, one R-message out; an error means the server is gone.
    fn call(&mut self, request: &[u8]) -> io::Result<Vec<u8>>;
}

impl P9Backend for FsServer {
    fn call(&mut self, request: &[u8]) -> io::Result<Vec<u8>> {
        FsServer::call(self, request)
    }
}

/// A shared folder as the guest sees it.
pub struct P9 {
    config: Vec<u8>,
    backend: Box<dyn P9Backend>,
    /// Whether the folder was given up (reported once).
    failed: bool,
}

impl P9 {
    /// A device with mount tag `tag` whose requests go to `backend`.
    pub fn new(tag: &str, backend: Box<dyn P9Backend>) -> P9 {
        let mut config = (tag.len() as u16).to_le_bytes().to_vec();
        config.extend_from_slice(tag.as_bytes());
        P9 { config, backend, failed: false }
    }

    /// Serves one chain; returns how many bytes were written to it.
    fn serve(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let mut request = Vec::new();
        for d in descs.iter().filter(|d| !d.is_write_only()) {
            let len = (d.len() as usize).min(MAX_MESSAGE - request.len());
            let at = request.len();
            request.resize(at + len, 0);
            if mem.read_slice(&mut request[at..], d.addr()).is_err() {
                guest_warn!("virtio-9p: request buffer at {:#x}+{len} is outside guest RAM", d.addr().0);
                return 0;
            }
            if request.len() == MAX_MESSAGE {
                break;
            }
        }
        let reply = match self.backend.call(&request) {
            Ok(r) => r,
            Err(e) => {
                if !self.failed {
                    log::error!("virtio-9p: the shared folder's server failed ({e}); its requests now fail with EIO");
                    self.failed = true;
                }
                p9_server::error_reply(&request, libc::EIO as u32)
            }
        };
        let mut written = 0usize;
        for d in descs.iter().filter(|d| d.is_write_only()) {
            if written == reply.len() {
                break;
            }
            let n = (d.len() as usize).min(reply.len() - written);
            // An empty buffer is skipped, not the end of the chain (virtio 1.2
            // 2.7.4; as in console.rs, where fuzz/console_rx found it).
            if n == 0 {
                continue;
            }
            if mem.write_slice(&reply[written..written + n], d.addr()).is_err() {
                guest_warn!("virtio-9p: reply buffer at {:#x}+{n} is outside guest RAM", d.addr().0);
                break;
            }
            written += n;
        }
        if written < reply.len() {
            guest_warn!("virtio-9p: a {}-byte reply did not fit the request's buffers", reply.len());
        }
        written as u32
    }
}

impl VirtioDevice for P9 {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_9P
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | VIRTIO_9P_MOUNT_TAG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("virtio-9p: write to its read-only configuration space at {offset:#x}: ignored");
    }

    fn activate(&mut self, _acked_features: u64) {}

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        drain_queue(queue, mem, "virtio-9p", |descs| self.serve(descs, mem))
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{self, DATA, desc, publish, used};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    /// Answers every request with its bytes reversed; fails after `left` calls.
    struct Mirror {
        left: u32,
    }
    impl P9Backend for Mirror {
        fn call(&mut self, request: &[u8]) -> io::Result<Vec<u8>> {
            if self.left == 0 {
                return Err(io::Error::other("gone"));
            }
            self.left -= 1;
            Ok(request.iter().rev().copied().collect())
        }
    }

    #[test]
    fn config_space_is_the_tag() {
        let d = P9::new("ember0", Box::new(Mirror { left: 0 }));
        let mut b = [0u8; 10];
        d.read_config(0, &mut b);
        assert_eq!(&b, b"\x06\x00ember0\x00\x00");
        assert_ne!(d.features() & VIRTIO_9P_MOUNT_TAG, 0);
    }

    #[test]
    fn a_request_spanning_buffers_gets_its_reply_across_buffers() {
        let mem = testutil::memory();
        let mut q = testutil::queue(16);
        let mut avail = 0;
        let mut dev = P9::new("t", Box::new(Mirror { left: 1 }));
        mem.write_slice(b"abc", GuestAddress(DATA)).unwrap();
        mem.write_slice(b"defg", GuestAddress(DATA + 0x100)).unwrap();
        desc(&mem, 0, DATA, 3, N, 1);
        desc(&mem, 1, DATA + 0x100, 4, N, 2);
        desc(&mem, 2, DATA + 0x200, 5, W | N, 3);
        desc(&mem, 3, DATA + 0x300, 16, W, 0);
        publish(&mem, &mut avail, &[0]);
        assert_eq!(dev.process_queue(0, &mut q, &mem), QueueOutcome::Interrupt);
        assert_eq!(used(&mem).1, vec![(0, 7)]);
        let (mut a, mut b) = ([0u8; 5], [0u8; 2]);
        mem.read_slice(&mut a, GuestAddress(DATA + 0x200)).unwrap();
        mem.read_slice(&mut b, GuestAddress(DATA + 0x300)).unwrap();
        assert_eq!(&a, b"gfedc");
        assert_eq!(&b, b"ba");
    }

    #[test]
    fn a_dead_server_answers_eio_for_the_tag() {
        let mem = testutil::memory();
        let mut q = testutil::queue(16);
        let mut avail = 0;
        let mut dev = P9::new("t", Box::new(Mirror { left: 0 }));
        // Tversion header: size, type 100, tag 0x0102.
        mem.write_slice(&[19, 0, 0, 0, 100, 2, 1], GuestAddress(DATA)).unwrap();
        desc(&mem, 0, DATA, 7, N, 1);
        desc(&mem, 1, DATA + 0x100, 64, W, 0);
        publish(&mem, &mut avail, &[0]);
        dev.process_queue(0, &mut q, &mem);
        assert_eq!(used(&mem).1, vec![(0, 11)]);
        let mut r = [0u8; 11];
        mem.read_slice(&mut r, GuestAddress(DATA + 0x100)).unwrap();
        assert_eq!(r, [11, 0, 0, 0, 7, 2, 1, libc::EIO as u8, 0, 0, 0]);
        // A request outside guest RAM comes back empty; the device goes on.
        desc(&mem, 2, 0xff_ff00, 0x1000, N, 3);
        desc(&mem, 3, DATA + 0x100, 64, W, 0);
        publish(&mem, &mut avail, &[2]);
        dev.process_queue(0, &mut q, &mem);
        assert_eq!(used(&mem).1[1], (2, 0));
    }
}
