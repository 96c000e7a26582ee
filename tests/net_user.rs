//! `--net user` in the fast lane: the real `ember` binary runs the freestanding
//! virtio-net guest (tests/guests/virtio_net.S) with passt as its network, in
//! a network namespace the test makes (a veth pair whose both ends stay inside,
//! 10.0.0.2/24 with a default route via 10.0.0.254, so passt has an interface
//! and a gateway to copy; nothing leaves the namespace). The guest's ARP
//! request for 10.0.0.1 crosses the frame stream to passt, which answers it;
//! the answer crosses back. And the bad inputs: a missing passt, a published
//! port in use, a malformed `-p`, each one line and exit code 125, with no
//! passt process and no socket left behind.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Input, ember_bin, ember_with, guest, kvm_available, skipped};
use netns::NetNs;

/// A namespace with a veth pair (both ends inside) and an IPv4 default route.
fn user_ns(tag: &str) -> Option<NetNs> {
    if ember::host::passt::find_binary().is_err() {
        skipped("passt is not installed (apt install passt): --net user tests not run");
        return None;
    }
    let ns = NetNs::new(tag)?;
    ns.ip(&["link", "add", "uv0", "type", "veth", "peer", "name", "uv1"]);
    ns.ip(&["addr", "add", "10.0.0.2/24", "dev", "uv0"]);
    ns.ip(&["addr", "add", "10.0.0.254/24", "dev", "uv1"]);
    ns.ip(&["link", "set", "uv0", "up"]);
    ns.ip(&["link", "set", "uv1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.0.0.254", "dev", "uv0"]);
    Some(ns)
}

/// PIDs of passt processes in namespace `ns` (Debian's passt runs as `passt.avx2`).
fn passts_in(ns: &NetNs) -> Vec<u32> {
    let Ok(want) = std::fs::metadata(format!("/var/run/netns/{}", ns.name)) else { return vec![] };
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !comm.starts_with("passt") || zombie {
            continue;
        }
        if std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == want.ino()) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits up to 2 s for the namespace to have no passt; returns those left.
