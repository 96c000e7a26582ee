//! The Linux lane end to end: start it once for this test binary, run invocations through it.
//!
//! The lane's "ember binary" here is `/bin/sh`, so the machinery is tested independently of the VMM:
//! the real ember is reached as `sh -c 'exec "$0" "$@"' <ember> <args>`. On hosts whose KVM cannot
//! run Linux (kvm_pvm) this boots the nested outer machine; elsewhere the lane is direct.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ember::lane::{Invocation, KvmFlavour, LaneConfig, LaneError, LinuxLane};

static LANE: OnceLock<Mutex<LinuxLane>> = OnceLock::new();

fn lane() -> MutexGuard<'static, LinuxLane> {
    LANE.get_or_init(|| {
        let t = Instant::now();
        // The outer machine's KVM keeper is the real ember (`ember __kvm-keeper`, lane/keeper.rs).
        let config = LaneConfig { keeper: Some(env!("CARGO_BIN_EXE_ember").into()), ..LaneConfig::default() };
        let lane = LinuxLane::start_with(Path::new("/bin/sh"), config).unwrap_or_else(|e| panic!("Linux lane: {e}"));
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
        // Shadow paging: QEMU TCG's nested paging corrupts guests now and then (build-outer.sh).
        assert!(npt.starts_with("N\n") || npt.starts_with("0\n"), "kvm_amd npt: {npt}");
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
    // 10 s: long enough that the script has started and printed under a loaded TCG machine (with 2 s
    // it once had not yet printed), far shorter than its sleep.
    let err = lane.run_with_timeout(&sh("echo started; sleep 60"), Duration::from_secs(10)).unwrap_err();
    match err {
        LaneError::Timeout { stdout, .. } => assert_eq!(stdout, b"started\n"),
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(t.elapsed() < Duration::from_secs(40), "took {:?}", t.elapsed());
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

/// The outer machine's KVM keeper holds KVM's static keys still: booting and ending inner VMs (1 and
/// 2 vCPUs) rewrites no kernel text in the outer machine (a kprobe on `__jump_label_update`, through
/// tracefs). Without the keeper, 3 boots made 12 such updates (#15, lane/keeper.rs).
#[test]
fn inner_boots_rewrite_no_outer_kernel_text() {
    if !nested() {
        eprintln!("SKIPPED: the lane is direct here; the host's kernel is not the lane's to probe");
        return;
    }
    let ember = env!("CARGO_BIN_EXE_ember");
    let script = r#"
        ember="$0"
        # The keeper starts in the background at boot: wait until it holds its two vCPUs, its last
        # step (nothing else holds a VM here between runs).
        # Progress goes to stderr, so a run that times out shows how far it got.
        start=$(date +%s)
        held=0
        while [ $(($(date +%s) - start)) -lt 120 ]; do
            held=$(ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c 'kvm-vcpu')
            [ "$held" -ge 2 ] && break
            sleep 0.2
        done
        echo "keeper: $held vCPUs held after $(($(date +%s) - start)) s" >&2
        [ "$held" -ge 2 ] || {
            echo "no keeper holding 2 vCPUs (held $held)"
            ps -o pid,stat,etime,args | grep -e kvm-keeper -e ember
            exit 2
        }
        mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
        cd /sys/kernel/tracing || { echo "no tracefs"; exit 3; }
        echo 'p:emberjl __jump_label_update comm=$comm' >> kprobe_events || { echo "no kprobe"; exit 3; }
        echo > trace
        echo stacktrace > events/kprobes/emberjl/trigger
        echo 1 > events/kprobes/emberjl/enable
        for cpus in 1 2; do
            t=$(date +%s)
            timeout 120 "$ember" run --cpus $cpus -- true </dev/null || { echo "inner run ($cpus vCPUs): $?"; exit 4; }
            echo "inner run ($cpus vCPUs): $(($(date +%s) - t)) s" >&2
        done
        sleep 2  # KVM's deferred keys are released one second after their last user
        echo 0 > events/kprobes/emberjl/enable
        echo "updates: $(grep -c 'emberjl:' trace)"
        grep -v '^#' trace | head -80
        echo '!stacktrace' > events/kprobes/emberjl/trigger
        echo '-:emberjl' >> kprobe_events
    "#;
    // Up to 2 minutes for the keeper and 2 for each inner boot: a loaded TCG machine is slow, and
    // a hang must show where it was (the progress on stderr), not vanish in the lane's 120 s default.
    let out = lane().run_with_timeout(&Invocation::new(["-c", script, ember]), Duration::from_secs(420)).unwrap();
    let stdout = out.stdout_lossy();
    assert_eq!(out.status, 0, "stdout: {stdout}\nstderr: {}", out.stderr_lossy());
    assert!(stdout.contains("updates: 0\n"), "the outer kernel patched its text during inner boots:\n{stdout}");
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

/// The outer machine's QEMU runs under its own seccomp filter on every thread (`-sandbox on` with
/// spawn, privilege and resource calls denied: lane/nested.rs), and the machine still works under it.
#[test]
fn outer_machine_qemu_is_sandboxed() {
    if !nested() {
        eprintln!("direct lane: no outer machine, no QEMU to sandbox");
        return;
    }
    let mut l = lane();
    let pid = l.outer_machine_pid().expect("a nested lane has an outer machine");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("QEMU's threads");
    let mut seen = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let seccomp = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim);
        assert_eq!(seccomp, Some("2"), "QEMU thread {:?} has no seccomp filter:\n{status}", task.file_name());
        seen += 1;
    }
    assert!(seen > 1, "QEMU (pid {pid}) showed {seen} threads");
    let out = l.run(&sh("echo still-working")).unwrap();
    assert_eq!(out.stdout_lossy(), "still-working\n", "stderr: {}", out.stderr_lossy());
}
