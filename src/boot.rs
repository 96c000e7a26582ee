//! Loading a kernel the way Linux expects to be loaded.
//!
//! - ELF vmlinux: segments go to their physical addresses (linux-loader's `Elf`).
//!   With a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) the guest is entered in 32-bit
//!   mode at that address with an `hvm_start_info` (xen docs/misc/pvh.pandoc);
//!   without one, at `e_entry` in 64-bit mode with boot_params.
//! - bzImage: the protected-mode kernel goes to 1 MiB, its setup header is copied
//!   into boot_params and the 64-bit entry is 0x200 bytes in (Linux
//!   Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
//! - initrd: as high in low RAM as `initrd_addr_max` allows, page aligned
//!   (boot.rst, the `ramdisk_image` and `initrd_addr_max` fields).
//! - e820 (boot_params.e820_table, or the PVH memory map): exactly the RAM ember
//!   mapped, minus the EBDA and the legacy hole below 1 MiB.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use thiserror::Error;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

use crate::config::KernelSource;
use crate::host_file::{Allow, open_image};
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use crate::memory::low_ram_end;
use crate::x86::regs::EntryMode;

/// e820 / PVH memory types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// boot_params.hdr magic values (boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// boot.rst: xloadflags bit 0, "kernel has the legacy 64-bit entry point at 0x200".
const XLF_KERNEL_64: u16 = 1 << 0;
/// Default `initrd_addr_max` for protocols older than 2.03 and for ELF kernels.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// PVH start info magic ("xEn3" with the high bit set).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the kernel, initrd and boot data.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel's segments or entry point lie outside guest RAM, or it has
    /// nothing to load (found by fuzz/kernel_load: an ELF whose only segment
    /// is empty, at 2^52).
    #[error("{0} loads nothing into guest RAM, or places its code or entry point outside it")]
    KernelOutsideRam(String),
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd file cannot be opened.
    #[error("cannot open initrd {path}")]
    OpenInitrd {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{0} is not a kernel ember can boot: expected an x86-64 ELF vmlinux or a bzImage")]
    NotAKernel(String),
    /// A bzImage without the 64-bit entry point.
    #[error("{0} is a bzImage without a 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)")]
    No64BitEntry(String),
    /// linux-loader rejected the image.
    #[error("cannot load kernel {name} (does it fit in --memory?)")]
    Load {
        /// Which kernel.
        name: String,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "the initrd ({initrd_mib} MiB) does not fit in guest memory below {limit_mib} MiB next to the kernel: give the VM more --memory"
    )]
    InitrdTooBig {
        /// Size of the initrd.
        initrd_mib: u64,
        /// Where low RAM ends.
        limit_mib: u64,
    },
    /// Reading the initrd into guest memory failed.
    #[error("cannot read initrd {path} into guest memory")]
    ReadInitrd {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Guest memory too small for boot structures.
    #[error("cannot write boot data to guest memory (is --memory large enough?)")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// linux-loader's configurator failed.
    #[error("cannot write boot parameters: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
    /// The command line (with what ember adds to it) does not fit in the guest's buffer.
    #[error("the kernel command line is {0} bytes; Linux on x86 accepts at most {max} (shorten --cmdline or the command after --)", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
}

/// What the vCPU setup needs to know about a loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// How the boot vCPU enters the guest.
    pub mode: EntryMode,
    /// First instruction.
    pub entry: GuestAddress,
    /// RSI (boot_params) or EBX (hvm_start_info).
    pub boot_info: GuestAddress,
    /// Where the kernel image starts and ends in guest memory.
    pub kernel_range: (u64, u64),
    /// Where the initrd landed, if any: (address, size).
    pub initrd: Option<(u64, u64)>,
}

/// What kind of image a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux (or a freestanding ELF guest).
    Elf {
        /// It carries a `Linux` ELF note (a Linux vmlinux, not a tiny test guest).
        linux_note: bool,
    },
    /// A bzImage.
    BzImage,
}

