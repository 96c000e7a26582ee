//! The x86 CPU state a guest expects at its first instruction.
//!
//! Linux's boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot
//! protocol") and the PVH protocol (xen docs/misc/pvh.pandoc) say what the
//! registers must hold; KVM starts a vCPU in real mode at the reset vector, so
//! ember builds the rest by hand: CPUID, MSRs, GDT, page tables, control
//! registers, FPU, the LAPIC's LINT pins, and the MP table that tells the guest
//! how many CPUs there are.

pub mod acpi;
pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod regs;
