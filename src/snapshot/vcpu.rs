//! One vCPU's state in and out of KVM (KVM api.rst 4.11-4.13 KVM_GET/SET_REGS and SREGS, 4.18-4.19
//! MSRs, 4.20 CPUID2, 4.22-4.23 FPU, 4.57-4.58 LAPIC, 4.38-4.39 MP_STATE, 4.31-4.32 VCPU_EVENTS,
//! 4.42-4.43 XSAVE, 4.44-4.45 XCRS, 4.34-4.35 DEBUGREGS).
//!
//! Both directions run on the vCPU's own thread while it is parked outside KVM_RUN (see
//! `pause.rs`), after a last KVM_RUN with `immediate_exit` set has completed any port or MMIO
//! access the guest was in the middle of (api.rst 5, "kvm_run": "the corresponding operations are
//! complete (and guest state is consistent) only after userspace has re-entered the kernel").
//!
//! The restore order is Firecracker's and QEMU's: CPUID first (it decides which MSRs and XSAVE
//! components exist), then MSRs, special registers, FPU/XSAVE, XCRs, debug registers, LAPIC,
//! MP state, general registers, and the pending events last.

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::pod::Blob;

/// Everything KVM keeps about one vCPU.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given, one `kvm_cpuid_entry2` per blob.
    pub cpuid: Vec<Blob>,
    /// Every MSR KVM could read back: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// `kvm_regs`.
    pub regs: Blob,
    /// `kvm_sregs`.
    pub sregs: Blob,
    /// `kvm_xsave` when the host has XSAVE, else empty.
    pub xsave: Blob,
    /// `kvm_fpu` (used when `xsave` is empty).
    pub fpu: Blob,
    /// `kvm_xcrs`, when the host has XSAVE.
    pub xcrs: Blob,
    /// `kvm_debugregs`.
    pub debugregs: Blob,
    /// `kvm_lapic_state` (with the in-kernel irqchip), else empty.
    pub lapic: Blob,
    /// `kvm_mp_state`.
    pub mp_state: Blob,
    /// `kvm_vcpu_events`.
    pub events: Blob,
}

/// Reads vCPU `fd`'s state. `cpuid` is what it was given; `msr_indices` is the host's MSR list,
/// pruned here of the MSRs this vCPU cannot read (so the next save does not try them again).
pub fn save(fd: &VcpuFd, cpuid: &CpuId, msr_indices: &mut Vec<u32>, lapic: bool) -> Result<VcpuState, String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: kvm_ioctls::Error| format!("KVM_GET_{what}: {err}")
    };
    let (xsave, fpu, xcrs) = match fd.get_xsave() {
        Ok(x) => (Blob::of(&x), Blob::default(), Blob::of(&fd.get_xcrs().map_err(e("XCRS"))?)),
        Err(_) => (Blob::default(), Blob::of(&fd.get_fpu().map_err(e("FPU"))?), Blob::default()),
    };
    Ok(VcpuState {
        cpuid: cpuid.as_slice().iter().map(Blob::of).collect(),
        msrs: read_msrs(fd, msr_indices)?,
        regs: Blob::of(&fd.get_regs().map_err(e("REGS"))?),
        sregs: Blob::of(&fd.get_sregs().map_err(e("SREGS"))?),
        xsave,
        fpu,
        xcrs,
        debugregs: Blob::of(&fd.get_debug_regs().map_err(e("DEBUGREGS"))?),
        lapic: if lapic { Blob::of(&fd.get_lapic().map_err(e("LAPIC"))?) } else { Blob::default() },
        mp_state: Blob::of(&fd.get_mp_state().map_err(e("MP_STATE"))?),
        events: Blob::of(&fd.get_vcpu_events().map_err(e("VCPU_EVENTS"))?),
    })
}

/// KVM_GET_MSRS in batches of at most 256 (KVM_MAX_MSR_ENTRIES). KVM stops a batch at the first
/// MSR it cannot read and returns how many it read: that index is dropped and the batch goes on.
fn read_msrs(fd: &VcpuFd, indices: &mut Vec<u32>) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::with_capacity(indices.len());
    let mut unreadable = Vec::new();
    let mut at = 0;
    while at < indices.len() {
        let batch: Vec<kvm_msr_entry> = indices[at..(at + 256).min(indices.len())]
            .iter()
            .map(|&index| kvm_msr_entry { index, ..Default::default() })
            .collect();
        let mut msrs = Msrs::from_entries(&batch).map_err(|e| format!("an MSR batch: {e:?}"))?;
        let read = fd.get_msrs(&mut msrs).map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|m| (m.index, m.data)));
        at += read;
        if read < batch.len() {
            unreadable.push(indices[at]);
            at += 1;
        }
    }
    indices.retain(|i| !unreadable.contains(i));
    Ok(out)
}

