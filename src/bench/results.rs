//! What `ember bench` records: one launch ([`Sample`]), a runtime's summaries ([`RuntimeResult`]),
//! pairwise ratios, density rows and a whole tier ([`TierResult`]), and how the summaries are made.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::measure::Summary;
use super::runtimes::Runtime;
use super::{measure, report, runtimes};

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
    /// Every measured sample of the rounds.
    pub samples: Vec<Sample>,
    /// Every launch of the density batches (each batch is summarized in [`TierResult::density`]).
    #[serde(default)]
    pub density_samples: Vec<Sample>,
}

/// Fills a runtime's summaries and pairwise ratios from the measured rounds.
pub(super) fn summarize(row: &mut RuntimeResult, rt: Runtime, samples: &[Sample]) {
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
pub(super) fn ratios(a: Runtime, b: Runtime, samples: &[Sample]) -> Option<Ratios> {
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
