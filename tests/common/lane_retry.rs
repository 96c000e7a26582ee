//! The one retry the Linux lane's tests allow themselves. The nested lane's outer machine is QEMU's
//! software emulation of an SVM CPU running KVM: on a loaded 2-core host it was seen to stop answering
//! now and then (the lane then kills it: `LaneError::Wedged`), and to die (QEMU gone, in CI, under a
//! 16 MiB transfer: `LaneError::OuterMachine`). That is the test machine failing, not ember, so such a
//! run is retried once, loudly, on a fresh outer machine. Anything ember itself did (its output, its
//! exit code) is never retried here; a lane timeout is a failure.
#![allow(dead_code)] // each user needs a different subset

use ember::lane::{LaneError, Outcome};

/// Whether `e` is the outer machine failing (wedged or dead), not the run in it.
pub fn machine_failed(e: &LaneError) -> bool {
    matches!(e, LaneError::Wedged { .. } | LaneError::OuterMachine { .. })
}

/// `run()`, and once more on a fresh outer machine if the first one wedged or died; panics with
/// `what` on any other error. `run` must be safe to repeat.
pub fn past_a_wedge<T>(what: &str, mut run: impl FnMut() -> Result<T, LaneError>) -> T {
    match run() {
        Ok(v) => v,
        Err(e) if machine_failed(&e) => {
            loud(&format!(
                "LANE: the outer machine stopped answering or died ({e}); retrying {what} once on a fresh one"
            ));
            run().unwrap_or_else(|e| panic!("{what} (second try): {e}"))
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

/// `attempt()`, and once more, loudly, when the outer machine wedged or died, or, in the nested lane
/// only, when the run came back but failed `ok` (heavy I/O under QEMU's software SVM: each caller says
/// what it saw). `show` renders a failed run for the log. A lane timeout or any other lane error is
/// returned as it is, never retried; `attempt` must be safe to repeat.
pub fn once_more_if_the_lane_failed(
    what: &str,
    mut attempt: impl FnMut() -> Result<Outcome, LaneError>,
    ok: impl Fn(&Outcome) -> bool,
    show: impl Fn(&Outcome) -> String,
) -> Result<Outcome, LaneError> {
    let o = attempt();
    let retry = match &o {
        Err(e) => machine_failed(e),
        Ok(out) => !ok(out) && !ember::lane::KvmFlavour::detect().runs_linux_directly(),
    };
    if !retry {
        return o;
    }
    let why = o.as_ref().map_or_else(LaneError::to_string, show);
    loud(&format!("LANE: {what} failed in the nested lane; retrying once:\n{why}"));
    attempt()
}

/// Says something on the real stderr, past the test harness's capture: a retry must be visible in
/// CI's log even when the test then passes.
pub fn loud(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}
