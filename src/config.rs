//! What the user asked for, as plain data: `VmConfig` is built by the CLI (or a
//! test, or `ember demo`) and checked here before any KVM call is made, so that a
//! bad flag is answered with one clear sentence instead of an ioctl error.
//!
//! `VmConfig` describes the VM and nothing else; what a tool adds around it (exit
//! recording, a demo's extra port) is `extras::Extras`, given to `Vmm::new` beside it.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use thiserror::Error;

pub use crate::host::passt::{GuestIpv4, Publish};
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

/// One virtio-blk disk: `--disk PATH[,ro][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image on the host.
    pub path: PathBuf,
    /// The guest sees a read-only disk (VIRTIO_BLK_F_RO); writes fail with IOERR.
    pub read_only: bool,
    /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes);
    /// None: the image's file name.
    pub id: Option<String>,
}

/// One shared folder: `-v HOSTDIR:GUESTDIR[:ro|:rw]` (a virtio-9p device
/// whose server runs jailed in HOSTDIR, host/p9_server.rs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The directory on the host (absolute once parsed).
    pub host: PathBuf,
    /// Where ember's init mounts it in the guest (absolute).
    pub guest: String,
    /// Writes fail with EROFS, enforced by the host's kernel.
    pub read_only: bool,
}

impl ShareConfig {
    /// The mount tag of share `i`: `ember0`, `ember1`, ...
    pub fn tag(i: usize) -> String {
        format!("ember{i}")
    }
}

/// One virtio-net device: `--net tap=NAME[,mac=MAC][,create]`, `--net user[,mac=MAC]`
/// or `--net stream=PATH[,mac=MAC][,ip=ADDR/PREFIX,gw=GW[,dns=DNS][,mtu=N]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host end.
    pub backend: NetBackendConfig,
    /// The guest's MAC; None: derived from the backend's name and the device
    /// index (`devices::virtio::net::default_mac`).
    pub mac: Option<[u8; 6]>,
}

/// The host end of a virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A host tap interface.
    Tap {
        /// Its name (at most 15 bytes).
        name: String,
        /// Create the tap (it must not exist) and remove it when ember exits.
        create: bool,
    },
    /// User-mode networking: a passt ember starts for this VM (host/passt.rs).
    User {
        /// Host ports published to guest ports (`-p`).
        publish: Vec<Publish>,
        /// The guest's addresses, as passt hands them out; filled in from the
        /// host's default route when the VM is built if None.
        guest: Option<GuestIpv4>,
    },
    /// Frames over a stream someone else serves: a Unix socket to connect to
    /// (a passt started with `-s PATH`) or a character device (the Linux
    /// lane's virtio-serial port to the host's passt).
    Stream {
        /// The socket or device.
        path: PathBuf,
        /// The addresses ember's init sets on eth0; None: it asks DHCP.
        guest: Option<GuestIpv4>,
    },
}

impl NetConfig {
    /// The name the default MAC is derived from: the tap's, `user`, or the path.
    pub fn mac_seed(&self) -> String {
        match &self.backend {
            NetBackendConfig::Tap { name, .. } => name.clone(),
            NetBackendConfig::User { .. } => "user".into(),
            NetBackendConfig::Stream { path, .. } => path.display().to_string(),
        }
    }

    /// The guest's IPv4 configuration, if ember knows it.
    pub fn guest_ipv4(&self) -> Option<&GuestIpv4> {
        match &self.backend {
            NetBackendConfig::User { guest, .. } | NetBackendConfig::Stream { guest, .. } => guest.as_ref(),
            NetBackendConfig::Tap { .. } => None,
        }
    }
}

/// Whether the VM gets a virtio-rng device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngMode {
    /// For Linux kernels (bzImage, or an ELF with Linux's notes); freestanding
    /// guests get none, so their machine stays as small as they expect.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// Most virtio-mmio devices one VM can have: one IOAPIC pin each, from
/// `layout::VIRTIO_IRQ_START` to the last pin.
pub const MAX_VIRTIO_DEVICES: usize = (layout::IOAPIC_PINS - layout::VIRTIO_IRQ_START) as usize;

