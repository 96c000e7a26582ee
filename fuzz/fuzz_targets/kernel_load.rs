//! Kernel loading: arbitrary bytes as the `--kernel` file (and, when the
//! input says so, an `--initrd`) through ember's probe and load path
//! (`boot::probe_kernel`, `boot::load_kernel`: ELF, PVH, bzImage) into guest
//! memory of a size from the input. A kernel ember accepts must land above
//! 1 MiB and inside RAM, with the command line, the initrd's bytes and the
//! boot_params (or PVH start info) where the vCPU setup will look for them.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use ember::boot::{self, KernelFormat};
use ember::config::KernelSource;
use ember::layout::{CMDLINE_START, HIMEM_START, PVH_INFO_START, ZERO_PAGE_START};
use ember::memory;
use ember::x86::regs::EntryMode;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const CMDLINE: &str = "console=ttyS0 quiet";
/// `XEN_HVM_START_MAGIC_VALUE` (xen/include/public/arch-x86/hvm/start_info.h).
const PVH_MAGIC: u32 = 0x336e_c578;

/// The kernel or the initrd: a memfd (memfd_create(2): a regular file in
/// memory, cheaper to rewrite every run than one on disk) reached by its
/// /proc/self/fd path, so no run, however it ends, leaves files behind.
fn scratch(name: &str) -> &'static (File, PathBuf) {
    fn unnamed() -> (File, PathBuf) {
        // SAFETY: memfd_create(2) with a valid C string; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"fuzz-kernel-load".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor from open(2), owned by this File only.
        (unsafe { File::from_raw_fd(fd) }, PathBuf::from(format!("/proc/self/fd/{fd}")))
    }
    static KERNEL: OnceLock<(File, PathBuf)> = OnceLock::new();
    static INITRD: OnceLock<(File, PathBuf)> = OnceLock::new();
    let cell = if name == "kernel" { &KERNEL } else { &INITRD };
    cell.get_or_init(unnamed)
}

/// Replaces the contents of a scratch file (overwritten in place, then cut to length).
fn put(name: &str, bytes: &[u8]) {
    let f = &scratch(name).0;
    f.write_all_at(bytes, 0).expect("write");
    f.set_len(bytes.len() as u64).expect("truncate");
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    // 2..=33 MiB of RAM; the kernel and initrd split where the input says.
    let mem_size = (2 + u64::from(flags & 31)) << 20;
    let (kernel, initrd) = match (flags & 0x80 != 0, rest.len()) {
        (true, n) if n >= 2 => {
            let at = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(n - 2);
            let (k, i) = rest[2..].split_at(at);
            (k, Some(i))
        }
        _ => (rest, None),
    };
    put("kernel", kernel);
    if let Some(i) = initrd {
        put("initrd", i);
    }
    let src = KernelSource::Path(scratch("kernel").1.clone());
    let format = boot::probe_kernel(&src);
    let mem = memory::create_guest_memory(mem_size).expect("guest memory");
    let loaded = boot::load_kernel(&mem, &src, initrd.map(|_| scratch("initrd").1.as_path()), CMDLINE);
    let Ok(info) = loaded else { return };
    assert!(format.is_ok(), "loaded what the probe refused");
    let ram_end = memory::low_ram_end(&mem);
    let (start, end) = info.kernel_range;
    assert!(start >= HIMEM_START && start <= end, "kernel at {start:#x}..{end:#x}");
    assert!(mem.address_in_range(GuestAddress(start)), "kernel outside RAM");

    let mut cmdline = vec![0u8; CMDLINE.len() + 1];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START)).expect("in RAM");
    assert_eq!(&cmdline[..CMDLINE.len()], CMDLINE.as_bytes());
    assert_eq!(cmdline[CMDLINE.len()], 0);

    if let (Some((addr, size)), Some(bytes)) = (info.initrd, initrd) {
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(addr % 4096, 0, "initrd not page-aligned");
        assert!(addr >= end && addr + size <= ram_end, "initrd at {addr:#x}+{size:#x}, kernel ends {end:#x}");
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, GuestAddress(addr)).expect("in RAM");
        assert!(back == bytes, "initrd bytes changed");
    } else {
        assert!(info.initrd.is_none() == initrd.is_none(), "initrd lost");
    }

    match info.mode {
        EntryMode::Pvh => {
            assert_eq!(info.boot_info, GuestAddress(PVH_INFO_START));
            assert!(matches!(format, Ok(KernelFormat::Elf { .. })), "PVH from a bzImage");
            let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("in RAM");
            assert_eq!(magic, PVH_MAGIC);
        }
        EntryMode::Long64 => {
            assert_eq!(info.boot_info, GuestAddress(ZERO_PAGE_START));
            // boot_params (Documentation/arch/x86/zero-page.rst): e820_entries
            // at 0x1e8, type_of_loader at 0x210, cmd_line_ptr at 0x228.
            let zp = ZERO_PAGE_START;
            let entries: u8 = mem.read_obj(GuestAddress(zp + 0x1e8)).expect("in RAM");
            assert_eq!(usize::from(entries), boot::e820_map(&mem).len());
            let loader: u8 = mem.read_obj(GuestAddress(zp + 0x210)).expect("in RAM");
            assert_eq!(loader, 0xff);
            let ptr: u32 = mem.read_obj(GuestAddress(zp + 0x228)).expect("in RAM");
            assert_eq!(u64::from(ptr), CMDLINE_START);
        }
    }
});
