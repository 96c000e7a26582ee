//! What `ember bench` reports: the Markdown table (crun against ember first), results.json,
//! results.csv, an SVG plot (plotters, SVG backend only), and the context that makes a run
//! reproducible.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::measure::Summary;
use super::runtimes::{Runtime, Setup, Tier};
use super::{RuntimeResult, TierResult};

/// The machine and inputs a run depends on.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Context {
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus_online: usize,
    /// Host kernel release.
    pub kernel: String,
    /// KVM flavour (hardware VMX/SVM or software such as kvm_pvm).
    pub kvm: String,
    /// Where the tier ran.
    pub lane: String,
    /// Runtime -> version.
    pub versions: BTreeMap<String, String>,
    /// Guest images -> sha256.
    pub guest_hashes: BTreeMap<String, String>,
    /// The VMs' kernel command line.
    pub cmdline: String,
    /// The cgroup layout and what was done about it.
    pub cgroups: String,
    /// How memory is counted.
    pub memory_method: String,
    /// What the in-payload workloads are.
    pub workloads: String,
}

fn sha256(p: &Path) -> String {
    std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

impl Context {
    /// Reads the host and the setup.
    pub fn collect(rows: &BTreeMap<Runtime, RuntimeResult>, setup: &Setup) -> Context {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let mut guest_hashes = BTreeMap::new();
        let cmdline = if setup.tier == Tier::Tiny {
            guest_hashes
                .insert("echo guest (ember demo --save-guest PATH --guest echo)".into(), sha256(&setup.tiny_guest));
            super::runtimes::MARKER.into()
        } else {
            if let Some(g) = &setup.linux {
                guest_hashes.insert(format!("vmlinux {}", g.kernel_release), sha256(&g.vmlinux));
                guest_hashes.insert("bzImage (qemu)".into(), sha256(&g.bzimage));
                guest_hashes.insert("initramfs".into(), sha256(&g.initramfs));
            }
            match &setup.image {
                Some(i) => {
                    guest_hashes.insert(format!("image root file system ({})", i.reference), sha256(&i.sqfs));
                    format!(
                        "{} (image run spec in the initramfs); command: {:?}",
                        crate::guest::DEFAULT_CMDLINE,
                        i.argv
                    )
                }
                None => format!("{} ember.argv=<sh -c payload>", crate::guest::DEFAULT_CMDLINE),
            }
        };
        let cgroups = if super::oci::unified_has_controllers() {
            "hybrid v1 + unified v2 with controllers: crun runs in a private mount namespace \
             (unshare CLONE_NEWNS in a pre_exec hook) where /sys/fs/cgroup/unified is unmounted, so it uses v1"
                .into()
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            "cgroup v2".into()
        } else {
            "cgroup v1".into()
        };
        Context {
            cpu,
            cpus_online: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
            kvm: crate::lane::KvmFlavour::detect().to_string(),
            lane: String::new(),
            versions: rows
                .values()
                .filter(|r| !r.version.is_empty())
                .map(|r| (r.runtime.clone(), r.version.clone()))
                .collect(),
            guest_hashes,
            cmdline,
            cgroups,
            memory_method: "peak memory charged to a cgroup of the launch's own (the runtime's processes join it \
                before exec: memory.max_usage_in_bytes on v1, memory.peak on v2; anonymous memory incl. guest RAM, \
                page tables, kernel memory, page cache first read by it; not shared binary pages already cached); \
                containers add the peak of the container's cgroup; ember's VMM overhead = that minus guest RAM \
                touched (mincore over the guest mapping at exit). wait4's ru_maxrss is in results.json but \
                inflated: a child inherits its parent's peak RSS at exec"
                .into(),
            workloads: format!(
                "timed from outside by when each phase line arrives: cpu = awk loop of {} iterations; syscall = {} \
                 getpid(2) calls in a loop (ember-getpid, a static binary: guest-kernels/ember-getpid.c); membw = dd bs=1M count={} /dev/zero -> \
                 /dev/null; fileio = dd bs=1M count={} conv=fsync to the runtime's own disk (host: a work dir, \
                 containers: tmpfs /tmp, VMs: the initramfs); fio = one run of [{}] per round \
                 on one {} MiB file (host: the file, containers: bind-mounted, VMs: a read-only virtio-blk disk); \
                 TCP = iperf3 -c for {} s (receiver's Mbit/s) from the runtime to an iperf3 server in a network \
                 namespace of ember bench's own (host and containers: over a veth pair; VMs: virtio-net over a \
                 tap); fio and iperf3 come from the tools image (guest-kernels/tools.sh) and run after the timed \
                 rounds; not measured for qemu-microvm and docker",
                super::runtimes::CPU_ITERS,
                super::runtimes::SYSCALL_CALLS,
                super::runtimes::MEMBW_MIB,
                super::runtimes::FILEIO_MIB,
                super::tools::FIO_JOBS,
                super::tools::FIO_FILE_MIB,
                super::tools::IPERF_SECS
            ),
        }
    }
}

fn fmt_opt(s: Option<Summary>, f: impl Fn(f64) -> String) -> String {
    s.map_or("-".into(), |s| f(s.median))
}

fn mib(kib: f64) -> String {
    format!("{:.1}", kib / 1024.0)
}

fn ms_range(s: Option<Summary>) -> String {
    s.map_or("-".into(), |s| format!("{:.1} ({:.1}-{:.1}, p95 {:.1})", s.median, s.min, s.max, s.p95))
}

fn ratio(s: Option<Summary>) -> String {
    s.map_or("-".into(), |s| format!("{:.2}x", s.median))
}

/// The Markdown report of one tier.
pub fn markdown(t: &TierResult) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "\n# ember bench: {} tier ({} rounds, interleaved)\n", t.tier, t.runs);
    let _ = writeln!(o, "Lane: {}. Limits: {}.\n", t.lane, t.limits);
    // The headline: crun against ember.
    let row = |n: &str| t.rows.iter().find(|r| r.runtime == n && r.startup_ms.is_some());
    let _ = writeln!(o, "## crun vs ember\n");
    match (row("crun"), row("ember")) {
        (Some(c), Some(e)) => {
            let (cs, es) = (c.startup_ms.unwrap_or_default().median, e.startup_ms.unwrap_or_default().median);
            let (cx, ex) = (c.exit_ms.unwrap_or_default().median, e.exit_ms.unwrap_or_default().median);
            let (cm, em) = (c.mem_kib.unwrap_or_default().median, e.mem_kib.unwrap_or_default().median);
            let p_start = super::pair(t, "ember", "crun", |s| s.startup_ms);
            let p_exit = super::pair(t, "ember", "crun", |s| Some(s.exit_ms));
            let p_mem = super::pair(t, "ember", "crun", |s| Some(s.mem_kib as f64));
            let _ = writeln!(o, "| measure (median) | crun | ember | ember / crun (pairwise) | ember beats crun? |");
            let _ = writeln!(o, "|---|---|---|---|---|");
            let yes = |r: Option<Summary>| if r.is_some_and(|r| r.median < 1.0) { "**yes**" } else { "no" };
            let _ =
                writeln!(o, "| start-up to marker, ms | {cs:.2} | {es:.2} | {} | {} |", ratio(p_start), yes(p_start));
            let _ = writeln!(o, "| launch to exit, ms | {cx:.2} | {ex:.2} | {} | {} |", ratio(p_exit), yes(p_exit));
            let _ = writeln!(o, "| memory, MiB | {} | {} | {} | {} |", mib(cm), mib(em), ratio(p_mem), yes(p_mem));
            let both = yes(p_start) != "no" && yes(p_mem) != "no";
            let _ = writeln!(
                o,
                "\n\"ember is the first VM whose start-up and memory beat a crun container\": {} on this machine.\n",
                if both { "**holds**" } else { "**does not hold**" }
            );
        }
        _ => {
            let _ = writeln!(o, "(not available: crun or ember did not run: see the table)\n");
        }
    }
    let _ = writeln!(o, "## All runtimes\n");
    let _ = writeln!(
        o,
        "| runtime | status | start-up ms median (min-max, p95) | exit ms median (min-max, p95) | memory MiB | VMM overhead MiB | guest touched MiB | start-up vs host | start-up vs ember | memory vs ember |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
    for r in &t.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.runtime,
            r.status.replace('|', "/"),
            ms_range(r.startup_ms),
            ms_range(r.exit_ms),
            fmt_opt(r.mem_kib, mib),
            fmt_opt(r.vmm_overhead_kib, mib),
            fmt_opt(r.guest_touched_kib, mib),
            ratio(r.vs_host.as_ref().and_then(|x| x.startup)),
            ratio(r.vs_ember.as_ref().and_then(|x| x.startup)),
            ratio(r.vs_ember.as_ref().and_then(|x| x.mem)),
        );
    }
    if !t.density.is_empty() {
        let _ = writeln!(o, "\n## Density: N instances started at once\n");
        let _ = writeln!(
            o,
            "| runtime | N | ok | start-up median ms | start-up p95 ms | exit median ms | total memory MiB |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for d in &t.density {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                d.runtime,
                d.n,
                d.ok,
                fmt_opt(d.startup_ms, |v| format!("{v:.1}")),
                d.startup_ms.map_or("-".into(), |s| format!("{:.1}", s.p95)),
                fmt_opt(d.exit_ms, |v| format!("{v:.1}")),
                mib(d.total_mem_kib as f64)
            );
        }
    }
    if t.rows.iter().any(|r| !r.workload.is_empty()) {
        let _ = writeln!(o, "\n## Inside the payload (medians)\n");
        let _ = writeln!(
            o,
            "| runtime | CPU loop ms | syscall ns | memory bandwidth MiB/s | file write MiB/s | fio read MiB/s | fio 4k IOPS | TCP Mbit/s |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
        for r in t.rows.iter().filter(|r| !r.workload.is_empty()) {
            let g = |k: &str| r.workload.get(k).map_or("-".into(), |s| format!("{:.1}", s.median));
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.runtime,
                g("cpu_loop_ms"),
                g("syscall_ns"),
                g("membw_mib_per_s"),
                g("fileio_mib_per_s"),
                g("fio_read_mib_per_s"),
                g("fio_randread_iops"),
                g("tcp_mbit_per_s")
            );
        }
        let _ = writeln!(o, "\nWorkloads: {}.", t.context.workloads);
    }
    if let Some(e) = t.rows.iter().find(|r| r.runtime == "ember" && !r.timeline.is_empty()) {
        let _ = writeln!(o, "\n## ember's boot timeline (medians, ms since ember's main)\n");
        let _ = writeln!(o, "| event | at ms |");
        let _ = writeln!(o, "|---|---|");
        for (ev, at) in &e.timeline {
            let _ = writeln!(o, "| {ev} | {at:.3} |");
        }
    }
    let c = &t.context;
    let _ = writeln!(o, "\n## Context\n");
    let _ = writeln!(o, "- CPU: {} ({} online); kernel {}; KVM: {}", c.cpu, c.cpus_online, c.kernel, c.kvm);
    for (k, v) in &c.versions {
        let _ = writeln!(o, "- {k}: {v}");
    }
    for (k, v) in &c.guest_hashes {
        let _ = writeln!(o, "- {k}: sha256 {v}");
    }
    let _ = writeln!(o, "- VM cmdline: `{}`", c.cmdline);
    let _ = writeln!(o, "- cgroups: {}", c.cgroups);
    let _ = writeln!(o, "- memory: {}", c.memory_method);
    o
}

