//! The two buses a vCPU exit lands on: port I/O (IN/OUT) and MMIO.
//!
//! A bus maps address ranges to devices; the vCPU loop hands it the exit's
//! address and data and the bus calls the owning device with the offset from
//! that device's base. Devices never see absolute addresses, so the same UART
//! code would serve COM1 or COM2.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::control::{StopReason, VmControl};

/// A device on a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from this device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from this device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("{new} at {base:#x}+{len:#x} overlaps {old}")]
    Overlap {
        /// The device being added.
        new: &'static str,
        /// The device already there.
        old: &'static str,
        /// Base of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("{0}: invalid address range")]
    BadRange(&'static str),
}

struct Slot {
    len: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges -> devices.
#[derive(Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
    /// Stopped when a device turns out broken (see [`Bus::read`]).
    control: Option<Arc<VmControl>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// An empty bus that stops `control`'s VM when a device is found broken.
    pub fn with_control(control: Arc<VmControl>) -> Self {
        Bus { slots: BTreeMap::new(), control: Some(control) }
    }

    /// Locks the device of `slot`. A poisoned lock means the device panicked
    /// in another thread (a bug in ember; that thread stopped the VM, see
    /// `vcpu::run_catching`) and its state cannot be trusted: it is not called
    /// again, the VM is stopped, and this thread goes on without a panic of its
    /// own, so one broken device does not take down every vCPU in turn.
    fn lock<'a>(&self, slot: &'a Slot) -> Option<MutexGuard<'a, dyn BusDevice + 'static>> {
        match slot.device.lock() {
            Ok(device) => Some(device),
            Err(_) => {
                if let Some(c) = &self.control {
                    c.stop(StopReason::EmberFailed(format!(
                        "the {} device failed (it panicked): the VM cannot go on",
                        slot.name
                    )));
                }
                None
            }
        }
    }

    /// Adds `device` at `base..base+len`, refusing overlaps.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &'static str,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange(name))?;
        // The nearest slot below `end` is the only one that can overlap.
        if let Some((&b, s)) = self.slots.range(..end).next_back()
            && b + s.len > base
        {
            return Err(BusError::Overlap { new: name, old: s.name, base, len });
        }
        self.slots.insert(base, Slot { len, name, device });
        Ok(())
    }

    /// The device owning `addr`, with the offset into it.
    fn find(&self, addr: u64, size: usize) -> Option<(&Slot, u64)> {
        let (&base, slot) = self.slots.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device, and start inside it:
        // an empty access at `base + len` is past the device, not its last
        // byte (found by fuzz/buses).
        (offset < slot.len && offset.checked_add(size as u64)? <= slot.len).then_some((slot, offset))
    }

    /// Name of the device at `addr`, for statistics and messages.
    pub fn device_name(&self, addr: u64) -> Option<&'static str> {
        self.find(addr, 1).map(|(s, _)| s.name)
    }

    /// Dispatches a read; returns false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                match self.lock(slot) {
                    Some(mut device) => device.read(offset, data),
                    None => data.fill(0xff),
                }
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                if let Some(mut device) = self.lock(slot) {
                    device.write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, "uart", dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, b"A"));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![b'A'])]);
        assert_eq!(bus.device_name(0x3ff), Some("uart"));
    }

    #[test]
    fn unmapped_and_straddling_accesses_miss() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, "d", Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0xff, &mut b[..1]));
        assert!(!bus.read(0x110, &mut b[..1]));
        assert!(!bus.read(0x10e, &mut b), "4 bytes at 0x10e run past the device");
        assert!(!bus.write(u64::MAX, &b));
        assert!(bus.read(0x10c, &mut b));
    }

    #[test]
    fn an_empty_access_just_past_a_device_misses() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, "d", dev.clone()).unwrap();
        assert!(!bus.write(0x110, &[]), "0x110 is past the device");
        assert!(!bus.read(0x110, &mut []));
        assert!(bus.write(0x10f, &[]), "an empty access inside the device reaches it");
        assert_eq!(dev.lock().unwrap().writes, vec![(0xf, vec![])]);
    }

    struct Panicky;
    impl BusDevice for Panicky {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {
            panic!("a bug in a device");
        }
    }

    #[test]
    fn a_device_that_panicked_stops_the_vm_without_more_panics() {
        let control = Arc::new(VmControl::new().unwrap());
        let mut bus = Bus::with_control(control.clone());
        bus.insert(0x10, 1, "panicky", Arc::new(Mutex::new(Panicky))).unwrap();
        // The first access panics (in its vCPU thread, which stops the VM itself)...
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bus.write(0x10, &[1])));
        assert!(first.is_err());
        assert!(!control.is_stopped());
        // ...and the next ones, from any thread, find the lock poisoned: no panic, the VM stops.
        let mut b = [0u8; 1];
        assert!(bus.read(0x10, &mut b));
        assert_eq!(b, [0xff]);
        assert!(bus.write(0x10, &[1]));
        match control.reason() {
            Some(StopReason::EmberFailed(what)) => assert!(what.contains("panicky"), "{what}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, "a", d()).unwrap();
        assert!(bus.insert(0x10f, 1, "b", d()).is_err());
        assert!(bus.insert(0xf0, 0x11, "c", d()).is_err());
        assert!(bus.insert(0x80, 0x100, "e", d()).is_err());
        assert!(bus.insert(0x110, 1, "f", d()).is_ok());
        assert!(bus.insert(0xf0, 0x10, "g", d()).is_ok());
        assert!(bus.insert(0x0, 0, "zero", d()).is_err());
        assert!(bus.insert(u64::MAX, 2, "wrap", d()).is_err());
    }
}
