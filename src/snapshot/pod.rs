//! KVM's state structures as bytes in the snapshot file.
//!
//! The structures KVM hands out (`kvm_regs`, `kvm_sregs`, `kvm_xsave`, `kvm_lapic_state`, ...) are
//! plain C data of a fixed size (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h). The
//! snapshot keeps each as its bytes, hex-encoded inside the JSON body, and checks the size when it
//! reads them back: a file from a build whose structures differ is refused, never misread. This
//! avoids kvm-bindings' `serde` feature, which pulls in zerocopy and derives a JSON shape per field.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A KVM structure that is plain data: every bit pattern of its size is a valid value, and it
/// holds no pointers.
///
/// # Safety
/// Implement only for `#[repr(C)]` types made of integers and arrays of integers.
pub unsafe trait Pod: Default {}

// SAFETY: this and each below: bindgen-generated #[repr(C)] structs of integers, arrays and
// unions of integers only (kvm-bindings, x86_64/bindings.rs).
unsafe impl Pod for kvm_bindings::kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_clock_data {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_cpuid_entry2 {}

/// Bytes, written as one hex string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Blob {
    /// The bytes of `v`.
    pub fn of<T: Pod>(v: &T) -> Blob {
        // SAFETY: `T: Pod` is plain data of `size_of::<T>()` initialised bytes (padding included:
        // the values come from KVM or `Default`, which zero the whole structure).
        let bytes = unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) };
        Blob(bytes.to_vec())
    }

    /// The value these bytes hold; None if their length is not `T`'s size.
    pub fn to<T: Pod>(&self) -> Option<T> {
        if self.0.len() != std::mem::size_of::<T>() {
            return None;
        }
        let mut v = T::default();
        // SAFETY: `v` is `size_of::<T>()` writable bytes, and any bit pattern is a valid `T` (Pod).
        unsafe { std::ptr::copy_nonoverlapping(self.0.as_ptr(), (&mut v as *mut T).cast::<u8>(), self.0.len()) };
        Some(v)
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
        let s = String::deserialize(d)?;
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(serde::de::Error::custom("not a lower-case hex digit")),
        };
        if !s.len().is_multiple_of(2) {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        s.as_bytes().chunks(2).map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?)).collect::<Result<Vec<u8>, _>>().map(Blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_structure_round_trips_through_json() {
        let regs = kvm_bindings::kvm_regs { rip: 0x1234_5678, rax: 7, rflags: 2, ..Default::default() };
        let json = serde_json::to_string(&Blob::of(&regs)).unwrap();
        let back: Blob = serde_json::from_str(&json).unwrap();
        let r: kvm_bindings::kvm_regs = back.to().unwrap();
        assert_eq!((r.rip, r.rax, r.rflags), (0x1234_5678, 7, 2));
    }

    #[test]
    fn a_wrong_size_or_bad_digit_is_refused() {
        assert!(Blob(vec![0; 3]).to::<kvm_bindings::kvm_regs>().is_none());
        assert!(serde_json::from_str::<Blob>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"012\"").is_err());
    }
}