/// Writes results.json, results.csv and plot.svg into `dir`.
pub fn write_files(dir: &Path, results: &[TierResult]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(results).map_err(std::io::Error::other)?)?;
    let mut csv = String::from(
        "tier,runtime,status,runs_ok,marker_seen,startup_ms_median,startup_ms_min,startup_ms_max,startup_ms_p95,\
         exit_ms_median,exit_ms_p95,mem_kib_median,vmm_overhead_kib_median,guest_touched_kib_median,\
         startup_vs_host,startup_vs_ember,mem_vs_ember\n",
    );
    let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    for t in results {
        for r in &t.rows {
            let st = r.startup_ms;
            let _ = writeln!(
                csv,
                "{},{},\"{}\",{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                t.tier,
                r.runtime,
                r.status.replace('"', "'"),
                r.ok_runs,
                r.marker_seen,
                num(st.map(|s| s.median)),
                num(st.map(|s| s.min)),
                num(st.map(|s| s.max)),
                num(st.map(|s| s.p95)),
                num(r.exit_ms.map(|s| s.median)),
                num(r.exit_ms.map(|s| s.p95)),
                num(r.mem_kib.map(|s| s.median)),
                num(r.vmm_overhead_kib.map(|s| s.median)),
                num(r.guest_touched_kib.map(|s| s.median)),
                num(r.vs_host.as_ref().and_then(|x| x.startup).map(|s| s.median)),
                num(r.vs_ember.as_ref().and_then(|x| x.startup).map(|s| s.median)),
                num(r.vs_ember.as_ref().and_then(|x| x.mem).map(|s| s.median)),
            );
        }
    }
    std::fs::write(dir.join("results.csv"), csv)?;
    std::fs::write(dir.join("plot.svg"), plot_svg(results).map_err(std::io::Error::other)?)
}

