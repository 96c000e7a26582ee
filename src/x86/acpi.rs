//! ACPI tables: how a guest with CONFIG_ACPI learns its CPUs, interrupt
//! controllers, virtio-mmio devices and how to power itself off (ACPI 6.4).
//!
//! What the guest finds, all in the legacy BIOS area at `layout::ACPI_START`
//! (Linux scans 0xe0000..0xfffff for the RSDP, ACPI 6.4 5.2.5.1):
//! ```text
//! RSDP (5.2.5.3) -> XSDT (5.2.8) -> FADT (5.2.9) -> DSDT (5.2.11.1)
//!                                -> MADT (5.2.12)
//! ```
//! - The FADT declares a hardware-reduced machine (5.2.9.1, flag
//!   HW_REDUCED_ACPI; 4.1): no PM1 blocks, no SCI, no GPEs, only the sleep
//!   control and status registers (4.8.3.7), two I/O ports served by
//!   `devices/acpi_sleep.rs`. Linux's `poweroff` writes SLP_TYPx (from `\_S5`)
//!   with SLP_EN there, and the VM ends with exit code 0.
//! - The DSDT holds `\_S5` (7.4.2) and one `LNRO0005` device per virtio-mmio
//!   slot (the id Linux's virtio_mmio driver matches, as QEMU's microvm does),
//!   whose `_CRS` (6.2.2) gives its window (Memory32Fixed, 6.4.3.4) and its
//!   interrupt (Extended Interrupt, 6.4.3.6): a kernel whose virtio_mmio is a
//!   module finds the devices, and udev loads the module.
//! - It also holds COM1 (`PNP0501`, I/O 0x3f8-0x3ff, IRQ 4). On a
//!   hardware-reduced machine Linux keeps no legacy PIC (arch/x86/kernel/acpi/boot.c,
//!   `acpi_generic_reduced_hw_init`), so ISA IRQ 4 is mapped to an IOAPIC pin
//!   only when a device's `_CRS` asks for it: without this entry the UART's
//!   interrupt never arrives, and user space's writes to ttyS0 stall after one
//!   byte (the kernel's own console polls, so boot messages still show).
//! - The MADT lists one enabled local APIC per vCPU, the IOAPIC (GSI 0..23,
//!   ISA IRQs identity-mapped, edge/high as in the MP table) and LINT1 as NMI.
//!
//! The MP table (mptable.rs) stays for kernels built without ACPI; a kernel
//! with ACPI prefers these tables. The AML is written by hand with the few
//! encodings below (20.2 "AML Grammar Definition"): names, integers, strings,
//! packages, buffers, scopes and devices.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_SIZE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, APIC_START, COM1_IRQ, COM1_PORT,
    IOAPIC_START,
};

/// The sleep type ember assigns to S5 in `\_S5` (any 3-bit value would do;
/// the guest writes it back into SLP_TYPx, ACPI 4.8.3.7).
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN in the sleep control register (ACPI 4.8.3.7, table 4.21).
pub const SLP_EN: u8 = 1 << 5;
/// SLP_TYPx occupies bits 2..=4 of the sleep control register.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYPx mask, before the shift.
pub const SLP_TYP_MASK: u8 = 0x7;

/// OEM ID in every header.
const OEM_ID: &[u8; 6] = b"EMBER ";
/// OEM table ID in every header.
const OEM_TABLE_ID: &[u8; 8] = b"EMBERVM ";
/// Creator ID in every header.
const CREATOR_ID: &[u8; 4] = b"EMBR";

/// FADT flag HW_REDUCED_ACPI (ACPI 6.4, table 5.10, bit 20).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT flag PWR_BUTTON: no fixed-feature power button (bit 4).
const FADT_PWR_BUTTON: u32 = 1 << 4;
/// FADT flag SLP_BUTTON: no fixed-feature sleep button (bit 5).
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// IA-PC boot architecture flags (table 5.11): VGA Not Present (bit 2), MSI
/// Not Supported (bit 3). The 8042 bit stays clear: Linux then does not probe
/// a PS/2 controller; its reset line (reboot=k) needs no driver.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3);
/// FADT length for revision 6 (table 5.9).
const FADT_LEN: usize = 276;
/// MADT flag PCAT_COMPAT: a dual 8259 is present (KVM's in-kernel PIC; table 5.20).
const MADT_PCAT_COMPAT: u32 = 1;
/// Generic Address Structure space ID: system I/O (table 5.25).
const GAS_SYSTEM_IO: u8 = 1;
/// GAS access size: byte (table 5.25).
const GAS_ACCESS_BYTE: u8 = 1;