/// A kernel image being read: a host file, or bytes built into ember.
enum Image {
    File(File),
    Builtin(Cursor<&'static [u8]>),
}

impl Read for Image {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Image::File(f) => f.read(buf),
            Image::Builtin(c) => c.read(buf),
        }
    }
}

impl Seek for Image {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            Image::File(f) => f.seek(pos),
            Image::Builtin(c) => c.seek(pos),
        }
    }
}

impl ReadVolatile for Image {
    fn read_volatile<B: BitmapSlice>(&mut self, buf: &mut VolatileSlice<B>) -> Result<usize, VolatileMemoryError> {
        match self {
            Image::File(f) => f.read_volatile(buf),
            Image::Builtin(c) => c.read_volatile(buf),
        }
    }
}

fn open_kernel(src: &KernelSource) -> Result<(Image, String), BootError> {
    match src {
        KernelSource::Path(p) => {
            let f = open_image(p, false, Allow::RegularFile)
                .map_err(|source| BootError::OpenKernel { path: p.clone(), source })?;
            Ok((Image::File(f), p.display().to_string()))
        }
        KernelSource::Builtin(bytes) => Ok((Image::Builtin(Cursor::new(*bytes)), "built-in guest".into())),
    }
}

/// Reads enough of the image to tell ELF from bzImage (and Linux from a tiny guest).
pub fn probe_kernel(src: &KernelSource) -> Result<KernelFormat, BootError> {
    let (mut img, name) = open_kernel(src)?;
    let mut head = vec![0u8; 0x300];
    let n = read_up_to(&mut img, &mut head).map_err(|_| BootError::NotAKernel(name.clone()))?;
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        let linux_note = elf_has_note(&mut img, b"Linux").unwrap_or(false);
        return Ok(KernelFormat::Elf { linux_note });
    }
    if head.len() >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel(name))
}

fn read_up_to(r: &mut Image, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Looks for an ELF note named `name` in the PT_NOTE segments of an ELF64 file.
fn elf_has_note(img: &mut Image, name: &[u8]) -> std::io::Result<bool> {
    let mut ehdr = [0u8; 64];
    img.seek(SeekFrom::Start(0))?;
    img.read_exact(&mut ehdr)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize < 56 || phnum > 256 {
        return Ok(false);
    }
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        img.seek(SeekFrom::Start(phoff + i * u64::from(phentsize)))?;
        img.read_exact(&mut ph)?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != 4 {
            continue; // not PT_NOTE
        }
        let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32).min(1 << 16));
        let mut notes = vec![0u8; size as usize];
        img.seek(SeekFrom::Start(off))?;
        img.read_exact(&mut notes)?;
        let mut p = 0usize;
        while p + 12 <= notes.len() {
            let namesz = u32::from_le_bytes(notes[p..p + 4].try_into().unwrap_or([0; 4])) as usize;
            let descsz = u32::from_le_bytes(notes[p + 4..p + 8].try_into().unwrap_or([0; 4])) as usize;
            let n = notes.get(p + 12..p + 12 + namesz).unwrap_or(&[]);
            if n.strip_suffix(&[0]).unwrap_or(n) == name {
                return Ok(true);
            }
            p += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    Ok(false)
}

/// The e820 map for this guest's RAM: everything mapped, minus the EBDA and
/// the 640K-1M hole (where the MP table and, on PCs, the BIOS live).
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// The one check of the kernel command line's length: it and its NUL must fit in the
/// `CMDLINE_MAX_SIZE` bytes at `CMDLINE_START` (layout.rs; Linux boot.rst, "cmdline_size"; the
/// x86 COMMAND_LINE_SIZE). `Vmm::new` calls it on the finished line before any KVM call; the loader
/// calls it again before it writes, as it may be driven directly (fuzz/boot_tables).
pub fn check_cmdline(cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    Ok(())
}

