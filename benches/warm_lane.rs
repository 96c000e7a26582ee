//! `ember run -- true` end to end, as a user types it, on a host whose KVM cannot run Linux: with the
//! warm machine (`lane::warm`, booted once and reused) against a machine of its own per run
//! (`EMBER_LANE_WARM=0`, what every run cost before), interleaved, pairwise ratio. On a host that runs
//! Linux directly there is no lane and nothing to compare: it says so.
//!
//! `cargo bench --bench warm_lane -- [PAIRS]` (default 3). Uses its own state dir, so a warm machine
//! of yours is neither used nor stopped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use ember::lane::flavour::KvmFlavour;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn main() {
    let pairs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(3);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent — nothing to measure");
        return;
    }
    let flavour = KvmFlavour::detect();
    if !flavour.needs_nested_lane() {
        println!("host KVM: {flavour}: Linux guests run directly, there is no lane to keep warm");
        return;
    }
    let exe = env!("CARGO_BIN_EXE_ember");
    let xdg = std::env::temp_dir().join(format!("ember-bench-warm-{}", std::process::id()));
    std::fs::create_dir_all(&xdg).expect("state dir");
    let ember = |warm: bool, args: &[&str]| {
        let mut c = Command::new(exe);
        c.args(args).env("XDG_RUNTIME_DIR", &xdg).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if !warm {
            c.env("EMBER_LANE_WARM", "0");
        }
        c
    };
    let t = Instant::now();
    let ok = ember(true, &["lane", "start"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "ember lane start failed");
    let first_boot = t.elapsed().as_secs_f64();
    let timed = |warm: bool| {
        let t = Instant::now();
        let s = ember(warm, &["run", "--", "true"]).status().expect("ember run");
        assert!(s.success(), "ember run -- true failed ({s})");
        t.elapsed().as_secs_f64()
    };
    let (mut cold, mut warm, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        let c = timed(false);
        let w = timed(true);
        println!("pair {}/{pairs}: cold {c:.2} s, warm {w:.2} s", i + 1);
        cold.push(c);
        warm.push(w);
        ratio.push(w / c);
    }
    let _ = ember(true, &["lane", "stop"]).status();
    let _ = std::fs::remove_dir_all(&xdg);
    println!("\n## `ember run -- true` end to end, nested lane (host KVM: {flavour}; QEMU TCG outer machine)\n");
    println!("| | median |");
    println!("|---|---|");
    println!("| `ember lane start` (the outer boot, once) | {first_boot:.2} s |");
    println!("| cold: a machine of its own (EMBER_LANE_WARM=0) | {:.2} s |", median(cold));
    println!("| warm: the running machine | {:.2} s |", median(warm));
    println!("| warm / cold, pairwise | {:.2}x |", median(ratio));
}
