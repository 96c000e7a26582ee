//! The boot structures `Vmm::new` writes (steps 4-5: `boot::load_kernel`,
//! `regs::setup_gdt_idt`/`setup_page_tables`, `mptable::setup_mptable`,
//! `acpi::setup_acpi`) for configs from the input: memory size, vCPU count,
//! command line, an initrd of some size, a number of virtio-mmio devices. The
//! kernel is one of ember's built-in guests.
//!
//! Invariants, beyond "no panic": a config that `VmConfig::validate` or
//! `boot::check_cmdline` refuses may fail to build but never panics; for one
//! they accept that builds:
//! - e820 (Linux boot.rst, zero-page.rst; the PVH memory map the same): sorted,
//!   non-overlapping, non-empty entries; RAM only where guest RAM is, never in
//!   the EBDA, the 640K-1M hole or the MMIO gap (layout.rs), and all guest RAM
//!   from 1 MiB up listed as RAM; the zero page's copy equals `boot::e820_map`;
//! - the MP table (MP spec 1.4, 4.1-4.3): both checksums zero, one processor
//!   entry per vCPU with APIC ids 0..n, one bootstrap processor, the IOAPIC id
//!   after them, and the entries exactly fill the stated length;
//! - the ACPI tables (ACPI 6.4, 5.2.5.3, 5.2.6): RSDP checksums, every table's
//!   checksum and length, the XSDT leading to the FADT and MADT and the FADT to
//!   the DSDT, one MADT local APIC per vCPU, one LNRO0005 device per slot, all
//!   inside `ACPI_START..+ACPI_SIZE`;
//! - every structure (GDT, IDT, zero page or PVH start info, page tables,
//!   command line, MP table, ACPI tables, kernel, initrd) lies in guest RAM
//!   and none overlaps another; the initrd's bytes and the command line are
//!   where the zero page says.
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use ember::boot;
use ember::config::{KernelSource, RngMode, VmConfig};
use ember::demo::{ECHO_GUEST, HELLO_GUEST};
use ember::layout::*;
use ember::memory;
use ember::x86::regs::{self, EntryMode};
use ember::x86::{acpi, mptable};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The initrd: a memfd (memfd_create(2), a regular file in memory, nothing
/// left behind whatever ends the run), reached by its /proc/self/fd path.
fn initrd_file() -> &'static (File, PathBuf) {
    static F: OnceLock<(File, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        // SAFETY: memfd_create(2) with a valid C string; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"fuzz-initrd".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor, owned by this File only.
        let f = unsafe { File::from_raw_fd(fd) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        (f, path)
    })
}

/// The largest initrd an input asks for.
const INITRD_MAX: usize = 8 << 20;

/// The bytes every initrd is a window of: a xorshift stream, without the short
/// period of a byte counter (a copy misplaced by a page, or by any multiple of
/// 256 bytes, shows). Built once.
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..INITRD_MAX + 256)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    })
}

/// Makes the initrd file hold exactly `bytes` (`pattern()[seed..][..n]`),
/// rewriting only what differs from the last run's (same seed: only the tail).
fn put_initrd(seed: u8, bytes: &[u8]) {
    static HELD: Mutex<(u8, usize)> = Mutex::new((0, 0));
    let f = &initrd_file().0;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let (old_seed, old_len) = *held;
    let from = if old_seed == seed { old_len.min(bytes.len()) } else { 0 };
    f.write_all_at(&bytes[from..], from as u64).expect("write the initrd");
    if bytes.len() < old_len {
        f.set_len(bytes.len() as u64).expect("truncate the initrd");
    }
    *held = (seed, bytes.len());
}

/// The initrd size an input asks for (two bytes): small (byte-exact, below 32
/// KiB) or, half the time, within 64 KiB of the room between the kernel and the
/// top of low RAM (where it stops fitting), when that room is at most 8 MiB;
/// beyond, up to 256 KiB.
fn initrd_size(raw: u64, mem_size: u64, kernel: &[u8]) -> usize {
    if raw < 0x8000 {
        return raw as usize;
    }
    let top = mem_size.min(MMIO_GAP_START);
    let room = top.saturating_sub(HIMEM_START + kernel.len() as u64) as i64;
    let delta = ((raw & 0x7fff) as i64 - 0x4000) * 4;
    if room <= (INITRD_MAX as i64) - (64 << 10) {
        (room + delta).clamp(0, INITRD_MAX as i64) as usize
    } else {
        (raw & 0x7fff) as usize * 8
    }
}

fn take(input: &mut &[u8], n: usize) -> u64 {
    let n = n.min(input.len());
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&input[..n]);
    *input = &input[n..];
    u64::from_le_bytes(b)
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap_or_else(|e| panic!("{addr:#x}+{len:#x} not in RAM: {e}"));
    b
}

