//! `ember bench`: the tiny tier on every runtime this machine has (host, crun, runc, ember,
//! qemu-microvm), a small run count; the JSON has a row per runtime with sane numbers, the SVG
//! is well-formed, and nothing is left behind (processes, containers, cgroups, bundles; the
//! namespaces die with the processes). Parts that need /dev/kvm are skipped loudly without it.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn ember() -> Command {
    Command::new(common::ember_bin())
}

fn have(prog: &str) -> bool {
    Command::new(prog).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Everything whose name carries `ember-bench-<pid>-` under `dir`, a few levels deep.
fn leftovers(dir: &Path, tag: &str, depth: u32, found: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n.to_string_lossy().contains(tag)) {
            found.push(p.display().to_string());
        } else if depth > 0 && p.is_dir() && !p.is_symlink() {
            leftovers(&p, tag, depth - 1, found);
        }
    }
}

fn median(v: &Value) -> f64 {
    v["median"].as_f64().unwrap_or_else(|| panic!("no median in {v}"))
}

#[test]
fn tiny_tier_on_every_runtime() {
    let kvm = Path::new("/dev/kvm").exists();
    let mut runtimes = vec!["host"];
    for (rt, bin) in [("crun", "crun"), ("runc", "runc")] {
        if have(bin) {
            runtimes.push(rt);
        } else {
            common::skipped(&format!("{rt} not installed: its row is checked as skipped"));
        }
    }
    if kvm {
        runtimes.push("ember");
        if have("qemu-system-x86_64") {
            runtimes.push("qemu-microvm");
        }
    } else {
        common::skipped("/dev/kvm absent — the VM rows (ember, qemu-microvm) are not run");
    }
    let out_dir = tempdir("bench-out");
    let child = ember()
        .args(["bench", "--tier", "tiny", "--runs", "3", "--density", "1,3", "--out"])
        .arg(&out_dir)
        .arg(format!("--runtimes={},docker", runtimes.join(",")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ember bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("ember bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ember bench failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("## crun vs ember") && stdout.contains("| runtime |"), "{stdout}");

    let json: Value = serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    let tier = &json[0];
    assert_eq!(tier["tier"], "tiny");
    let rows = tier["rows"].as_array().unwrap();
    let row =
        |name: &str| rows.iter().find(|r| r["runtime"] == name).unwrap_or_else(|| panic!("no {name} row: {tier}"));
    // Docker runs where an engine does (ember bench starts its own when dockerd is
    // installed and it is root); elsewhere the row says why it was skipped.
    let docker = row("docker")["status"].as_str().unwrap().to_string();
    assert!(docker == "ok" || docker.starts_with("skipped: "), "{}", row("docker"));
    for rt in &runtimes {
        let r = row(rt);
        assert!(r["status"].as_str().unwrap().starts_with("ok"), "{rt}: {r}");
        assert_eq!(r["marker_seen"], true, "{rt}: {r}");
        assert_eq!(r["ok_runs"], 3, "{rt}: {r}");
        let (st, ex, mem) = (median(&r["startup_ms"]), median(&r["exit_ms"]), median(&r["mem_kib"]));
        assert!(st > 0.0 && st < 10_000.0 && ex >= st * 0.99 && mem > 0.0, "{rt}: {r}");
        // A pairwise ratio's median lies within what the two runtimes' ranges allow.
        let host = row("host");
        let hr = median(&r["vs_host"]["startup"]);
        let (lo, hi) = (
            r["startup_ms"]["min"].as_f64().unwrap() / host["startup_ms"]["max"].as_f64().unwrap(),
            r["startup_ms"]["max"].as_f64().unwrap() / host["startup_ms"]["min"].as_f64().unwrap(),
        );
        assert!(hr >= lo * 0.999 && hr <= hi * 1.001, "{rt}: ratio {hr} outside [{lo}, {hi}]");
        if *rt == "host" {
            assert!((hr - 1.0).abs() < 1e-9);
        }
        if kvm {
            let er = median(&r["vs_ember"]["mem"]);
            let ember_mem = median(&row("ember")["mem_kib"]);
            let (lo, hi) = (
                r["mem_kib"]["min"].as_f64().unwrap() / row("ember")["mem_kib"]["max"].as_f64().unwrap(),
                r["mem_kib"]["max"].as_f64().unwrap() / row("ember")["mem_kib"]["min"].as_f64().unwrap(),
            );
            assert!(er >= lo * 0.999 && er <= hi * 1.001, "{rt}: mem ratio {er} vs ember {ember_mem}");
        }
    }
    if kvm {
        let e = row("ember");
        assert!(median(&e["vmm_overhead_kib"]) > 0.0, "{e}");
        assert!(e["timeline"].as_array().is_some_and(|t| t.iter().any(|x| x[0] == "guest: first serial byte")), "{e}");
    }
    let density = tier["density"].as_array().unwrap();
    for rt in &runtimes {
        for n in [1, 3] {
            let d = density.iter().find(|d| d["runtime"] == *rt && d["n"] == n).unwrap_or_else(|| panic!("{rt} x{n}"));
            assert_eq!(d["ok"], n, "{d}");
            assert!(d["total_mem_kib"].as_u64().unwrap() > 0 && median(&d["startup_ms"]) > 0.0, "{d}");
        }
    }
    let csv = std::fs::read_to_string(out_dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + rows.len(), "{csv}");
    let svg = std::fs::read_to_string(out_dir.join("plot.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("plot.svg is not well-formed XML: {e}"));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert!(svg.contains("start-up") && svg.contains("memory"));

    // Nothing left behind.
    let tag = format!("ember-bench-{pid}-");
    let mut found = Vec::new();
    leftovers(Path::new("/sys/fs/cgroup"), &tag, 5, &mut found);
    leftovers(&std::env::temp_dir(), &tag, 0, &mut found);
    leftovers(Path::new("/run/crun"), &tag, 0, &mut found);
    leftovers(Path::new("/run/runc"), &tag, 0, &mut found);
    assert!(found.is_empty(), "left behind: {found:?}");
    for tool in ["crun", "runc"].into_iter().filter(|t| runtimes.contains(t)) {
        let list = Command::new(tool).arg("list").output().unwrap();
        assert!(
            !String::from_utf8_lossy(&list.stdout).contains(&tag),
            "{tool} list: {}",
            String::from_utf8_lossy(&list.stdout)
        );
    }
    let strays: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&tag) || c.contains(&format!("ember-bench-{pid}")))
        .collect();
    assert!(strays.is_empty(), "stray processes: {strays:?}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn bad_arguments_are_clear_errors() {
    for (args, want) in [
        (&["bench", "--runtimes", "lxc"][..], "unknown runtime `lxc`"),
        (&["bench", "--tier", "huge"], "unknown tier `huge`"),
        (&["bench", "--runs", "0"], "--runs must be at least 1"),
        (&["bench", "--density", "1,x"], "--density: `x`"),
    ] {
        let out = ember().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn check_names_each_runtime() {
    let out = ember().args(["bench", "--check"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for rt in ["host", "crun", "runc", "ember", "qemu-microvm", "docker"] {
        assert!(text.lines().any(|l| l.contains(rt)), "{rt} missing from:\n{text}");
    }
    // Whatever is missing says how to install it.
    for l in text.lines().filter(|l| l.contains("MISSING")) {
        assert!(l.contains("install") || l.contains("load") || l.contains("start"), "{l}");
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ember-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
