//! Seeing the layers: `ember demo` chapters, `--stats`, `--timeline` and
//! `--trace-exits`, each run on the real binary under KVM and checked against
//! what the guest did (its output, and the port writes tests/guests/ports.S
//! makes: K one-byte OUTs to port 0x80, then 2- and 4-byte OUTs to 0x84).

mod common;

use common::{ember, kvm_available, run_guest};

/// `[ember] vCPU N exits: T in all: io-in 85 (serial (COM1) 85); io-out 85 (exit device 1, serial (COM1) 84)`
/// -> count of `kind` on `device` (None: all devices) for vCPU `vcpu`.
fn demo_count(stderr: &str, vcpu: usize, kind: &str, device: Option<&str>) -> u64 {
    let prefix = format!("[ember] vCPU {vcpu} exits: ");
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no `{prefix}` line:\n{stderr}"));
    let (_, parts) = line.split_once(" in all: ").expect("`in all:` in the exits line");
    for part in parts.split("; ") {
        let Some(rest) = part.strip_prefix(kind).and_then(|r| r.strip_prefix(' ')) else { continue };
        let (total, devs) = match rest.split_once(" (") {
            Some((t, d)) => (t, d.strip_suffix(')').unwrap_or(d)),
            None => (rest, ""),
        };
        let Some(device) = device else { return total.parse().expect("a count") };
        for d in devs.split(", ") {
            if let Some(n) = d.strip_prefix(device).and_then(|n| n.strip_prefix(' ')) {
                return n.parse().expect("a count");
            }
        }
        return 0;
    }
    0
}

fn demo(chapter: &str) -> common::Run {
    let run = ember(&["demo", chapter]);
    run.expect_code(0);
    run
}

/// Every byte the guest printed was one OUT to the UART's THR, and it
/// polled LSR (an IN) before each; one OUT to the exit device ended it.
fn check_uart_and_exit(run: &common::Run, vcpu: usize) {
    let bytes = run.stdout.len() as u64;
    assert_eq!(demo_count(&run.stderr, vcpu, "io-out", Some("serial (COM1)")), bytes, "{}", run.stderr);
    assert!(demo_count(&run.stderr, vcpu, "io-in", Some("serial (COM1)")) >= bytes, "{}", run.stderr);
    assert_eq!(demo_count(&run.stderr, vcpu, "io-out", Some("exit device")), 1, "{}", run.stderr);
}

const REAL: &str = "real mode: 16-bit code at 0x1000:0000 (CR0.PE=0) writes this with OUT to port 0x3f8\n";
const PROT: &str = "protected mode: CR0.PE=1, flat 4 GiB segments from our GDT, 32-bit code at 1 MiB\n";
const LONG: &str = "long mode: CR4.PAE, EFER.LME and CR0.PG set, 64-bit code on an identity-mapped 2 MiB page\n";

#[test]
fn demo_list_names_every_chapter() {
    let run = ember(&["demo", "--list"]);
    run.expect_code(0);
    for name in ["1  real-mode", "2  protected-mode", "3  long-mode", "4  hypercall", "5  smp", "6  virtio"] {
        assert!(run.stdout.contains(name), "{name}: {}", run.stdout);
    }
    let run = ember(&["demo", "no-such-chapter"]);
    run.expect_code(125);
    assert!(run.stderr.contains("ember demo --list"), "{}", run.stderr);
}

#[test]
fn demo_default_is_still_the_hello_guest() {
    if !kvm_available() {
        return;
    }
    let run = ember(&["demo"]);
    run.expect_code(0);
    assert!(run.stdout.starts_with("Hello from a guest in 64-bit long mode"), "{}", run.stdout);
}

#[test]
fn demo_chapter_1_real_mode() {
    if !kvm_available() {
        return;
    }
    let run = demo("1");
    assert_eq!(run.stdout, REAL);
    check_uart_and_exit(&run, 0);
    assert!(run.stderr.contains("[ember] vCPU 0 stopped in real mode: CR0=0x10 "), "{}", run.stderr);
    assert!(run.stderr.contains("CS=0x1000 (base 0x10000)"), "{}", run.stderr);
    assert!(run.stderr.contains("[ember] layers: "), "{}", run.stderr);
}

