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
    // A target directory under a private home (/root is 0700) hides both from nobody.
    let readable = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", r#"test -r "$0" && test -x "$1""#])
        .arg(&kernel)
        .arg(ember_bin())
        .status()
        .is_ok_and(|s| s.success());
    if !readable {
        common::skipped(
            "kvm_not_permitted: the test guest or ember is not reachable by nobody (target dir under a private home?)",
        );
        return;
    }
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

/// A named pipe in the scratch directory (nobody ever opens its other end).
fn fifo(name: &str) -> PathBuf {
    let path = scratch(name);
    let _ = std::fs::remove_file(&path);
    let c = std::ffi::CString::new(path.to_str().expect("UTF-8")).expect("no NUL");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    path
}

#[test]
fn fifo_as_kernel_initrd_or_disk_is_refused_not_waited_on() {
    // open(2) of a FIFO blocks until a writer comes: ember must not hang in it
    // (the helper kills a hung ember after its timeout and fails the test).
    let pipe = fifo("pipe");
    let p = pipe.to_str().expect("UTF-8");
    let run = ember(&["run", "--kernel", p]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["kernel", p, "FIFO"]);
    let run = run_good_kernel(&["--initrd", p]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["initrd", p, "FIFO"]);
    for disk in [format!("{p},ro"), p.to_string()] {
        let run = run_good_kernel(&["--disk", &disk]);
        assert_one_clear_line(&run, EXIT_VMM_ERROR, &["disk image", p, "FIFO"]);
    }
}

#[test]
fn directory_as_initrd_or_disk_says_directory() {
    let dir = scratch("a-directory");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let d = dir.to_str().expect("UTF-8");
    assert_one_clear_line(&run_good_kernel(&["--initrd", d]), EXIT_VMM_ERROR, &["initrd", d, "directory"]);
    for disk in [format!("{d},ro"), d.to_string()] {
        let run = run_good_kernel(&["--disk", &disk]);
        assert_one_clear_line(&run, EXIT_VMM_ERROR, &["disk image", d, "directory"]);
        assert!(!run.stderr.contains("not a multiple of 512"), "{}", run.stderr);
    }
    assert_one_clear_line(&ember(&["run", "--kernel", d]), EXIT_VMM_ERROR, &["kernel", d, "directory"]);
}

#[test]
fn memory_not_whole_pages() {
    let run = run_good_kernel(&["--memory", "3000001"]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["--memory 3000001", "multiple of 4 KiB"]);
}

#[test]
fn kernel_too_big_for_memory_says_so_once() {
    // The image is loaded after the VM exists.
    if !kvm_available() {
        return;
    }
    let kernel = guest("big");
    let run = ember(&["run", "--kernel", kernel.to_str().expect("UTF-8"), "--memory", "2M"]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &["cannot load kernel", "--memory"]);
    assert_eq!(run.stderr.matches("Unable to read kernel image").count(), 1, "each cause once: {}", run.stderr);
}

#[test]
fn same_disk_image_twice() {
    let img = scratch("twice.img");
    std::fs::write(&img, [0u8; 4096]).expect("write");
    let i = img.to_str().expect("UTF-8");
    let run = run_good_kernel(&["--disk", i, "--disk", &format!("{i},ro")]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &[i, "given twice"]);
    assert!(!run.stderr.contains("another process"), "{}", run.stderr);
}

#[test]
fn usage_errors_exit_125_help_and_version_0() {
    for args in [&["run", "--bogus"][..], &["run", "--cpus", "many"], &["frobnicate"], &[]] {
        let run = ember(args);
        run.expect_code(EXIT_VMM_ERROR);
        assert!(!run.stderr.is_empty(), "{args:?}: clap says what is wrong");
    }
    for args in [&["--help"][..], &["run", "--help"], &["--version"]] {
        let run = ember(args);
        run.expect_code(0);
        assert!(!run.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn disk_locked_by_another_process_the_way_qemu_locks() {
    // QEMU holds OFD locks on single bytes of an image (a read lock at byte
    // 100 + permission bit); flock(2) does not see them, a whole-file OFD write lock does.
    use std::os::fd::AsRawFd;
    let img = scratch("qemu-holds.img");
    std::fs::write(&img, [0u8; 4096]).expect("write");
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(&img).expect("open");
    // SAFETY: a zeroed flock is valid; F_OFD_SETLK only reads it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as libc::c_short;
    fl.l_start = 101;
    fl.l_len = 1;
    // SAFETY: as above, on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, 0, "take the lock");
    let i = img.to_str().expect("UTF-8");
    let run = run_good_kernel(&["--disk", i]);
    assert_one_clear_line(&run, EXIT_VMM_ERROR, &[i, "in use by another process"]);
    drop(holder);
}
