//! Guest physical memory map, I/O ports and IRQ lines: every address the guest
//! and the VMM agree on lives here, so that no magic number hides in a device or
//! in the boot code.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left zero)
//! 0x0000_0500  GDT (5 entries, to 0x527), then an empty IDT at 0x530
//! 0x0000_6000  PVH hvm_start_info + its memory map (PVH boot only)
//! 0x0000_7000  boot_params, the "zero page" (Linux boot protocol, x86/boot.rst)
//! 0x0000_8ff0  initial stack top for the boot vCPU (64-bit entry)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xefff four page directories:
//!              identity map of the first 4 GiB with 2 MiB pages
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00  MP floating pointer + MP configuration table (in the EBDA)
//! 0x000a_0000  ..0x000f_ffff legacy VGA/BIOS hole: not RAM in the e820 map
//! 0x000e_0000  ACPI tables: RSDP, XSDT, FADT, DSDT, MADT (x86/acpi.rs)
//! 0x0010_0000  kernel (vmlinux segments at their physical addresses, bzImage
//!              protected-mode code here); initrd near the top of low RAM
//! 0xc000_0000  ..0xffff_ffff 32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above the gap when the guest has more than 3 GiB
//! ```

/// Start of the GDT the VMM builds for 64-bit and PVH entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT, after the GDT's five entries; Linux installs its own very early.
pub const BOOT_IDT_START: u64 = 0x530;
/// PVH `hvm_start_info` structure (xen/arch-x86/hvm/start_info.h).
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map follows the start info (`hvm_memmap_table_entry[]`).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// `struct boot_params`, the zero page (Documentation/arch/x86/boot.rst).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table (PML4) of the identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages) covering 0..4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line Linux x86 accepts (COMMAND_LINE_SIZE), NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer structure and table (Intel MultiProcessor Spec 1.4, 4.1).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of usable low memory; 0xa0000..0x100000 is the legacy hole.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, RSDP first: Linux scans 0xe0000..0xfffff for it (ACPI 6.4, 5.2.5.1).
pub const ACPI_START: u64 = 0xe_0000;
/// Bytes reserved for the ACPI tables from `ACPI_START`.
pub const ACPI_SIZE: u64 = 0x1_0000;
/// Start of "high" memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: RAM beyond this goes above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device gets `VIRTIO_MMIO_SIZE` bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window (virtio 1.2, 4.2.2: registers up to 0x100 + config).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC base address (fixed by the MP table and Linux's defaults).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address (Intel SDM vol. 3, 11.4.1).
pub const APIC_START: u64 = 0xfee0_0000;

/// COM1 base port (16550 UART, 8 registers).
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line on the (in-kernel) PIC/IOAPIC.
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller data port. The device spans 0x60..=0x64, so it
/// also answers the command/status port 0x64, where command 0xfe pulses the
/// CPU reset line.
pub const I8042_DATA_PORT: u16 = 0x60;
/// ember's exit device: a write of 1, 2 or 4 bytes ends the VM; the low byte
/// of the value becomes ember's exit code. See README, "The exit device".
pub const EXIT_PORT: u16 = 0x501;
/// Ports the exit device claims from `EXIT_PORT`: a 2- or 4-byte `OUT` to
/// 0x501 also covers 0x502..=0x504 (the bus refuses an access that runs past a
/// device), so all three widths reach it. Only 0x501 itself acts.
pub const EXIT_PORT_LEN: u16 = 4;

/// ACPI sleep control register (FADT SLEEP_CONTROL_REG, ACPI 6.4 4.8.3.7):
/// writing SLP_EN with the `\_S5` sleep type powers the VM off (devices/acpi_sleep.rs).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (FADT SLEEP_STATUS_REG), the port after the control register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// Ports the sleep registers take from `ACPI_SLEEP_CONTROL_PORT`.
pub const ACPI_SLEEP_PORT_LEN: u16 = 2;

/// PCI configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2): the
/// CONFIG_ADDRESS register at 0xcf8 and CONFIG_DATA at 0xcfc (devices/pci_host.rs).
pub const PCI_CONF1_PORT: u16 = 0xcf8;
/// Ports the two registers take from `PCI_CONF1_PORT`.
pub const PCI_CONF1_PORT_LEN: u16 = 8;

/// Number of IRQ lines the IOAPIC exposes (and the MP table lists).
pub const IOAPIC_PINS: u32 = 24;
/// First IRQ handed to virtio-mmio devices (COM1..COM4 and legacy lines below).
pub const VIRTIO_IRQ_START: u32 = 5;
