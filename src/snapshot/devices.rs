//! What each device keeps between two guest accesses, as snapshot data. The devices turn
//! themselves into these and back (`Serial::save_state`, `I8042::save_state`,
//! `MmioTransport::save_state` and their `restore_state`); the host side (the terminal, the disk
//! image, the tap) is reopened, not saved.

use serde::{Deserialize, Serialize};

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`), plus ember's shadow
/// copies of LCR and IER (devices/serial.rs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest (at most the FIFO's 64).
    pub in_buffer: Vec<u8>,
    /// ember's shadow of LCR.
    pub shadow_lcr: u8,
    /// ember's shadow of IER.
    pub shadow_ier: u8,
}

/// The i8042's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The byte waiting at port 0x60.
    pub output: Option<u8>,
    /// The controller command byte.
    pub command_byte: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
}

/// One virtqueue (virtio-queue's `QueueState`): its size and rings as the driver set them, and
/// where the device is in them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// QueueNumMax.
    pub max_size: u16,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueState> for virtio_queue::QueueState {
    fn from(q: &QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// One virtio-mmio transport's register file (virtio 1.2, 4.2.2) and queues. The device behind it
/// keeps nothing else a driver could see: virtio-blk and virtio-rng are stateless between
/// requests, and virtio-net's negotiated features are these `acked_features`, given back to it
/// through `activate` (a frame read from the tap and not yet delivered is dropped, as a NIC may).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device ID, checked against the device rebuilt at restore.
    pub device_type: u32,
    /// Status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The driver accepted a feature bit above 63.
    pub acked_beyond_64: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues.
    pub queues: Vec<QueueState>,
    /// Whether each queue's setup so far was valid.
    pub queue_setup_valid: Vec<bool>,
    /// What the device behind the transport keeps of its own (only virtio-console keeps
    /// anything: `VirtioDevice::save_state`).
    #[serde(default)]
    pub device: Option<DeviceState>,
}

/// A virtio device's own state, for the device types that keep one between requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-console (devices/virtio/console.rs).
    Console(ConsoleState),
}

/// virtio-console's control-protocol state (virtio 1.2, 5.3.6.2): what the driver was told
/// about each port, and the control messages it has not yet received.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// The ports, in order; a restore rebuilds the same names and directions.
    pub ports: Vec<ConsolePortState>,
    /// Control messages (header and payload) waiting for a buffer on the control receiveq.
    pub pending: Vec<Vec<u8>>,
}

/// One console port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsolePortState {
    /// Its name in the guest (`ember.stdout`, ...).
    pub name: String,
    /// Guest input (`ember.stdin`) rather than output.
    pub input: bool,
    /// The driver sent PORT_READY.
    pub ready: bool,
    /// A guest process has the port open.
    pub guest_open: bool,
    /// The guest was told the input ended (PORT_OPEN 0).
    pub closed: bool,
}
