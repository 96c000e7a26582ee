//! Firecracker's API bodies (src/firecracker/swagger/firecracker.yaml in Firecracker's
//! repository), as ember accepts them, and the VM they add up to. The same types read
//! Firecracker's `--config-file` (its keys are the API's paths: "boot-source", "machine-config",
//! "drives", "network-interfaces", "logger", "metrics").
//!
//! Every body refuses fields it does not know (`deny_unknown_fields`): a client that asks for a
//! rate limiter, a vhost-user drive or a CPU template learns that ember does not do it, in the
//! 400's `fault_message`, instead of getting a VM without it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{self, DiskConfig, KernelSource, NetConfig, SerialMode, ValidConfig, VmConfig};
use crate::sandbox::SeccompMode;

/// The kernel command line when `boot_args` is not given: Firecracker's own default
/// (`reboot=k panic=1 pci=off nomodule ...`) keeps its console off; ember's keeps COM1 on.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel (ELF vmlinux, PVH ELF or bzImage).
    pub kernel_image_path: String,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT|PATCH|GET /machine-config`. `smt`, `track_dirty_pages`, `cpu_template` and `huge_pages`
/// are accepted at the values ember implements (off, none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs, 1 to 32 as in Firecracker.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: false only.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking for diff snapshots: accepted, unused (ember takes full snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A CPU template: "None" only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages: "None" only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// `PATCH /machine-config`: any subset.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    vcpu_count: Option<u8>,
    mem_size_mib: Option<u64>,
    smt: Option<bool>,
    track_dirty_pages: Option<bool>,
    cpu_template: Option<String>,
    huge_pages: Option<String>,
}

impl MachineConfig {
    /// Refuses what ember does not implement.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=32).contains(&self.vcpu_count) {
            return Err(format!("vcpu_count {} is out of range: 1 to 32", self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err("mem_size_mib must be at least 1".into());
        }
        if self.smt {
            return Err("smt: ember does not offer SMT (hyper-threads) to guests; set it to false".into());
        }
        if self.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err("cpu_template: ember has no CPU templates; leave it out or set \"None\"".into());
        }
        if self.huge_pages.as_deref().is_some_and(|t| t != "None") {
            return Err("huge_pages: ember backs guest memory with normal pages; leave it out or set \"None\"".into());
        }
        Ok(())
    }

    /// Applies a PATCH.
    pub fn patched(&self, u: MachineConfigUpdate) -> MachineConfig {
        MachineConfig {
            vcpu_count: u.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: u.smt.unwrap_or(self.smt),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            cpu_template: u.cpu_template.or_else(|| self.cpu_template.clone()),
            huge_pages: u.huge_pages.or_else(|| self.huge_pages.clone()),
        }
    }
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's name (the path's last segment); also its virtio-blk serial.
    pub drive_id: String,
    /// The raw image on the host.
    pub path_on_host: String,
    /// Boot from it: it becomes /dev/vda and `root=/dev/vda` joins the command line.
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: bool,
    /// Boot from this partition (`root=PARTUUID=...`) of the root device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" or "Writeback": accepted (ember writes through to the host file either way and
    /// honours the guest's flushes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" only (ember does its disk I/O synchronously).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
}

impl Drive {
    /// Refuses what ember does not implement.
    pub fn check(&self) -> Result<(), String> {
        if self.drive_id.is_empty()
            || self.drive_id.len() > 20
            || !self.drive_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("drive_id `{}`: 1 to 20 characters from A-Z a-z 0-9 _ -", self.drive_id));
        }
        if self.cache_type.as_deref().is_some_and(|c| c != "Unsafe" && c != "Writeback") {
            return Err("cache_type: \"Unsafe\" or \"Writeback\"".into());
        }
        if self.io_engine.as_deref().is_some_and(|c| c != "Sync") {
            return Err("io_engine: ember does synchronous disk I/O only (\"Sync\")".into());
        }
        if self.partuuid.is_some() && !self.is_root_device {
            return Err("partuuid applies to the root device only".into());
        }
        Ok(())
    }
}

/// `PATCH /drives/{drive_id}` before the VM starts: a new backing file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive.
    pub drive_id: String,
    /// Its new image.
    pub path_on_host: Option<String>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's name (the path's last segment).
    pub iface_id: String,
    /// The host tap, which must exist.
    pub host_dev_name: String,
    /// The guest's MAC (default: derived from the tap name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /logger`: accepted and checked; ember logs to stderr (RUST_LOG), and `level` sets how much.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Firecracker writes its log here; ember does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// The log level it asks for.
    pub fn level_filter(&self) -> Result<Option<log::LevelFilter>, String> {
        Ok(Some(match self.level.as_deref() {
            None => return Ok(None),
            Some("Error") => log::LevelFilter::Error,
            Some("Warning") | Some("Warn") => log::LevelFilter::Warn,
            Some("Info") => log::LevelFilter::Info,
            Some("Debug") => log::LevelFilter::Debug,
            Some("Trace") => log::LevelFilter::Trace,
            Some("Off") => log::LevelFilter::Off,
            Some(other) => return Err(format!("level `{other}`: Error, Warning, Info, Debug, Trace or Off")),
        }))
    }
}

