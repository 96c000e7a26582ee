//! What ACPI costs the default guest's boot: the same kernel booted with
//! ember's ACPI tables and with `--acpi=off` (the MP table and
//! `virtio_mmio.device=` then describe the machine),
//! in interleaved rounds, so a slow moment of the host hits both alike.
//! `EMBER_BASELINE_VMLINUX=PATH` (with `EMBER_BASELINE_INITRD`) adds another
//! kernel to every round, e.g. the default guest before a config change.
//!
//! Runs in the Linux lane (`ember::lane`), like `linux_boot`; times are
//! ember's own `--timeline=json` (launch to the init's ready marker, and to
//! ember's exit), so the lane's transport is not counted.
//!
//! `cargo bench --bench acpi_boot -- [ROUNDS]` (default 7).

use std::ffi::OsString;
use std::path::Path;

use ember::guest::default_guest;
use ember::lane::{Invocation, LinuxLane};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// The time of `event` in a `--timeline=json` line.
fn event_ms(text: &str, event: &str) -> Option<f64> {
    let line = text.lines().rev().find(|l| l.trim_start().starts_with("[{"))?;
    let item = line.split(&format!("\"event\":\"{event}\"")).nth(1)?;
    item.split("\"ms\":").nth(1)?.split(['}', ',']).next()?.parse().ok()
}

struct Variant {
    name: String,
    kernel: OsString,
    initrd: OsString,
    cmdline: String,
    /// `--acpi=on` or `--acpi=off`.
    acpi: &'static str,
    ready: Vec<f64>,
    exit: Vec<f64>,
}

fn main() {
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(7);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent — nothing to measure");
        return;
    }
    let g = default_guest(false).unwrap_or_else(|e| panic!("default guest: {e}"));
    let variant = |name: &str, kernel: OsString, initrd: OsString, acpi: &'static str| Variant {
        name: name.into(),
        kernel,
        initrd,
        cmdline: ember::guest::debug_cmdline(),
        acpi,
        ready: vec![],
        exit: vec![],
    };
    let (k, i): (OsString, OsString) = (g.vmlinux.clone().into(), g.initramfs.clone().into());
    let mut variants = vec![
        variant("ACPI tables", k.clone(), i.clone(), "--acpi=on"),
        variant("--acpi=off (MP table)", k, i, "--acpi=off"),
    ];
    let baseline = (std::env::var_os("EMBER_BASELINE_VMLINUX"), std::env::var_os("EMBER_BASELINE_INITRD"));
    if let (Some(k), Some(i)) = baseline {
        variants.push(variant("baseline kernel (--acpi=off)", k, i, "--acpi=off"));
    }
    let mut lane = LinuxLane::start(Path::new(env!("CARGO_BIN_EXE_ember"))).unwrap_or_else(|e| panic!("lane: {e}"));
    println!("\n## ACPI's cost at boot ({rounds} interleaved rounds) — lane: {}\n", lane.describe());
    let n = variants.len();
    for round in 0..rounds {
        for k in 0..n {
            // Rotate the order each round: no variant always goes first.
            let v = &mut variants[(round + k) % n];
            let inv = Invocation::new([
                OsString::from("run"),
                "--kernel".into(),
                v.kernel.clone(),
                "--initrd".into(),
                v.initrd.clone(),
                "--cmdline".into(),
                v.cmdline.clone().into(),
                v.acpi.into(),
                "--output=console".into(),
                "--timeline=json".into(),
                "--".into(),
                "true".into(),
            ]);
            let out = lane.run(&inv).unwrap_or_else(|e| panic!("ember run: {e}"));
            assert_eq!(out.status, 0, "{}: {}", v.name, out.stderr_lossy());
            let err = out.stderr_lossy();
            v.ready.push(event_ms(&err, "guest: init ready").unwrap_or(f64::NAN));
            v.exit.push(event_ms(&err, "ember: exit").unwrap_or(f64::NAN));
        }
    }
    println!("| variant | init ready ms (median) | exit ms (median) | ready / ACPI tables (median of rounds) |");
    println!("|---|---|---|---|");
    for v in &variants {
        let ratios: Vec<f64> = v.ready.iter().zip(&variants[0].ready).map(|(a, b)| a / b).collect();
        println!(
            "| {} | {:.1} | {:.1} | {:.3} |",
            v.name,
            median(v.ready.clone()),
            median(v.exit.clone()),
            median(ratios)
        );
    }
    println!("\nraw init-ready ms per round:");
    for v in &variants {
        println!("  {}: {:?}", v.name, v.ready.iter().map(|x| x.round()).collect::<Vec<_>>());
    }
}
