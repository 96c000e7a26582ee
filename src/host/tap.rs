//! A Linux tap interface, the host end of a virtio-net device
//! (Documentation/networking/tuntap.rst; the ioctls of
//! include/uapi/linux/if_tun.h).
//!
//! What the host sees: a network interface NAME whose frames ember reads and
//! writes through a file descriptor on /dev/net/tun. It is opened with
//! IFF_TAP (Ethernet frames) | IFF_NO_PI (no 4-byte packet-info prefix) |
//! IFF_VNET_HDR, and TUNSETVNETHDRSZ 12, so every frame in either direction
//! starts with the same 12-byte `struct virtio_net_hdr_v1` the guest uses
//! (virtio 1.2, 5.1.6): checksum and segmentation offload information passes
//! between guest and host kernel unchanged, and a 64 KiB TCP segment crosses
//! as one frame. TUNSETOFFLOAD tells the host kernel which offloads the guest
//! accepted on receive (checksum, TSO4/6, ECN).
//!
//! Opening is strict, so a typo is a start-up error, not a VM on a network
//! that does not exist: without `create`, the interface must already exist
//! (TUNSETIFF would otherwise silently create a fresh one); with `create` it
//! must not. A created tap is not persistent (TUNSETPERSIST off is the kernel's
//! default), so it disappears when ember closes the descriptor at exit,
//! however ember ends. The descriptor is non-blocking: the event loop watches
//! it (edge-triggered) and the device reads until EAGAIN.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// Longest interface name Linux accepts (IFNAMSIZ 16, with the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// Size of the vnet header on the tap: `struct virtio_net_hdr_v1` (VERSION_1
/// always has the `num_buffers` field).
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening a tap (at start-up: each ends ember with exit code 125).
#[derive(Debug, Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("`{0}` is not a network interface name: 1 to 15 bytes, no `/`, `:`, whitespace or NUL")]
    BadName(String),
    /// No interface of that name (and no `,create`).
    #[error(
        "tap {0} does not exist in this network namespace: create it (ip tuntap add dev {0} mode tap) or add `,create`"
    )]
    Missing(String),
    /// `,create` for a name that is taken.
    #[error("tap {0} already exists: drop `,create` to use it")]
    Exists(String),
    /// The interface exists and is attached to another process.
    #[error("tap {0} is in use by another process (a tap without multi-queue serves one reader)")]
    Busy(String),
    /// Not allowed.
    #[error(
        "no permission to {what} tap {name}: run ember as root (CAP_NET_ADMIN), or create the tap for your user \
         (ip tuntap add dev {name} mode tap user $USER)"
    )]
    Permission {
        /// The interface.
        name: String,
        /// "open" or "create".
        what: &'static str,
    },
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded? modprobe tun)")]
    Device(#[source] io::Error),
    /// Another ioctl failed.
    #[error("tap {name}: {what} failed")]
    Ioctl {
        /// The interface.
        name: String,
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name the way the kernel does (dev_valid_name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// Brings interface `name` up (IFF_UP), as `ip link set NAME up` would.
pub fn set_link_up(name: &str) -> Result<(), TapError> {
    let error = |what| TapError::Ioctl { name: name.to_string(), what, source: io::Error::last_os_error() };
    if !valid_name(name) {
        return Err(TapError::BadName(name.to_string()));
    }
    // SAFETY: a plain datagram socket, closed below; only used for SIOC[GS]IFFLAGS.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(error("socket"));
    }
    let mut req = IfReq::new(name, 0);
    // SAFETY: both ioctls take a `struct ifreq`, which `req` is laid out as.
    let ok = unsafe {
        libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) == 0
        }
    };
    let err = (!ok).then(|| error("SIOCSIFFLAGS (link up)"));
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(sock) };
    err.map_or(Ok(()), Err)
}

/// `struct ifreq` as TUNSETIFF and SIOC[GS]IFFLAGS use it: the name, then a
/// union whose first member here is the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// A stand-in for unit tests (a SOCK_SEQPACKET socket, which keeps frame
    /// boundaries like a tap): the tap ioctls are skipped.
    fake: bool,
}

/// Whether a network interface `name` exists in this thread's network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else { return false };
    // SAFETY: a NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Opens tap `name` (which must exist), or creates it with `create`
    /// (which must not exist), and sets the 12-byte vnet header.
    pub fn open(name: &str, create: bool) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let exists = interface_exists(name);
        match (exists, create) {
            (false, false) => return Err(TapError::Missing(name.to_string())),
            (true, true) => return Err(TapError::Exists(name.to_string())),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => TapError::Permission { name: name.to_string(), what: "open" },
                _ => TapError::Device(e),
            })?;
        let mut req = IfReq::new(name, (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short);
        // SAFETY: TUNSETIFF reads (and may update) a `struct ifreq`, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EPERM | libc::EACCES) => {
                    TapError::Permission { name, what: if create { "create" } else { "open" } }
                }
                // An existing interface that is not a tap (or a tun without IFF_VNET_HDR support).
                Some(libc::EINVAL) if exists => TapError::Ioctl { name, what: "TUNSETIFF (is it a tap?)", source: e },
                _ => TapError::Ioctl { name, what: "TUNSETIFF", source: e },
            });
        }
        let tap = Tap { file, name: name.to_string(), fake: false };
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0)?;
        if create {
            tap.set_up()?;
        }
        Ok(tap)
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl { name: self.name.clone(), what, source: io::Error::last_os_error() }
    }

    /// Brings a tap ember created up (IFF_UP), as `ip link set NAME up` would.
    fn set_up(&self) -> Result<(), TapError> {
        set_link_up(&self.name)
    }

    /// TUNSETOFFLOAD: which offloads (TUN_F_*) the host may use in frames it
    /// sends to ember, i.e. what the guest accepted on receive.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        if self.fake {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(self.ioctl_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// One end of a frame pipe (a SOCK_SEQPACKET socket) standing in for a
    /// tap, for the device's unit tests and fuzz targets.
    #[doc(hidden)]
    pub fn fake(file: File) -> Tap {
        Tap { file, name: "fake".into(), fake: true }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for the event loop (non-blocking).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame (vnet header first) into `buf`; `Ok(None)` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: reads at most buf.len() bytes into `buf`.
            let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// Writes one frame (vnet header first). A full tap queue (EAGAIN) drops
    /// the frame, as a full NIC queue would; the caller logs it.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: writes `frame.len()` bytes from `frame`.
            let n = unsafe { libc::write(self.fd(), frame.as_ptr() as *const libc::c_void, frame.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("tap0"));
        assert!(valid_name("a23456789012345"));
        assert!(!valid_name("a234567890123456"), "16 bytes");
        for bad in ["", ".", "..", "a/b", "a b", "a:1", "a\0"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(matches!(Tap::open("no/such", false), Err(TapError::BadName(_))));
    }

    #[test]
    fn a_missing_tap_is_an_error_not_a_new_one() {
        let e = Tap::open("ember-nonexist", false).unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("does not exist"));
        // `lo` exists, so `create` refuses it without touching it.
        assert!(matches!(Tap::open("lo", true), Err(TapError::Exists(_))));
    }
}
