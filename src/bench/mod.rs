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
//! - [`report`]: the Markdown table, results.json / results.csv and the SVG plot.
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
mod runtimes;
pub mod tools;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use runtimes::{Cleanup, Runtime, Setup, Tier};
use serde::{Deserialize, Serialize};

use measure::Summary;

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

/// One launch, as recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Which runtime.
    pub runtime: String,
    /// Round (warm-up excluded), or instance number in a density batch.
    pub run: usize,
    /// Marker seen and the expected exit status.
    pub ok: bool,
    /// Exit status (128 + signal when killed).
    pub status: i32,
    /// Launch to the marker line, ms.
    pub startup_ms: Option<f64>,
    /// Launch to the first stdout byte, ms.
    pub first_byte_ms: Option<f64>,
    /// Launch to exit, ms.
    pub exit_ms: f64,
    /// The headline memory, KiB: the peak charge of the launch's own memory cgroup, plus the
    /// container cgroup's peak for containers (`wait4`'s peak RSS where there are no cgroups).
    pub mem_kib: u64,
    /// `wait4` `ru_maxrss` of the launched process (largest of it and its reaped descendants;
    /// it includes the RSS the child had before exec, i.e. part of ember bench itself).
    pub max_rss_kib: u64,
    /// The peak charge of the launch's own memory cgroup (the launched process and descendants
    /// outside a container cgroup).
    pub launch_peak_kib: Option<u64>,
    /// Containers: the peak memory charge of the container's cgroup.
    pub cgroup_peak_kib: Option<u64>,
    /// ember: guest RAM touched (mincore over the guest mapping, ember's `--timeline`).
    pub guest_touched_kib: Option<u64>,
    /// ember: peak RSS minus guest RAM touched: the VMM's own memory.
    pub vmm_overhead_kib: Option<u64>,
    /// Linux tier: workload phase durations, ms.
    pub phases: BTreeMap<String, f64>,
    /// ember: its boot timeline (event, ms since ember's start).
    pub timeline: Vec<(String, f64)>,
    /// Time the child spent joining its memory cgroup before exec, left out of the timings.
    pub cgroup_join_ms: f64,
    /// Why it failed, when it did (stderr tail).
    pub error: Option<String>,
}

/// Results of one runtime in one tier.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuntimeResult {
    /// Runtime name.
    pub runtime: String,
    /// "ok" or "skipped: <reason>" or "failed: <reason>".
    pub status: String,
    /// Version string.
    pub version: String,
    /// Successful measured runs.
    pub ok_runs: usize,
    /// Every measured run saw its marker.
    pub marker_seen: bool,
    /// Start-up (marker) ms.
    pub startup_ms: Option<Summary>,
    /// Exit ms.
    pub exit_ms: Option<Summary>,
    /// Headline memory, KiB.
    pub mem_kib: Option<Summary>,
    /// VMM overhead (ember), KiB.
    pub vmm_overhead_kib: Option<Summary>,
    /// Guest memory touched (ember), KiB.
    pub guest_touched_kib: Option<Summary>,
    /// Container cgroup peak, KiB.
    pub cgroup_peak_kib: Option<Summary>,
    /// Pairwise ratios against host: start-up, exit, memory.
    pub vs_host: Option<Ratios>,
    /// Pairwise ratios against ember: start-up, exit, memory.
    pub vs_ember: Option<Ratios>,
    /// Linux tier workloads: name -> value summary (units in the name).
    pub workload: BTreeMap<String, Summary>,
    /// ember: median timeline (event, ms).
    pub timeline: Vec<(String, f64)>,
}

/// Pairwise ratios (this runtime / the reference), medians etc. over the rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ratios {
    /// Start-up.
    pub startup: Option<Summary>,
    /// Exit.
    pub exit: Option<Summary>,
    /// Memory.
    pub mem: Option<Summary>,
}

/// One density batch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DensityRow {
    /// Runtime.
    pub runtime: String,
    /// Instances started at once.
    pub n: usize,
    /// How many saw their marker and exited as expected.
    pub ok: usize,
    /// Start-up from the common release, ms.
    pub startup_ms: Option<Summary>,
    /// Exit from the common release, ms.
    pub exit_ms: Option<Summary>,
    /// Sum of the instances' headline memory, KiB.
    pub total_mem_kib: u64,
}

