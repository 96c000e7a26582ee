//! The i8042 keyboard controller, reduced to what a microVM needs: its reset line.
//!
//! Linux with `reboot=k` reboots by waiting for the controller's input buffer
//! to drain (status bit 1 clear) and writing command 0xFE, "pulse output line
//! 0", which on a PC is wired to the CPU's RESET# pin (arch/x86/kernel/reboot.c,
//! `native_machine_emergency_restart`). Writing the output port (command 0xD1)
//! with bit 0 clear resets too. ember ends the VM on either: a guest reboot is
//! a clean exit with status 0.
//!
//! A few more commands are answered so that probing drivers see a sane, idle
//! controller with no keyboard: 0x20 (read command byte), 0x60 (write it), 0xAA
//! (self-test -> 0x55). There is no keyboard behind it.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::control::{StopReason, VmControl};
use crate::snapshot::devices::I8042State;

/// Status register bits (port 0x64 reads).
const I8042_STR_OBF: u8 = 0x01; // output buffer full: data for the CPU at 0x60
const I8042_STR_SYSFLAG: u8 = 0x04; // self-test passed
/// Commands (port 0x64 writes).
const I8042_CMD_CTL_RCTR: u8 = 0x20;
const I8042_CMD_CTL_WCTR: u8 = 0x60;
const I8042_CMD_CTL_TEST: u8 = 0xaa;
const I8042_CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const I8042_CMD_PULSE_RESET: u8 = 0xfe;

/// Offsets from the device base (0x60): data at +0, command/status at +4.
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

/// The controller.
pub struct I8042 {
    control: Arc<VmControl>,
    output: Option<u8>,
    command_byte: u8,
    /// The last command expects its argument on the data port.
    pending: Option<u8>,
}

impl I8042 {
    /// A controller whose reset line stops `control`'s VM.
    pub fn new(control: Arc<VmControl>) -> Self {
        I8042 { control, output: None, command_byte: 0, pending: None }
    }

    /// The registers, for a snapshot.
    pub fn save_state(&self) -> I8042State {
        I8042State { output: self.output, command_byte: self.command_byte, pending: self.pending }
    }

    /// Takes the registers a snapshot saved.
    pub fn restore_state(&mut self, s: &I8042State) {
        (self.output, self.command_byte, self.pending) = (s.output, s.command_byte, s.pending);
    }

    fn status(&self) -> u8 {
        I8042_STR_SYSFLAG | if self.output.is_some() { I8042_STR_OBF } else { 0 }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            I8042_CMD_CTL_RCTR => self.output = Some(self.command_byte),
            I8042_CMD_CTL_WCTR | I8042_CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            I8042_CMD_CTL_TEST => self.output = Some(0x55),
            I8042_CMD_PULSE_RESET => self.control.stop(StopReason::Reset),
            _ => log::debug!("i8042: ignoring command {cmd:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(I8042_CMD_CTL_WCTR) => self.command_byte = value,
            // Output port bit 0 is the CPU reset line, active low.
            Some(I8042_CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => self.control.stop(StopReason::Reset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.take().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (Arc<VmControl>, I8042) {
        let c = Arc::new(VmControl::new().unwrap());
        (c.clone(), I8042::new(c))
    }

    #[test]
    fn linux_reboot_k_sequence_resets() {
        let (c, mut d) = dev();
        let mut s = [0u8];
        d.read(COMMAND_OFFSET, &mut s);
        assert_eq!(s[0] & 0x02, 0, "input buffer empty, kb_wait() returns");
        d.write(COMMAND_OFFSET, &[I8042_CMD_PULSE_RESET]);
        assert_eq!(c.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn output_port_reset_line() {
        let (c, mut d) = dev();
        d.write(COMMAND_OFFSET, &[I8042_CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA_OFFSET, &[0x01]);
        assert!(!c.is_stopped(), "bit 0 set: no reset");
        d.write(COMMAND_OFFSET, &[I8042_CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(c.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn self_test_and_command_byte() {
        let (c, mut d) = dev();
        let mut b = [0u8];
        d.write(COMMAND_OFFSET, &[I8042_CMD_CTL_TEST]);
        d.read(COMMAND_OFFSET, &mut b);
        assert_ne!(b[0] & I8042_STR_OBF, 0);
        d.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0x55);
        d.write(COMMAND_OFFSET, &[I8042_CMD_CTL_WCTR]);
        d.write(DATA_OFFSET, &[0x47]);
        d.write(COMMAND_OFFSET, &[I8042_CMD_CTL_RCTR]);
        d.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0x47);
        assert!(!c.is_stopped());
    }
}
