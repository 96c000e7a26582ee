//! A PCI bus with nothing on it but a host bridge, reached through
//! configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2): a 32-bit
//! CONFIG_ADDRESS register at 0xcf8 (enable bit 31, bus 23:16, device 15:11,
//! function 10:8, register 7:2) and a CONFIG_DATA window at 0xcfc-0xcff.
//!
//! Why ember has it: the default kernel needs CONFIG_PCI for ACPICA (see
//! guest-kernels/microvm.config), and a kernel with PCI that finds no config
//! space access prints a KERN_ERR "PCI: Fatal: No config space access function
//! found" on every boot, which lands in a `--kernel` run's output. Linux
//! accepts mechanism #1 when CONFIG_ADDRESS reads back what was written and
//! a host bridge or VGA class device answers on bus 0
//! (arch/x86/pci/direct.c, `pci_check_type1` and `pci_sanity_check`). QEMU's
//! microvm and Cloud Hypervisor answer the same way; Firecracker turns PCI off
//! on the command line and lives with the line.
//!
//! Everything else reads as "no device" (all ones, 3.2.2.3.2) and writes to
//! the host bridge's header are ignored: it has no BARs, no capabilities and
//! no command bits to set. The address latch is not part of a snapshot: the
//! guest writes it under its config lock before each access.

use crate::bus::BusDevice;

/// Vendor and device ID of the host bridge (Intel 0x0d57, the ID Cloud
/// Hypervisor's host bridge uses; no Linux driver or quirk binds to it).
const VENDOR_ID: u16 = 0x8086;
const DEVICE_ID: u16 = 0x0d57;
/// Class code 06/00/00: bridge device, host bridge (PCI Code and ID Assignment 1.11, D.7).
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
/// CONFIG_ADDRESS's enable bit.
const ENABLE: u32 = 1 << 31;

/// The two registers of mechanism #1 and the host bridge's header.
#[derive(Default)]
pub struct PciHost {
    address: u32,
}

impl PciHost {
    /// An empty bus with its host bridge at 00:00.0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The dword at `register` of the function CONFIG_ADDRESS selects.
    fn config_dword(&self, register: u32) -> u32 {
        let (bus, device, function) =
            ((self.address >> 16) & 0xff, (self.address >> 11) & 0x1f, (self.address >> 8) & 7);
        if self.address & ENABLE == 0 || (bus, device, function) != (0, 0, 0) {
            return u32::MAX;
        }
        // Type 0 header (PCI Local Bus 3.0, 6.1): IDs, then command/status
        // (all zero), then revision 0 under the class code; the rest is zero.
        match register {
            0x00 => u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID),
            0x08 => CLASS_HOST_BRIDGE << 8,
            _ => 0,
        }
    }
}

impl BusDevice for PciHost {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            // CONFIG_ADDRESS is a dword register; narrower reads see nothing.
            0 if data.len() == 4 => self.address,
            4..=7 => {
                let dword = self.config_dword(self.address & 0xfc);
                dword >> ((offset - 4) * 8)
            }
            _ => u32::MAX,
        };
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.checked_shr(8 * i as u32).map_or(0xff, |v| v as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a dword write at 0xcf8 is CONFIG_ADDRESS (3.2.2.3.2); byte
        // writes there (Linux's probe writes 0xcfb) and data writes are ignored.
        if let (0, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.address = u32::from_le_bytes(bytes) & !0x7f00_0003;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &mut PciHost, offset: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        d.read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn linux_probe_sees_the_address_echoed_and_a_host_bridge() {
        let mut d = PciHost::new();
        d.write(3, &[1]); // outb(0x01, 0xCFB)
        d.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(read(&mut d, 0, 4), 0x8000_0000);
        assert_eq!(read(&mut d, 4, 4), 0x0d57_8086);
        d.write(0, &0x8000_0008u32.to_le_bytes());
        assert_eq!(read(&mut d, 4, 4), 0x0600_0000);
        // PCI_CLASS_DEVICE is the word at 0x0a.
        assert_eq!(read(&mut d, 6, 2), 0x0600);
    }

    #[test]
    fn other_slots_and_a_disabled_address_read_all_ones() {
        let mut d = PciHost::new();
        d.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        assert_eq!(read(&mut d, 4, 4), u32::MAX);
        d.write(0, &0x0000_0000u32.to_le_bytes());
        assert_eq!(read(&mut d, 4, 4), u32::MAX);
        d.write(0, &(0x8000_0000u32 | 1 << 16).to_le_bytes());
        assert_eq!(read(&mut d, 5, 1), 0xff);
        // A narrow read of CONFIG_ADDRESS and any read past 0xcfc's window.
        assert_eq!(read(&mut d, 0, 1), 0xff);
    }
}