/// A kernel image as ember will load it.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// A file on the host: an ELF vmlinux (64-bit or PVH entry) or a bzImage.
    Path(PathBuf),
    /// An image in ember's own memory: the guests built into the binary (`ember demo`), tests.
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
    /// virtio-blk disks, in order: the first is /dev/vda in Linux.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in order: the first is eth0 in Linux.
    pub nets: Vec<NetConfig>,
    /// Shared folders (`-v`), one virtio-9p device each.
    pub shares: Vec<ShareConfig>,
    /// The virtio-rng device.
    pub rng: RngMode,
    /// The sandbox of ember's threads (src/sandbox): on unless debugging.
    pub seccomp: crate::sandbox::SeccompMode,
    /// The guest's stdout and stderr apart from its console: a virtio-console
    /// device whose ports `ember.stdout` and `ember.stderr` go to ember's
    /// stdout and stderr, while the serial console's output (kernel messages)
    /// is not shown (`ember run --output split`; devices/virtio/console.rs).
    pub split_output: bool,
    /// The VM will be saved at its init's snapshot point (`ember run --save-snapshot`): with
    /// `split_output`, its console also gets an `ember.stdin` port, left unconnected for the
    /// restore to connect to its own stdin (or not: `ember run --from-snapshot`).
    pub for_saving: bool,
    /// ACPI tables (x86/acpi.rs), with the virtio devices in the DSDT instead
    /// of on the command line; off (`--acpi=off`): the MP table and
    /// `virtio_mmio.device=` only, for kernels built without CONFIG_ACPI.
    pub acpi: bool,
}

/// Largest vCPU count we offer: the MP table and our APIC ids are 8-bit, and KVM's
/// soft limit on most hosts is well above this.
pub const MAX_CPUS: u8 = 254;

/// Errors in what the user asked for.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A `-v` value that cannot be used.
    #[error("-v {text}: {why}")]
    BadShare {
        /// The value given.
        text: String,
        /// What is wrong with it.
        why: String,
    },
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
    /// The command line has a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// A `--serial` value we do not know.
    #[error("--serial `{0}` is not understood: use stdio, none or file:PATH")]
    BadSerial(String),
    /// A `--disk` (or `--root-disk`) value we do not understand.
    #[error("{flag} `{value}` is not understood: write PATH[,ro][,id=NAME] (NAME: at most 20 bytes)")]
    BadDisk {
        /// The option it was given to.
        flag: &'static str,
        /// The value, as written.
        value: String,
    },
    /// More virtio devices than interrupt lines.
    #[error("{0} virtio devices asked for; ember has interrupt lines for at most {max}", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    /// virtio devices without the in-kernel irqchip.
    #[error("virtio devices (--disk, --net, --rng) need the in-kernel irqchip: drop --irqchip off")]
    VirtioWithoutIrqchip,
    /// A `--net` value we do not understand.
    #[error(
        "--net `{0}` is not understood: write user[,mac=MAC], none, or tap=NAME[,mac=MAC][,create] \
         (NAME: 1 to 15 bytes, no `/`, `:` or spaces)"
    )]
    BadNet(String),
    /// A `-p` value we do not understand.
    #[error(
        "-p `{0}` is not understood: write [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp], e.g. 8080:80 or 127.0.0.1:5353:53/udp"
    )]
    BadPublish(String),
    /// `-p` without `--net user`.
    #[error("-p publishes ports through --net user, which this VM does not have (it has --net none or only taps)")]
    PublishWithoutUser,
    /// Two `--net user`.
    #[error("--net user is given twice: one user-mode network per VM (publish more ports with -p)")]
    TwoUserNets,
    /// A MAC address that is malformed or not a unicast address.
    #[error(
        "--net: `{0}` is not a MAC address a NIC can have: write six hex pairs, e.g. 52:54:00:12:34:56, with the first octet even (unicast)"
    )]
    BadMac(String),
    /// Two devices on one tap.
    #[error("--net: tap {0} is named twice: a tap serves one device")]
    DuplicateTap(String),
    /// Guest RAM that is not whole pages (KVM maps memory in 4 KiB pages: api.rst 4.35).
    #[error("--memory {0} is not a multiple of 4 KiB: guest memory is made of 4 KiB pages (e.g. 256M)")]
    MemoryNotPageAligned(String),
    /// One image given as two disks.
    #[error("disk image {0} is given twice (--disk/--root-disk): each image can back one disk")]
    DuplicateDisk(PathBuf),
}

