//! ember against QEMU `-M microvm` booting the same Linux: the same bzImage, initramfs and kernel
//! command line, the same memory and vCPUs, in the Linux lane (`ember::lane`), interleaved
//! (ember, QEMU, QEMU, ember, ...) so drift on a busy machine hits both.
//!
//! Measured per boot, for 1 and 2 vCPUs: launch to the init's `ember-init: ready` line on the serial
//! console, and launch to the VMM's exit (the init runs `true` and writes its status to port 0x501:
//! ember's exit device, QEMU's `isa-debug-exit`). Reported: medians and the median of the pairwise
//! ratios ember/QEMU of each round (the figure to read: absolute times in the nested lane are TCG's).
//!
//! Then, where a difference lives: each VMM boots the guest once more per round with `dmesg` as the
//! command (the VMM is stopped once the whole ring buffer is on the console), and the guests' own
//! printk timestamps are cut into phases at lines both kernels print (CPU set-up, timer set-up, SMP
//! bring-up, ...), with the lines only one of the two printed and the largest gaps between
//! consecutive lines. A regression shows as the phase that grew.
//!
//! The timing is done inside the lane's machine, next to the VMM: this bench binary runs itself there
//! (`--probe CMD...`: spawn, watch stdout, report), so the lane's transport is not counted.
//!
//! With `EMBER_BENCH_FIRECRACKER=/path/to/firecracker` (a binary built or installed outside this
//! repo: Debian has no package), a second pair joins every round: ember and Firecracker booting the
//! same vmlinux (Firecracker's x86 loader takes an ELF, not a bzImage), initramfs and command line,
//! Firecracker with `--no-api --config-file`. Firecracker has no exit device: its guest's init finds
//! port 0x501 dead and ends the VM with `reboot -f` through the i8042, as it would on any machine.
//!
//! `cargo bench --bench boot_compare -- [RUNS]` (default 2 rounds: a smoke test; 5+ for figures).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember::guest::{GuestArtifacts, default_guest, encode_argv};
use ember::lane::{Invocation, LaneError, LinuxLane, Outcome};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

/// The line the default guest's init prints (with `ember.debug`) when it is about to run the command.
const READY: &str = "ember-init: ready";

/// The dmesg boots' command. `dmesg` returns once its output is in the tty's buffer, not on the wire,
/// and the init then ends the VM: the tail would be lost. So the guest prints a marker after it and
/// waits; the probe stops the VMM when the marker arrives.
const DMESG_COMMAND: &[&str] = &["sh", "-c", "dmesg; echo boot-compare: dmesg done; sleep 600"];
const DMESG_DONE: &str = "boot-compare: dmesg done";

/// Guest memory for both VMMs (ember's default).
const MEMORY_MIB: u32 = 256;

/// The two VMMs, in the order of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Vmm {
    Ember,
    Qemu,
    /// ember booting the vmlinux, Firecracker's peer.
    EmberElf,
    Firecracker,
}

/// Where Firecracker's configuration for `cpus` vCPUs is written (removed at the end of the run).
fn firecracker_config(cpus: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("boot-compare-fc-{}-{cpus}.json", std::process::id()))
}