/// Errors writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables do not fit their reserved area.
    #[error("the ACPI tables need {0} bytes, more than the {ACPI_SIZE} reserved for them")]
    TooBig(usize),
    /// Guest memory too small to hold them.
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// One virtio-mmio slot as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// The IOAPIC pin (GSI) of its interrupt.
    pub gsi: u32,
}

/// Sum of `bytes` made zero by the returned byte (5.2.5.3, 5.2.6).
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// A System Description Table with its 36-byte header (5.2.6); `body` follows it.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure (5.2.3.2) for one byte-wide I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = 8; // register bit width
    g[2] = 0; // bit offset
    g[3] = GAS_ACCESS_BYTE;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The FADT (5.2.9), hardware-reduced, pointing at the DSDT at `dsdt`.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - 36];
    // Offsets below are the table's (table 5.9) minus the 36-byte header.
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    b[at(109)..at(111)].copy_from_slice(&IAPC_BOOT_ARCH.to_le_bytes());
    let flags = FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON;
    b[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    b[at(131)] = 4; // FADT minor version: ACPI 6.4
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    b[at(244)..at(256)].copy_from_slice(&gas_io_byte(ACPI_SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io_byte(ACPI_SLEEP_STATUS_PORT));
    b[at(268)..at(276)].copy_from_slice(b"EMBERKVM"); // hypervisor vendor identity
    sdt(b"FACP", 6, &b)
}

/// The MADT (5.2.12) for `cpus` vCPUs and the IOAPIC (id `cpus`, as in the MP table).
fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpus {
        // Processor Local APIC (5.2.12.2): type 0, length 8, UID, APIC id, flags (Enabled).
        b.extend_from_slice(&[0, 8, cpu, cpu]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC (5.2.12.3): type 1, length 12, id, reserved, address, GSI base.
    b.extend_from_slice(&[1, 12, cpus, 0]);
    b.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI (5.2.12.7): type 4, length 6, every processor (0xff),
    // flags 0 (bus default), LINT1.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &b)
}

/// The XSDT (5.2.8): 64-bit pointers to the other tables (not the DSDT).
fn xsdt(entries: &[u64]) -> Vec<u8> {
    let b: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &b)
}

/// The RSDP (5.2.5.3), revision 2, pointing at the XSDT.
fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0 and later
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// AML encodings (ACPI 6.4, 20.2).
mod aml {
    const NAME_OP: u8 = 0x08;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    const DWORD_PREFIX: u8 = 0x0c;
    const STRING_PREFIX: u8 = 0x0d;
    const QWORD_PREFIX: u8 = 0x0e;
    const SCOPE_OP: u8 = 0x10;
    const BUFFER_OP: u8 = 0x11;
    const PACKAGE_OP: u8 = 0x12;
    const EXT_OP_PREFIX: u8 = 0x5b;
    const DEVICE_OP: u8 = 0x82;
    const ZERO_OP: u8 = 0x00;
    const ONE_OP: u8 = 0x01;

    /// PkgLength (20.2.4): the length of what follows plus its own bytes.
    pub fn pkg_length(body_len: usize) -> Vec<u8> {
        // One byte holds up to 63; n following bytes add 4 + 8n bits.
        for extra in 0..=3usize {
            let total = body_len + 1 + extra;
            let fits = if extra == 0 { total < 0x40 } else { total < 1 << (4 + 8 * extra) };
            if fits {
                if extra == 0 {
                    return vec![total as u8];
                }
                let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
                for i in 0..extra {
                    v.push((total >> (4 + 8 * i)) as u8);
                }
                return v;
            }
        }
        // AML objects here are a few hundred bytes; 2^28 is the format's limit.
        unreachable!("AML object of {body_len} bytes")
    }

    /// An integer with the smallest encoding (20.2.3 ComputationalData).
    pub fn integer(v: u64) -> Vec<u8> {
        match v {
            0 => vec![ZERO_OP],
            1 => vec![ONE_OP],
            2..=0xff => vec![BYTE_PREFIX, v as u8],
            0x100..=0xffff => [&[WORD_PREFIX][..], &(v as u16).to_le_bytes()].concat(),
            0x1_0000..=0xffff_ffff => [&[DWORD_PREFIX][..], &(v as u32).to_le_bytes()].concat(),
            _ => [&[QWORD_PREFIX][..], &v.to_le_bytes()].concat(),
        }
    }

    /// A string constant (ASCII, NUL-terminated).
    pub fn string(s: &str) -> Vec<u8> {
        [&[STRING_PREFIX][..], s.as_bytes(), &[0]].concat()
    }

    /// `Name(NAME, value)`; `name` is a NameString (a NameSeg, or `\` + NameSeg).
    pub fn name(name: &[u8], value: &[u8]) -> Vec<u8> {
        [&[NAME_OP][..], name, value].concat()
    }

    /// `Package() { elements }`.
    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![elements.len() as u8];
        elements.iter().for_each(|e| body.extend_from_slice(e));
        [&[PACKAGE_OP][..], &pkg_length(body.len()), &body].concat()
    }

    /// `Buffer() { bytes }`.
    pub fn buffer(bytes: &[u8]) -> Vec<u8> {
        let body = [&integer(bytes.len() as u64)[..], bytes].concat();
        [&[BUFFER_OP][..], &pkg_length(body.len()), &body].concat()
    }

    /// `Scope(NAME) { terms }`.
    pub fn scope(name: &[u8], terms: &[u8]) -> Vec<u8> {
        let body = [name, terms].concat();
        [&[SCOPE_OP][..], &pkg_length(body.len()), &body].concat()
    }

    /// `Device(NAME) { terms }`.
    pub fn device(name: &[u8; 4], terms: &[u8]) -> Vec<u8> {
        let body = [&name[..], terms].concat();
        [&[EXT_OP_PREFIX, DEVICE_OP][..], &pkg_length(body.len()), &body].concat()
    }
}