/// Parses a `--net` value other than `none`: `tap=NAME[,mac=MAC][,create]`,
/// `user[,mac=MAC]` or `stream=PATH[,mac=MAC][,ip=ADDR/PREFIX,gw=GW[,dns=DNS][,mtu=N]]`
/// (options in any order after the first).
pub fn parse_net(text: &str) -> Result<NetConfig, ConfigError> {
    let bad = || ConfigError::BadNet(text.to_string());
    let mut parts = text.split(',');
    let first = parts.next().unwrap_or("");
    let mut tap: Option<(String, bool)> = None;
    let mut user = false;
    let mut stream: Option<PathBuf> = None;
    let mut mac = None;
    let (mut ip, mut gw, mut dns, mut mtu) = (None, None, None, None);
    if first == "user" {
        user = true;
    } else if let Some(name) = first.strip_prefix("tap=") {
        if !crate::host::tap::valid_name(name) {
            return Err(bad());
        }
        tap = Some((name.to_string(), false));
    } else if let Some(path) = first.strip_prefix("stream=").filter(|p| !p.is_empty()) {
        stream = Some(PathBuf::from(path));
    } else if first == "create" {
        // `create,tap=NAME`: options in any order for a tap, as before.
        tap = Some((String::new(), true));
    } else if let Some(m) = first.strip_prefix("mac=") {
        mac = Some(parse_mac(m)?);
    } else {
        return Err(bad());
    }
    for opt in parts {
        let ipv4 = |v: &str| v.parse::<std::net::Ipv4Addr>().map_err(|_| bad());
        if let Some(m) = opt.strip_prefix("mac=") {
            mac = Some(parse_mac(m)?);
        } else if opt == "create" && !user && stream.is_none() {
            tap.get_or_insert_with(|| (String::new(), false)).1 = true;
        } else if let Some(name) = opt.strip_prefix("tap=").filter(|_| !user && stream.is_none()) {
            let t = tap.get_or_insert_with(|| (String::new(), false));
            if !t.0.is_empty() || !crate::host::tap::valid_name(name) {
                return Err(bad());
            }
            t.0 = name.to_string();
        } else if let (Some(v), true) = (opt.strip_prefix("ip="), stream.is_some()) {
            let (a, p) = v.split_once('/').ok_or_else(bad)?;
            let p: u8 = p.parse().ok().filter(|p| (1..=32).contains(p)).ok_or_else(bad)?;
            ip = Some((ipv4(a)?, p));
        } else if let (Some(v), true) = (opt.strip_prefix("gw="), stream.is_some()) {
            gw = Some(ipv4(v)?);
        } else if let (Some(v), true) = (opt.strip_prefix("dns="), stream.is_some()) {
            dns = Some(ipv4(v)?);
        } else if let (Some(v), true) = (opt.strip_prefix("mtu="), stream.is_some()) {
            mtu = Some(v.parse::<u16>().ok().filter(|m| *m >= 68).ok_or_else(bad)?);
        } else {
            return Err(bad());
        }
    }
    let backend = if user {
        NetBackendConfig::User { publish: Vec::new(), guest: None }
    } else if let Some(path) = stream {
        let guest = match (ip, gw) {
            (Some((addr, prefix)), Some(gateway)) => {
                Some(GuestIpv4 { addr, prefix, gateway, dns, mtu: mtu.unwrap_or(crate::host::passt::MTU) })
            }
            (None, None) if dns.is_none() && mtu.is_none() => None,
            _ => return Err(bad()),
        };
        NetBackendConfig::Stream { path, guest }
    } else {
        match tap {
            Some((name, create)) if !name.is_empty() => NetBackendConfig::Tap { name, create },
            _ => return Err(bad()),
        }
    };
    Ok(NetConfig { backend, mac })
}