/// `PUT /metrics`: accepted; ember keeps no metrics file (FlushMetrics writes nothing).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where Firecracker would write its metrics.
    pub metrics_path: String,
}

/// `PUT /actions`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// InstanceStart, SendCtrlAltDel or FlushMetrics.
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    /// "Paused" or "Resumed".
    pub state: String,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// "Full" (the default); "Diff" is refused.
    #[serde(default)]
    pub snapshot_type: Option<String>,
    /// The state file to write.
    pub snapshot_path: String,
    /// The memory file to write.
    pub mem_file_path: String,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// The memory file.
    pub backend_path: String,
    /// "File" only ("Uffd" is refused).
    pub backend_type: String,
}

/// One entry of `network_overrides`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as named when the snapshot was taken.
    pub iface_id: String,
    /// The tap to use instead.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (Firecracker's older field).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// The memory file (Firecracker's newer field).
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Refused when true (ember takes full snapshots only).
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Accepted, unused.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Run at once; otherwise the VM waits paused for `PATCH /vm {"state": "Resumed"}`.
    #[serde(default)]
    pub resume_vm: bool,
    /// Other taps for the snapshot's interfaces.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
}

impl SnapshotLoad {
    /// The memory file, from whichever field gave it.
    pub fn memory_path(&self) -> Result<String, String> {
        if self.enable_diff_snapshots {
            return Err("enable_diff_snapshots: ember takes full snapshots only".into());
        }
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => Err("give the memory file once: mem_backend or mem_file_path, not both".into()),
            (Some(p), None) => Ok(p.clone()),
            (None, Some(b)) if b.backend_type == "File" => Ok(b.backend_path.clone()),
            (None, Some(b)) => {
                Err(format!("mem_backend.backend_type `{}`: ember loads memory from a \"File\"", b.backend_type))
            }
            (None, None) => {
                Err("missing the memory file: mem_backend {\"backend_path\", \"backend_type\": \"File\"}".into())
            }
        }
    }
}

/// Firecracker's `--config-file` and `GET /vm/config` (its FullVmConfiguration).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {
    /// The kernel.
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// Disks.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// NICs.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

/// What the API has been told so far: the VM to build at InstanceStart.
#[derive(Clone, Debug, Default)]
pub struct VmResources {
    /// The kernel.
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    pub machine: MachineConfig,
    /// Disks, in the order given (the root device goes first at build time).
    pub drives: Vec<Drive>,
    /// NICs, in the order given.
    pub nets: Vec<NetworkInterface>,
    /// Logging.
    pub logger: Option<Logger>,
    /// Metrics.
    pub metrics: Option<Metrics>,
}

impl VmResources {
    /// Reads a `--config-file`.
    pub fn from_config_file(text: &str) -> Result<VmResources, String> {
        let full: FullConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut r = VmResources::default();
        if let Some(m) = full.machine_config {
            r.set_machine(m)?;
        }
        r.boot_source = full.boot_source;
        for d in full.drives {
            r.put_drive(d)?;
        }
        for n in full.network_interfaces {
            r.put_net(n)?;
        }
        if let Some(l) = full.logger {
            r.set_logger(l)?;
        }
        r.metrics = full.metrics;
        Ok(r)
    }

