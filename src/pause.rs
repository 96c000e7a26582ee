//! Pausing a running VM: every vCPU thread leaves KVM_RUN and parks here, and saves its state on
//! the way in (KVM wants a vCPU's state read on the thread that runs it).
//!
//! The event loop's thread asks ([`PauseGate::request`]), kicks each vCPU thread with the kick
//! signal (vcpu.rs: `immediate_exit`, so KVM_RUN returns at once) and waits until all are parked
//! ([`PauseGate::wait_parked`]). A vCPU sees the request at the top of its run loop, after it has
//! served the exit it was on: it completes any port or MMIO access KVM had left half done (one
//! KVM_RUN with `immediate_exit` set, KVM api.rst 5 "kvm_run"), saves its registers, and waits in
//! [`PauseGate::park`] until [`PauseGate::resume`], or until the VM stops. A paused VM also serves
//! no virtqueue: the event loop keeps their notifications for the resume (event_loop.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::control::VmControl;
use crate::snapshot::vcpu::VcpuState;

/// How often a parked vCPU looks at the stop flag (a stop does not signal the condvar).
const STOP_POLL: Duration = Duration::from_millis(20);

/// The pause handshake between the event loop and the vCPU threads.
#[derive(Debug)]
pub struct PauseGate {
    requested: AtomicBool,
    inner: Mutex<Gate>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Gate {
    /// How many vCPUs are parked now.
    parked: usize,
    /// Bumped by every resume: a parked vCPU leaves when it changes.
    generation: u64,
    /// What each vCPU saved when it parked (an error message if it could not).
    states: Vec<Option<Result<VcpuState, String>>>,
}

impl PauseGate {
    /// A gate for `vcpus` vCPUs; `paused`: the VM starts paused (a restored snapshot).
    pub fn new(vcpus: usize, paused: bool) -> PauseGate {
        let gate = Gate { states: vec![None; vcpus], ..Default::default() };
        PauseGate { requested: AtomicBool::new(paused), inner: Mutex::new(gate), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        // A panicking vCPU stops the VM (vcpu::run_catching); the counters stay meaningful.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a pause is asked for or in force: vCPUs check it once per exit.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks every vCPU to park (the caller kicks them out of KVM_RUN).
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// Waits until `n` vCPUs are parked, or the VM stops, or `timeout` passes; true if all parked.
    /// `kick` is called every few milliseconds meanwhile, to move vCPUs still in KVM_RUN.
    pub fn wait_parked(&self, n: usize, control: &VmControl, timeout: Duration, mut kick: impl FnMut()) -> bool {
        let deadline = Instant::now() + timeout;
        let mut gate = self.lock();
        while gate.parked < n {
            if control.is_stopped() || Instant::now() >= deadline {
                return false;
            }
            drop(gate);
            kick();
            gate = self.lock();
            gate = self
                .changed
                .wait_timeout(gate, Duration::from_millis(2))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Lets every parked vCPU run again.
    pub fn resume(&self) {
        let mut gate = self.lock();
        self.requested.store(false, Ordering::Release);
        gate.generation = gate.generation.wrapping_add(1);
        gate.states.iter_mut().for_each(|s| *s = None);
        self.changed.notify_all();
    }

    /// vCPU `id` parks with the state it saved, until the next resume or the VM's stop.
    pub fn park(&self, id: u8, state: Result<VcpuState, String>, control: &VmControl) {
        let mut gate = self.lock();
        if let Some(slot) = gate.states.get_mut(usize::from(id)) {
            *slot = Some(state);
        }
        let generation = gate.generation;
        gate.parked += 1;
        self.changed.notify_all();
        while gate.generation == generation && !control.is_stopped() {
            gate = self.changed.wait_timeout(gate, STOP_POLL).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        gate.parked -= 1;
    }

    /// The states the parked vCPUs saved, in vCPU order (call while all are parked).
    pub fn states(&self) -> Result<Vec<VcpuState>, String> {
        let gate = self.lock();
        gate.states
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(s)) => Ok(s.clone()),
                Some(Err(e)) => Err(format!("vCPU {i}: {e}")),
                None => Err(format!("vCPU {i} is not parked")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn vcpus_park_report_their_state_and_leave_on_resume() {
        let control = Arc::new(VmControl::new().unwrap());
        let gate = Arc::new(PauseGate::new(2, false));
        gate.request();
        let threads: Vec<_> = (0..2u8)
            .map(|id| {
                let (gate, control) = (gate.clone(), control.clone());
                std::thread::spawn(move || gate.park(id, Ok(VcpuState::default()), &control))
            })
            .collect();
        assert!(gate.wait_parked(2, &control, Duration::from_secs(5), || {}));
        assert_eq!(gate.states().unwrap().len(), 2);
        gate.resume();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!gate.requested());
        assert!(gate.states().is_err(), "states are forgotten at resume");
    }

    #[test]
    fn a_stop_releases_parked_vcpus() {
        let control = Arc::new(VmControl::new().unwrap());
        let gate = Arc::new(PauseGate::new(1, true));
        let (g, c) = (gate.clone(), control.clone());
        let t = std::thread::spawn(move || g.park(0, Err("no".into()), &c));
        assert!(gate.wait_parked(1, &control, Duration::from_secs(5), || {}));
        assert!(gate.states().unwrap_err().contains("vCPU 0: no"));
        control.stop(crate::control::StopReason::UserQuit(15));
        t.join().unwrap();
        assert!(!gate.wait_parked(1, &control, Duration::from_secs(5), || {}));
    }
}
