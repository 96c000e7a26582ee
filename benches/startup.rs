//! Start-up, exit and memory of ember against QEMU `-M microvm`, on the same
//! tiny guest (ember's built-in demo guest, a PVH ELF both VMMs boot), with the
//! same `-m`. Runs are interleaved (ember, qemu, ember, qemu, ...) so drift on a
//! noisy machine hits both; we report medians, min, max, p95 and ratios.
//!
//! A third peer joins the interleaved runs: the floor, the same guest run by the least a KVM VMM can do
//! (`startup/raw_kvm.rs`, this binary re-run as `--raw-kvm GUEST MIB CMDLINE`). ember above it is
//! ember's own cost. The same pair then runs `ember bench`'s tiny-tier guest (`echo`, 32 MiB), with
//! `EMBER_BENCH_FIRECRACKER=PATH` Firecracker too (first byte only: it has no exit device).
//!
//! Then: the host kernel's share (ember as the host's only VM, against ember while another VM is
//! resident, against `/bin/true`), and where ember's own time goes (its `--timeline=json` events,
//! medians).
//!
//! `ember bench` is the full comparison (containers, density, reports); this
//! is the quick VMM-only check.
//!
//! `cargo bench --bench startup -- [RUNS]` (default 15 runs after 2 warm-ups).
//! Absolute times depend heavily on the host's KVM (hardware VMX/SVM or
//! software like kvm_pvm); compare the ratios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ember::bench::measure::{Summary, launch, pairwise_ratio, parse_timeline};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

#[path = "startup/raw_kvm.rs"]
mod raw_kvm;

/// This binary, re-run as the floor peer: `startup --raw-kvm GUEST MIB CMDLINE`.
const RAW_KVM_ARG: &str = "--raw-kvm";

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    first_byte: Duration,
    exit: Duration,
    max_rss_kib: u64,
}

/// Runs `cmd`, timing its first stdout byte and its exit; peak RSS from wait4
/// (shared with `ember bench`: `ember::bench::measure`).
fn measure(cmd: &mut Command) -> Sample {
    let l = launch(cmd, "", None, |_| {}).expect("spawn");
    let first_byte = l.first_byte.unwrap_or_else(|| panic!("{cmd:?} printed nothing"));
    assert!(l.status < 128, "{cmd:?} died: {}", l.status);
    Sample { first_byte, exit: l.exit, max_rss_kib: l.max_rss_kib }
}

