//! `--net user` with the default Linux guest, in the Linux lane (the host
//! itself on hardware KVM, the nested QEMU SVM machine on hosts like
//! kvm_pvm; started once for this test binary, see tests/linux_lane.rs).
//!
//! Every test makes its own network namespace with a veth pair whose both ends
//! stay inside (uv0 10.0.0.2/24 with the default route via 10.0.0.1, uv1
//! 10.0.0.3/24), runs its servers in that namespace and runs ember inside it,
//! so passt runs there too: nothing the tests send leaves the namespace. The
//! guest's address is 10.0.0.2 (passt copies the host's), its gateway 10.0.0.1,
//! an address no interface has: only passt's mapping of the gateway to the
//! namespace's loopback lets the guest reach a server there.

#[path = "common/lane_retry.rs"]
mod lane_retry;
#[path = "common/netns.rs"]
mod netns;

use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ember::guest::{GuestArtifacts, default_guest};
use ember::lane::{Invocation, LinuxLane, Outcome};
use lane_retry::once_more_if_the_lane_failed;

static LANE: OnceLock<Option<Mutex<LinuxLane>>> = OnceLock::new();
static GUEST: OnceLock<GuestArtifacts> = OnceLock::new();

fn guest() -> &'static GuestArtifacts {
    GUEST.get_or_init(|| default_guest(false).unwrap_or_else(|e| panic!("building the default guest: {e}")))
}

/// The lane, or None (and a SKIPPED line) without /dev/kvm or passt.
fn lane() -> Option<MutexGuard<'static, LinuxLane>> {
    LANE.get_or_init(|| {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: /dev/kvm absent — --net user Linux tests not run");
            return None;
        }
        if ember::host::passt::find_binary().is_err() {
            eprintln!("SKIPPED: passt is not installed (apt install passt) — --net user Linux tests not run");
            return None;
        }
        guest();
        let bin = Path::new(env!("CARGO_BIN_EXE_ember"));
        let lane = LinuxLane::start(bin).unwrap_or_else(|e| panic!("the Linux lane cannot start: {e}"));
        eprintln!("Linux lane: {}", lane.describe());
        Some(Mutex::new(lane))
    })
    .as_ref()
    .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
}

fn show(o: &Outcome) -> String {
    format!("status {}\n--- stdout\n{}\n--- stderr\n{}", o.status, o.stdout_lossy(), o.stderr_lossy())
}

/// The namespace set-up every in-lane script starts with ($NS, a scratch dir $D on tmpfs, cleanup on
/// exit: the namespace, and with it every interface, goes).
const SETUP: &str = r#"
modprobe veth 2>/dev/null
NS=ember-nu-$$
D=$(mktemp -d -p /dev/shm)
ip netns add $NS || exit 90
cleanup() { for p in $PIDS; do kill $p 2>/dev/null; done; ip netns del $NS; rm -rf $D; }
trap cleanup EXIT
PIDS=
ip -n $NS link set lo up
ip -n $NS link add uv0 type veth peer name uv1 || exit 91
ip -n $NS addr add 10.0.0.2/24 dev uv0
ip -n $NS addr add 10.0.0.3/24 dev uv1
ip -n $NS link set uv0 up
ip -n $NS link set uv1 up
ip -n $NS route add default via 10.0.0.1 dev uv0
IN="ip netns exec $NS"
"#;

/// Runs `script` (after [`SETUP`]) with /bin/sh on the lane's machine; one loud retry when the nested
/// lane's emulated machine fails the run (`lane_retry`), judged by `ok`.
fn lane_script(script: &str, ok: impl Fn(&Outcome) -> bool) -> Option<Outcome> {
    let mut l = lane()?;
    let full = format!("{SETUP}\nE={}\n{script}", env!("CARGO_BIN_EXE_ember"));
    let inv = Invocation::new(["-c", full.as_str()]);
    let attempt = || l.run_program(Path::new("/bin/sh"), &inv, Duration::from_secs(400));
    // Retried once, loudly (`lane_retry`): an outer machine that wedged or died, or, in the nested lane
    // only, a run that failed its check there.
    let o = once_more_if_the_lane_failed("a --net user run", attempt, ok, show);
    Some(o.unwrap_or_else(|e| panic!("the network script: {e}")))
}

/// The value after `tag` on a line of `out`.
fn field<'a>(out: &'a str, tag: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(tag)).and_then(|l| l.split_whitespace().next())
}