/// Loads `s` into vCPU `fd` (its CPUID was set at creation, see [`cpuid_of`]).
pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    let bad = |what: &str| format!("the snapshot's {what} has the wrong size for this build");
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("KVM_SET_{what}: {err}");
    write_msrs(fd, &s.msrs)?;
    let mut sregs: kvm_bindings::kvm_sregs = s.sregs.to().ok_or_else(|| bad("sregs"))?;
    available_tss_on_amd(&mut sregs);
    fd.set_sregs(&sregs).map_err(e("SREGS"))?;
    if s.xsave.0.is_empty() {
        fd.set_fpu(&s.fpu.to().ok_or_else(|| bad("FPU"))?).map_err(e("FPU"))?;
    } else {
        let xsave: kvm_bindings::kvm_xsave = s.xsave.to().ok_or_else(|| bad("XSAVE"))?;
        // SAFETY: a plain `kvm_xsave` of the legacy 4 KiB size, which KVM_SET_XSAVE reads whole
        // (no XSAVE2 flexible array follows it).
        unsafe { fd.set_xsave(&xsave) }.map_err(e("XSAVE"))?;
        fd.set_xcrs(&s.xcrs.to().ok_or_else(|| bad("XCRs"))?).map_err(e("XCRS"))?;
    }
    fd.set_debug_regs(&s.debugregs.to().ok_or_else(|| bad("debug registers"))?).map_err(e("DEBUGREGS"))?;
    if !s.lapic.0.is_empty() {
        fd.set_lapic(&s.lapic.to().ok_or_else(|| bad("LAPIC"))?).map_err(e("LAPIC"))?;
        // The armed TSC deadline, again: KVM ignores MSR_IA32_TSC_DEADLINE while the LAPIC timer
        // is not in TSC-deadline mode (arch/x86/kvm/lapic.c, kvm_set_lapic_tscdeadline_msr), and
        // until KVM_SET_LAPIC just now it was in its reset state, so the write above was dropped.
        // Without this the restored guest's one-shot clock event never fires again: no timer
        // interrupt, `sleep 1` never returns, and reboot or poweroff hang in their waits.
        if let Some(&deadline) = s.msrs.iter().find(|(index, _)| *index == MSR_IA32_TSC_DEADLINE) {
            write_msrs(fd, &[deadline])?;
        }
    }
    fd.set_mp_state(s.mp_state.to().ok_or_else(|| bad("MP state"))?).map_err(e("MP_STATE"))?;
    fd.set_regs(&s.regs.to().ok_or_else(|| bad("registers"))?).map_err(e("REGS"))?;
    fd.set_vcpu_events(&s.events.to().ok_or_else(|| bad("vCPU events"))?).map_err(e("VCPU_EVENTS"))?;
    Ok(())
}

/// The LAPIC timer's deadline in TSC-deadline mode (Intel SDM vol. 3A 10.5.4.1; AMD has it too).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// TR's type as an AMD CPU caches it. KVM_GET_SREGS on SVM reports TR as a busy TSS (type 11)
/// whatever the VMCB holds (arch/x86/kvm/svm/svm.c, `svm_get_segment`: "the busy flag in the tr
/// selector isn't exposed"), and KVM_SET_SREGS stores that. Real AMD CPUs never look at the cached
/// type again; QEMU's emulated SVM (the nested lane's machine) does, on every I/O permission check
/// through the TSS bitmap (target/i386/tcg/seg_helper.c, `check_io`: type must be 9), so a restored
/// guest's `ioperm` users got #GP. Type 9 (available 64-bit TSS) is what LTR caches on AMD. Intel
/// keeps 11, which VM entry requires (SDM vol. 3C 26.3.1.2).
fn available_tss_on_amd(sregs: &mut kvm_bindings::kvm_sregs) {
    const TSS_AVAILABLE: u8 = 9;
    const TSS_BUSY: u8 = 11;
    let [_, b, c, d] = crate::x86::cpuid::host_cpuid(0, 0);
    let amd = [b, d, c] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]; // "AuthenticAMD"
    if amd && sregs.tr.type_ == TSS_BUSY {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
}

/// KVM_SET_MSRS in batches. KVM stops a batch at an MSR it refuses to set; some it refuses in
/// one VM and reports in every VM (the paravirtual async-PF interrupt MSR needs the in-kernel
/// LAPIC to be set, even to 0). Such an MSR is skipped when the new vCPU already holds the saved
/// value; any other refusal fails the restore.
fn write_msrs(fd: &VcpuFd, all: &[(u32, u64)]) -> Result<(), String> {
    let mut at = 0;
    while at < all.len() {
        let entries: Vec<kvm_msr_entry> = all[at..(at + 256).min(all.len())]
            .iter()
            .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| format!("an MSR batch: {e:?}"))?;
        let set = fd.set_msrs(&msrs).map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
        at += set;
        if set < entries.len() {
            let refused = entries[set];
            let mut probe = Msrs::from_entries(&[kvm_msr_entry { index: refused.index, ..Default::default() }])
                .map_err(|e| format!("an MSR batch: {e:?}"))?;
            let same = fd.get_msrs(&mut probe).is_ok_and(|n| n == 1 && probe.as_slice()[0].data == refused.data);
            if !same {
                return Err(format!("KVM_SET_MSRS: KVM refused MSR {:#x} = {:#x}", refused.index, refused.data));
            }
            at += 1;
        }
    }
    Ok(())
}

/// The CPUID saved in `s`, to give the new vCPU before anything else.
pub fn cpuid_of(s: &VcpuState) -> Result<CpuId, String> {
    let entries = s
        .cpuid
        .iter()
        .map(|b| b.to::<kvm_bindings::kvm_cpuid_entry2>().ok_or("a CPUID entry has the wrong size for this build"))
        .collect::<Result<Vec<_>, _>>()?;
    CpuId::from_entries(&entries).map_err(|e| format!("the snapshot's CPUID: {e:?}"))
}