/// The `--net` value that says what [`parse_net`] reads (for the Linux lane,
/// which hands the inner ember a rewritten `--net`).
pub fn render_net(net: &NetConfig) -> String {
    let mut s = match &net.backend {
        NetBackendConfig::Tap { name, create } => format!("tap={name}{}", if *create { ",create" } else { "" }),
        NetBackendConfig::User { .. } => "user".into(),
        NetBackendConfig::Stream { path, guest } => {
            let mut s = format!("stream={}", path.display());
            if let Some(g) = guest {
                s += &format!(",ip={}/{},gw={},mtu={}", g.addr, g.prefix, g.gateway, g.mtu);
                if let Some(d) = g.dns {
                    s += &format!(",dns={d}");
                }
            }
            s
        }
    };
    if let Some(m) = net.mac {
        s += &format!(",mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
    }
    s
}

/// Parses a `-p` value (see [`Publish::parse`]).
pub fn parse_publish(text: &str) -> Result<Publish, ConfigError> {
    Publish::parse(text).ok_or_else(|| ConfigError::BadPublish(text.to_string()))
}

/// Parses `52:54:00:12:34:56` (or with `-`); refuses multicast addresses.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(text.to_string());
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

/// Parses `-v HOSTDIR:GUESTDIR[:ro|:rw]` (Docker's form; a relative HOSTDIR
/// is taken from the current directory). HOSTDIR must exist.
pub fn parse_share(text: &str) -> Result<ShareConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadShare { text: text.to_string(), why: why.to_string() };
    let (rest, read_only) = match text.rsplit_once(':') {
        Some((r, "ro")) => (r, true),
        Some((r, "rw")) => (r, false),
        _ => (text, false),
    };
    let (host, guest) = rest.rsplit_once(':').ok_or_else(|| bad("write HOSTDIR:GUESTDIR"))?;
    if host.is_empty() {
        return Err(bad("HOSTDIR is empty"));
    }
    if !guest.starts_with('/') {
        return Err(bad("GUESTDIR must be an absolute path in the guest"));
    }
    if guest.split('/').any(|c| c == "..") || guest.bytes().any(|b| b.is_ascii_control() || b == b',') {
        return Err(bad("GUESTDIR may not hold `..`, commas or control characters"));
    }
    let host = std::path::absolute(host).map_err(|_| bad("HOSTDIR is not a usable path"))?;
    match std::fs::metadata(&host) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad("HOSTDIR is not a directory")),
        Err(_) => return Err(bad("HOSTDIR does not exist on the host (create it first)")),
    }
    Ok(ShareConfig { host, guest: guest.to_string(), read_only })
}

/// Parses `--disk PATH[,ro][,id=NAME]` (options in any order after the path).
pub fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    parse_disk_as("--disk", text)
}

/// [`parse_disk`] for the option `flag` (`--root-disk` takes the same syntax), which errors name.
pub fn parse_disk_as(flag: &'static str, text: &str) -> Result<DiskConfig, ConfigError> {
    let bad = || ConfigError::BadDisk { flag, value: text.to_string() };
    let mut parts = text.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
    let mut disk = DiskConfig { path: PathBuf::from(path), read_only: false, id: None };
    for opt in parts {
        match opt {
            "ro" => disk.read_only = true,
            "rw" => disk.read_only = false,
            _ => match opt.strip_prefix("id=") {
                Some(id) if !id.is_empty() && id.len() <= 20 => disk.id = Some(id.to_string()),
                _ => return Err(bad()),
            },
        }
    }
    Ok(disk)
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
    // Read once: `validate` asks for every config (fuzz/boot_tables thousands of times a second),
    // and /proc/meminfo costs tens of microseconds to produce.
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(read_mem_total)
}