/// The guest connects to its gateway (10.0.0.1, on no interface), which passt maps to the namespace's
/// loopback, where a busybox nc listens; 16 MiB of random bytes arrive with the sha256 the guest computed.
#[test]
fn guest_sends_16_mib_to_the_host_loopback_through_the_gateway() {
    let script = r#"
mkfifo $D/in
sleep 900 > $D/in & PIDS="$PIDS $!"
$IN busybox nc -l -p 5000 < $D/in | sha256sum > $D/sum & PIDS="$PIDS $!"
sleep 0.3
$IN timeout 300 $E run --memory 512M --net user -- sh -c '
    dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null &&
    echo guest-sha $(sha256sum < /tmp/data) && ip route && timeout 200 nc 10.0.0.1 5000 < /tmp/data && echo sent'
rc=$?
for i in $(seq 50); do [ -s $D/sum ] && break; sleep 0.2; done
echo host-sha $(cat $D/sum)
exit $rc
"#;
    let Some(o) = lane_script(script, |o| o.status == 0 && o.stdout_lossy().contains("sent")) else { return };
    let out = o.stdout_lossy().replace("\r\n", "\n");
    assert_eq!(o.status, 0, "{}", show(&o));
    assert!(out.contains("default via 10.0.0.1 dev eth0"), "eth0 configured from ember.net=: {}", show(&o));
    let (g, h) = (field(&out, "guest-sha "), field(&out, "host-sha "));
    assert_eq!(g.map(str::len), Some(64), "{}", show(&o));
    assert_eq!(g, h, "16 MiB arrived intact: {}", show(&o));
}

/// UDP both ways, with iperf3 (the host's, and the guest's from the tools disk, guest-kernels/tools.sh):
/// the guest sends 2 s of 10 Mbit/s UDP to a server reached through its gateway, then serves one test
/// itself, which the host runs against `-p 127.0.0.1:15201:5201` plus `.../udp` (iperf3 controls over
/// TCP and sends its data over UDP). Each receiver's summary must show datagrams arriving.
#[test]
fn udp_goes_both_ways() {
    let Ok(tools) = ember::guest::default_tools() else {
        eprintln!("SKIPPED: no tools image (guest-kernels/tools.sh) for iperf3");
        return;
    };
    let script = format!(
        r#"
export TMPDIR=/dev/shm  # iperf3's temporary files: not on the lane's 9p /tmp
IPERF=$(command -v iperf3) || exit 92
$IN $IPERF -s -1 -p 5201 -f m > $D/srv 2>&1 & PIDS="$PIDS $!"
( for i in $(seq 150); do
      $IN $IPERF -c 127.0.0.1 -p 15201 -u -b 10M -t 2 -f m > $D/cli 2>&1 && break
      sleep 1
  done ) & CLI=$!; PIDS="$PIDS $CLI"
$IN timeout 300 $E run --memory 512M --disk {tools},ro --net user \
    -p 127.0.0.1:15201:5201 -p 127.0.0.1:15201:5201/udp -- sh -c '
    mount -o ro /dev/vda /mnt && export TMPDIR=/tmp &&
    /mnt/bin/iperf3 -c 10.0.0.1 -u -b 10M -t 2 -f m | sed s/^/up:/ &&
    timeout 200 /mnt/bin/iperf3 -s -1 -f m >/dev/null'
rc=$?
wait $CLI
sed 's/^/down:/' $D/cli
exit $rc
"#,
        tools = tools.display()
    );
    let Some(o) = lane_script(&script, |o| o.status == 0) else { return };
    let out = o.stdout_lossy().replace("\r\n", "\n");
    assert_eq!(o.status, 0, "{}", show(&o));
    for dir in ["up:", "down:"] {
        // `[  5]   0.00-2.00  sec  2.38 MBytes  10.0 Mbits/sec  0.010 ms  3/1724 (0.17%)  receiver`
        let line = out.lines().find(|l| l.starts_with(dir) && l.contains("receiver") && l.contains('/'));
        // (Datagrams of up to 64 KiB: passt's MTU is 65520, so 2 s at 10 Mbit/s is about 76 of them.)
        let lost_total = line
            .and_then(|l| l.split_whitespace().find(|w| w.contains('/') && !w.contains("sec")))
            .and_then(|w| Some((w.split('/').next()?.parse::<u64>().ok()?, w.split('/').nth(1)?.parse::<u64>().ok()?)));
        assert!(
            lost_total.is_some_and(|(lost, total)| total >= 20 && lost * 2 < total),
            "{dir} UDP datagrams received: {line:?}\n{}",
            show(&o)
        );
    }
}

