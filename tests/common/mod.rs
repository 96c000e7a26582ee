//! Shared by the integration tests that run the real `ember` binary on tiny
//! freestanding guests: building the guests (tests/guests/*.S, with the host's
//! GNU `as` and `ld`, into CARGO_TARGET_TMPDIR, once per test process) and
//! running ember with a timeout, so a hung VM fails a test instead of hanging it.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[path = "../guests/assemble.rs"]
mod assemble;

/// How long any one ember run may take before the test kills it and fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// The ember binary under test.
pub fn ember_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ember"))
}

/// True when /dev/kvm exists; otherwise prints the loud SKIPPED line.
/// Every test that boots a VM starts with `if !common::kvm_available() { return; }`.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        skipped("/dev/kvm absent — KVM tests not run");
        false
    }
}

/// Prints `SKIPPED: why` straight to the process's stderr: `eprintln!` would be
/// captured by the test harness and shown only for failing tests.
pub fn skipped(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

fn guests_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests")
}

/// The ELF of test guest `name` (tests/guests/NAME.S), assembled and linked
/// on first use in this process. Linked with tests/guests/guest.ld: loaded at
/// 1 MiB, no PVH note, so ember enters it like a vmlinux (64-bit, RSI = boot_params).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let src_dir = guests_src();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    std::fs::create_dir_all(&out).expect("create the guest build directory");
    // Built under names of this process, then renamed into place: another test
    // binary building the same guest at the same time cannot see half a file.
    let pid = std::process::id();
    let obj = out.join(format!("{name}.{pid}.o"));
    let tmp_elf = out.join(format!("{name}.{pid}.elf"));
    let elf = out.join(format!("{name}.elf"));
    let src = src_dir.join(format!("{name}.S"));
    assemble::assemble_and_link(&src, &[&src_dir], &src_dir.join("guest.ld"), &obj, &tmp_elf)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&obj);
    std::fs::rename(&tmp_elf, &elf).expect("move the guest ELF into place");
    built.insert(name.to_string(), elf.clone());
    elf
}

/// What one ember run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// The guest's serial output.
    pub stdout: String,
    /// ember's own messages.
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Run {
    /// Panics with everything ember said unless it exited with `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code; stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

/// What ember's stdin gets.
pub enum Input<'a> {
    /// /dev/null.
    Null,
    /// These bytes, then EOF.
    Close(&'a [u8]),
    /// These bytes; the pipe stays open until ember exits.
    KeepOpen(&'a [u8]),
}

/// Runs `ember` with `args` and no stdin.
pub fn ember(args: &[&str]) -> Run {
    ember_with(Command::new(ember_bin()).args(args), Input::Null)
}

/// Runs `ember run --kernel <guest> --serial stdio <args>`.
pub fn run_guest(name: &str, args: &[&str]) -> Run {
    run_guest_with(name, args, Input::Null)
}

/// Like [`run_guest`], with `input` on stdin.
pub fn run_guest_with(name: &str, args: &[&str], input: Input) -> Run {
    let kernel = guest(name);
    let mut cmd = Command::new(ember_bin());
    cmd.arg("run").arg("--kernel").arg(&kernel).args(["--serial", "stdio"]).args(args);
    ember_with(&mut cmd, input)
}

/// Spawns `cmd` (stdout and stderr captured), feeds `input`, and waits at
/// most [`RUN_TIMEOUT`]: past it the child is killed and the test fails.
pub fn ember_with(cmd: &mut Command, input: Input) -> Run {
    let start = Instant::now();
    let stdin = match input {
        Input::Null => Stdio::null(),
        _ => Stdio::piped(),
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let mut held = None;
    match input {
        Input::Null => {}
        Input::Close(bytes) | Input::KeepOpen(bytes) => {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            // A guest that already exited closes the pipe: not this helper's business.
            let _ = pipe.write_all(bytes);
            if matches!(input, Input::KeepOpen(_)) {
                held = Some(pipe);
            }
        }
    }
    let finished = wait_with_timeout(&mut child);
    drop(held);
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    let Some(code) = finished else {
        panic!("{cmd:?} did not finish within {RUN_TIMEOUT:?}: killed.\nstdout:\n{stdout}\nstderr:\n{stderr}");
    };
    let run = Run { code, stdout, stderr, elapsed: start.elapsed() };
    assert!(!run.stderr.contains("panicked"), "ember panicked:\n{}", run.stderr);
    run
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The child's exit code (None inside: killed by a signal), or None if it had
/// to be killed at the deadline.
fn wait_with_timeout(child: &mut Child) -> Option<Option<i32>> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        match child.try_wait().expect("wait for ember") {
            Some(status) => return Some(status.code()),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}
