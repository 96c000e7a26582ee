//! A Firecracker-compatible API on a Unix socket (`ember --api-sock PATH`, `ember run --api-sock
//! PATH`): the subset of Firecracker's REST API (src/firecracker/swagger/firecracker.yaml,
//! docs/api_requests/) that firecracker-containerd, Kata's FC driver, flintlock and the
//! Firecracker Go SDK use, with its JSON bodies, status codes and rules on what may be called
//! before and after InstanceStart. README, "The Firecracker API", lists the endpoints and fields.
//!
//! One thread serves the socket (`http.rs`). Before the VM exists it only collects configuration
//! (`model.rs`); InstanceStart and `PUT /snapshot/load` hand a [`Boot`] to the main thread, which
//! builds the VM (`Vmm::new` or `Vmm::restore`), answers with a [`RequestSender`] and runs it.
//! From then on pause, resume, snapshot and Ctrl-Alt-Del go to the VM's event loop as requests
//! (requests.rs), and the API thread enters its own sandbox (ThreadKind::Api).
//!
//! Answers: 204 on success, 200 with a JSON body for the GETs, 400 with
//! `{"fault_message": "..."}` for anything refused: a body that does not parse or has an unknown
//! field, a request in the wrong state (configuration after start, a snapshot of a running VM),
//! a file that cannot be used, an endpoint ember does not implement.

pub mod http;
pub mod model;

use std::fs::OpenOptions;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::config::{SerialMode, ValidConfig, VmConfig};
use crate::requests::{RequestSender, VmRequest};
use crate::sandbox::{self, SeccompMode, ThreadKind};
use crate::vmm::RestoreConfig;
use http::{Request, Response, Server};
use model::{VmResources, VmStateUpdate};

/// The version `GET /` reports as `vmm_version`.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long the API waits for the VM to answer a request (a snapshot of a large guest takes a while).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors setting up the API socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("cannot listen on the API socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A path exists there and is not a stale socket.
    #[error("{0} exists and is not a socket: ember will not replace it (remove it, or choose another --api-sock)")]
    NotASocket(PathBuf),
    /// The API thread could not be started.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
    /// The config file.
    #[error("--config-file {path}: {why}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Binds the API socket. A socket file left by an earlier process that nobody listens on any more
/// is replaced; anything else at `path` is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let is_socket = std::fs::symlink_metadata(path).map(|m| m.file_type().is_socket()).unwrap_or(false);
            if !is_socket {
                return Err(ApiError::NotASocket(path.to_path_buf()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ApiError::Bind { path: path.to_path_buf(), source: e });
            }
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|source| ApiError::Bind { path: path.to_path_buf(), source })
        }
        Err(source) => Err(ApiError::Bind { path: path.to_path_buf(), source }),
    }
}

/// Reads Firecracker's `--config-file`.
pub fn read_config_file(path: &Path) -> Result<VmResources, ApiError> {
    let err = |why: String| ApiError::ConfigFile { path: path.to_path_buf(), why };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    VmResources::from_config_file(&text).map_err(err)
}

/// A VM for the main thread to build.
pub enum Boot {
    /// InstanceStart: a fresh VM, and its interfaces' `iface_id`s in order.
    Start(Box<ValidConfig>, Vec<String>),
    /// `PUT /snapshot/load`.
    Restore(Box<RestoreConfig>),
}

/// A [`Boot`] and where to send the outcome: the built VM's request channel, or why it failed.
pub struct BootRequest {
    /// What to build.
    pub boot: Boot,
    /// The answer.
    pub reply: Sender<Result<RequestSender, String>>,
}

/// The host side of VMs the API builds.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// The guest's console.
    pub serial: SerialMode,
    /// The sandbox.
    pub seccomp: SeccompMode,
    /// The VM's name for `GET /` (Firecracker's `--id`; default "anonymous-instance").
    pub id: Option<String>,
}

/// Where the VM is, as `GET /` says it (Firecracker's InstanceInfo `state`).
enum Phase {
    NotStarted,
    Running { vm: RequestSender, paused: bool },
}

