//! The fast lane: the real `ember` binary boots tiny freestanding guests
//! (tests/guests/*.S, built at test time) through the same path as a Linux
//! vmlinux — an ELF without a PVH note, entered in 64-bit mode with RSI =
//! boot_params — and the tests check what the guest printed on COM1 and
//! ember's exit code. Each VM lives for milliseconds, even under kvm_pvm.
//!
//! What is checked against what:
//! - boot_params: the cmdline and e820 map the guest reads from the zero page,
//!   against the flags, with the map computed here from the PC layout rules
//!   (not from ember's functions).
//! - serial: bytes on ember's stdin reach the guest's RBR; EOF does not end the VM.
//! - SMP: the boot vCPU starts the others with INIT/SIPI through the LAPIC.
//! - exit device and i8042 reset -> ember's exit code; crashes -> 123 with a reason.

mod common;

use common::{Input, guest, kvm_available, run_guest, run_guest_with};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// e820 types (ACPI spec, "Address Range Types").
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What the guest printed from boot_params.
#[derive(Debug)]
struct ZeroPage {
    cmdline_size: u64,
    cmdline: String,
    e820: Vec<(u64, u64, u32)>,
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap_or_else(|e| panic!("`{s}` is not hex: {e}"))
}

fn parse_zero_page(out: &str) -> ZeroPage {
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no `{key}` line in the guest's output:\n{out}"))
    };
    let cmdline = field("cmdline=[").strip_suffix(']').expect("cmdline ends with ]").to_string();
    let entries = hex(field("e820_entries="));
    let e820: Vec<(u64, u64, u32)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("e820 "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 3, "bad e820 line `{l}`");
            (hex(f[0]), hex(f[1]), hex(f[2]) as u32)
        })
        .collect();
    assert_eq!(entries as usize, e820.len(), "{out}");
    ZeroPage { cmdline_size: hex(field("cmdline_size=")), cmdline, e820 }
}

/// The map a PC-style guest with `mem` bytes of RAM should see: low RAM up to
/// the EBDA (0x9fc00), the EBDA reserved, the 640K-1M hole absent, RAM from
/// 1 MiB, and past 3 GiB a split around the 32-bit MMIO gap [3 GiB, 4 GiB).
fn expected_e820(mem: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, 0x9fc00, E820_RAM), (0x9fc00, 0x400, E820_RESERVED)];
    let gap = 3 * GIB;
    if mem <= gap {
        map.push((MIB, mem - MIB, E820_RAM));
    } else {
        map.push((MIB, gap - MIB, E820_RAM));
        map.push((4 * GIB, mem - gap, E820_RAM));
    }
    map
}

fn boot_params(memory: &str, cmdline: &str) -> ZeroPage {
    let run = run_guest("boot_params", &["--memory", memory, "--cmdline", cmdline]);
    run.expect_code(0);
    parse_zero_page(&run.stdout)
}

#[test]
fn boot_params_cmdline_and_e820_64m() {
    if !kvm_available() {
        return;
    }
    let zp = boot_params("64M", "hello ember 42");
    assert_eq!(zp.cmdline, "hello ember 42");
    assert_eq!(zp.cmdline_size, 14);
    assert_eq!(zp.e820, expected_e820(64 * MIB));
    assert_eq!(zp.e820[2], (0x10_0000, 64 * MIB - 0x10_0000, E820_RAM), "spelled out once");
}

#[test]
fn boot_params_e820_1g_and_empty_cmdline() {
    if !kvm_available() {
        return;
    }
    let zp = boot_params("1G", "");
    assert_eq!(zp.cmdline, "");
    assert_eq!(zp.cmdline_size, 0);
    assert_eq!(zp.e820, expected_e820(GIB));
}

