//! The virtio-mmio transport, "version 2" (modern) register layout: virtio 1.2,
//! section 4.2.2. Register names are those of Linux's
//! include/uapi/linux/virtio_mmio.h, so `grep VIRTIO_MMIO_QUEUE_READY` finds
//! both the guest driver (drivers/virtio/virtio_mmio.c) and this emulation.
//!
//! What the guest sees: a 4 KiB window (`layout::VIRTIO_MMIO_SIZE`) with
//! 32-bit registers below 0x100 and the device's configuration space from
//! 0x100, and one interrupt line. The driver's life, in order (3.1.1):
//! reset (STATUS = 0), ACKNOWLEDGE, DRIVER, read DEVICE_FEATURES / write
//! DRIVER_FEATURES (two 32-bit halves, chosen by the *_SEL registers),
//! FEATURES_OK (refused, i.e. not set, unless the driver accepted
//! VIRTIO_F_VERSION_1 and nothing we did not offer), per queue: QUEUE_SEL,
//! QUEUE_NUM_MAX, QUEUE_NUM, the three ring addresses, QUEUE_READY; then
//! DRIVER_OK. From then on QUEUE_NOTIFY (an ioeventfd, usually) ->
//! [`MmioTransport::notify`], and INTERRUPT_STATUS / INTERRUPT_ACK.
//!
//! Hostile drivers: register values are checked where they take effect. A
//! queue whose size or addresses are invalid (size 0, above QUEUE_NUM_MAX or
//! not a power of two; misaligned rings; rings outside guest RAM) does not
//! become ready: QUEUE_READY reads back 0 and the device sets
//! DEVICE_NEEDS_RESET with a configuration-change interrupt. Accesses of the
//! wrong width, writes in the wrong state and notifies for queues that do not
//! exist or are not ready are logged (rate-limited) and ignored.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{QueueOutcome, VirtioDevice, guest_warn};
use crate::bus::BusDevice;
use crate::devices::irq::IrqLine;
use crate::snapshot::devices::TransportState;

/// "virt" in little endian (4.2.2).
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID ember reports (none registered).
pub const MMIO_VENDOR_ID: u32 = 0;

