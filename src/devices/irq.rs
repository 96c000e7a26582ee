//! The one way a device interrupts the guest: an [`IrqLine`].
//!
//! Devices know nothing of KVM. Under KVM an interrupt line is an eventfd
//! registered as an irqfd for one GSI (KVM api.rst, 4.75 KVM_IRQFD): a write
//! to it makes the in-kernel irqchip raise that pin, without a system call
//! into ember's vCPU threads. The 16550 UART (`serial.rs`, IRQ 4) and every
//! virtio-mmio transport (`virtio/mmio.rs`, one line per device; virtio 1.2,
//! 4.2.3.4 "Notifications From The Device") raise theirs through
//! [`IrqLine::trigger`]. Without an irqchip there is no line: the guest polls.
//!
//! Data path: a device sets its interrupt status -> [`IrqLine::trigger`]
//! (`write(2)` on the eventfd) -> KVM injects the interrupt.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// A device's interrupt line to the guest.
pub enum IrqLine {
    /// An eventfd registered as a KVM irqfd (or read by a test).
    Irqfd(EventFd),
    /// No interrupt controller: the guest polls.
    None,
}

impl IrqLine {
    /// Raises the line (edge: one write per interrupt).
    pub fn trigger(&self) -> io::Result<()> {
        match self {
            IrqLine::Irqfd(fd) => fd.write(1),
            IrqLine::None => Ok(()),
        }
    }

    /// Whether the line reaches an interrupt controller (the guest can be
    /// interrupt-driven).
    pub fn is_connected(&self) -> bool {
        matches!(self, IrqLine::Irqfd(_))
    }
}

/// vm-superio's UART raises its interrupt through this trait.
impl vm_superio::Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        IrqLine::trigger(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_trigger_is_one_write_to_the_irqfd() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let line = IrqLine::Irqfd(evt.try_clone().unwrap());
        assert!(line.is_connected());
        line.trigger().unwrap();
        vm_superio::Trigger::trigger(&line).unwrap();
        assert_eq!(evt.read().unwrap(), 2);
        assert!(!IrqLine::None.is_connected());
        IrqLine::None.trigger().unwrap();
    }
}