#[test]
fn boot_params_e820_split_around_mmio_gap_3584m() {
    if !kvm_available() {
        return;
    }
    // ember refuses more guest RAM than the host has (even though it maps it lazily).
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let host_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(u64::MAX);
    if host_kib < 3584 * 1024 {
        common::skipped("boot_params_e820_split_around_mmio_gap_3584m: the host has less than 3584 MiB of RAM");
        return;
    }
    let zp = boot_params("3584M", "console=ttyS0 mem split");
    assert_eq!(zp.cmdline, "console=ttyS0 mem split");
    assert_eq!(zp.e820, expected_e820(3584 * MIB));
    assert_eq!(zp.e820[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
    assert_eq!(zp.e820[3], (0x1_0000_0000, 512 * MIB, E820_RAM));
}

#[test]
fn serial_input_is_echoed_until_q() {
    if !kvm_available() {
        return;
    }
    // The pipe stays open: the guest, not EOF, ends the session.
    let run = run_guest_with("console_echo", &[], Input::KeepOpen(b"hello, ember! q"));
    run.expect_code(0);
    assert_eq!(run.stdout, "echo> hello, ember! q\nbye\n");
}

#[test]
fn serial_eof_on_stdin_does_not_end_the_vm() {
    if !kvm_available() {
        return;
    }
    // Bytes, then EOF at once: ember sees EOF long before the guest has read
    // them all; it must still deliver them, and the guest runs its delay loop
    // and prints after EOF.
    let run = run_guest_with("console_echo", &[], Input::Close(b"abc\x01\xffq"));
    run.expect_code(0);
    assert_eq!(run.stdout.as_bytes(), "echo> abc\x01\u{fffd}q\nbye\n".as_bytes(), "{:?}", run.stdout);
    // And a guest that never reads: stdin closed before it even starts.
    let run = run_guest_with("exit", &["--cmdline", "status=5"], Input::Close(b""));
    run.expect_code(5);
    assert_eq!(run.stdout, "status 5\n");
}

/// Boots `smp` on `cpus` vCPUs; `extra` is added to its command line.
fn smp(cpus: u32, extra: &str) {
    let n = cpus.to_string();
    let cmdline = format!("cpus={cpus} {extra}");
    let run = run_guest("smp", &["--cpus", &n, "--cmdline", &cmdline]);
    run.expect_code(0);
    let first = run.stdout.lines().next().unwrap_or_default();
    assert_eq!(first, format!("cpus online: {cpus}"), "{}", run.stdout);
    let mut ids: Vec<u32> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("apic id: "))
        .map(|s| s.parse().expect("decimal APIC id"))
        .collect();
    assert_eq!(ids[0], 0, "the boot vCPU has APIC id 0: {}", run.stdout);
    ids.sort_unstable();
    assert_eq!(ids, (0..cpus).collect::<Vec<_>>(), "every vCPU reported once: {}", run.stdout);
}

#[test]
fn smp_bsp_starts_one_ap_with_init_sipi() {
    if !kvm_available() {
        return;
    }
    smp(2, "");
}

#[test]
fn smp_bsp_starts_three_aps_with_init_sipi() {
    if !kvm_available() {
        return;
    }
    smp(4, "");
}

#[test]
fn smp_linux_style_targeted_init_sipi() {
    if !kvm_available() {
        return;
    }
    // One AP at a time by APIC id: INIT assert, INIT deassert, SIPI, SIPI.
    smp(4, "targeted");
}

#[test]
fn smp_guest_timeout_says_how_far_the_aps_got() {
    if !kvm_available() {
        return;
    }
    // The guest expects one AP more than exists: its bounded wait must end
    // (status 1) and its diagnosis count the APs at each stage of the trampoline.
    let run = run_guest("smp", &["--cpus", "2", "--cmdline", "cpus=3 wait=20000"]);
    run.expect_code(1);
    assert_eq!(run.stdout, "FAIL: APs online 1 of 2; stages: real 1, protected 1, long 1\n");
}

#[test]
fn exit_device_status_becomes_exit_code() {
    if !kvm_available() {
        return;
    }
    for status in [0, 3, 255] {
        let cmdline = format!("status={status}");
        let run = run_guest("exit", &["--cmdline", &cmdline]);
        run.expect_code(status);
        assert_eq!(run.stdout, format!("status {status}\n"));
        assert_eq!(run.stderr, "", "a guest's own status is not an ember error");
    }
}

#[test]
fn exit_device_takes_2_and_4_byte_writes() {
    if !kvm_available() {
        return;
    }
    // `out dx, ax` / `out dx, eax` with junk above the low byte: the low byte is the status.
    for wide in ["wide=2", "wide=4"] {
        let cmdline = format!("status=7 {wide}");
        let run = run_guest("exit", &["--cmdline", &cmdline]);
        run.expect_code(7);
        assert_eq!(run.stdout, "status 7\n", "{wide}");
    }
}

#[test]
fn string_port_io_is_one_access_per_element() {
    if !kvm_available() {
        return;
    }
    // `rep insb` x4 from LSR: four 1-byte reads of an idle UART (THRE | TEMT),
    // then `rep outsb` of a line to THR.
    let run = run_guest("strio", &[]);
    run.expect_code(0);
    assert_eq!(run.stdout, "lsr 60 60 60 60\noutsb ok\n");
}

#[test]
fn sigterm_wins_over_a_stdout_nobody_reads() {
    if !kvm_available() {
        return;
    }
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    // `ember run --kernel flood | sleep 60`: the pipe fills and stays full.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh descriptors, owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut child = Command::new(common::ember_bin())
        .arg("run")
        .arg("--kernel")
        .arg(guest("flood"))
        .args(["--serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().expect("wait").is_none(), "the flooding guest is still running");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    // Generous: it only catches a hang (ember used to stay alive forever).
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ember ignored SIGTERM while its stdout pipe was full");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr).expect("stderr");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    drop(read_end);
}

#[test]
fn a_failing_serial_file_warns_once_and_counts_at_exit() {
    if !kvm_available() {
        return;
    }
    // /dev/full fails every write with ENOSPC: one warning, one count, not one line per byte.
    let kernel = guest("boot_params");
    let run = common::ember(&["run", "--kernel", kernel.to_str().expect("UTF-8"), "--serial", "file:/dev/full"]);
    run.expect_code(0);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stderr);
    assert!(lines[0].contains("No space left on device"), "{}", run.stderr);
    assert!(lines[1].contains("bytes of the guest's output were dropped"), "{}", run.stderr);
}

#[test]
fn i8042_reset_ends_ember_with_0() {
    if !kvm_available() {
        return;
    }
    let run = run_guest("exit", &["--cmdline", "reset"]);
    run.expect_code(0);
    assert_eq!(run.stdout, "reset\n");
}

fn crash(how: &str) -> common::Run {
    let run = run_guest("crash", &["--cmdline", how]);
    run.expect_code(123);
    assert_eq!(run.stdout, format!("crashing: {how}\n"));
    assert!(run.stderr.starts_with("ember: the guest crashed: "), "{}", run.stderr);
    run
}

#[test]
fn triple_fault_is_a_guest_crash() {
    if !kvm_available() {
        return;
    }
    let run = crash("triple");
    assert!(run.stderr.contains("triple-fault"), "{}", run.stderr);
}

#[test]
fn unmapped_mmio_is_a_guest_crash_naming_the_address() {
    if !kvm_available() {
        return;
    }
    let run = crash("mmio");
    assert!(run.stderr.contains("0xd0000000"), "{}", run.stderr);
    assert!(run.stderr.contains("unmapped MMIO"), "{}", run.stderr);
}

#[test]
fn hlt_without_irqchip_is_a_guest_crash() {
    if !kvm_available() {
        return;
    }
    let run = crash("hlt");
    assert!(run.stderr.contains("HLT"), "{}", run.stderr);
}

#[test]
fn guests_are_vmlinux_shaped() {
    // No KVM needed: the guests must take ember's vmlinux path, not PVH.
    for name in ["boot_params", "console_echo", "exit", "crash", "smp", "strio"] {
        let elf = std::fs::read(guest(name)).expect("guest ELF");
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "{name}: ELF64");
        let entry = u64::from_le_bytes(elf[24..32].try_into().expect("8 bytes"));
        assert_eq!(entry, 0x10_0000, "{name}: e_entry at 1 MiB");
        let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
        let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
        for i in 0..phnum {
            let p_type = u32::from_le_bytes(elf[phoff + 56 * i..][..4].try_into().expect("4 bytes"));
            assert_ne!(p_type, 4, "{name}: no PT_NOTE, so no PVH note");
        }
    }
}

/// A port device with a bug: it panics on its first write.
struct Buggy;
impl ember::bus::BusDevice for Buggy {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: &[u8]) {
        panic!("a bug in a device");
    }
}

