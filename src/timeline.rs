//! Timestamps of the moments that make up a boot, relative to ember's start:
//! /dev/kvm opened, memory mapped, kernel loaded, first KVM_RUN, first serial
//! byte, the kernel's "Run /init", the exit request, teardown. Recording costs
//! one `Instant::now()` and a short lock per event, a dozen times per VM.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One boot's events, in the order they happened.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    events: Mutex<Vec<(String, Duration)>>,
}

impl Timeline {
    /// A timeline whose zero is `start` (ember's first instruction in `main`);
    /// its first event is "ember: start" at 0.
    pub fn new(start: Instant) -> Self {
        let mut events = Vec::with_capacity(16);
        events.push(("ember: start".to_string(), Duration::ZERO));
        Timeline { start, events: Mutex::new(events) }
    }

    /// Records `event` at `at` (an instant taken earlier, e.g. in `VmControl::stop`).
    pub fn mark_at(&self, event: impl Into<String>, at: Instant) {
        let at = at.saturating_duration_since(self.start);
        self.events.lock().expect("timeline lock").push((event.into(), at));
    }

    /// Records `event` now.
    pub fn mark(&self, event: impl Into<String>) {
        let at = self.start.elapsed();
        self.events.lock().expect("timeline lock").push((event.into(), at));
    }

    /// Records `event` only if it has not been recorded yet.
    pub fn mark_once(&self, event: &str) {
        let at = self.start.elapsed();
        let mut events = self.events.lock().expect("timeline lock");
        if !events.iter().any(|(e, _)| e == event) {
            events.push((event.to_string(), at));
        }
    }

    /// All events so far.
    pub fn events(&self) -> Vec<(String, Duration)> {
        let mut e = self.events.lock().expect("timeline lock").clone();
        e.sort_by_key(|(_, at)| *at);
        e
    }

    /// When `event` happened, if it did.
    pub fn at(&self, event: &str) -> Option<Duration> {
        self.events.lock().expect("timeline lock").iter().find(|(e, _)| e == event).map(|(_, d)| *d)
    }

    /// A table: event, time since start, time since the previous event.
    pub fn render_table(&self) -> String {
        let mut out = format!("{:<34} {:>10} {:>10}\n", "event", "at (ms)", "+ (ms)");
        let mut prev = Duration::ZERO;
        for (e, at) in self.events() {
            let delta = at.saturating_sub(prev);
            out += &format!("{:<34} {:>10.3} {:>10.3}\n", e, ms(at), ms(delta));
            prev = at;
        }
        out
    }

    /// `[{"event": "...", "ms": 1.234}, ...]`
    pub fn render_json(&self) -> String {
        let rows: Vec<String> = self
            .events()
            .iter()
            .map(|(e, at)| format!("{{\"event\":{},\"ms\":{:.3}}}", json_string(e), ms(*at)))
            .collect();
        format!("[{}]", rows.join(","))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Quotes `s` as a JSON string.
pub fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if (c as u32) < 0x20 => out += &format!("\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_in_order_once() {
        let t = Timeline::new(Instant::now());
        t.mark("a");
        t.mark_once("b");
        t.mark_once("b");
        let e = t.events();
        assert_eq!(e.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["ember: start", "a", "b"]);
        assert!(e[1].1 <= e[2].1);
        assert!(t.render_table().contains("b"));
        assert!(t.render_json().starts_with("[{\"event\":\"ember: start\",\"ms\":0.000}"));
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
