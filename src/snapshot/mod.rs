//! Full snapshots of a paused VM, and what they are made of.
//!
//! A snapshot is two files. The *state file* holds everything but guest RAM:
//! ```text
//! bytes 0..8    magic "EMBERSNP"
//!       8..12   format version, u32 little endian (SNAPSHOT_VERSION)
//!      12..20   length of the body, u64 little endian
//!      20..52   SHA-256 of the body
//!      52..     the body: one JSON object, `Snapshot`
//! ```
//! The body names the host CPU it was taken on, the machine (vCPUs, RAM size, irqchip, the disks
//! and taps to reopen by path and name), the VM's state (PIC, IOAPIC, PIT, kvm-clock: `vm.rs`),
//! every vCPU's (`vcpu.rs`) and every device's (`devices.rs`). KVM's structures are kept as their
//! bytes (`pod.rs`). The *memory file* is guest RAM, byte for byte, its ranges one after the other
//! (see `memory::ram_ranges`); pages that are zero are holes, so a 1 GiB guest that touched 20 MiB
//! takes about 20 MiB of disk.
//!
//! Loading refuses, with a message that says why, a file of another format version, a damaged one
//! (checksum), one taken on another CPU model (vendor, family, model, stepping), and a memory file
//! of the wrong size; `Vmm::restore` (vmm.rs) then maps the memory file MAP_PRIVATE, so pages load
//! as the guest touches them and the file is never written.
//!
//! Firecracker's equivalent is described in its docs/snapshotting/snapshot-support.md; the state
//! is the same list, the encoding is ember's own.

pub mod devices;
pub mod memory;
pub mod pod;
pub mod vcpu;
pub mod vm;

use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::{DiskConfig, NetConfig};

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"EMBERSNP";
/// The state file's format version; bump it whenever `Snapshot` changes shape or meaning.
pub const SNAPSHOT_VERSION: u32 = 2;
/// Largest state body ember reads (a 254-vCPU VM's state is a few MiB).
const MAX_BODY_BYTES: u64 = 64 << 20;
const HEADER_BYTES: usize = 52;

/// Errors writing or reading a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{what} {path}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a state file at all.
    #[error("{0} is not an ember snapshot state file (no EMBERSNP header)")]
    NotASnapshot(String),
    /// Another format version.
    #[error(
        "{path} is a snapshot of format version {found}; this ember reads version {SNAPSHOT_VERSION}: take the snapshot again with this ember"
    )]
    Version {
        /// The file.
        path: String,
        /// Its version.
        found: u32,
    },
    /// The checksum does not match: the file was cut short or changed.
    #[error("{0} is damaged: its SHA-256 checksum does not match (truncated or modified)")]
    Checksum(String),
    /// The body is not what this version writes.
    #[error("{path} cannot be decoded: {why}")]
    Decode {
        /// The file.
        path: String,
        /// What serde said.
        why: String,
    },
    /// Taken on another CPU.
    #[error(
        "the snapshot was taken on a {taken} CPU and this host has a {here}: restoring it could give the guest CPU features this host lacks, so ember refuses"
    )]
    CpuModel {
        /// The snapshot's CPU.
        taken: String,
        /// This host's.
        here: String,
    },
    /// The memory file does not match the state.
    #[error("the memory file {path} holds {found} bytes; the snapshot's guest has {expected} bytes of RAM")]
    MemorySize {
        /// The file.
        path: String,
        /// Its size.
        found: u64,
        /// Guest RAM.
        expected: u64,
    },
    /// A KVM call or a device refused the state.
    #[error("{0}")]
    State(String),
}

/// The host CPU a snapshot was taken on: CPUID leaf 0's vendor, leaf 1's EAX (stepping, model,
/// family: Intel SDM vol. 2A, CPUID, figure 3-6) and the brand string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// "GenuineIntel", "AuthenticAMD", ...
    pub vendor: String,
    /// Leaf 1 EAX.
    pub signature: u32,
    /// Leaves 0x80000002-4, for the message.
    pub brand: String,
}

impl CpuModel {
    /// This host's CPU.
    pub fn host() -> CpuModel {
        let cpuid = crate::x86::cpuid::host_cpuid;
        let [_, b, c, d] = cpuid(0, 0);
        let vendor = [b, d, c].iter().flat_map(|r| r.to_le_bytes()).map(char::from).collect();
        let mut brand = String::new();
        if cpuid(0x8000_0000, 0)[0] >= 0x8000_0004 {
            for leaf in 0x8000_0002..=0x8000_0004 {
                brand.extend(cpuid(leaf, 0).iter().flat_map(|r| r.to_le_bytes()).filter(|b| *b != 0).map(char::from));
            }
        }
        CpuModel { vendor, signature: cpuid(1, 0)[0], brand: brand.trim().to_string() }
    }

    fn describe(&self) -> String {
        let b = if self.brand.is_empty() { &self.vendor } else { &self.brand };
        format!("{b} (signature {:#x})", self.signature)
    }

