//! virtio-blk (virtio 1.2, section 5.2): a raw disk image on the host as a
//! block device in the guest (/dev/vda, /dev/vdb, ... in Linux).
//!
//! What the guest sees: device ID 2, one request queue, a configuration space
//! with the capacity in 512-byte sectors (from the image's size), `seg_max`
//! and `blk_size`, and the features VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SEG_MAX,
//! VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, and VIRTIO_BLK_F_RO for `,ro`.
//!
//! One request is one descriptor chain (5.2.6): a device-readable header
//! (`struct virtio_blk_outhdr`: type, reserved, sector), data buffers, and a
//! device-writable status byte, the last byte of the chain. Types:
//! - VIRTIO_BLK_T_IN: pread from the image straight into guest memory;
//! - VIRTIO_BLK_T_OUT: pwrite from guest memory (VIRTIO_BLK_S_IOERR and no
//!   write at all on a read-only disk);
//! - VIRTIO_BLK_T_FLUSH: fdatasync of the image, so that what the guest
//!   flushed survives `kill -9` of ember;
//! - VIRTIO_BLK_T_GET_ID: the 20-byte serial (`,id=NAME`);
//! - anything else: VIRTIO_BLK_S_UNSUPP.
//!
//! Data path: ioeventfd -> `event_loop.rs` -> `mmio.rs` (notify) ->
//! [`Block::process_queue`] (here: pop a chain) -> [`Request::parse`]
//! (`block/request.rs`: a typed request, or the reason it is refused) ->
//! [`Block::execute`] (pread/pwrite, fdatasync) -> the status byte, add_used
//! -> irqfd.
//!
//! The guest is not trusted. A chain whose walk does not end (a loop, more
//! descriptors than the queue has, a descriptor outside guest RAM) or a head
//! index past the table breaks the queue: DEVICE_NEEDS_RESET. A request
//! without a writable status byte cannot be answered and is returned with
//! length 0. A request with a status byte but a bad header, data buffers of
//! the wrong direction or outside guest RAM, a length that is not whole
//! sectors or sectors past the end is answered VIRTIO_BLK_S_IOERR.
//!
//! The image is locked at start-up, twice: with flock(2) (LOCK_EX for
//! read-write, LOCK_SH for read-only), and with an open file description
//! lock over the whole file (fcntl(2) F_OFD_SETLK: F_WRLCK for read-write,
//! F_RDLCK for read-only). QEMU locks images with OFD locks on single bytes
//! (block/file-posix.c, `raw_apply_lock_bytes`), which flock never sees; a
//! write lock over the whole file conflicts with any of them. So two embers,
//! or ember and QEMU, never write the same image.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use self::request::{DiskLimits, InvalidRequest, Outcome, Request, RequestError, RequestType, Status};
use super::queue::{drain_queue, read_config_bytes};
use super::{QueueOutcome, VirtioDevice, guest_warn};
use crate::config::DiskConfig;
use crate::host_file::{Allow, open_image};

pub mod request;

/// Sector size of the virtio-blk protocol (5.2.6: `sector` counts 512 bytes).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we announce (header and status take two descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Our configuration space: capacity, size_max, seg_max, geometry, blk_size
/// (`struct virtio_blk_config` up to blk_size).
const CONFIG_SIZE: usize = 24;

/// Errors opening a disk image (at start-up: every one ends ember with a message).
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The image's size is not whole sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512: resize it (truncate -s) or pad it")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Another process (an ember, usually) holds the image.
    #[error(
        "disk image {path} is in use by another process{} (it holds a lock on the image: another ember, QEMU, ...): two VMs writing one image would corrupt it",
        if *read_only { " read-write" } else { "" }
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// We asked for a shared (read-only) lock.
        read_only: bool,
    },
    /// The image's size cannot be read.
    #[error("cannot read the size of disk image {path}")]
    Seek {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; CONFIG_SIZE],
}