/// A tier's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TierResult {
    /// tiny or linux.
    pub tier: String,
    /// Where it ran (host directly, or inside the Linux lane).
    pub lane: String,
    /// Rounds measured.
    pub runs: usize,
    /// The limits used.
    pub limits: String,
    /// One per requested runtime, in report order.
    pub rows: Vec<RuntimeResult>,
    /// Density batches.
    pub density: Vec<DensityRow>,
    /// The context of the machine it ran on.
    pub context: report::Context,
    /// Every measured sample.
    pub samples: Vec<Sample>,
}

// ---------------------------------------------------------------------------------------------
// Teardown: what is running now, for Ctrl-C and timeouts.

struct Active {
    pid: Option<u32>,
    cleanup: Cleanup,
    deadline: Instant,
}

static ACTIVE: Mutex<Option<HashMap<u64, Active>>> = Mutex::new(None);
static SEQ: AtomicU64 = AtomicU64::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static WORK_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Cgroup directories a runtime may create above the containers' cgroups (removed at the end).
static CGROUP_PREFIXES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// After a Ctrl-C nothing new starts: the calling thread waits for the exit.
fn stop_if_interrupted() {
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::park();
    }
}

fn active() -> std::sync::MutexGuard<'static, Option<HashMap<u64, Active>>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn kill_and_clean(a: &Active) {
    if let Some(pid) = a.pid {
        // SAFETY: kill has no memory-safety preconditions; the group is the child's own.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
    if let Some(c) = &a.cleanup.container {
        runtimes::delete_container(c.runtime, &c.id);
    }
}

/// Blocks SIGINT/SIGTERM in this (the main) thread, so threads spawned later inherit it, and
/// starts the thread that waits for them and enforces timeouts. Children get an empty mask.
fn install_signal_thread() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        loop {
            let ts = libc::timespec { tv_sec: 0, tv_nsec: 100_000_000 };
            // SAFETY: waits for the signals blocked above; no info struct requested.
            let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
            if sig > 0 {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("\nember bench: interrupted: tearing down what is running");
                let all: Vec<Active> = active().take().map(|m| m.into_values().collect()).unwrap_or_default();
                for a in &all {
                    kill_and_clean(a);
                }
                // Give the launching threads a moment to reap their children.
                std::thread::sleep(Duration::from_millis(200));
                for a in &all {
                    runtimes::finish(&a.cleanup);
                }
                for d in WORK_DIRS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    let _ = std::fs::remove_dir_all(d);
                }
                // Twice: a launch being prepared when the signal came may have made its cgroup since.
                for _ in 0..2 {
                    oci::sweep_cgroups(&oci::own_memory_cgroup(), &format!("ember-bench-{}-", std::process::id()));
                    std::thread::sleep(Duration::from_millis(100));
                }
                oci::remove_empty_dirs(&CGROUP_PREFIXES.lock().unwrap_or_else(|p| p.into_inner()));
                std::process::exit(128 + sig);
            }
            let now = Instant::now();
            if let Some(m) = active().as_mut() {
                for a in m.values_mut().filter(|a| a.deadline < now && a.pid.is_some()) {
                    log::warn!("bench: a launch passed its deadline: killing it");
                    kill_and_clean(a);
                    a.pid = None;
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------

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

/// Runs the Linux (or image) tier inside the lane's outer machine and reads its results back.
fn linux_tier_in_lane(args: &BenchArgs, opts: &Options, tier: Tier) -> Result<TierResult, BenchError> {
    use crate::lane::{Invocation, LinuxLane};
    // The guest is built (or found) out here, where its cache is writable.
    crate::guest::default_guest(false).map_err(BenchError::Guest)?;
    // So is the image: pulled and its root file system built, for the machine to read.
    if let Some(image) = opts.image.as_ref().filter(|i| !i.starts_with("dir:")) {
        crate::image::pull(image, &crate::image::PullOptions::default()).map_err(BenchError::Image)?;
    }
    // And the tools image (iperf3 and fio); without it those workloads are skipped.
    if let Err(e) = crate::guest::default_tools() {
        eprintln!("ember bench: no tools image, network and fio are not measured: {e}");
    }
    let exe = std::env::current_exe().map_err(io_err("finding the ember binary"))?;
    eprintln!("ember bench: Linux tier: starting the Linux lane (this host's KVM cannot run Linux)");
    let mut lane = LinuxLane::start(&exe).map_err(BenchError::Lane)?;
    lane.set_timeout(Duration::from_secs(3600));
    let names: Vec<&str> = opts.runtimes.iter().map(|r| r.name()).collect();
    let density: Vec<String> = opts.density.iter().map(|d| d.to_string()).collect();
    let mut inv = vec![
        "bench".to_string(),
        "--inner".into(),
        format!("--tier={}", if tier == Tier::Image { "linux" } else { tier.name() }),
        format!("--runs={}", opts.runs),
        format!("--warmup={}", opts.warmup),
        format!("--runtimes={}", names.join(",")),
        format!("--density={}", density.join(",")),
        format!("--cpus={}", opts.cpus),
    ];
    if let Some(m) = &args.memory {
        inv.push(format!("--memory={m}"));
    }
    if let Some(i) = &opts.image {
        inv.push(format!("--image={i}"));
        inv.push("--".into());
        inv.extend(opts.command.iter().cloned());
    }
    // The inner bench's progress lines, passed on as they come (a long run is never silent).
    let mut partial = Vec::new();
    let mut show = |bytes: &[u8]| {
        partial.extend_from_slice(bytes);
        while let Some(n) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=n).collect();
            let line = String::from_utf8_lossy(&line);
            if line.starts_with("ember bench:") {
                eprint!("{line}");
            }
        }
    };
    let out = lane.run_with_progress(&Invocation::new(inv), &mut show).map_err(BenchError::Lane)?;
    let mut v: Vec<TierResult> = match serde_json::from_slice(&out.stdout) {
        Ok(v) if out.status == 0 => v,
        _ => {
            let err = out.stderr_lossy();
            let tail: String =
                err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(BenchError::Inner { status: out.status, stderr: tail });
        }
    };
    let mut r = v.pop().ok_or(BenchError::Inner { status: 0, stderr: "no results".into() })?;
    r.lane = lane.describe();
    Ok(r)
}