#[test]
fn demo_chapter_2_protected_mode() {
    if !kvm_available() {
        return;
    }
    let run = demo("protected-mode");
    assert_eq!(run.stdout, format!("{REAL}{PROT}"));
    check_uart_and_exit(&run, 0);
    assert!(run.stderr.contains("stopped in 32-bit protected mode: CR0=0x11 CR4=0x0 EFER=0x0"), "{}", run.stderr);
}

#[test]
fn demo_chapter_3_long_mode() {
    if !kvm_available() {
        return;
    }
    let run = demo("3");
    assert_eq!(run.stdout, format!("{REAL}{PROT}{LONG}"));
    check_uart_and_exit(&run, 0);
    // PG|ET|PE; PAE; LMA|LME.
    assert!(run.stderr.contains("stopped in long mode (64-bit): CR0=0x80000011 CR4=0x20 EFER=0x500"), "{}", run.stderr);
}

#[test]
fn demo_chapter_4_hypercall() {
    if !kvm_available() {
        return;
    }
    let run = demo("4");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    let who = format!("the VMM answers: ember {} (a KVM VMM, host pid ", env!("CARGO_PKG_VERSION"));
    assert!(lines[0].contains(&who), "{}", run.stdout);
    assert!(lines[1].ends_with("the VMM answers: 2 hypercalls so far"), "{}", run.stdout);
    check_uart_and_exit(&run, 0);
    assert_eq!(demo_count(&run.stderr, 0, "io-out", Some("hypercall (demo)")), 2, "{}", run.stderr);
    // One IN per answer byte plus the terminating NUL, for both answers.
    let answers: u64 = lines[..2].iter().map(|l| l.split_once("answers: ").unwrap().1.len() as u64 + 1).sum();
    assert_eq!(demo_count(&run.stderr, 0, "io-in", Some("hypercall (demo)")), answers, "{}", run.stderr);
}

#[test]
fn demo_chapter_5_two_vcpus() {
    if !kvm_available() {
        return;
    }
    let run = demo("smp");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    assert!(lines[0].starts_with("vCPU 0: sending INIT"), "{}", run.stdout);
    assert!(lines[1].ends_with("my APIC id is 1"), "{}", run.stdout);
    assert!(lines[2].starts_with("vCPU 0: vCPU 1 is up"), "{}", run.stdout);
    // Each vCPU's UART writes are its own lines' bytes.
    let ap_bytes = lines[1].len() as u64 + 1;
    assert_eq!(demo_count(&run.stderr, 1, "io-out", Some("serial (COM1)")), ap_bytes, "{}", run.stderr);
    let bsp_bytes = run.stdout.len() as u64 - ap_bytes;
    assert_eq!(demo_count(&run.stderr, 0, "io-out", Some("serial (COM1)")), bsp_bytes, "{}", run.stderr);
    assert_eq!(demo_count(&run.stderr, 0, "io-out", Some("exit device")), 1, "{}", run.stderr);
    assert_eq!(demo_count(&run.stderr, 1, "io-out", Some("exit device")), 0, "{}", run.stderr);
    assert!(run.stderr.contains("[ember] vCPU 1 stopped in 32-bit protected mode"), "{}", run.stderr);
}

/// The count column of the `--stats` row for vCPU 0, `kind`, `where`.
fn stats_count(stderr: &str, kind: &str, place: &str) -> u64 {
    let row = stderr
        .lines()
        .find(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            t.len() > 3 && t[0] == "0" && t[1] == kind && l.contains(&format!(" {place} "))
        })
        .unwrap_or_else(|| panic!("no --stats row for {kind} {place}:\n{stderr}"));
    let t: Vec<&str> = row.split_whitespace().collect();
    t[t.len() - 5].parse().unwrap_or_else(|_| panic!("bad row `{row}`"))
}

