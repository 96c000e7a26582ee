//! Emulated devices. Each file is one device as the guest sees it; devices
//! know nothing of KVM: they get bytes from the bus and raise interrupts through
//! an [`irq::IrqLine`] (an irqfd when the in-kernel irqchip exists): the UART
//! and every virtio-mmio transport alike.
//!
//! The host's ends of these devices (taps, passt, the 9p server, the
//! output and input threads) are in [`crate::host`]: the guest never sees them.

pub mod acpi_sleep;
pub mod exit;
pub mod i8042;
pub mod irq;
pub mod pci_host;
pub mod serial;
pub mod virtio;