/// Loads the kernel, the initrd and the command line, and writes boot_params
/// (or the PVH start info). Returns where and how to enter the guest.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    src: &KernelSource,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let format = probe_kernel(src)?;
    let (mut img, name) = open_kernel(src)?;
    img.seek(SeekFrom::Start(0)).map_err(|_| BootError::NotAKernel(name.clone()))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |source| BootError::Load { name: name.clone(), source };
    let result: KernelLoaderResult = match format {
        KernelFormat::Elf { .. } => Elf::load(mem, None, &mut img, himem).map_err(load_err)?,
        KernelFormat::BzImage => BzImage::load(mem, None, &mut img, himem).map_err(load_err)?,
    };

    // Where the kernel really ends: a bzImage decompresses in place and needs
    // `init_size` bytes from its load address (boot.rst, "init_size").
    let mut kernel_end = result.kernel_end;
    if let Some(hdr) = result.setup_header {
        kernel_end = kernel_end.max(result.kernel_load.raw_value() + u64::from(hdr.init_size));
        if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry(name));
        }
    }

    // linux-loader checks each segment it copies, not what is left over: an
    // empty segment far above RAM passes and leaves an empty (end < start)
    // kernel range, which the initrd placement below would then trust.
    let entry_in_ram = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(e) => mem.address_in_range(e),
        _ => mem.address_in_range(result.kernel_load),
    };
    if kernel_end <= result.kernel_load.raw_value()
        || !mem.address_in_range(GuestAddress(kernel_end - 1))
        || !entry_in_ram
    {
        return Err(BootError::KernelOutsideRam(name));
    }

    let initrd_max = match result.setup_header {
        Some(hdr) if hdr.version >= 0x0203 => u64::from(hdr.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, path, kernel_end, initrd_max)?),
        None => None,
    };

    check_cmdline(cmdline)?;
    let cmdline_len = cmdline.len();
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline_len as u64))?;

    let kernel_range = (result.kernel_load.raw_value(), kernel_end);
    if let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap {
        write_pvh_start_info(mem, initrd)?;
        return Ok(BootInfo {
            mode: EntryMode::Pvh,
            entry,
            boot_info: GuestAddress(PVH_INFO_START),
            kernel_range,
            initrd,
        });
    }

    let mut params = boot_params::default();
    let entry = match result.setup_header {
        Some(hdr) => {
            params.hdr = hdr;
            result.kernel_load.unchecked_add(0x200)
        }
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            result.kernel_load
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *kind };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;

    Ok(BootInfo { mode: EntryMode::Long64, entry, boot_info: GuestAddress(ZERO_PAGE_START), kernel_range, initrd })
}

/// Copies the initrd to the highest page-aligned address that stays below both
/// `initrd_max` and the end of low RAM, and above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64, initrd_max: u64) -> Result<(u64, u64), BootError> {
    let mut f = open_initrd(path)?;
    let size = f
        .seek(SeekFrom::End(0))
        .and_then(|s| f.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(|source| BootError::OpenInitrd { path: path.to_path_buf(), source })?;
    let top = low_ram_end(mem).min(initrd_max.saturating_add(1));
    let too_big = BootError::InitrdTooBig { initrd_mib: size.div_ceil(1 << 20), limit_mib: top >> 20 };
    let addr = top.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.next_multiple_of(PAGE_SIZE) {
        return Err(BootError::InitrdTooBig { initrd_mib: size.div_ceil(1 << 20), limit_mib: top >> 20 });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|source| BootError::ReadInitrd { path: path.to_path_buf(), source })?;
    Ok((addr, size))
}

/// Opens the initrd: a regular file (a FIFO would hang the open, a directory has no size).
pub fn open_initrd(path: &Path) -> Result<File, BootError> {
    open_image(path, false, Allow::RegularFile)
        .map_err(|source| BootError::OpenInitrd { path: path.to_path_buf(), source })
}

