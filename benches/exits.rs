//! What `--stats` costs: exits per second of a guest that does N one-byte
//! OUTs to an unclaimed port (tests/guests/ports.S), with and without
//! `--stats`, reported as a ratio. VM setup is taken out by subtracting a run
//! with N = 0; each figure is the median of several runs.
//!
//! `cargo bench --bench exits` (set EMBER_BENCH_EXITS=N to change N).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

const RUNS: usize = 5;

fn time_run(count: u64, stats: bool) -> Duration {
    let cmdline = format!("count={count}");
    let mut args = vec!["--cmdline", cmdline.as_str(), "--serial", "none"];
    if stats {
        args.push("--stats");
    }
    let kernel = common::guest("ports");
    let start = Instant::now();
    let out = std::process::Command::new(common::ember_bin())
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(&args)
        .output()
        .expect("run ember");
    let took = start.elapsed();
    assert!(out.status.success(), "ember failed: {}", String::from_utf8_lossy(&out.stderr));
    took
}

fn median(count: u64, stats: bool) -> Duration {
    let mut v: Vec<Duration> = (0..RUNS).map(|_| time_run(count, stats)).collect();
    v.sort();
    v[RUNS / 2]
}

fn main() {
    if !common::kvm_available() {
        return;
    }
    let n: u64 = std::env::var("EMBER_BENCH_EXITS").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let mut rates = Vec::new();
    for stats in [false, true] {
        let base = median(0, stats);
        let full = median(n, stats);
        let per_sec = n as f64 / full.saturating_sub(base).as_secs_f64();
        println!(
            "{:<16} {n} exits: {:>8.1} ms (setup {:>6.1} ms): {:>10.0} exits/s",
            if stats { "with --stats" } else { "without --stats" },
            full.as_secs_f64() * 1e3,
            base.as_secs_f64() * 1e3,
            per_sec
        );
        rates.push(per_sec);
    }
    println!("exits/s with --stats / without: {:.3}", rates[1] / rates[0]);
}