    /// Same vendor and signature: the same features can be offered.
    pub fn check_compatible(&self, here: &CpuModel) -> Result<(), SnapshotError> {
        if self.vendor == here.vendor && self.signature == here.signature {
            return Ok(());
        }
        Err(SnapshotError::CpuModel { taken: self.describe(), here: here.describe() })
    }
}

/// One disk, reopened by path at restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Host path.
    pub path: String,
    /// Read-only.
    pub read_only: bool,
    /// Serial.
    pub id: Option<String>,
}

/// One NIC, reattached to its tap by name at restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// The interface's name for the API's `network_overrides` (Firecracker's `iface_id`; the
    /// tap's name when the VM was not built by the API).
    pub id: String,
    /// Host tap name.
    pub tap: String,
    /// The guest's MAC.
    pub mac: [u8; 6],
}

/// The machine to build before its state is loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM.
    pub mem_size_bytes: u64,
    /// In-kernel PIC, IOAPIC, LAPICs and PIT.
    pub irqchip: bool,
    /// virtio-blk devices, in bus order.
    pub disks: Vec<DiskSpec>,
    /// virtio-net devices, after the disks.
    pub nets: Vec<NetSpec>,
    /// A virtio-rng device, last.
    pub rng: bool,
    /// The kernel was Linux (then a host whose KVM cannot run Linux restores it in the nested lane).
    #[serde(default)]
    pub linux: bool,
    /// A virtio-console (split output), after every other virtio device; its ports are in its
    /// saved state (`devices::ConsoleState`).
    #[serde(default)]
    pub console: bool,
}

impl Machine {
    /// Whether ember can build this machine at all: a state file is input, and one that says 0
    /// vCPUs, no RAM or more devices than interrupt lines must be refused, not half-built (a VM
    /// without a vCPU would wait forever). The same limits as `VmConfig::validate`.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let bad = |why: String| {
            Err(SnapshotError::State(format!("the snapshot describes a machine ember cannot build: {why}")))
        };
        if self.cpus == 0 || self.cpus > crate::config::MAX_CPUS {
            return bad(format!("{} vCPUs (1 to {})", self.cpus, crate::config::MAX_CPUS));
        }
        if self.mem_size_bytes < (2 << 20) || !self.mem_size_bytes.is_multiple_of(4096) {
            return bad(format!("{} bytes of RAM (at least 2 MiB, whole pages)", self.mem_size_bytes));
        }
        if self.virtio_count() > crate::config::MAX_VIRTIO_DEVICES {
            return bad(format!(
                "{} virtio devices (at most {})",
                self.virtio_count(),
                crate::config::MAX_VIRTIO_DEVICES
            ));
        }
        if self.virtio_count() > 0 && !self.irqchip {
            return bad("virtio devices without an in-kernel irqchip".into());
        }
        Ok(())
    }

    /// How many virtio-mmio slots the machine uses.
    pub fn virtio_count(&self) -> usize {
        self.disks.len() + self.nets.len() + usize::from(self.rng) + usize::from(self.console)
    }

    /// The saved console's ports, when the machine has a console.
    pub fn console_ports<'a>(
        &self,
        transports: &'a [devices::TransportState],
    ) -> Option<&'a [devices::ConsolePortState]> {
        if !self.console {
            return None;
        }
        match transports.last().and_then(|t| t.device.as_ref()) {
            Some(devices::DeviceState::Console(c)) => Some(&c.ports),
            None => None,
        }
    }

    /// The disks as `--disk` would give them.
    pub fn disk_configs(&self) -> Vec<DiskConfig> {
        self.disks
            .iter()
            .map(|d| DiskConfig { path: d.path.clone().into(), read_only: d.read_only, id: d.id.clone() })
            .collect()
    }

    /// The NICs as `--net` would give them (the taps must exist).
    pub fn net_configs(&self) -> Vec<NetConfig> {
        self.nets
            .iter()
            .map(|n| NetConfig {
                backend: crate::config::NetBackendConfig::Tap { name: n.tap.clone(), create: false },
                mac: Some(n.mac),
            })
            .collect()
    }
}

/// Everything in a state file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Where it was taken.
    pub cpu: CpuModel,
    /// What to build.
    pub machine: Machine,
    /// PIC, IOAPIC, PIT, kvm-clock.
    pub vm: vm::VmState,
    /// One per vCPU, in order.
    pub vcpus: Vec<vcpu::VcpuState>,
    /// COM1.
    pub serial: devices::SerialState,
    /// The i8042.
    pub i8042: devices::I8042State,
    /// One per virtio-mmio slot, in bus order.
    pub transports: Vec<devices::TransportState>,
    /// Where the memory file holds data: (offset, length); the rest is holes (zeros).
    #[serde(default)]
    pub memory_extents: Vec<(u64, u64)>,
}

/// Writes `snap` to `out` (named `path` in messages) in the state file format.
pub fn write_state(snap: &Snapshot, out: &mut impl Write, path: &str) -> Result<(), SnapshotError> {
    let body = serde_json::to_vec(snap).map_err(|e| SnapshotError::State(format!("cannot encode the state: {e}")))?;
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    header.extend_from_slice(&(body.len() as u64).to_le_bytes());
    header.extend_from_slice(&Sha256::digest(&body));
    let io = |source| SnapshotError::Io { what: "cannot write the snapshot state file", path: path.into(), source };
    out.write_all(&header).map_err(io)?;
    out.write_all(&body).map_err(io)?;
    out.flush().map_err(io)
}

