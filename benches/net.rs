//! virtio-net speed: TCP throughput with iperf3, guest -> host and host -> guest (`-R`), and ping
//! round-trip time, side by side with the same measurements between two network namespaces joined
//! by a veth pair on the same machine, as ratios.
//!
//! Lane: a Linux guest is needed (TCP, ping), so this runs in the Linux lane: on a host whose KVM
//! is kvm_pvm that is the nested QEMU TCG machine, and both the ember path and the veth reference
//! are measured *inside* it, so the ratio compares ember with the kernel's own path on the same
//! (emulated) CPU. The lane is named in the output.
//!
//! The guest runs iperf3 from the tools image (guest-kernels/tools.sh, its only disk, /dev/vda,
//! mounted read-only); the servers and the veth client are the host's own iperf3 (Debian's, the
//! same binary the image carries), which the outer machine sees at the host's paths. Everything
//! runs in namespaces the script creates and deletes on exit, also on failure: the ember tap's
//! (server 10.0.0.1, guest 10.0.0.2) and two joined by the veth pair (10.1.0.1, 10.1.0.2).
//!
//! `--net user` (passt) is measured in the same run, against the tap: the same guest command in a
//! namespace with a veth pair whose both ends stay inside (the default route via 10.0.0.1, an address
//! no interface has, so passt's gateway mapping carries the guest to the namespace's loopback, where
//! the server listens). Then the start-up cost of `--net user`: the wall time of `ember run -- cat
//! /proc/uptime` without a network, with `--net user` (eth0 set from ember.net=) and with `--net user`
//! and DHCP (`ember.net=dhcp`: busybox udhcpc), interleaved, medians; the guest's uptime when the
//! command ran says how much of the difference is inside the guest.
//!
//! `cargo bench --bench net` ; EMBER_NET_BENCH_SECS sets each iperf3 run's length (default 5),
//! EMBER_NET_BENCH_STARTS the start-up rounds (default 5).

use std::path::Path;
use std::time::Duration;

use ember::lane::{Invocation, LinuxLane};

/// The Mbit/s of an iperf3 `... receiver` summary line (`-f m`), tagged `tag` by the script.
fn mbits(out: &str, tag: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.starts_with(tag) && l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent");
        return;
    }
    let secs: u32 = std::env::var("EMBER_NET_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let bin = Path::new(env!("CARGO_BIN_EXE_ember"));
    ember::guest::default_guest(false).unwrap_or_else(|e| panic!("the default guest: {e}"));
    let tools = ember::guest::default_tools().unwrap_or_else(|e| panic!("the tools image (iperf3): {e}"));
    let iperf3 = ["/usr/bin/iperf3", "/bin/iperf3"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| panic!("no iperf3 on the host (apt-get install iperf3; tools.sh installs it too)"));
    let mut lane = LinuxLane::start(bin).unwrap_or_else(|e| panic!("the Linux lane: {e}"));
    // This goes between single quotes in the script below: no single quotes in it.
    let rounds: u32 = std::env::var("EMBER_NET_BENCH_STARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let guest_cmd = format!(
        "ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ping -c 10 -i 0.2 10.0.0.1 | tail -1 && \
         mount -o ro /dev/vda /mnt && \
         /mnt/bin/iperf3 -c 10.0.0.1 -t {secs} -f m | sed s/^/up:/ && \
         /mnt/bin/iperf3 -c 10.0.0.1 -t {secs} -f m -R | sed s/^/down:/"
    );
    let script = format!(
        r#"
modprobe tun 2>/dev/null; modprobe veth 2>/dev/null
NS=ember-bnet-$$; A=ember-bva-$$; B=ember-bvb-$$
cleanup() {{ kill $S1 $S2 2>/dev/null; ip netns del $NS; ip netns del $A; ip netns del $B; }}
trap cleanup EXIT
# iperf3 makes a temporary file per stream in $TMPDIR (default /tmp, the lane's 9p /tmp, where it fails).
export TMPDIR=/dev/shm
for n in $NS $A $B; do ip netns add $n || exit 90; ip -n $n link set lo up; done
ip -n $NS tuntap add dev etap0 mode tap
ip -n $NS addr add 10.0.0.1/24 dev etap0
ip -n $NS link set etap0 up
ip -n $A link add va type veth peer name vb netns $B || exit 91
ip -n $A addr add 10.1.0.1/24 dev va; ip -n $A link set va up
ip -n $B addr add 10.1.0.2/24 dev vb; ip -n $B link set vb up
ip netns exec $NS {iperf3} -s -B 10.0.0.1 >/dev/null 2>&1 & S1=$!
ip netns exec $A {iperf3} -s -B 10.1.0.1 >/dev/null 2>&1 & S2=$!
sleep 1
echo veth-ping $(ip netns exec $B busybox ping -c 10 -i 0.2 10.1.0.1 | tail -1)
ip netns exec $B {iperf3} -c 10.1.0.1 -t {secs} -f m | sed 's/^/veth-up /'
ip netns exec $B {iperf3} -c 10.1.0.1 -t {secs} -f m -R | sed 's/^/veth-down /'
ip netns exec $NS {bin} run --memory 512M --disk {tools},ro --net tap=etap0 -- sh -c '{guest_cmd}' | sed 's/^/guest /'
# --net user: passt in namespace $U, whose loopback the guest reaches at its gateway 10.0.0.1.
U=ember-bnu-$$
ip netns add $U || exit 93
trap 'cleanup; kill $S3 2>/dev/null; ip netns del $U' EXIT
ip -n $U link set lo up
ip -n $U link add uv0 type veth peer name uv1 || exit 94
ip -n $U addr add 10.0.0.2/24 dev uv0; ip -n $U addr add 10.0.0.3/24 dev uv1
ip -n $U link set uv0 up; ip -n $U link set uv1 up
ip -n $U route add default via 10.0.0.1 dev uv0
ip netns exec $U {iperf3} -s -B 127.0.0.1 >/dev/null 2>&1 & S3=$!
sleep 1
ip netns exec $U {bin} run --memory 512M --disk {tools},ro --net user -- sh -c '{user_cmd}' | sed 's/^/user /'
# Start-up: no network, --net user (ember.net= static), --net user with DHCP; interleaved.
CL="{cl}"
for i in $(seq {rounds}); do
    for mode in none user dhcp; do
        case $mode in
        none) set -- ;;
        user) set -- --net user ;;
        dhcp) set -- --net user --cmdline "$CL" ;;
        esac
        t0=$(date +%s%N)
        up=$(ip netns exec $U {bin} run "$@" -- cat /proc/uptime | tr -d '\r')
        t1=$(date +%s%N)
        echo "start $mode $(( (t1 - t0) / 1000000 )) ${{up%% *}}"
    done