#[test]
fn a_device_panic_in_a_vcpu_stops_the_vm_with_an_error() {
    if !kvm_available() {
        return;
    }
    use ember::config::{KernelSource, SerialMode, VmConfig};
    use ember::control::StopReason;
    use ember::extras::{ExtraPioDevice, Extras};
    // The `ports` guest writes to port 0x80 first: there the device panics,
    // in the vCPU thread. The VM must stop with an error (ember exits 125),
    // not run on without that vCPU or hang.
    let mut cfg = VmConfig::new(KernelSource::Path(guest("ports")));
    cfg.serial = SerialMode::None;
    cfg.mem_size_bytes = 32 << 20;
    let mut extras = Extras::default();
    extras.pio.push(ExtraPioDevice {
        port: 0x80,
        len: 1,
        name: "buggy",
        device: std::sync::Arc::new(std::sync::Mutex::new(Buggy)),
    });
    let timeline = std::sync::Arc::new(ember::timeline::Timeline::new(std::time::Instant::now()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome = ember::vmm::Vmm::new(&cfg.validate().expect("a valid config"), &extras, timeline)
            .expect("build the VM")
            .run()
            .expect("run");
        let _ = tx.send(outcome);
    });
    let outcome = rx.recv_timeout(common::RUN_TIMEOUT).expect("the VM stopped (it used to run on without its vCPU)");
    match outcome.reason {
        StopReason::EmberFailed(what) => {
            assert!(what.contains("vCPU 0 failed") && what.contains("a bug in a device"), "{what}")
        }
        r => panic!("expected an ember error, got {r:?}"),
    }
}

