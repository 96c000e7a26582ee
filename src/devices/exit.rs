//! ember's exit device: how a guest reports a status that becomes ember's exit code.
//!
//! Protocol (also in README, "The exit device"): a write of 1, 2 or 4 bytes to
//! I/O port `layout::EXIT_PORT` (0x501) ends the VM; the low byte of the value
//! is ember's exit status. Reads return 0. From a Linux guest's user space the
//! init runs `ember-exit STATUS` (guest-kernels/ember-exit.c), which takes the
//! one port with ioperm(2) and does `outb` (not /dev/port, which needs
//! CONFIG_DEVPORT: see guest-kernels/README.md); a freestanding guest does `mov al,
//! STATUS; out dx, al` with DX = 0x501 (the port is above 0xff).
//! A 2- or 4-byte write spans the ports after 0x501, so the device sits in a
//! slot of `layout::EXIT_PORT_LEN` ports; writes at 0x502-0x504 alone do nothing.
//!
//! It is modelled on QEMU's isa-debug-exit, minus its `(value << 1) | 1`
//! encoding: a guest can report 0 and get 0.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::control::{StopReason, VmControl};

/// The exit port.
pub struct ExitDevice {
    control: Arc<VmControl>,
}

impl ExitDevice {
    /// An exit device that stops `control`'s VM.
    pub fn new(control: Arc<VmControl>) -> Self {
        ExitDevice { control }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0
            && let Some(&status) = data.first()
        {
            self.control.stop(StopReason::GuestExit(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_byte_is_the_status() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut d = ExitDevice::new(c.clone());
        d.write(0, &[0x07, 0x01, 0, 0]);
        assert_eq!(c.reason(), Some(StopReason::GuestExit(7)));
    }

    #[test]
    fn wide_writes_reach_the_device_through_the_bus() {
        use crate::layout::{EXIT_PORT, EXIT_PORT_LEN};
        use std::sync::Mutex;
        for data in [&[7u8][..], &[7, 0x12], &[7, 0x12, 0x34, 0x56]] {
            let c = Arc::new(VmControl::new().unwrap());
            let mut bus = crate::bus::Bus::new();
            let dev = Arc::new(Mutex::new(ExitDevice::new(c.clone())));
            bus.insert(u64::from(EXIT_PORT), u64::from(EXIT_PORT_LEN), "exit device", dev).unwrap();
            assert!(bus.write(u64::from(EXIT_PORT), data), "{}-byte write", data.len());
            assert_eq!(c.reason(), Some(StopReason::GuestExit(7)), "{}-byte write", data.len());
        }
        // The ports behind 0x501 do not end the VM on their own.
        let c = Arc::new(VmControl::new().unwrap());
        let mut d = ExitDevice::new(c.clone());
        d.write(1, &[9]);
        assert!(!c.is_stopped());
    }
}
