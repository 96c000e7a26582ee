//! Guest RAM: anonymous host memory (vm-memory's `GuestMemoryMmap`) registered
//! with KVM as memory slots (KVM api.rst, 4.35 KVM_SET_USER_MEMORY_REGION).
//!
//! The mapping is `MAP_NORESERVE` and untouched: a page of guest RAM costs the
//! host nothing until the guest (or the loader) first writes it, so a 1 GiB
//! guest that uses 20 MiB costs 20 MiB. Each range's host mapping starts on a
//! 2 MiB boundary like its guest address, so KVM may back it with huge nested
//! pages where the host gives it transparent huge pages ([`HOST_RAM_ALIGN`]).
//!
//! Above `layout::MMIO_GAP_START` the RAM is split: the 32-bit window below
//! 4 GiB belongs to devices (virtio-mmio, IOAPIC, LAPIC), and the rest of the
//! RAM continues at 4 GiB. The e820 map handed to the guest says exactly this.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors while creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The host refused the anonymous mapping.
    #[error("cannot map {size_mib} MiB of guest memory")]
    Mmap {
        /// Requested size.
        size_mib: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot}")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The guest-physical RAM ranges for `size` bytes of RAM: `(start, length)`.
/// None for 0 bytes: a region of length 0 is no region (vm-memory's
/// `last_addr` would underflow, and `register_guest_memory` would find no
/// first byte); mapping it is then an error, not a panic later (found by
/// fuzz/boot_tables; a snapshot's state file names any size, and `restore`
/// maps it before anything else looks at it).
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size == 0 {
        Vec::new()
    } else if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START as usize), (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize)]
    }
}

/// Host alignment of each RAM range: a 2 MiB page (Intel SDM vol. 3A 4.5, AMD APM vol. 2 5.3.4).
///
/// KVM maps guest memory with huge pages only where the guest-physical and the host-virtual address
/// agree modulo the huge page size; one misaligned slot gets 4 KiB nested page mappings throughout
/// (KVM's `kvm_alloc_memslot_metadata`, "If the gfn and userspace address are not aligned wrt each
/// other, disable large page support for this slot"). The ranges start at 2 MiB multiples, so their
/// host mappings do too. Where the host backs anonymous memory with transparent huge pages
/// (`/sys/kernel/mm/transparent_hugepage/enabled` = always, as on Debian's kernels, or madvise with
/// QEMU's MADV_HUGEPAGE), a guest then touches its memory in 2 MiB nested faults instead of 4 KiB
/// ones, which is what QEMU does by aligning its RAM blocks the same way. Where the host does not
/// (madvise, this crate does not ask), nothing changes: untouched memory still costs nothing.
pub const HOST_RAM_ALIGN: usize = 2 << 20;

/// Guest RAM: vm-memory's view of it, and the host mappings behind it, unmapped on drop.
///
/// The mappings are made here (2 MiB-aligned, see [`HOST_RAM_ALIGN`]) rather than by vm-memory, which
/// cannot align them, so this owns them. Clones of the `GuestMemoryMmap` (virtio devices hold some)
/// must not outlive it: [`crate::vmm::Vmm`] keeps it as its last field, dropped after everything else.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    maps: Vec<(usize, usize)>,
    /// Mapped from a snapshot's memory file (MAP_PRIVATE) rather than anonymous.
    file_backed: bool,
}