    /// `GET /vm/config`.
    pub fn full_config(&self) -> FullConfig {
        FullConfig {
            boot_source: self.boot_source.clone(),
            machine_config: Some(self.machine.clone()),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// `PUT /machine-config`.
    pub fn set_machine(&mut self, m: MachineConfig) -> Result<(), String> {
        m.check()?;
        self.machine = m;
        Ok(())
    }

    /// `PUT /drives/{id}`: adds or replaces; one root device at most.
    pub fn put_drive(&mut self, d: Drive) -> Result<(), String> {
        d.check()?;
        if d.is_root_device && self.drives.iter().any(|o| o.is_root_device && o.drive_id != d.drive_id) {
            return Err("a root device is already configured: only one drive can have is_root_device".into());
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(o) => *o = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PATCH /drives/{id}` before start.
    pub fn patch_drive(&mut self, u: DriveUpdate) -> Result<(), String> {
        let d = self
            .drives
            .iter_mut()
            .find(|o| o.drive_id == u.drive_id)
            .ok_or_else(|| format!("no drive `{}`: PUT /drives/{} first", u.drive_id, u.drive_id))?;
        if let Some(p) = u.path_on_host {
            d.path_on_host = p;
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds or replaces.
    pub fn put_net(&mut self, n: NetworkInterface) -> Result<(), String> {
        if !crate::host::tap::valid_name(&n.host_dev_name) {
            return Err(format!(
                "host_dev_name `{}` is not a tap name (1 to 15 bytes, no `/`, `:` or spaces)",
                n.host_dev_name
            ));
        }
        if let Some(mac) = &n.guest_mac {
            config::parse_mac(mac).map_err(|e| e.to_string())?;
        }
        if self.nets.iter().any(|o| o.host_dev_name == n.host_dev_name && o.iface_id != n.iface_id) {
            return Err(format!("tap {} already serves another interface", n.host_dev_name));
        }
        match self.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
            Some(o) => *o = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// `PUT /logger`: checks it and sets the log level.
    pub fn set_logger(&mut self, l: Logger) -> Result<(), String> {
        if let Some(level) = l.level_filter()? {
            log::set_max_level(level);
        }
        self.logger = Some(l);
        Ok(())
    }

    /// True once anything that shapes a VM was configured (a snapshot can then no longer be loaded).
    pub fn configured(&self) -> bool {
        self.boot_source.is_some()
            || !self.drives.is_empty()
            || !self.nets.is_empty()
            || self.machine != MachineConfig::default()
    }

    /// The VM to build at InstanceStart.
    pub fn vm_config(&self, serial: &SerialMode, seccomp: SeccompMode) -> Result<ValidConfig, String> {
        let boot = self.boot_source.as_ref().ok_or("no boot source: PUT /boot-source before InstanceStart")?;
        let mut cfg = VmConfig::new(KernelSource::Path(PathBuf::from(&boot.kernel_image_path)));
        cfg.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
        cfg.cmdline = boot.boot_args.clone().unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        cfg.cpus = self.machine.vcpu_count;
        cfg.mem_size_bytes = self.machine.mem_size_mib.checked_mul(1 << 20).ok_or("mem_size_mib is too large")?;
        cfg.serial = serial.clone();
        cfg.seccomp = seccomp;
        // Firecracker puts the root device first, so it is /dev/vda.
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        for d in drives {
            if d.is_root_device {
                let root = match &d.partuuid {
                    Some(p) => format!("PARTUUID={p}"),
                    None => "/dev/vda".to_string(),
                };
                cfg.cmdline += &format!(" root={root} {}", if d.is_read_only { "ro" } else { "rw" });
            }
            cfg.disks.push(DiskConfig {
                path: PathBuf::from(&d.path_on_host),
                read_only: d.is_read_only,
                id: Some(d.drive_id.clone()),
            });
        }
        for n in &self.nets {
            let mac = n.guest_mac.as_deref().map(config::parse_mac).transpose().map_err(|e| e.to_string())?;
            cfg.nets.push(NetConfig {
                backend: crate::config::NetBackendConfig::Tap { name: n.host_dev_name.clone(), create: false },
                mac,
            });
        }
        cfg.validate().map_err(|e| e.to_string())
    }

    /// What `GET /vm/config` shows of a VM not built from the API (`ember run --api-sock`, a
    /// restored snapshot).
    pub fn describe(
        kernel: Option<&str>,
        cmdline: &str,
        cpus: u8,
        mem_size_bytes: u64,
        disks: &[DiskConfig],
        taps: &[String],
    ) -> VmResources {
        VmResources {
            boot_source: kernel.map(|k| BootSource {
                kernel_image_path: k.to_string(),
                boot_args: Some(cmdline.to_string()),
                initrd_path: None,
            }),
            machine: MachineConfig { vcpu_count: cpus, mem_size_mib: mem_size_bytes >> 20, ..Default::default() },
            drives: disks
                .iter()
                .enumerate()
                .map(|(i, d)| Drive {
                    drive_id: d.id.clone().unwrap_or_else(|| format!("disk{i}")),
                    path_on_host: d.path.display().to_string(),
                    is_root_device: false,
                    is_read_only: d.read_only,
                    partuuid: None,
                    cache_type: None,
                    io_engine: None,
                })
                .collect(),
            nets: taps
                .iter()
                .map(|t| NetworkInterface { iface_id: t.clone(), host_dev_name: t.clone(), guest_mac: None })
                .collect(),
            logger: None,
            metrics: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecrackers_getting_started_config_builds_a_vm() {
        let text = r#"{
          "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
          "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": false}],
          "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}
        }"#;
        let r = VmResources::from_config_file(text).unwrap();
        let cfg = r.vm_config(&SerialMode::None, SeccompMode::On).unwrap();
        assert_eq!((cfg.cpus, cfg.mem_size_bytes), (2, 1 << 30));
        assert!(cfg.cmdline.ends_with("pci=off root=/dev/vda rw"), "{}", cfg.cmdline);
        assert_eq!(cfg.disks[0].id.as_deref(), Some("rootfs"));
    }

    #[test]
    fn unknown_fields_and_unsupported_values_are_refused_by_name() {
        let e = VmResources::from_config_file(r#"{"vsock": {}}"#).unwrap_err();
        assert!(e.contains("unknown field `vsock`"), "{e}");
        let e = serde_json::from_str::<Drive>(
            r#"{"drive_id":"a","path_on_host":"x","is_root_device":false,"rate_limiter":{}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `rate_limiter`"), "{e}");
        let m = MachineConfig { smt: true, ..Default::default() };
        assert!(m.check().unwrap_err().contains("SMT"));
        let mut r = VmResources::default();
        let root = |id: &str| Drive {
            drive_id: id.into(),
            path_on_host: "x".into(),
            is_root_device: true,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            io_engine: None,
        };
        r.put_drive(root("a")).unwrap();
        assert!(r.put_drive(root("b")).unwrap_err().contains("only one"));
        assert!(r.vm_config(&SerialMode::None, SeccompMode::On).unwrap_err().contains("PUT /boot-source"));
    }

    #[test]
    fn snapshot_load_names_its_memory_file_once() {
        let l: SnapshotLoad =
            serde_json::from_str(r#"{"snapshot_path":"s","mem_backend":{"backend_path":"m","backend_type":"File"}}"#)
                .unwrap();
        assert_eq!(l.memory_path().unwrap(), "m");
        let l: SnapshotLoad = serde_json::from_str(r#"{"snapshot_path":"s","mem_file_path":"m"}"#).unwrap();
        assert_eq!(l.memory_path().unwrap(), "m");
        let l: SnapshotLoad =
            serde_json::from_str(r#"{"snapshot_path":"s","mem_backend":{"backend_path":"m","backend_type":"Uffd"}}"#)
                .unwrap();
        assert!(l.memory_path().unwrap_err().contains("File"));
    }
}