/// Resource descriptors for `_CRS` (ACPI 6.4, 6.4).
mod resource {
    /// 32-Bit Fixed Memory Range Descriptor (6.4.3.4), read/write.
    pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
        let mut d = vec![0x86, 9, 0, 1];
        d.extend_from_slice(&base.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d
    }

    /// I/O Port Descriptor (6.4.2.5): `len` ports fixed at `base`, 16-bit decode.
    pub fn io(base: u16, len: u8) -> Vec<u8> {
        let [lo, hi] = base.to_le_bytes();
        vec![0x47, 1, lo, hi, lo, hi, 1, len]
    }

    /// Extended Interrupt Descriptor (6.4.3.6): one interrupt, consumer,
    /// edge-triggered, active high, exclusive (as the MP table wires the pins).
    pub fn interrupt(gsi: u32) -> Vec<u8> {
        let flags = 0b0000_0011; // bit 0 consumer, bit 1 edge; active high, exclusive
        let mut d = vec![0x89, 6, 0, flags, 1];
        d.extend_from_slice(&gsi.to_le_bytes());
        d
    }

    /// End Tag (6.4.2.9), checksum 0: "treated as if the checksum operation succeeded".
    pub fn end() -> Vec<u8> {
        vec![0x79, 0]
    }
}

