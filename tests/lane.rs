//! The Linux lane end to end: start it once for this test binary, run invocations through it.
//!
//! The lane's "ember binary" here is `/bin/sh`, so the machinery is tested independently of the VMM:
//! the real ember is reached as `sh -c 'exec "$0" "$@"' <ember> <args>`. On hosts whose KVM cannot
//! run Linux (kvm_pvm) this boots the nested outer machine; elsewhere the lane is direct.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ember::lane::{Invocation, KvmFlavour, LaneError, LinuxLane};

static LANE: OnceLock<Mutex<LinuxLane>> = OnceLock::new();

fn lane() -> MutexGuard<'static, LinuxLane> {
    LANE.get_or_init(|| {
        let t = Instant::now();
        let lane = LinuxLane::start(Path::new("/bin/sh")).unwrap_or_else(|e| panic!("Linux lane: {e}"));
        eprintln!("lane started in {:?}: {}", t.elapsed(), lane.describe());
        Mutex::new(lane)
    })
    .lock()
    .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sh(script: &str) -> Invocation {
    Invocation::new(["-c", script])
}

fn nested() -> bool {
    std::env::var("EMBER_LANE").as_deref() == Ok("nested")
        || (std::env::var("EMBER_LANE").as_deref() != Ok("direct") && KvmFlavour::detect().needs_nested_lane())
}

#[test]
fn exit_status_stdout_and_kvm_inside() {
    let out = lane().run(&sh("echo hi; ls -l /dev/kvm; exit 3")).unwrap();
    assert_eq!(out.status, 3, "stderr: {}", out.stderr_lossy());
    let stdout = out.stdout_lossy();
    assert!(stdout.starts_with("hi\n"), "{stdout}");
    assert!(stdout.contains("/dev/kvm"), "{stdout}");
    if nested() {
        let out = lane().run(&sh("cat /sys/module/kvm_amd/parameters/npt; uname -r")).unwrap();
        let npt = out.stdout_lossy();
        assert!(npt.starts_with("Y\n") || npt.starts_with("1\n"), "kvm_amd npt: {npt}");
    }
}

#[test]
fn binary_stdin_to_stdout_and_separate_stderr() {
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut inv = sh("cat; printf 'to\\000err' >&2; exit 0");
    inv.stdin = data.clone();
    let out = lane().run(&inv).unwrap();
    assert_eq!(out.status, 0);
    assert!(out.stdout == data, "stdout differs ({} vs {} bytes)", out.stdout.len(), data.len());
    assert_eq!(out.stderr, b"to\0err");
}

#[test]
fn arguments_and_environment_arrive_verbatim() {
    let mut inv = Invocation::new(["-c", r#"printf '%s|' "$@" "$GREETING" "$PWD""#, "zero", "it's", "", "$HOME `x`"]);
    inv.env.push(("GREETING".into(), "a b'c".into()));
    let out = lane().run(&inv).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(out.stdout_lossy(), format!("it's||$HOME `x`|a b'c|{}|", cwd.display()));
}

#[test]
fn host_files_are_visible_and_tmp_is_writable() {
    let dir = std::env::temp_dir().join(format!("ember-lane-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("in"), b"from host").unwrap();
    let script = format!("cat {0}/in > {0}/out && echo ' and back' >> {0}/out", dir.display());
    let out = lane().run(&sh(&script)).unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_lossy());
    assert_eq!(std::fs::read_to_string(dir.join("out")).unwrap(), "from host and back\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn timeout_kills_and_lane_stays_usable() {
    let mut lane = lane();
    let t = Instant::now();
    let err = lane.run_with_timeout(&sh("echo started; sleep 60"), Duration::from_secs(2)).unwrap_err();
    match err {
        LaneError::Timeout { stdout, .. } => assert_eq!(stdout, b"started\n"),
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    assert_eq!(lane.run(&sh("exit 7")).unwrap().status, 7);
}

#[test]
fn per_invocation_overhead() {
    let mut lane = lane();
    let n = 5;
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(lane.run(&Invocation::new(["-c", "true"])).unwrap().status, 0);
    }
    eprintln!("per-invocation overhead: {:?} ({})", t.elapsed() / n, lane.describe());
}

/// Run inside the lane by `kvm_create_vm_inside`: KVM works where ember will run.
#[test]
#[ignore = "run inside the Linux lane by kvm_create_vm_inside"]
fn probe_kvm_create_vm() {
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    println!("KVM API {} ok", kvm.get_api_version());
}

#[test]
fn kvm_create_vm_inside() {
    let me = std::env::current_exe().unwrap();
    let inv = Invocation::new([
        "-c".into(),
        r#"exec "$0" --exact probe_kvm_create_vm --ignored --nocapture --test-threads=1"#.into(),
        me.into_os_string(),
    ]);
    let out = lane().run(&inv).unwrap();
    assert_eq!(out.status, 0, "stdout: {}\nstderr: {}", out.stdout_lossy(), out.stderr_lossy());
    assert!(out.stdout_lossy().contains("KVM API 12 ok"), "{}", out.stdout_lossy());
}

/// The real ember, when it is built and has a `demo` command: it must succeed in the lane.
#[test]
fn real_ember_demo() {
    let ember = env!("CARGO_BIN_EXE_ember");
    let help = lane().run(&Invocation::new(["-c", r#"exec "$0" --help"#, ember])).unwrap();
    if !help.stdout_lossy().contains("demo") {
        eprintln!("ember has no `demo` command yet; skipping (help: {})", help.stdout_lossy().trim());
        return;
    }
    let out = lane().run(&Invocation::new(["-c", r#"exec "$0" demo"#, ember])).unwrap();
    eprintln!("ember demo in the lane: status {} in {:?}", out.status, out.elapsed);
    assert_eq!(out.status, 0, "stdout: {}\nstderr: {}", out.stdout_lossy(), out.stderr_lossy());
}

/// A lane that cannot start says why instead of passing silently: an outer CPU without SVM.
#[test]
fn outer_machine_without_svm_fails_clearly() {
    if !nested() {
        return;
    }
    let config =
        ember::lane::LaneConfig { force_nested: Some(true), cpu_model: "qemu64,-svm".into(), ..Default::default() };
    let err = match LinuxLane::start_with(Path::new("/bin/sh"), config) {
        Ok(lane) => panic!("started without SVM: {}", lane.describe()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no SVM"), "{err}");
}
