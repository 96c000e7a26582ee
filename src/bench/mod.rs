//! `ember bench`: one payload on the host, in containers and in VMs, side by side.
//!
//! A tool around ember, not part of it: it drives ember (and QEMU, crun, runc) through their
//! binaries and the public [`crate::guest`] / [`crate::lane`] API, and the core never imports it.
//!
//! Code map:
//! - [`runtimes`]: which runtimes exist, how each one is probed, launched and cleaned up;
//! - [`oci`]: the OCI bundle (busybox rootfs, config.json with matched limits) and cgroups;
//! - [`measure`]: timing one launch (marker line, exit, `wait4` peak RSS) and statistics;
//! - [`tools`]: the Linux tier's fio and iperf3 runs (tools image, test network namespaces);
//! - [`report`]: the Markdown table, results.json / results.csv and the SVG plot;
//! - `results`: the recorded samples, summaries and ratios; `tier`: one tier's rounds, density
//!   batches and workloads (and the Linux tier inside the lane); `teardown`: what runs now, for Ctrl-C.
//!
//! A run: probe the runtimes (a missing one is "skipped: reason"), one warm-up launch each,
//! then `--runs` rounds of one launch per runtime (A B A B ..., so drift on a noisy machine hits
//! all of them), then the density batches (N launches released at once), then (Linux tier)
//! `--runs` rounds of iperf3 and of fio in host, crun, runc and ember. The Linux tier needs a
//! KVM that runs Linux: on a kvm_pvm host ember re-runs itself (`ember bench --inner`) inside the
//! Linux lane's outer machine, where host, crun, runc and the VMs are all measured, so the
//! ratios compare like with like.
//!
//! Ctrl-C: children run in their own process groups; a signal thread kills what is running,
//! deletes containers, cgroups and bundles, and exits 130.

pub mod docker;
pub mod measure;
pub mod oci;
pub mod report;
mod results;
mod runtimes;
mod teardown;
mod tier;
pub mod tools;

pub use results::*;
use teardown::*;
use tier::*;

use std::path::PathBuf;

use runtimes::{Runtime, Tier};

/// `ember bench` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Measured rounds (one launch per runtime each, interleaved), after the warm-up.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub runs: usize,
    /// Warm-up launches per runtime, not counted.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub warmup: usize,
    /// Payload tier: tiny (print a line and exit), linux (the default Linux guest and busybox
    /// workloads), or all.
    #[arg(long, default_value = "tiny", value_name = "TIER")]
    pub tier: String,
    /// Runtimes to compare (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "host,crun,runc,ember,qemu-microvm,docker",
        value_name = "LIST"
    )]
    pub runtimes: Vec<String>,
    /// Density: instance counts started at once (comma-separated; empty: none).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50", value_name = "LIST")]
    pub density: Vec<String>,
    /// vCPUs of the VMs, CPU quota of the containers.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// VM memory and container memory limit (default: 32M tiny, 256M linux).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Write results.json, results.csv and plot.svg into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Only check the prerequisites and say how to install what is missing.
    #[arg(long)]
    pub check: bool,
    /// Internal: running inside the Linux lane; print the tier's results as JSON on stdout.
    #[arg(long, hide = true)]
    pub inner: bool,
    /// Run this container image's command in every runtime instead of a tier's payload:
    /// crun and runc from a bundle of the same root file system, Docker from it imported,
    /// ember as `ember run IMAGE`, QEMU microvm with the same kernel, initrd and disk.
    /// Start-up is the time to the command's first output line.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// With --image: the command (after `--`), replacing the image's Cmd.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Errors that stop a bench run (a runtime that cannot run is a skip, not an error).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// Host I/O failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The default Linux guest could not be built or found.
    #[error("the default Linux guest")]
    Guest(#[source] crate::guest::GuestError),
    /// The Linux lane failed.
    #[error("the Linux lane")]
    Lane(#[source] crate::lane::LaneError),
    /// The image of `--image`.
    #[error("the image")]
    Image(#[source] crate::image::ImageError),
    /// The inner bench in the lane failed.
    #[error("the Linux tier inside the lane failed (status {status}): {stderr}")]
    Inner {
        /// Its exit status.
        status: i32,
        /// The tail of its stderr.
        stderr: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// The validated options.
#[derive(Clone, Debug)]
struct Options {
    runs: usize,
    warmup: usize,
    tiers: Vec<Tier>,
    runtimes: Vec<Runtime>,
    density: Vec<usize>,
    cpus: u32,
    memory: Option<String>,
    image: Option<String>,
    command: Vec<String>,
}

fn parse_options(a: &BenchArgs) -> Result<Options, BenchError> {
    let usage = |s: String| BenchError::Usage(s);
    if a.runs == 0 {
        return Err(usage("--runs must be at least 1".into()));
    }
    if a.image.is_none() && !a.command.is_empty() {
        return Err(usage("a command after `--` needs --image".into()));
    }
    let tiers = match a.tier.as_str() {
        _ if a.image.is_some() => vec![Tier::Image],
        "tiny" => vec![Tier::Tiny],
        "linux" => vec![Tier::Linux],
        "all" => vec![Tier::Tiny, Tier::Linux],
        t => return Err(usage(format!("--tier: unknown tier `{t}` (tiny, linux or all)"))),
    };
    let mut runtimes = Vec::new();
    for r in a.runtimes.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let rt = Runtime::parse(r).ok_or_else(|| {
            let names: Vec<&str> = Runtime::ALL.iter().map(|r| r.name()).collect();
            usage(format!("--runtimes: unknown runtime `{r}` (known: {})", names.join(", ")))
        })?;
        if !runtimes.contains(&rt) {
            runtimes.push(rt);
        }
    }
    if runtimes.is_empty() {
        return Err(usage("--runtimes: name at least one runtime".into()));
    }
    runtimes.sort();
    let mut density = Vec::new();
    for d in a.density.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match d.parse::<usize>() {
            Ok(n) if (1..=500).contains(&n) => density.push(n),
            _ => return Err(usage(format!("--density: `{d}` is not a count from 1 to 500"))),
        }
    }
    if a.cpus == 0 || a.cpus > 64 {
        return Err(usage(format!("--cpus: {} is not from 1 to 64", a.cpus)));
    }
    if let Some(m) = &a.memory {
        crate::config::parse_size(m).map_err(|e| usage(format!("--memory: {e}")))?;
    }
    Ok(Options {
        runs: a.runs,
        warmup: a.warmup,
        tiers,
        runtimes,
        density,
        cpus: a.cpus,
        memory: a.memory.clone(),
        image: a.image.clone(),
        command: a.command.clone(),
    })
}

/// Runs `ember bench`; returns the process exit code.
pub fn main(args: BenchArgs) -> u8 {
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember bench: {}", crate::error_chain(&e));
            if matches!(e, BenchError::Usage(_)) { 2 } else { 1 }
        }
    }
}