/// The DSDT (5.2.11.1): `\_S5`, COM1 and one LNRO0005 device per virtio-mmio slot under `\_SB`.
fn dsdt(virtio: &[MmioSlot]) -> Vec<u8> {
    // COM1, a 16550 (PNP0501, which Linux's 8250_pnp driver matches; it then
    // takes over the legacy ttyS0 at the same port, with this interrupt).
    let mut crs = resource::io(COM1_PORT, 8);
    crs.extend(resource::interrupt(COM1_IRQ));
    crs.extend(resource::end());
    let mut terms = aml::name(b"_HID", &aml::string("PNP0501"));
    terms.extend(aml::name(b"_UID", &aml::integer(0)));
    terms.extend(aml::name(b"_CRS", &aml::buffer(&crs)));
    let mut sb = aml::device(b"COM1", &terms);
    for (i, slot) in virtio.iter().enumerate() {
        let name = format!("VR{:02X}", i & 0xff);
        let mut crs = resource::memory32_fixed(slot.base as u32, slot.size as u32);
        crs.extend(resource::interrupt(slot.gsi));
        crs.extend(resource::end());
        let mut terms = aml::name(b"_HID", &aml::string("LNRO0005"));
        terms.extend(aml::name(b"_UID", &aml::integer(i as u64)));
        terms.extend(aml::name(b"_CRS", &aml::buffer(&crs)));
        let mut n = [0u8; 4];
        n.copy_from_slice(name.as_bytes());
        sb.extend(aml::device(&n, &terms));
    }
    let mut body = aml::scope(b"\\_SB_", &sb);
    // \_S5: Package { SLP_TYPa, SLP_TYPb } (7.4.2); hardware-reduced
    // machines use SLP_TYPa only (4.8.3.7).
    let s5 = aml::package(&[aml::integer(S5_SLEEP_TYPE.into()), aml::integer(0)]);
    body.extend(aml::name(b"\\_S5_", &s5));
    sdt(b"DSDT", 2, &body)
}

/// Every table with the guest address it goes to, laid out from `ACPI_START`
/// (RSDP first, at a 16-byte boundary as 5.2.5.1 asks; the rest 8-byte aligned).
pub fn tables(cpus: u8, virtio: &[MmioSlot]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let align = |a: u64| (a + 7) & !7;
    let rsdp_at = ACPI_START;
    let xsdt_at = align(rsdp_at + 36);
    // The XSDT holds two entries: the FADT and the MADT.
    let fadt_at = align(xsdt_at + 36 + 16);
    let dsdt_at = align(fadt_at + FADT_LEN as u64);
    let dsdt = dsdt(virtio);
    let madt_at = align(dsdt_at + dsdt.len() as u64);
    let madt = madt(cpus);
    let end = madt_at + madt.len() as u64;
    if end - ACPI_START > ACPI_SIZE {
        return Err(AcpiError::TooBig((end - ACPI_START) as usize));
    }
    Ok(vec![
        (rsdp_at, rsdp(xsdt_at)),
        (xsdt_at, xsdt(&[fadt_at, madt_at])),
        (fadt_at, fadt(dsdt_at)),
        (dsdt_at, dsdt),
        (madt_at, madt),
    ])
}