fn read_mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// The host paths this VM writes (read-write disks, a serial file), absolute; a serial file that
    /// does not exist yet is created empty, as the run would. The Linux lane lets its machine write
    /// exactly these.
    pub fn writable_host_paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in self.disks.iter().filter(|d| !d.read_only) {
            out.push(d.path.clone());
        }
        for s in self.shares.iter().filter(|s| !s.read_only) {
            out.push(s.host.clone());
        }
        if let SerialMode::File(p) = &self.serial {
            let _ = std::fs::OpenOptions::new().append(true).create(true).open(p);
            out.push(p.clone());
        }
        out.into_iter().filter_map(|p| std::path::absolute(&p).ok()).collect()
    }

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
            disks: Vec::new(),
            nets: Vec::new(),
            shares: Vec::new(),
            rng: RngMode::Auto,
            seccomp: crate::sandbox::SeccompMode::On,
            split_output: false,
            for_saving: false,
            acpi: true,
        }
    }

    /// Checks the limits that do not depend on the kernel image, once: the [`ValidConfig`] it
    /// returns is what `Vmm::new` builds. (The command line's length is checked where it is
    /// complete, in `Vmm::new`: `boot::check_cmdline`.)
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        self.check()?;
        Ok(ValidConfig(self))
    }

    fn check(&self) -> Result<(), ConfigError> {
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
        if !self.mem_size_bytes.is_multiple_of(4096) {
            return Err(ConfigError::MemoryNotPageAligned(pretty));
        }
        if let Some(host) = host_mem_bytes()
            && self.mem_size_bytes > host
        {
            return Err(ConfigError::MemoryTooLarge { asked: pretty, host: host >> 20 });
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        // The rng may come on top in Auto mode: count it.
        let devices = self.disks.len() + self.nets.len() + self.shares.len() + usize::from(self.rng != RngMode::Off);
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if self.irqchip == IrqchipMode::Off
            && (!self.disks.is_empty() || !self.nets.is_empty() || self.rng == RngMode::On)
        {
            return Err(ConfigError::VirtioWithoutIrqchip);
        }
        let tap = |n: &NetConfig| match &n.backend {
            NetBackendConfig::Tap { name, .. } => Some(name.clone()),
            _ => None,
        };
        for (i, n) in self.nets.iter().enumerate() {
            if let Some(name) = tap(n)
                && self.nets[..i].iter().any(|m| tap(m).as_ref() == Some(&name))
            {
                return Err(ConfigError::DuplicateTap(name));
            }
        }
        let users = self.nets.iter().filter(|n| matches!(n.backend, NetBackendConfig::User { .. })).count();
        if users > 1 {
            return Err(ConfigError::TwoUserNets);
        }
        // The same file under two names (a symlink, `./x` and `x`) is the same
        // image: compare device and inode. A path that cannot be read is
        // reported when the disk is opened.
        let ids: Vec<Option<(u64, u64)>> =
            self.disks.iter().map(|d| std::fs::metadata(&d.path).ok().map(|m| (m.dev(), m.ino()))).collect();
        for (i, id) in ids.iter().enumerate() {
            if id.is_some() && ids[..i].contains(id) {
                return Err(ConfigError::DuplicateDisk(self.disks[i].path.clone()));
            }
        }
        Ok(())
    }
}

/// A [`VmConfig`] that passed [`VmConfig::validate`]; it reads as the config it holds.
#[derive(Clone, Debug)]
pub struct ValidConfig(VmConfig);

impl std::ops::Deref for ValidConfig {
    type Target = VmConfig;
    fn deref(&self) -> &VmConfig {
        &self.0
    }
}

