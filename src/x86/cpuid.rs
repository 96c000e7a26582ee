//! CPUID: what the vCPU says it is (Intel SDM vol. 2A, CPUID; AMD APM vol. 3, E.3).
//!
//! KVM_GET_SUPPORTED_CPUID gives every leaf the host and KVM can offer; each vCPU
//! gets a copy with its own identity filled in: its initial APIC id (leaf 1
//! EBX[31:24], leaf 0xB/0x1F EDX, AMD leaf 0x8000_001E EAX), the number of
//! logical processors in the package, and the "running under a hypervisor" bit
//! (leaf 1 ECX[31]) that tells Linux to look at the KVM leaves at 0x4000_0000.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 31: a hypervisor is present.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: HTT, "max logical processors" field is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX bit 24: TSC-deadline timer (needs an in-kernel LAPIC).
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Adjusts a copy of the supported CPUID for vCPU `cpu_id` of `cpu_count`.
pub fn adjust_for_vcpu(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpu_id) << 24) | (u32::from(cpu_count) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Intel deterministic cache parameters: EAX[31:26] = cores per package - 1.
                // We present one core per vCPU, all in one package.
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(cpu_count.saturating_sub(1)) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: one thread per core (level 0), `cpu_count`
                // cores in the package (level 1). EDX is the x2APIC id.
                e.edx = u32::from(cpu_id);
                match e.index {
                    0 => {
                        e.eax = 0; // shift to the next level: 1 thread per core
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index; // level type 1 = SMT
                    }
                    1 => {
                        e.eax = bits_for(cpu_count);
                        e.ebx = u32::from(cpu_count);
                        e.ecx = (2 << 8) | e.index; // level type 2 = core
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index; // level type 0 = invalid: end of list
                    }
                }
            }
            0x8000_0008 => {
                // AMD: ECX[7:0] = number of cores - 1, ECX[15:12] = APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | u32::from(cpu_count - 1) | (bits_for(cpu_count) << 12);
            }
            0x8000_001e => {
                // AMD extended APIC id / compute unit / node id.
                e.eax = u32::from(cpu_id);
                e.ebx = (e.ebx & !0xff) | u32::from(cpu_id); // compute unit id
                e.ecx &= !0x7ff; // node 0, one node per processor
            }
            _ => {}
        }
    }
}

/// Clears features that need an in-kernel LAPIC, for VMs created without one.
pub fn drop_irqchip_features(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Number of bits needed to number `n` things (0 for 1, 1 for 2, 2 for 3..4).
fn bits_for(n: u8) -> u32 {
    if n <= 1 { 0 } else { 32 - u32::from(n - 1).leading_zeros() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x00ff_0800, edx: 0, ..Default::default() }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = [entry(1, 0)];
        adjust_for_vcpu(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "brand/clflush bits kept");
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        adjust_for_vcpu(&mut e, 0, 1);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_one_package() {
        let mut e = [entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        adjust_for_vcpu(&mut e, 2, 4);
        assert!(e.iter().all(|e| e.edx == 2));
        assert_eq!((e[0].ebx, (e[0].ecx >> 8) & 0xff), (1, 1));
        assert_eq!((e[1].eax, e[1].ebx, (e[1].ecx >> 8) & 0xff), (2, 4, 2));
        assert_eq!((e[2].ecx >> 8) & 0xff, 0);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn amd_leaves() {
        let mut e = [entry(0x8000_0008, 0), entry(0x8000_001e, 0)];
        adjust_for_vcpu(&mut e, 1, 2);
        assert_eq!(e[0].ecx & 0xff, 1);
        assert_eq!(e[1].eax, 1);
    }
}
