//! `ember demo CHAPTER`: built-in guests, one layer at a time.
//!
//! Each chapter is a small guest (src/demo/*.S, assembled by build.rs) booted
//! through the public API (`Vmm::new(config, extras)?.run()`) with exit statistics and
//! a register snapshot turned on. Around the guest's own output (on stdout)
//! ember says on stderr what it set up, what it saw (VM exits by kind and
//! device, per vCPU; CR0/CR4/EFER/CS when the vCPU stopped) and which layer
//! did what. `ember demo --list` prints the table below.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::{KernelSource, RngMode, VmConfig};
use crate::control::StopReason;
use crate::demo::hypercall::{HYPERCALL_PORT, Hypercall};
use crate::extras::{ExtraPioDevice, Extras};
use crate::layout;
use crate::stats::ExitKind;
use crate::timeline::Timeline;
use crate::vmm::{RunOutcome, Vmm, VmmError};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;

/// Guest images of the chapters.
static MODES_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/modes.elf"));
static HYPERCALL_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hypercall.elf"));
static SMP_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp2.elf"));
static VIRTIO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/virtio.elf"));

/// One chapter of `ember demo`.
#[derive(Debug)]
pub struct Chapter {
    /// Its number, 1-based.
    pub number: u8,
    /// Its name on the command line.
    pub name: &'static str,
    /// A one-line title.
    pub title: &'static str,
    /// The guest image.
    pub image: &'static [u8],
    /// The guest's command line.
    pub cmdline: &'static str,
    /// vCPUs.
    pub cpus: u8,
    /// Whether the hypercall device is on the bus.
    pub hypercall: bool,
    /// Whether the VM gets a virtio-rng device (the first virtio-mmio slot,
    /// 0xd0000000; it brings the in-kernel irqchip with it).
    pub rng: bool,
    /// What the guest does, said before it runs.
    pub about: &'static str,
    /// Which layer did what, said after.
    pub layers: &'static str,
}

