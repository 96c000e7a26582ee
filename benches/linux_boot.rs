//! Boot of the default Linux guest: time to its init and to exit, and how many
//! VM exits a boot takes (fewer exits is the lever that matters in every lane).
//!
//! Runs in the Linux lane (`ember::lane`): directly on hardware KVM, inside the
//! nested QEMU SVM machine on hosts like kvm_pvm; the report names the lane.
//! Times come from ember's own `--timeline=json` (so the lane's transport
//! overhead is not counted), exits from `--stats`.
//!
//! `cargo bench --bench linux_boot -- [RUNS]` (default 5).

use std::collections::BTreeMap;
use std::path::Path;

use ember::guest::default_guest;
use ember::lane::{Invocation, LinuxLane};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// `[{"event":"x","ms":1.0},...]` -> (event, ms) pairs.
fn parse_timeline(text: &str) -> Vec<(String, f64)> {
    let Some(line) = text.lines().rev().find(|l| l.trim_start().starts_with("[{")) else { return vec![] };
    line.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split("},{")
        .filter_map(|item| {
            let name = item.split("\"event\":\"").nth(1)?.split('"').next()?;
            let ms = item.split("\"ms\":").nth(1)?.trim_end_matches('}').parse().ok()?;
            Some((name.to_string(), ms))
        })
        .collect()
}

/// Sum of the per-vCPU "(all)" rows of the `--stats` table.
fn total_exits(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == "(all)").then(|| f[3].parse::<u64>().ok()).flatten()
        })
        .sum()
}

fn main() {
    let runs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent — nothing to measure");
        return;
    }
    let g = default_guest(false).unwrap_or_else(|e| panic!("default guest: {e}"));
    let mut lane = LinuxLane::start(Path::new(env!("CARGO_BIN_EXE_ember"))).unwrap_or_else(|e| panic!("lane: {e}"));
    println!("\n## Default guest boot ({runs} runs) — lane: {}\n", lane.describe());

    let kernels = [("vmlinux (PVH)", &g.vmlinux), ("bzImage", &g.bzimage)];
    println!("| kernel | init ready ms | exit ms | first serial byte ms | VM exits per boot |");
    println!("|---|---|---|---|---|");
    for (name, kernel) in kernels {
        let mut events: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut exits = Vec::new();
        for _ in 0..runs {
            let inv = Invocation::new([
                "run".as_ref(),
                "--kernel".as_ref(),
                kernel.as_os_str(),
                "--initrd".as_ref(),
                g.initramfs.as_os_str(),
                "--cmdline".as_ref(),
                ember::guest::debug_cmdline().as_ref(),
                "--timeline=json".as_ref(),
                "--stats".as_ref(),
                "--".as_ref(),
                "true".as_ref(),
            ]);
            let out = lane.run(&inv).unwrap_or_else(|e| panic!("ember run: {e}"));
            assert_eq!(out.status, 0, "{}", out.stderr_lossy());
            let err = out.stderr_lossy();
            for (e, ms) in parse_timeline(&err) {
                events.entry(e).or_default().push(ms);
            }
            exits.push(total_exits(&err) as f64);
        }
        let m = |e: &str| median(events.get(e).cloned().unwrap_or_default());
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.0} |",
            m("guest: init ready"),
            m("ember: exit"),
            m("guest: first serial byte"),
            median(exits)
        );
    }
    println!(
        "\nTimes are ember's own (from its start to the event), medians; in the nested lane they include TCG's emulation of the whole machine."
    );
}