done
"#,
        bin = bin.display(),
        tools = tools.display(),
        cl = ember::guest::default_cmdline_with("ember.net=dhcp"),
        // A stalled transfer (see the README's figures) must not hold the rest of the run.
        user_cmd = guest_cmd
            .replace("ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ", "")
            .replace("/mnt/bin/iperf3", "timeout 90 /mnt/bin/iperf3"),
    );
    let o = lane
        .run_program(Path::new("/bin/sh"), &Invocation::new(["-c", script.as_str()]), Duration::from_secs(1200))
        .unwrap_or_else(|e| panic!("the benchmark script: {e}"));
    let out = o.stdout_lossy().replace('\r', "");
    let find = |tag: &str| out.lines().find_map(|l| l.strip_prefix(tag).map(str::trim).map(str::to_string));
    let avg_ms = |line: Option<String>| -> Option<f64> {
        // busybox: "round-trip min/avg/max = 0.1/0.2/0.3 ms"
        line?.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok()
    };
    let (up, down) = (mbits(&out, "guest up:"), mbits(&out, "guest down:"));
    let (veth_up, veth_down) = (mbits(&out, "veth-up "), mbits(&out, "veth-down "));
    let (Some(up), Some(veth_up)) = (up, veth_up) else {
        panic!("the benchmark did not finish (status {}):\n{out}\n{}", o.status, o.stderr_lossy());
    };
    let guest_rtt = avg_ms(find("guest round-trip"));
    let veth_rtt = avg_ms(find("veth-ping round-trip"));
    println!("virtio-net benchmark, lane: {}", lane.describe());
    println!("TCP, iperf3 -t {secs} (receiver's figure):");
    println!("  guest -> host, ember virtio-net + tap : {up:10.1} Mbit/s");
    println!("  netns -> netns over veth              : {veth_up:10.1} Mbit/s");
    println!("  ratio                                 : {:10.1} %", 100.0 * up / veth_up);
    match (down, veth_down) {
        (Some(d), Some(v)) => {
            println!("  host -> guest (-R), ember             : {d:10.1} Mbit/s");
            println!("  netns -> netns over veth (-R)         : {v:10.1} Mbit/s");
            println!("  ratio                                 : {:10.1} %", 100.0 * d / v);
        }
        _ => println!("  host -> guest (-R): no result"),
    }
    let (uup, udown) = (mbits(&out, "user up:"), mbits(&out, "user down:"));
    println!("--net user (passt) against --net tap, same guest, same run:");
    for (what, u, t) in [("guest -> host", uup, Some(up)), ("host -> guest (-R)", udown, down)] {
        match (u, t) {
            (Some(u), Some(t)) => {
                println!("  {what:<20} passt {u:10.1} Mbit/s, tap {t:10.1} Mbit/s, ratio {:6.2}", u / t)
            }
            _ => println!("  {what:<20} no result"),
        }
    }
    let median = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
    };
    println!("start-up, `ember run [--net user] -- cat /proc/uptime`, {rounds} interleaved rounds, medians:");
    let mut base = None;
    for mode in ["none", "user", "dhcp"] {
        let (mut wall, mut up): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
        for l in out.lines().filter_map(|l| l.strip_prefix(&format!("start {mode} "))) {
            let w: Vec<&str> = l.split_whitespace().collect();
            if let (Some(a), Some(b)) = (w.first().and_then(|x| x.parse().ok()), w.get(1).and_then(|x| x.parse().ok()))
            {
                wall.push(a);
                up.push(b);
            }
        }
        let (w, u) = (median(&mut wall), median(&mut up) * 1000.0);
        let label = match mode {
            "none" => "no network",
            "user" => "--net user (ember.net=)",
            _ => "--net user, DHCP",
        };
        let b = *base.get_or_insert(w);
        println!("  {label:<24} wall {w:8.0} ms ({:+6.0} ms), guest uptime at the command {u:8.0} ms", w - b);
    }
    match (guest_rtt, veth_rtt) {
        (Some(g), Some(v)) => {
            println!("ping round trip (avg of 10):");
            println!("  ember guest -> host    : {g:10.3} ms");
            println!("  veth between netns     : {v:10.3} ms");
            println!("  ratio (ember / veth)   : {:10.1} x", g / v);
        }
        _ => println!("ping: no result\n{out}"),
    }
}
