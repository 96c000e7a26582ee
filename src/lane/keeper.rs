//! The KVM keeper of the lane's outer machine: a process that holds two idle VMs for the machine's
//! whole life, so that the inner embers' VMs never flip one of the outer kernel's KVM static keys.
//!
//! Why (#15, the lane's wedges). KVM turns some of its hot-path branches on and off with static keys
//! (Documentation/staging/static-keys.rst) that count VMs and vCPUs: `preempt_notifier_key` (any VM
//! exists: `kvm_create_vm` → `preempt_notifier_inc`), `kvm_has_noapic_vcpu` (a vCPU without an
//! in-kernel LAPIC), and the deferred `apic_sw_disabled`/`apic_hw_disabled` (a LAPIC that its guest
//! has not enabled yet; arch/x86/kvm/lapic.c). A key whose count goes 0 → 1 or back to 0 rewrites
//! kernel text on every CPU (`text_poke` with int3 and an IPI to each CPU to serialize). In the
//! outer machine, which is QEMU TCG, that is cross-modifying code under multi-threaded TCG: slow, and
//! our lead suspect for the wedges, which stop the machine at the start of an inner boot, right where
//! the keys flip (not proven: a wedge comes about once in 100 boots). A kprobe on `__jump_label_update`
//! inside the outer machine counted 12 updates (88 patched sites) over 3 inner boots without a keeper.
//!
//! With the keeper holding one VM with an in-kernel irqchip and a never-run vCPU (its LAPIC stays
//! software-disabled) and one VM without an irqchip with a vCPU, every one of those counts stays
//! above zero, so an inner boot or exit patches nothing. It costs two VMs' bookkeeping (no guest
//! memory is registered) for the life of the machine.
//!
//! Started by the outer machine's init (guest-kernels/lane/init) as `ember __kvm-keeper` when the
//! host passes `ember_keeper=<this binary>` on its command line ([`super::LaneConfig::keeper`]).

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// The hidden first argument that makes this binary a keeper.
pub const KEEPER_ARG: &str = "__kvm-keeper";

/// What the keeper holds: dropping it would release the keys again.
pub struct Held {
    _vcpus: Vec<VcpuFd>,
    _vms: Vec<VmFd>,
}

/// Creates the two idle VMs (see the module doc).
pub fn hold() -> Result<Held, kvm_ioctls::Error> {
    let kvm = Kvm::new()?;
    let with_irqchip = kvm.create_vm()?;
    with_irqchip.create_irq_chip()?;
    let v0 = with_irqchip.create_vcpu(0)?;
    let without_irqchip = kvm.create_vm()?;
    let v1 = without_irqchip.create_vcpu(0)?;
    Ok(Held { _vcpus: vec![v0, v1], _vms: vec![with_irqchip, without_irqchip] })
}

/// `ember __kvm-keeper`: holds the VMs until killed (the machine powers off). Returns only on failure.
pub fn keeper_main() -> i32 {
    match hold() {
        Ok(_held) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("ember {KEEPER_ARG}: cannot create the idle VMs: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keeper's VMs can be made on this host's KVM too (no guest memory, no run).
    #[test]
    fn holds_two_idle_vms() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        }
        let held = hold().expect("two idle VMs");
        assert_eq!(held._vms.len(), 2);
    }
}
