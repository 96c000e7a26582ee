//! `ember run IMAGE`: what an image costs, each figure next to its peer in
//! the same run.
//!
//! - Pull: `ember pull` from a registry on 127.0.0.1 (Debian's
//!   docker-registry) into an empty store, against `skopeo copy` of the same
//!   image from the same registry into an OCI layout: MB/s and the ratio.
//!   The root file system build (tar2sqfs) is reported on its own.
//! - Start: `ember run IMAGE true` warm (image in the store, root file system
//!   built) against `ember run -- true` on the default guest, from ember's own
//!   `--timeline=json` (ember start to exit), in the Linux lane, interleaved.
//! - The same image against containers (crun, runc, Docker) and QEMU microvm,
//!   under the same limits and in the same lane: `ember bench --image IMAGE`.
//!
//! `cargo bench --bench image -- [RUNS]` (default 5). The image is the
//! busybox test image of tests/common/oci.rs plus a 32 MiB layer of random
//! bytes, so the pull moves real data.

#[path = "../tests/common/oci.rs"]
mod oci;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ember::lane::{Invocation, LinuxLane};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// ms of timeline event `event` in `--timeline=json` output.
fn event_ms(stderr: &str, event: &str) -> Option<f64> {
    let line = stderr.lines().rev().find(|l| l.trim_start().starts_with("[{"))?;
    let item = line.split("{\"event\":\"").find(|i| i.starts_with(&format!("{event}\"")))?;
    item.split("\"ms\":").nth(1)?.split(['}', ',']).next()?.trim().parse().ok()
}

fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    oci::run(cmd);
    t.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5);
    let bin = Path::new(env!("CARGO_BIN_EXE_ember"));
    let dir = oci::temp_dir("image-bench");
    let layout = dir.join("layout");
    let mut noise = vec![0u8; 32 << 20];
    // SAFETY: getrandom writes at most noise.len() bytes into noise.
    for chunk in noise.chunks_mut(1 << 20) {
        unsafe { libc::getrandom(chunk.as_mut_ptr().cast(), chunk.len(), 0) };
    }
    let big = oci::layer_tar(&[oci::Entry::File("noise", 0o644, 0, 0, noise)]);
    let cfg = oci::Config { cmd: Some(vec!["true"]), env: vec!["PATH=/bin"], ..Default::default() };
    oci::write_image(&layout, "bench", &[oci::busybox_layer(), big], &cfg);
    let reg = oci::Registry::start("bench", None);
    reg.push(&format!("oci:{}:bench", layout.display()), "bench/image:1", &[]);
    let image = format!("{}/bench/image:1", reg.addr);

    // Pull: ember vs skopeo, fresh destinations each round, interleaved.
    let (mut ember_ms, mut skopeo_ms, mut build_ms) = (vec![], vec![], vec![]);
    let bytes = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum::<u64>();
    for i in 0..runs {
        let store = dir.join(format!("store-{i}"));
        let t = Instant::now();
        let out = Command::new(bin).args(["pull", &image]).env("EMBER_IMAGE_STORE", &store).output().unwrap();
        let total = t.elapsed().as_secs_f64() * 1000.0;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The same pull again with the root file system removed: its build alone.
        for e in std::fs::read_dir(store.join("rootfs")).unwrap().flatten() {
            std::fs::remove_file(e.path()).unwrap();
        }
        let b = timed(Command::new(bin).args(["pull", &image]).env("EMBER_IMAGE_STORE", &store));
        build_ms.push(b);
        ember_ms.push(total);
        let dst = dir.join(format!("skopeo-{i}"));
        skopeo_ms.push(timed(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{image}"))
                .arg(format!("oci:{}:x", dst.display())),
        ));
        if i + 1 < runs {
            let _ = std::fs::remove_dir_all(&store);
        }
        let _ = std::fs::remove_dir_all(&dst);
    }
    let mb = bytes as f64 / 1e6;
    let (e, s, b) = (median(ember_ms), median(skopeo_ms), median(build_ms));
    println!("\n## Pull of a {mb:.1} MB image from a loopback registry ({runs} rounds, medians)\n");
    println!("| | ms | MB/s |\n|---|---|---|");
    println!("| ember pull (download + verify + root fs build) | {e:.0} | {:.1} |", mb / (e / 1000.0));
    println!("| of which the root fs build (tar2sqfs) | {b:.0} | |");
    println!("| skopeo copy to an OCI layout | {s:.0} | {:.1} |", mb / (s / 1000.0));
    println!("\nember download / skopeo copy: **{:.2}x** the time\n", (e - b) / s);

    let store = dir.join(format!("store-{}", runs - 1));
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent — no VM start figures");
        return;
    }
    ember::guest::default_guest(false).unwrap();
    let mut lane = LinuxLane::start(bin).unwrap_or_else(|e| panic!("lane: {e}"));
    let (mut img, mut def, mut img_ready, mut def_ready) = (vec![], vec![], vec![], vec![]);
    let cmdline = ember::guest::debug_cmdline();
    for _ in 0..runs {
        for (args, into, ready) in [
            (vec!["run", "--timeline=json", "--cmdline", &cmdline, &image, "true"], &mut img, &mut img_ready),
            (vec!["run", "--timeline=json", "--cmdline", &cmdline, "--", "true"], &mut def, &mut def_ready),
        ] {
            let mut inv = Invocation::new(args.iter().copied());
            inv.env.push(("EMBER_IMAGE_STORE".into(), store.display().to_string()));
            let o = lane.run(&inv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(o.status, 0, "{args:?}: {}", o.stderr_lossy());
            into.push(event_ms(&o.stderr_lossy(), "ember: exit").expect("a timeline"));
            ready.push(event_ms(&o.stderr_lossy(), "guest: init ready").expect("the init's ready line"));
        }
    }
    let pairs: Vec<f64> = img.iter().zip(&def).map(|(a, b)| a / b).collect();
    println!("## `true`, start to exit ({runs} interleaved pairs) — lane: {}\n", lane.describe());
    println!("| | init ready, ms | exit, ms |\n|---|---|---|");
    println!("| ember run IMAGE true (warm) | {:.0} | {:.0} |", median(img_ready.clone()), median(img.clone()));
    println!("| ember run -- true (default guest) | {:.0} | {:.0} |", median(def_ready.clone()), median(def.clone()));
    println!(
        "\nimage / default guest, pairwise median: **{:.2}x** ({:+.0} ms)\n",
        median(pairs),
        median(img) - median(def)
    );

    let _ = std::fs::remove_dir_all(&dir);
}