/// `268435456` -> `256M`: the shortest exact spelling of a size.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
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
        assert!(c.check().is_ok());
        c.cpus = 0;
        assert!(matches!(c.check(), Err(ConfigError::ZeroCpus)));
        c.cpus = 1;
        c.mem_size_bytes = 0;
        assert!(matches!(c.check(), Err(ConfigError::MemoryTooSmall(_))));
        c.mem_size_bytes = 1 << 50;
        assert!(matches!(c.check(), Err(ConfigError::MemoryTooLarge { .. })));
        c.mem_size_bytes = 256 << 20;
    }

    #[test]
    fn shares_parse_like_docker_volumes() {
        let tmp = std::env::temp_dir();
        let t = tmp.to_str().unwrap();
        let s = parse_share(&format!("{t}:/mnt/x")).unwrap();
        assert_eq!(s, ShareConfig { host: tmp.clone(), guest: "/mnt/x".into(), read_only: false });
        assert!(parse_share(&format!("{t}:/mnt/x:ro")).unwrap().read_only);
        assert!(!parse_share(&format!("{t}:/mnt/x:rw")).unwrap().read_only);
        let rel = parse_share(".:/src").unwrap();
        assert!(rel.host.is_absolute(), "a relative HOSTDIR is made absolute");
        for (bad, why) in [
            (t.to_string(), "HOSTDIR:GUESTDIR"),
            (format!("{t}:rel"), "absolute"),
            (format!("{t}:/a/../b"), "`..`"),
            (format!("{t}:/a,b"), "commas"),
            ("/nonexistent/ember:/x".to_string(), "does not exist"),
            ("/proc/version:/x".to_string(), "not a directory"),
            (":/x".to_string(), "empty"),
        ] {
            let e = parse_share(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(ShareConfig::tag(1), "ember1");
    }

    #[test]
    fn disks_parse() {
        let d = parse_disk("/a/b.img").unwrap();
        assert_eq!(d, DiskConfig { path: "/a/b.img".into(), read_only: false, id: None });
        let d = parse_disk("x.img,ro,id=root").unwrap();
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("root"));
        assert!(parse_disk("x.img,id=abcdefghijklmnopqrstu").is_err(), "21-byte id");
        for bad in ["", ",ro", "x,rx", "x,id=", "x,,ro"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        let mut c = VmConfig::new(KernelSource::Builtin(&[]));
        c.disks = vec![d; MAX_VIRTIO_DEVICES];
        assert!(matches!(c.check(), Err(ConfigError::TooManyDevices(_))), "the rng counts too");
        c.rng = RngMode::Off;
        assert!(c.check().is_ok());
        c.irqchip = IrqchipMode::Off;
        assert!(matches!(c.check(), Err(ConfigError::VirtioWithoutIrqchip)));
    }

    #[test]
    fn nets_parse() {
        let tap = |name: &str, create| NetBackendConfig::Tap { name: name.into(), create };
        let n = parse_net("tap=tap0").unwrap();
        assert_eq!(n, NetConfig { backend: tap("tap0", false), mac: None });
        let n = parse_net("create,mac=52:54:00:AB:cd:01,tap=t1").unwrap();
        assert_eq!(n, NetConfig { backend: tap("t1", true), mac: Some([0x52, 0x54, 0, 0xab, 0xcd, 1]) });
        let n = parse_net("user,mac=52:54:00:00:00:02").unwrap();
        assert_eq!(n.backend, NetBackendConfig::User { publish: vec![], guest: None });
        assert_eq!(render_net(&n), "user,mac=52:54:00:00:00:02");
        let s = "stream=/dev/virtio-ports/ember.net0,ip=10.0.0.2/24,gw=10.0.0.1,mtu=65520,dns=10.0.0.53";
        let n = parse_net(s).unwrap();
        let g = n.guest_ipv4().unwrap();
        assert_eq!((g.addr.to_string(), g.prefix, g.gateway.to_string()), ("10.0.0.2".into(), 24, "10.0.0.1".into()));
        assert_eq!(render_net(&n), s);
        assert_eq!(parse_net("stream=/s").unwrap().guest_ipv4(), None);
        for bad in [
            "",
            "tap=",
            "tap0",
            "tap=a,tap=b",
            "tap=a,xyz",
            "tap=a234567890123456",
            "tap=a/b",
            "user,tap=a",
            "users",
            "user,create",
            "stream=",
            "stream=/s,ip=10.0.0.2/24",
            "stream=/s,ip=10.0.0.2,gw=10.0.0.1",
            "stream=/s,mtu=9000",
            "tap=a,ip=10.0.0.2/24",
            "none",
        ] {
            assert!(matches!(parse_net(bad), Err(ConfigError::BadNet(_))), "{bad}");
        }
        assert!(matches!(parse_publish("80"), Err(ConfigError::BadPublish(_))));
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "52:54:00:12:34:56:78",
        ] {
            assert!(matches!(parse_net(&format!("tap=a,mac={bad}")), Err(ConfigError::BadMac(_))), "{bad}");
        }
        let mut c = VmConfig::new(KernelSource::Builtin(&[]));
        c.nets = vec![parse_net("tap=a").unwrap(), parse_net("tap=b").unwrap()];
        assert!(c.check().is_ok());
        c.nets.push(parse_net("tap=a,mac=02:00:00:00:00:01").unwrap());
        assert!(matches!(c.check(), Err(ConfigError::DuplicateTap(_))));
        c.nets = vec![parse_net("user").unwrap(), parse_net("user").unwrap()];
        assert!(matches!(c.check(), Err(ConfigError::TwoUserNets)));
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
