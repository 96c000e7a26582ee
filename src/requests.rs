//! Requests to a running VM from outside it (the API thread, api/): pause, resume, take a
//! snapshot, the guest's Ctrl-Alt-Del. They are served on the event loop's thread, between two
//! events, by [`Controller`]: it owns nothing, it borrows the parts of a running `Vmm` a request
//! needs, so the devices and the vCPUs stay where `Vmm::run` keeps them.
//!
//! Path of one `PATCH /vm {"state": "Paused"}`: api/ (parse, check the state) ->
//! [`RequestSender::call`] (channel + eventfd) -> `event_loop.rs` (`Token::Requests`) ->
//! [`Controller::serve`] -> pause.rs (kick, park, wait) -> the reply goes back on the channel.

use std::fs::File;
use std::io::BufWriter;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::control::{StopReason, VmControl};
use crate::devices::i8042::I8042;
use crate::devices::serial::Serial;
use crate::devices::virtio::mmio::MmioTransport;
use crate::memory::GuestRam;
use crate::pause::PauseGate;
use crate::snapshot::{self, Machine, Snapshot};

/// How long a pause may take before it is given up (a vCPU stuck in a device call).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What can be asked of a running VM.
#[derive(Debug)]
pub enum VmRequest {
    /// Park every vCPU and stop serving the devices' queues.
    Pause,
    /// Undo `Pause`.
    Resume,
    /// Write a full snapshot of the paused VM: the state to `state`, guest RAM to `memory` (both
    /// opened, and the memory file sized, by the caller).
    CreateSnapshot {
        /// The state file.
        state: File,
        /// Its name, for messages.
        state_path: String,
        /// The memory file.
        memory: File,
    },
    /// Pause, write a full snapshot (as `CreateSnapshot`), then end the VM (exit status 0), or
    /// end it with the error: `ember run --save-snapshot`.
    SaveAndStop {
        /// The state file.
        state: File,
        /// Its name, for messages.
        state_path: String,
        /// The memory file.
        memory: File,
    },
    /// Firecracker's SendCtrlAltDel. ember's i8042 has no keyboard behind it, so the key press
    /// becomes what the guest would do with it under `reboot=k`: the VM ends as on a reboot.
    CtrlAltDel,
}

/// What a served request answers: Ok(a note for the log), or why it failed.
pub type Reply = Result<String, String>;

/// The sending side, held by the API thread.
#[derive(Clone)]
pub struct RequestSender {
    tx: Sender<(VmRequest, Sender<Reply>)>,
    evt: Arc<EventFd>,
}

/// The receiving side, served by the event loop.
pub struct RequestReceiver {
    rx: Receiver<(VmRequest, Sender<Reply>)>,
    evt: Arc<EventFd>,
}

/// A new request channel.
pub fn channel() -> std::io::Result<(RequestSender, RequestReceiver)> {
    let (tx, rx) = mpsc::channel();
    let evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((RequestSender { tx, evt: evt.clone() }, RequestReceiver { rx, evt }))
}

impl RequestSender {
    /// Sends `req` without waiting for its answer (safe on a vCPU thread: it never blocks).
    pub fn post(&self, req: VmRequest) {
        let (reply_tx, _) = mpsc::channel();
        if self.tx.send((req, reply_tx)).is_ok() {
            let _ = self.evt.write(1);
        }
    }

    /// Sends `req` and waits for its answer (at most `timeout`).
    pub fn call(&self, req: VmRequest, timeout: Duration) -> Reply {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx.send((req, reply_tx)).map_err(|_| "the VM is no longer running".to_string())?;
        let _ = self.evt.write(1);
        match reply_rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("the VM did not answer within {timeout:?}")),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the VM stopped before answering".to_string()),
        }
    }
}

/// The parts of a running VM that requests act on, borrowed from `Vmm::run`.
pub struct Controller<'a> {
    /// The requests.
    pub receiver: &'a RequestReceiver,
    /// The VM.
    pub vm: &'a VmFd,
    /// Whether the in-kernel irqchip exists.
    pub irqchip: bool,
    /// Guest RAM.
    pub mem: &'a GuestRam,
    /// The pause handshake.
    pub gate: &'a PauseGate,
    /// The vCPU threads, to kick out of KVM_RUN.
    pub vcpu_threads: Vec<libc::pthread_t>,
    /// The stop control.
    pub control: &'a VmControl,
    /// COM1.
    pub serial: &'a Mutex<Serial>,
    /// The i8042.
    pub i8042: &'a Mutex<I8042>,
    /// The virtio transports, in bus order.
    pub transports: &'a [Arc<Mutex<MmioTransport>>],
    /// What the VM is made of.
    pub machine: &'a Machine,
}

