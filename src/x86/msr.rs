//! Model-specific registers set before the first KVM_RUN (Intel SDM vol. 4).
//!
//! KVM resets most MSRs to their power-on values; Linux expects a few more to be
//! in a known state when entered directly in 64-bit mode (no firmware ran):
//! the SYSCALL/SYSENTER MSRs cleared, the TSC at zero, fast strings enabled and
//! write-back as the default memory type.

use kvm_bindings::{Msrs, kvm_msr_entry};

/// IA32_SYSENTER_CS/ESP/EIP.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// SYSCALL target MSRs (AMD64 / Intel 64).
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Time-stamp counter.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_MISC_ENABLE; bit 0 enables fast-string REP MOVS/STOS.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: bit 11 enables MTRRs, type 6 is write-back.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The boot MSRs as one `KVM_SET_MSRS` batch.
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ];
    // `from_entries` only fails above KVM_MAX_MSR_ENTRIES (256); we pass 11.
    Msrs::from_entries(&entries).expect("11 MSR entries fit in a kvm_msrs")
}