/// Guest RAM at `addr` holds `want` (read a page at a time: no buffer the size of an initrd).
fn ram_holds(mem: &GuestMemoryMmap, addr: u64, want: &[u8]) -> bool {
    let mut page = [0u8; 4096];
    want.chunks(page.len()).enumerate().all(|(i, c)| {
        let at = addr + (i * page.len()) as u64;
        mem.read_slice(&mut page[..c.len()], GuestAddress(at)).unwrap_or_else(|e| panic!("{at:#x} not in RAM: {e}"));
        page[..c.len()] == *c
    })
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// `addr..addr+len` lies inside one region of guest RAM.
fn in_ram(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    len > 0 && mem.find_region(GuestAddress(addr)).is_some_and(|r| addr + len <= r.start_addr().0 + r.len())
}

/// An SDT at `addr` (ACPI 6.4, 5.2.6): its bytes, checked to sum to zero and to lie in the ACPI area.
fn sdt(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4], regions: &mut Vec<(u64, u64, &'static str)>) -> Vec<u8> {
    let head = read(mem, addr, 36);
    assert_eq!(&head[..4], sig, "table at {addr:#x}");
    let len = u32_at(&head, 4) as usize;
    assert!(len >= 36, "{sig:?} length {len}");
    assert!(addr >= ACPI_START && addr + len as u64 <= ACPI_START + ACPI_SIZE, "{sig:?} outside the ACPI area");
    let t = read(mem, addr, len);
    assert_eq!(sum(&t), 0, "{sig:?} checksum");
    regions.push((addr, addr + len as u64, "acpi table"));
    t
}

fn check_acpi(mem: &GuestMemoryMmap, cpus: u8, slots: usize, regions: &mut Vec<(u64, u64, &'static str)>) {
    let rsdp = read(mem, ACPI_START, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    regions.push((ACPI_START, ACPI_START + 36, "rsdp"));
    let xsdt = sdt(mem, u64_at(&rsdp, 24), b"XSDT", regions);
    let entries: Vec<u64> = xsdt[36..].chunks_exact(8).map(|c| u64_at(c, 0)).collect();
    assert_eq!((xsdt.len() - 36) % 8, 0);
    let mut seen = (false, false);
    for e in entries {
        let sig: [u8; 4] = read(mem, e, 4).try_into().expect("4 bytes");
        match &sig {
            b"FACP" => {
                let fadt = sdt(mem, e, b"FACP", regions);
                let dsdt_at = u64_at(&fadt, 140);
                assert_eq!(u64::from(u32_at(&fadt, 40)), dsdt_at, "DSDT and X_DSDT differ");
                let dsdt = sdt(mem, dsdt_at, b"DSDT", regions);
                let devices = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
                assert_eq!(devices, slots, "virtio-mmio devices in the DSDT");
                seen.0 = true;
            }
            b"APIC" => {
                let madt = sdt(mem, e, b"APIC", regions);
                let (mut off, mut ids, mut ioapic) = (44, Vec::new(), None);
                while off < madt.len() {
                    let (kind, len) = (madt[off], usize::from(madt[off + 1]));
                    assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off} of length {len}");
                    match kind {
                        0 => ids.push(madt[off + 3]),
                        1 => ioapic = Some(madt[off + 2]),
                        _ => {}
                    }
                    off += len;
                }
                assert_eq!(ids, (0..cpus).collect::<Vec<_>>(), "MADT local APICs");
                assert_eq!(ioapic, Some(cpus), "MADT IOAPIC id");
                seen.1 = true;
            }
            s => panic!("XSDT points at {s:?}"),
        }
    }
    assert_eq!(seen, (true, true), "XSDT lacks the FADT or the MADT");
}

fn check_mptable(mem: &GuestMemoryMmap, cpus: u8, regions: &mut Vec<(u64, u64, &'static str)>) {
    let f = read(mem, MPTABLE_START, 16);
    assert_eq!(&f[..4], b"_MP_");
    assert_eq!(sum(&f), 0, "MP floating pointer checksum");
    let at = u64::from(u32_at(&f, 4));
    let head = read(mem, at, 44);
    assert_eq!(&head[..4], b"PCMP");
    let len = usize::from(u16::from_le_bytes([head[4], head[5]]));
    let t = read(mem, at, len);
    assert_eq!(sum(&t), 0, "MP table checksum");
    let count = u16::from_le_bytes([t[34], t[35]]);
    let (mut off, mut ids, mut bsps, mut ioapic) = (44, Vec::new(), 0, None);
    for _ in 0..count {
        match t[off] {
            0 => {
                ids.push(t[off + 1]);
                bsps += usize::from(t[off + 3] & 2 != 0);
                off += 20;
            }
            2 => {
                ioapic = Some(t[off + 1]);
                off += 8;
            }
            _ => off += 8,
        }
        assert!(off <= len, "MP entries run past the table");
    }
    assert_eq!(off, len, "MP entries do not fill the table");
    assert_eq!(ids, (0..cpus).collect::<Vec<_>>(), "MP processor entries");
    assert_eq!((bsps, ioapic), (1, Some(cpus)), "bootstrap processors, IOAPIC id");
    regions.push((MPTABLE_START, MPTABLE_START + 16, "mp floating pointer"));
    regions.push((at, at + len as u64, "mp table"));
}

/// e820 entries `(addr, size, type)` against guest RAM and the holes.
fn check_e820(mem: &GuestMemoryMmap, map: &[(u64, u64, u32)]) {
    assert!(!map.is_empty() && map.len() <= 128, "{} e820 entries", map.len());
    let holes = [(EBDA_START, HIMEM_START), (MMIO_GAP_START, MMIO_GAP_END)];
    for w in map.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "e820 unsorted or overlapping: {map:x?}");
    }
    for &(addr, size, kind) in map {
        assert!(size > 0 && addr.checked_add(size).is_some(), "e820 entry {addr:#x}+{size:#x}");
        if kind == 1 {
            assert!(in_ram(mem, addr, size), "e820 RAM {addr:#x}+{size:#x} is not guest RAM");
            for (s, e) in holes {
                assert!(addr + size <= s || addr >= e, "e820 RAM {addr:#x}+{size:#x} covers the hole {s:#x}..{e:#x}");
            }
        }
    }
    for region in mem.iter() {
        let (start, end) = (region.start_addr().0.max(HIMEM_START), region.start_addr().0 + region.len());
        if start < end {
            let listed = map.iter().any(|&(a, s, k)| k == 1 && a <= start && end <= a + s);
            assert!(listed, "guest RAM {start:#x}..{end:#x} missing from e820 {map:x?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let shape = take(&mut input, 1) as u8;
    let mem_size = match shape % 4 {
        0 => take(&mut input, 2) << 12,               // up to 256 MiB in pages
        1 => (take(&mut input, 2) & 0x1fff) << 20,    // up to 8 GiB in MiB
        2 => (2 << 20) + (take(&mut input, 1) << 12), // just above the minimum
        _ => take(&mut input, 4) & 0xffff_ffff,       // anything below 4 GiB
    };
    let cpus = match (shape >> 2) % 4 {
        0 => 1,
        1 => take(&mut input, 1) as u8 % 8,
        _ => take(&mut input, 1) as u8,
    };
    let initrd_raw = (shape & 0x10 != 0).then(|| take(&mut input, 2));
    let slots = take(&mut input, 1) as usize % 40;
    let with_acpi = shape & 0x20 == 0;
    let kernel = if shape & 0x40 == 0 { ECHO_GUEST } else { HELLO_GUEST };
    let initrd_len = initrd_raw.map(|raw| initrd_size(raw, mem_size, kernel));
    let cmdline_len = (take(&mut input, 2) as usize % 2200).min(input.len());
    let cmdline = String::from_utf8_lossy(&input[..cmdline_len]).into_owned();
    let seed = take(&mut input, 1) as u8;

    let mut cfg = VmConfig::new(KernelSource::Builtin(kernel));
    cfg.cpus = cpus;
    cfg.mem_size_bytes = mem_size;
    cfg.cmdline = cmdline.clone();
    cfg.rng = RngMode::Off;
    cfg.acpi = with_acpi;
    let valid =
        cfg.validate().is_ok() && boot::check_cmdline(&cmdline).is_ok() && slots <= ember::config::MAX_VIRTIO_DEVICES;
    if !valid && mem_size > 64 << 20 {
        return; // an impossible config that would only cost time to map
    }
    let Ok(mem) = memory::create_guest_memory(mem_size) else {
        assert!(!valid, "no guest memory for a valid config of {mem_size:#x} bytes");
        return;
    };
    let initrd = initrd_len.map(|n| {
        let bytes = &pattern()[usize::from(seed)..][..n];
        put_initrd(seed, bytes);
        (initrd_file().1.clone(), bytes)
    });

    // Vmm::new's steps 4-5, in its order.
    let Ok(info) =
        boot::load_kernel(&mem, &KernelSource::Builtin(kernel), initrd.as_ref().map(|(p, _)| p.as_path()), &cmdline)
    else {
        return;
    };
    let long64 = info.mode == EntryMode::Long64;
    let slot_list: Vec<acpi::MmioSlot> = (0..slots)
        .map(|i| {
            let (base, gsi) = ember::vmm::virtio_slot(i);
            acpi::MmioSlot { base, size: VIRTIO_MMIO_SIZE, gsi }
        })
        .collect();
    let built = regs::setup_gdt_idt(&mem).is_ok()
        && (!long64 || regs::setup_page_tables(&mem).is_ok())
        && mptable::setup_mptable(&mem, cpus).is_ok()
        && (!with_acpi || acpi::setup_acpi(&mem, cpus, &slot_list).is_ok());
    if !valid {
        return;
    }
    assert!(built, "a valid config's boot tables failed");

    let mut regions: Vec<(u64, u64, &'static str)> = Vec::new();
    regions.push((BOOT_GDT_START, BOOT_GDT_START + 5 * 8, "gdt"));
    regions.push((BOOT_IDT_START, BOOT_IDT_START + 8, "idt"));
    regions.push((CMDLINE_START, CMDLINE_START + cmdline.len() as u64 + 1, "cmdline"));
    regions.push((info.kernel_range.0, info.kernel_range.1, "kernel"));
    let map = boot::e820_map(&mem);
    check_e820(&mem, &map);
    assert_eq!(read(&mem, CMDLINE_START, cmdline.len() + 1), [cmdline.as_bytes(), &[0]].concat(), "cmdline");

    if long64 {
        regions.push((ZERO_PAGE_START, ZERO_PAGE_START + 4096, "zero page"));
        regions.push((PML4_START, PDE_START + 4 * 4096, "page tables"));
        let zp = read(&mem, ZERO_PAGE_START, 4096);
        // zero-page.rst: e820_entries at 0x1e8, e820_table at 0x2d0 (20-byte
        // entries); boot.rst: ramdisk_image 0x218, ramdisk_size 0x21c,
        // cmd_line_ptr 0x228, cmdline_size 0x238.
        let n = usize::from(zp[0x1e8]);
        let table: Vec<(u64, u64, u32)> = (0..n)
            .map(|i| {
                let e = 0x2d0 + 20 * i;
                (u64_at(&zp, e), u64_at(&zp, e + 8), u32_at(&zp, e + 16))
            })
            .collect();
        assert_eq!(table, map, "the zero page's e820 table");
        assert_eq!(u64::from(u32_at(&zp, 0x228)), CMDLINE_START);
        assert_eq!(u32_at(&zp, 0x238) as usize, cmdline.len());
        let ramdisk = (u64::from(u32_at(&zp, 0x218)), u64::from(u32_at(&zp, 0x21c)));
        assert_eq!(ramdisk, info.initrd.unwrap_or((0, 0)), "ramdisk_image/size");
    } else {
        regions.push((PVH_INFO_START, PVH_INFO_START + 56, "pvh start info"));
        let start = read(&mem, PVH_INFO_START, 56);
        let n = u32_at(&start, 48) as usize;
        let memmap: Vec<(u64, u64, u32)> = read(&mem, u64_at(&start, 40), 24 * n)
            .chunks_exact(24)
            .map(|e| (u64_at(e, 0), u64_at(e, 8), u32_at(e, 16)))
            .collect();
        assert_eq!(memmap, map, "the PVH memory map");
        regions.push((PVH_MEMMAP_START, PVH_MEMMAP_START + 24 * n as u64 + 32, "pvh memmap and modules"));
    }

    match (info.initrd, &initrd) {
        (Some((addr, size)), Some((_, bytes))) if !bytes.is_empty() => {
            assert_eq!(size as usize, bytes.len());
            assert_eq!(addr % 4096, 0, "initrd not page aligned");
            assert!(addr + size <= memory::low_ram_end(&mem), "initrd above low RAM");
            assert!(ram_holds(&mem, addr, bytes), "initrd bytes changed");
            regions.push((addr, addr + size, "initrd"));
        }
        (Some(_), Some(_)) => {}
        (got, want) => assert_eq!(got.is_some(), want.is_some(), "initrd lost or invented"),
    }
    check_mptable(&mem, cpus, &mut regions);
    if with_acpi {
        check_acpi(&mem, cpus, slots, &mut regions);
    }
    for &(s, e, what) in &regions {
        assert!(s < e && in_ram(&mem, s, e - s), "{what} at {s:#x}..{e:#x} is not in guest RAM");
    }
    // What the guest reads after boot (MP spec 4.1, ACPI 6.4 15.1) must not be RAM it may reuse.
    for &(s, e, what) in regions.iter().filter(|r| r.2.starts_with("mp") || r.2.starts_with("acpi") || r.2 == "rsdp") {
        let ram = map.iter().any(|&(a, n, k)| k == 1 && s < a + n && a < e);
        assert!(!ram, "{what} at {s:#x}..{e:#x} is e820 RAM");
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let same_acpi = a.2.starts_with("acpi") && b.2.starts_with("acpi") && a.0 == b.0;
            assert!(
                same_acpi || a.1 <= b.0 || b.1 <= a.0,
                "{} {:#x}..{:#x} overlaps {} {:#x}..{:#x}",
                a.2,
                a.0,
                a.1,
                b.2,
                b.0,
                b.1
            );
        }
    }
});
