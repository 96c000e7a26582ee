//! Guest RAM: anonymous host memory (vm-memory's `GuestMemoryMmap`) registered
//! with KVM as memory slots (KVM api.rst, 4.35 KVM_SET_USER_MEMORY_REGION).
//!
//! The mapping is `MAP_NORESERVE` and untouched: a page of guest RAM costs the
//! host nothing until the guest (or the loader) first writes it, so a 1 GiB
//! guest that uses 20 MiB costs 20 MiB.
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
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START as usize), (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize)]
    }
}

/// Maps `size` bytes of guest RAM (lazily) on the host.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Mmap { size_mib: size >> 20, source })
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