impl Block {
    /// Opens and locks the image of `disk`.
    pub fn open(disk: &DiskConfig) -> Result<Block, BlockError> {
        let path = disk.path.clone();
        let mut file = open_image(&path, !disk.read_only, Allow::RegularFileOrBlockDevice)
            .map_err(|source| BlockError::Open { path: path.clone(), source })?;
        let op = if disk.read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(BlockError::Locked { path, read_only: disk.read_only });
            }
            // Some file systems (9p, some FUSE) cannot lock: go on unprotected.
            log::warn!("cannot lock disk image {}: {e}; another VM could use it at the same time", path.display());
        }
        if let Err(e) = ofd_lock(&file, disk.read_only) {
            if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(BlockError::Locked { path, read_only: disk.read_only });
            }
            log::warn!("cannot lock disk image {}: {e}; another VM could use it at the same time", path.display());
        }
        // Seeking to the end also sizes a host block device, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(|source| BlockError::Seek { path: path.clone(), source })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::Size { path, size });
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = match &disk.id {
            Some(id) => id.clone(),
            None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block::with_file(file, disk.read_only, size / SECTOR_SIZE, id))
    }

    fn with_file(file: File, read_only: bool, capacity_sectors: u64, id: [u8; 20]) -> Block {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        // size_max (8..12) is not offered; geometry (16..20) neither.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Block { file, read_only, capacity_sectors, id, config }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// What [`Request::parse`] checks a request against.
    pub fn limits(&self) -> DiskLimits {
        DiskLimits { capacity_sectors: self.capacity_sectors, read_only: self.read_only }
    }

    /// Serves one chain (`descs`, in order): parse, execute, write the status
    /// byte. Returns the used length: the bytes written into the guest's
    /// buffers plus the status byte, or 0 when there is no status byte to write.
    fn serve(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let (status, outcome) = match Request::parse(descs, mem, self.limits()) {
            Ok(request) => (request.status, self.execute(&request, mem)),
            Err(RequestError::Invalid { status, reason }) => {
                // A write to a read-only disk is the driver's honest attempt, not a mistake.
                if reason != InvalidRequest::ReadOnly {
                    guest_warn!("virtio-blk: {reason}");
                }
                (status, Outcome::IOERR)
            }
            Err(e) => {
                guest_warn!("virtio-blk: {e}");
                return 0;
            }
        };
        if mem.write_obj(outcome.status.byte(), status).is_err() {
            return 0;
        }
        outcome.bytes_written + 1
    }

    /// Does the I/O of a parsed request (5.2.6); the caller writes the status byte.
    pub fn execute(&mut self, request: &Request, mem: &GuestMemoryMmap) -> Outcome {
        match request.request_type {
            RequestType::In | RequestType::Out => {
                let write = request.request_type == RequestType::Out;
                let mut offset = request.sector * SECTOR_SIZE;
                for d in request.data {
                    if let Err(e) = self.transfer(write, d, offset, mem) {
                        guest_warn!(
                            "virtio-blk: {} of {} bytes at {offset}: {e}",
                            if write { "write" } else { "read" },
                            d.len()
                        );
                        return Outcome::IOERR;
                    }
                    offset += u64::from(d.len());
                }
                // The length fits: a chain carries at most 2^32 bytes (2.7.5.2).
                let total = offset - request.sector * SECTOR_SIZE;
                Outcome::ok(if write { 0 } else { total as u32 })
            }
            RequestType::Flush => {
                if self.read_only {
                    return Outcome::ok(0);
                }
                match self.file.sync_data() {
                    Ok(()) => Outcome::ok(0),
                    Err(e) => {
                        log::error!("virtio-blk: fdatasync of the image failed: {e}");
                        Outcome::IOERR
                    }
                }
            }
            RequestType::GetId => {
                let mut id: &[u8] = &self.id;
                let mut written = 0;
                for d in request.data {
                    let n = id.len().min(d.len() as usize);
                    if mem.write_slice(&id[..n], d.addr()).is_err() {
                        guest_warn!("virtio-blk: GET_ID buffer at {:#x} is outside guest RAM", d.addr().0);
                        return Outcome::IOERR;
                    }
                    id = &id[n..];
                    written += n as u32;
                }
                Outcome::ok(written)
            }
            RequestType::Unsupported(_) => Outcome { status: Status::Unsupp, bytes_written: 0 },
        }
    }

    /// pread/pwrite between the image at `offset` and the guest buffer `d`.
    fn transfer(&self, write: bool, d: &Descriptor, offset: u64, mem: &GuestMemoryMmap) -> std::io::Result<()> {
        let len = d.len() as usize;
        // vm-memory refuses any range that is not entirely guest RAM.
        let slice = mem
            .get_slice(d.addr(), len)
            .map_err(|_| std::io::Error::other(format!("buffer at {:#x} is outside guest RAM", d.addr().0)))?;
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < len {
            let pos = (offset + done as u64) as libc::off_t;
            // SAFETY: `base..base+len` is guest RAM mapped in this process for
            // as long as `guard` (and `mem`) live; `done < len`. The guest may
            // change it concurrently, which only affects the bytes, not safety.
            let n = unsafe {
                let p = base.add(done) as *mut libc::c_void;
                if write { libc::pwrite(fd, p, len - done, pos) } else { libc::pread(fd, p, len - done, pos) }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the image is shorter than it was"));
            }
            done += n as usize;
        }
        Ok(())
    }
}

