//! The VM-wide state KVM keeps: the in-kernel interrupt controllers (KVM api.rst 4.26-4.27
//! KVM_GET/SET_IRQCHIP: the two 8259 PICs and the IOAPIC), the PIT (4.71-4.72 KVM_GET/SET_PIT2)
//! and kvm-clock (4.29-4.30 KVM_GET/SET_CLOCK). Read on the event loop's thread while every vCPU
//! is parked; written while the restored VM is built, before any vCPU runs.

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::pod::Blob;

/// `KVM_CLOCK_TSC_STABLE` (kvm.h): reported by KVM_GET_CLOCK, refused by KVM_SET_CLOCK.
const KVM_CLOCK_TSC_STABLE: u32 = 2;
/// `KVM_CLOCK_REALTIME` (kvm.h): KVM_SET_CLOCK would move the clock on by the wall time since the
/// snapshot; ember restores the guest's clock where it stopped, as a paused VM sees it.
const KVM_CLOCK_REALTIME: u32 = 1 << 2;

/// The VM's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmState {
    /// `kvm_irqchip` of the master PIC, the slave PIC and the IOAPIC; empty without an irqchip.
    pub irqchips: Vec<Blob>,
    /// `kvm_pit_state2`; empty without an irqchip.
    pub pit: Blob,
    /// `kvm_clock_data`.
    pub clock: Blob,
}

const CHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

/// Reads the VM's state (`irqchip`: whether the in-kernel irqchip and PIT exist).
pub fn save(vm: &VmFd, irqchip: bool) -> Result<VmState, String> {
    let mut s = VmState::default();
    if irqchip {
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(|e| format!("KVM_GET_IRQCHIP: {e}"))?;
            s.irqchips.push(Blob::of(&chip));
        }
        s.pit = Blob::of(&vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?);
    }
    s.clock = Blob::of(&vm.get_clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?);
    Ok(s)
}

/// Loads `s` into a VM built with the same irqchip choice.
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), String> {
    let bad = |what: &str| format!("the snapshot's {what} has the wrong size for this build");
    for chip in &s.irqchips {
        let chip: kvm_irqchip = chip.to().ok_or_else(|| bad("irqchip"))?;
        vm.set_irqchip(&chip).map_err(|e| format!("KVM_SET_IRQCHIP: {e}"))?;
    }
    if !s.pit.0.is_empty() {
        vm.set_pit2(&s.pit.to().ok_or_else(|| bad("PIT"))?).map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
    }
    let mut clock: kvm_bindings::kvm_clock_data = s.clock.to().ok_or_else(|| bad("clock"))?;
    clock.flags &= !(KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME);
    vm.set_clock(&clock).map_err(|e| format!("KVM_SET_CLOCK: {e}"))
}