/// Inside the lane's outer machine nothing mounts cgroups: mount cgroup2 for the containers.
fn ensure_cgroups_mounted() {
    if !oci::cgroup_roots().is_empty() {
        return;
    }
    // SAFETY: mount takes static C strings only.
    let r = unsafe {
        libc::mount(c"cgroup2".as_ptr(), c"/sys/fs/cgroup".as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null())
    };
    if r == 0 {
        let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +cpu +pids");
    } else {
        log::warn!("bench: cannot mount cgroup2: {}", std::io::Error::last_os_error());
    }
}

fn prepare_setup(tier: Tier, opts: &Options, inner: bool) -> Result<Setup, BenchError> {
    let base = if inner { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let work = base.join(format!("ember-bench-{}-{}", std::process::id(), tier.name()));
    WORK_DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(work.clone());
    std::fs::create_dir_all(&work).map_err(io_err(format!("creating {}", work.display())))?;
    let rootfs = oci::create_rootfs(&work).map_err(io_err("building the busybox rootfs"))?;
    let ember = std::env::current_exe().map_err(io_err("finding the ember binary"))?;
    // The tiny tier's VM payload: ember's `echo` guest, which prints its
    // command line and exits, as `echo MARKER` does in the containers.
    let tiny_guest = work.join("echo-guest.elf");
    std::fs::write(&tiny_guest, crate::demo::ECHO_GUEST)
        .map_err(io_err(format!("writing {}", tiny_guest.display())))?;
    let linux =
        if tier == Tier::Tiny { None } else { Some(crate::guest::default_guest(false).map_err(BenchError::Guest)?) };
    let image = match (&opts.image, &linux) {
        (Some(reference), Some(g)) => Some(image_payload(reference, &opts.command, g, &work)?),
        _ => None,
    };
    let mem_arg = opts.memory.clone().unwrap_or_else(|| if tier == Tier::Tiny { "32M".into() } else { "256M".into() });
    let mem_bytes = crate::config::parse_size(&mem_arg).unwrap_or(32 << 20);
    let cgroup_base = oci::own_memory_cgroup();
    CGROUP_PREFIXES.lock().unwrap_or_else(|p| p.into_inner()).extend(oci::missing_prefixes(&cgroup_base));
    Ok(Setup {
        ember,
        work,
        rootfs,
        tiny_guest,
        linux,
        image,
        limits: oci::Limits { cpus: opts.cpus, mem_bytes },
        tier,
        mem_arg,
        cgroup_base,
    })
}

/// The image tier's payload: the image in the store, its root file system
/// unpacked for the containers, the run spec appended to an initramfs for QEMU.
fn image_payload(
    reference: &str,
    command: &[String],
    g: &crate::guest::GuestArtifacts,
    work: &std::path::Path,
) -> Result<runtimes::ImagePayload, BenchError> {
    use crate::image;
    let prepared = image::prepare(reference, &image::PullOptions::default(), work).map_err(BenchError::Image)?;
    let cmd: Vec<std::ffi::OsString> = command.iter().map(Into::into).collect();
    let opts = image::spec::RunOptions { hostname: Some("ember-bench".into()), ..Default::default() };
    let spec = image::spec::make_spec(&prepared.config, &opts, &cmd).map_err(BenchError::Image)?;
    let initrd = work.join("image-initrd");
    image::spec::write_initrd(&g.initramfs, &spec, &initrd).map_err(BenchError::Image)?;
    let rootfs_dir = work.join("image-rootfs");
    std::fs::create_dir_all(&rootfs_dir).map_err(io_err("creating the image's root directory"))?;
    let out = std::process::Command::new("rdsquashfs")
        .args(["-q", "-O", "-C", "-u", "/", "-p"])
        .arg(&rootfs_dir)
        .arg(&prepared.rootfs)
        .output()
        .map_err(io_err("running rdsquashfs (squashfs-tools-ng)"))?;
    if !out.status.success() {
        return Err(BenchError::Usage(format!(
            "unpacking the image for the containers failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let lossy = |v: &[Vec<u8>]| v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>();
    Ok(runtimes::ImagePayload {
        reference: reference.to_string(),
        command: command.to_vec(),
        argv: lossy(&spec.argv),
        env: lossy(&spec.env),
        cwd: spec.workdir.clone(),
        sqfs: prepared.rootfs,
        initrd,
        rootfs_dir,
    })
}

/// Time allowed for one launch before it is killed.
fn deadline_for(tier: Tier, inner: bool) -> Duration {
    match (tier, inner) {
        (Tier::Tiny, _) => Duration::from_secs(30),
        (Tier::Linux | Tier::Image, false) => Duration::from_secs(120),
        (Tier::Linux | Tier::Image, true) => Duration::from_secs(600),
    }
}

/// One launch of `rt`, from `release` (a density batch's common start) or from its spawn.
fn run_one(rt: Runtime, setup: &Setup, prepared: runtimes::Prepared, release: Option<Instant>, inner: bool) -> Sample {
    stop_if_interrupted();
    let key = SEQ.fetch_add(1, Ordering::SeqCst);
    let runtimes::Prepared { mut cmd, marker, cleanup, join_timer } = prepared;
    let deadline = Instant::now() + deadline_for(setup.tier, inner);
    active().get_or_insert_with(HashMap::new).insert(key, Active { pid: None, cleanup: cleanup.clone(), deadline });
    let result = measure::launch(&mut cmd, marker, release, |pid| {
        if let Some(a) = active().as_mut().and_then(|m| m.get_mut(&key)) {
            a.pid = Some(pid);
        }
    });
    if let Some(m) = active().as_mut() {
        m.remove(&key);
    }
    let (launch_peak, cgroup_peak) = runtimes::finish(&cleanup);
    let mut s = Sample { runtime: rt.name().into(), ..Default::default() };
    let l = match result {
        Ok(mut l) => {
            // Leave out what joining the cgroup cost (see oci::JoinTimer).
            let cost = join_timer.map_or(Duration::ZERO, |t| t.cost());
            l.marker = l.marker.map(|d| d.saturating_sub(cost));
            l.first_byte = l.first_byte.map(|d| d.saturating_sub(cost));
            l.exit = l.exit.saturating_sub(cost);
            for (at, _) in &mut l.lines {
                *at = at.saturating_sub(cost);
            }
            s.cgroup_join_ms = measure::ms(cost);
            l
        }
        Err(e) => {
            s.error = Some(format!("cannot start: {e}"));
            s.status = -1;
            return s;
        }
    };
    s.status = l.status;
    s.ok = l.marker.is_some() && l.status == rt.ok_status();
    s.startup_ms = l.marker.map(measure::ms);
    s.first_byte_ms = l.first_byte.map(measure::ms);
    s.exit_ms = measure::ms(l.exit);
    s.max_rss_kib = l.max_rss_kib;
    s.cgroup_peak_kib = cgroup_peak;
    s.launch_peak_kib = launch_peak;
    // The cgroups when there are some; wait4's number (inflated by what the child inherited)
    // only when this host has no memory cgroup.
    s.mem_kib = match (launch_peak, cgroup_peak) {
        (None, None) => l.max_rss_kib,
        (a, b) => a.unwrap_or(0) + b.unwrap_or(0),
    };
    if rt == Runtime::Ember {
        let err = String::from_utf8_lossy(&l.stderr);
        s.timeline = measure::parse_timeline(&err);
        s.guest_touched_kib = measure::parse_guest_touched_kib(&err);
        s.vmm_overhead_kib = s.guest_touched_kib.map(|g| s.mem_kib.saturating_sub(g));
    }
    let phase_at: Vec<(String, f64)> = l
        .lines
        .iter()
        .filter_map(|(at, line)| Some((line.trim().strip_prefix(runtimes::PHASE)?.to_string(), measure::ms(*at))))
        .collect();
    for w in phase_at.windows(2) {
        s.phases.insert(w[0].0.clone(), w[1].1 - w[0].1);
    }
    if !s.ok {
        let err = String::from_utf8_lossy(&l.stderr);
        let tail: Vec<&str> = err.lines().filter(|l| !l.starts_with("[{\"event\"")).collect();
        let tail = tail[tail.len().saturating_sub(4)..].join(" | ");
        s.error =
            Some(format!("status {}{}: {tail}", l.status, if l.marker.is_none() { ", marker not seen" } else { "" }));
    }
    s
}

fn progress(total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    }
}

fn run_tier(tier: Tier, opts: &Options, inner: bool) -> Result<TierResult, BenchError> {
    if inner {
        ensure_cgroups_mounted();
    }
    let setup = prepare_setup(tier, opts, inner)?;
    let tier_name = tier.name();
    let plain = |msg: String| {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            eprintln!("ember bench: {msg}");
        }
    };
    let mut rows: BTreeMap<Runtime, RuntimeResult> = BTreeMap::new();
    let mut avail = Vec::new();
    // A Docker engine: the reachable one, or ember bench's own for this tier.
    let engine = if opts.runtimes.contains(&Runtime::Docker) { Some(docker::ensure(&setup.work)) } else { None };
    for &rt in &opts.runtimes {
        let mut row = RuntimeResult { runtime: rt.name().into(), ..Default::default() };
        let probed = match (&engine, rt) {
            (Some(Err(why)), Runtime::Docker) => Err(why.clone()),
            _ => runtimes::probe(rt),
        };
        match probed {
            Ok(v) => {
                row.version = v;
                row.status = "ok".into();
                let (rootfs, docker_name) = match &setup.image {
                    Some(i) => (&i.rootfs_dir, runtimes::DOCKER_IMAGE_TIER_IMAGE),
                    None => (&setup.rootfs, runtimes::DOCKER_IMAGE),
                };
                if rt == Runtime::Docker && !runtimes::docker_import(rootfs, docker_name).unwrap_or(false) {
                    row.status = "skipped: cannot import the root file system as an image".into();
                } else if rt == Runtime::Host && tier == Tier::Image {
                    row.status = "skipped: an image runs in a runtime, not on the host".into();
                } else {
                    avail.push(rt);
                }
            }
            Err(why) => row.status = format!("skipped: {why}"),
        }
        rows.insert(rt, row);
    }
    let total = (opts.warmup + opts.runs) * avail.len() + opts.density.iter().sum::<usize>() * avail.len();
    let pb = progress(total as u64);
    pb.set_message(format!("{tier_name} tier"));
    plain(format!("{tier_name} tier: {} runtimes, {} warm-up + {} rounds", avail.len(), opts.warmup, opts.runs));
    let mut samples: Vec<Sample> = Vec::new();
    let mut seq = 0u64;
    for round in 0..opts.warmup + opts.runs {
        for &rt in &avail {
            seq += 1;
            stop_if_interrupted();
            pb.set_message(format!("{tier_name}: {} round {}", rt.name(), round + 1));
            plain(format!("{tier_name} tier: round {}/{}: {}", round + 1, opts.warmup + opts.runs, rt.name()));
            let prepared = runtimes::prepare(rt, &setup, seq).map_err(io_err(format!("preparing {}", rt.name())))?;
            let mut s = run_one(rt, &setup, prepared, None, inner);
            s.run = round.saturating_sub(opts.warmup);
            if round >= opts.warmup {
                samples.push(s);
            }
            pb.inc(1);
        }
        plain(format!("{tier_name} tier: round {}/{} done", round + 1, opts.warmup + opts.runs));
    }
    let mut density = Vec::new();
    let mut density_samples = Vec::new();
    for &n in &opts.density {
        for &rt in &avail {
            pb.set_message(format!("{tier_name}: density {n} x {}", rt.name()));
            let mut batch = Vec::with_capacity(n);
            for _ in 0..n {
                seq += 1;
                stop_if_interrupted();
                batch.push(runtimes::prepare(rt, &setup, seq).map_err(io_err(format!("preparing {}", rt.name())))?);
            }
            let barrier = Arc::new(Barrier::new(n + 1));
            let release = Arc::new(Mutex::new(None::<Instant>));
            let handles: Vec<_> = batch
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    let (barrier, release, setup) = (barrier.clone(), release.clone(), setup.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let at = release.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or_else(Instant::now);
                        let mut s = run_one(rt, &setup, p, Some(at), inner);
                        s.run = i;
                        s
                    })
                })
                .collect();
            *release.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            barrier.wait();
            let got: Vec<Sample> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
            pb.inc(n as u64);
            let ok: Vec<&Sample> = got.iter().filter(|s| s.ok).collect();
            density.push(DensityRow {
                runtime: rt.name().into(),
                n,
                ok: ok.len(),
                startup_ms: Summary::of(&ok.iter().filter_map(|s| s.startup_ms).collect::<Vec<_>>()),
                exit_ms: Summary::of(&ok.iter().map(|s| s.exit_ms).collect::<Vec<_>>()),
                total_mem_kib: got.iter().map(|s| s.mem_kib).sum(),
            });
            plain(format!("{tier_name} tier: density {n} x {}: {}/{n} ok", rt.name(), ok.len()));
            density_samples.extend(got);
        }
    }
    pb.finish_and_clear();
    drop(engine);
    let tool_results =
        if tier == Tier::Linux { measure_with_tools(&avail, &setup, opts, &mut seq, &plain) } else { HashMap::new() };
    let mut context = report::Context::collect(&rows, &setup);
    let _ = std::fs::remove_dir_all(&setup.work);
    oci::sweep_cgroups(&setup.cgroup_base, &format!("ember-bench-{}-", std::process::id()));
    oci::remove_empty_dirs(&CGROUP_PREFIXES.lock().unwrap_or_else(|p| p.into_inner()));
    WORK_DIRS.lock().unwrap_or_else(|p| p.into_inner()).retain(|d| d != &setup.work);

    for &rt in &avail {
        let row = rows.get_mut(&rt).expect("probed above");
        summarize(row, rt, &samples);
        for (metric, by_rt) in &tool_results {
            if let Some(v) = by_rt.get(&rt).and_then(|v| Summary::of(v)) {
                row.workload.insert(metric.to_string(), v);
            }
        }
    }
    let lane = if inner {
        "nested: inside the Linux lane's outer machine (QEMU TCG, emulated AMD SVM, kvm_amd)".to_string()
    } else {
        format!("direct: {}", crate::lane::KvmFlavour::detect())
    };
    context.lane = lane.clone();
    let _ = density_samples;
    Ok(TierResult {
        tier: tier_name.into(),
        lane,
        runs: opts.runs,
        limits: format!(
            "{} vCPU / CPU quota {}us per {}us; memory {} (VM RAM = container memory limit)",
            setup.limits.cpus,
            setup.limits.cpus as u64 * oci::CPU_PERIOD_US,
            oci::CPU_PERIOD_US,
            setup.mem_arg
        ),
        rows: rows.into_values().collect(),
        density,
        context,
        samples,
    })
}