/// Takes an OFD lock over the whole of `file` (fcntl(2), "Open file
/// description locks"): shared for a read-only disk, exclusive otherwise.
/// It lives as long as the descriptor.
fn ofd_lock(file: &File, read_only: bool) -> std::io::Result<()> {
    // SAFETY: a zeroed flock is valid; l_start = l_len = 0 covers the whole
    // file and l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only { libc::F_RDLCK } else { libc::F_WRLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads `fl`, which outlives the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f =
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `wce` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE, which we do not offer.
        guest_warn!("virtio-blk: write to read-only configuration space at {offset:#x}: ignored");
    }

    fn activate(&mut self, _acked_features: u64) {}

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
        drain_queue(queue, mem, "virtio-blk", |descs| self.serve(descs, mem))
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::{ChainError, collect_chain};
    use crate::devices::virtio::testutil::{self, DATA, desc, publish, used};
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT as NEXT, VRING_DESC_F_WRITE as WRITE};
    use vm_memory::GuestAddress;

    const NEXT_: u16 = NEXT as u16;
    const W: u16 = WRITE as u16;
    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    struct Rig {
        mem: GuestMemoryMmap,
        q: Queue,
        dev: Block,
        /// The image: an unnamed file, so nothing is left behind however the test ends.
        _file: File,
        path: PathBuf,
        avail: u16,
    }

    /// A file with no name (O_TMPFILE, open(2)) holding `bytes`, and a path
    /// that opens it (/proc/self/fd/N) for as long as the `File` lives.
    fn unnamed_file(bytes: &[u8]) -> (File, PathBuf) {
        let dir = std::ffi::CString::new(std::env::temp_dir().into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: open(2) with a valid C string; the descriptor is owned below.
        let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
        assert!(fd >= 0, "O_TMPFILE: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor from open(2), owned by this File only.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.write_all(bytes).unwrap();
        let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
        (f, path)
    }

    /// Removes a named test file when dropped, also when the test panics.
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn rig(read_only: bool) -> Rig {
        let mut img = vec![0u8; 8 * 512];
        for (i, b) in img.iter_mut().enumerate() {
            *b = (i / 512) as u8 + b'a';
        }
        let (file, path) = unnamed_file(&img);
        let dev = Block::open(&DiskConfig { path: path.clone(), read_only, id: Some("test-disk".into()) }).unwrap();
        Rig { mem: testutil::memory(), q: testutil::queue(16), dev, _file: file, path, avail: 0 }
    }

    impl Rig {
        fn header(&self, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }
        /// header, one data buffer of `len` (device-writable if `w`), status.
        fn request(&mut self, kind: u32, sector: u64, len: u32, w: bool) -> (QueueOutcome, u8, Vec<(u32, u32)>) {
            self.header(kind, sector);
            desc(&self.mem, 0, HDR, 16, NEXT_, 1);
            desc(&self.mem, 1, BUF, len, NEXT_ | if w { W } else { 0 }, 2);
            desc(&self.mem, 2, STATUS, 1, W, 0);
            self.run(&[0])
        }
        fn run(&mut self, heads: &[u16]) -> (QueueOutcome, u8, Vec<(u32, u32)>) {
            publish(&self.mem, &mut self.avail, heads);
            let out = self.dev.process_queue(0, &mut self.q, &self.mem);
            (out, self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used(&self.mem).1)
        }
        fn image(&self) -> Vec<u8> {
            let mut v = Vec::new();
            File::open(&self.path).unwrap().read_to_end(&mut v).unwrap();
            v
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    #[test]
    fn config_space_and_features() {
        let r = rig(true);
        let mut b = [0u8; 8];
        r.dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 8, "capacity in sectors");
        let mut b = [0u8; 4];
        r.dev.read_config(20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 512, "blk_size");
        r.dev.read_config(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), SEG_MAX);
        r.dev.read_config(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);
        assert_ne!(r.dev.features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(rig(false).dev.features() & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn read_write_flush_get_id() {
        let mut r = rig(false);
        let (out, st, u) = r.request(VIRTIO_BLK_T_IN, 2, 1024, true);
        assert_eq!((out, st), (QueueOutcome::Interrupt, OK));
        assert_eq!(u, vec![(0, 1025)]);
        let mut buf = vec![0u8; 1024];
        r.mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == b'c') && buf[512..].iter().all(|&b| b == b'd'));

        r.mem.write_slice(&[b'Z'; 512], GuestAddress(BUF)).unwrap();
        let (_, st, u) = r.request(VIRTIO_BLK_T_OUT, 7, 512, false);
        assert_eq!((st, u[1]), (OK, (0, 1)));
        assert!(r.image()[7 * 512..].iter().all(|&b| b == b'Z'));

        r.header(VIRTIO_BLK_T_FLUSH, 0);
        desc(&r.mem, 3, HDR, 16, NEXT_, 4);
        desc(&r.mem, 4, STATUS, 1, W, 0);
        let (_, st, u) = r.run(&[3]);
        assert_eq!((st, u[2]), (OK, (3, 1)));

        let (_, st, u) = r.request(VIRTIO_BLK_T_GET_ID, 0, 20, true);
        assert_eq!((st, u[3]), (OK, (0, 21)));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id, b"test-disk\0\0\0\0\0\0\0\0\0\0\0");

        let (_, st, _) = r.request(99, 0, 512, true);
        assert_eq!(st, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut r = rig(true);
        let before = r.image();
        r.mem.write_slice(&[b'Z'; 512], GuestAddress(BUF)).unwrap();
        let (out, st, u) = r.request(VIRTIO_BLK_T_OUT, 0, 512, false);
        assert_eq!((out, st, u), (QueueOutcome::Interrupt, IOERR, vec![(0, 1)]));
        assert_eq!(r.image(), before);
        // Reads and flushes still work.
        let (_, st, _) = r.request(VIRTIO_BLK_T_IN, 0, 512, true);
        assert_eq!(st, OK);
    }

    #[test]
    fn bad_requests_get_ioerr() {
        let mut r = rig(false);
        let before = r.image();
        for (kind, sector, len, w, why) in [
            (VIRTIO_BLK_T_IN, 7, 1024, true, "past the end"),
            (VIRTIO_BLK_T_IN, u64::MAX, 512, true, "sector overflows"),
            (VIRTIO_BLK_T_IN, 0, 100, true, "not whole sectors"),
            (VIRTIO_BLK_T_IN, 0, 512, false, "read into a read-only buffer"),
            (VIRTIO_BLK_T_OUT, 0, 512, true, "write from a write-only buffer"),
            (VIRTIO_BLK_T_GET_ID, 0, 20, false, "id into a read-only buffer"),
        ] {
            let (out, st, _) = r.request(kind, sector, len, w);
            assert_eq!((out, st), (QueueOutcome::Interrupt, IOERR), "{why}");
        }
        // Data outside guest RAM (1 MiB), or straddling its end.
        for addr in [0x10_0000u64, 0xf_ff00, u64::MAX - 511] {
            r.header(VIRTIO_BLK_T_IN, 0);
            desc(&r.mem, 1, addr, 512, NEXT_ | W, 2);
            let (_, st, _) = r.run(&[0]);
            assert_eq!(st, IOERR, "buffer at {addr:#x}");
        }
        assert_eq!(r.image(), before);
    }

    #[test]
    fn write_only_header_and_read_only_status() {
        let mut r = rig(false);
        r.header(VIRTIO_BLK_T_IN, 0);
        desc(&r.mem, 0, HDR, 16, NEXT_ | W, 1);
        desc(&r.mem, 1, BUF, 512, NEXT_ | W, 2);
        desc(&r.mem, 2, STATUS, 1, W, 0);
        let (out, st, u) = r.run(&[0]);
        assert_eq!((out, st, u), (QueueOutcome::Interrupt, IOERR, vec![(0, 1)]), "write-only header");

        // Read-only status byte: nothing can be answered; the chain comes back with length 0.
        r.header(VIRTIO_BLK_T_IN, 0);
        desc(&r.mem, 0, HDR, 16, NEXT_, 1);
        desc(&r.mem, 2, STATUS, 1, 0, 0);
        let (_, st, u) = r.run(&[0]);
        assert_eq!((st, u[1]), (0xff, (0, 0)));
        // Short header, then a chain of one descriptor.
        desc(&r.mem, 0, HDR, 8, NEXT_, 1);
        desc(&r.mem, 2, STATUS, 1, W, 0);
        let (_, st, _) = r.run(&[0]);
        assert_eq!(st, IOERR);
        desc(&r.mem, 5, STATUS, 1, W, 0);
        r.header(VIRTIO_BLK_T_IN, 0);
        let (_, st, u) = r.run(&[5]);
        assert_eq!((st, u[3]), (0xff, (5, 0)), "a lone status byte is dropped");
        // Status byte outside guest RAM.
        desc(&r.mem, 0, HDR, 16, NEXT_, 2);
        desc(&r.mem, 2, 0x20_0000, 1, W, 0);
        let (_, _, u) = r.run(&[0]);
        assert_eq!(u[4], (0, 0));
    }

    #[test]
    fn broken_chains_need_reset() {
        // A loop: 0 -> 1 -> 0.
        let mut r = rig(false);
        r.header(VIRTIO_BLK_T_IN, 0);
        desc(&r.mem, 0, HDR, 16, NEXT_, 1);
        desc(&r.mem, 1, BUF, 512, NEXT_ | W, 0);
        assert_eq!(r.run(&[0]).0, QueueOutcome::NeedsReset);
        // next past the table (queue size 16).
        let mut r = rig(false);
        desc(&r.mem, 0, HDR, 16, NEXT_, 40);
        assert_eq!(r.run(&[0]).0, QueueOutcome::NeedsReset);
        // Head past the table.
        let mut r = rig(false);
        assert_eq!(r.run(&[16]).0, QueueOutcome::NeedsReset);
        // The available index runs ahead by more than the queue size.
        let mut r = rig(false);
        r.mem.write_obj(100u16, GuestAddress(testutil::AVAIL + 2)).unwrap();
        assert_eq!(r.dev.process_queue(0, &mut r.q, &r.mem), QueueOutcome::NeedsReset);
        // Nothing available: quiet.
        let mut r = rig(false);
        assert_eq!(r.run(&[]).0, QueueOutcome::Quiet);
    }

    #[test]
    fn a_full_queue_of_requests_is_served_in_one_notify() {
        let mut r = rig(false);
        r.header(VIRTIO_BLK_T_IN, 1);
        // Five chains of (header, 512-byte buffer, status), heads 0, 3, 6, 9, 12.
        for c in 0..5u16 {
            let b = 3 * c;
            desc(&r.mem, b, HDR, 16, NEXT_, b + 1);
            desc(&r.mem, b + 1, BUF + 512 * u64::from(c), 512, NEXT_ | W, b + 2);
            desc(&r.mem, b + 2, STATUS, 1, W, 0);
        }
        let (out, st, u) = r.run(&[0, 3, 6, 9, 12]);
        assert_eq!((out, st), (QueueOutcome::Interrupt, OK));
        assert_eq!(u, (0..5).map(|c| (3 * c, 513)).collect::<Vec<_>>());
    }

    #[test]
    fn indirect_descriptors_are_refused() {
        // VIRTIO_RING_F_INDIRECT_DESC is not offered: a chain that points to
        // an indirect table (here a valid one: header, buffer, status) breaks
        // the queue instead of being followed (virtio 1.2, 2.7.5.3.1).
        const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let table = DATA + 0x8000;
        let mut r = rig(false);
        for (i, (addr, len, flags)) in
            [(HDR, 16u32, NEXT_), (BUF, 512, NEXT_ | W), (STATUS, 1, W)].into_iter().enumerate()
        {
            r.mem
                .write_obj(Descriptor::new(addr, len, flags, i as u16 + 1), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        r.header(VIRTIO_BLK_T_IN, 0);
        desc(&r.mem, 0, table, 48, INDIRECT, 0);
        let (out, st, u) = r.run(&[0]);
        assert_eq!((out, st, u), (QueueOutcome::NeedsReset, 0xff, vec![]), "a whole request in an indirect table");
        // An indirect descriptor after a direct one.
        let mut r = rig(false);
        r.header(VIRTIO_BLK_T_IN, 0);
        desc(&r.mem, 0, HDR, 16, NEXT_, 1);
        desc(&r.mem, 1, table + 16, 32, INDIRECT, 0);
        assert_eq!(r.run(&[0]).0, QueueOutcome::NeedsReset, "indirect in the middle of a chain");
        let q = testutil::queue(16);
        assert_eq!(collect_chain(&q, &r.mem, 1).err(), Some(ChainError::Indirect));
    }

    #[test]
    fn open_errors() {
        let dir = std::env::temp_dir();
        let missing = dir.join("ember-blk-test-does-not-exist.img");
        let cfg = |p: &std::path::Path, ro| DiskConfig { path: p.to_path_buf(), read_only: ro, id: None };
        assert!(matches!(Block::open(&cfg(&missing, false)), Err(BlockError::Open { .. })));
        let odd = dir.join(format!("ember-blk-test-odd-{}.img", std::process::id()));
        let _remove = RemoveOnDrop(odd.clone());
        std::fs::write(&odd, [0u8; 513]).unwrap();
        let e = Block::open(&cfg(&odd, false)).err().unwrap();
        assert!(matches!(e, BlockError::Size { size: 513, .. }), "{e}");
        std::fs::write(&odd, [0u8; 1024]).unwrap();
        // One writer excludes another writer and readers; readers share.
        let w = Block::open(&cfg(&odd, false)).unwrap();
        assert!(matches!(Block::open(&cfg(&odd, false)), Err(BlockError::Locked { .. })));
        assert!(matches!(Block::open(&cfg(&odd, true)), Err(BlockError::Locked { .. })));
        drop(w);
        let r1 = Block::open(&cfg(&odd, true)).unwrap();
        let _r2 = Block::open(&cfg(&odd, true)).unwrap();
        assert!(matches!(Block::open(&cfg(&odd, false)), Err(BlockError::Locked { .. })));
        assert_eq!(r1.capacity_sectors(), 2);
        drop(r1);
        drop(_r2);
        // Another process's OFD lock, as QEMU takes them: a read lock on one
        // byte (QEMU's "perm" byte 100 + BLK_PERM_CONSISTENT_READ) keeps
        // writers out; a write lock keeps everyone out.
        for (kind, refused) in [(libc::F_RDLCK, [false, true]), (libc::F_WRLCK, [true, true])] {
            let other = std::fs::OpenOptions::new().read(true).write(true).open(&odd).unwrap();
            // SAFETY: zeroed flock is valid; F_OFD_SETLK reads it.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = kind as libc::c_short;
            fl.l_start = 101;
            fl.l_len = 1;
            // SAFETY: as above.
            assert_eq!(unsafe { libc::fcntl(other.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, 0);
            for (ro, refused) in [true, false].into_iter().zip(refused) {
                let got = Block::open(&cfg(&odd, ro));
                assert_eq!(matches!(got, Err(BlockError::Locked { .. })), refused, "lock {kind}, ro {ro}");
            }
        }
        let r1 = Block::open(&cfg(&odd, true)).unwrap();
        // Without `,id=`, the serial is the file name, cut to 20 bytes.
        assert_eq!(&r1.id[..], &odd.file_name().unwrap().as_encoded_bytes()[..20]);
    }
}
