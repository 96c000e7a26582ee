//! The MP table: how a guest without ACPI learns its CPUs and interrupt wiring
//! (Intel MultiProcessor Specification 1.4, chapter 4).
//!
//! Linux (CONFIG_X86_MPPARSE) scans the EBDA for the 16-byte "_MP_" floating
//! pointer, follows it to the "PCMP" configuration table and reads one entry per
//! processor (APIC id, enabled, bootstrap), the ISA bus, the IOAPIC and how the
//! 16 ISA IRQs (and the IOAPIC's other pins) are wired. That is how it knows to
//! send INIT/SIPI to APs 1..N. Written by hand: it is ~150 bytes, and reading it
//! here teaches what "the firmware tells the OS" means.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_START};

/// MP spec revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// APIC version reported for each LAPIC (an integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// Entry types (MP spec table 4-3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Interrupt types (MP spec table 4-9).
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// ISA bus id used in every interrupt entry.
const BUS_ISA: u8 = 0;

/// Errors writing the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// Too many CPUs for one 8-bit APIC id space with the IOAPIC after them.
    #[error("the MP table cannot describe {0} CPUs")]
    TooManyCpus(u8),
    /// Guest memory too small to hold the table.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Builds the configuration table (header + entries) for `num_cpus` CPUs,
/// as it will sit at `table_addr`.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus; // the first id after the CPUs' APIC ids
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // feature flags: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, 0x11, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ i -> IOAPIC pin i, default polarity/trigger (edge, active high).
    for irq in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, BUS_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT from the 8259, LINT1 = NMI, on every LAPIC (dest 0xff).
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, BUS_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let length = (44 + entries.len()) as u16;
    let mut t = Vec::with_capacity(usize::from(length));
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&length.to_le_bytes());
    t.push(MP_SPEC_REV);
    t.push(0); // checksum, below
    t.extend_from_slice(b"EMBER   "); // OEM id, 8 bytes
    t.extend_from_slice(b"MICROVM     "); // product id, 12 bytes
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved
    t.extend(entries);
    t[7] = checksum(&t);
    t
}

/// The 16-byte floating pointer structure pointing at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&table_addr.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = MP_SPEC_REV;
    // f[11] = feature byte 1: 0 = a configuration table is present.
    f[10] = checksum(&f);
    f
}

/// Writes the floating pointer and the table for `num_cpus` CPUs at `MPTABLE_START`.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if u32::from(num_cpus) >= 0xff {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = MPTABLE_START + 16;
    mem.write_slice(&floating_pointer(table_addr as u32), GuestAddress(MPTABLE_START)).map_err(MptableError::Write)?;
    mem.write_slice(&config_table(num_cpus), GuestAddress(table_addr)).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_sum_to_zero() {
        let f = floating_pointer(0x9fc10);
        assert_eq!(f.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let t = config_table(4);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn table_lists_every_cpu_once_and_one_bsp() {
        let t = config_table(4);
        assert_eq!(&t[0..4], b"PCMP");
        assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // Walk the entries.
        let (mut off, mut cpus, mut bsps) = (44, 0, 0);
        for _ in 0..count {
            match t[off] {
                MP_PROCESSOR => {
                    assert_eq!(t[off + 1], cpus, "APIC ids are 0..N");
                    cpus += 1;
                    bsps += u32::from(t[off + 3] & CPU_BOOTPROCESSOR != 0);
                    off += 20;
                }
                MP_IOAPIC => {
                    assert_eq!(t[off + 1], 4, "IOAPIC id after the CPUs");
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!((cpus, bsps, off), (4, 1, t.len()));
    }

    #[test]
    fn written_into_the_ebda() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        let ptr: u32 = mem.read_obj(GuestAddress(MPTABLE_START + 4)).unwrap();
        mem.read_slice(&mut sig, GuestAddress(u64::from(ptr))).unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
