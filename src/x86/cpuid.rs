//! CPUID: what the vCPU says it is (Intel SDM vol. 2A, CPUID; AMD APM vol. 3, E.3; the KVM leaves in
//! Linux `Documentation/virt/kvm/x86/cpuid.rst`).
//!
//! KVM_GET_SUPPORTED_CPUID (KVM api.rst 4.46) gives every leaf the host and KVM can offer, but leaves a
//! few things to userspace, as api.rst and KVM's `__do_cpuid_func` say; [`adjust_for_vm`] fills them
//! in once per VM, the way Firecracker and QEMU `-cpu host` do, because the guest's boot depends on them:
//! - the TSC-deadline timer bit, which KVM emulates but does not report (api.rst 4.46: "always returned
//!   as false, since the feature depends on KVM_CREATE_IRQCHIP for local APIC support. Instead it is
//!   reported via ... KVM_CAP_TSC_DEADLINE_TIMER"). Without it Linux calibrates its LAPIC timer against
//!   the PIT, which costs ~0.2 s of every boot and, on a busy host, fails ("APIC timer disabled due to
//!   verification failure");
//! - the features that only work with KVM's in-kernel LAPIC (api.rst 9.1, "Local APIC features": X2APIC,
//!   PV unhalt, ...), cleared for a VM without one;
//! - the processor brand string (0x8000_0002..4) and AMD's L1 cache/TLB leaf (0x8000_0005), which
//!   KVM 6.1 returns as zeros: they come from the host's own CPUID instruction, like QEMU `-cpu host`
//!   (Linux then names the CPU and sizes its 2M/4M TLBs from them);
//! - the KVM paravirtual leaves (0x4000_0000 signature, 0x4000_0001 features) are kept as KVM reports
//!   them, minus what needs an in-kernel LAPIC when the VM has none.
//!
//! Then each vCPU gets a copy with its own identity filled in by [`adjust_for_vcpu`]: its initial APIC
//! id (leaf 1 EBX[31:24], leaf 0xB/0x1F EDX, AMD leaf 0x8000_001E EAX), the number of logical processors
//! in the package, and the "running under a hypervisor" bit (leaf 1 ECX[31]) that tells Linux to look at
//! the KVM leaves at 0x4000_0000.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 31: a hypervisor is present.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: HTT, "max logical processors" field is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX bit 21: x2APIC (Intel SDM vol. 2A table 3-10). Reported by KVM, but it "can only be
/// enabled if KVM_CREATE_IRQCHIP ... [is] used" (api.rst 9.1, "Local APIC features").
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit 24: TSC-deadline timer (Intel SDM vol. 2A, table 3-10 "Feature Information
/// Returned in the ECX Register"; vol. 3A 11.5.4.1 "TSC-Deadline Mode"). KVM emulates the mode in its
/// LAPIC on any host CPU (AMD included), so it needs an in-kernel LAPIC.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// The processor brand string: 48 bytes in EAX, EBX, ECX, EDX of these three leaves (Intel SDM vol. 2A,
/// CPUID "Processor Brand String"; AMD APM vol. 3, E.4.3 "Functions 8000_0002h-8000_0004h").
const LEAF_BRAND_STRING: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];
/// AMD L1 cache and TLB identifiers (AMD APM vol. 3, E.4.4 "Function 8000_0005h"); reserved (zero) on
/// Intel. Linux's `cpu_detect_tlb_amd` reads the 2M/4M TLB sizes here when leaf 0x8000_0006 has none.
const LEAF_AMD_L1_CACHE_TLB: u32 = 0x8000_0005;

