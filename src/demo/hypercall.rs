//! A demo-only device for `ember demo` chapter 4: a port-I/O "hypercall".
//!
//! Layer: ember (the VMM), reached by the guest through a VM exit. The guest
//! writes a request number to [`HYPERCALL_PORT`]; every later read returns the
//! next byte of the answer, then 0. Nothing like it exists on a PC: it is the
//! smallest paravirtual interface (compare KVM's own `vmcall` hypercalls,
//! Documentation/virt/kvm/x86/hypercalls.rst, or virtio's shared rings).
//! Registered through `Extras::pio` (extras.rs) for that chapter only.

use crate::bus::BusDevice;

/// The port the demo guest (src/demo/hypercall.S) uses.
pub const HYPERCALL_PORT: u16 = 0x510;
/// Request: "who are you?".
pub const HC_WHO: u8 = 1;
/// Request: "how many hypercalls so far?".
pub const HC_COUNT: u8 = 2;

/// The hypercall device.
#[derive(Debug, Default)]
pub struct Hypercall {
    answer: Vec<u8>,
    next: usize,
    calls: u64,
}

impl Hypercall {
    /// A device with no answer pending.
    pub fn new() -> Self {
        Hypercall::default()
    }

    fn handle_request(&mut self, request: u8) -> String {
        self.calls += 1;
        match request {
            HC_WHO => format!(
                "ember {} (a KVM VMM, host pid {}) on Linux {}",
                env!("CARGO_PKG_VERSION"),
                std::process::id(),
                std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
            ),
            HC_COUNT => format!("{} hypercalls so far", self.calls),
            other => format!("unknown request {other}"),
        }
    }
}

impl BusDevice for Hypercall {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        for b in data.iter_mut() {
            *b = self.answer.get(self.next).copied().unwrap_or(0);
            self.next = (self.next + 1).min(self.answer.len());
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&request) = data.first() {
            self.answer = self.handle_request(request).into_bytes();
            self.next = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_byte_by_byte_then_zero() {
        let mut h = Hypercall::new();
        h.write(0, &[HC_COUNT]);
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        loop {
            h.read(0, &mut b);
            if b[0] == 0 {
                break;
            }
            got.push(b[0]);
        }
        assert_eq!(got, b"1 hypercalls so far");
        h.read(0, &mut b);
        assert_eq!(b[0], 0);
        h.write(0, &[HC_WHO]);
        h.read(0, &mut b);
        assert_eq!(b[0], b'e');
    }
}
