//! Registers, descriptor tables and page tables for the two entry points ember
//! supports:
//!
//! - **64-bit entry** (Linux boot.rst, "64-bit Boot Protocol"): long mode with
//!   paging on, an identity map covering the kernel, boot_params, the command
//!   line and the initrd; CS = __BOOT_CS (0x10), DS/ES/SS = __BOOT_DS (0x18),
//!   RSI = address of boot_params, interrupts off.
//! - **PVH entry** (xen docs/misc/pvh.pandoc): 32-bit protected mode, paging
//!   off, flat CS/DS, EBX = address of `hvm_start_info`.
//!
//! The GDT serves both: selector 0x08 is 32-bit code, 0x10 64-bit code, 0x18
//! flat data, 0x20 the TSS KVM needs to enter protected mode (Intel SDM vol. 3,
//! 3.4.5 "Segment Descriptors").

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, PDE_START, PDPTE_START, PML4_START};

/// CR0 bits (Intel SDM vol. 3, 2.5).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: 64-bit paging requires it.
const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME / EFER.LMA: long mode enabled / active.
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors (index * 8).
pub const GDT_CODE32: u16 = 0x08;
/// Linux's `__BOOT_CS`.
pub const GDT_CODE64: u16 = 0x10;
/// Linux's `__BOOT_DS`.
pub const GDT_DATA: u16 = 0x18;
/// The task state segment.
pub const GDT_TSS: u16 = 0x20;

/// Which protocol the guest is entered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, RSI -> boot_params.
    Long64,
    /// 32-bit protected mode, EBX -> hvm_start_info.
    Pvh,
}

/// Builds a segment descriptor from `flags` (the access byte and the G/D/L
/// nibble, as `0xGDLA_AA` packed the way the Linux sources spell GDT_ENTRY),
/// a base and a limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, code32, code64, data, TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB flat, present, exec/read, accessed
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code (L=1)
    gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB flat, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // 32-bit busy TSS
];

/// Turns a GDT entry back into the `kvm_segment` KVM wants in `kvm_sregs`.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With G=1 the limit counts 4 KiB pages.
    let limit = if g == 1 { (limit_raw << 12) | 0xfff } else { limit_raw };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT into guest memory.
pub fn setup_gdt_idt(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
}

/// Writes an identity map of the first 4 GiB with 2 MiB pages (Intel SDM vol. 3,
/// 4.5 "4-Level Paging"): PML4[0] -> PDPT, PDPT[0..4] -> four page directories.
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))?;
        // One 4 KiB directory of 512 entries, written in one go.
        let mut table = [0u8; 4096];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let phys = (gib << 30) | ((i as u64) << 21);
            chunk.copy_from_slice(&(phys | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd))?;
    }
    Ok(())
}

/// Fills the special registers for `mode` on top of what KVM_GET_SREGS returned.
pub fn setup_sregs(sregs: &mut kvm_sregs, mode: EntryMode) {
    let code_sel = if mode == EntryMode::Long64 { GDT_CODE64 } else { GDT_CODE32 };
    let code = segment_from_gdt(BOOT_GDT[usize::from(code_sel / 8)], code_sel);
    let data = segment_from_gdt(BOOT_GDT[usize::from(GDT_DATA / 8)], GDT_DATA);
    let tss = segment_from_gdt(BOOT_GDT[usize::from(GDT_TSS / 8)], GDT_TSS);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Long64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// General-purpose registers at entry.
pub fn boot_regs(mode: EntryMode, entry: GuestAddress, boot_info: GuestAddress, stack: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set; IF=0
        rip: entry.raw_value(),
        rsp: stack,
        rbp: stack,
        ..Default::default()
    };
    match mode {
        EntryMode::Long64 => regs.rsi = boot_info.raw_value(),
        EntryMode::Pvh => regs.rbx = boot_info.raw_value(),
    }
    regs
}

/// The x87/SSE state after FNINIT with all exceptions masked (Intel SDM vol. 1, 8.1.5).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Local APIC LVT registers for LINT0/LINT1 (Intel SDM vol. 3, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to the 8259 PIC (ExtINT) and LINT1 to NMI, as a BIOS does, in a
/// KVM_GET_LAPIC register page.
pub fn setup_lint(regs: &mut [std::os::raw::c_char; 1024]) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
        let value = set_apic_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(BOOT_GDT[2], GDT_CODE64);
        assert_eq!((code.base, code.limit, code.l, code.db, code.type_), (0, 0xffff_ffff, 1, 0, 0xb));
        let code32 = segment_from_gdt(BOOT_GDT[1], GDT_CODE32);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment_from_gdt(BOOT_GDT[3], GDT_DATA);
        assert_eq!((data.present, data.s, data.type_, data.unusable), (1, 1, 3, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        let pd3 = pdpte3 & !0xfff;
        let last: u64 = mem.read_obj(GuestAddress(pd3 + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000, "last 2 MiB page below 4 GiB");
        assert_eq!(last & 0x83, 0x83);
        assert!(mem.address_in_range(GuestAddress(PDE_START + 0x3fff)));
    }

    #[test]
    fn lint_pins() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x01; // some other delivery mode before
        setup_lint(&mut regs);
        assert_eq!((regs[APIC_LVT0 + 1] as u8) & 0x7, 7);
        assert_eq!((regs[APIC_LVT1 + 1] as u8) & 0x7, 4);
    }

    #[test]
    fn gdt_and_idt_do_not_overlap() {
        let gdt_end = BOOT_GDT_START + std::mem::size_of_val(&BOOT_GDT) as u64;
        assert!(BOOT_IDT_START >= gdt_end);
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(EntryMode::Long64, GuestAddress(0x100_0000), GuestAddress(0x7000), 0x8ff0);
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0000, 0x7000, 0x8ff0, 2));
        let r = boot_regs(EntryMode::Pvh, GuestAddress(0x100_0000), GuestAddress(0x6000), 0);
        assert_eq!((r.rbx, r.rsi), (0x6000, 0));
        let mut s = kvm_sregs::default();
        setup_sregs(&mut s, EntryMode::Long64);
        assert_eq!((s.cs.selector, s.ds.selector, s.cr3), (0x10, 0x18, PML4_START));
        setup_sregs(&mut s, EntryMode::Pvh);
        assert_eq!((s.cs.selector, s.cr0 & X86_CR0_PG, s.efer), (0x08, 0, 0));
    }
}
