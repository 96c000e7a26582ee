//! Linux lane: the default guest (ember's microVM Linux + busybox init) booted
//! by the real ember binary on a machine whose KVM can run Linux: the host
//! itself with hardware VMX/SVM, otherwise the nested QEMU SVM machine
//! (`ember::lane`), started once for this whole test binary.
//!
//! Every test checks what the guest saw (its own output) and ember's exit code.

#[path = "common/lane_retry.rs"]
mod lane_retry;
#[path = "common/netns.rs"]
mod netns;

use std::sync::{Mutex, MutexGuard, OnceLock};

use ember::guest::{GuestArtifacts, default_guest};
use ember::lane::{Invocation, LaneError, LinuxLane, Outcome};
use lane_retry::{loud, once_more_if_the_lane_failed, past_a_wedge};

static LANE: OnceLock<Option<Mutex<LinuxLane>>> = OnceLock::new();
static GUEST: OnceLock<GuestArtifacts> = OnceLock::new();

/// The default guest's artifacts (built on first use; cached across runs).
fn guest() -> &'static GuestArtifacts {
    GUEST.get_or_init(|| default_guest(false).unwrap_or_else(|e| panic!("building the default guest: {e}")))
}

/// The lane, or None when the host has no /dev/kvm at all (then we skip, loudly).
fn lane() -> Option<MutexGuard<'static, LinuxLane>> {
    LANE.get_or_init(|| {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: /dev/kvm absent — Linux lane tests not run");
            return None;
        }
        guest();
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_ember"));
        let lane = LinuxLane::start(bin).unwrap_or_else(|e| panic!("the Linux lane cannot start: {e}"));
        eprintln!("Linux lane: {}", lane.describe());
        Some(Mutex::new(lane))
    })
    .as_ref()
    .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Runs `ember ARGS...` in the lane.
fn ember(args: &[&str]) -> Option<Outcome> {
    ember_stdin(args, b"")
}

/// Runs `ember ARGS...` with `stdin` in the lane; one loud retry if the outer machine wedged or died
/// (`lane_retry`: the test machine failing, not ember).
fn ember_stdin(args: &[&str], stdin: &[u8]) -> Option<Outcome> {
    let mut l = lane()?;
    let mut inv = Invocation::new(args.iter().copied());
    inv.stdin = stdin.to_vec();
    Some(past_a_wedge(&format!("`ember {args:?}`"), || l.run(&inv)))
}

/// Runs `script` with /bin/sh on the lane's machine, with [`ember_stdin`]'s one retry (so scripts
/// given here must be safe to run twice).
fn lane_sh(l: &mut LinuxLane, what: &str, script: &str, timeout: std::time::Duration) -> Outcome {
    let inv = Invocation::new(["-c", script]);
    past_a_wedge(what, || l.run_program(std::path::Path::new("/bin/sh"), &inv, timeout))
}

fn show(o: &Outcome) -> String {
    format!("status {}\n--- stdout\n{}\n--- stderr\n{}", o.status, o.stdout_lossy(), o.stderr_lossy())
}

/// The init's mounts (guest-kernels/ember-mounts.c) and host name, as the guest sees them: the host
/// name, then `DIR TYPE` of each pseudo file system, sorted.
const MOUNTS_SCRIPT: &str =
    "hostname; grep -E '^[^ ]+ /(proc|sys|dev|dev/pts|dev/shm|tmp|run) ' /proc/mounts | cut -d' ' -f2,3 | sort";
const MOUNTS_SEEN: &str =
    "ember\n/dev devtmpfs\n/dev/pts devpts\n/dev/shm tmpfs\n/proc proc\n/run tmpfs\n/sys sysfs\n/tmp tmpfs\n";