/// KVM_CPUID_SIGNATURE: EAX = highest KVM leaf, EBX:ECX:EDX = "KVMKVMKVM\0\0\0" (cpuid.rst).
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
/// KVM_CPUID_FEATURES: EAX = paravirtual features, EDX = hints (cpuid.rst).
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// Bits of KVM_CPUID_FEATURES EAX (cpuid.rst, "flag ... value") that ember passes on as
/// KVM_GET_SUPPORTED_CPUID reports them. Each one is something KVM does in the kernel, so it needs no
/// help from ember; together they make the guest's timekeeping, interrupts and idle cheaper.
pub mod kvm_feature {
    /// 0, KVM_FEATURE_CLOCKSOURCE: kvmclock at MSRs 0x11/0x12 (old ABI).
    pub const CLOCKSOURCE: u32 = 1 << 0;
    /// 1, KVM_FEATURE_NOP_IO_DELAY: no delay needed after port I/O (Linux drops its `outb 0x80`s).
    pub const NOP_IO_DELAY: u32 = 1 << 1;
    /// 3, KVM_FEATURE_CLOCKSOURCE2: kvmclock at MSRs 0x4b564d00/01; gives Linux the TSC frequency
    /// at once (no TSC calibration) and a stable clocksource.
    pub const CLOCKSOURCE2: u32 = 1 << 3;
    /// 4, KVM_FEATURE_ASYNC_PF: async page faults (MSR 0x4b564d02): a vCPU whose page the host is
    /// faulting in can run another task meanwhile.
    pub const ASYNC_PF: u32 = 1 << 4;
    /// 5, KVM_FEATURE_STEAL_TIME: steal time (MSR 0x4b564d03), for the guest's scheduler accounting.
    pub const STEAL_TIME: u32 = 1 << 5;
    /// 6, KVM_FEATURE_PV_EOI: paravirtual end of interrupt (MSR 0x4b564d04): most EOIs without a VM exit.
    /// Lives in KVM's LAPIC emulation.
    pub const PV_EOI: u32 = 1 << 6;
    /// 7, KVM_FEATURE_PV_UNHALT: a halted vCPU can be kicked by hypercall (PV spinlocks). The kick is
    /// delivered through KVM's LAPIC.
    pub const PV_UNHALT: u32 = 1 << 7;
    /// 9, KVM_FEATURE_PV_TLB_FLUSH: remote TLB flushes of preempted vCPUs are deferred to their next entry.
    pub const PV_TLB_FLUSH: u32 = 1 << 9;
    /// 10, KVM_FEATURE_ASYNC_PF_VMEXIT: async PF also while the guest runs nested.
    pub const ASYNC_PF_VMEXIT: u32 = 1 << 10;
    /// 11, KVM_FEATURE_PV_SEND_IPI: many IPIs with one hypercall; sent through KVM's LAPIC.
    pub const PV_SEND_IPI: u32 = 1 << 11;
    /// 12, KVM_FEATURE_POLL_CONTROL: the guest can turn off host-side halt polling (MSR 0x4b564d05).
    pub const POLL_CONTROL: u32 = 1 << 12;
    /// 13, KVM_FEATURE_PV_SCHED_YIELD: yield to a preempted vCPU by hypercall.
    pub const PV_SCHED_YIELD: u32 = 1 << 13;
    /// 14, KVM_FEATURE_ASYNC_PF_INT: async PF "page ready" as an interrupt (MSRs 0x4b564d06/07); the
    /// interrupt is injected through KVM's LAPIC.
    pub const ASYNC_PF_INT: u32 = 1 << 14;
    /// 24, KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: kvmclock does not warp between vCPUs.
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

    /// The features that are served by KVM's in-kernel LAPIC: a VM without one must not offer them
    /// (api.rst 9.1 says so of PV unhalt; PV EOI has the guest skip its EOI write for KVM's LAPIC to
    /// do it, and PV IPIs and the async PF interrupt are delivered by that LAPIC).
    pub const NEED_IN_KERNEL_LAPIC: u32 = PV_EOI | PV_UNHALT | PV_SEND_IPI | ASYNC_PF_INT;
}

/// KVM_CPUID_FEATURES EDX bit 0, KVM_HINTS_REALTIME: "vCPUs are never preempted for an unlimited time"
/// (cpuid.rst). Not true of ember's vCPU threads (nothing pins them), so never set.
const KVM_HINTS_REALTIME: u32 = 1 << 0;

/// What the VM around the vCPUs offers; decides the bits KVM leaves to userspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmFeatures {
    /// The VM has KVM's in-kernel LAPIC (KVM_CREATE_IRQCHIP).
    pub in_kernel_lapic: bool,
    /// KVM_CAP_TSC_DEADLINE_TIMER: KVM emulates the LAPIC's TSC-deadline mode (api.rst 4.46).
    pub tsc_deadline_timer: bool,
}

/// The host's CPUID instruction (leaf, subleaf) -> [EAX, EBX, ECX, EDX], for the leaves KVM does not
/// pass through. Inside a VM (the Linux lane) "the host" is that VM's CPU, as for QEMU `-cpu host`.
pub fn host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // A safe intrinsic (no `unsafe` needed): CPUID exists on every x86-64 CPU and only reads identification registers.
    let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Adjusts KVM's supported CPUID for this VM, once, before the per-vCPU copies: the TSC-deadline bit,
