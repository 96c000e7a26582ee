//! Guest RAM into the memory file: each range's bytes at its offset in the file (ranges one after
//! the other, as `memory::ram_ranges` lists them). Only pages that hold something are written; the
//! rest stay holes in a file the API thread has already sized, so they read back as zeros.
//!
//! Which pages: for anonymous RAM, the pages the host has backed (`mincore(2)`: a page never
//! touched is zero without looking); for RAM mapped from an earlier snapshot's memory file, every
//! page (an untouched page still holds that file's data). Either way a page of zeros is skipped.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: usize = 4096;

/// Writes guest RAM into `file`; returns the extents written, `(file offset, length)` (the rest
/// are holes). `all_pages`: look at every page, not only the resident ones (file-backed RAM).
///
/// Call only while no vCPU runs and no device is served (the VM is paused).
pub fn write_memory(mem: &GuestMemoryMmap, file: &File, all_pages: bool) -> std::io::Result<Vec<(u64, u64)>> {
    let mut offset = 0u64;
    let mut extents = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| std::io::Error::other(format!("guest RAM region: {e}")))?;
        // SAFETY: `host..host+len` is the live mapping of this region, owned by the VM's GuestRam
        // for as long as `mem` exists. Nothing writes it meanwhile: every vCPU is parked and the
        // devices are served by the calling thread, which is here.
        let ram = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let resident = if all_pages { None } else { Some(resident_pages(host, len)?) };
        let mut run_start: Option<usize> = None;
        for page in 0..len / PAGE {
            let bytes = &ram[page * PAGE..(page + 1) * PAGE];
            let keep = resident.as_ref().is_none_or(|r| r[page] & 1 != 0) && bytes.iter().any(|b| *b != 0);
            match (keep, run_start) {
                (true, None) => run_start = Some(page),
                (false, Some(s)) => {
                    file.write_all_at(&ram[s * PAGE..page * PAGE], offset + (s * PAGE) as u64)?;
                    extents.push((offset + (s * PAGE) as u64, ((page - s) * PAGE) as u64));
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            file.write_all_at(&ram[s * PAGE..len], offset + (s * PAGE) as u64)?;
            extents.push((offset + (s * PAGE) as u64, (len - s * PAGE) as u64));
        }
        offset += len as u64;
    }
    Ok(extents)
}

/// Asks the kernel to read the memory file's extents that hold data into the page cache now
/// (`madvise(MADV_WILLNEED)`: asynchronous readahead in large requests), so the restored guest's
/// first touches find their pages there instead of each waiting for its own read. The mapping
/// stays private and lazy: nothing is copied, the file is not written.
pub fn prefetch(mem: &GuestMemoryMmap, extents: &[(u64, u64)]) {
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let Ok(host) = mem.get_host_address(region.start_addr()) else { continue };
        for &(start, n) in extents {
            let (from, to) = (start.max(offset), (start + n).min(offset + len));
            if from < to {
                // SAFETY: `host + (from - offset)` .. `+ (to - from)` lies inside this region's live
                // mapping (from >= offset, to <= offset + len; extents are page-aligned); WILLNEED
                // only starts readahead and changes no data.
                unsafe {
                    libc::madvise(host.add((from - offset) as usize).cast(), (to - from) as usize, libc::MADV_WILLNEED)
                };
            }
        }
        offset += len;
    }
}

/// `mincore(2)`'s vector for a mapping: bit 0 of byte N says page N is resident.
fn resident_pages(host: *mut u8, len: usize) -> std::io::Result<Vec<u8>> {
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `host..host+len` is a live, page-aligned mapping; `vec` has one byte per page.
    if unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn only_pages_with_data_are_written_and_the_rest_reads_as_zero() {
        let mem = crate::memory::create_guest_memory(4 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0u32, GuestAddress(0x5000)).unwrap(); // touched, but zero
        mem.write_obj(7u8, GuestAddress((4 << 20) - 1)).unwrap();
        let path = std::env::temp_dir().join(format!("ember-memtest-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        for all in [false, true] {
            let extents = write_memory(&mem, &file, all).unwrap();
            assert_eq!(extents, vec![(0x1000, 4096), ((4 << 20) - 4096, 4096)]);
        }
        let back = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.len(), 4 << 20);
        assert_eq!(&back[0x1000..0x1004], &0xdead_beef_u32.to_le_bytes());
        assert_eq!(back[(4 << 20) - 1], 7);
        assert_eq!(back.iter().filter(|b| **b != 0).count(), 5);
    }
}