/// Two VMs with user networking at once, in one namespace: each has its own passt, each publishes a
/// port and sends 1 MiB to its own listener through the gateway; both arrive intact, and while both
/// run, both published ports answer.
#[test]
fn two_vms_with_user_networking_at_once() {
    let script = r#"
for n in 1 2; do
    mkfifo $D/in$n
    sleep 900 > $D/in$n & PIDS="$PIDS $!"
    $IN busybox nc -l -p 500$n < $D/in$n | sha256sum > $D/sum$n & PIDS="$PIDS $!"
done
sleep 0.3
for n in 1 2; do
    $IN timeout 300 $E run --net user -p 127.0.0.1:1808$n:80 -- sh -c "
        echo vm$n-up > /tmp/page
        nc -l -p 80 < /tmp/page &
        dd if=/dev/urandom of=/tmp/data bs=1M count=1 2>/dev/null &&
        echo guest-sha$n \$(sha256sum < /tmp/data) && timeout 200 nc 10.0.0.1 500$n < /tmp/data &&
        sleep 30 && echo sent$n" > $D/out$n 2>&1 &
    eval "VM$n=\$!"
done
# Both ports are tried in turn until each has answered: a VM that came up first must not wait
# behind the other (each serves its page from boot until 30 s after its transfer).
left="1 2"
for i in $(seq 300); do
    still=
    for n in $left; do
        r=$($IN busybox nc -w 2 127.0.0.1 1808$n </dev/null 2>/dev/null)
        if [ -n "$r" ]; then echo "host-read$n $r"; else still="$still $n"; fi
    done
    left=$still
    [ -z "$left" ] && break
    sleep 0.2
done
wait $VM1; rc1=$?
wait $VM2; rc2=$?
cat $D/out1 $D/out2
for n in 1 2; do
    for i in $(seq 50); do [ -s $D/sum$n ] && break; sleep 0.2; done
    echo host-sha$n $(cat $D/sum$n)
done
echo rc $rc1 $rc2
[ $rc1 = 0 ] && [ $rc2 = 0 ]
"#;
    let Some(o) = lane_script(script, |o| o.status == 0) else { return };
    let out = o.stdout_lossy().replace("\r\n", "\n");
    assert_eq!(o.status, 0, "{}", show(&o));
    for n in 1..=2 {
        let (g, h) = (field(&out, &format!("guest-sha{n} ")), field(&out, &format!("host-sha{n} ")));
        assert_eq!(g.map(str::len), Some(64), "VM {n}: {}", show(&o));
        assert_eq!(g, h, "VM {n}'s 1 MiB arrived intact: {}", show(&o));
        assert!(out.contains(&format!("host-read{n} vm{n}-up")), "VM {n}'s published port: {}", show(&o));
    }
}

/// `ember run --net user -p 127.0.0.1:18090:80` started *on this host*, in a namespace the test makes
/// here: where the host's KVM cannot run Linux, ember falls back to the nested machine, and the
/// published port must still be on this host's loopback (passt runs on the host side, behind a
/// virtio-serial port), not only inside the machine. The guest serves a page on port 80; the test
/// reads it through 127.0.0.1:18090 in the namespace, and the guest reaches a listener on the
/// namespace's loopback through its gateway.
#[test]
fn published_port_is_on_the_host_loopback_in_either_lane() {
    use std::process::{Command, Stdio};
    if !Path::new("/dev/kvm").exists() || ember::host::passt::find_binary().is_err() {
        eprintln!("SKIPPED: no /dev/kvm or no passt");
        return;
    }
    guest();
    // Not through the shared lane (this ember boots its own machine), but holding it: two TCG
    // machines at once would slow both past their timeouts on a 2-core host.
    let _serial = lane();
    let Some(ns) = netns::NetNs::new("nuhost") else { return };
    if Command::new("modprobe").arg("veth").output().is_err() {
        eprintln!("SKIPPED: no modprobe");
        return;
    }
    ns.ip(&["link", "add", "uv0", "type", "veth", "peer", "name", "uv1"]);
    ns.ip(&["addr", "add", "10.0.0.2/24", "dev", "uv0"]);
    ns.ip(&["addr", "add", "10.0.0.3/24", "dev", "uv1"]);
    ns.ip(&["link", "set", "uv0", "up"]);
    ns.ip(&["link", "set", "uv1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.0.0.1", "dev", "uv0"]);
    let mut listener = ns
        .command("busybox")
        .args(["nc", "-l", "-p", "5000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox nc in the namespace");
    // The guest says hello, then serves one request on port 80 and exits.
    let guest_cmd = "echo hello-host | timeout 60 nc 10.0.0.1 5000; \
                     echo page-from-guest > /tmp/page; timeout 200 nc -l -p 80 < /tmp/page";
    let mut vm = ns
        .command("timeout")
        .args([
            "300",
            env!("CARGO_BIN_EXE_ember"),
            "run",
            "--net",
            "user",
            "-p",
            "127.0.0.1:18090:80",
            "--",
            "sh",
            "-c",
            guest_cmd,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ember in the namespace");
    let mut page = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while std::time::Instant::now() < deadline && !page.contains("page-from-guest") {
        let o = ns.sh("busybox nc -w 2 127.0.0.1 18090 </dev/null");
        page = String::from_utf8_lossy(&o.stdout).into_owned();
        if matches!(vm.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = vm.wait_with_output().expect("ember's output");
    let _ = listener.kill();
    let got = listener.wait_with_output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let shown = format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(page.contains("page-from-guest"), "the published port answered on the host's loopback: {shown}");
    assert!(got.contains("hello-host"), "the guest reached the host's loopback: {shown}");
    assert_eq!(out.status.code(), Some(0), "{shown}");
}
