//! `ember demo`: a guest built into the binary that proves the whole stack
//! works here, and says what each layer did.
//!
//! The guest (`hello.S`, assembled by build.rs) enters through PVH in 32-bit
//! mode, switches itself to long mode, prints through the UART and reports
//! status 0 on the exit port. The same ELF boots under `qemu-system-x86_64 -M
//! microvm`, which is how benches/ compares the two VMMs on one guest.
//!
//! `ember demo CHAPTER` boots the guests of [`chapters`] instead: real mode,
//! protected mode, long mode, a hypercall, two vCPUs, a virtio request.

pub mod chapters;
pub mod hypercall;

use std::sync::Arc;
use std::time::Instant;

use crate::config::{KernelSource, VmConfig};
use crate::control::StopReason;
use crate::extras::Extras;
use crate::timeline::Timeline;
use crate::vmm::{RunOutcome, Vmm, VmmError};

/// The demo guest image.
pub static HELLO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));

/// The `echo` guest: prints its command line and exits 0 (`ember bench`'s tiny payload).
pub static ECHO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo.elf"));

/// The VM `ember demo` boots.
pub fn demo_config() -> VmConfig {
    let mut cfg = VmConfig::new(KernelSource::Builtin(HELLO_GUEST));
    cfg.mem_size_bytes = 16 << 20;
    cfg.cmdline = "ember demo: no files, one vCPU, 16 MiB".into();
    cfg
}

/// Boots the demo guest with its output on stdout and narrates around it.
pub fn run_demo(start: Instant, quiet: bool) -> Result<RunOutcome, VmmError> {
    let timeline = Arc::new(Timeline::new(start));
    let cfg = demo_config().validate()?;
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let vmm = Vmm::new(&cfg, &Extras::default(), timeline.clone())?;
    say(format!(
        "[ember] KVM: opened /dev/kvm, created a VM{}, mapped {} MiB of guest RAM (lazily: untouched pages cost nothing)",
        if vmm.irqchip {
            " with in-kernel PIC/IOAPIC/PIT"
        } else {
            " (no irqchip: this guest polls, it needs no interrupts)"
        },
        cfg.mem_size_bytes >> 20
    ));
    say(format!(
        "[ember] loader: built-in ELF guest ({} bytes) at {:#x}, PVH entry {:#x} in 32-bit protected mode, start info at {:#x}",
        HELLO_GUEST.len(),
        vmm.boot.kernel_range.0,
        vmm.boot.entry.0,
        vmm.boot.boot_info.0
    ));
    say("[ember] vCPU 0: thread started, entering KVM_RUN; the guest's output follows".into());
    say("----------------------------------------------------------------------".into());
    let outcome = vmm.run()?;
    say("----------------------------------------------------------------------".into());
    let exits = &outcome.exits[0];
    say(format!(
        "[ember] VM exits: {} in all: {} OUT and {} IN (each one a trip guest -> KVM -> ember -> guest), {} other",
        exits.total(),
        exits.io_out,
        exits.io_in,
        exits.total() - exits.io_out - exits.io_in
    ));
    let reason = match &outcome.reason {
        StopReason::GuestExit(s) => format!("the guest wrote {s} to the exit port"),
        other => format!("{other:?}"),
    };
    let first = timeline.at("guest: first serial byte").map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN);
    say(format!(
        "[ember] stopped: {reason}; first guest byte at {first:.2} ms, done at {:.2} ms after ember started",
        start.elapsed().as_secs_f64() * 1e3
    ));
    Ok(outcome)
}