fn run(args: &BenchArgs) -> Result<u8, BenchError> {
    let opts = parse_options(args)?;
    if args.check {
        return Ok(check(&opts));
    }
    install_signal_thread();
    let mut results = Vec::new();
    for &tier in &opts.tiers {
        let linux = matches!(tier, Tier::Linux | Tier::Image);
        let r = if linux && !args.inner && crate::lane::KvmFlavour::detect().needs_nested_lane() {
            linux_tier_in_lane(args, &opts, tier)?
        } else {
            run_tier(tier, &opts, args.inner)?
        };
        results.push(r);
    }
    if args.inner {
        println!("{}", serde_json::to_string(&results).expect("plain data"));
        return Ok(0);
    }
    for r in &results {
        print!("{}", report::markdown(r));
    }
    if let Some(dir) = &args.out {
        report::write_files(dir, &results).map_err(io_err(format!("writing results to {}", dir.display())))?;
        eprintln!("ember bench: wrote results.json, results.csv and plot.svg to {}", dir.display());
    }
    Ok(0)
}

fn check(opts: &Options) -> u8 {
    let mut missing = 0;
    println!("ember bench --check: prerequisites");
    for &rt in &opts.runtimes {
        match runtimes::probe(rt) {
            Ok(v) => println!("  ok       {:<13} {v}", rt.name()),
            Err(why) => {
                missing += 1;
                println!("  MISSING  {:<13} {why}: {}", rt.name(), runtimes::install_hint(rt));
            }
        }
    }
    let flavour = crate::lane::KvmFlavour::detect();
    println!("  KVM: {flavour}");
    if (opts.tiers.contains(&Tier::Linux) || opts.tiers.contains(&Tier::Image)) && flavour.needs_nested_lane() {
        println!("  Linux tier: runs inside the Linux lane's outer machine (QEMU TCG with emulated SVM)");
    }
    if oci::unified_has_controllers() {
        println!(
            "  cgroups: hybrid layout with controllers on /sys/fs/cgroup/unified: crun runs in a private mount namespace without it"
        );
    }
    if missing == 0 { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        /// A command line that holds only the bench arguments.
        #[derive(clap::Parser)]
        struct BenchCli {
            #[command(flatten)]
            a: BenchArgs,
        }
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        BenchCli::parse_from(v).a
    }

    #[test]
    fn options_validate() {
        let o = parse_options(&args(&[])).unwrap();
        assert_eq!(o.runs, 10);
        assert_eq!(o.density, [1, 10, 50]);
        assert_eq!(o.runtimes.len(), 6);
        let o = parse_options(&args(&["--runtimes", "ember,crun", "--density", "", "--tier", "all"])).unwrap();
        assert_eq!(o.runtimes, [Runtime::Crun, Runtime::Ember]);
        assert!(o.density.is_empty());
        assert_eq!(o.tiers, [Tier::Tiny, Tier::Linux]);
        for bad in [
            &["--runtimes", "lxc"][..],
            &["--tier", "huge"],
            &["--runs", "0"],
            &["--density", "0"],
            &["--memory", "lots"],
        ] {
            let e = parse_options(&args(bad)).unwrap_err();
            assert!(matches!(e, BenchError::Usage(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn ratios_pair_rounds() {
        let s = |rt: &str, run, ms| Sample {
            runtime: rt.into(),
            run,
            ok: true,
            startup_ms: Some(ms),
            exit_ms: ms,
            mem_kib: 10,
            ..Default::default()
        };
        let v = vec![s("host", 0, 1.0), s("ember", 0, 2.0), s("host", 1, 2.0), s("ember", 1, 6.0)];
        let r = ratios(Runtime::Ember, Runtime::Host, &v).unwrap();
        assert_eq!(r.startup.unwrap().median, 2.5);
        assert_eq!(r.mem.unwrap().median, 1.0);
    }
}
