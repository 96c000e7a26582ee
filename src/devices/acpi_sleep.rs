//! The ACPI sleep control and status registers of ember's hardware-reduced
//! machine (ACPI 6.4, 4.8.3.7 "Sleep Control and Status Registers"), two
//! byte-wide I/O ports that the FADT names (x86/acpi.rs, `layout::ACPI_SLEEP_*`).
//!
//! What the guest does: to enter S5 (soft off) Linux's ACPICA
//! (acpica/hwesleep.c, `acpi_hw_extended_sleep`) writes WAK_STS to the status
//! register to clear it, then `SLP_TYPx << 2 | SLP_EN` to the control
//! register, with SLP_TYPx the first value of `\_S5` from the DSDT. That write
//! stops the VM with [`StopReason::PowerOff`] (ember exits 0). Any other sleep
//! type (ember offers no S1-S4) and writes without SLP_EN are ignored; the
//! status register reads 0 (never woken).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::control::{StopReason, VmControl};
use crate::x86::acpi::{S5_SLEEP_TYPE, SLP_EN, SLP_TYP_MASK, SLP_TYP_SHIFT};

/// The two sleep registers: control at offset 0, status at offset 1.
pub struct AcpiSleep {
    control: Arc<VmControl>,
}

impl AcpiSleep {
    /// Sleep registers that power off `control`'s VM.
    pub fn new(control: Arc<VmControl>) -> Self {
        AcpiSleep { control }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else { return };
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            self.control.stop(StopReason::PowerOff);
        } else if value & SLP_EN != 0 {
            log::debug!("ACPI: sleep type {sleep_type} requested: ember only offers S5; ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slp_en_with_the_s5_type_powers_off() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut d = AcpiSleep::new(c.clone());
        // What ACPICA writes: clear WAK_STS on the status register, then the type alone...
        d.write(1, &[0x80]);
        d.write(0, &[S5_SLEEP_TYPE << 2]);
        assert!(!c.is_stopped());
        // ...another sleep type...
        d.write(0, &[(3 << 2) | SLP_EN]);
        assert!(!c.is_stopped());
        // ...and SLP_TYP_S5 | SLP_EN.
        d.write(0, &[0x34]);
        assert_eq!(c.reason(), Some(StopReason::PowerOff));
        let mut b = [0xff];
        d.read(1, &mut b);
        assert_eq!(b, [0]);
    }
}