fn stats(v: Vec<f64>) -> (f64, f64, f64, f64) {
    let s = Summary::of(&v).expect("at least one run");
    (s.median, s.min, s.max, s.p95)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn qemu_cmd(guest: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on"])
        .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "16M", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(guest)
        .args(["-append", "bench", "-device", "isa-debug-exit,iobase=0x501,iosize=1"]);
    c
}

fn ember_cmd(guest: &Path, mib: u32) -> Command {
    let mut c = Command::new(EMBER);
    c.args(["run", "--memory", &format!("{mib}M"), "--cmdline", "bench", "--kernel"]).arg(guest);
    c
}

/// The median of the pairwise ratios a[i] / b[i] of one measure of two interleaved sample sets.
fn pairwise(a: &[Sample], b: &[Sample], f: fn(&Sample) -> f64) -> f64 {
    let (a, b): (Vec<f64>, Vec<f64>) = (a.iter().map(f).collect(), b.iter().map(f).collect());
    pairwise_ratio(&a, &b).expect("at least one run").median
}

/// Launch to the first byte on stdout, in ms; then the process is killed (a VMM without an exit device).
/// A VMM that prints nothing within 30 s is killed too, and the bench fails saying so, instead of
/// waiting on the pipe for ever.
fn first_byte_then_kill(cmd: &mut Command) -> f64 {
    use std::io::Read;
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
    let start = std::time::Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let (got_byte, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(PATIENCE).is_err() {
            // SAFETY: kill(2) on our own child, not yet reaped (the main thread waits for this
            // thread before it calls wait()), so the pid still names it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut byte = [0u8; 1];
    let n = child.stdout.as_mut().expect("piped stdout").read(&mut byte).expect("read stdout");
    let t = ms(start.elapsed());
    let _ = got_byte.send(());
    watchdog.join().expect("watchdog");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(n, 1, "{cmd:?} printed nothing (killed after {} s)", PATIENCE.as_secs());
    t
}

fn raw_kvm_cmd(guest: &Path, mib: u32, cmdline: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("this bench's own path"));
    c.arg(RAW_KVM_ARG).arg(guest).arg(mib.to_string()).arg(cmdline);
    c
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(RAW_KVM_ARG) {
        let (Some(guest), Some(mib), Some(cmdline)) = (argv.get(2), argv.get(3), argv.get(4)) else {
            panic!("startup --raw-kvm GUEST MIB CMDLINE");
        };
        let mem = mib.parse::<usize>().expect("MIB") << 20;
        std::process::exit(match raw_kvm::run(Path::new(guest), mem, cmdline) {
            Ok(status) => i32::from(status),
            Err(e) => {
                eprintln!("raw-kvm: {e}");
                125
            }
        });
    }
    let runs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(15);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent — nothing to measure");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let guest: PathBuf = dir.join("hello.elf");
    let ok = Command::new(EMBER).args(["demo", "--save-guest"]).arg(&guest).status().expect("ember");
    assert!(ok.success());
    let have_qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();

    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for i in 0..runs + 2 {
        let e = measure(&mut ember_cmd(&guest, 16));
        let q = have_qemu.then(|| measure(&mut qemu_cmd(&guest)));
        let f = measure(&mut raw_kvm_cmd(&guest, 16, "bench"));
        if i >= 2 {
            samples.entry("ember").or_default().push(e);
            samples.entry("raw-kvm floor").or_default().push(f);
            if let Some(q) = q {
                samples.entry("qemu-microvm").or_default().push(q);
            }
        }
    }

    println!(
        "\n## Tiny guest: ember vs QEMU microvm and the raw KVM floor ({runs} interleaved runs, 16 MiB, 1 vCPU)\n"
    );
    println!(
        "| VMM | first byte ms (median) | min | max | p95 | exit ms (median) | min | max | p95 | peak RSS MiB (median) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut medians = BTreeMap::new();
    for (name, s) in &samples {
        let fb = stats(s.iter().map(|x| ms(x.first_byte)).collect());
        let ex = stats(s.iter().map(|x| ms(x.exit)).collect());
        let rss = stats(s.iter().map(|x| x.max_rss_kib as f64 / 1024.0).collect());
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            fb.0, fb.1, fb.2, fb.3, ex.0, ex.1, ex.2, ex.3, rss.0
        );
        medians.insert(*name, (fb.0, ex.0, rss.0));
    }
    if let (Some(e), Some(q)) = (medians.get("ember"), medians.get("qemu-microvm")) {
        // Pairwise ratios (run i of ember against run i of qemu), then their median.
        let (es, qs) = (&samples["ember"], &samples["qemu-microvm"]);
        let pair = |f: fn(&Sample) -> f64| pairwise(es, qs, f);
        println!(
            "\nember / qemu-microvm (median of pairwise ratios): first byte {:.2}, exit {:.2}, peak RSS {:.2}",
            pair(|s| ms(s.first_byte)),
            pair(|s| ms(s.exit)),
            pair(|s| s.max_rss_kib as f64)
        );
        println!(
            "medians: ember {:.2} / {:.2} ms, {:.2} MiB; qemu-microvm {:.2} / {:.2} ms, {:.2} MiB",
            e.0, e.1, e.2, q.0, q.1, q.2
        );
    } else {
        println!("\n(qemu-system-x86_64 not found: install qemu-system-x86 to compare)");
    }
    {
        let (es, fs) = (&samples["ember"], &samples["raw-kvm floor"]);
        let pair = |f: fn(&Sample) -> f64| pairwise(es, fs, f);
        let above = |f: fn(&Sample) -> f64| stats(es.iter().zip(fs).map(|(a, b)| f(a) - f(b)).collect()).0;
        println!(
            "ember / raw-kvm floor (median of pairwise ratios): first byte {:.2}, exit {:.2}; \
             ember above the floor (median of pairwise differences): {:+.2} ms first byte, {:+.2} ms exit",
            pair(|s| ms(s.first_byte)),
            pair(|s| ms(s.exit)),
            above(|s| ms(s.first_byte)),
            above(|s| ms(s.exit))
        );
    }

    // The tiny tier's guest (`ember bench --tier tiny`: `echo`, 32 MiB, one line out): ember against
    // the floor. A VMM cannot start and exit this guest faster here than the floor does.
    let echo = dir.join("echo.elf");
    let ok = Command::new(EMBER).args(["demo", "--save-guest"]).arg(&echo).args(["--guest", "echo"]).status();
    assert!(ok.expect("ember").success());
    // With EMBER_BENCH_FIRECRACKER (a binary built outside this repo, as for boot_compare), Firecracker
    // boots the same PVH guest too. It has no exit device: only its first byte is timed.
    let firecracker = std::env::var("EMBER_BENCH_FIRECRACKER").ok().filter(|p| !p.is_empty()).map(|fc| {
        let config = dir.join("firecracker.json");
        let json = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}","boot_args":"bench"}},"drives":[],
                "machine-config":{{"vcpu_count":1,"mem_size_mib":32}}}}"#,
            echo.display()
        );
        std::fs::write(&config, json).expect("Firecracker's config");
        move || {
            let mut c = Command::new(&fc);
            c.args(["--no-api", "--level", "Error", "--config-file"]).arg(&config);
            c
        }
    });
    let (mut es, mut fs, mut fcs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs + 2 {
        let e = measure(&mut ember_cmd(&echo, 32));
        let f = measure(&mut raw_kvm_cmd(&echo, 32, "bench"));
        let c = firecracker.as_ref().map(|fc| first_byte_then_kill(&mut fc()));
        if i >= 2 {
            es.push(e);
            fs.push(f);
            fcs.extend(c);
        }
    }
    println!("\n## The tiny tier's echo guest: ember against the raw KVM floor ({runs} interleaved runs, 32 MiB)\n");
    println!("| | first byte ms (median) | p95 | exit ms (median) | p95 |");
    println!("|---|---|---|---|---|");
    for (name, s) in [("ember", &es), ("raw-kvm floor", &fs)] {
        let fb = stats(s.iter().map(|x| ms(x.first_byte)).collect());
        let ex = stats(s.iter().map(|x| ms(x.exit)).collect());
        println!("| {name} | {:.2} | {:.2} | {:.2} | {:.2} |", fb.0, fb.3, ex.0, ex.3);
    }
    println!(
        "\nember / floor (median of pairwise ratios): first byte {:.2}, exit {:.2}",
        pairwise(&es, &fs, |s| ms(s.first_byte)),
        pairwise(&es, &fs, |s| ms(s.exit))
    );
    if !fcs.is_empty() {
        let fb = |s: &[f64]| stats(s.to_vec()).0;
        let ember_fb: Vec<f64> = es.iter().map(|x| ms(x.first_byte)).collect();
        let ratio = pairwise_ratio(&ember_fb, &fcs).expect("at least one run").median;
        println!(
            "Firecracker, the same guest: first byte {:.2} ms (median); ember / Firecracker (pairwise): {ratio:.2}",
            fb(&fcs)
        );
    }

    // The host kernel's share. A VM's creation and teardown flip KVM static keys when it is the only
    // VM on the host (`preempt_notifier_key`, `kvm_has_noapic_vcpu`: lane/keeper.rs), and each flip
    // rewrites kernel text on every CPU. On a host that already runs a VM nothing flips. Interleaved:
    // ember alone, ember while this process holds two idle VMs (the lane keeper's), and /bin/true
    // (process start and exit, no VM).
    let mut alone = Vec::new();
    let mut resident = Vec::new();
    let mut process = Vec::new();
    for _ in 0..runs {
        alone.push(ms(measure(&mut ember_cmd(&guest, 16)).exit));
        let held = ember::lane::keeper::hold().expect("two idle VMs");
        resident.push(ms(measure(&mut ember_cmd(&guest, 16)).exit));
        drop(held);
        let l = launch(Command::new("/bin/true").arg("x"), "", None, |_| {}).expect("spawn /bin/true");
        process.push(ms(l.exit));
    }
    let (a, r, p) = (stats(alone.clone()).0, stats(resident.clone()).0, stats(process).0);
    println!("\n## The host kernel's share ({runs} interleaved runs, exit ms, medians)\n");
    println!("| ember, the only VM | ember, another VM resident | /bin/true |");
    println!("|---|---|---|");
    println!("| {a:.2} | {r:.2} | {p:.2} |");
    let pair = pairwise_ratio(&resident, &alone).expect("at least one run").median;
    println!("\nresident / alone (median of pairwise ratios): {pair:.2}; static-key flips cost about {:.2} ms", a - r);

    // Where ember's time goes, from its own timeline.
    let mut events: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for _ in 0..runs {
        let out = Command::new(EMBER)
            .args(["run", "--memory", "16M", "--serial", "none", "--timeline=json", "--kernel"])
            .arg(&guest)
            .output()
            .expect("ember");
        for (n, a) in parse_timeline(&String::from_utf8_lossy(&out.stderr)) {
            if !order.contains(&n) {
                order.push(n.clone());
            }
            events.entry(n).or_default().push(a);
        }
    }
    println!("\n## Inside ember (median ms since ember's main(), {runs} runs)\n");
    println!("| event | at ms | step ms |");
    println!("|---|---|---|");
    let mut prev = 0.0;
    for n in &order {
        let m = stats(events[n].clone()).0;
        println!("| {n} | {m:.3} | {:.3} |", m - prev);
        prev = m;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