/// Writes the tables for `cpus` vCPUs and the `virtio` slots into guest memory.
pub fn setup_acpi(mem: &GuestMemoryMmap, cpus: u8, virtio: &[MmioSlot]) -> Result<(), AcpiError> {
    for (addr, bytes) in tables(cpus, virtio)? {
        mem.write_slice(&bytes, GuestAddress(addr)).map_err(AcpiError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<MmioSlot> {
        (0..n).map(|i| MmioSlot { base: 0xd000_0000 + 0x1000 * i as u64, size: 0x1000, gsi: 5 + i as u32 }).collect()
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_sums_to_zero_and_states_its_length() {
        for cpus in [1u8, 2, 8] {
            let t = tables(cpus, &slots(3)).unwrap();
            let (rsdp_at, rsdp) = &t[0];
            assert_eq!(*rsdp_at % 16, 0);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(rsdp.len(), 36);
            assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
            assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
            assert_eq!(u32_at(rsdp, 20), 36);
            for (addr, table) in &t[1..] {
                assert_eq!(u32_at(table, 4) as usize, table.len(), "{:?}", &table[..4]);
                assert_eq!(sum(table), 0, "{:?} checksum", std::str::from_utf8(&table[..4]));
                assert_eq!(addr % 8, 0);
            }
            // Nothing overlaps, and everything fits the reserved area.
            for w in t.windows(2) {
                assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
            }
            let (last, bytes) = t.last().unwrap();
            assert!(last + bytes.len() as u64 <= ACPI_START + ACPI_SIZE);
        }
    }

    #[test]
    fn pointers_lead_from_the_rsdp_to_every_table() {
        let t = tables(2, &slots(1)).unwrap();
        let at = |sig: &[u8]| t.iter().find(|(_, b)| &b[..4] == sig).map(|(a, _)| *a).unwrap();
        let xsdt = &t[1].1;
        assert_eq!(u64_at(&t[0].1, 24), at(b"XSDT"));
        assert_eq!(xsdt.len(), 36 + 16);
        assert_eq!([u64_at(xsdt, 36), u64_at(xsdt, 44)], [at(b"FACP"), at(b"APIC")]);
        let fadt = &t.iter().find(|(_, b)| &b[..4] == b"FACP").unwrap().1;
        assert_eq!(fadt.len(), 276);
        assert_eq!(u32_at(fadt, 40) as u64, at(b"DSDT"));
        assert_eq!(u64_at(fadt, 140), at(b"DSDT"));
        assert_ne!(u32_at(fadt, 112) & FADT_HW_REDUCED_ACPI, 0);
        // Sleep control and status: byte-wide system I/O registers at ember's ports.
        assert_eq!(&fadt[244..248], &[GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE]);
        assert_eq!(u64_at(fadt, 248), u64::from(ACPI_SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(fadt, 260), u64::from(ACPI_SLEEP_STATUS_PORT));
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = tables(3, &[]).unwrap();
        let madt = &t.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap().1;
        assert_eq!(u32_at(madt, 36) as u64, APIC_START);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapic = None;
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            match ty {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapic = Some((madt[off + 2], u32_at(madt, off + 4))),
                _ => {}
            }
            assert!(len > 0);
            off += len;
        }
        assert_eq!(off, madt.len(), "entries end where the table ends");
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapic, Some((3, IOAPIC_START as u32)));
    }

    #[test]
    fn dsdt_names_s5_and_each_virtio_device() {
        let t = tables(1, &slots(2)).unwrap();
        let dsdt = &t.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap().1;
        let find = |needle: &[u8]| dsdt.windows(needle.len()).position(|w| w == needle);
        // Name(\_S5_, Package(2) { 5, Zero })
        assert!(find(&[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 5, 2, 0x0a, 5, 0]).is_some());
        assert_eq!(dsdt.windows(9).filter(|w| w == b"LNRO0005\0").count(), 2);
        assert!(find(b"VR00").is_some() && find(b"VR01").is_some());
        // Slot 1's window and interrupt, as _CRS descriptors.
        let mut mem = vec![0x86, 9, 0, 1];
        mem.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        mem.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(find(&mem).is_some());
        assert!(find(&[0x89, 6, 0, 3, 1, 6, 0, 0, 0]).is_some());
        // COM1: its ports and IRQ 4.
        assert!(find(b"PNP0501\0").is_some() && find(b"COM1").is_some());
        assert!(find(&[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, 0x89, 6, 0, 3, 1, 4, 0, 0, 0]).is_some());
    }

    #[test]
    fn pkg_length_encodings() {
        // 20.2.4: one byte up to 63 in all; then the low nibble and more bytes.
        assert_eq!(aml::pkg_length(0), vec![1]);
        assert_eq!(aml::pkg_length(62), vec![63]);
        assert_eq!(aml::pkg_length(63), vec![0x41, 0x04]); // 65 = 0x41
        assert_eq!(aml::pkg_length(0x1000), vec![0x83, 0x00, 0x01]); // 0x1003 in three bytes
        assert_eq!(aml::integer(0x1234), vec![0x0b, 0x34, 0x12]);
    }

    #[test]
    fn many_devices_still_fit() {
        let t = tables(8, &slots(crate::config::MAX_VIRTIO_DEVICES)).unwrap();
        let dsdt = &t.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap().1;
        assert_eq!(sum(dsdt), 0);
    }
}