/// The chapters, in order.
pub static CHAPTERS: &[Chapter] = &[
    Chapter {
        number: 1,
        name: "real-mode",
        title: "real mode writes to the serial port",
        image: MODES_GUEST,
        cmdline: "real",
        cpus: 1,
        hypercall: false,
        rng: false,
        about: "ember enters the guest in 32-bit protected mode (PVH); the guest copies 16-bit code below 1 MiB, \
                clears CR0.PE and prints from real mode with OUT to the UART at 0x3f8",
        layers: "CPU/KVM ran the guest's instructions (under kvm_pvm through KVM's emulator); every IN/OUT was a VM \
                 exit that KVM returned from KVM_RUN to ember, whose 16550 emulation (devices/serial.rs) printed the byte",
    },
    Chapter {
        number: 2,
        name: "protected-mode",
        title: "switching to protected mode",
        image: MODES_GUEST,
        cmdline: "protected",
        cpus: 1,
        hypercall: false,
        rng: false,
        about: "from real mode the guest loads a GDT, sets CR0.PE and far-jumps into a 32-bit code segment, \
                as a boot loader does",
        layers: "the mode switches (LGDT, MOV CR0, far JMP) stayed inside KVM: no exit reached ember; only the UART and \
                 the exit port did",
    },
    Chapter {
        number: 3,
        name: "long-mode",
        title: "paging and long mode",
        image: MODES_GUEST,
        cmdline: "long",
        cpus: 1,
        hypercall: false,
        rng: false,
        about: "after protected mode the guest enables PAE, points CR3 at page tables in its image, sets EFER.LME \
                (WRMSR) and CR0.PG, and jumps to 64-bit code",
        layers: "KVM emulated WRMSR EFER and the control-register writes and maps guest-physical pages with its own \
                 page tables (EPT/NPT, or shadow paging under kvm_pvm); ember only saw the port I/O",
    },
    Chapter {
        number: 4,
        name: "hypercall",
        title: "a port-I/O hypercall to the VMM",
        image: HYPERCALL_GUEST,
        cmdline: "",
        cpus: 1,
        hypercall: true,
        rng: false,
        about: "ember adds a demo device at port 0x510 (demo/hypercall.rs); the guest writes a request there and \
                reads the answer back one byte per IN",
        layers: "each OUT/IN on 0x510 left the guest, crossed KVM and ran Rust code in ember (Hypercall::write/read) \
                 before the guest's next instruction: a hypercall is a VM exit the guest makes on purpose",
    },
    Chapter {
        number: 5,
        name: "smp",
        title: "two vCPUs",
        image: SMP_GUEST,
        cmdline: "",
        cpus: 2,
        hypercall: false,
        rng: false,
        about: "two vCPUs, two ember threads; vCPU 0 starts vCPU 1 with INIT and SIPI through KVM's in-kernel local APIC",
        layers: "KVM's in-kernel LAPIC carried the IPIs and parked the halted vCPU (those MMIO writes and the HLT never \
                 reached ember); each vCPU thread of ember saw only its own port I/O",
    },
    Chapter {
        number: 6,
        name: "virtio",
        title: "a virtio request",
        image: VIRTIO_GUEST,
        cmdline: "",
        cpus: 1,
        hypercall: false,
        rng: true,
        about: "ember puts a virtio-rng device on virtio-mmio at 0xd0000000; the guest is its driver: it checks \
                the registers, negotiates VERSION_1, sets up queue 0 with rings in its own RAM, posts one 16-byte \
                buffer, writes QUEUE_NOTIFY and polls the used ring (interrupts off)",
        layers: "each virtio-mmio register access was an MMIO exit that KVM returned to ember (the mmio-read/mmio-write \
                 counts above, devices/virtio/mmio.rs); the QUEUE_NOTIFY write is not among them: it hit an ioeventfd \
                 ember registered with KVM, so KVM signalled the eventfd and resumed the guest without leaving \
                 KVM_RUN, and ember's event loop (event_loop.rs, Token::Queue) woke and ran MmioTransport::notify -> \
                 Rng::process_queue: getrandom(2) straight into the guest's buffer, then the used ring entry; its \
                 irqfd signal reached KVM's IOAPIC, whose pin stays masked (no guest set it up) with IF=0 anyway: \
                 this guest polls",
    },
];

/// The chapter called `name` (its number or name).
pub fn find(name: &str) -> Option<&'static Chapter> {
    CHAPTERS.iter().find(|c| c.name == name || name.parse::<u8>().is_ok_and(|n| n == c.number))
}

/// `ember demo --list`.
pub fn list() -> String {
    let mut out = String::from("ember demo chapters (ember demo NUMBER or NAME; no chapter: the hello guest):\n");
    for c in CHAPTERS {
        out += &format!("  {}  {:<15} {}\n", c.number, c.name, c.title);
    }
    out
}

/// The VM a chapter boots, and what the demo adds to it: exit statistics, the registers at stop,
/// and the hypercall chapter's port.
pub fn chapter_config(ch: &Chapter) -> (VmConfig, Extras) {
    let mut cfg = VmConfig::new(KernelSource::Builtin(ch.image));
    cfg.mem_size_bytes = 16 << 20;
    cfg.cmdline = ch.cmdline.into();
    cfg.cpus = ch.cpus;
    // Without it the rng stays off: this is a freestanding guest, not Linux.
    cfg.rng = if ch.rng { RngMode::On } else { RngMode::Off };
    let mut extras = Extras::default();
    extras.observe.stats = true;
    extras.observe.snapshot_registers = true;
    if ch.hypercall {
        extras.pio.push(ExtraPioDevice {
            port: HYPERCALL_PORT,
            len: 1,
            name: "hypercall (demo)",
            device: Arc::new(Mutex::new(Hypercall::new())),
        });
    }
    (cfg, extras)
}