/// The Linux tier's workloads that need the tools image (see [`tools`]): `opts.runs` iperf3 runs
/// (to a test network made for them and deleted afterwards) and fio runs per runtime that can do
/// them. Metric name -> runtime -> values.
fn measure_with_tools(
    avail: &[Runtime],
    setup: &Setup,
    opts: &Options,
    seq: &mut u64,
    plain: &dyn Fn(String),
) -> HashMap<&'static str, HashMap<Runtime, Vec<f64>>> {
    let mut got: HashMap<&'static str, HashMap<Runtime, Vec<f64>>> = HashMap::new();
    let tools = match tools::Tools::find() {
        Ok(t) => t,
        Err(e) => {
            plain(format!("network and fio: not measured: {e}"));
            return got;
        }
    };
    let measured: Vec<Runtime> = avail
        .iter()
        .copied()
        .filter(|r| matches!(r, Runtime::Host | Runtime::Crun | Runtime::Runc | Runtime::Ember))
        .collect();
    match tools::TestNet::create(&tools) {
        Ok(net) => {
            for round in 0..opts.runs {
                for &rt in &measured {
                    stop_if_interrupted();
                    *seq += 1;
                    match net.measure(rt, setup, &tools, *seq) {
                        Ok(v) => got.entry("tcp_mbit_per_s").or_default().entry(rt).or_default().push(v),
                        Err(e) => plain(format!("network: {} round {}: {e}", rt.name(), round + 1)),
                    }
                }
            }
        }
        Err(e) => plain(format!("network: not measured: {e}")),
    }
    // fio needs O_DIRECT, which tmpfs (the work dir in the lane) lacks: the data file goes to the
    // temp dir, the lane's 9p view of the host's.
    let data = std::env::temp_dir().join(format!("ember-bench-fio-{}.img", std::process::id()));
    if let Err(e) = tools::create_fio_file(&data) {
        plain(format!("fio: not measured: cannot write {}: {e}", data.display()));
        return got;
    }
    for round in 0..opts.runs {
        for &rt in &measured {
            stop_if_interrupted();
            *seq += 1;
            match tools::measure_fio(rt, setup, &tools, &data, *seq) {
                Ok((seq_mib, iops)) => {
                    got.entry("fio_read_mib_per_s").or_default().entry(rt).or_default().push(seq_mib);
                    got.entry("fio_randread_iops").or_default().entry(rt).or_default().push(iops);
                }
                Err(e) => plain(format!("fio: {} round {}: {e}", rt.name(), round + 1)),
            }
        }
    }
    let _ = std::fs::remove_file(&data);
    got
}