/// The Firecracker binary to compare with (`EMBER_BENCH_FIRECRACKER`), if any.
fn firecracker() -> Option<String> {
    std::env::var("EMBER_BENCH_FIRECRACKER").ok().filter(|p| !p.is_empty())
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ember => "ember",
            Vmm::Qemu => "qemu-microvm",
            Vmm::EmberElf => "ember-vmlinux",
            Vmm::Firecracker => "firecracker",
        }
    }

    /// The exit status of a guest whose command exited 0: QEMU's isa-debug-exit exits `(v << 1) | 1`;
    /// Firecracker exits 0 when the guest resets through the i8042.
    fn ok_status(self) -> i32 {
        match self {
            Vmm::Ember | Vmm::EmberElf | Vmm::Firecracker => 0,
            Vmm::Qemu => 1,
        }
    }

    /// The command line that boots `g` with `command` in the guest on `cpus` vCPUs.
    fn argv(self, g: &GuestArtifacts, cpus: u32, command: &[&str]) -> Vec<OsString> {
        let argv = encode_argv(command).expect("no NUL in the bench commands");
        let cmdline = format!("{} {argv}", ember::guest::debug_cmdline());
        let mut v: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| v.extend(items.iter().map(OsString::from));
        match self {
            Vmm::Ember | Vmm::EmberElf => {
                // No virtio-rng: QEMU gets no devices either, and the command line stays identical
                // (ember announces virtio devices on it).
                push(&[EMBER, "run", "--no-rng", "--cpus", &cpus.to_string(), "--memory", &format!("{MEMORY_MIB}M")]);
                push(&["--cmdline", &cmdline, "--kernel"]);
                v.push(if self == Vmm::Ember { g.bzimage.clone() } else { g.vmlinux.clone() }.into());
                v.push("--initrd".into());
                v.push(g.initramfs.clone().into());
            }
            Vmm::Qemu => {
                push(&[
                    "qemu-system-x86_64",
                    "-M",
                    "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host",
                    "-m",
                    &format!("{MEMORY_MIB}M"),
                    "-smp",
                    &cpus.to_string(),
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                    "-device",
                    "isa-debug-exit,iobase=0x501,iosize=1",
                    "-kernel",
                ]);
                v.push(g.bzimage.clone().into());
                v.push("-initrd".into());
                v.push(g.initramfs.clone().into());
                v.push("-append".into());
                v.push(cmdline.into());
            }
            Vmm::Firecracker => {
                // Firecracker's configuration file (its API's PUT bodies in one document), where the
                // lane's machine can read it: the host's temporary directory.
                let config = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": g.vmlinux,
                        "initrd_path": g.initramfs,
                        "boot_args": cmdline,
                    },
                    "drives": [],
                    "machine-config": { "vcpu_count": cpus, "mem_size_mib": MEMORY_MIB },
                });
                let path = firecracker_config(cpus);
                std::fs::write(&path, config.to_string()).expect("write Firecracker's config");
                let fc = firecracker().expect("only with EMBER_BENCH_FIRECRACKER");
                push(&[&fc, "--no-api", "--level", "Error", "--config-file"]);
                v.push(path.into());
            }
        }
        v
    }
}

/// One boot as the probe saw it.
#[derive(Clone, Debug, Default)]
struct Boot {
    ready_ms: Option<f64>,
    exit_ms: f64,
    status: i32,
    console: String,
    /// The VMM's last line on stderr before the probe's report (why a failed boot ended).
    last_error: String,
}

/// Probe side (inside the lane's machine): runs `argv`, timestamps the ready line and the exit, and
/// prints `probe ready_ms=.. exit_ms=.. status=..` on stderr and the console on stdout. With
/// `--until MARKER` first, the VMM is killed once MARKER has appeared on its console.
fn probe(mut argv: &[OsString]) -> ! {
    let mut until = None;
    if argv.first().is_some_and(|a| a == "--until") {
        until = Some(argv[1].to_string_lossy().into_owned());
        argv = &argv[2..];
    }
    let start = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", argv[0]));
    let mut out = child.stdout.take().expect("piped");
    let mut console = Vec::new();
    let mut ready = None;
    let mut buf = [0u8; 4096];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                console.extend_from_slice(&buf[..n]);
                // Only the tail can newly contain the marker.
                let from = console.len().saturating_sub(n + READY.len());
                if ready.is_none() && console[from..].windows(READY.len()).any(|w| w == READY.as_bytes()) {
                    ready = Some(start.elapsed());
                }
                if let Some(m) = &until {
                    let from = console.len().saturating_sub(n + m.len());
                    if console[from..].windows(m.len()).any(|w| w == m.as_bytes()) {
                        let _ = child.kill();
                        break;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the console: {e}"),
        }
    }
    let status = child.wait().expect("wait");
    let exit = start.elapsed();
    use std::io::Write;
    let _ = std::io::stdout().write_all(&console);
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "probe ready_ms={} exit_ms={:.3} status={code}",
        ready.map_or("none".to_string(), |d| format!("{:.3}", ms(d))),
        ms(exit)
    );
    std::process::exit(0)
}