/// Writes `hvm_start_info`, the memory map and the module list (the initrd).
fn write_pvh_start_info(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry { addr, size, type_, reserved: 0 })
        .collect();
    let modlist_addr = PVH_MEMMAP_START + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
        let module = hvm_modlist_entry { paddr, size, ..Default::default() };
        params.set_modules(&[module], GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn e820_matches_mapped_ram_below_gap() {
        let mem = create_guest_memory(256 << 20).unwrap();
        assert_eq!(e820_map(&mem), vec![(0, 0x9fc00, 1), (0x9fc00, 0x400, 2), (0x10_0000, (256 << 20) - 0x10_0000, 1)]);
    }

    #[test]
    fn e820_splits_around_the_mmio_gap() {
        let mem = create_guest_memory(3584 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[2], (0x10_0000, 0xc000_0000 - 0x10_0000, 1));
        assert_eq!(map[3], (0x1_0000_0000, 512 << 20, 1));
        let ram: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert_eq!(ram, (3584 << 20) - (0x10_0000 - 0x9fc00));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let src = KernelSource::Builtin(b"#!/bin/sh\necho hello, I am not a kernel\n");
        assert!(matches!(probe_kernel(&src), Err(BootError::NotAKernel(_))));
        assert!(matches!(probe_kernel(&KernelSource::Builtin(b"")), Err(BootError::NotAKernel(_))));
    }

    /// A minimal ELF64 with one PT_LOAD at 1 MiB holding `hlt`.
    fn tiny_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x1001];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
        f[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
        f[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
        f[ph + 32..ph + 40].copy_from_slice(&1u64.to_le_bytes()); // filesz
        f[ph + 40..ph + 48].copy_from_slice(&1u64.to_le_bytes()); // memsz
        f[0x1000] = 0xf4;
        f
    }

    #[test]
    fn elf_loads_with_boot_params_and_cmdline() {
        let elf: &'static [u8] = Box::leak(tiny_elf().into_boxed_slice());
        let src = KernelSource::Builtin(elf);
        assert_eq!(probe_kernel(&src).unwrap(), KernelFormat::Elf { linux_note: false });
        let mem = create_guest_memory(64 << 20).unwrap();
        let info = load_kernel(&mem, &src, None, "console=ttyS0 hello").unwrap();
        assert_eq!(info.mode, EntryMode::Long64);
        assert_eq!(info.entry, GuestAddress(0x10_0000));
        let hlt: u8 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(hlt, 0xf4);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 19);
        assert_eq!(params.e820_entries, 3);
        let mut cl = [0u8; 20];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cl, b"console=ttyS0 hello\0");
    }

    #[test]
    fn a_kernel_that_loads_nothing_into_ram_is_refused() {
        // fuzz/kernel_load's find: one empty segment, and the entry, at 2^52.
        let mut f = tiny_elf();
        let ph = 64;
        f[24..32].copy_from_slice(&(1u64 << 52).to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&(1u64 << 52).to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&(1u64 << 52).to_le_bytes());
        f[ph + 32..ph + 48].fill(0);
        let src = KernelSource::Builtin(Box::leak(f.into_boxed_slice()));
        let mem = create_guest_memory(64 << 20).unwrap();
        assert!(matches!(load_kernel(&mem, &src, None, ""), Err(BootError::KernelOutsideRam(_))));
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let elf: &'static [u8] = Box::leak(tiny_elf().into_boxed_slice());
        let src = KernelSource::Builtin(elf);
        let dir = std::env::temp_dir().join(format!("ember-initrd-test-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 10_000]).unwrap();
        let mem = create_guest_memory(64 << 20).unwrap();
        let info = load_kernel(&mem, &src, Some(&dir), "").unwrap();
        let (addr, size) = info.initrd.unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + size > (64 << 20) - 8192);
        std::fs::write(&dir, vec![7u8; 70 << 20]).unwrap();
        let mem = create_guest_memory(64 << 20).unwrap();
        assert!(matches!(load_kernel(&mem, &src, Some(&dir), ""), Err(BootError::InitrdTooBig { .. })));
        std::fs::remove_file(&dir).unwrap();
    }
}