/// Start-up and memory medians per runtime, one bar chart each, log scale (the runtimes span
/// two orders of magnitude), one row of charts per tier.
pub fn plot_svg(results: &[TierResult]) -> Result<String, String> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let height = 360 * results.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (1000, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let rows = root.split_evenly((results.len().max(1), 2));
        for (i, t) in results.iter().enumerate() {
            let ok: Vec<&RuntimeResult> = t.rows.iter().filter(|r| r.startup_ms.is_some()).collect();
            let panels: [(&str, Vec<f64>); 2] = [
                (
                    "start-up to marker, ms (median, log)",
                    ok.iter().map(|r| r.startup_ms.map_or(0.0, |s| s.median)).collect(),
                ),
                (
                    "memory, MiB (median, log)",
                    ok.iter().map(|r| r.mem_kib.map_or(0.0, |s| s.median / 1024.0)).collect(),
                ),
            ];
            for (j, (title, vals)) in panels.iter().enumerate() {
                let area = &rows[i * 2 + j];
                let hi = vals.iter().cloned().fold(1.0, f64::max) * 2.0;
                let lo = vals.iter().cloned().filter(|v| *v > 0.0).fold(hi, f64::min) / 2.0;
                let n = vals.len().max(1) as i32;
                let mut chart = ChartBuilder::on(area)
                    .caption(format!("{} tier: {title}", t.tier), ("sans-serif", 16))
                    .margin(10)
                    .x_label_area_size(30)
                    .y_label_area_size(50)
                    .build_cartesian_2d((0..n).into_segmented(), (lo..hi).log_scale())
                    .map_err(|e| e.to_string())?;
                let names: Vec<String> = ok.iter().map(|r| r.runtime.clone()).collect();
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(names.len().max(1))
                    .x_label_formatter(&|x| match x {
                        SegmentValue::CenterOf(k) => names.get(*k as usize).cloned().unwrap_or_default(),
                        _ => String::new(),
                    })
                    .y_label_formatter(&|y| format!("{y:.1}"))
                    .draw()
                    .map_err(|e| e.to_string())?;
                chart
                    .draw_series(vals.iter().enumerate().map(|(k, v)| {
                        let color = if names[k] == "ember" { RED } else { BLUE };
                        Rectangle::new(
                            [(SegmentValue::Exact(k as i32), lo), (SegmentValue::Exact(k as i32 + 1), v.max(lo))],
                            color.mix(0.6).filled(),
                        )
                    }))
                    .map_err(|e| e.to_string())?;
            }
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