/// The API thread's state.
struct Api {
    resources: VmResources,
    phase: Phase,
    options: ApiOptions,
    boot: Sender<BootRequest>,
    /// Set once the VM runs: the thread enters its sandbox after answering.
    enter_sandbox: bool,
    /// The memory file a loaded snapshot's guest RAM is mapped from (device, inode): a new
    /// snapshot must not truncate it under the running guest.
    backing_memory: Option<(u64, u64)>,
}

/// (device, inode) of an existing file.
fn file_id(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Starts the API thread on `listener`. `running`: the VM already runs (`ember run --api-sock`,
/// `--config-file`), described by `resources`. Returns the channel on which the main thread
/// receives what to build.
pub fn spawn(
    listener: UnixListener,
    resources: VmResources,
    running: Option<RequestSender>,
    options: ApiOptions,
) -> Result<Receiver<BootRequest>, ApiError> {
    let (tx, rx) = mpsc::channel();
    let mut server = Server::new(listener).map_err(ApiError::Thread)?;
    let seccomp = options.seccomp;
    let started = running.is_some();
    let mut api = Api {
        resources,
        phase: match running {
            Some(vm) => Phase::Running { vm, paused: false },
            None => Phase::NotStarted,
        },
        options,
        boot: tx,
        enter_sandbox: false,
        backing_memory: None,
    };
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let mut confined = false;
            if started {
                confined = enter_sandbox(seccomp);
            }
            loop {
                if let Err(e) = server.serve_one(&mut |req| api.handle(req)) {
                    log::error!("api: the socket failed: {e}; the VM runs on without its API");
                    return;
                }
                if api.enter_sandbox && !confined {
                    confined = enter_sandbox(seccomp);
                }
            }
        })
        .map_err(ApiError::Thread)?;
    Ok(rx)
}

fn enter_sandbox(seccomp: SeccompMode) -> bool {
    if let Err(e) = sandbox::enter(ThreadKind::Api, seccomp) {
        log::error!("api: {e}");
    }
    true
}

/// A body as `T`, or the 400 that says what is wrong with it.
fn body<T: DeserializeOwned>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body)
        .map_err(|e| bad(&format!("{} {}: the body is not valid: {e}", req.method, req.path)))
}

fn bad(msg: &str) -> Response {
    Response::fault(400, msg)
}

fn done(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => bad(&e),
    }
}

/// Endpoints Firecracker has and ember does not.
const NOT_IMPLEMENTED: &[&str] = &["/balloon", "/vsock", "/mmds", "/entropy", "/cpu-config", "/hotplug", "/serial"];

impl Api {
    fn handle(&mut self, req: &Request) -> Response {
        let r = self.route(req);
        if r.status >= 400 {
            log::info!("api: {} {} -> {} {}", req.method, req.path, r.status, r.body.as_deref().unwrap_or(""));
        }
        r
    }