/// Fills a runtime's summaries and pairwise ratios from the measured rounds.
fn summarize(row: &mut RuntimeResult, rt: Runtime, samples: &[Sample]) {
    let mine: Vec<&Sample> = samples.iter().filter(|s| s.runtime == rt.name()).collect();
    let ok: Vec<&Sample> = mine.iter().copied().filter(|s| s.ok).collect();
    row.ok_runs = ok.len();
    row.marker_seen = !mine.is_empty() && mine.iter().all(|s| s.startup_ms.is_some());
    if ok.is_empty() {
        let why = mine.iter().find_map(|s| s.error.clone()).unwrap_or_else(|| "no run succeeded".into());
        row.status = format!("failed: {why}");
        return;
    }
    if ok.len() < mine.len() {
        let why = mine.iter().find_map(|s| s.error.clone()).unwrap_or_default();
        row.status = format!("ok ({} of {} runs failed: {why})", mine.len() - ok.len(), mine.len());
    }
    let f = |g: &dyn Fn(&Sample) -> Option<f64>| Summary::of(&ok.iter().filter_map(|s| g(s)).collect::<Vec<_>>());
    row.startup_ms = f(&|s| s.startup_ms);
    row.exit_ms = f(&|s| Some(s.exit_ms));
    row.mem_kib = f(&|s| Some(s.mem_kib as f64));
    row.vmm_overhead_kib = f(&|s| s.vmm_overhead_kib.map(|v| v as f64));
    row.guest_touched_kib = f(&|s| s.guest_touched_kib.map(|v| v as f64));
    row.cgroup_peak_kib = f(&|s| s.cgroup_peak_kib.map(|v| v as f64));
    for (phase, name, scale) in workload_metrics() {
        let v: Vec<f64> = ok.iter().filter_map(|s| s.phases.get(phase).map(|ms| scale(*ms))).collect();
        if let Some(sm) = Summary::of(&v) {
            row.workload.insert(name.to_string(), sm);
        }
    }
    // Median timeline, in the order of the first run.
    if let Some(first) = ok.first() {
        row.timeline = first
            .timeline
            .iter()
            .filter_map(|(ev, _)| {
                let v: Vec<f64> =
                    ok.iter().filter_map(|s| s.timeline.iter().find(|(e, _)| e == ev).map(|(_, m)| *m)).collect();
                Some((ev.clone(), Summary::of(&v)?.median))
            })
            .collect();
    }
    row.vs_host = ratios(rt, Runtime::Host, samples);
    row.vs_ember = ratios(rt, Runtime::Ember, samples);
}