/// Host side: one boot through the lane (retried once on a fresh outer machine if the lane wedges,
/// as the lane tests do: that is the test machine failing, not a VMM).
fn boot(lane: &mut LinuxLane, vmm: Vmm, g: &GuestArtifacts, cpus: u32, command: &[&str]) -> Boot {
    let me = std::env::current_exe().expect("own path");
    let dmesg = command == DMESG_COMMAND;
    let mut args: Vec<OsString> = vec!["--probe".into()];
    if dmesg {
        args.extend(["--until".into(), DMESG_DONE.into()]);
    }
    let mut inv = Invocation::new(args.into_iter().chain(vmm.argv(g, cpus, command)));
    inv.env.push(("RUST_BACKTRACE".into(), "1".into()));
    let timeout = Duration::from_secs(300);
    let out: Outcome = match lane.run_program(&me, &inv, timeout) {
        Ok(o) => o,
        Err(e @ LaneError::Wedged { .. }) => {
            eprintln!("LANE: the outer machine stopped answering ({e}); retrying once");
            lane.run_program(&me, &inv, timeout).unwrap_or_else(|e| panic!("{} (second try): {e}", vmm.name()))
        }
        Err(e) => panic!("{}: {e}", vmm.name()),
    };
    let err = out.stderr_lossy();
    let line = err.lines().rev().find(|l| l.starts_with("probe ")).unwrap_or_else(|| {
        panic!("{}: the probe reported nothing (status {})\n{err}\n{}", vmm.name(), out.status, out.stdout_lossy())
    });
    let field = |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(k)).unwrap_or("none").to_string();
    let b = Boot {
        ready_ms: field("ready_ms=").parse().ok(),
        exit_ms: field("exit_ms=").parse().expect("exit_ms"),
        status: field("status=").parse().expect("status"),
        console: out.stdout_lossy(),
        last_error: err
            .lines()
            .rev()
            .find(|l| !l.starts_with("probe ") && !l.trim().is_empty())
            .unwrap_or("")
            .to_string(),
    };
    if dmesg {
        // A dmesg boot that did not finish is the caller's to count (see `dmesg_boot`).
        return b;
    }
    assert_eq!(b.status, vmm.ok_status(), "{} {cpus} vCPU(s) failed:\n{err}\n{}", vmm.name(), b.console);
    assert!(b.ready_ms.is_some(), "{}: no `{READY}` line:\n{}", vmm.name(), b.console);
    b
}

