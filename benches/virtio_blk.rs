//! virtio-blk speed, against the host reading the same file.
//!
//! 1. Fast lane (always): the cost of one request round trip, notify to used,
//!    measured with the freestanding guest tests/guests/virtio_blk.S in
//!    `reqs=N` mode (N reads of one sector, polled): (time(N) - time(0)) / N,
//!    medians of interleaved runs, next to one 512-byte pread on the host.
//!    Under kvm_pvm the guest's own instructions run in KVM's emulator, so
//!    this is an upper bound on ember's share.
//! 2. Linux lane (`cargo bench --bench virtio_blk -- --linux`): the default
//!    guest with a 64 MiB raw data disk (/dev/vda) and the tools image
//!    (guest-kernels/tools.sh, /dev/vdb): one fio run (see [`FIO_JOBS`]):
//!    sequential read and write MiB/s (bs=1M, direct=1) and 4 KiB random-read
//!    IOPS (direct=1, libaio, iodepth 1 and 16; the guest kernel has AIO but
//!    no io_uring). The same fio jobs run against the same image file on the
//!    host and, in the nested lane, also in the outer machine (whose file
//!    system the inner ember's backend reads the image through), as ratios.
//!    If the tools image cannot be built or fio fails in the guest, the old
//!    busybox dd measurement runs instead (4 KiB reads at sequential offsets).
//!
//! Absolute numbers depend on the host's KVM and on the lane (a nested QEMU
//! TCG machine on kvm_pvm hosts): read the ratios, and the lane named in the output.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

#[path = "../tests/guests/assemble.rs"]
mod assemble;

fn build_guest(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let obj = dir.join("virtio_blk.o");
    let elf = dir.join("virtio_blk.elf");
    assemble::assemble_and_link(&src.join("virtio_blk.S"), &[&src], &src.join("guest.ld"), &obj, &elf)
        .unwrap_or_else(|e| panic!("{e}"));
    elf
}

fn run_reqs(guest: &Path, image: &Path, n: u64) -> Duration {
    let start = Instant::now();
    let out = Command::new(EMBER)
        .arg("run")
        .arg("--kernel")
        .arg(guest)
        .arg("--disk")
        .arg(image)
        .args(["--serial", "stdio", "--cmdline", &format!("reqs={n}")])
        .stdin(Stdio::null())
        .output()
        .expect("run ember");
    let t = start.elapsed();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("reqs done"), "{out:?}");
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn fast_lane(dir: &Path, runs: usize) {
    let guest = build_guest(dir);
    let image = dir.join("small.img");
    std::fs::write(&image, vec![7u8; 64 * 512]).expect("write the image");
    let n = 20_000u64;
    let (mut zero, mut many) = (Vec::new(), Vec::new());
    for i in 0..runs + 1 {
        let z = run_reqs(&guest, &image, 0);
        let m = run_reqs(&guest, &image, n);
        if i > 0 {
            zero.push(z.as_secs_f64());
            many.push(m.as_secs_f64());
        }
    }
    let per_req_us = (median(many) - median(zero)) / n as f64 * 1e6;

    let f = std::fs::File::open(&image).expect("open");
    let mut buf = [0u8; 512];
    let reps = 200_000;
    let start = Instant::now();
    for _ in 0..reps {
        f.read_exact_at(&mut buf, 0).expect("pread");
    }
    let pread_us = start.elapsed().as_secs_f64() / f64::from(reps) * 1e6;

    println!("\n## virtio-blk request round trip, fast lane ({runs} interleaved runs, {n} requests each)\n");
    println!("| path | µs per request | ratio to host pread |");
    println!("|---|---|---|");
    println!(
        "| guest: notify (ioeventfd) -> event loop -> pread -> used ring, polled | {per_req_us:.2} | {:.1}x |",
        per_req_us / pread_us
    );
    println!("| host: pread of 512 bytes (page cache) | {pread_us:.2} | 1.0x |");
}

/// MiB/s and 4 KiB reads/s of the host reading `image` (page cache, like the guest's backend).
fn host_figures(image: &Path) -> (f64, f64) {
    let f = std::fs::File::open(image).expect("open");
    let len = f.metadata().expect("stat").len();
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut off = 0;
    while off < len {
        f.read_exact_at(&mut buf, off).expect("read");
        off += buf.len() as u64;
    }
    let seq = len as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    let mut small = [0u8; 4096];
    let start = Instant::now();
    let count = len / 4096;
    for i in 0..count {
        f.read_exact_at(&mut small, i * 4096).expect("read");
    }
    (seq, count as f64 / start.elapsed().as_secs_f64())
}

