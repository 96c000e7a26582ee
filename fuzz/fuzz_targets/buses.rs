//! The port-I/O and MMIO buses (`bus.rs`) against a model: devices inserted at
//! ranges from the input (many of them overlapping, empty or wrapping), then
//! reads and writes of any width at any address.
//!
//! Invariants, beyond "no panic":
//! - an insert succeeds exactly when its range is non-empty, does not wrap
//!   and overlaps no range already on the bus;
//! - an access reaches a device exactly when that device's range holds the
//!   whole access (it starts inside and does not run past the end), and then
//!   only that device, with the offset from its base and the same bytes;
//! - a read the bus does not deliver leaves the buffer untouched and returns
//!   false (the vCPU loop then answers zeros, STYLE.md "The vCPU loop");
//! - `device_name` names the device a 1-byte access would reach.
#![no_main]

use std::sync::{Arc, Mutex};

use ember::bus::{Bus, BusDevice};
use libfuzzer_sys::fuzz_target;

/// What one device saw: (offset, width, is_write, bytes written).
type Log = Arc<Mutex<Vec<(u64, usize, bool, Vec<u8>)>>>;

struct Recorder {
    id: u8,
    log: Log,
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.log.lock().unwrap().push((offset, data.len(), false, Vec::new()));
        for (i, b) in data.iter_mut().enumerate() {
            *b = pattern(self.id, offset, i);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.log.lock().unwrap().push((offset, data.len(), true, data.to_vec()));
    }
}

/// What device `id` answers for byte `i` of a read at `offset`.
fn pattern(id: u8, offset: u64, i: usize) -> u8 {
    id.wrapping_mul(31) ^ (offset as u8).wrapping_add(i as u8) ^ 0x5a
}

/// Reads a little-endian u64 of `n` bytes from `input`, advancing it.
fn take(input: &mut &[u8], n: usize) -> u64 {
    let n = n.min(input.len());
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&input[..n]);
    *input = &input[n..];
    u64::from_le_bytes(b)
}

/// An address near the interesting places: small (port-I/O-like), near the
/// top of the address space, or anything.
fn address(kind: u8, raw: u64) -> u64 {
    match kind % 4 {
        0 => raw & 0xffff,
        1 => raw & 0xff,
        2 => u64::MAX - (raw & 0xffff),
        _ => raw,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut bus = Bus::new();
    // The model: (base, len, id, log) of every device the bus took.
    let mut model: Vec<(u64, u64, u8, Log)> = Vec::new();
    let mut next_id = 0u8;
    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        match op % 3 {
            0 => {
                let base = address(op >> 2, take(&mut input, 8));
                let len = match (op >> 4) % 4 {
                    0 => take(&mut input, 1),
                    1 => take(&mut input, 2),
                    2 => take(&mut input, 8),
                    _ => u64::MAX - take(&mut input, 1),
                };
                let log: Log = Arc::default();
                let id = next_id;
                next_id = next_id.wrapping_add(1);
                let device = Arc::new(Mutex::new(Recorder { id, log: log.clone() }));
                let fits = len > 0 && base.checked_add(len).is_some();
                let free = fits && model.iter().all(|(b, l, _, _)| base >= b + l || *b >= base + len);
                let took = bus.insert(base, len, "fuzz", device).is_ok();
                assert_eq!(took, fits && free, "insert {base:#x}+{len:#x}: bus {took}, model {}", fits && free);
                if took {
                    model.push((base, len, id, log));
                }
            }
            w => {
                let addr = address(op >> 2, take(&mut input, 8));
                let width = usize::from((op >> 4) % 9);
                let value = take(&mut input, 8).to_le_bytes();
                // The slot whose range holds all of addr..addr+width, and
                // holds addr itself (a zero-width access at the end of a
                // slot is past it).
                let owner = model.iter().find(|(b, l, _, _)| {
                    addr >= *b && addr - b < *l && (addr - b).checked_add(width as u64).is_some_and(|end| end <= *l)
                });
                for (_, _, _, log) in &model {
                    log.lock().unwrap().clear();
                }
                let mut buf = [0xeeu8; 8];
                let delivered =
                    if w == 1 { bus.write(addr, &value[..width]) } else { bus.read(addr, &mut buf[..width]) };
                assert_eq!(
                    delivered,
                    owner.is_some(),
                    "access {addr:#x}/{width}: bus {delivered}, model {owner:?}",
                    owner = owner.map(|o| (o.0, o.1))
                );
                for (b, _, id, device_log) in &model {
                    let log = device_log.lock().unwrap();
                    match owner {
                        // (By the log, not the id: ids are a u8 and repeat after 256 inserts.)
                        Some((ob, _, _, owner_log)) if Arc::ptr_eq(owner_log, device_log) => {
                            assert_eq!(ob, b);
                            assert_eq!(log.len(), 1, "device {id} saw {} accesses", log.len());
                            let (offset, len, is_write, bytes) = &log[0];
                            assert_eq!((*offset, *len, *is_write), (addr - b, width, w == 1));
                            if w == 1 {
                                assert_eq!(&bytes[..], &value[..width]);
                            } else {
                                for (i, byte) in buf[..width].iter().enumerate() {
                                    assert_eq!(*byte, pattern(*id, *offset, i), "read returned other bytes");
                                }
                            }
                        }
                        _ => assert!(log.is_empty(), "device {id} at {b:#x} got an access to {addr:#x}/{width}"),
                    }
                }
                if !delivered {
                    assert_eq!(buf, [0xee; 8], "a read of unmapped space changed the buffer");
                }
                let name_owner = model.iter().any(|(b, l, _, _)| addr >= *b && addr - b < *l);
                assert_eq!(bus.device_name(addr).is_some(), name_owner, "device_name({addr:#x})");
            }
        }
    }
});