/// One dmesg boot, tried again once when it ended before its whole log was out: in the nested lane a
/// guest that prints this much was seen to triple-fault or hang now and then (issue #15, README). Each
/// failure is counted in `failed` (tries, reasons) for the report, so the bench measures the defect's
/// rate instead of dying of it; `None` when both tries failed.
fn dmesg_boot(
    lane: &mut LinuxLane,
    vmm: Vmm,
    g: &GuestArtifacts,
    cpus: u32,
    failed: &mut (u32, Vec<String>),
) -> Option<Boot> {
    for _ in 0..2 {
        let b = boot(lane, vmm, g, cpus, DMESG_COMMAND);
        failed.0 += 1;
        if b.console.contains(DMESG_DONE) {
            return Some(b);
        }
        let lines = b.console.lines().count();
        let why = format!("{cpus} vCPU(s), status {}, after {lines} lines of log: {}", b.status, b.last_error);
        eprintln!("{} dmesg boot failed ({why}): the lane's known crash (#15)", vmm.name());
        failed.1.push(why);
    }
    None
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One boot's kernel log: (printk time in ms, text) per line.
type Dmesg = Vec<(f64, String)>;

/// `[    1.234567] text` -> (1234.567 ms, text).
fn parse_dmesg(console: &str) -> Dmesg {
    console
        .lines()
        .filter_map(|l| {
            let l = l.trim_end_matches('\r');
            let rest = l.trim_start().strip_prefix('[')?;
            let (ts, text) = rest.split_once(']')?;
            Some((ts.trim().parse::<f64>().ok()? * 1e3, text.trim().to_string()))
        })
        .collect()
}

/// Phase boundaries: the first dmesg line containing the marker. Each phase runs from the previous
/// boundary found to this one.
const PHASES: &[(&str, &str)] = &[
    ("early set-up: memory map, MP table, kvmclock", "Kernel command line:"),
    ("page allocator", "Memory:"),
    ("SLUB, RCU, IRQs", "NR_IRQS"),
    ("console, LAPIC and IO-APIC set-up", "APIC: Switch to symmetric I/O mode setup"),
    ("IO-APIC timer check, delay loop", "Calibrating delay loop"),
    ("CPU bugs, FPU/XSAVE, alternatives", "Mount-cache hash table"),
    ("LAPIC timer calibration", "smpboot: CPU0:"),
    ("SMP bring-up", "smp: Brought up"),
    ("devtmpfs, core initcalls", "clocksource: Switched to clocksource"),
    ("fs, net, driver initcalls", "Freeing unused kernel image"),
    ("to /init", "Run /init"),
];

/// Times (ms) at which each phase ends in one dmesg, `None` where the marker is missing.
fn phase_ends(lines: &[(f64, String)]) -> Vec<Option<f64>> {
    PHASES.iter().map(|(_, m)| lines.iter().find(|(_, t)| t.contains(m)).map(|(ts, _)| *ts)).collect()
}

/// Durations of the phases (from the previous marker found, or 0).
fn phase_durations(ends: &[Option<f64>]) -> Vec<Option<f64>> {
    let mut prev = 0.0;
    ends.iter()
        .map(|e| {
            e.map(|t| {
                let d = t - prev;
                prev = t;
                d
            })
        })
        .collect()
}

/// A dmesg line with its numbers blanked, so the same message compares equal across VMMs.
fn shape(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    let mut in_num = false;
    for c in text.chars() {
        if c.is_ascii_hexdigit() && (in_num || c.is_ascii_digit()) {
            if !in_num {
                s.push('#');
            }
            in_num = true;
        } else {
            in_num = false;
            s.push(c);
        }
    }
    s
}

/// The `n` largest gaps before a line: (gap ms, at ms, line).
fn largest_gaps(lines: &[(f64, String)], n: usize) -> Vec<(f64, f64, String)> {
    let mut gaps: Vec<(f64, f64, String)> =
        lines.windows(2).map(|w| (w[1].0 - w[0].0, w[1].0, w[1].1.clone())).collect();
    gaps.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("no NaN"));
    gaps.truncate(n);
    gaps
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--probe") {
        probe(&args[i + 1..]);
    }
    let runs: usize = args.iter().find_map(|a| a.to_str()?.parse().ok()).unwrap_or(2).max(1);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent — nothing to measure");
        return;
    }
    let have_qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_qemu {
        eprintln!("SKIPPED: qemu-system-x86_64 not installed — no peer to compare with");
        return;
    }
    let g = default_guest(false).unwrap_or_else(|e| panic!("default guest: {e}"));
    let mut lane = LinuxLane::start(Path::new(EMBER)).unwrap_or_else(|e| panic!("lane: {e}"));
    println!("\n## Default guest: ember vs QEMU microvm ({runs} interleaved rounds)\n");
    println!("lane: {}", lane.describe());
    println!("kernel: {} ({}), initramfs: {}", g.bzimage.display(), g.kernel_release, g.initramfs.display());
    println!(
        "command line: {} ember.argv=<command>; {MEMORY_MIB} MiB; ember --no-rng\n",
        ember::guest::debug_cmdline()
    );

    // (cpus, vmm) -> boots; dmesg boots apart.
    let mut timed: BTreeMap<(u32, Vmm), Vec<Boot>> = BTreeMap::new();
    let mut dmesg: BTreeMap<(u32, Vmm), Vec<Dmesg>> = BTreeMap::new();
    let mut pairs = vec![(Vmm::Ember, Vmm::Qemu)];
    if let Some(fc) = firecracker() {
        println!("firecracker: {fc}; its pair boots the vmlinux: {}\n", g.vmlinux.display());
        pairs.push((Vmm::EmberElf, Vmm::Firecracker));
    }
    let vmms: Vec<Vmm> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    // Per VMM: (dmesg boots tried, the ones that ended before their log was out).
    let mut failed: BTreeMap<Vmm, (u32, Vec<String>)> = BTreeMap::new();
    for round in 0..runs {
        for cpus in [1, 2] {
            // Alternate who goes first, so neither always boots on a cache the other warmed.
            let mut order = vmms.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &vmm in &order {
                let b = boot(&mut lane, vmm, &g, cpus, &["true"]);
                eprintln!(
                    "round {round} {cpus} vCPU {:12} ready {:8.1} ms  exit {:8.1} ms",
                    vmm.name(),
                    b.ready_ms.unwrap_or(f64::NAN),
                    b.exit_ms
                );
                timed.entry((cpus, vmm)).or_default().push(b);
            }
            for &vmm in &order {
                let samples = dmesg.entry((cpus, vmm)).or_default();
                if let Some(b) = dmesg_boot(&mut lane, vmm, &g, cpus, failed.entry(vmm).or_default()) {
                    samples.push(parse_dmesg(&b.console));
                }
            }
        }
    }

    for &(mine, peer) in &pairs {
        report_pair(mine, peer, runs, &timed, &dmesg);
    }
    println!("\n### dmesg boots that ended before the whole log was out (the lane's known crash, issue #15)\n");
    for (vmm, (tried, why)) in &failed {
        println!("- {}: {} of {tried}{}", vmm.name(), why.len(), if why.is_empty() { "" } else { ":" });
        for w in why {
            println!("  - {w}");
        }
    }
    for cpus in [1, 2] {
        let _ = std::fs::remove_file(firecracker_config(cpus));
    }
    println!(
        "\nRatios are ember / its peer per round, then the median; times are launch-to-event inside the lane's machine."
    );
}

