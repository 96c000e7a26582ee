//! The console on a real terminal: ember is run inside a pseudo-terminal made
//! by util-linux's `script`, so its stdin is a tty. Checks raw mode (Ctrl-C
//! reaches the guest as a byte), the `Ctrl-a x` escape, and that the terminal
//! settings are restored after a normal exit, the escape and SIGTERM.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ember_bin, guest, kvm_available, skipped};

/// Runs `inner` (a shell command) in a new pty; feeds `input` slowly.
/// Returns (exit code of script, captured terminal output, dir with files).
fn in_pty(inner: &str, input: &[(u64, &[u8])], dir: &Path) -> (i32, String) {
    let mut child = Command::new("script")
        .args(["-qfec", inner, "/dev/null"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux `script` is installed");
    let mut stdin = child.stdin.take().expect("piped");
    for (delay_ms, bytes) in input {
        std::thread::sleep(Duration::from_millis(*delay_ms));
        let _ = stdin.write_all(bytes);
        let _ = stdin.flush();
    }
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().expect("wait") {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("`{inner}` did not finish in 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let out = child.wait_with_output().expect("output");
    let code = out.status.code().unwrap_or(-1);
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("console-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A shell command that records the terminal settings, runs ember on `guest`
/// (writing its pid), records its exit code and the settings again.
fn wrapped(guest: &Path) -> String {
    format!(
        "stty -g > before; sh -c 'echo $$ > pid; exec {} run --kernel {}'; echo $? > code; stty -g > after",
        ember_bin().display(),
        guest.display()
    )
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap_or_default().trim().to_string()
}

#[test]
fn raw_mode_passes_ctrl_c_and_restores_the_terminal() {
    if !kvm_available() {
        return skipped("/dev/kvm absent — KVM tests not run");
    }
    let dir = tmpdir("raw");
    let g = guest("console_echo");
    // Ctrl-C (0x03) must reach the guest as a byte, not kill ember; then `q` ends the guest.
    let (_, out) = in_pty(&wrapped(&g), &[(300, b"a\x03b"), (100, b"q")], &dir);
    assert_eq!(read(&dir, "code"), "0", "terminal output: {out:?}");
    assert!(out.contains("a\u{3}b"), "Ctrl-C went to the guest as a byte: {out:?}");
    assert_eq!(read(&dir, "before"), read(&dir, "after"), "terminal settings restored");
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    if !kvm_available() {
        return skipped("/dev/kvm absent — KVM tests not run");
    }
    let dir = tmpdir("escape");
    let (_, out) = in_pty(&wrapped(&guest("console_echo")), &[(300, b"hi\x01"), (50, b"x")], &dir);
    assert_eq!(read(&dir, "code"), "130", "terminal output: {out:?}");
    assert!(out.contains("hi"), "{out:?}");
    assert!(out.contains("Ctrl-a x"), "ember says why it quit: {out:?}");
    assert_eq!(read(&dir, "before"), read(&dir, "after"), "terminal settings restored");
}

#[test]
fn sigterm_stops_the_vm_and_restores_the_terminal() {
    if !kvm_available() {
        return skipped("/dev/kvm absent — KVM tests not run");
    }
    let dir = tmpdir("sigterm");
    let inner = wrapped(&guest("console_echo"));
    let d2 = dir.clone();
    // Send SIGTERM to ember once it is running (the console_echo guest waits for input forever).
    let killer = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(pid) = std::fs::read_to_string(d2.join("pid"))
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                std::thread::sleep(Duration::from_millis(300));
                // SAFETY: sends a signal to the ember process this test started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let (_, out) = in_pty(&inner, &[], &dir);
    killer.join().expect("killer thread");
    assert_eq!(read(&dir, "code"), "143", "128 + SIGTERM; terminal output: {out:?}");
    assert_eq!(read(&dir, "before"), read(&dir, "after"), "terminal settings restored");
}
