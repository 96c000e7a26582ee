//! What the user asked for, as plain data: `VmConfig` is built by the CLI (or a
//! test, or `ember demo`) and checked here before any KVM call is made, so that a
//! bad flag is answered with one clear sentence instead of an ioctl error.

use std::path::PathBuf;

use thiserror::Error;

use crate::layout;

/// Where the guest's COM1 output goes and where its input comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// ember's own stdin/stdout (raw mode when stdin is a terminal).
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    None,
}

/// Whether the VM gets KVM's in-kernel interrupt controllers (PIC, IOAPIC,
/// per-vCPU LAPIC) and PIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqchipMode {
    /// On for anything that looks like Linux or has more than one vCPU; off for
    /// a single-vCPU freestanding guest (see `Vmm::new`).
    Auto,
    /// Always create the in-kernel irqchip and PIT.
    On,
    /// Never create them: no interrupts, no APs, cheaper VM teardown.
    Off,
}

/// A kernel image as ember will load it.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// A file on the host: an ELF vmlinux (64-bit or PVH entry) or a bzImage.
    Path(PathBuf),
    /// An image built into the ember binary (`ember demo`).
    Builtin(&'static [u8]),
}

/// Everything needed to build one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel to boot.
    pub kernel: KernelSource,
    /// An optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (threads).
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub mem_size_bytes: u64,
    /// Serial console routing.
    pub serial: SerialMode,
    /// In-kernel irqchip choice.
    pub irqchip: IrqchipMode,
}

/// Largest vCPU count we offer: the MP table and our APIC ids are 8-bit, and KVM's
/// soft limit on most hosts is well above this.
pub const MAX_CPUS: u8 = 254;

/// Errors in what the user asked for.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A size string could not be parsed.
    #[error("`{0}` is not a size: write a number with an optional K, M, G or T suffix, e.g. 512M or 2G")]
    BadSize(String),
    /// Zero vCPUs.
    #[error("--cpus must be at least 1")]
    ZeroCpus,
    /// Too many vCPUs.
    #[error("--cpus {0} is more than ember supports ({max})", max = MAX_CPUS)]
    TooManyCpus(u32),
    /// Memory too small.
    #[error("--memory {0} is too small: the guest needs at least 2M (try 256M)")]
    MemoryTooSmall(String),
    /// Memory larger than the host.
    #[error("--memory {asked} is more than this host has ({host} MiB of RAM): choose a smaller size")]
    MemoryTooLarge {
        /// What the user asked for, as written.
        asked: String,
        /// Host RAM in MiB.
        host: u64,
    },
    /// The command line does not fit in the guest's buffer.
    #[error("the kernel command line is {len} bytes; Linux on x86 accepts at most {max} (shorten --cmdline or the command after --)", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The command line has a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// A `--serial` value we do not know.
    #[error("--serial `{0}` is not understood: use stdio, none or file:PATH")]
    BadSerial(String),
}

/// Parses `512M`, `2G`, `1048576`, `64k` into bytes (binary units).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let t = text.trim();
    let t = t.strip_suffix(['b', 'B']).unwrap_or(t);
    let t = t.strip_suffix(['i']).unwrap_or(t);
    let (digits, shift) = match t.chars().last().ok_or_else(bad)? {
        'k' | 'K' => (&t[..t.len() - 1], 10),
        'm' | 'M' => (&t[..t.len() - 1], 20),
        'g' | 'G' => (&t[..t.len() - 1], 30),
        't' | 'T' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Parses `stdio`, `none` or `file:PATH`.
pub fn parse_serial(text: &str) -> Result<SerialMode, ConfigError> {
    match text {
        "stdio" => Ok(SerialMode::Stdio),
        "none" | "off" => Ok(SerialMode::None),
        _ => match text.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(ConfigError::BadSerial(text.to_string())),
        },
    }
}

/// Host RAM in bytes, from /proc/meminfo (None if it cannot be read).
pub fn host_mem_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// A config with ember's defaults: 1 vCPU, 256 MiB, serial on stdio.
    pub fn new(kernel: KernelSource) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            mem_size_bytes: 256 << 20,
            serial: SerialMode::Stdio,
            irqchip: IrqchipMode::Auto,
        }
    }

    /// Checks the limits that do not depend on the kernel image.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::ZeroCpus);
        }
        if self.cpus > MAX_CPUS {
            return Err(ConfigError::TooManyCpus(self.cpus.into()));
        }
        let pretty = format_size(self.mem_size_bytes);
        if self.mem_size_bytes < (2 << 20) {
            return Err(ConfigError::MemoryTooSmall(pretty));
        }
        if let Some(host) = host_mem_bytes() {
            if self.mem_size_bytes > host {
                return Err(ConfigError::MemoryTooLarge { asked: pretty, host: host >> 20 });
            }
        }
        if self.cmdline.len() >= layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong { len: self.cmdline.len() });
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        Ok(())
    }
}

/// `268435456` -> `256M`: the shortest exact spelling of a size.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{}", bytes >> shift, unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn format_size_round_trips() {
        for s in ["256M", "2G", "3584M", "64K", "1000"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }

    #[test]
    fn validation_catches_bad_input() {
        let mut c = VmConfig::new(KernelSource::Builtin(&[]));
        assert!(c.validate().is_ok());
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::ZeroCpus)));
        c.cpus = 1;
        c.mem_size_bytes = 0;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooSmall(_))));
        c.mem_size_bytes = 1 << 50;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooLarge { .. })));
        c.mem_size_bytes = 256 << 20;
        c.cmdline = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong { .. })));
    }

    #[test]
    fn serial_modes() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialMode::Stdio);
        assert_eq!(parse_serial("none").unwrap(), SerialMode::None);
        assert_eq!(parse_serial("file:/tmp/x").unwrap(), SerialMode::File("/tmp/x".into()));
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }
}