/// The tables of one pair: times and ratios, then where the guests' boots differ.
fn report_pair(
    e_vmm: Vmm,
    q_vmm: Vmm,
    runs: usize,
    timed: &BTreeMap<(u32, Vmm), Vec<Boot>>,
    dmesg: &BTreeMap<(u32, Vmm), Vec<Dmesg>>,
) {
    let (en, qn) = (e_vmm.name(), q_vmm.name());
    println!("\n## {en} against {qn}\n");
    println!(
        "| vCPUs | VMM | ready ms (median) | exit ms (median) | ready {en}/{qn} (pairwise median) | exit {en}/{qn} |"
    );
    println!("|---|---|---|---|---|---|");
    for cpus in [1, 2] {
        let e = &timed[&(cpus, e_vmm)];
        let q = &timed[&(cpus, q_vmm)];
        let ready = |b: &Boot| b.ready_ms.expect("checked in boot()");
        let r_ratio = median(e.iter().zip(q).map(|(e, q)| ready(e) / ready(q)).collect());
        let x_ratio = median(e.iter().zip(q).map(|(e, q)| e.exit_ms / q.exit_ms).collect());
        for (vmm, boots) in [(e_vmm, e), (q_vmm, q)] {
            let ratios = if vmm == e_vmm {
                (format!("**{r_ratio:.2}x**"), format!("**{x_ratio:.2}x**"))
            } else {
                ("1.00x".into(), "1.00x".into())
            };
            println!(
                "| {cpus} | {} | {:.1} | {:.1} | {} | {} |",
                vmm.name(),
                median(boots.iter().map(ready).collect()),
                median(boots.iter().map(|b| b.exit_ms).collect()),
                ratios.0,
                ratios.1
            );
        }
    }

    for cpus in [1, 2] {
        println!(
            "\n### {cpus} vCPU(s): phases from the guests' dmesg (ms, medians over the complete boots of {runs} rounds)\n"
        );
        println!("| phase (ends at the line) | {en} | {qn} | {en} - {qn} |");
        println!("|---|---|---|---|");
        let med = |vmm: Vmm| -> Vec<Option<f64>> {
            let per_boot: Vec<Vec<Option<f64>>> =
                dmesg[&(cpus, vmm)].iter().map(|l| phase_durations(&phase_ends(l))).collect();
            (0..PHASES.len())
                .map(|i| {
                    let v: Vec<f64> = per_boot.iter().filter_map(|p| p[i]).collect();
                    (!v.is_empty()).then(|| median(v))
                })
                .collect()
        };
        let (e, q) = (med(e_vmm), med(q_vmm));
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for (i, (label, marker)) in PHASES.iter().enumerate() {
            let diff = match (e[i], q[i]) {
                (Some(a), Some(b)) => format!("{:+.1}", a - b),
                _ => "-".into(),
            };
            println!("| {label} (`{marker}`) | {} | {} | {diff} |", cell(e[i]), cell(q[i]));
        }
        let last = |vmm: Vmm| median(dmesg[&(cpus, vmm)].iter().filter_map(|l| l.last().map(|x| x.0)).collect());
        let (le, lq) = (last(e_vmm), last(q_vmm));
        println!("| last dmesg line | {le:.1} | {lq:.1} | {:+.1} |", le - lq);

        // What differs, from the last dmesg boot of each.
        let (de, dq) = (&dmesg[&(cpus, e_vmm)], &dmesg[&(cpus, q_vmm)]);
        let (Some(le), Some(lq)) = (de.last(), dq.last()) else {
            println!("\n(no complete dmesg boot of one of the two: nothing to compare)");
            continue;
        };
        for (vmm, mine, other) in [(e_vmm, le, lq), (q_vmm, lq, le)] {
            let theirs: std::collections::BTreeSet<String> = other.iter().map(|(_, t)| shape(t)).collect();
            let only: Vec<&(f64, String)> = mine.iter().filter(|(_, t)| !theirs.contains(&shape(t))).collect();
            println!("\nOnly under {} ({} lines):", vmm.name(), only.len());
            for (ts, t) in only.iter().take(25) {
                println!("    [{ts:9.1}] {t}");
            }
        }
        for (vmm, lines) in [(e_vmm, le), (q_vmm, lq)] {
            println!("\nLargest gaps under {} (ms before the line):", vmm.name());
            for (gap, ts, t) in largest_gaps(lines, 6) {
                println!("    {gap:7.1} -> [{ts:9.1}] {t}");
            }
        }
    }
}