/// The fio jobs, run one after the other (`stonewall`) against `--filename`. Global options come
/// before the first `--name`. Sequential jobs stop after 64 MiB or 30 s, random ones run 5 s.
const FIO_JOBS: &str = "--output-format=terse --terse-version=3 --direct=1 --ioengine=libaio --size=64M \
     --runtime=30 --name=seqread --rw=read --bs=1M --name=seqwrite --stonewall --rw=write --bs=1M \
     --name=randread-qd1 --stonewall --rw=randread --bs=4k --iodepth=1 --runtime=5 --time_based \
     --name=randread-qd16 --stonewall --rw=randread --bs=4k --iodepth=16 --runtime=5 --time_based";

/// One fio job's result: (read KiB/s, read IOPS, write KiB/s, write IOPS), from a terse v3 line
/// (`3;fio-3.33;JOB;...`: fields 7 and 8 read bandwidth and IOPS, 48 and 49 write).
fn parse_fio(out: &str) -> std::collections::HashMap<String, (f64, f64, f64, f64)> {
    let mut m = std::collections::HashMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.trim().split(';').collect();
        if f.len() < 49 || f[0] != "3" || !f[1].starts_with("fio-") {
            continue;
        }
        let n = |i: usize| f[i - 1].parse::<f64>().unwrap_or(f64::NAN);
        m.insert(f[2].to_string(), (n(7), n(8), n(48), n(49)));
    }
    m
}

/// The fio figures of one place: seq read MiB/s, seq write MiB/s, 4k IOPS at qd1 and qd16.
fn fio_figures(out: &str) -> Option<[f64; 4]> {
    let m = parse_fio(out);
    Some([
        m.get("seqread")?.0 / 1024.0,
        m.get("seqwrite")?.2 / 1024.0,
        m.get("randread-qd1")?.1,
        m.get("randread-qd16")?.1,
    ])
}

/// Writes the 64 MiB data image (non-zero, so nothing can be sparse-skipped).
fn write_image(image: &Path, mib: u32) {
    let mut f = std::fs::File::create(image).expect("create");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    for _ in 0..mib {
        f.write_all(&chunk).expect("write");
    }
}

fn linux_lane(dir: &Path) {
    use ember::lane::LinuxLane;
    let mut lane = LinuxLane::start(Path::new(EMBER)).unwrap_or_else(|e| panic!("the Linux lane cannot start: {e}"));
    let image = dir.join("data.img");
    let mib = 64;
    write_image(&image, mib);
    match ember::guest::default_tools() {
        Ok(tools) => {
            if linux_lane_fio(&mut lane, &image, &tools) {
                return;
            }
            println!("\n(fio did not run in the guest: falling back to busybox dd)");
            write_image(&image, mib);
        }
        Err(e) => println!("\n(no tools image: {e}; falling back to busybox dd)"),
    }
    linux_lane_dd(&mut lane, &image, mib);
}

