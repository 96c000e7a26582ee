//! Bad input to the real `ember` binary: every mistake ends with exit code
//! 125 (126 when /dev/kvm is the problem), one `ember: ...` line on stderr
//! that says what is wrong, and never a panic.
//!
//! Most checks happen before ember opens /dev/kvm, so these run without KVM;
//! the initrd check needs a VM's memory and is skipped without /dev/kvm.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Input, Run, ember, ember_bin, ember_with, guest, kvm_available};

/// Exit code for bad input / host errors (src/main.rs).
const EXIT_VMM_ERROR: i32 = 125;
/// Exit code when /dev/kvm is missing or not usable.
const EXIT_KVM_UNUSABLE: i32 = 126;

/// Asserts `run` failed with `code` and exactly one `ember: ` line that contains every word of `says`.
fn assert_one_clear_line(run: &Run, code: i32, says: &[&str]) {
    run.expect_code(code);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{}", run.stderr);
    assert!(lines[0].starts_with("ember: "), "{}", run.stderr);
    for s in says {
        assert!(lines[0].contains(s), "`{s}` missing from: {}", lines[0]);
    }
    assert_eq!(run.stdout, "", "the guest never ran");
}

/// `ember run --kernel <a good guest> <args>`: only `args` can be wrong.
fn run_good_kernel(args: &[&str]) -> Run {
    let kernel = guest("exit");
    let mut all = vec!["run", "--kernel", kernel.to_str().expect("UTF-8 path")];
    all.extend_from_slice(args);
    ember(&all)
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

#[test]
fn missing_kernel_file() {
    let run = ember(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn text_file_is_not_a_kernel() {
    let path = scratch("not-a-kernel.txt");
    std::fs::write(&path, "#!/bin/sh\necho I am a shell script, not a kernel\n").expect("write");
    let run = ember(&["run", "--kernel", path.to_str().expect("UTF-8")]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["not a kernel", "not-a-kernel.txt"]);
    let empty = scratch("empty");
    std::fs::write(&empty, "").expect("write");
    let run = ember(&["run", "--kernel", empty.to_str().expect("UTF-8")]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["not a kernel"]);
}

#[test]
fn memory_zero() {
    assert_one_clear_line(&run_good_kernel(&["--memory", "0"]), EXIT_VMM_ERROR, &["--memory", "too small"]);
}

#[test]
fn memory_larger_than_host() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal");
    let over = format!("{}M", kib / 1024 + 1024);
    let run = run_good_kernel(&["--memory", &over]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["--memory", &over, "more than this host has"]);
    assert_one_clear_line(&run_good_kernel(&["--memory", "64T"]), EXIT_VMM_ERROR, &["64T"]);
}

#[test]
fn memory_not_a_size() {
    for bad in ["banana", "", "1.5G", "-1M", "99999999999T"] {
        // `--memory=` form: clap would take a separate `-1M` for a flag.
        let run = run_good_kernel(&[&format!("--memory={bad}")]);
        assert_one_clear_line(&run, EXIT_VMM_ERROR, &["--memory", "not a size"]);
    }
}

#[test]
fn cpus_zero_and_too_many() {
    assert_one_clear_line(&run_good_kernel(&["--cpus", "0"]), EXIT_VMM_ERROR, &["--cpus", "at least 1"]);
    assert_one_clear_line(&run_good_kernel(&["--cpus", "255"]), EXIT_VMM_ERROR, &["--cpus 255"]);
    assert_one_clear_line(&run_good_kernel(&["--cpus", "100000"]), EXIT_VMM_ERROR, &["--cpus 100000"]);
}

#[test]
fn cmdline_too_long() {
    let long = "x".repeat(2048);
    let run = run_good_kernel(&["--cmdline", &long]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["2048 bytes", "2047"]);
}

#[test]
fn missing_initrd() {
    let run = run_good_kernel(&["--initrd", "/nonexistent/initrd.img"]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["/nonexistent/initrd.img"]);
}

#[test]
fn initrd_that_does_not_fit() {
    // The fit is checked while loading into guest memory, after the VM exists.
    if !kvm_available() {
        return;
    }
    let path = scratch("initrd-100m");
    let f = std::fs::File::create(&path).expect("create");
    f.set_len(100 << 20).expect("sparse 100 MiB file");
    let run = run_good_kernel(&["--memory", "64M", "--initrd", path.to_str().expect("UTF-8")]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["initrd", "100 MiB", "--memory"]);
    std::fs::remove_file(&path).expect("remove");
}

#[test]
fn bad_serial_mode() {
    let run = run_good_kernel(&["--serial", "tcp:1234"]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["--serial", "tcp:1234"]);
}

/// /dev/kvm present but not permitted: ember run as `nobody` (not in the kvm group).
#[test]
fn kvm_not_permitted() {
    if !kvm_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skipped("kvm_not_permitted needs root to switch to the nobody user");
        return;
    }
    let mode = std::fs::metadata("/dev/kvm").map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    if mode.is_ok_and(|m| m & 0o006 == 0o006) {
        common::skipped("kvm_not_permitted: /dev/kvm is world read-write here, so no user can be refused");
        return;
    }
    // The ELF (and the path to it, and the binary) must be readable by nobody.
    let kernel = guest("exit");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ember_bin())
        .arg("run")
        .arg("--kernel")
        .arg(&kernel);
    let run = ember_with(&mut cmd, Input::Null);
    assert_one_clear_line(&run, EXIT_KVM_UNUSABLE, &["/dev/kvm", "permission denied", "`kvm` group"]);
}

/// /dev/kvm absent: ember in a private mount namespace where /dev is an empty tmpfs.
#[test]
fn kvm_absent() {
    // unshare(1) needs CAP_SYS_ADMIN; without it this cannot be set up, and
    // faking it (e.g. a special build of ember) would test nothing real.
    let kernel = guest("exit");
    let script = r#"mount -t tmpfs none /dev || exit 200; exec "$0" run --kernel "$1""#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script]).arg(ember_bin()).arg(&kernel);
    let run = ember_with(&mut cmd, Input::Null);
    if run.code == Some(200) || run.stderr.starts_with("unshare:") {
        common::skipped(&format!("kvm_absent cannot hide /dev/kvm here (needs CAP_SYS_ADMIN): {}", run.stderr.trim()));
        return;
    }
    assert_one_clear_line(&run, EXIT_KVM_UNUSABLE, &["/dev/kvm does not exist"]);
}