#[test]
fn stats_count_the_guests_port_writes() {
    if !kvm_available() {
        return;
    }
    let k = 1000;
    let run = run_guest("ports", &["--cmdline", &format!("count={k}"), "--stats"]);
    run.expect_code(0);
    assert_eq!(run.stdout, format!("wrote {k}\n"));
    assert_eq!(stats_count(&run.stderr, "io-out", "port 0x80"), k);
    assert_eq!(stats_count(&run.stderr, "io-out", "port 0x84"), 2);
    assert_eq!(stats_count(&run.stderr, "io-out", "port 0x501"), 1);
    assert_eq!(stats_count(&run.stderr, "io-out", "port 0x3f8"), run.stdout.len() as u64);
    assert_eq!(stats_count(&run.stderr, "io-out", "(all)"), k + 2 + 1 + run.stdout.len() as u64);
    let row = run.stderr.lines().find(|l| l.contains("port 0x80 ")).expect("row");
    assert!(row.contains("(unclaimed)"), "{row}");
    let row = run.stderr.lines().find(|l| l.contains("port 0x3f8 ")).expect("row");
    assert!(row.contains("serial (COM1)"), "{row}");
    // min <= median <= max, all positive.
    let t: Vec<f64> = row.split_whitespace().rev().take(3).map(|x| x.parse().expect("a time")).collect();
    let (max, med, min) = (t[0], t[1], t[2]);
    assert!(0.0 < min && min <= med && med <= max, "{row}");
}

#[test]
fn timeline_events_in_order() {
    if !kvm_available() {
        return;
    }
    let run = run_guest("ports", &["--timeline=json"]);
    run.expect_code(0);
    let json = run.stderr.lines().find(|l| l.starts_with('[')).unwrap_or_else(|| panic!("{}", run.stderr));
    let mut events = Vec::new();
    for item in json.split("{\"event\":\"").skip(1) {
        let (name, rest) = item.split_once("\",\"ms\":").expect("event, ms");
        let ms: f64 = rest.trim_end_matches([']', '}', ',']).parse().expect("ms");
        events.push((name.to_string(), ms));
    }
    let want = [
        "ember: start",
        "ember: /dev/kvm opened",
        "ember: guest memory registered",
        "ember: kernel loaded",
        "vcpu0: first KVM_RUN",
        "guest: first serial byte",
        "guest: exit device: stop requested",
        "ember: vCPUs joined",
        "ember: exit",
    ];
    let mut last = -1.0;
    let mut at = 0;
    for w in want {
        let i = events.iter().position(|(n, _)| n == w).unwrap_or_else(|| panic!("no `{w}` in {events:?}"));
        assert!(i >= at, "`{w}` out of order: {events:?}");
        assert!(events[i].1 >= last, "`{w}` earlier than the event before: {events:?}");
        at = i;
        last = events[i].1;
    }
    assert_eq!(events[0], ("ember: start".to_string(), 0.0));
    // The table form has the same events.
    let run = run_guest("ports", &["--timeline"]);
    assert!(run.stderr.contains("guest: exit device: stop requested"), "{}", run.stderr);
}