    fn started(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    /// Firecracker's wording for configuration after InstanceStart.
    fn pre_boot_only(&self, what: &str) -> Result<(), Response> {
        if self.started() {
            return Err(bad(&format!("{what}: the operation is not supported after starting the microVM")));
        }
        Ok(())
    }

    fn route(&mut self, req: &Request) -> Response {
        let path = req.path.trim_end_matches('/');
        let path = if path.is_empty() { "/" } else { path };
        let (first, id) = match path[1..].split_once('/') {
            Some((a, b)) if !b.is_empty() && !b.contains('/') => (format!("/{a}"), Some(b.to_string())),
            _ => (path.to_string(), None),
        };
        let result: Result<Response, Response> = match (req.method.as_str(), first.as_str(), id.as_deref()) {
            ("GET", "/", None) => Ok(self.instance_info()),
            ("GET", "/version", None) => {
                Ok(Response::json(serde_json::json!({ "firecracker_version": VMM_VERSION }).to_string()))
            }
            ("GET", "/machine-config", None) => Ok(json(&self.resources.machine)),
            ("PUT", "/machine-config", None) => self.pre_boot_only("PUT /machine-config").and_then(|()| {
                let m = body(req)?;
                Ok(done(self.resources.set_machine(m)))
            }),
            ("PATCH", "/machine-config", None) => self.pre_boot_only("PATCH /machine-config").and_then(|()| {
                let u = body(req)?;
                let m = self.resources.machine.patched(u);
                Ok(done(self.resources.set_machine(m)))
            }),
            ("PUT", "/boot-source", None) => self.pre_boot_only("PUT /boot-source").and_then(|()| {
                self.resources.boot_source = Some(body(req)?);
                Ok(Response::no_content())
            }),
            ("PUT", "/drives", Some(id)) => self.pre_boot_only("PUT /drives").and_then(|()| {
                let d: model::Drive = body(req)?;
                if d.drive_id != id {
                    return Err(bad(&format!("the path names drive `{id}` and the body `{}`", d.drive_id)));
                }
                Ok(done(self.resources.put_drive(d)))
            }),
            ("PATCH", "/drives", Some(id)) => {
                if self.started() {
                    Err(bad(
                        "PATCH /drives: ember cannot change the disk of a running VM (no hot swap); configure drives before InstanceStart",
                    ))
                } else {
                    body::<model::DriveUpdate>(req).and_then(|u| {
                        if u.drive_id != id {
                            return Err(bad(&format!("the path names drive `{id}` and the body `{}`", u.drive_id)));
                        }
                        Ok(done(self.resources.patch_drive(u)))
                    })
                }
            }
            ("PUT", "/network-interfaces", Some(id)) => self.pre_boot_only("PUT /network-interfaces").and_then(|()| {
                let n: model::NetworkInterface = body(req)?;
                if n.iface_id != id {
                    return Err(bad(&format!("the path names interface `{id}` and the body `{}`", n.iface_id)));
                }
                Ok(done(self.resources.put_net(n)))
            }),
            ("PUT", "/logger", None) => body(req).map(|l| done(self.resources.set_logger(l))),
            ("PUT", "/metrics", None) => body(req).map(|m| {
                self.resources.metrics = Some(m);
                Response::no_content()
            }),
            ("PUT", "/actions", None) => body::<model::Action>(req).map(|a| self.action(&a.action_type)),
            ("PATCH", "/vm", None) => body::<VmStateUpdate>(req).map(|u| self.set_state(&u.state)),
            ("GET", "/vm", Some("config")) => Ok(json(&self.resources.full_config())),
            ("PUT", "/snapshot", Some("create")) => body(req).map(|c| self.create_snapshot(c)),
            ("PUT", "/snapshot", Some("load")) => body(req).map(|l| self.load_snapshot(l)),
            (m, p, _) if NOT_IMPLEMENTED.contains(&p) => Err(bad(&format!(
                "{m} {}: ember does not implement {p} (see README, \"The Firecracker API\", for what it does)",
                req.path
            ))),
            (m, _, _) => Err(bad(&format!("Invalid request method and/or path: {m} {}", req.path))),
        };
        result.unwrap_or_else(|r| r)
    }

    fn instance_info(&self) -> Response {
        let state = match self.phase {
            Phase::NotStarted => "Not started",
            Phase::Running { paused: false, .. } => "Running",
            Phase::Running { paused: true, .. } => "Paused",
        };
        Response::json(
            serde_json::json!({ "id": self.options.id.as_deref().unwrap_or("anonymous-instance"), "state": state, "vmm_version": VMM_VERSION, "app_name": "ember" })
                .to_string(),
        )
    }

    fn action(&mut self, action: &str) -> Response {
        match (action, &self.phase) {
            ("InstanceStart", Phase::NotStarted) => {
                let cfg = match self.resources.vm_config(&self.options.serial, self.options.seccomp) {
                    Ok(c) => c,
                    Err(e) => return bad(&format!("InstanceStart: {e}")),
                };
                if let Err(e) = check_kvm_runs(&cfg) {
                    return bad(&format!("InstanceStart: {e}"));
                }
                let ids = self.resources.nets.iter().map(|n| n.iface_id.clone()).collect();
                self.boot(Boot::Start(Box::new(cfg), ids), false)
            }
            ("InstanceStart", _) => bad("InstanceStart: the microVM is already running"),
            ("SendCtrlAltDel", Phase::Running { vm, .. }) => match vm.call(VmRequest::CtrlAltDel, REQUEST_TIMEOUT) {
                Ok(_) => Response::no_content(),
                Err(e) => bad(&format!("SendCtrlAltDel: {e}")),
            },
            ("SendCtrlAltDel", _) => bad("SendCtrlAltDel: the microVM is not running"),
            ("FlushMetrics", _) => Response::no_content(),
            (other, _) => bad(&format!("action_type `{other}`: InstanceStart, SendCtrlAltDel or FlushMetrics")),
        }
    }

    /// Hands a VM to the main thread to build, and waits for it.
    fn boot(&mut self, boot: Boot, paused: bool) -> Response {
        let (reply, answer) = mpsc::channel();
        if self.boot.send(BootRequest { boot, reply }).is_err() {
            return Response::fault(500, "the VMM's main thread is gone");
        }
        match answer.recv() {
            Ok(Ok(vm)) => {
                self.phase = Phase::Running { vm, paused };
                self.enter_sandbox = true;
                Response::no_content()
            }
            Ok(Err(e)) => bad(&e),
            Err(_) => Response::fault(500, "the VMM's main thread is gone"),
        }
    }

    fn set_state(&mut self, state: &str) -> Response {
        let Phase::Running { vm, paused } = &mut self.phase else {
            return bad("PATCH /vm: the microVM is not running (InstanceStart or PUT /snapshot/load first)");
        };
        let (req, now_paused) = match state {
            "Paused" => (VmRequest::Pause, true),
            "Resumed" => (VmRequest::Resume, false),
            other => return bad(&format!("state `{other}`: \"Paused\" or \"Resumed\"")),
        };
        match vm.call(req, REQUEST_TIMEOUT) {
            Ok(note) => {
                log::info!("api: {note}");
                *paused = now_paused;
                Response::no_content()
            }
            Err(e) => bad(&format!("PATCH /vm: {e}")),
        }
    }

    fn create_snapshot(&mut self, c: model::SnapshotCreate) -> Response {
        let Phase::Running { vm, paused } = &self.phase else {
            return bad("PUT /snapshot/create: the microVM is not running");
        };
        if !*paused {
            return bad("PUT /snapshot/create: the microVM must be paused first (PATCH /vm {\"state\": \"Paused\"})");
        }
        if c.snapshot_type.as_deref().is_some_and(|t| t != "Full") {
            return bad("snapshot_type: ember takes \"Full\" snapshots only");
        }
        if self.backing_memory.is_some() && file_id(&c.mem_file_path) == self.backing_memory {
            return bad(&format!(
                "PUT /snapshot/create: {} is the memory file this VM was loaded from and still reads: choose another",
                c.mem_file_path
            ));
        }
        let open = |p: &str, what: &str| {
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| bad(&format!("PUT /snapshot/create: cannot create the {what} {p}: {e}")))
        };
        let (state, memory) = match (open(&c.snapshot_path, "snapshot file"), open(&c.mem_file_path, "memory file")) {
            (Ok(s), Ok(m)) => (s, m),
            (Err(r), _) | (_, Err(r)) => return r,
        };
        if let Err(e) = memory.set_len(self.resources.machine.mem_size_mib << 20) {
            return bad(&format!("PUT /snapshot/create: cannot size the memory file {}: {e}", c.mem_file_path));
        }
        let req = VmRequest::CreateSnapshot { state, state_path: c.snapshot_path.clone(), memory };
        match vm.call(req, REQUEST_TIMEOUT) {
            Ok(note) => {
                log::info!("api: {note}");
                Response::no_content()
            }
            Err(e) => bad(&format!("PUT /snapshot/create: {e}")),
        }
    }