/// The register file of one virtio-mmio device, the queues it owns, and its
/// interrupt.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Whether every QUEUE_NUM and ring address written since the last reset
    /// was one a queue can have (checked again at QUEUE_READY).
    queue_setup_valid: Vec<bool>,
    irq: IrqLine,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    acked_beyond_64: bool,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Each queue's ioeventfd (the event loop serves it), for work a trapped
    /// notify leaves over; None in tests without an event loop.
    queue_events: Vec<Option<EventFd>>,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is triggered (an irqfd under KVM) whenever
    /// INTERRUPT_STATUS gains a bit (virtio 1.2, 4.2.3.4).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqLine) -> Self {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            // The devices here offer power-of-two sizes in 1..=32768, which
            // Queue::new accepts; a bad one is a bug in ember, caught by the tests.
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        let n = queues.len();
        MmioTransport {
            device,
            mem,
            queues,
            queue_setup_valid: vec![true; n],
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_beyond_64: false,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queue_events: (0..n).map(|_| None).collect(),
        }
    }

    /// Hands the transport a copy of queue `index`'s ioeventfd: a trapped
    /// notify that leaves work over signals it, so the event loop serves the rest.
    pub fn set_queue_event(&mut self, index: usize, evt: EventFd) {
        if let Some(slot) = self.queue_events.get_mut(index) {
            *slot = Some(evt);
        }
    }

    /// Number of virtqueues (each gets an ioeventfd).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The register file and queues, for a snapshot (snapshot/devices.rs).
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            acked_beyond_64: self.acked_beyond_64,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            queue_setup_valid: self.queue_setup_valid.clone(),
            device: self.device.save_state(),
        }
    }

    /// Takes the state a snapshot saved: the same device type and queue count, queues that
    /// virtio-queue accepts (sizes, alignment), rings inside guest RAM. A device the driver had
    /// started is activated again with the features it accepted.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), String> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "virtio device type {} with {} queues in the snapshot, {} with {} rebuilt",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let q = Queue::try_from(virtio_queue::QueueState::from(q))
                .map_err(|e| format!("virtio device type {}: queue {i}: {e:?}", s.device_type))?;
            if q.ready() && !rings_in_ram(&q, &self.mem) {
                return Err(format!("virtio device type {}: queue {i}'s rings lie outside guest RAM", s.device_type));
            }
            queues.push(q);
        }
        self.device.restore_state(s.device.as_ref())?;
        self.queues = queues;
        self.queue_setup_valid = s.queue_setup_valid.clone();
        self.queue_setup_valid.resize(self.queues.len(), true);
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.acked_beyond_64 = s.acked_beyond_64;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.activate(self.acked_features);
        }
        Ok(())
    }

    /// True once the driver set DRIVER_OK (and the device does not need a reset): its queues may
    /// hold work.
    pub fn is_active(&self) -> bool {
        self.ready_for_queues()
    }

    fn ready_for_queues(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    /// The driver notified queue `index` (QUEUE_NOTIFY, by ioeventfd or trapped
    /// write): serve it and raise the interrupt the device asks for. Returns
    /// true when work is left for another call (the device's budget ran out).
    pub fn notify(&mut self, index: u32) -> bool {
        let i = index as usize;
        if !self.ready_for_queues() {
            guest_warn!("virtio-mmio: notify of queue {index} before DRIVER_OK (status {:#x}): ignored", self.status);
            return false;
        }
        let Some(queue) = self.queues.get(i) else {
            guest_warn!("virtio-mmio: notify of queue {index}, the device has {}: ignored", self.queues.len());
            return false;
        };
        if !queue.ready() {
            guest_warn!("virtio-mmio: notify of queue {index}, which was never made ready: ignored");
            return false;
        }
        let outcome = self.device.process_queues(i, &mut self.queues, &self.mem);
        self.apply(outcome)
    }

    /// The device's host descriptor (a tap) is readable: let the device
    /// serve it with its queues, once the driver is running. Returns true when
    /// work is left for another call.
    pub fn host_event(&mut self) -> bool {
        if !self.ready_for_queues() {
            // Nothing is lost: the device reads again when the driver kicks a queue.
            return false;
        }
        let outcome = self.device.process_host_event(&mut self.queues, &self.mem);
        self.apply(outcome)
    }

    /// Raises what `outcome` asks for; true if the device has more to do.
    fn apply(&mut self, outcome: QueueOutcome) -> bool {
        match outcome {
            QueueOutcome::Quiet => false,
            QueueOutcome::Interrupt => {
                self.raise(VIRTIO_MMIO_INT_VRING);
                false
            }
            QueueOutcome::More { interrupt } => {
                if interrupt {
                    self.raise(VIRTIO_MMIO_INT_VRING);
                }
                true
            }
            QueueOutcome::NeedsReset => {
                self.needs_reset();
                false
            }
        }
    }

    /// The device's host descriptor for the event loop, if it has one.
    pub fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.host_fd()
    }

    /// Whether the event loop should report the host descriptor writable too.
    pub fn host_fd_writable(&self) -> bool {
        self.device.host_fd_writable()
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver with a configuration
    /// change interrupt (virtio 1.2, 2.1.2 and 4.2.3.3).
    fn needs_reset(&mut self) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            guest_warn!("virtio-mmio: device {} needs a reset", self.device.device_type());
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            self.raise(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.irq.trigger() {
            log::error!("virtio-mmio: cannot signal the interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_setup_valid.fill(true);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_beyond_64 = false;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            guest_warn!("virtio-mmio: status {old:#x} -> {value:#x} clears bits without a reset: ignored");
            return;
        }
        let mut new = value & !VIRTIO_CONFIG_S_NEEDS_RESET | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        let added = new & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let extra = self.acked_features & !offered;
            if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 || extra != 0 || self.acked_beyond_64 {
                // 3.1.1 step 6: the driver re-reads the status, sees no
                // FEATURES_OK, and gives up on the device.
                guest_warn!(
                    "virtio-mmio: driver features {:#x} refused (offered {offered:#x}; VERSION_1 is required)",
                    self.acked_features
                );
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                guest_warn!("virtio-mmio: DRIVER_OK without FEATURES_OK: ignored");
                new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else {
                self.device.activate(self.acked_features);
            }
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            log::debug!("virtio-mmio: the driver gave up on device {} (FAILED)", self.device.device_type());
        }
        self.status = new;
    }

    /// Queue configuration is writable between FEATURES_OK and DRIVER_OK, and
    /// only while the selected queue is not ready.
    fn selected_queue_for_setup(&mut self, what: &str) -> Option<usize> {
        let i = self.queue_sel as usize;
        let setup = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match self.queues.get(i) {
            Some(q) if setup && !q.ready() => Some(i),
            Some(_) => {
                guest_warn!(
                    "virtio-mmio: {what} of queue {i} outside queue setup (status {:#x}): ignored",
                    self.status
                );
                None
            }
            None => {
                guest_warn!("virtio-mmio: {what} of queue {i}, which does not exist: ignored");
                None
            }
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let i = self.queue_sel as usize;
        if value == 0 {
            // Allowed at any time on our side; the queue simply stops.
            if let Some(q) = self.queues.get_mut(i) {
                q.set_ready(false);
            }
            return;
        }
        let Some(i) = self.selected_queue_for_setup("QUEUE_READY") else { return };
        let q = &mut self.queues[i];
        q.set_ready(true);
        let valid = self.queue_setup_valid[i] && rings_in_ram(q, &self.mem) && q.is_valid(&self.mem);
        if !valid {
            q.set_ready(false);
            guest_warn!(
                "virtio-mmio: queue {i} made ready with size {} and rings at {:#x}/{:#x}/{:#x}: invalid",
                q.size(),
                q.desc_table(),
                q.avail_ring(),
                q.used_ring()
            );
            self.needs_reset();
        }
    }

    fn write_queue_addr(&mut self, offset: u32, value: u32) {
        let Some(i) = self.selected_queue_for_setup("ring address") else { return };
        let q = &mut self.queues[i];
        let merge = |old: u64| {
            if offset & 4 != 0 {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        // The try_ setters refuse misaligned rings (2.7: 16, 2 and 4 bytes);
        // whether the rings lie in guest RAM is checked at QUEUE_READY.
        let ok = match offset {
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                q.try_set_desc_table_address(GuestAddress(merge(q.desc_table()))).is_ok()
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring()))).is_ok()
            }
            _ => q.try_set_used_ring_address(GuestAddress(merge(q.used_ring()))).is_ok(),
        };
        if !ok {
            guest_warn!("virtio-mmio: misaligned ring address {value:#x} (register {offset:#x}) for queue {i}");
            self.queue_setup_valid[i] = false;
        }
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!("virtio-mmio: read of write-only or unknown register {offset:#x}: 0");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let negotiating =
                    self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if !negotiating {
                    guest_warn!("virtio-mmio: DRIVER_FEATURES written outside negotiation: ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
                    // Feature bits 64+ do not exist: a driver accepting one
                    // is refused at FEATURES_OK.
                    _ => self.acked_beyond_64 |= value != 0,
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let Some(i) = self.selected_queue_for_setup("QUEUE_NUM") else { return };
                let ok = u16::try_from(value).ok().is_some_and(|n| self.queues[i].try_set_size(n).is_ok());
                self.queue_setup_valid[i] &= ok;
                if !ok {
                    guest_warn!(
                        "virtio-mmio: QUEUE_NUM {value} for queue {i} (max {}, a power of two): invalid",
                        self.queues[i].max_size()
                    );
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // A notify KVM did not match to an ioeventfd is served here, on
                // the notifying vCPU's thread. What the budget leaves goes to
                // the event loop through the queue's ioeventfd, as if the
                // guest had notified again: never a loop here, which a guest
                // that keeps posting could hold forever (and with it the stop).
                if self.notify(value)
                    && let Some(Some(evt)) = self.queue_events.get(value as usize)
                    && let Err(e) = evt.write(1)
                {
                    log::error!("virtio-mmio: cannot requeue queue {value}: {e}");
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_addr(offset, value),
            _ => guest_warn!("virtio-mmio: write of {value:#x} to read-only or unknown register {offset:#x}: ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            guest_warn!("virtio-mmio: {}-byte read at {offset:#x}: registers are 32-bit", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!("virtio-mmio: {}-byte write at {offset:#x}: registers are 32-bit", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!("virtio-mmio: misaligned write at {offset:#x}: ignored");
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

/// Whether the three rings of `q` lie in guest RAM (virtio 1.2, 2.7: sizes of
/// the descriptor table, the driver area and the device area). Checked before
/// `Queue::is_valid`, which logs every failure without a rate limit.
fn rings_in_ram(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let n = q.size() as usize;
    [(q.desc_table(), 16 * n), (q.avail_ring(), 6 + 2 * n), (q.used_ring(), 6 + 8 * n)]
        .into_iter()
        .all(|(addr, len)| mem.check_range(GuestAddress(addr), len))
}

/// The guest address the driver writes to notify a queue: the ioeventfd address.
pub fn notify_address(base: GuestAddress) -> u64 {
    base.0 + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil;
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A device with two queues that records what the transport did to it.
    #[derive(Default)]
    struct Probe {
        log: Arc<Mutex<Vec<String>>>,
        outcome: Option<QueueOutcome>,
    }
    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push(format!("config {offset} {data:?}"));
        }
        fn activate(&mut self, acked: u64) {
            self.log.lock().unwrap().push(format!("activate {acked:#x}"));
        }
        fn process_queue(&mut self, index: usize, _: &mut Queue, _: &GuestMemoryMmap) -> QueueOutcome {
            self.log.lock().unwrap().push(format!("queue {index}"));
            self.outcome.unwrap_or(QueueOutcome::Interrupt)
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset".into());
        }
    }

    /// The transport under test, driven as the guest's driver would, with
    /// its device's log and the other end of its interrupt.
    struct Driver {
        t: MmioTransport,
        log: Arc<Mutex<Vec<String>>>,
        irq: EventFd,
    }

    fn transport() -> Driver {
        let log = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = Probe { log: log.clone(), outcome: None };
        Driver {
            t: MmioTransport::new(Box::new(dev), testutil::memory(), IrqLine::Irqfd(irq.try_clone().unwrap())),
            log,
            irq,
        }
    }

    impl Driver {
        fn r(&mut self, off: u32) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(u64::from(off), &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, off: u32, v: u32) {
            self.t.write(u64::from(off), &v.to_le_bytes());
        }
        fn log(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
        /// Linux's virtio_mmio probe up to FEATURES_OK, accepting `features`.
        fn negotiate(&mut self, features: u64) -> bool {
            self.w(VIRTIO_MMIO_STATUS, 0);
            self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
            let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            self.w(VIRTIO_MMIO_STATUS, s);
            self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
        }
        fn setup_queue(&mut self, q: u32, size: u32, desc: u64) {
            self.w(VIRTIO_MMIO_QUEUE_SEL, q);
            self.w(VIRTIO_MMIO_QUEUE_NUM, size);
            self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
            self.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, testutil::AVAIL as u32);
            self.w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            self.w(VIRTIO_MMIO_QUEUE_USED_LOW, testutil::USED as u32);
            self.w(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        fn driver_ok(&mut self) {
            let s = self.r(VIRTIO_MMIO_STATUS);
            self.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        }
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(t.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(t.r(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(t.r(VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(t.r(VIRTIO_MMIO_VENDOR_ID), 0);
        t.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(t.r(VIRTIO_MMIO_DEVICE_FEATURES), 1 << 3);
        t.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(t.r(VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        t.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(t.r(VIRTIO_MMIO_DEVICE_FEATURES), 0);
        // Narrow and misaligned register accesses read as zero and change nothing.
        let mut b = [0xffu8; 2];
        t.t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
        assert_eq!(t.r(VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn feature_negotiation_requires_version_1() {
        let mut t = transport();
        assert!(!t.negotiate(0), "a legacy driver is refused");
        assert!(!t.negotiate(V1 | 1 << 5), "a feature we did not offer is refused");
        assert!(t.negotiate(V1 | 1 << 3));
        // DRIVER_FEATURES is read-only once FEATURES_OK is set.
        t.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        t.w(VIRTIO_MMIO_DRIVER_FEATURES, 0);
        t.driver_ok();
        assert_eq!(
            t.log(),
            vec!["reset".to_string(), "reset".into(), "reset".into(), format!("activate {:#x}", V1 | 1 << 3)]
        );
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused() {
        let mut t = transport();
        t.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        t.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(t.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        // Clearing a bit without a reset is ignored too.
        t.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(t.r(VIRTIO_MMIO_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    }

    #[test]
    fn queue_setup_notify_interrupt_and_ack() {
        let mut t = transport();
        assert!(t.negotiate(V1));
        t.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(t.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        t.w(VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(t.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        t.w(VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(t.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "queue 2 does not exist");
        t.setup_queue(0, 8, testutil::DESC);
        assert_eq!(t.r(VIRTIO_MMIO_QUEUE_READY), 1);
        // Notifies before DRIVER_OK are ignored.
        t.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.log().iter().all(|l| !l.starts_with("queue")));
        t.driver_ok();
        t.log();
        t.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.log(), vec!["queue 0"]);
        assert_eq!(t.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(t.irq.read().unwrap(), 1);
        t.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(t.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Queue 1 never made ready, queue 9 does not exist, and the same path
        // serves ioeventfd notifies: nothing happens.
        t.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        t.t.notify(9);
        t.t.notify(u32::MAX);
        assert!(t.log().is_empty());
        // Queue setup after DRIVER_OK is ignored.
        t.w(VIRTIO_MMIO_QUEUE_SEL, 1);
        t.w(VIRTIO_MMIO_QUEUE_NUM, 4);
        t.w(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(t.r(VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn bad_queue_sizes_and_addresses_need_reset() {
        for (size, desc) in [
            (32u32, testutil::DESC),    // above QUEUE_NUM_MAX
            (6, testutil::DESC),        // not a power of two
            (0, testutil::DESC),        // empty
            (0x1_0008, testutil::DESC), // does not fit 16 bits
            (8, testutil::DESC + 8),    // misaligned descriptor table
            (8, 0xfff_0000),            // outside guest RAM
            (8, u64::MAX - 15),         // wraps
        ] {
            let mut t = transport();
            assert!(t.negotiate(V1));
            t.setup_queue(0, size, desc);
            assert_eq!(t.r(VIRTIO_MMIO_QUEUE_READY), 0, "size {size} desc {desc:#x}");
            assert_ne!(t.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "size {size} desc {desc:#x}");
            assert_eq!(t.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
            assert_eq!(t.r(VIRTIO_MMIO_CONFIG_GENERATION), 1);
            // Nothing is served until the driver resets the device...
            t.driver_ok();
            t.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
            assert!(!t.log().iter().any(|l| l.starts_with("queue")));
            // ...after which the device works again.
            assert!(t.negotiate(V1));
            assert_eq!(t.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
            assert_eq!(t.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
            t.setup_queue(0, 8, testutil::DESC);
            assert_eq!(t.r(VIRTIO_MMIO_QUEUE_READY), 1);
        }
    }

    #[test]
    fn device_reported_breakage_sets_needs_reset() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = Probe { log: log.clone(), outcome: Some(QueueOutcome::NeedsReset) };
        let mut t = Driver {
            t: MmioTransport::new(Box::new(dev), testutil::memory(), IrqLine::Irqfd(irq.try_clone().unwrap())),
            log,
            irq,
        };
        assert!(t.negotiate(V1));
        t.setup_queue(0, 8, testutil::DESC);
        t.driver_ok();
        t.t.notify(0);
        assert_ne!(t.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(t.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        t.log();
        t.t.notify(0);
        assert!(t.log().is_empty(), "a device that needs a reset serves nothing");
    }

    #[test]
    fn a_trapped_notify_hands_what_is_left_to_the_event_loop() {
        // A device that always has more (a guest that keeps posting): a trapped
        // notify serves one budget, then signals the queue's ioeventfd for the
        // event loop instead of looping on the vCPU thread.
        let log = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = Probe { log: log.clone(), outcome: Some(QueueOutcome::More { interrupt: true }) };
        let mut t = Driver {
            t: MmioTransport::new(Box::new(dev), testutil::memory(), IrqLine::Irqfd(irq.try_clone().unwrap())),
            log,
            irq,
        };
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        t.t.set_queue_event(0, evt.try_clone().unwrap());
        assert!(t.negotiate(V1));
        t.setup_queue(0, 8, testutil::DESC);
        t.driver_ok();
        t.log();
        t.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.log(), vec!["queue 0"]);
        assert_eq!(evt.read().unwrap(), 1, "the rest is the event loop's");
        assert_eq!(t.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        // The event loop's own call says there is more, and signals nothing.
        assert!(t.t.notify(0));
        assert!(evt.read().is_err());
    }

    #[test]
    fn config_space_is_passed_through() {
        let mut t = transport();
        let mut b = [0u8; 3];
        t.t.read(0x104, &mut b);
        assert_eq!(b, [4, 5, 6]);
        t.t.write(0x108, &[9]);
        assert_eq!(t.log(), vec!["config 8 [9]"]);
        assert_eq!(t.r(VIRTIO_MMIO_CONFIG_GENERATION), 0);
    }
}
