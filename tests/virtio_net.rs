//! virtio-net in the fast lane: the real `ember` binary runs a freestanding
//! guest with a minimal virtio-mmio network driver (tests/guests/virtio_net.S)
//! on a tap inside a network namespace made by the test (10.0.0.1/24 on the
//! host side, the guest is 10.0.0.2). The guest ARPs for the host and prints
//! the reply; the test captures the guest's request on the tap (AF_PACKET)
//! and checks it byte for byte, then injects frames that the guest prints
//! back in hex. Nothing leaves the namespace, which is deleted on drop.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Input, ember_bin, ember_with, guest, kvm_available};
use netns::{NetNs, PacketSocket, hex};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn ember_in(ns: &NetNs, args: &[&str]) -> common::Run {
    let mut cmd = ns.command(ember_bin());
    cmd.arg("run").arg("--kernel").arg(guest("virtio_net")).args(["--serial", "stdio"]).args(args);
    ember_with(&mut cmd, Input::Null)
}

/// A frame to the guest: EtherType `ty`, `len` bytes in all, a counting pattern.
fn test_frame(src: &[u8], ty: u16, len: usize, seed: u8) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(src);
    f.extend_from_slice(&ty.to_be_bytes());
    f.extend((0..len - 14).map(|i| seed.wrapping_add(i as u8).wrapping_mul(7)));
    f
}

#[test]
fn guest_arps_for_the_host_and_receives_injected_frames() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::new("vnet") else { return };
    ns.add_tap("etap0", "10.0.0.1/24");
    let tap_mac = ns.mac_hex("etap0");
    let src = [0x02, 0, 0, 0, 0, 0x99];
    let frames =
        vec![test_frame(&src, 0x88b5, 60, 1), test_frame(&src, 0x88b5, 1514, 2), test_frame(&src, 0x88b6, 64, 3)];

    // The host side: wait for the guest's ARP request, then inject the frames.
    let (ready_tx, ready_rx) = mpsc::channel();
    let host = {
        let ns_name = ns.name.clone();
        let frames = frames.clone();
        std::thread::spawn(move || {
            let ns = NetNs { name: ns_name };
            ns.enter_this_thread();
            let sock = PacketSocket::bind("etap0", Duration::from_secs(1));
            std::mem::forget(ns); // the owner deletes it, not this copy
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut request = None;
            while Instant::now() < deadline && request.is_none() {
                if let Some(f) = sock.recv()
                    && f.len() >= 42
                    && f[12..14] == [0x08, 0x06]
                    && f[6..12] == GUEST_MAC
                {
                    request = Some(f);
                }
            }
            if request.is_some() {
                for f in &frames {
                    sock.send(f);
                }
            }
            request
        })
    };
    ready_rx.recv().unwrap();
    let run = ember_in(&ns, &["--net", "tap=etap0,mac=52:54:00:12:34:56"]);
    let request = host.join().unwrap();
    run.expect_code(0);
    let out = &run.stdout;
    let mut want = vec![
        "device=1".to_string(),
        "mac=525400123456".into(),
        "status=1".into(),
        "arp-request sent".into(),
        format!("arp-reply ip=0a000001 mac={tap_mac}"),
    ];
    want.extend(frames.iter().map(|f| format!("rx {}", hex(f))));
    want.push("done".into());
    for w in &want {
        assert!(out.lines().any(|l| l == w), "no line `{w}` in the guest's output:\n{out}\n{}", run.stderr);
    }
    // The request as it left the guest, byte for byte.
    let mut arp = vec![0xff; 6];
    arp.extend(GUEST_MAC);
    arp.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend(GUEST_MAC);
    arp.extend([10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    assert_eq!(request.as_deref().map(hex), Some(hex(&arp)), "the guest's ARP request on the tap");
}

#[test]
fn default_mac_is_stable_and_create_removes_the_tap() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::new("vnetc") else { return };
    let mut macs = Vec::new();
    for _ in 0..2 {
        let run = ember_in(&ns, &["--net", "tap=ecreate0,create", "--cmdline", "probe"]);
        run.expect_code(0);
        assert!(run.stdout.contains("probe done"), "{}", run.stdout);
        macs.push(run.stdout.lines().find(|l| l.starts_with("mac=")).map(str::to_string));
        let gone = ns.command("ip").args(["link", "show", "ecreate0"]).output().unwrap();
        assert!(!gone.status.success(), "the tap ember created is gone after it exits");
    }
    assert_eq!(macs[0], macs[1], "same tap, same MAC");
    let mac = macs[0].clone().unwrap();
    assert!(mac.starts_with("mac=525400"), "{mac}");
}

#[test]
fn bad_nets_fail_at_start_up() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::new("vnetbad") else { return };
    ns.add_tap("ebad0", "10.0.1.1/24");
    for (args, says) in [
        (vec!["--net", "tap=nosuch0"], "does not exist"),
        (vec!["--net", "tap=ebad0,mac=52:54:00:12:34"], "not a MAC address"),
        (vec!["--net", "tap=ebad0,mac=01:00:5e:00:00:01"], "not a MAC address"),
        (vec!["--net", "tap=ebad0", "--net", "tap=ebad0"], "named twice"),
        (vec!["--net", "tap=a234567890123456"], "not understood"),
        (vec!["--net", "tap=ebad0,create"], "already exists"),
        (vec!["--net", "ebad0"], "not understood"),
    ] {
        let run = ember_in(&ns, &args);
        run.expect_code(125);
        assert!(run.stderr.contains(says), "{args:?}: no `{says}` in:\n{}", run.stderr);
    }
    // Held by another process: refused, not shared.
    let name = ns.name.clone();
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let ns = NetNs { name };
        ns.enter_this_thread();
        std::mem::forget(ns);
        let tap = ember::host::tap::Tap::open("ebad0", false).expect("open the tap");
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
        drop(tap);
    });
    held_rx.recv().unwrap();
    let run = ember_in(&ns, &["--net", "tap=ebad0"]);
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    run.expect_code(125);
    assert!(run.stderr.contains("in use by another process"), "{}", run.stderr);
}
