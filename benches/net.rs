//! virtio-net speed: guest -> host TCP throughput and ping round-trip time,
//! side by side with the same measurement between two network namespaces
//! joined by a veth pair on the same machine, as ratios.
//!
//! Lane: a Linux guest is needed (TCP, ping), so this runs in the Linux lane:
//! on a host whose KVM is kvm_pvm that is the nested QEMU TCG machine, and
//! both the ember path and the veth reference are measured *inside* it, so
//! the ratio compares ember with the kernel's own path on the same (emulated)
//! CPU. The guest has only busybox (Debian's iperf3 is dynamically linked and
//! the default guest has no libc), so the workload is `dd if=/dev/zero | nc`
//! for both paths, timed on the receiving side from the first byte to EOF.
//!
//! `cargo bench --bench net` ; EMBER_NET_BENCH_MIB sets the transfer size (default 64).

use std::path::Path;
use std::time::Duration;

use ember::lane::{Invocation, LinuxLane};

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent");
        return;
    }
    let mib: u32 = std::env::var("EMBER_NET_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let bin = Path::new(env!("CARGO_BIN_EXE_ember"));
    ember::guest::default_guest(false).unwrap_or_else(|e| panic!("the default guest: {e}"));
    let mut lane = LinuxLane::start(bin).unwrap_or_else(|e| panic!("the Linux lane: {e}"));
    let guest_cmd = format!(
        "ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ping -c 10 -i 0.2 10.0.0.1 | tail -1 && \
         dd if=/dev/zero bs=1M count={mib} 2>/dev/null | nc 10.0.0.1 5000"
    );
    let script = format!(
        r#"
modprobe tun 2>/dev/null; modprobe veth 2>/dev/null
NS=ember-bnet-$$; A=ember-bva-$$; B=ember-bvb-$$
D=$(mktemp -d -p /dev/shm)  # tmpfs: the lane's /tmp is 9p, which has no fifos
cleanup() {{ kill $SP1 $SP2 2>/dev/null; ip netns del $NS; ip netns del $A; ip netns del $B; rm -rf $D; }}
trap cleanup EXIT
for n in $NS $A $B; do ip netns add $n || exit 90; ip -n $n link set lo up; done
ip -n $NS tuntap add dev etap0 mode tap
ip -n $NS addr add 10.0.0.1/24 dev etap0
ip -n $NS link set etap0 up
ip -n $A link add va type veth peer name vb netns $B || exit 91
ip -n $A addr add 10.1.0.1/24 dev va; ip -n $A link set va up
ip -n $B addr add 10.1.0.2/24 dev vb; ip -n $B link set vb up
# sink PORT FILE: a listener that stamps the first byte and EOF
mkfifo $D/in1 $D/in2
sleep 900 > $D/in1 & SP1=$!
sleep 900 > $D/in2 & SP2=$!
ip netns exec $NS sh -c "busybox nc -l -p 5000 < $D/in1 | (head -c1 > /dev/null; date +%s%N > $D/tap0; cat > /dev/null; date +%s%N > $D/tap1)" &
ip netns exec $A sh -c "busybox nc -l -p 5001 < $D/in2 | (head -c1 > /dev/null; date +%s%N > $D/veth0; cat > /dev/null; date +%s%N > $D/veth1)" &
sleep 0.5
echo veth-ping $(ip netns exec $B busybox ping -c 10 -i 0.2 10.1.0.1 | tail -1)
ip netns exec $B sh -c "dd if=/dev/zero bs=1M count={mib} 2>/dev/null | busybox nc 10.1.0.1 5001"
ip netns exec $NS {bin} run --memory 512M --net tap=etap0 -- sh -c '{guest_cmd}' | sed 's/^/guest /'
for i in $(seq 50); do [ -s $D/tap1 ] && [ -s $D/veth1 ] && break; sleep 0.2; done
echo tap-ns $(( $(cat $D/tap1) - $(cat $D/tap0) ))
echo veth-ns $(( $(cat $D/veth1) - $(cat $D/veth0) ))
"#,
        bin = bin.display()
    );
    let o = lane
        .run_program(Path::new("/bin/sh"), &Invocation::new(["-c", script.as_str()]), Duration::from_secs(1200))
        .unwrap_or_else(|e| panic!("the benchmark script: {e}"));
    let out = o.stdout_lossy().replace("\r\n", "\n");
    let find = |tag: &str| out.lines().find_map(|l| l.strip_prefix(tag).map(str::trim).map(str::to_string));
    let avg_ms = |line: Option<String>| -> Option<f64> {
        // busybox: "round-trip min/avg/max = 0.1/0.2/0.3 ms"
        line?.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok()
    };
    let secs = |tag: &str| find(tag).and_then(|v| v.parse::<f64>().ok()).map(|ns| ns / 1e9);
    let (Some(tap_s), Some(veth_s)) = (secs("tap-ns "), secs("veth-ns ")) else {
        panic!("the benchmark did not finish (status {}):\n{out}\n{}", o.status, o.stderr_lossy());
    };
    let bytes = f64::from(mib) * 1048576.0 - 1.0;
    let (tap_mbs, veth_mbs) = (bytes / tap_s / 1e6, bytes / veth_s / 1e6);
    let guest_rtt = avg_ms(find("guest round-trip"));
    let veth_rtt = avg_ms(find("veth-ping round-trip"));
    println!("virtio-net benchmark, lane: {}", lane.describe());
    println!("TCP guest -> host ({mib} MiB, busybox dd | nc):");
    println!("  ember virtio-net + tap : {tap_mbs:10.1} MB/s");
    println!("  veth between netns     : {veth_mbs:10.1} MB/s");
    println!("  ratio                  : {:10.1} %", 100.0 * tap_mbs / veth_mbs);
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