fn no_passt_left(ns: &NetNs) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = passts_in(ns);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ember run --kernel virtio_net --serial stdio ARGS` inside `ns`.
fn ember_in(ns: &NetNs, args: &[&str], path: Option<&str>) -> common::Run {
    let mut cmd = match path {
        // PATH for ember only: `ip` itself must still be found.
        Some(p) => {
            let mut c = ns.command("env");
            c.arg(format!("PATH={p}")).arg(ember_bin());
            c
        }
        None => ns.command(ember_bin()),
    };
    cmd.arg("run").arg("--kernel").arg(guest("virtio_net")).args(["--serial", "stdio"]).args(args);
    ember_with(&mut cmd, Input::Null)
}

/// The virtio_net guest with `--net user`: its ARP request reaches passt and
/// passt's reply reaches the guest (the frame stream, both directions, with
/// the sandbox on). The guest then waits for frames that never come, so the
/// test stops ember with SIGTERM, as a user would: ember exits 143 and its
/// passt is gone with it.
#[test]
fn guest_arp_crosses_passt_both_ways_and_sigterm_stops_passt() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = user_ns("nuarp") else { return };
    let mut child = ns
        .command(ember_bin())
        .arg("run")
        .arg("--kernel")
        .arg(guest("virtio_net"))
        .args(["--serial", "stdio", "--net", "user,mac=52:54:00:12:34:56"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !lines.iter().any(|l: &String| l.starts_with("arp-reply")) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    let running = passts_in(&ns);
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait for ember");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let shown = format!("stdout:\n{}\nstderr:\n{stderr}", lines.join("\n"));
    assert!(lines.iter().any(|l| l == "mac=525400123456"), "{shown}");
    let reply = lines.iter().find(|l| l.starts_with("arp-reply ip=0a000001 mac="));
    assert!(reply.is_some(), "passt's ARP reply never reached the guest: {shown}");
    assert_eq!(running.len(), 1, "one passt ran for the VM: {running:?}");
    assert_eq!(status.code(), Some(143), "SIGTERM: 128+15; {shown}");
    assert!(!stderr.contains("sandbox"), "{shown}");
    assert_eq!(no_passt_left(&ns), Vec::<u32>::new(), "passt outlived ember");
}

/// A guest that exits by itself (`probe`): exit 0, and passt is stopped and
/// reaped by ember's sandboxed main thread (pidfd), not left to chance.
#[test]
fn a_vm_that_exits_stops_its_passt() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = user_ns("nuexit") else { return };
    let run = ember_in(&ns, &["--net", "user", "--cmdline", "probe", "-p", "127.0.0.1:18080:80"], None);
    run.expect_code(0);
    assert!(run.stdout.contains("probe done"), "{}", run.stdout);
    assert!(run.stderr.is_empty(), "nothing on stderr: {}", run.stderr);
    assert_eq!(no_passt_left(&ns), Vec::<u32>::new(), "passt outlived ember");
    // And the published port is free again.
    let ok = ns.sh("busybox nc -l -s 127.0.0.1 -p 18080 -w 1 </dev/null & sleep 0.2; kill $! 2>/dev/null; true");
    assert!(ok.status.success());
}

/// Bad input: one clear line on stderr, exit code 125, nothing left running
/// and no socket or scratch directory left behind.
#[test]
fn bad_user_net_input_is_one_line_and_leaves_nothing() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = user_ns("nubad") else { return };
    let empty = tempdir("nubad-path");
    let empty = empty.to_str().unwrap();
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        (vec!["--net", "user", "-p", "80"], None, "-p `80` is not understood"),
        (vec!["--net", "user", "-p", "0:80"], None, "is not understood"),
        (vec!["--net", "user", "-p", "70000:80"], None, "is not understood"),
        (vec!["--net", "user", "-p", "8080:80/sctp"], None, "is not understood"),
        (vec!["--net", "user", "-p", "localhost:8080:80"], None, "is not understood"),
        (vec!["-p", "8080:80"], None, "-p publishes ports through --net user"),
        (vec!["--net", "user", "--net", "user"], None, "given twice"),
        (vec!["--net", "none", "--net", "user"], None, "cannot be combined"),
        (vec!["--net", "user,create"], None, "not understood"),
        (vec!["--net", "user"], Some(empty), "apt install passt"),
    ];
    for (args, path, says) in &cases {
        let run = ember_in(&ns, args, *path);
        run.expect_code(125);
        assert!(run.stderr.contains(says), "{args:?}: no `{says}` in:\n{}", run.stderr);
        assert_eq!(run.stderr.trim_end().lines().count(), 1, "{args:?}: one line:\n{}", run.stderr);
    }
    // A published port already in use, TCP and UDP: held by a listener in the namespace.
    let name = ns.name.clone();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let ns = NetNs { name };
        ns.enter_this_thread();
        std::mem::forget(ns);
        let t = std::net::TcpListener::bind("127.0.0.1:18081").expect("bind tcp");
        let u = std::net::UdpSocket::bind("0.0.0.0:18082").expect("bind udp");
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
        drop((t, u));
    });
    held_rx.recv().unwrap();
    for (p, says) in [
        ("127.0.0.1:18081:80", "host port 127.0.0.1:18081/tcp is already in use"),
        ("18082:53/udp", "host port 0.0.0.0:18082/udp is already in use"),
    ] {
        let before = scratch_dirs();
        let run = ember_in(&ns, &["--net", "user", "-p", "18090:90", "-p", p], None);
        run.expect_code(125);
        assert!(run.stderr.contains(says), "-p {p}: no `{says}` in:\n{}", run.stderr);
        assert_eq!(run.stderr.trim_end().lines().count(), 1, "one line:\n{}", run.stderr);
        assert_eq!(scratch_dirs(), before, "no scratch directory (socket) left");
    }
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(no_passt_left(&ns), Vec::<u32>::new(), "a failed start left passt running");
}

/// ember's scratch directories (`ember-run-*`, where a lane's passt socket lives) in the temp dir.
fn scratch_dirs() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("ember-run-"))
        .collect();
    v.sort();
    v
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
