//! The floor under every VMM on this host: the same tiny guest run by the least a KVM VMM can do.
//!
//! One thread, no sandbox, no device model, no timeline: open /dev/kvm, create the VM, give it 16 MiB,
//! load the PVH ELF (linux-loader, as ember does), one vCPU with the host's supported CPUID (the guest
//! sets EFER.LME, which KVM refuses to a vCPU whose CPUID lacks long mode: AMD APM vol. 2 14.6.1,
//! KVM's `kvm_valid_efer`; every VMM gives its guest a CPUID), 32-bit protected mode at the PVH entry (xen docs/misc/pvh.pandoc), then
//! KVM_RUN until the guest writes its status to port 0x501. The UART is two ports: bytes written to
//! THR (0x3f8) go to stdout, LSR (0x3fd) always says "transmitter empty" (16550 datasheet, LSR bit 5).
//!
//! `startup` runs this (`startup --raw-kvm GUEST MIB CMDLINE`) interleaved with ember: what ember costs above it
//! is ember's own (the sandbox, its threads, the device model, the checks), and what both cost is the
//! host's (process start, KVM's ioctls, the exits, teardown). Written by hand, on purpose: it is the
//! baseline, so it must not share ember's code.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// `hvm_start_info` and the command line, below the 1 MiB where the ELF loads.
const START_INFO: u64 = 0x6000;
const CMDLINE: u64 = 0x7000;
/// `hvm_start_info.magic` (pvh.pandoc: "xEn3" with the high bit set).
const PVH_MAGIC: u32 = 0x336e_c578;
const COM1_THR: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;
/// LSR: transmitter holding register and shift register empty (bits 5 and 6).
const LSR_EMPTY: u8 = 0x60;
const EXIT_PORT: u16 = 0x501;

/// Boots `guest` with `mem_bytes` of RAM and `cmdline`; returns the status the guest wrote to the exit
/// port.
pub fn run(guest: &Path, mem_bytes: usize, cmdline: &str) -> Result<u8, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let kvm = Kvm::new().map_err(e("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(e("KVM_CREATE_VM"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_bytes)]).map_err(|x| x.to_string())?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).map_err(|x| x.to_string())?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (dropped after it).
        unsafe { vm.set_user_memory_region(r) }.map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
    }
    let mut image = File::open(guest).map_err(|x| format!("{}: {x}", guest.display()))?;
    let loaded = Elf::load(&mem, None, &mut image, None).map_err(|x| format!("load: {x}"))?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err("the guest has no PVH entry note".into());
    };
    // struct hvm_start_info: magic, version, flags, nr_modules (u32 each), modlist_paddr, cmdline_paddr.
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    let w = |x: vm_memory::GuestMemoryError| x.to_string();
    mem.write_slice(&cmd, GuestAddress(CMDLINE)).map_err(w)?;
    mem.write_obj(PVH_MAGIC, GuestAddress(START_INFO)).map_err(w)?;
    mem.write_obj(1u32, GuestAddress(START_INFO + 4)).map_err(w)?;
    mem.write_obj(CMDLINE, GuestAddress(START_INFO + 24)).map_err(w)?;

    let vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(e("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    // pvh.pandoc, "x86/HVM": 32-bit protected mode, paging off, flat 4 GiB code and data segments.
    let mut sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x08, 0xb); // execute/read, accessed
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *s = flat(0x10, 0x3); // read/write, accessed
    }
    sregs.cr0 = 0x11; // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    regs.rip = entry.0;
    regs.rbx = START_INFO;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;

    let mut vcpu = vcpu;
    let mut out = std::io::stdout().lock();
    loop {
        match vcpu.run().map_err(e("KVM_RUN"))? {
            VcpuExit::IoOut(EXIT_PORT, data) => return Ok(data.first().copied().unwrap_or(0)),
            VcpuExit::IoOut(COM1_THR, data) => {
                // Unbuffered, as ember's console is: the bench times the first byte.
                out.write_all(data).and_then(|_| out.flush()).map_err(|x| format!("stdout: {x}"))?;
            }
            VcpuExit::IoIn(port, data) => data.fill(if port == COM1_LSR { LSR_EMPTY } else { 0 }),
            VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => {}
            other => return Err(format!("unexpected exit: {other:?}")),
        }
    }
}