    fn load_snapshot(&mut self, l: model::SnapshotLoad) -> Response {
        if self.started() {
            return bad("PUT /snapshot/load: a microVM is already running in this process");
        }
        if self.resources.configured() {
            return bad(
                "PUT /snapshot/load: loading a snapshot is not allowed after configuring boot-specific resources",
            );
        }
        let memory = match l.memory_path() {
            Ok(m) => m,
            Err(e) => return bad(&format!("PUT /snapshot/load: {e}")),
        };
        // What the restored VM is, for GET /vm/config (read again, and checked, by Vmm::restore).
        let machine = match crate::snapshot::read_state(Path::new(&l.snapshot_path)) {
            Ok(s) => s.machine,
            Err(e) => return bad(&format!("PUT /snapshot/load: {}", crate::error_chain(&e))),
        };
        let r = RestoreConfig {
            state: PathBuf::from(&l.snapshot_path),
            memory: PathBuf::from(&memory),
            serial: self.options.serial.clone(),
            seccomp: self.options.seccomp,
            resume: l.resume_vm,
            // An API client reads the serial console; a saved console's ports stay unused.
            split_output: false,
            tap_overrides: l.network_overrides.iter().map(|o| (o.iface_id.clone(), o.host_dev_name.clone())).collect(),
        };
        let resp = self.boot(Boot::Restore(Box::new(r)), !l.resume_vm);
        if resp.status == 204 {
            self.backing_memory = file_id(&memory);
            let disks = machine.disk_configs();
            let taps: Vec<String> = machine.nets.iter().map(|n| n.tap.clone()).collect();
            self.resources = VmResources::describe(None, "", machine.cpus, machine.mem_size_bytes, &disks, &taps);
            for (iface, spec) in self.resources.nets.iter_mut().zip(&machine.nets) {
                iface.iface_id = spec.id.clone();
            }
        }
        resp
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    Response::json(serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

/// A Linux guest needs a KVM that runs it (not kvm_pvm, whose Linux guests run in ember's nested
/// lane, which the API does not drive): say so before building the VM.
fn check_kvm_runs(cfg: &VmConfig) -> Result<(), String> {
    use crate::boot::{KernelFormat, probe_kernel};
    use crate::lane::flavour::KvmFlavour;
    let linux = matches!(probe_kernel(&cfg.kernel), Ok(KernelFormat::BzImage | KernelFormat::Elf { linux_note: true }));
    if linux && matches!(KvmFlavour::detect(), KvmFlavour::Pvm) {
        return Err("this host's KVM (kvm_pvm) cannot run a Linux guest's user space; the API runs freestanding \
                    guests here (run Linux with `ember run`, which falls back to the nested machine)"
            .into());
    }
    Ok(())
}

/// The main thread's side: waits for the API to ask for a VM, builds it, and returns it with its
/// request channel wired to the API (the API hears of it when `Vmm::run` has started it; should
/// that fail, `run` returns `VmmError::Start` and the caller waits again). A VM that cannot be
/// built is answered as a 400 and the wait goes on; None: the API thread is gone.
pub fn wait_for_boot(
    boots: &Receiver<BootRequest>,
    timeline: &std::sync::Arc<crate::timeline::Timeline>,
) -> Option<crate::vmm::Vmm> {
    loop {
        let req = boots.recv().ok()?;
        let built = match req.boot {
            Boot::Start(cfg, ids) => crate::vmm::Vmm::new(&cfg, &crate::extras::Extras::default(), timeline.clone())
                .map(|mut vmm| {
                    vmm.name_interfaces(&ids);
                    vmm
                }),
            Boot::Restore(r) => crate::vmm::Vmm::restore(&r, timeline.clone()),
        };
        match built.and_then(|mut vmm| vmm.request_sender().map(|s| (vmm, s))) {
            Ok((mut vmm, sender)) => {
                // Answered once every vCPU holds its state (`Vmm::run`).
                let reply = req.reply;
                vmm.on_start(Box::new(move |started| {
                    let _ = reply.send(started.map(|()| sender));
                }));
                return Some(vmm);
            }
            Err(e) => {
                let _ = req.reply.send(Err(crate::error_chain(&e)));
            }
        }
    }
}