/// A workload column: (key, unit label, conversion from the raw figure).
pub type WorkloadMetric = (&'static str, &'static str, fn(f64) -> f64);

/// (phase, metric name with its unit, ms -> metric).
pub fn workload_metrics() -> [WorkloadMetric; 4] {
    [
        ("cpu", "cpu_loop_ms", |ms| ms),
        ("syscall", "syscall_ns", |ms| ms * 1e6 / runtimes::SYSCALL_CALLS as f64),
        ("membw", "membw_mib_per_s", |ms| runtimes::MEMBW_MIB as f64 / (ms / 1e3)),
        ("fileio", "fileio_mib_per_s", |ms| runtimes::FILEIO_MIB as f64 / (ms / 1e3)),
    ]
}

/// Ratios of `a` against `b`, round by round (both ok in that round).
fn ratios(a: Runtime, b: Runtime, samples: &[Sample]) -> Option<Ratios> {
    let of = |rt: Runtime| -> HashMap<usize, &Sample> {
        samples.iter().filter(|s| s.runtime == rt.name() && s.ok).map(|s| (s.run, s)).collect()
    };
    let (xa, xb) = (of(a), of(b));
    if xb.is_empty() {
        return None;
    }
    let mut rounds: Vec<usize> = xa.keys().filter(|k| xb.contains_key(k)).copied().collect();
    rounds.sort();
    let pick = |g: &dyn Fn(&Sample) -> Option<f64>| {
        let (va, vb): (Vec<f64>, Vec<f64>) = rounds.iter().filter_map(|r| Some((g(xa[r])?, g(xb[r])?))).unzip();
        measure::pairwise_ratio(&va, &vb)
    };
    Some(Ratios {
        startup: pick(&|s| s.startup_ms),
        exit: pick(&|s| Some(s.exit_ms)),
        mem: pick(&|s| Some(s.mem_kib as f64)),
    })
}

/// Pairwise ratio of `a` against `b` for one measure, from a tier's samples (for the headline).
pub fn pair(t: &TierResult, a: &str, b: &str, g: fn(&Sample) -> Option<f64>) -> Option<Summary> {
    let of = |rt: &str| -> HashMap<usize, &Sample> {
        t.samples.iter().filter(|s| s.runtime == rt && s.ok).map(|s| (s.run, s)).collect()
    };
    let (xa, xb) = (of(a), of(b));
    let mut rounds: Vec<usize> = xa.keys().filter(|k| xb.contains_key(k)).copied().collect();
    rounds.sort();
    let (va, vb): (Vec<f64>, Vec<f64>) = rounds.iter().filter_map(|r| Some((g(xa[r])?, g(xb[r])?))).unzip();
    measure::pairwise_ratio(&va, &vb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: BenchArgs,
        }
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        T::parse_from(v).a
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
