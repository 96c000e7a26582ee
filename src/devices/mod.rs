//! Emulated devices. Each file is one device as the guest sees it; devices
//! know nothing of KVM: they get bytes from the bus and raise interrupts through
//! an `EventFd` (an irqfd when the in-kernel irqchip exists).

pub mod acpi_sleep;
pub mod exit;
pub mod i8042;
pub mod serial;
pub mod serial_sink;
pub mod tap;
pub mod virtio;