/// the brand string and L1 cache/TLB leaf from `host` ([`host_cpuid`] in ember), and the KVM leaves.
/// Leaves 2 and 4 (Intel cache descriptors and parameters), 0x8000_0006 (L2 cache/TLB) and
/// 0x8000_001D (AMD cache topology) are kept as KVM passes them from the host.
///
/// Only leaves present in `entries` are filled: KVM lists every leaf up to the limits it reports in
/// leaves 0 and 0x8000_0000 (zeroed when it has nothing to say), so a leaf missing here is beyond the
/// limit and the guest would not read it.
pub fn adjust_for_vm(entries: &mut [kvm_cpuid_entry2], vm: VmFeatures, host: impl Fn(u32, u32) -> [u32; 4]) {
    let host_max_extended = host(0x8000_0000, 0)[0];
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // api.rst 4.46 and 9.1: KVM emulates TSC-deadline mode but leaves the bit to userspace,
                // since it works only with the in-kernel LAPIC. With it Linux skips the LAPIC timer
                // calibration (arch/x86/kernel/apic/apic.c, calibrate_APIC_clock).
                if vm.in_kernel_lapic && vm.tsc_deadline_timer {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                // api.rst 9.1: x2APIC mode is KVM's in-kernel LAPIC's; without one there is no x2APIC.
                if !vm.in_kernel_lapic {
                    e.ecx &= !LEAF1_ECX_X2APIC;
                }
            }
            // KVM (6.1 `__do_cpuid_func`, default case) zeroes these; the host's values are the real
            // CPU's name and L1 geometry (AMD APM vol. 3, E.4.3 and E.4.4), as QEMU -cpu host passes them.
            // Linux prints the name ("smpboot: CPU0: AMD EPYC Processor") and sizes its 2M/4M TLBs.
            f if (LEAF_BRAND_STRING.contains(&f) || f == LEAF_AMD_L1_CACHE_TLB) && host_max_extended >= f => {
                [e.eax, e.ebx, e.ecx, e.edx] = host(f, 0);
            }
            LEAF_KVM_SIGNATURE => {
                // cpuid.rst: EAX is the highest KVM leaf; old hosts said 0, which means 0x4000_0001.
                e.eax = e.eax.max(LEAF_KVM_FEATURES);
            }
            LEAF_KVM_FEATURES => {
                // cpuid.rst: the features as KVM reports them; those served by the in-kernel LAPIC only
                // with one. No hints: vCPU threads can be preempted.
                if !vm.in_kernel_lapic {
                    e.eax &= !kvm_feature::NEED_IN_KERNEL_LAPIC;
                }
                e.edx &= !KVM_HINTS_REALTIME;
            }
            _ => {}
        }
    }
}

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

    /// A host CPUID for tests: brand "AMD EPYC Processor" padded with NULs, extended leaves up to
    /// `max_extended`, and every other leaf answering its own number in EAX.
    fn fake_host(max_extended: u32) -> impl Fn(u32, u32) -> [u32; 4] {
        let brand: Vec<u32> = {
            let mut b = b"AMD EPYC Processor".to_vec();
            b.resize(48, 0);
            b.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        move |leaf, _| match leaf {
            0x8000_0000 => [max_extended, 0, 0, 0],
            0x8000_0002..=0x8000_0004 => {
                let i = (leaf - 0x8000_0002) as usize * 4;
                [brand[i], brand[i + 1], brand[i + 2], brand[i + 3]]
            }
            0x8000_0005 => [0xff40_ff40, 0xff40_ff40, 0x2004_0140, 0x4004_0140],
            _ => [leaf, 0, 0, 0],
        }
    }

    fn zeroed(function: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, ..Default::default() }
    }

    #[test]
    fn tsc_deadline_needs_the_capability_and_an_in_kernel_lapic() {
        for (lapic, cap, want) in
            [(true, true, true), (true, false, false), (false, true, false), (false, false, false)]
        {
            let mut e = [zeroed(1)];
            e[0].ecx = if want { 0 } else { LEAF1_ECX_TSC_DEADLINE }; // the opposite of what we want
            adjust_for_vm(
                &mut e,
                VmFeatures { in_kernel_lapic: lapic, tsc_deadline_timer: cap },
                fake_host(0x8000_0008),
            );
            assert_eq!(e[0].ecx & LEAF1_ECX_TSC_DEADLINE != 0, want, "lapic {lapic} cap {cap}");
        }
    }

    #[test]
    fn x2apic_only_with_an_in_kernel_lapic() {
        let mut e = [zeroed(1)];
        e[0].ecx = LEAF1_ECX_X2APIC;
        adjust_for_vm(&mut e, VmFeatures { in_kernel_lapic: true, tsc_deadline_timer: false }, fake_host(0));
        assert_ne!(e[0].ecx & LEAF1_ECX_X2APIC, 0);
        adjust_for_vm(&mut e, VmFeatures::default(), fake_host(0));
        assert_eq!(e[0].ecx & LEAF1_ECX_X2APIC, 0);
    }

    #[test]
    fn brand_string_and_l1_cache_leaf_come_from_the_host() {
        let mut e = [zeroed(0x8000_0002), zeroed(0x8000_0003), zeroed(0x8000_0004), zeroed(0x8000_0005)];
        adjust_for_vm(&mut e, VmFeatures::default(), fake_host(0x8000_0008));
        let brand: Vec<u8> =
            e[..3].iter().flat_map(|e| [e.eax, e.ebx, e.ecx, e.edx]).flat_map(u32::to_le_bytes).collect();
        assert!(brand.starts_with(b"AMD EPYC Processor\0"), "{brand:?}");
        // L1 TLB: 64 2M/4M data entries (EAX[23:16]), as Linux's cpu_detect_tlb_amd reads them.
        assert_eq!((e[3].eax >> 16) & 0xff, 0x40);
        assert_eq!(e[3].ecx, 0x2004_0140);
    }

    #[test]
    fn host_leaves_beyond_the_hosts_limit_are_left_alone() {
        let mut e = [zeroed(0x8000_0005)];
        e[0].eax = 7;
        adjust_for_vm(&mut e, VmFeatures::default(), fake_host(0x8000_0004));
        assert_eq!(e[0].eax, 7);
    }

    #[test]
    fn cache_leaves_kvm_passes_through_are_kept() {
        let mut e = [entry(2, 0), entry(4, 0), entry(4, 1), entry(0x8000_0006, 0), entry(0x8000_001d, 0)];
        for (i, x) in e.iter_mut().enumerate() {
            x.eax = 0x100 + i as u32;
            x.ecx = 0x200 + i as u32;
        }
        let before = e;
        adjust_for_vm(&mut e, VmFeatures { in_kernel_lapic: true, tsc_deadline_timer: true }, fake_host(0x8000_0021));
        for (a, b) in e.iter().zip(before.iter()) {
            assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (b.eax, b.ebx, b.ecx, b.edx), "leaf {:#x}", a.function);
        }
    }

    #[test]
    fn kvm_leaves_keep_what_kvm_offers_and_drop_what_needs_a_lapic() {
        use kvm_feature::*;
        let offered = CLOCKSOURCE
            | NOP_IO_DELAY
            | CLOCKSOURCE2
            | ASYNC_PF
            | STEAL_TIME
            | PV_EOI
            | PV_UNHALT
            | PV_TLB_FLUSH
            | ASYNC_PF_VMEXIT
            | PV_SEND_IPI
            | POLL_CONTROL
            | PV_SCHED_YIELD
            | ASYNC_PF_INT
            | CLOCKSOURCE_STABLE_BIT;
        let leaves = || {
            let mut sig = zeroed(LEAF_KVM_SIGNATURE);
            [sig.ebx, sig.ecx, sig.edx] = [0x4b4d_564b, 0x564b_4d56, 0x4d];
            let mut f = zeroed(LEAF_KVM_FEATURES);
            f.eax = offered;
            f.edx = KVM_HINTS_REALTIME;
            [sig, f]
        };
        let mut e = leaves();
        adjust_for_vm(&mut e, VmFeatures { in_kernel_lapic: true, tsc_deadline_timer: true }, fake_host(0));
        assert_eq!(e[0].eax, LEAF_KVM_FEATURES, "old hosts' 0 means 0x4000_0001");
        assert_eq!(e[0].ebx, 0x4b4d_564b, "signature kept");
        assert_eq!(e[1].eax, offered, "everything KVM offers");
        assert_eq!(e[1].edx, 0, "no realtime hint");

        let mut e = leaves();
        adjust_for_vm(&mut e, VmFeatures::default(), fake_host(0));
        assert_eq!(e[1].eax, offered & !NEED_IN_KERNEL_LAPIC);
        assert_ne!(e[1].eax & CLOCKSOURCE2, 0, "kvmclock needs no LAPIC");
    }
}
