//! Measuring one launch from the outside, and summarizing many.
//!
//! A launch is timed from just before `spawn` to the moment the payload's marker line
//! arrives on its stdout, and to its exit; its peak RSS comes from `wait4`'s rusage
//! (`ru_maxrss`: the largest of the process and the descendants it reaped). Shared by
//! `ember bench` and `benches/startup.rs`.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one launch did.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// From the launch to the marker's arrival on stdout (None: never seen).
    pub marker: Option<Duration>,
    /// From the launch to the first byte on stdout.
    pub first_byte: Option<Duration>,
    /// From the launch to its exit (as `wait4` saw it).
    pub exit: Duration,
    /// `ru_maxrss` of the process and its reaped descendants, KiB.
    pub max_rss_kib: u64,
    /// Exit code, or 128 + signal.
    pub status: i32,
    /// Every complete stdout line, with when it arrived (carriage returns dropped).
    pub lines: Vec<(Duration, String)>,
    /// Everything on stdout.
    pub stdout: Vec<u8>,
    /// Everything on stderr.
    pub stderr: Vec<u8>,
}

impl Launch {
    /// The marker was seen and the process exited 0.
    pub fn ok(&self) -> bool {
        self.marker.is_some() && self.status == 0
    }
}

/// Spawns `cmd` at `start` (or now), waits for `marker` on its stdout and for its exit.
/// `on_spawn` gets the child's pid (to register it for Ctrl-C and timeouts).
pub fn launch(
    cmd: &mut Command,
    marker: &str,
    start: Option<Instant>,
    on_spawn: impl FnOnce(u32),
) -> std::io::Result<Launch> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
    let start = start.unwrap_or_else(Instant::now);
    let mut child = cmd.spawn()?;
    on_spawn(child.id());
    let mut err = child.stderr.take().expect("piped stderr");
    // stderr in its own thread, so neither pipe can fill up and stall the payload.
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut out = child.stdout.take().expect("piped stdout");
    let mut l = Launch::default();
    let mut buf = [0u8; 4096];
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let now = start.elapsed();
                l.first_byte.get_or_insert(now);
                let from = l.stdout.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                l.stdout.extend_from_slice(&buf[..n]);
                let mut rest = &l.stdout[from..];
                while let Some(i) = rest.iter().position(|b| *b == b'\n') {
                    let line = String::from_utf8_lossy(&rest[..i]).replace('\r', "");
                    if l.marker.is_none() && line.contains(marker) {
                        l.marker = Some(now);
                    }
                    l.lines.push((now, line));
                    rest = &rest[i + 1..];
                }
            }
        }
    }
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, whose pid is valid until reaped here.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    l.exit = start.elapsed();
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let st = std::process::ExitStatus::from_raw(status);
    l.status = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
    l.max_rss_kib = usage.ru_maxrss as u64;
    l.stderr = err_reader.join().unwrap_or_default();
    Ok(l)
}

/// Median, min, max and 95th percentile of a set of values.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// How many values.
    pub n: usize,
    /// The median (the mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// The 95th percentile (nearest rank).
    pub p95: f64,
}

impl Summary {
    /// Summarizes `v`; None when it is empty.
    pub fn of(v: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        let rank = ((0.95 * n as f64).ceil() as usize).clamp(1, n);
        Some(Summary { n, median, min: v[0], max: v[n - 1], p95: v[rank - 1] })
    }
}

/// Pairwise ratios a[i] / b[i] (runs interleaved A B A B, so drift hits both), summarized.
pub fn pairwise_ratio(a: &[f64], b: &[f64]) -> Option<Summary> {
    let r: Vec<f64> = a.iter().zip(b).filter(|(_, y)| **y > 0.0).map(|(x, y)| x / y).collect();
    Summary::of(&r)
}

/// Milliseconds as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Parses ember's `--timeline=json` output (`[{"event":"...","ms":1.2},...]`) from its stderr.
pub fn parse_timeline(stderr: &str) -> Vec<(String, f64)> {
    #[derive(serde::Deserialize)]
    struct Event {
        event: String,
        ms: f64,
    }
    stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("[{\"event\""))
        .filter_map(|l| serde_json::from_str::<Vec<Event>>(l.trim()).ok())
        .next_back()
        .map(|v| v.into_iter().map(|e| (e.event, e.ms)).collect())
        .unwrap_or_default()
}

/// Parses ember's `ember: guest memory touched: N KiB` line (printed with `--timeline`).
pub fn parse_guest_touched_kib(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("ember: guest memory touched: ")?.strip_suffix(" KiB")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_values() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max, s.p95), (5, 3.0, 1.0, 5.0, 5.0));
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.median, 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Summary::of(&v).unwrap().p95, 95.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn ratios_pair_by_pair() {
        let r = pairwise_ratio(&[2.0, 4.0, 6.0], &[1.0, 2.0, 2.0]).unwrap();
        assert_eq!((r.median, r.min, r.max), (2.0, 2.0, 3.0));
    }

    #[test]
    fn timeline_and_touched_parse() {
        let err = "noise\n[{\"event\":\"ember: start\",\"ms\":0.000},{\"event\":\"guest: first serial byte\",\"ms\":3.5}]\nember: guest memory touched: 812 KiB\n";
        let t = parse_timeline(err);
        assert_eq!(t[1], ("guest: first serial byte".to_string(), 3.5));
        assert_eq!(parse_guest_touched_kib(err), Some(812));
    }

    #[test]
    fn launch_sees_the_marker() {
        let l = launch(
            Command::new("sh").args(["-c", "echo hello; echo marker-line; exit 3"]),
            "marker-line",
            None,
            |_| {},
        )
        .unwrap();
        assert!(l.marker.is_some() && l.first_byte.is_some());
        assert!(l.first_byte <= l.marker && l.marker.unwrap() <= l.exit);
        assert_eq!(l.status, 3);
        assert_eq!(l.lines.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(), ["hello", "marker-line"]);
        assert!(l.max_rss_kib > 0);
    }
}
