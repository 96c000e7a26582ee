//! The Firecracker-compatible API (`ember --api-sock`), pause/resume and snapshots, on the
//! counter guest (tests/guests/counter.S: a counter in guest memory, printed once per line).
//!
//! What is checked against what:
//! - Firecracker's getting-started sequence, replayed with `curl --unix-socket` as its docs
//!   (docs/getting-started.md, docs/snapshotting/snapshot-support.md) write it: the status codes
//!   and `GET /` states Firecracker answers; the restored guest's output continues the counter
//!   where the snapshot took it (the two outputs, joined, count 1, 2, 3, ... without a gap or a
//!   repeat), in a new ember process.
//! - Malformed requests (bad JSON, unknown field, wrong state, missing file, unknown endpoint,
//!   broken HTTP, a slow client) get a 4xx with `fault_message`, and the VMM keeps serving.
//! - A damaged, foreign or incomplete snapshot is refused with a message, and no guest runs.
//! - `--config-file` (with and without the API) and `ember run --api-sock`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ember_bin, guest, kvm_available};

/// A scratch directory under CARGO_TARGET_TMPDIR, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fc-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn join(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
    fn s(&self, f: &str) -> String {
        self.join(f).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One ember process with an API socket; its serial output goes to a file. Killed on drop.
struct Vmm {
    child: Child,
    sock: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

impl Vmm {
    /// `ember ARGS` (ARGS include `--api-sock SOCK` where wanted), output into `dir/NAME.out`.
    fn spawn(dir: &Dir, name: &str, args: &[&str]) -> Vmm {
        let out = dir.join(&format!("{name}.out"));
        let err = dir.join(&format!("{name}.err"));
        let child = Command::new(ember_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start ember");
        let sock = dir.join(&format!("{name}.sock"));
        Vmm { child, sock, out, err }
    }

    /// `ember --api-sock DIR/NAME.sock`, waiting until the socket answers.
    fn api(dir: &Dir, name: &str) -> Vmm {
        let sock = dir.s(&format!("{name}.sock"));
        let v = Vmm::spawn(dir, name, &["--api-sock", &sock]);
        v.wait_for_socket();
        v
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket never appeared; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until the guest printed a count of at least `n`; returns the output.
    fn wait_for_count(&self, n: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.output();
            if counts(&out).last().is_some_and(|c| *c >= n) {
                return out;
            }
            assert!(Instant::now() < deadline, "count {n} never came; output:\n{out}\nstderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to end (at most 20 s); its exit code.
    fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(Instant::now() < deadline, "ember did not exit; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `curl --unix-socket SOCK -X METHOD http://localhost/PATH -d BODY`: (status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-w", "\n%{http_code}", "--unix-socket"]).arg(&self.sock).args(["-X", method]);
        cmd.arg(format!("http://localhost{path}"));
        if let Some(b) = body {
            cmd.args(["-H", "Accept: application/json", "-H", "Content-Type: application/json", "-d", b]);
        }
        let out = cmd.output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The same over a raw socket, without curl: (status, body).
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        raw(&self.sock, req.as_bytes())
    }

    fn state(&self) -> String {
        let (code, body) = self.http("GET", "/", "");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["state"].as_str().unwrap().to_string()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `bytes` and reads the answer until the server closes: (status, body).
fn raw(sock: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    parse_response(&resp)
}

fn parse_response(resp: &str) -> (u16, String) {
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The numbers of the complete "count N" lines.
fn counts(out: &str) -> Vec<u64> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("count ").and_then(|n| n.parse().ok()))
        .collect()
}

/// Asserts `out` counts 1, 2, 3, ... with nothing missing or repeated.
fn assert_counts_on(out: &str) {
    let c = counts(out);
    assert!(!c.is_empty(), "no counts in:\n{out}");
    for (i, n) in c.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "the count is broken at line {i}:\n{out}");
    }
}

fn fault(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["fault_message"].as_str().unwrap_or_else(|| panic!("no fault_message in {body}")).to_string()
}

fn curl_available() -> bool {
    let ok = Command::new("curl").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        common::skipped("curl absent — the getting-started replay needs it");
    }
    ok
}

fn boot_source(kernel: &Path, args: &str) -> String {
    serde_json::json!({ "kernel_image_path": kernel, "boot_args": args }).to_string()
}

#[test]
fn firecracker_getting_started_then_snapshot_and_restore_in_a_new_process() {
    if !kvm_available() || !curl_available() {
        return;
    }
    let dir = Dir::new("getting-started");
    let kernel = guest("counter");
    let first = Vmm::api(&dir, "first");
    assert_eq!(first.curl("GET", "/", None).0, 200);
    assert_eq!(first.state(), "Not started");
    // docs/getting-started.md: boot source, machine config, InstanceStart. Two vCPUs: the
    // in-kernel irqchip, PIT and an AP waiting for its SIPI go into the snapshot too.
    let (code, body) = first.curl("PUT", "/boot-source", Some(&boot_source(&kernel, "console=ttyS0 reboot=k panic=1")));
    assert_eq!(code, 204, "{body}");
    let (code, body) = first.curl("PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#));
    assert_eq!(code, 204, "{body}");
    let (code, body) = first.curl("PUT", "/logger", Some(r#"{"log_path": "/dev/null", "level": "Info"}"#));
    assert_eq!(code, 204, "{body}");
    let (code, body) = first.curl("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(code, 204, "{body}\n{}", first.stderr());
    assert_eq!(first.state(), "Running");
    let (code, body) = first.curl("GET", "/vm/config", None);
    assert_eq!(code, 200);
    let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2, "{body}");
    assert_eq!(cfg["boot-source"]["kernel_image_path"], kernel.display().to_string(), "{body}");
    first.wait_for_count(5);

    // docs/snapshotting/snapshot-support.md: pause, create, resume.
    let (code, body) = first.curl("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(code, 204, "{body}");
    assert_eq!(first.state(), "Paused");
    // Paused: nothing more is printed (the serial writer thread may still be flushing).
    std::thread::sleep(Duration::from_millis(300));
    let at_pause = first.output();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(first.output(), at_pause, "a paused VM printed");
    let create = serde_json::json!({
        "snapshot_type": "Full", "snapshot_path": dir.join("vm.state"), "mem_file_path": dir.join("vm.mem")
    });
    let (code, body) = first.curl("PUT", "/snapshot/create", Some(&create.to_string()));
    assert_eq!(code, 204, "{body}\n{}", first.stderr());
    let (code, body) = first.curl("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(code, 204, "{body}");
    let last = *counts(&at_pause).last().unwrap();
    first.wait_for_count(last + 3);
    drop(first); // kill -9, as the docs do

    let second = Vmm::api(&dir, "second");
    let load = serde_json::json!({
        "snapshot_path": dir.join("vm.state"),
        "mem_backend": { "backend_path": dir.join("vm.mem"), "backend_type": "File" },
        "enable_diff_snapshots": false,
        "resume_vm": false
    });
    let (code, body) = second.curl("PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(code, 204, "{body}\n{}", second.stderr());
    assert_eq!(second.state(), "Paused");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(second.output(), "", "a VM loaded paused printed");
    let (code, body) = second.curl("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(code, 204, "{body}");
    let restored = second.wait_for_count(last + 5);
    // Joined, the two outputs count on without a gap or a repeat.
    assert_counts_on(&(at_pause.clone() + &restored));
    // A second pause/snapshot of the restored VM works too (its memory is file-backed), but not
    // over the memory file it was loaded from.
    assert_eq!(second.curl("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let over = serde_json::json!({ "snapshot_path": dir.join("x.state"), "mem_file_path": dir.join("vm.mem") });
    let (code, body) = second.curl("PUT", "/snapshot/create", Some(&over.to_string()));
    assert_eq!(code, 400, "{body}");
    assert!(fault(&body).contains("was loaded from"), "{body}");
    let create = serde_json::json!({ "snapshot_path": dir.join("vm2.state"), "mem_file_path": dir.join("vm2.mem") });
    let (code, body) = second.curl("PUT", "/snapshot/create", Some(&create.to_string()));
    assert_eq!(code, 204, "{body}");
    assert_eq!(second.curl("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    // The memory file was mapped MAP_PRIVATE: the guest's writes never reached it.
    let mem = std::fs::read(dir.join("vm.mem")).unwrap();
    assert_eq!(mem.len(), 64 << 20);

    let (code, body) = second.curl("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#));
    assert_eq!(code, 204, "{body}");
    let mut second = second;
    assert_eq!(second.wait(), Some(0), "{}", second.stderr());

    // The second snapshot restores as well, and counts on from where it was taken.
    let third = Vmm::api(&dir, "third");
    let load = serde_json::json!({ "snapshot_path": dir.join("vm2.state"), "mem_file_path": dir.join("vm2.mem"), "resume_vm": true });
    let (code, body) = third.curl("PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(code, 204, "{body}\n{}", third.stderr());
    assert_eq!(third.state(), "Running");
    let out = third.wait_for_count(last + 8);
    assert!(counts(&out)[0] > last + 5, "the second snapshot restarted the count:\n{out}");
}

#[test]
fn malformed_requests_get_a_4xx_and_the_vmm_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("malformed");
    let kernel = guest("counter");
    let vmm = Vmm::api(&dir, "vmm");
    let expect_400 = |method: &str, path: &str, body: &str, says: &str| {
        let (code, resp) = vmm.http(method, path, body);
        assert_eq!(code, 400, "{method} {path} {body}: {resp}");
        let msg = fault(&resp);
        assert!(msg.contains(says), "{method} {path}: `{msg}` does not say `{says}`");
    };
    expect_400("PUT", "/machine-config", "{not json", "body is not valid");
    expect_400(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 3}"#,
        "unknown field `vcpus`",
    );
    expect_400("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}"#, "SMT");
    expect_400(
        "PUT",
        "/drives/root",
        r#"{"drive_id": "other", "path_on_host": "x", "is_root_device": true}"#,
        "names drive",
    );
    expect_400("PUT", "/vsock", r#"{}"#, "does not implement /vsock");
    expect_400("DELETE", "/", "", "Invalid request method and/or path");
    expect_400("PATCH", "/vm", r#"{"state": "Paused"}"#, "not running");
    expect_400("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, "PUT /boot-source");
    expect_400("PUT", "/actions", r#"{"action_type": "Reboot"}"#, "InstanceStart, SendCtrlAltDel or FlushMetrics");
    // A kernel that is not there: InstanceStart fails with the path, and may be tried again.
    let missing = dir.join("no-such-kernel");
    assert_eq!(vmm.http("PUT", "/boot-source", &boot_source(&missing, "")).0, 204);
    expect_400("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, "no-such-kernel");
    // Snapshot loads are refused once the VM is being configured.
    expect_400("PUT", "/snapshot/load", r#"{"snapshot_path": "s", "mem_file_path": "m"}"#, "after configuring");
    // Broken HTTP on the socket: answered, and the next client is served.
    let status = |bytes: &[u8]| raw(&vmm.sock, bytes).0;
    assert_eq!(status(b"HELLO\r\n\r\n"), 400);
    assert_eq!(status(b"PUT /boot-source HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
    assert_eq!(status(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n"), 413);
    assert_eq!(status(&[b'A'; 40 << 10]), 413);
    // A client that sends half a request and stalls is dropped (408) without stopping the others.
    let mut slow = UnixStream::connect(&vmm.sock).unwrap();
    slow.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{").unwrap();
    let (code, _) = vmm.http("GET", "/", "");
    assert_eq!(code, 200, "a stalled client blocked the API");
    // A client that connects and leaves.
    drop(UnixStream::connect(&vmm.sock).unwrap());

    // Still serving: start the VM for real, then the running-state mistakes.
    assert_eq!(vmm.http("PUT", "/boot-source", &boot_source(&kernel, "")).0, 204);
    assert_eq!(vmm.http("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 32}"#).0, 204);
    let (code, body) = vmm.http("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(code, 204, "{body}\n{}", vmm.stderr());
    vmm.wait_for_count(2);
    expect_400("PUT", "/boot-source", &boot_source(&kernel, ""), "not supported after starting");
    expect_400("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, "already running");
    let create = serde_json::json!({ "snapshot_path": dir.join("s"), "mem_file_path": dir.join("m") }).to_string();
    expect_400("PUT", "/snapshot/create", &create, "must be paused");
    expect_400("PATCH", "/vm", r#"{"state": "Frozen"}"#, "\"Paused\" or \"Resumed\"");
    assert_eq!(vmm.http("PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
    let bad_dir =
        serde_json::json!({ "snapshot_path": dir.join("nodir/s"), "mem_file_path": dir.join("m") }).to_string();
    expect_400("PUT", "/snapshot/create", &bad_dir, "cannot create the snapshot file");
    expect_400(
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_type": "Diff", "snapshot_path": "a", "mem_file_path": "b"}"#,
        "Full",
    );
    assert_eq!(vmm.http("PATCH", "/vm", r#"{"state": "Resumed"}"#).0, 204);
    assert_eq!(vmm.state(), "Running");
    let before = counts(&vmm.output()).last().copied().unwrap_or(0);
    vmm.wait_for_count(before + 2);
    assert!(!vmm.stderr().contains("panicked"), "{}", vmm.stderr());
}

#[test]
fn damaged_foreign_or_incomplete_snapshots_are_refused_with_a_reason() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("refused");
    let kernel = guest("counter");
    // A snapshot to spoil.
    let vmm = Vmm::api(&dir, "source");
    assert_eq!(vmm.http("PUT", "/boot-source", &boot_source(&kernel, "")).0, 204);
    assert_eq!(vmm.http("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 16}"#).0, 204);
    assert_eq!(vmm.http("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).0, 204);
    vmm.wait_for_count(2);
    assert_eq!(vmm.http("PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
    let create = serde_json::json!({ "snapshot_path": dir.join("good.state"), "mem_file_path": dir.join("good.mem") });
    assert_eq!(vmm.http("PUT", "/snapshot/create", &create.to_string()).0, 204);
    drop(vmm);

    let state = std::fs::read(dir.join("good.state")).unwrap();
    let mut damaged = state.clone();
    let n = damaged.len();
    damaged[n - 10] ^= 0x40;
    std::fs::write(dir.join("damaged.state"), damaged).unwrap();
    let mut v2 = state.clone();
    v2[8] = 99;
    std::fs::write(dir.join("v99.state"), v2).unwrap();
    std::fs::write(dir.join("short.mem"), vec![0u8; 4096]).unwrap();

    let cases = [
        ("damaged.state", "good.mem", "damaged"),
        ("v99.state", "good.mem", "format version 99"),
        ("good.mem", "good.mem", "not an ember snapshot"),
        ("missing.state", "good.mem", "missing.state"),
        ("good.state", "missing.mem", "missing.mem"),
        ("good.state", "short.mem", "holds 4096 bytes"),
    ];
    let target = Vmm::api(&dir, "target");
    for (state, mem, says) in cases {
        let load = serde_json::json!({ "snapshot_path": dir.join(state), "mem_file_path": dir.join(mem) });
        let (code, body) = target.http("PUT", "/snapshot/load", &load.to_string());
        assert_eq!(code, 400, "{state} + {mem}: {body}");
        let msg = fault(&body);
        assert!(msg.contains(says), "{state} + {mem}: `{msg}` does not say `{says}`");
        assert_eq!(target.state(), "Not started");
    }
    assert_eq!(target.output(), "", "a refused snapshot ran a guest");
    // The good one still loads in the same process.
    let load = serde_json::json!({ "snapshot_path": dir.join("good.state"), "mem_file_path": dir.join("good.mem"), "resume_vm": true });
    let (code, body) = target.http("PUT", "/snapshot/load", &load.to_string());
    assert_eq!(code, 204, "{body}");
    target.wait_for_count(4);
}

#[test]
fn config_file_starts_the_vm_with_or_without_an_api() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("config-file");
    let kernel = guest("counter");
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": kernel, "boot_args": "stop=3" },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 32 },
        "drives": [],
        "logger": { "level": "Warning" }
    });
    std::fs::write(dir.join("vm.json"), config.to_string()).unwrap();
    let mut plain = Vmm::spawn(&dir, "plain", &["--no-api", "--config-file", &dir.s("vm.json")]);
    assert_eq!(plain.wait(), Some(42), "{}", plain.stderr());
    assert_eq!(plain.output(), "count 1\ncount 2\ncount 3\ndone\n");

    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": kernel },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 32 }
    });
    std::fs::write(dir.join("run.json"), config.to_string()).unwrap();
    let with_api = Vmm::spawn(
        &dir,
        "api",
        &["--api-sock", &dir.s("api.sock"), "--config-file", &dir.s("run.json"), "--id", "vm7"],
    );
    with_api.wait_for_socket();
    let (code, body) = with_api.http("GET", "/", "");
    assert_eq!(code, 200);
    assert!(body.contains(r#""id":"vm7""#) && body.contains(r#""state":"Running""#), "{body}");
    assert_eq!(with_api.http("PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
    assert_eq!(with_api.http("PATCH", "/vm", r#"{"state": "Resumed"}"#).0, 204);
    with_api.wait_for_count(3);

    std::fs::write(dir.join("bad.json"), r#"{"boot-source": {"kernel_image_path": "k"}, "balloon": {}}"#).unwrap();
    let mut bad = Vmm::spawn(&dir, "bad", &["--no-api", "--config-file", &dir.s("bad.json")]);
    assert_eq!(bad.wait(), Some(125));
    assert!(bad.stderr().contains("unknown field `balloon`"), "{}", bad.stderr());
}

#[test]
fn ember_run_with_an_api_socket_pauses_and_snapshots() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("run-api");
    let kernel = guest("counter");
    let sock = dir.s("run.sock");
    let k = kernel.display().to_string();
    let vmm =
        Vmm::spawn(&dir, "run", &["run", "--kernel", &k, "--memory", "32M", "--irqchip", "on", "--api-sock", &sock]);
    vmm.wait_for_socket();
    assert_eq!(vmm.state(), "Running");
    vmm.wait_for_count(3);
    assert_eq!(vmm.http("PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
    std::thread::sleep(Duration::from_millis(200));
    let at_pause = vmm.output();
    let create = serde_json::json!({ "snapshot_path": dir.join("s"), "mem_file_path": dir.join("m") });
    let (code, body) = vmm.http("PUT", "/snapshot/create", &create.to_string());
    assert_eq!(code, 204, "{body}");
    drop(vmm);
    let restored = Vmm::api(&dir, "restored");
    let load = serde_json::json!({ "snapshot_path": dir.join("s"), "mem_file_path": dir.join("m"), "resume_vm": true });
    let (code, body) = restored.http("PUT", "/snapshot/load", &load.to_string());
    assert_eq!(code, 204, "{body}\n{}", restored.stderr());
    let last = *counts(&at_pause).last().unwrap();
    let out = restored.wait_for_count(last + 3);
    assert_counts_on(&(at_pause + &out));
}