/// One line per vCPU: `[ember] vCPU 0 exits: io-out 95 (serial (COM1) 94, exit device 1); io-in 94 (...)`.
pub fn exit_lines(outcome: &RunOutcome) -> Vec<String> {
    let mut lines = Vec::new();
    for (id, stats) in outcome.stats.iter().enumerate() {
        let Some(stats) = stats else { continue };
        let by_dev = stats.by_device();
        let parts: Vec<String> = stats
            .by_kind()
            .iter()
            .map(|(kind, t)| {
                let devs: Vec<String> = by_dev
                    .iter()
                    .filter(|(k, d, _)| k == kind && *d != "-")
                    .map(|(_, d, t)| format!("{d} {}", t.count))
                    .collect();
                if devs.is_empty() {
                    format!("{} {}", kind.name(), t.count)
                } else {
                    format!("{} {} ({})", kind.name(), t.count, devs.join(", "))
                }
            })
            .collect();
        let total: u64 = stats.by_kind().iter().map(|(_, t)| t.count).sum();
        lines.push(format!("[ember] vCPU {id} exits: {total} in all: {}", parts.join("; ")));
    }
    lines
}

/// Boots chapter `ch`, the guest's output on stdout, ember's narration on stderr.
pub fn run_chapter(ch: &Chapter, start: Instant, quiet: bool) -> Result<RunOutcome, VmmError> {
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let timeline = Arc::new(Timeline::new(start));
    let (cfg, extras) = chapter_config(ch);
    let cfg = cfg.validate()?;
    say(format!("[ember] chapter {}: {}", ch.number, ch.title));
    say(format!("[ember] the guest: {}", ch.about));
    let vmm = Vmm::new(&cfg, &extras, timeline)?;
    say(format!(
        "[ember] set up: {} vCPU(s), {} MiB, PVH entry {:#x} in 32-bit protected mode{}",
        cfg.cpus,
        cfg.mem_size_bytes >> 20,
        vmm.boot.entry.0,
        if vmm.irqchip { ", KVM's in-kernel PIC/IOAPIC/LAPIC" } else { ", no interrupt controller" }
    ));
    if ch.rng {
        say(format!(
            "[ember] virtio-rng on virtio-mmio at {:#x} (IOAPIC pin {}): its QUEUE_NOTIFY register ({:#x}) is an \
             ioeventfd and its interrupt an irqfd, both registered with KVM before the first KVM_RUN",
            layout::VIRTIO_MMIO_START,
            layout::VIRTIO_IRQ_START,
            layout::VIRTIO_MMIO_START + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY)
        ));
    }
    say("----------------------------------------------------------------------".into());
    let outcome = vmm.run()?;
    say("----------------------------------------------------------------------".into());
    for line in exit_lines(&outcome) {
        say(line);
    }
    for (id, r) in outcome.registers.iter().enumerate() {
        if let Some(r) = r {
            say(format!(
                "[ember] vCPU {id} stopped in {}: CR0={:#x} CR4={:#x} EFER={:#x} CS={:#x} (base {:#x}) RIP={:#x}",
                r.mode(),
                r.cr0,
                r.cr4,
                r.efer,
                r.cs_selector,
                r.cs_base,
                r.rip
            ));
        }
    }
    let reason = match &outcome.reason {
        StopReason::GuestExit(s) => format!("the guest wrote {s} to the exit port"),
        other => format!("{other:?}"),
    };
    say(format!("[ember] stopped: {reason}"));
    say(format!("[ember] layers: {}", ch.layers));
    Ok(outcome)
}

/// Exits of `kind` on vCPU `vcpu` in `outcome` (0 without statistics).
pub fn count(outcome: &RunOutcome, vcpu: usize, kind: ExitKind) -> u64 {
    outcome.stats.get(vcpu).and_then(|s| s.as_ref()).map_or(0, |s| s.count(kind, None))
}