/// Reads and checks a state file: header, version, checksum, body. The CPU model is checked by
/// the caller ([`CpuModel::check_compatible`]), which knows the host.
pub fn read_state(path: &Path) -> Result<Snapshot, SnapshotError> {
    let name = path.display().to_string();
    let io = |source| SnapshotError::Io { what: "cannot read the snapshot state file", path: name.clone(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut header = [0u8; HEADER_BYTES];
    f.read_exact(&mut header).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::NotASnapshot(name.clone()),
        _ => io(e),
    })?;
    parse_header_and_body(&header, &mut f, &name)
}

/// [`read_state`] over bytes already read (the fuzz target drives this).
pub fn decode_state(bytes: &[u8], name: &str) -> Result<Snapshot, SnapshotError> {
    let header: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| SnapshotError::NotASnapshot(name.into()))?;
    parse_header_and_body(header, &mut &bytes[HEADER_BYTES..], name)
}

fn parse_header_and_body(
    header: &[u8; HEADER_BYTES],
    rest: &mut impl Read,
    name: &str,
) -> Result<Snapshot, SnapshotError> {
    if &header[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot(name.into()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version { path: name.into(), found: version });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    if len > MAX_BODY_BYTES {
        return Err(SnapshotError::Checksum(name.into()));
    }
    let mut body = Vec::with_capacity(len as usize);
    rest.take(len).read_to_end(&mut body).map_err(|source| SnapshotError::Io {
        what: "cannot read the snapshot state file",
        path: name.into(),
        source,
    })?;
    if body.len() as u64 != len || Sha256::digest(&body)[..] != header[20..52] {
        return Err(SnapshotError::Checksum(name.into()));
    }
    let snap: Snapshot =
        serde_json::from_slice(&body).map_err(|e| SnapshotError::Decode { path: name.into(), why: e.to_string() })?;
    snap.machine.check()?;
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            cpu: CpuModel::host(),
            machine: Machine { cpus: 1, mem_size_bytes: 16 << 20, ..Default::default() },
            vm: vm::VmState::default(),
            vcpus: vec![vcpu::VcpuState::default()],
            serial: devices::SerialState::default(),
            i8042: devices::I8042State::default(),
            transports: vec![],
            memory_extents: vec![],
        }
    }

    fn parse(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let mut header = [0u8; HEADER_BYTES];
        let n = bytes.len().min(HEADER_BYTES);
        header[..n].copy_from_slice(&bytes[..n]);
        parse_header_and_body(&header, &mut &bytes[n..], "state")
    }

    #[test]
    fn a_state_file_round_trips() {
        let mut out = Vec::new();
        write_state(&sample(), &mut out, "state").unwrap();
        let back = parse(&out).unwrap();
        assert_eq!(back.machine, sample().machine);
        assert_eq!(back.cpu, CpuModel::host());
    }

    #[test]
    fn damage_version_and_strangers_are_refused() {
        let mut out = Vec::new();
        write_state(&sample(), &mut out, "state").unwrap();
        let mut flipped = out.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert!(matches!(parse(&flipped), Err(SnapshotError::Checksum(_))));
        assert!(matches!(parse(&out[..out.len() - 5]), Err(SnapshotError::Checksum(_))));
        // Version 1 had no console state (a saved guest's console ports would be lost).
        for other in [1u8, 3] {
            let mut v = out.clone();
            v[8] = other;
            let e = parse(&v).unwrap_err();
            assert!(e.to_string().contains(&format!("format version {other}; this ember reads version 2")), "{e}");
        }
        assert!(matches!(parse(b"{\"not\": \"a snapshot\"}"), Err(SnapshotError::NotASnapshot(_))));
    }

    /// A well-formed, checksummed state file that describes an impossible machine.
    #[test]
    fn a_machine_ember_cannot_build_is_refused() {
        for m in [
            Machine { cpus: 0, ..sample().machine },
            Machine { mem_size_bytes: 0, ..sample().machine },
            Machine { mem_size_bytes: (16 << 20) + 1, ..sample().machine },
            Machine { rng: true, irqchip: false, ..sample().machine },
        ] {
            let snap = Snapshot { machine: m.clone(), vcpus: vec![], ..sample() };
            let mut out = Vec::new();
            write_state(&snap, &mut out, "state").unwrap();
            let e = parse(&out).expect_err("refused");
            assert!(e.to_string().contains("cannot build"), "{m:?}: {e}");
        }
        let mut out = Vec::new();
        write_state(&sample(), &mut out, "state").unwrap();
        assert!(parse(&out).is_ok());
    }

    #[test]
    fn another_cpu_model_is_refused() {
        let here = CpuModel::host();
        let other = CpuModel { signature: here.signature ^ 0x10, ..here.clone() };
        assert!(here.check_compatible(&here).is_ok());
        let e = other.check_compatible(&here).unwrap_err().to_string();
        assert!(e.contains("ember refuses"), "{e}");
    }
}