impl Controller<'_> {
    /// The descriptor that becomes readable when a request waits.
    pub fn fd(&self) -> RawFd {
        self.receiver.evt.as_raw_fd()
    }

    /// True while the VM is paused.
    pub fn paused(&self) -> bool {
        self.gate.requested()
    }

    /// Serves every waiting request.
    pub fn serve(&mut self) {
        let _ = self.receiver.evt.read();
        while let Ok((req, reply)) = self.receiver.rx.try_recv() {
            let answer = match req {
                VmRequest::Pause => self.pause(),
                VmRequest::Resume => {
                    self.gate.resume();
                    Ok("resumed".into())
                }
                VmRequest::CreateSnapshot { state, state_path, memory } => {
                    self.create_snapshot(state, &state_path, &memory)
                }
                VmRequest::SaveAndStop { state, state_path, memory } => {
                    let saved = self.pause().and_then(|_| self.create_snapshot(state, &state_path, &memory));
                    match &saved {
                        Ok(note) => {
                            log::info!("{note}");
                            self.control.stop(StopReason::GuestExit(0));
                        }
                        Err(e) => self.control.stop(StopReason::EmberFailed(format!("cannot save the snapshot: {e}"))),
                    }
                    saved
                }
                VmRequest::CtrlAltDel => {
                    self.control.stop(StopReason::Reset);
                    Ok("Ctrl-Alt-Del: the VM ends as on a reboot".into())
                }
            };
            // The API thread may have given up waiting: nothing to tell then.
            let _ = reply.send(answer);
        }
    }

    fn pause(&self) -> Reply {
        if self.gate.requested() && self.gate.wait_parked(self.vcpu_threads.len(), self.control, Duration::ZERO, || {})
        {
            return Ok("already paused".into());
        }
        let start = Instant::now();
        self.gate.request();
        let threads = &self.vcpu_threads;
        let parked = self.gate.wait_parked(threads.len(), self.control, PAUSE_TIMEOUT, || {
            for t in threads {
                // SAFETY: the thread is not joined before `Vmm::run` returns, so its pthread_t is
                // valid; the kick handler only sets `immediate_exit` (vcpu.rs).
                unsafe { libc::pthread_kill(*t, crate::vcpu::kick_signal()) };
            }
        });
        if !parked {
            self.gate.resume();
            return Err(if self.control.is_stopped() {
                "the VM stopped while being paused".into()
            } else {
                format!("the vCPUs did not stop within {PAUSE_TIMEOUT:?}: the VM keeps running")
            });
        }
        Ok(format!("paused in {:?}", start.elapsed()))
    }

    fn create_snapshot(&self, state: File, state_path: &str, memory: &File) -> Reply {
        if !self.gate.requested() {
            return Err("the VM is not paused".into());
        }
        let p9 = crate::devices::virtio::p9::VIRTIO_ID_9P;
        if self.transports.iter().any(|t| lock(t).is_ok_and(|t| t.device_type() == p9)) {
            return Err("a VM with shared folders (-v) cannot be snapshotted: the files its file server \
                        holds open are not part of a snapshot"
                .into());
        }
        let start = Instant::now();
        // Guest RAM first, the state (which lists where the RAM is) last.
        let memory_extents = snapshot::memory::write_memory(self.mem, memory, self.mem.is_file_backed())
            .map_err(|e| format!("cannot write the memory file: {e}"))?;
        let written: u64 = memory_extents.iter().map(|e| e.1).sum();
        let snap = Snapshot {
            cpu: snapshot::CpuModel::host(),
            machine: self.machine.clone(),
            vm: snapshot::vm::save(self.vm, self.irqchip)?,
            vcpus: self.gate.states()?,
            serial: lock(self.serial)?.save_state(),
            i8042: lock(self.i8042)?.save_state(),
            transports: self.transports.iter().map(|t| Ok(lock(t)?.save_state())).collect::<Result<_, String>>()?,
            memory_extents,
        };
        snapshot::write_state(&snap, &mut BufWriter::new(state), state_path).map_err(|e| crate::error_chain(&e))?;
        Ok(format!("snapshot taken in {:?}: {} KiB of guest memory written", start.elapsed(), written >> 10))
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, String> {
    m.lock().map_err(|_| "a device failed (it panicked)".to_string())
}
