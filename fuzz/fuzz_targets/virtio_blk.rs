//! virtio-blk behind the virtio-mmio transport, over guest memory built from
//! the input: the driver's setup (queue size and ring addresses from the
//! input), then notifies, while the descriptor table, the rings, the request
//! headers and the data all come from the fuzzer. Nothing may panic, and the
//! disk image (a temporary file) must never be written past its end.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use ember::bus::BusDevice;
use ember::config::DiskConfig;
use ember::devices::irq::IrqLine;
use ember::devices::virtio::block::Block;
use ember::devices::virtio::mmio::MmioTransport;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest RAM: 256 KiB, the input copied in from address 0.
const MEM_SIZE: usize = 256 << 10;
/// The image: 64 sectors.
const IMAGE_SIZE: u64 = 64 * 512;

/// The image: a memfd (memfd_create(2), a regular file in memory) opened
/// through its /proc/self/fd path, so no run, however it ends, leaves a file
/// behind.
fn image() -> &'static (File, PathBuf) {
    static IMAGE: OnceLock<(File, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        // SAFETY: memfd_create(2) with a valid C string; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"fuzz-virtio-blk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor, owned by this File only.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(IMAGE_SIZE).expect("size the image");
        (f, PathBuf::from(format!("/proc/self/fd/{fd}")))
    })
}

fn w(t: &mut MmioTransport, reg: u32, value: u32) {
    t.write(u64::from(reg), &value.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("in range");
    let word = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);

    let disk = DiskConfig { path: image().1.clone(), read_only: data[0] & 1 != 0, id: None };
    let Ok(block) = Block::open(&disk) else { return };
    let irq = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    let mut t = MmioTransport::new(Box::new(block), mem, IrqLine::Irqfd(irq));

    // The Linux driver's sequence (virtio 1.2, 3.1.1 and 4.2.3.2), with the
    // queue size and ring addresses from the input's first words.
    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(&mut t, VIRTIO_MMIO_STATUS, status);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 1 << (data[1] % 9));
    let rings = word(4) % MEM_SIZE as u32;
    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, rings & !15);
    w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (word(8) % MEM_SIZE as u32) & !1);
    w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, (word(12) % MEM_SIZE as u32) & !3);
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
    for _ in 0..=data[2] % 4 {
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }
    assert_eq!(image().0.metadata().map(|m| m.len()).ok(), Some(IMAGE_SIZE), "the image never grows");
});
