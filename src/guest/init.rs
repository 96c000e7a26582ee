//! ember's side of the default guest's init protocol (guest-kernels/init, its header and "The
//! snapshot protocol"; guest-kernels/README.md): the kernel command-line words that ask the init for
//! something, and the marker lines it prints on the serial console in answer.
//!
//! - `ember.debug`: the init prints [`READY_MARKER`] before it starts the command; [`mark_ready`]
//!   turns that line into the timeline's "guest: init ready" (`--timeline`, the boot benchmarks).
//! - [`SNAPSHOT_PARAM`]: the init prints [`SNAPSHOT_POINT`], then waits for one line on the console
//!   (the command, as `ember.argv=...`, see [`super::encode_argv`]); [`at_snapshot_point`] is where
//!   `ember run --save-snapshot` saves the VM.
//!
//! Both are observers of the serial output ([`crate::devices::serial::LineObserver`]), attached with
//! `Vmm::observe_serial_lines`; the UART itself knows no marker.

use std::sync::Arc;

use crate::devices::serial::LineObserver;
use crate::timeline::Timeline;

/// The line the init prints when it is ready to start the command (with `ember.debug`).
pub const READY_MARKER: &str = "ember-init: ready";

/// The kernel command-line word that makes the init print [`READY_MARKER`].
pub const DEBUG_PARAM: &str = "ember.debug";

/// The kernel command-line word that makes the init stop at [`SNAPSHOT_POINT`] and wait for its
/// command on the console.
pub const SNAPSHOT_PARAM: &str = "ember.snapshot";

/// The line the init prints when [`SNAPSHOT_PARAM`] is on its command line and it waits for its
/// command on the console.
pub const SNAPSHOT_POINT: &str = "ember-init: snapshot point";

/// Marks "guest: init ready" on `timeline` when the init prints [`READY_MARKER`].
pub fn mark_ready(timeline: Arc<Timeline>) -> LineObserver {
    Box::new(move |line: &[u8]| {
        if contains(line, READY_MARKER) {
            timeline.mark_once("guest: init ready");
        }
    })
}

/// Calls `then` once, when the init prints [`SNAPSHOT_POINT`] (on the vCPU thread that prints it,
/// under the UART's lock: `then` must not block; `RequestSender::post` does not).
pub fn at_snapshot_point(then: Box<dyn FnOnce() + Send>) -> LineObserver {
    let mut then = Some(then);
    Box::new(move |line: &[u8]| {
        if contains(line, SNAPSHOT_POINT)
            && let Some(f) = then.take()
        {
            f();
        }
    })
}

/// How a restored command's stdio are wired, when the saved guest has the console ports of split
/// output (`ember run --from-snapshot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoredStdio {
    /// No console ports in the saved guest: everything on the serial console.
    NoPorts,
    /// The ports stay unused: everything on the serial console, as on a terminal.
    Console,
    /// stdout and stderr on their ports, stdin from the console.
    Split,
    /// stdout, stderr and stdin on their ports.
    SplitWithStdin,
}

/// The line a restored init reads at [`SNAPSHOT_POINT`]: the command's `ember.argv=...` (empty:
/// a shell), then `ember.stdin=port` (the command's stdin is the `ember.stdin` port) or
/// `ember.output=console` (the saved console ports stay unused).
pub fn restored_line(argv: &str, stdio: RestoredStdio) -> String {
    let extra = match stdio {
        RestoredStdio::NoPorts | RestoredStdio::Split => None,
        RestoredStdio::Console => Some("ember.output=console"),
        RestoredStdio::SplitWithStdin => Some("ember.stdin=port"),
    };
    [Some(argv).filter(|a| !a.is_empty()), extra].into_iter().flatten().collect::<Vec<_>>().join(" ")
}

/// Whether `line` contains `marker` (the init's lines may follow kernel output on the same line).
fn contains(line: &[u8], marker: &str) -> bool {
    line.windows(marker.len()).any(|w| w == marker.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    #[test]
    fn a_restored_line_names_the_command_then_the_stdio() {
        assert_eq!(restored_line("ember.argv=x74727565", RestoredStdio::NoPorts), "ember.argv=x74727565");
        assert_eq!(restored_line("ember.argv=x74727565", RestoredStdio::Split), "ember.argv=x74727565");
        assert_eq!(restored_line("ember.argv=x", RestoredStdio::SplitWithStdin), "ember.argv=x ember.stdin=port");
        assert_eq!(restored_line("", RestoredStdio::Console), "ember.output=console");
        assert_eq!(restored_line("", RestoredStdio::NoPorts), "");
    }

    #[test]
    fn the_ready_line_marks_the_timeline() {
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let mut o = mark_ready(timeline.clone());
        o(b"[    0.5] Run /init as init process");
        assert!(timeline.at("guest: init ready").is_none());
        o(b"ember-init: ready");
        assert!(timeline.at("guest: init ready").is_some());
    }

    #[test]
    fn the_snapshot_point_fires_once() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let mut o = at_snapshot_point(Box::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        }));
        o(b"ember-init: ready");
        o(b"ember-init: snapshot point");
        o(b"ember-init: snapshot point");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
