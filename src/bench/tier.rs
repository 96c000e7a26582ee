//! One tier of `ember bench`: set-up, the rounds (A B A B ...), the density batches, the workloads
//! with the tools image, and the Linux tier re-run inside the lane where Linux needs it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::measure::Summary;
use super::results::*;
use super::runtimes::{Runtime, Setup, Tier};
use super::teardown::*;
use super::{BenchArgs, BenchError, Options, docker, io_err, measure, oci, report, runtimes, tools};

/// Runs the Linux (or image) tier inside the lane's outer machine and reads its results back.
pub(super) fn linux_tier_in_lane(args: &BenchArgs, opts: &Options, tier: Tier) -> Result<TierResult, BenchError> {
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
pub(super) fn ensure_cgroups_mounted() {
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

pub(super) fn prepare_setup(tier: Tier, opts: &Options, inner: bool) -> Result<Setup, BenchError> {
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
pub(super) fn image_payload(
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
pub(super) fn deadline_for(tier: Tier, inner: bool) -> Duration {
    match (tier, inner) {
        (Tier::Tiny, _) => Duration::from_secs(30),
        (Tier::Linux | Tier::Image, false) => Duration::from_secs(120),
        (Tier::Linux | Tier::Image, true) => Duration::from_secs(600),
    }
}

/// One launch of `rt`, from `release` (a density batch's common start) or from its spawn.
pub(super) fn run_one(
    rt: Runtime,
    setup: &Setup,
    prepared: runtimes::Prepared,
    release: Option<Instant>,
    inner: bool,
) -> Sample {
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

pub(super) fn progress(total: u64) -> indicatif::ProgressBar {
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

pub(super) fn run_tier(tier: Tier, opts: &Options, inner: bool) -> Result<TierResult, BenchError> {
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
        density_samples,
    })
}

/// The Linux tier's workloads that need the tools image (see [`tools`]): `opts.runs` iperf3 runs
/// (to a test network made for them and deleted afterwards) and fio runs per runtime that can do
/// them. Metric name -> runtime -> values.
pub(super) fn measure_with_tools(
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
