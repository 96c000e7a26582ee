//! How a running VM comes to an end.
//!
//! Any thread may decide the VM is over: a vCPU that sees a triple fault, the
//! exit device, the i8042 reset line, the ACPI sleep control register, the console's `Ctrl-a x`, a signal. Each
//! calls [`VmControl::stop`] with a [`StopReason`]; the first reason wins. The
//! event loop wakes on `stop_evt` and returns; then `Vmm::run`, on the same
//! main thread, kicks every vCPU out of KVM_RUN and joins them (`stop_vcpus`
//! in vmm.rs). A vCPU sees the flag ([`VmControl::is_stopped`]) at its next exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::serial::LineObserver;
use crate::timeline::Timeline;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote this status to the exit device.
    GuestExit(u8),
    /// The guest reset the machine (i8042 reset, KVM system event): a reboot.
    Reset,
    /// The guest powered the machine off (ACPI S5 through the sleep control
    /// register, devices/acpi_sleep.rs).
    PowerOff,
    /// The guest crashed: triple fault, KVM internal error, kernel panic, a
    /// bus fault on unmapped MMIO. The text says what happened.
    GuestCrash(String),
    /// The user asked to quit (Ctrl-a x, SIGINT, SIGTERM, SIGHUP): the signal number,
    /// or 0 for the console escape.
    UserQuit(i32),
    /// ember itself failed while the VM ran (a device or vCPU thread, KVM_RUN): not the guest's
    /// doing. (Named apart from `vmm::VmmError`, which is a VM that could not be built.)
    EmberFailed(String),
}

/// Shared stop flag, reason and wake-up event.
#[derive(Debug)]
pub struct VmControl {
    stopped: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    /// When the first stop request came (for the boot timeline).
    requested_at: Mutex<Option<Instant>>,
    /// Becomes readable when the VM should stop.
    pub stop_evt: EventFd,
    /// Set when the serial stream showed a kernel panic: the reset that
    /// follows (`panic=-1 reboot=k`) is then a crash, not a reboot.
    panicked: AtomicBool,
}

impl VmControl {
    /// A fresh control block.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmControl {
            stopped: AtomicBool::new(false),
            reason: Mutex::new(None),
            requested_at: Mutex::new(None),
            stop_evt: EventFd::new(EFD_NONBLOCK)?,
            panicked: AtomicBool::new(false),
        })
    }

    /// Asks the VM to stop; only the first reason is kept.
    pub fn stop(&self, reason: StopReason) {
        let reason = match reason {
            StopReason::Reset if self.panicked.load(Ordering::Relaxed) => {
                StopReason::GuestCrash("the guest kernel panicked".into())
            }
            r => r,
        };
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
            *lock(&self.requested_at) = Some(Instant::now());
        }
        self.stopped.store(true, Ordering::Release);
        // A full eventfd counter (2^64-2) is the only failure; one wake-up is enough.
        let _ = self.stop_evt.write(1);
    }

    /// True once `stop` was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Why the VM stopped (None while it runs).
    pub fn reason(&self) -> Option<StopReason> {
        lock(&self.reason).clone()
    }

    /// When the first stop request came and who made it ("guest: exit device",
    /// "guest: reset", "guest: crash", "user", "ember"), for the timeline.
    pub fn requested(&self) -> Option<(Instant, &'static str)> {
        let who = match self.reason()? {
            StopReason::GuestExit(_) => "guest: exit device",
            StopReason::Reset => "guest: reset",
            StopReason::PowerOff => "guest: power off",
            StopReason::GuestCrash(_) => "guest: crash",
            StopReason::UserQuit(_) => "user",
            StopReason::EmberFailed(_) => "ember",
        };
        Some(((*lock(&self.requested_at))?, who))
    }

    /// Records that the guest kernel printed a panic.
    pub fn note_panic(&self) {
        self.panicked.store(true, Ordering::Relaxed);
    }
}

/// The line Linux prints when it panics (kernel/panic.c, `panic()`).
const KERNEL_PANIC: &[u8] = b"Kernel panic - not syncing";
/// The line Linux prints when it starts the initramfs's init (init/main.c, `run_init_process()`).
const RUN_INIT: &[u8] = b"Run /init";

/// What Linux's console says that ember acts on, as an observer of the serial output (every VM gets
/// it; other guests never print these lines): a panic, after which the reset that follows
/// (`panic=-1 reboot=k`) is a crash ([`VmControl::note_panic`]); and, for the boot timeline, the
/// start of the initramfs's /init.
pub fn linux_console_observer(control: Arc<VmControl>, timeline: Arc<Timeline>) -> LineObserver {
    Box::new(move |line: &[u8]| {
        let has = |m: &[u8]| line.windows(m.len()).any(|w| w == m);
        if has(KERNEL_PANIC) {
            control.note_panic();
            timeline.mark_once("guest: kernel panic");
        } else if has(RUN_INIT) {
            timeline.mark_once("guest: kernel runs /init");
        }
    })
}

/// The stop path must work even after a panic elsewhere: these locks guard
/// plain values that are written whole, so a poisoned one is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_linux_console_makes_the_reset_a_crash() {
        let control = Arc::new(VmControl::new().unwrap());
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let mut observe = linux_console_observer(control.clone(), timeline.clone());
        observe(b"[    0.5] Run /init as init process\r");
        assert!(timeline.at("guest: kernel runs /init").is_some());
        observe(b"[    0.6] Kernel panic - not syncing: Attempted to kill init!");
        control.stop(StopReason::Reset);
        assert!(matches!(control.reason(), Some(StopReason::GuestCrash(_))));
    }

    #[test]
    fn first_reason_wins() {
        let c = VmControl::new().unwrap();
        assert!(!c.is_stopped());
        c.stop(StopReason::GuestExit(3));
        c.stop(StopReason::Reset);
        assert!(c.is_stopped());
        assert_eq!(c.reason(), Some(StopReason::GuestExit(3)));
        assert_eq!(c.requested().map(|(_, who)| who), Some("guest: exit device"));
        assert_eq!(c.stop_evt.read().unwrap(), 2);
    }

    #[test]
    fn reset_after_panic_is_a_crash() {
        let c = VmControl::new().unwrap();
        c.note_panic();
        c.stop(StopReason::Reset);
        assert!(matches!(c.reason(), Some(StopReason::GuestCrash(_))));
    }
}