/// The Seccomp, NoNewPrivs and CapEff lines of every thread of a running
/// `ember run` on the `echo` guest (which waits for input), with `args`.
fn thread_sandboxes(args: &[&str]) -> Vec<String> {
    use std::io::Write;
    let g = guest("console_echo");
    let mut cmd = std::process::Command::new(common::ember_bin());
    cmd.args(["run", "--serial", "stdio"]).args(args).arg("--kernel").arg(&g);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ember");
    // The guest prints `echo> ` once it runs: by then every thread is in its sandbox.
    let mut out = child.stdout.take().expect("piped");
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("echo>") {
        use std::io::Read;
        assert_eq!(out.read(&mut byte).expect("read"), 1, "ember ended early: {}", String::from_utf8_lossy(&seen));
        seen.push(byte[0]);
    }
    let tasks = std::path::PathBuf::from(format!("/proc/{}/task", child.id()));
    let mut lines = Vec::new();
    for t in std::fs::read_dir(&tasks).expect("tasks") {
        let t = t.expect("task").path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default().trim().to_string();
        if comm.starts_with("kvm") {
            continue; // KVM's own kernel threads (kvm-nx-lpage-recovery)
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let keep: Vec<&str> = status
            .lines()
            .filter(|l| l.starts_with("Seccomp:") || l.starts_with("NoNewPrivs:") || l.starts_with("CapEff:"))
            .collect();
        lines.push(format!("{comm}: {}", keep.join(" ").split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(b"q").expect("write");
    drop(stdin);
    assert!(child.wait().expect("wait").success());
    lines.sort();
    lines
}

#[test]
fn every_thread_runs_sandboxed_and_off_turns_it_off() {
    if !kvm_available() {
        return common::skipped("/dev/kvm absent — KVM tests not run");
    }
    let on = thread_sandboxes(&[]);
    // main (the event loop), serial-out, vcpu0: filter mode 2, no new
    // privileges, no effective capabilities, even as root.
    assert_eq!(on.len(), 3, "{on:?}");
    for l in &on {
        assert!(l.contains("NoNewPrivs: 1 Seccomp: 2") && l.contains("CapEff: 0000000000000000"), "{on:?}");
    }
    let off = thread_sandboxes(&["--seccomp=off"]);
    assert!(off.iter().all(|l| l.contains("Seccomp: 0")), "{off:?}");
}