/// One `--trace-exits` line: (vcpu, kind, port, data bytes, device).
fn parse_trace(line: &str) -> Option<(u32, String, u64, Vec<u8>, String)> {
    let mut t = line.splitn(6, ' ');
    let vcpu = t.next()?.strip_prefix("vcpu")?.parse().ok()?;
    let kind = t.next()?.to_string();
    let port = u64::from_str_radix(t.next()?.strip_prefix("port=0x")?, 16).ok()?;
    let size: usize = t.next()?.strip_prefix("size=")?.parse().ok()?;
    let hex = t.next()?.strip_prefix("data=")?;
    let data: Vec<u8> = (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    assert_eq!(data.len(), size, "{line}");
    let rest = t.next().unwrap_or("");
    // An optional quoted character, then the device.
    let device = match rest.strip_prefix('\'') {
        Some(r) => r.split_once("' ").map(|(_, d)| d).unwrap_or(r),
        None => rest,
    };
    Some((vcpu, kind, port, data, device.to_string()))
}

#[test]
fn trace_exits_parse_back_to_what_the_guest_wrote() {
    if !kvm_available() {
        return;
    }
    let k = 20u64;
    let run = run_guest("ports", &["--cmdline", &format!("count={k}"), "--trace-exits"]);
    run.expect_code(0);
    let exits: Vec<_> = run.stderr.lines().filter_map(parse_trace).collect();
    for (i, e) in exits.iter().take(k as usize).enumerate() {
        assert_eq!(
            (e.0, e.1.as_str(), e.2, &e.3[..], e.4.as_str()),
            (0, "io-out", 0x80, &[i as u8][..], "(unclaimed)")
        );
    }
    assert_eq!((exits[k as usize].2, &exits[k as usize].3[..]), (0x84, &[0xef, 0xbe][..]));
    assert_eq!((exits[k as usize + 1].2, &exits[k as usize + 1].3[..]), (0x84, &[0xef, 0xbe, 0xad, 0xde][..]));
    // The UART's THR writes spell the guest's output, byte by byte.
    let uart: Vec<u8> = exits.iter().filter(|e| e.1 == "io-out" && e.2 == 0x3f8).flat_map(|e| e.3.clone()).collect();
    assert_eq!(String::from_utf8(uart).unwrap(), run.stdout);
    assert!(exits.iter().filter(|e| e.2 == 0x3f8).all(|e| e.4 == "serial (COM1)"));
    let last = exits.last().expect("exits");
    assert_eq!((last.1.as_str(), last.2, &last.3[..], last.4.as_str()), ("io-out", 0x501, &[0][..], "exit device"));

    // Bounded: only the first N are printed, the rest counted.
    let run = run_guest("ports", &["--cmdline", "count=50", "--trace-exits=5"]);
    run.expect_code(0);
    assert_eq!(run.stderr.lines().filter_map(parse_trace).count(), 5, "{}", run.stderr);
    assert!(run.stderr.contains("printed the first 5 of "), "{}", run.stderr);
}

/// The 16 random bytes of a chapter 6 run (`random: ` + 32 hex digits).
fn random_bytes(stdout: &str) -> String {
    let hex = stdout
        .lines()
        .find_map(|l| l.strip_prefix("random: "))
        .unwrap_or_else(|| panic!("no `random: ` line:\n{stdout}"));
    assert_eq!(hex.len(), 32, "16 bytes in hex: {stdout}");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{stdout}");
    hex.to_string()
}

#[test]
fn demo_chapter_6_virtio_request() {
    if !kvm_available() {
        return;
    }
    let run = demo("virtio");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}", run.stdout);
    assert_eq!(lines[0], "virtio: device 4 (entropy) at 0xd0000000, version 2");
    assert!(lines[1].starts_with("virtio: features negotiated"), "{}", run.stdout);
    assert_eq!(lines[2], "virtio: queue 0 ready, size 4 (device max 64)");
    assert!(lines[3].starts_with("virtio: request sent (QUEUE_NOTIFY)"), "{}", run.stdout);
    assert_eq!(lines[4], "virtio: used ring: 16 bytes");
    let first = random_bytes(&run.stdout);
    check_uart_and_exit(&run, 0);
    // The guest's register accesses, one MMIO exit each (src/demo/virtio.S):
    // reads MAGIC, VERSION, DEVICE_ID, DEVICE_FEATURES, STATUS, QUEUE_NUM_MAX,
    // QUEUE_READY; writes STATUS x3, DEVICE_FEATURES_SEL, DRIVER_FEATURES_SEL,
    // DRIVER_FEATURES, STATUS, QUEUE_SEL, QUEUE_NUM, six ring halves,
    // QUEUE_READY, STATUS. QUEUE_NOTIFY is the 18th write, and no exit: KVM
    // signals the ioeventfd itself.
    assert_eq!(demo_count(&run.stderr, 0, "mmio-read", Some("virtio-rng")), 7, "{}", run.stderr);
    assert_eq!(demo_count(&run.stderr, 0, "mmio-write", Some("virtio-rng")), 17, "{}", run.stderr);
    assert!(run.stderr.contains("KVM's in-kernel PIC/IOAPIC/LAPIC"), "the rng brings the irqchip: {}", run.stderr);
    assert!(run.stderr.contains("is an ioeventfd"), "{}", run.stderr);
    assert!(run.stderr.contains("[ember] layers: "), "{}", run.stderr);
    // Random means a second run gets other bytes (equal with chance 2^-128).
    let again = demo("6");
    assert_ne!(random_bytes(&again.stdout), first, "two runs, same random bytes");
}