/// fio in the guest, on the host and (nested lane) in the outer machine. False when the guest's fio
/// gave no figures.
fn linux_lane_fio(lane: &mut ember::lane::LinuxLane, image: &Path, tools: &Path) -> bool {
    use ember::lane::Invocation;
    let disk = image.to_str().expect("UTF-8 path").to_string();
    let tools_disk = format!("{},ro", tools.to_str().expect("UTF-8 path"));
    let script = format!("mount -o ro /dev/vdb /mnt && /mnt/bin/fio --filename=/dev/vda {FIO_JOBS}");
    let o = lane
        .run_with_timeout(
            &Invocation::new([
                "run",
                "--memory",
                "512M",
                "--disk",
                &disk,
                "--disk",
                &tools_disk,
                "--",
                "sh",
                "-c",
                &script,
            ]),
            Duration::from_secs(600),
        )
        .expect("run ember in the lane");
    let Some(guest) = fio_figures(&o.stdout_lossy()) else {
        println!("\nfio in the guest gave no figures: status {}\n{}\n{}", o.status, o.stdout_lossy(), o.stderr_lossy());
        return false;
    };
    let host_fio = |args: &mut Command| -> Option<[f64; 4]> {
        let out = args.output().ok()?;
        fio_figures(&String::from_utf8_lossy(&out.stdout))
    };
    let jobs: Vec<String> = FIO_JOBS.split_whitespace().map(str::to_string).collect();
    let host = host_fio(Command::new("fio").arg(format!("--filename={disk}")).args(&jobs));
    let nested = lane.describe().starts_with("nested");
    let outer = if nested {
        let mut args = vec![format!("--filename={disk}")];
        args.extend(jobs.iter().cloned());
        lane.run_program(Path::new("/usr/bin/fio"), &Invocation::new(args), Duration::from_secs(600))
            .ok()
            .and_then(|o| fio_figures(&o.stdout_lossy()))
    } else {
        None
    };
    println!("\n## virtio-blk in the Linux lane, fio (libaio, direct=1, 64 MiB raw image): {}\n", lane.describe());
    if nested {
        println!(
            "| test | guest (ember) | outer machine, same file | guest / outer | host, same file | guest / host |"
        );
        println!("|---|---|---|---|---|---|");
    } else {
        println!("| test | guest (ember) | host, same file | guest / host |");
        println!("|---|---|---|---|");
    }
    let names = [
        "sequential read, bs=1M",
        "sequential write, bs=1M",
        "4k random read, iodepth 1",
        "4k random read, iodepth 16",
    ];
    let units = ["MiB/s", "MiB/s", "IOPS", "IOPS"];
    let cell = |v: Option<f64>, unit: &str| v.map_or("n/a".to_string(), |v| format!("{v:.1} {unit}"));
    let ratio = |g: f64, r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{:.1}%", 100.0 * g / r));
    for i in 0..4 {
        let (g, h, u) = (guest[i], host.map(|h| h[i]), outer.map(|o| o[i]));
        if nested {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                names[i],
                cell(Some(g), units[i]),
                cell(u, units[i]),
                ratio(g, u),
                cell(h, units[i]),
                ratio(g, h)
            );
        } else {
            println!("| {} | {} | {} | {} |", names[i], cell(Some(g), units[i]), cell(h, units[i]), ratio(g, h));
        }
    }
    true
}

/// busybox dd in the guest (no fio): bs=1M O_DIRECT read and write, 4 KiB O_DIRECT reads at
/// sequential offsets, against the host reading the same file.
fn linux_lane_dd(lane: &mut ember::lane::LinuxLane, image: &Path, mib: u32) {
    use ember::lane::Invocation;
    // /proc/uptime has 10 ms resolution: enough for runs of a second or more.
    let script = format!(
        "t() {{ cut -d' ' -f1 /proc/uptime; }}; \
         a=$(t); dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null; b=$(t); \
         dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct conv=fsync 2>/dev/null; c=$(t); \
         dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct 2>/dev/null; d=$(t); \
         echo times $a $b $c $d"
    );
    let disk = image.to_str().expect("UTF-8 path").to_string();
    let o = lane
        .run(&Invocation::new(["run", "--memory", "512M", "--disk", &disk, "--", "sh", "-c", &script]))
        .expect("run ember in the lane");
    let out = o.stdout_lossy();
    let Some(line) = out.lines().find_map(|l| l.trim().strip_prefix("times ")) else {
        println!("\nLinux lane: no timing line; status {}\n{}\n{}", o.status, out, o.stderr_lossy());
        return;
    };
    let t: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert_eq!(t.len(), 4, "{line}");
    let (read_s, write_s, small_s) = ((t[1] - t[0]).max(0.01), (t[2] - t[1]).max(0.01), (t[3] - t[2]).max(0.01));
    let (guest_seq_r, guest_seq_w, guest_iops) = (f64::from(mib) / read_s, f64::from(mib) / write_s, 4096.0 / small_s);
    let (host_seq, host_iops) = host_figures(image);
    println!("\n## virtio-blk in the Linux lane, busybox dd: {}\n", lane.describe());
    println!("| test | guest | host (same file) | guest / host |");
    println!("|---|---|---|---|");
    println!(
        "| sequential read, bs=1M, O_DIRECT | {guest_seq_r:.1} MiB/s | {host_seq:.1} MiB/s | {:.1}% |",
        100.0 * guest_seq_r / host_seq
    );
    println!(
        "| sequential write, bs=1M, O_DIRECT+fsync | {guest_seq_w:.1} MiB/s | (read) {host_seq:.1} MiB/s | {:.1}% |",
        100.0 * guest_seq_w / host_seq
    );
    println!(
        "| 4 KiB O_DIRECT reads | {guest_iops:.0} /s | {host_iops:.0} /s | {:.1}% |",
        100.0 * guest_iops / host_iops
    );
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent — nothing to measure");
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("ember-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    fast_lane(&dir, runs);
    if args.iter().any(|a| a == "--linux") {
        linux_lane(&dir);
    } else {
        println!("\n(Linux lane figures: `cargo bench --bench virtio_blk -- --linux`)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