impl GuestRam {
    /// True when guest RAM is a private mapping of a snapshot's memory file.
    pub fn is_file_backed(&self) -> bool {
        self.file_backed
    }
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for &(addr, len) in &self.maps {
            // SAFETY: `addr..addr+len` is a mapping made by `map_aligned` and owned by this value; the
            // regions that point into it are vm-memory's non-owning views (see the type's doc).
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

/// Maps `len` bytes of anonymous, lazily backed memory starting at a multiple of `align`: maps
/// `len + align`, then gives back the unaligned head and the tail.
fn map_aligned(len: usize, align: usize) -> std::io::Result<usize> {
    let total = len + align;
    // SAFETY: a fresh anonymous private mapping at an address of the kernel's choice; nothing else
    // is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let raw = raw as usize;
    let start = raw.next_multiple_of(align);
    // SAFETY: both pieces lie inside the mapping just made and are not referenced by anyone.
    unsafe {
        if start > raw {
            libc::munmap(raw as *mut libc::c_void, start - raw);
        }
        let end = start + len;
        if raw + total > end {
            libc::munmap(end as *mut libc::c_void, raw + total - end);
        }
    }
    Ok(start)
}

/// Maps `size` bytes of guest RAM (lazily) on the host, each range 2 MiB-aligned ([`HOST_RAM_ALIGN`]).
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    map_guest_memory(size, None)
}

/// Guest RAM from a snapshot's memory file (ranges one after the other in the file, see
/// snapshot/memory.rs), mapped MAP_PRIVATE over the aligned reservation: a page is read from the
/// file when the guest first touches it, and the guest's writes stay in ember (copy on write),
/// never reaching the file (mmap(2)).
pub fn create_guest_memory_from_file(size: u64, file: &std::fs::File) -> Result<GuestRam, MemoryError> {
    map_guest_memory(size, Some(file))
}

fn map_guest_memory(size: u64, file: Option<&std::fs::File>) -> Result<GuestRam, MemoryError> {
    use std::os::fd::AsRawFd;
    use vm_memory::GuestRegionMmap;
    use vm_memory::mmap::{FromRangesError, MmapRegionBuilder, MmapRegionError};
    let err = |source| MemoryError::Mmap { size_mib: size >> 20, source };
    // On an error, `ram` unmaps whatever was mapped so far.
    let mut ram = GuestRam { mem: GuestMemoryMmap::default(), maps: Vec::new(), file_backed: file.is_some() };
    let mut regions = Vec::new();
    let mut file_offset = 0i64;
    for (start, len) in ram_ranges(size) {
        let addr =
            map_aligned(len, HOST_RAM_ALIGN).map_err(|e| err(FromRangesError::MmapRegion(MmapRegionError::Mmap(e))))?;
        ram.maps.push((addr, len));
        if let Some(f) = file {
            // SAFETY: replaces (MAP_FIXED) exactly the reservation just made and owned by `ram`.
            let got = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    f.as_raw_fd(),
                    file_offset,
                )
            };
            if got == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                return Err(err(FromRangesError::MmapRegion(MmapRegionError::Mmap(e))));
            }
            file_offset += len as i64;
        }
        // SAFETY: `addr..addr+len` is the live mapping made just above, owned by `ram`, which outlives
        // the region (see `GuestRam`).
        let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(addr as *mut u8) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(if file.is_some() {
                libc::MAP_PRIVATE | libc::MAP_NORESERVE
            } else {
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
            })
            .build()
            .map_err(|e| err(FromRangesError::MmapRegion(e)))?;
        regions.push(GuestRegionMmap::new(region, start).ok_or(err(FromRangesError::InvalidGuestRegion))?);
    }
    ram.mem = GuestMemoryMmap::from_regions(regions).map_err(|e| err(FromRangesError::Collection(e)))?;
    Ok(ram)
}

/// Tells KVM where guest RAM lives in the host's address space, one slot per region.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = mem.get_host_address(region.start_addr()).expect("a region's first byte is in guest memory") as u64;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: `host..host+len` is a live mapping owned by `mem`, which the
        // Vmm keeps alive for as long as the VM (and so this slot) exists.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| MemoryError::SetRegion { slot, source })?;
    }
    Ok(())
}

/// Last usable RAM address below 4 GiB, plus one (where the initrd may end).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.start_addr().raw_value() + r.len()).filter(|end| *end <= MMIO_GAP_START).max().unwrap_or(0)
}

/// Bytes of guest RAM the host has actually backed (pages the guest or the
/// loader touched), by `mincore(2)` over each region's mapping: how much of a
/// VM's RSS is the guest's rather than ember's (`--timeline` prints it).
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let mut total = 0u64;
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else { continue };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host..host+len` is a live, page-aligned mapping owned by
        // `mem`; `vec` has one byte per page of it, as mincore writes.
        if unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) } == 0 {
            total += vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_counts_touched_pages_only() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(resident_bytes(&mem), 0);
        mem.write_obj(1u64, GuestAddress(0x10_0000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(resident_bytes(&mem), 2 * 4096);
    }

    #[test]
    fn host_mappings_are_2mib_aligned_like_the_guest_ranges() {
        for size in [16 << 20, 3584 << 20] {
            let mem = create_guest_memory(size).unwrap();
            for region in mem.iter() {
                let host = mem.get_host_address(region.start_addr()).unwrap() as usize;
                assert_eq!(host % HOST_RAM_ALIGN, 0, "{size}: host {host:#x}");
                assert_eq!(region.start_addr().raw_value() as usize % HOST_RAM_ALIGN, 0);
            }
        }
    }

    #[test]
    fn no_memory_is_an_error_not_an_empty_region() {
        assert!(ram_ranges(0).is_empty());
        assert!(create_guest_memory(0).is_err());
        assert!(create_guest_memory(4096).is_ok());
    }

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
    }

    #[test]
    fn big_guest_is_split_around_the_gap() {
        let r = ram_ranges(3584 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 512 << 20)]);
        let total: usize = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total as u64, 3584 << 20);
    }

    #[test]
    fn low_ram_end_ignores_high_ram() {
        let mem = create_guest_memory(3584 << 20).unwrap();
        assert_eq!(low_ram_end(&mem), MMIO_GAP_START);
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(low_ram_end(&mem), 64 << 20);
    }
}