/// Each pseudo file system once, on the initramfs root (where the init mounts /dev) as on a disk root
/// (where the kernel has: [`root_disk_boots_and_a_synced_write_reaches_the_image`]).
#[test]
fn init_mounts_each_pseudo_file_system_once() {
    let Some(o) = ember(&["run", "--", "sh", "-c", MOUNTS_SCRIPT]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    assert_eq!(o.stdout_lossy().replace("\r\n", "\n"), MOUNTS_SEEN, "{}", show(&o));
}

#[test]
fn default_guest_runs_a_command_and_returns_its_status() {
    let Some(o) = ember(&["run", "--", "uname", "-r"]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    assert_eq!(o.stdout_lossy().trim(), guest().kernel_release, "{}", show(&o));

    for (cmd, want) in [("exit 7", 7), ("exit 255", 255), ("exit 0", 0), ("kill -9 $$", 128 + 9)] {
        let Some(o) = ember(&["run", "--", "sh", "-c", cmd]) else { return };
        assert_eq!(o.status, want, "sh -c '{cmd}': {}", show(&o));
    }
}

#[test]
fn bzimage_and_vmlinux_both_boot_through_kernel_and_initrd() {
    let g = guest();
    for kernel in [&g.bzimage, &g.vmlinux] {
        let k = kernel.to_str().expect("UTF-8 path");
        let i = g.initramfs.to_str().expect("UTF-8 path");
        let Some(o) = ember(&["run", "--kernel", k, "--initrd", i, "--", "uname", "-r"]) else { return };
        assert_eq!(o.status, 0, "{k}: {}", show(&o));
        assert_eq!(o.stdout_lossy().trim(), g.kernel_release, "{k}");
    }
}

#[test]
fn arguments_survive_the_trip_unchanged() {
    let args = ["a b", "it's", "\"quoted\"", "$HOME", "back\\slash", "", "tab\there", "trailing\n"];
    let mut cmd = vec!["run", "--", "printf", "[%s]\\n"];
    cmd.extend(args);
    let Some(o) = ember(&cmd) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    let want: String = args.iter().map(|a| format!("[{a}]\n")).collect();
    assert_eq!(o.stdout_lossy().replace("\r\n", "\n"), want, "{}", show(&o));
}

#[test]
fn cpus_are_all_online() {
    for n in [1, 2, 4] {
        let ns = n.to_string();
        let Some(o) = ember(&["run", "--cpus", &ns, "--", "grep", "-c", "^processor", "/proc/cpuinfo"]) else {
            return;
        };
        assert_eq!(o.status, 0, "{}", show(&o));
        assert_eq!(o.stdout_lossy().trim(), ns, "--cpus {n}: {}", show(&o));
    }
}

#[test]
fn memory_size_matches_memtotal() {
    for (flag, mib) in [("128M", 128u64), ("1G", 1024), ("3584M", 3584)] {
        let Some(o) = ember(&["run", "--memory", flag, "--", "grep", "MemTotal", "/proc/meminfo"]) else {
            return;
        };
        assert_eq!(o.status, 0, "{}", show(&o));
        let kib: u64 = o
            .stdout_lossy()
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal: {}", show(&o)));
        let total = mib * 1024;
        // The kernel keeps its own image, page tables and the low 1 MiB: MemTotal is
        // a little below the RAM ember mapped, never above it.
        assert!(kib <= total && kib > total * 85 / 100, "--memory {flag}: MemTotal {kib} KiB of {total} KiB");
    }
}

#[test]
fn interactive_console_takes_commands_and_reboot_exits_zero() {
    let Some(o) = ember_stdin(&["run"], b"echo hello-$((6*7))\nreboot\n") else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    assert!(o.stdout_lossy().contains("hello-42"), "{}", show(&o));
}

#[test]
fn kernel_panic_is_a_guest_crash() {
    let Some(o) = ember(&["run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"]) else { return };
    assert_eq!(o.status, 123, "{}", show(&o));
    assert!(o.stderr_lossy().contains("crashed"), "{}", show(&o));
}

#[test]
fn missing_init_panics_and_ends_with_the_crash_code() {
    let g = guest();
    let k = g.bzimage.to_str().expect("UTF-8 path");
    // No initrd and no root disk: the kernel cannot find init and panics.
    let Some(o) = ember(&["run", "--kernel", k]) else { return };
    assert_eq!(o.status, 123, "{}", show(&o));
}

/// A private copy of the default root file system image (guest-kernels/rootfs.sh)
/// in the host's temporary directory, which the lane can write to.
struct RootfsCopy {
    dir: std::path::PathBuf,
    image: std::path::PathBuf,
}

impl RootfsCopy {
    fn new(name: &str) -> RootfsCopy {
        let src = ember::guest::default_rootfs().unwrap_or_else(|e| panic!("building the root file system: {e}"));
        let dir = std::env::temp_dir().join(format!("ember-lane-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        let image = dir.join("rootfs.ext4");
        std::fs::copy(&src, &image).expect("copy the root file system image");
        RootfsCopy { dir, image }
    }

    fn path(&self) -> &str {
        self.image.to_str().expect("UTF-8 path")
    }

    /// `debugfs -R 'cat PATH'` on the image, on the host.
    fn cat(&self, path: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(&self.image)
            .output()
            .expect("run debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RootfsCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn root_disk_boots_and_a_synced_write_reaches_the_image() {
    let root = RootfsCopy::new("rw");
    let cmd = "echo persisted-$((6*7)) > /root/proof && sync && \
               echo root=$(awk '$2 == \"/\" { print $3, substr($4, 1, 2) }' /proc/mounts) && \
               echo rng=$(cat /sys/class/misc/hw_random/rng_current)";
    let cmd = format!("{cmd} && echo mounts: && {MOUNTS_SCRIPT}");
    let Some(o) = ember(&["run", "--root-disk", root.path(), "--", "sh", "-c", &cmd]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    let out = o.stdout_lossy().replace("\r\n", "\n");
    assert!(out.contains("root=ext4 rw"), "the root is the ext4 disk, read-write: {}", show(&o));
    assert!(out.contains("rng=virtio_rng.0"), "a Linux guest gets virtio-rng: {}", show(&o));
    assert!(out.ends_with(&format!("mounts:\n{MOUNTS_SEEN}")), "each pseudo file system once: {}", show(&o));
    assert_eq!(root.cat("/root/proof").trim(), "persisted-42", "the file is in the image on the host");
}

#[test]
fn read_only_disks_refuse_writes_in_the_guest() {
    let root = RootfsCopy::new("ro");
    let data = RootfsCopy::new("ro-data");
    let before = std::fs::read(&root.image).expect("read the image");
    let disk = format!("{},ro,id=data-disk", data.path());
    let root_arg = format!("{},ro", root.path());
    let cmd = "touch /newfile 2>/dev/null; echo touch=$?; echo ro=$(cat /sys/block/vda/ro); \
               echo serial=$(cat /sys/block/vdb/serial); \
               dd if=/dev/vdb of=/dev/null bs=4096 count=16 2>/dev/null; echo dd=$?; \
               dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; echo ddw=$?";
    let Some(o) = ember(&["run", "--root-disk", &root_arg, "--disk", &disk, "--", "sh", "-c", cmd]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    let out = o.stdout_lossy().replace("\r\n", "\n");
    for want in ["touch=1", "ro=1", "serial=data-disk", "dd=0", "ddw=1"] {
        assert!(out.lines().any(|l| l == want), "no line `{want}`: {}", show(&o));
    }
    assert!(std::fs::read(&root.image).expect("read the image") == before, "a read-only root is unchanged");
}

/// virtio-net in the Linux lane. The network namespace, its tap (10.0.0.1/24)
/// and a TCP listener are made *on the lane's machine* (the outer QEMU machine
/// when the host's KVM is kvm_pvm, the host itself otherwise), because that is
/// where the inner ember runs; everything is deleted at the end of the script.
/// The guest configures eth0 with `ip` (the kernel has no CONFIG_IP_PNP),
/// pings the host, and sends random bytes over TCP (64 MiB on hardware KVM,
/// 16 MiB in the nested lane, see below); both ends print an md5sum.
///
/// In the nested lane the inner guest runs on QEMU's software emulation of
/// SVM. There, long transfers were seen to end in an inner triple fault (a
/// SHUTDOWN intercept; the reported RIP 0xfff0 is KVM re-initialising the
/// VMCB): rarely in stop 8, but in 4 of 5 runs of 64 MiB on this session's
/// loaded 2-core machine, while the same device code passed every fast-lane
/// and hardware run. Found, not understood: a lane defect kept open under #15.
#[test]
fn guest_pings_the_netns_host_and_sends_data_over_tcp() {
    let Some(mut l) = lane() else { return };
    let ember_bin = env!("CARGO_BIN_EXE_ember");
    let mib = if ember::lane::KvmFlavour::detect().runs_linux_directly() { 64 } else { 16 };
    let guest_cmd = format!(
        "ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ping -c 3 10.0.0.1 && \
                     dd if=/dev/urandom of=/tmp/data bs=1M count={mib} 2>/dev/null && \
                     echo guest-md5 $(md5sum < /tmp/data) && timeout 300 nc 10.0.0.1 5000 < /tmp/data && echo sent"
    );
    let script = format!(
        r#"
modprobe tun 2>/dev/null
NS=ember-lnet-$$
D=$(mktemp -d -p /dev/shm)  # tmpfs: the lane's /tmp is 9p, which has no fifos
ip netns add $NS || exit 90
cleanup() {{ kill $SP 2>/dev/null; ip netns del $NS; rm -rf $D; }}
trap cleanup EXIT
ip -n $NS link set lo up
ip -n $NS tuntap add dev etap0 mode tap || exit 91
ip -n $NS addr add 10.0.0.1/24 dev etap0
ip -n $NS link set etap0 up
mkfifo $D/in
sleep 900 > $D/in & SP=$!
ip netns exec $NS busybox nc -l -p 5000 < $D/in | md5sum > $D/md5 &
sleep 0.5
ip netns exec $NS {ember_bin} run --memory 512M --net tap=etap0 -- sh -c '{guest_cmd}'
rc=$?
for i in $(seq 50); do [ -s $D/md5 ] && break; sleep 0.2; done
echo host-md5 $(cat $D/md5)
exit $rc
"#
    );
    let inv = Invocation::new(["-c", script.as_str()]);
    let attempt = || l.run_program(std::path::Path::new("/bin/sh"), &inv, std::time::Duration::from_secs(400));
    let transferred = |o: &Outcome| o.status == 0 && o.stdout_lossy().contains("sent");
    // In the nested lane the inner guest runs on QEMU's software emulation
    // of SVM; under this much traffic it was seen, rarely, to stall or
    // triple-fault (before the lane's KVM ran guests on shadow paging), and
    // once (CI, stop 18) the outer machine itself died, where the same device
    // code passes in the fast lane and on every other run. Once, loudly, the
    // run is repeated (on a fresh outer machine if it died); a second failure
    // fails the test.
    let o = once_more_if_the_lane_failed(&format!("the {mib} MiB transfer"), attempt, transferred, show)
        .unwrap_or_else(|e| panic!("the network script: {e}"));
    drop(l);
    assert_eq!(o.status, 0, "{}", show(&o));
    let out = o.stdout_lossy().replace("\r\n", "\n");
    assert!(out.contains("3 packets transmitted, 3 packets received"), "ping: {}", show(&o));
    let md5 = |tag: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(tag))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no `{tag}` line: {}", show(&o)))
    };
    let (g, h) = (md5("guest-md5 "), md5("host-md5 "));
    assert_eq!(g.len(), 32, "{}", show(&o));
    assert_eq!(g, h, "{mib} MiB arrived intact: {}", show(&o));
    eprintln!("Linux lane: {mib} MiB over TCP in {:?} (incl. boot and dd)", o.elapsed);
}

/// `ember run --net tap=NAME` started *on this host* for a tap in a network
/// namespace the test makes here (10.0.2.1/24): where the host's KVM cannot run
/// Linux (kvm_pvm), ember falls back to the nested machine and must still reach
/// that tap (the lane gives it to the outer QEMU as a NIC and bridges it inside
/// to the inner ember's tap); with hardware KVM ember runs directly. Either way
/// the user's command line is the same. The guest pings the namespace's address
/// and sends 4 MiB over TCP to a busybox nc listener there; both md5s match.
/// The namespace (and so the tap) is deleted on drop, also on failure.
#[test]
fn run_on_the_host_reaches_a_host_tap_in_either_lane() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent");
        return;
    }
    guest();
    // Not through the shared lane: this ember boots its own outer machine (or
    // runs directly on hardware KVM). Hold the lane meanwhile, so that two TCG
    // machines never compete for the CPUs: on a 2-core host that slows both
    // enough for a nested guest's AP bring-up or a big boot to time out.
    let _serial = lane();
    let Some(ns) = netns::NetNs::new("lhost") else { return };
    ns.add_tap("embt0", "10.0.2.1/24");
    // One try: a busybox nc listener in the namespace, then ember on the tap.
    let attempt = || {
        let mut listener = ns
            .command("busybox")
            .args(["nc", "-l", "-p", "5000"])
            .stdin(Stdio::piped()) // held open: nc ends when the guest closes, not on stdin's EOF
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox nc in the namespace");
        let mut from_nc = listener.stdout.take().expect("piped");
        let received = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = from_nc.read_to_end(&mut v);
            v
        });
        let guest_cmd = "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ping -c 3 10.0.2.1 && \
                         dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null && \
                         echo guest-md5 $(md5sum < /tmp/data) && timeout 120 nc 10.0.2.1 5000 < /tmp/data && echo sent";
        let o = ns
            .command("timeout")
            .args(["300", env!("CARGO_BIN_EXE_ember"), "run", "--net", "tap=embt0", "--", "sh", "-c", guest_cmd])
            .stdin(Stdio::null())
            .output()
            .expect("run ember in the namespace");
        let (stdout, stderr) =
            (String::from_utf8_lossy(&o.stdout).replace("\r\n", "\n"), String::from_utf8_lossy(&o.stderr));
        let shown = format!("status {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", o.status);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while matches!(listener.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = listener.kill();
        let _ = listener.wait();
        let data = received.join().unwrap_or_default();
        (o, stdout, shown, data)
    };
    let (mut o, mut stdout, mut shown, mut data) = attempt();
    if o.status.code() != Some(0) && !ember::lane::KvmFlavour::detect().runs_linux_directly() {
        // As in the TCP transfer test: the nested lane's software-emulated SVM
        // machine was seen, rarely, to stall a TCP transfer; once, loudly, the
        // run is repeated, and a second failure fails the test.
        loud(&format!("LANE: the host-tap run failed in the nested lane; retrying once:\n{shown}"));
        (o, stdout, shown, data) = attempt();
    }
    assert_eq!(o.status.code(), Some(0), "{shown}");
    assert!(stdout.contains("3 packets transmitted, 3 packets received"), "ping: {shown}");
    let guest_md5 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("guest-md5 "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no guest-md5 line: {shown}"))
        .to_string();
    let mut md5 = Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("md5sum");
    md5.stdin.take().expect("piped").write_all(&data).expect("feed md5sum");
    let host = String::from_utf8_lossy(&md5.wait_with_output().expect("md5sum").stdout).to_string();
    assert_eq!(data.len(), 4 << 20, "bytes that reached the namespace: {shown}");
    assert_eq!(host.split_whitespace().next(), Some(guest_md5.as_str()), "4 MiB arrived intact: {shown}");
}

/// The benchmark tools image (guest-kernels/tools.sh) mounted as a second disk: its fio and
/// iperf3, dynamically linked Debian binaries, start in the busybox guest through the image's
/// own loader and libraries. The first disk is a small data disk, so the tools are /dev/vdb.
#[test]
fn tools_disk_runs_fio_and_iperf3_in_the_guest() {
    if lane().is_none() {
        return;
    }
    let tools = ember::guest::default_tools().unwrap_or_else(|e| panic!("building the tools image: {e}"));
    let dir = std::env::temp_dir().join(format!("ember-tools-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let data = dir.join("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).expect("data disk");
    let disk = data.to_str().expect("UTF-8 path").to_string();
    let tools_disk = format!("{},ro", tools.to_str().expect("UTF-8 path"));
    let script = "mount -o ro /dev/vdb /mnt && /mnt/bin/fio --version && /mnt/bin/iperf3 --version | head -n1";
    let o = ember(&["run", "--disk", &disk, "--disk", &tools_disk, "--", "sh", "-c", script]);
    let _ = std::fs::remove_dir_all(&dir);
    let Some(o) = o else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    let out = o.stdout_lossy();
    assert!(out.contains("fio-3."), "fio --version: {}", show(&o));
    assert!(out.contains("iperf 3."), "iperf3 --version: {}", show(&o));
}

// ---- Power off through ACPI, and the command's stdout and stderr apart (issue #12) ----

/// Runs `ember ARGS...` in the lane with a longer timeout (a distribution's boot).
///
/// A boot that takes 36-46 s here once ran into its 300 s timeout in a CI
/// rehearsal (the suite's 17th lane run; alone it passed at once):
/// as with a wedged machine (see `ember_stdin`), the run is repeated once,
/// loudly, with the first attempt's last output shown so the hang can be
/// placed. A second failure fails the test.
fn ember_slow(args: &[&str], timeout: std::time::Duration) -> Option<Outcome> {
    let mut l = lane()?;
    let inv = Invocation::new(args.iter().copied());
    match l.run_with_timeout(&inv, timeout) {
        Ok(o) => Some(o),
        Err(e) => {
            let tail = |b: &[u8]| {
                let t = String::from_utf8_lossy(b).into_owned();
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            };
            let out = match &e {
                LaneError::Timeout { stdout, stderr, .. } => {
                    format!("\n--- stdout (last lines)\n{}\n--- stderr (last lines)\n{}", tail(stdout), tail(stderr))
                }
                _ => String::new(),
            };
            loud(&format!("LANE: `ember {args:?}` failed in the lane ({e}); retrying once{out}"));
            Some(l.run_with_timeout(&inv, timeout).unwrap_or_else(|e| panic!("ember {args:?} (second try): {e}")))
        }
    }
}

/// `poweroff -f` skips the init: the kernel itself powers off through ACPI
/// (the FADT's sleep control register), which must end the VM with 0, like a
/// reboot through the i8042 and busybox's `poweroff` (a signal to the init).
/// `--timeline` names who asked for the stop, so each path is checked.
#[test]
fn poweroff_and_reboot_end_the_vm_with_zero() {
    for (cmd, who) in
        [("poweroff -f", "guest: power off"), ("reboot -f", "guest: reset"), ("poweroff", "guest: exit device")]
    {
        let Some(o) = ember(&["run", "--timeline", "--", "sh", "-c", cmd]) else { return };
        assert_eq!(o.status, 0, "{cmd}: {}", show(&o));
        assert!(o.stderr_lossy().contains(&format!("{who}: stop requested")), "{cmd}: {}", show(&o));
    }
}

/// The SHA-256 of `data`, in lowercase hex (as sha256sum prints it).
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// On the serial console (`--output=console`, as on a terminal), what a command
/// prints right before it ends arrives whole. The command used to lead its
/// console session, and a leader's exit hangs up the console, which drops what
/// the UART has not sent yet (guest-kernels/ember-session.c): 4 boots in 25
/// lost 1-4 KiB of a long `dmesg`. Here the last write is 4 KiB (the 8250
/// driver's whole transmit buffer) from a process that exits at once, on vCPU 0,
/// while the UART's interrupt is served on vCPU 1: in the nested lane this lost
/// the last line in 3 boots of 4 before the fix. Three boots must all be whole.
#[test]
fn the_last_output_on_the_console_is_not_cut_off() {
    let script = "n=$(grep ttyS0 /proc/interrupts | cut -d: -f1); echo 2 > /proc/irq/$((n))/smp_affinity; \
                  exec taskset 1 printf '%04095d\\nthe-last-line\\n' 7";
    let burst = format!("{:04095}\nthe-last-line\n", 7);
    for boot in 1..=3 {
        let Some(o) = ember(&["run", "--cpus", "2", "--output=console", "--", "sh", "-c", script]) else { return };
        assert_eq!(o.status, 0, "boot {boot}: {}", show(&o));
        let out = o.stdout_lossy().replace("\r\n", "\n");
        assert!(out.ends_with(&burst), "boot {boot}: {} bytes of output:\n{}", out.len(), show(&o));
    }
}

/// 8 MiB of random bytes through the command's stdout, a line on stderr after
/// each MiB, the kernel talking on its console all along (no `quiet`): stdout
/// is exactly the data, stderr exactly the lines, and neither has a kernel message.
#[test]
fn stdout_and_stderr_stay_apart_byte_exact() {
    let script = "head -c 8388608 /dev/urandom > /tmp/data && \
                  for i in 0 1 2 3 4 5 6 7; do \
                  dd if=/tmp/data bs=1048576 skip=$i count=1 2>/dev/null; echo err-$i >&2; done; \
                  sha256sum < /tmp/data >&2";
    let cmdline = "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 loglevel=7";
    let args = ["run", "--memory", "512M", "--cmdline", cmdline, "--", "sh", "-c", script];
    let Some(o) = ember(&args) else { return };
    let brief = format!("status {}, {} bytes on stdout; stderr:\n{}", o.status, o.stdout.len(), o.stderr_lossy());
    assert_eq!(o.status, 0, "{brief}");
    assert_eq!(o.stdout.len(), 8 << 20, "{brief}");
    let err = o.stderr_lossy();
    let lines: Vec<&str> = err.lines().collect();
    let want: Vec<String> = (0..8).map(|i| format!("err-{i}")).collect();
    assert_eq!(lines.len(), 9, "{brief}");
    assert_eq!(lines[..8], want[..], "{brief}");
    let guest_sum = lines[8].split_whitespace().next().unwrap_or("");
    assert_eq!(sha256_hex(&o.stdout), guest_sum, "stdout is byte for byte what the guest wrote");
    let text = String::from_utf8_lossy(&o.stdout);
    for marker in ["Linux version", "Run /init", "virtio"] {
        assert!(!text.contains(marker) && !err.contains(marker), "kernel message `{marker}` leaked: {brief}");
    }
}

/// Shared folders (`-v`) as the guest sees them: the guest reads what the
/// host made, and creates, renames, deletes, chmods, symlinks and hard-links;
/// the host sees each change at once; 64 MiB written in the guest equal the
/// host's copy (sha256 of the guest's source against the host file). `:ro` is
/// the host's: after the guest remounts the folder read-write, a write still
/// fails (EROFS from the jailed server's read-only bind mount).
#[test]
fn shared_folders_change_on_both_sides_and_ro_is_the_hosts() {
    let top = std::env::temp_dir().join(format!("ember-lane-share-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&top);
    let (rw, ro) = (top.join("rw"), top.join("ro"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(rw.join("from-host"), "made on the host\n").unwrap();
    std::fs::write(rw.join("to-delete"), "x").unwrap();
    std::os::unix::fs::symlink("from-host", rw.join("host-link")).unwrap();
    std::fs::set_permissions(rw.join("from-host"), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    std::fs::write(ro.join("keep"), "read-only\n").unwrap();
    let script = "set -e; cd /mnt/rw; cat from-host; stat -c 'mode %a' from-host; echo link $(readlink host-link); \
                  echo guest-made > g; mkdir -p d; mv g d/moved; chmod 600 d/moved; ln -sfn moved d/sym; ln -f d/moved hard; \
                  rm -f to-delete; head -c 67108864 /dev/urandom > /tmp/big; sha256sum < /tmp/big; \
                  dd if=/tmp/big of=/mnt/rw/big bs=65536 2>/dev/null; cat /mnt/ro/keep; \
                  if echo x > /mnt/ro/guest 2>/dev/null; then echo ro-mount-wrote; fi; \
                  mount -o remount,rw /mnt/ro; if echo x > /mnt/ro/host 2>/dev/null; then echo ro-host-wrote; \
                  else echo ro-host-refused; fi";
    // Every step may run twice: `ember()` retries a run whose outer machine wedged, on the folder as
    // the first attempt left it (seen: a wedge after `mkdir d`, then "File exists").
    let (rw_arg, ro_arg) = (format!("{}:/mnt/rw", rw.display()), format!("{}:/mnt/ro:ro", ro.display()));
    let args = ["run", "--memory", "512M", "-v", &rw_arg, "-v", &ro_arg, "--", "sh", "-c", script];
    let Some(o) = ember(&args) else { return };
    let out = o.stdout_lossy().replace("\r\n", "\n");
    assert_eq!(o.status, 0, "{}", show(&o));
    for want in ["made on the host", "mode 640", "link from-host", "read-only", "ro-host-refused"] {
        assert!(out.contains(want), "`{want}` missing: {}", show(&o));
    }
    assert!(!out.contains("ro-mount-wrote") && !out.contains("ro-host-wrote"), "{}", show(&o));
    // The host's view, right after the VM ended.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert!(!rw.join("g").exists() && !rw.join("to-delete").exists(), "renamed and deleted");
    assert_eq!(std::fs::read_to_string(rw.join("d/moved")).unwrap(), "guest-made\n");
    let moved = std::fs::metadata(rw.join("d/moved")).unwrap();
    assert_eq!(moved.permissions().mode() & 0o777, 0o600, "chmod in the guest");
    assert_eq!(std::fs::read_link(rw.join("d/sym")).unwrap(), std::path::Path::new("moved"));
    let hard = std::fs::metadata(rw.join("hard")).unwrap();
    assert_eq!((hard.ino(), hard.nlink()), (moved.ino(), 2), "a hard link to the same file");
    let guest_sum = out.lines().find(|l| l.len() >= 64 && l.chars().take(64).all(|c| c.is_ascii_hexdigit()));
    let guest_sum = guest_sum.and_then(|l| l.split_whitespace().next()).expect("the guest's sha256");
    let big = std::fs::read(rw.join("big")).unwrap();
    assert_eq!(big.len(), 64 << 20);
    assert_eq!(sha256_hex(&big), guest_sum, "64 MiB written in the guest are the host's file");
    let mut left: Vec<_> = std::fs::read_dir(&ro).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["keep"], "nothing written into the :ro folder");
    let _ = std::fs::remove_dir_all(&top);
}

/// `2>/dev/null` drops exactly the command's stderr; a binary file comes out
/// of `cat` byte for byte (the initramfs's /bin/busybox is the host's).
#[test]
fn stderr_to_dev_null_and_a_binary_file_through_stdout() {
    let Some(mut l) = lane() else { return };
    let bin = env!("CARGO_BIN_EXE_ember");
    let script = format!(
        "{bin} run -- sh -c 'echo out; echo err >&2' 2>/dev/null > /tmp/ember-split-$$.txt || exit 10; \
         cat /tmp/ember-split-$$.txt; rm -f /tmp/ember-split-$$.txt"
    );
    let o = lane_sh(&mut l, "the stderr script", &script, std::time::Duration::from_secs(120));
    assert_eq!((o.status, o.stdout.as_slice(), o.stderr.as_slice()), (0, &b"out\n"[..], &b""[..]), "{}", show(&o));
    drop(l);

    let Some(o) = ember(&["run", "--", "cat", "/bin/busybox"]) else { return };
    let busybox = std::fs::read("/bin/busybox").expect("the host's busybox (package busybox-static)");
    assert_eq!(o.status, 0, "{}", o.stderr_lossy());
    assert!(o.stdout == busybox, "{} bytes out, {} in /bin/busybox", o.stdout.len(), busybox.len());
}

/// stdin given as a file reaches the command unchanged through the console's
/// stdin port (control bytes included), and ends: `sha256sum` sees every byte
/// and the script goes on; the interactive console is not involved.
#[test]
fn stdin_from_a_file_arrives_exact_and_then_ends() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let Some(o) = ember_stdin(&["run", "--", "sh", "-c", "sha256sum; echo after-eof"], &data) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    let out = o.stdout_lossy();
    assert!(out.starts_with(&sha256_hex(&data)), "{}", show(&o));
    assert!(out.contains("after-eof"), "{}", show(&o));
}

/// The host's Debian kernel and its initrd (/boot, package linux-image-amd64), if installed.
fn debian_kernel() -> Option<(String, String)> {
    let mut kernels: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("vmlinuz-"))
        .collect();
    kernels.sort();
    let k = kernels.pop()?;
    let initrd = format!("/boot/initrd.img-{}", k.trim_start_matches("vmlinuz-"));
    std::path::Path::new(&initrd).is_file().then(|| (format!("/boot/{k}"), initrd))
}

/// A Debian 12 root with systemd (`debootstrap --variant=minbase
/// --include=systemd-sysv,udev`) as a 1 GiB ext4 image, with one unit, wanted
/// by multi-user.target, that runs `systemctl poweroff`.
/// Made once (a few minutes, packages from Debian's archive) and cached in
/// ember's cache; each test boots a copy in the host's temporary directory.
struct SystemdRoot(RootfsCopy);

impl SystemdRoot {
    fn new(name: &str) -> SystemdRoot {
        let cache = ember::guest::cache_dir().join("test-images");
        std::fs::create_dir_all(&cache).expect("the test image cache");
        let image = cache.join("debian-bookworm-systemd.ext4");
        let lock = std::fs::File::create(cache.join(".debian-systemd.lock")).expect("lock file");
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        if !image.is_file() {
            eprintln!("linux_lane: building a Debian root with systemd (debootstrap, first run only)");
            let work = cache.join(format!("debian-systemd.{}", std::process::id()));
            std::fs::create_dir_all(&work).expect("work dir");
            let status = std::process::Command::new("sh")
                .args(["-euc", SYSTEMD_ROOT_SCRIPT, "sh"])
                .arg(&image)
                .arg(&work)
                .status()
                .expect("run sh");
            let _ = std::fs::remove_dir_all(&work);
            assert!(status.success(), "building the systemd root failed ({status}); needs debootstrap and the network");
        }
        let dir = std::env::temp_dir().join(format!("ember-lane-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        let copy = dir.join("rootfs.ext4");
        let ok = std::process::Command::new("cp").arg("--sparse=always").arg(&image).arg(&copy).status();
        assert!(ok.is_ok_and(|s| s.success()), "copy the systemd root image");
        SystemdRoot(RootfsCopy { dir, image: copy })
    }

    /// `e2fsck -n`: true when the file system is clean.
    fn clean(&self) -> (bool, String) {
        let o = std::process::Command::new("e2fsck").arg("-fn").arg(&self.0.image).output().expect("run e2fsck");
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }
}

/// Builds the systemd root image: `sh -euc SCRIPT sh OUT.ext4 WORKDIR`.
const SYSTEMD_ROOT_SCRIPT: &str = r#"
out=$1 work=$2 root=$2/root
debootstrap --variant=minbase --include=systemd-sysv,udev bookworm "$root" http://deb.debian.org/debian >&2
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
cat >"$root/etc/systemd/system/ember-poweroff.service" <<'UNIT'
[Unit]
Description=ember test: say so and power off once booted
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo ember-systemd-booted >/dev/console; systemctl --no-block poweroff'
[Install]
WantedBy=multi-user.target
UNIT
ln -sf ../ember-poweroff.service "$root/etc/systemd/system/multi-user.target.wants/ember-poweroff.service"
echo ember >"$root/etc/hostname"
: >"$root/etc/fstab"
mkfs.ext4 -q -F -L ember-systemd -d "$root" "$work/img" 1G
mv "$work/img" "$out"
"#;

/// Debian's own kernel and initrd find the virtio-mmio disk through the DSDT
/// (LNRO0005 -> udev loads virtio_mmio), systemd boots from it, and
/// `systemctl poweroff` ends ember with 0 on a clean file system.
#[test]
fn debian_kernel_boots_systemd_and_poweroff_ends_the_vm() {
    if lane().is_none() {
        return;
    }
    let Some((kernel, initrd)) = debian_kernel() else {
        eprintln!("SKIPPED: no /boot/vmlinuz-* with its initrd (apt install linux-image-amd64)");
        return;
    };
    let root = SystemdRoot::new("debian-systemd");
    let args = ["run", "--kernel", &kernel, "--initrd", &initrd, "--memory", "1G", "--root-disk", root.0.path()];
    let Some(o) = ember_slow(&args, std::time::Duration::from_secs(400)) else { return };
    loud(&format!("debian kernel + systemd root, boot to poweroff in the lane: {:.1} s", o.elapsed.as_secs_f64()));
    assert_eq!(o.status, 0, "{}", show(&o));
    // The kernel's own last word (pr_emerg, shown under `quiet`): systemd got as far as powering off.
    assert!(o.stdout_lossy().contains("reboot: Power down"), "{}", show(&o));
    let (clean, fsck) = root.clean();
    assert!(clean, "e2fsck -fn after the power-off:\n{fsck}");
}

/// The default kernel has what systemd needs (cgroups, namespaces, autofs,
/// seccomp, ...): the same root boots to multi-user and powers off.
#[test]
fn default_kernel_boots_systemd_and_poweroff_ends_the_vm() {
    if lane().is_none() {
        return;
    }
    let root = SystemdRoot::new("default-systemd");
    let args = ["run", "--memory", "1G", "--root-disk", root.0.path()];
    let Some(o) = ember_slow(&args, std::time::Duration::from_secs(300)) else { return };
    loud(&format!("default kernel + systemd root, boot to poweroff in the lane: {:.1} s", o.elapsed.as_secs_f64()));
    assert_eq!(o.status, 0, "{}", show(&o));
    let out = o.stdout_lossy();
    assert!(out.contains("reboot: Power down"), "{}", show(&o));
    assert!(!out.contains("Freezing execution"), "{}", show(&o));
    let (clean, fsck) = root.clean();
    assert!(clean, "e2fsck -fn after the power-off:\n{fsck}");
}

/// A scratch directory in /tmp, which the nested lane's machine shares writable.
/// A saved default guest with a tap keeps its network: in a network namespace
/// made on the lane's machine (tap etap0, 10.0.0.1/24), the guest is saved with
/// `--net tap=etap0`, then restored (the tap reopened by name) to configure
/// eth0 and ping the namespace's address; ping needs the restored guest's
/// timers too.
#[test]
fn a_saved_guest_with_a_tap_pings_after_restore() {
    let Some(mut l) = lane() else { return };
    let dir = TmpDir::new("snapnet");
    let ember_bin = env!("CARGO_BIN_EXE_ember");
    let saved = dir.s("saved");
    let script = format!(
        r#"
modprobe tun 2>/dev/null
rm -rf {saved}
NS=ember-snet-$$
ip netns add $NS || exit 90
trap 'ip netns del $NS' EXIT
ip -n $NS link set lo up
ip -n $NS tuntap add dev etap0 mode tap || exit 91
ip -n $NS addr add 10.0.0.1/24 dev etap0
ip -n $NS link set etap0 up
ip netns exec $NS {ember_bin} run --save-snapshot {saved} --net tap=etap0 || exit 92
ip netns exec $NS {ember_bin} run --from-snapshot {saved} -- sh -c   'ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ping -c 3 10.0.0.1'
"#
    );
    let o = lane_sh(&mut l, "the snapshot network script", &script, std::time::Duration::from_secs(300));
    drop(l);
    assert_eq!(o.status, 0, "{}", show(&o));
    assert!(o.stdout_lossy().contains("3 packets transmitted, 3 packets received"), "{}", show(&o));
}

struct TmpDir(std::path::PathBuf);

impl TmpDir {
    fn new(name: &str) -> TmpDir {
        let p = std::env::temp_dir().join(format!("ember-lane-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
    fn s(&self, f: &str) -> String {
        self.0.join(f).display().to_string()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_saved_guest_restores_runs_a_command_and_reads_its_disk() {
    let dir = TmpDir::new("snapshot");
    std::fs::write(dir.0.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    let disk = dir.s("disk.img");
    // A disk written before the snapshot...
    let Some(o) = ember(&["run", "--disk", &disk, "--", "sh", "-c", "printf written-before > /dev/vda && sync"]) else {
        return;
    };
    assert_eq!(o.status, 0, "{}", show(&o));
    // ...the default guest saved when its init waits for a command...
    let Some(o) = ember(&["run", "--save-snapshot", &dir.s("saved"), "--disk", &disk]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    assert!(o.stderr_lossy().contains("--from-snapshot"), "{}", show(&o));
    let state_len = std::fs::metadata(dir.0.join("saved/state")).unwrap().len();
    let mem = std::fs::metadata(dir.0.join("saved/memory")).unwrap();
    assert_eq!(mem.len(), 256 << 20, "the memory file is guest RAM's size");
    {
        use std::os::unix::fs::MetadataExt;
        assert!(mem.blocks() * 512 < 128 << 20, "untouched guest RAM is a hole in the memory file");
    }
    assert!(state_len > 1000);
    // ...restores, runs the command with its status, and reads the disk back; twice.
    let cmd = "head -c 14 /dev/vda; echo; exit 7";
    let Some(o) = ember(&["run", "--from-snapshot", &dir.s("saved"), "--", "sh", "-c", cmd]) else { return };
    assert_eq!(o.status, 7, "{}", show(&o));
    assert_eq!(o.stdout_lossy().replace("\r\n", "\n"), "written-before\n", "{}", show(&o));
    let Some(o) = ember(&["run", "--from-snapshot", &dir.s("saved"), "--", "echo", "a b", "'c'"]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    assert_eq!(o.stdout_lossy(), "a b 'c'\n", "console ports: bytes unchanged, no CR: {}", show(&o));
    // The saved console's ports carry the restored command's stdio: stdout and stderr apart, byte
    // exact, and a piped stdin arrives whole and then ends...
    let input = b"line one\n\x00\xffno newline at the end";
    let script = "cat; echo to-stderr >&2; exit 3";
    let Some(o) = ember_stdin(&["run", "--from-snapshot", &dir.s("saved"), "--", "sh", "-c", script], input) else {
        return;
    };
    assert_eq!(o.status, 3, "{}", show(&o));
    assert_eq!(o.stdout, input, "{}", show(&o));
    assert_eq!(o.stderr_lossy(), "to-stderr\n", "{}", show(&o));
    // ...and with --output=console everything shares the serial console, as on a terminal.
    let Some(o) = ember(&[
        "run",
        "--from-snapshot",
        &dir.s("saved"),
        "--output=console",
        "--",
        "sh",
        "-c",
        "echo on-out; echo on-err >&2; ls /dev/vport*",
    ]) else {
        return;
    };
    assert_eq!(o.status, 0, "{}", show(&o));
    let out = o.stdout_lossy().replace("\r\n", "\n");
    assert!(out.contains("on-out\n") && out.contains("on-err\n") && out.contains("/dev/vport"), "{}", show(&o));
    // Its timers run: a sleep ends (the armed TSC deadline is restored after the LAPIC), and so
    // poweroff, which waits on timers, ends the VM with 0.
    let Some(o) = ember(&["run", "--from-snapshot", &dir.s("saved"), "--", "sh", "-c", "sleep 1; echo slept"]) else {
        return;
    };
    assert_eq!((o.status, o.stdout_lossy().trim()), (0, "slept"), "{}", show(&o));
    let Some(o) = ember(&["run", "--from-snapshot", &dir.s("saved"), "--", "poweroff"]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    // It was saved with its ACPI tables, as a booted guest has them.
    let Some(o) = ember(&["run", "--from-snapshot", &dir.s("saved"), "--", "ls", "/sys/firmware/acpi/tables"]) else {
        return;
    };
    assert!(o.stdout_lossy().contains("DSDT"), "{}", show(&o));
    // A damaged state file is refused, and no guest runs.
    let state = dir.0.join("saved/state");
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&state, bytes).unwrap();
    let Some(o) = ember(&["run", "--from-snapshot", &dir.s("saved"), "--", "true"]) else { return };
    assert_eq!(o.status, 125, "{}", show(&o));
    assert!(o.stderr_lossy().contains("damaged"), "{}", show(&o));
}
