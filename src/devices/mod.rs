//! Emulated devices. Each file is one device as the guest sees it; devices
//! know nothing of KVM: they get bytes from the bus and raise interrupts through
//! an [`irq::IrqLine`] (an irqfd when the in-kernel irqchip exists): the UART
//! and every virtio-mmio transport alike.
//!
//! The host ends of virtio-net live apart from what the guest sees
//! (`virtio/net.rs`): `net_backend.rs` (tap or stream), `tap.rs`,
//! `frame_stream.rs` (length-prefixed frames, passt's protocol) and
//! `passt.rs` (starting and stopping passt for `--net user`). A shared
//! folder's file server is `p9_server.rs` (a jailed child process), behind
//! the guest's virtio-9p device (`virtio/p9.rs`). `child.rs` holds both kinds
//! of helper process through a pidfd.

pub mod acpi_sleep;
pub mod child;
pub mod exit;
pub mod frame_stream;
pub mod i8042;
pub mod irq;
pub mod net_backend;
pub mod p9_server;
pub mod passt;
pub mod pci_host;
pub mod serial;
pub mod serial_sink;
pub mod stdin_source;
pub mod tap;
pub mod virtio;
