//! passt, the host side of `--net user`: one passt process per VM, started by
//! ember and stopped when the VM ends (passt(1), Debian 12's
//! 0.0~git20230309; <https://passt.top>).
//!
//! passt is a user-mode network stack: it reads the guest's Ethernet frames
//! from a stream ([`crate::host::frame_stream`]) and turns them into
//! ordinary sockets on the host, so the guest needs no tap, bridge or root.
//! It answers ARP, NDP, DHCP and DHCPv6 itself, gives the guest the host's own
//! address and gateway (from the interface with the default route), and maps
//! the gateway's address to the host: a connection from the guest to the
//! gateway reaches the host's loopback (its default; `--no-map-gw` would turn
//! that off). `-t`/`-u` publish host ports to guest ports (`ember -p`).
//!
//! How ember runs it: `passt -f -q -F FD -P /proc/self/fd/N` plus the published
//! ports and the addresses ember computed ([`GuestIpv4::from_host`], the
//! same ones passt would pick, passed explicitly so both sides agree).
//! - `-F FD`: one end of a socketpair ember made, so no socket file exists to
//!   be left behind, and passt quits by itself when the socket closes (`-F`
//!   implies `--one-off`): also when ember is killed.
//! - `-f`: it stays ember's child (no daemon), so ember can stop and reap it.
//! - `-P /proc/self/fd/N`: readiness (not /dev/fd, which a bare devtmpfs lacks). passt writes its PID file once its set-up is
//!   done (ports bound); N is the write end of a pipe ember reads. A passt that
//!   fails (a port in use) exits instead, and the pipe reads EOF. Started as
//!   root, passt drops to user `nobody` before it opens the file, so the pipe
//!   is made writable for others first (only the two processes hold it).
//!
//! Stopping: SIGTERM through a pidfd, then waitid(P_PIDFD)
//! ([`crate::host::child`]): the sandboxed main thread may only signal and
//! reap the children it holds pidfds for.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::host::child::ChildProcess;

use thiserror::Error;

/// The MTU passt hands out (its default: the largest 802.3 MTU, 65535 minus
/// the header, rounded down to 32 bits), which ember's init sets too.
pub const MTU: u16 = 65520;

/// The user (and group) passt becomes when started as root: `nobody`/`nogroup`.
const NOBODY: u32 = 65534;

/// Errors starting passt (each ends ember with exit code 125).
#[derive(Debug, Error)]
pub enum PasstError {
    /// No passt binary in PATH.
    #[error("--net user needs passt, which is not installed: apt install passt")]
    NotInstalled,
    /// A published port is taken.
    #[error("-p {spec}: host port {addr}:{port}/{proto} is already in use")]
    PortInUse {
        /// The `-p` value.
        spec: String,
        /// The host address.
        addr: Ipv4Addr,
        /// The host port.
        port: u16,
        /// tcp or udp.
        proto: &'static str,
    },
    /// No IPv4 default route to take the guest's addresses from.
    #[error(
        "--net user: this host has no IPv4 default route, so passt has no address to give the guest \
         (ip route add default ...)"
    )]
    NoRoute,
    /// passt exited during its set-up.
    #[error("passt failed to start: {0}")]
    Failed(String),
    /// A system call failed.
    #[error("--net user: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> PasstError {
    move |source| PasstError::Io { what, source }
}

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// `-t`.
    Tcp,
    /// `-u`.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One published port: `-p [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// The host address to listen on; None: every address.
    pub host_ip: Option<Ipv4Addr>,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
    /// The protocol.
    pub proto: Proto,
}

impl Publish {
    /// Parses `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]` (Docker's `-p`, IPv4
    /// addresses only, ports 1-65535). None if malformed.
    pub fn parse(text: &str) -> Option<Publish> {
        let (ports, proto) = match text.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some(_) => return None,
            None => (text, Proto::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host, guest) = match parts[..] {
            [h, g] => (None, h, g),
            [ip, h, g] => (Some(ip.parse::<Ipv4Addr>().ok()?), h, g),
            _ => return None,
        };
        let port = |s: &str| -> Option<u16> {
            if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse::<u16>().ok().filter(|p| *p != 0)
        };
        Some(Publish { host_ip, host_port: port(host)?, guest_port: port(guest)?, proto })
    }

    /// passt's spec for it: `[ADDR/]HOSTPORT:GUESTPORT` after `-t` or `-u`.
    fn passt_args(&self) -> [String; 2] {
        let flag = match self.proto {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        };
        let addr = self.host_ip.map_or(String::new(), |a| format!("{a}/"));
        [flag.to_string(), format!("{addr}{}:{}", self.host_port, self.guest_port)]
    }

    /// Docker's spelling, for messages.
    pub fn spec(&self) -> String {
        let addr = self.host_ip.map_or(String::new(), |a| format!("{a}:"));
        format!("{addr}{}:{}/{}", self.host_port, self.guest_port, self.proto.name())
    }

    /// Whether the host port can be bound now (a clear error before passt's
    /// own, which names no port). Bound and released at once.
    fn check_free(&self) -> Result<(), PasstError> {
        let addr = self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let r = match self.proto {
            Proto::Tcp => std::net::TcpListener::bind((addr, self.host_port)).map(drop),
            Proto::Udp => std::net::UdpSocket::bind((addr, self.host_port)).map(drop),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                Err(PasstError::PortInUse { spec: self.spec(), addr, port: self.host_port, proto: self.proto.name() })
            }
            // Anything else (EACCES for a low port, EADDRNOTAVAIL) passt reports.
            _ => Ok(()),
        }
    }
}

/// The guest's IPv4 configuration: what passt hands out, and what ember's
/// init sets on eth0 from `ember.net=ADDR/PREFIX,GW,MTU[,DNS]` without asking
/// DHCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestIpv4 {
    /// The guest's address (passt: the host's own).
    pub addr: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
    /// The gateway (passt: the host's default gateway, mapped to the host).
    pub gateway: Ipv4Addr,
    /// The name server, if the host has an IPv4 one.
    pub dns: Option<Ipv4Addr>,
    /// The MTU.
    pub mtu: u16,
}

impl GuestIpv4 {
    /// What passt would give the guest on this host (network namespace): the
    /// address, prefix and gateway of the IPv4 default route's interface, and
    /// the first IPv4 name server of /etc/resolv.conf.
    pub fn from_host() -> Result<GuestIpv4, PasstError> {
        let routes = std::fs::read_to_string("/proc/net/route").map_err(io_err("reading /proc/net/route"))?;
        let (ifname, gateway) = default_route(&routes).ok_or(PasstError::NoRoute)?;
        let (addr, prefix) = interface_ipv4(&ifname).ok_or(PasstError::NoRoute)?;
        let dns = std::fs::read_to_string("/etc/resolv.conf").ok().and_then(|t| first_nameserver(&t));
        Ok(GuestIpv4 { addr, prefix, gateway, dns, mtu: MTU })
    }

    /// The `ember.net=` value for the guest's init.
    pub fn kernel_param(&self) -> String {
        let mut s = format!("ember.net={}/{},{},{}", self.addr, self.prefix, self.gateway, self.mtu);
        if let Some(d) = self.dns {
            s += &format!(",{d}");
        }
        s
    }
}

/// The interface and gateway of the IPv4 default route with the lowest
/// metric, from /proc/net/route (addresses in host byte order as hex).
pub fn default_route(table: &str) -> Option<(String, Ipv4Addr)> {
    let mut best: Option<(u32, String, Ipv4Addr)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(metric), Some(mask)) = (hex(f[1]), hex(f[2]), f[6].parse().ok(), hex(f[7]))
        else {
            continue;
        };
        if dest != 0 || mask != 0 || gw == 0 {
            continue;
        }
        // The kernel prints the network-order address as a native (little-endian) u32.
        let gateway = Ipv4Addr::from(gw.to_le_bytes());
        if best.as_ref().is_none_or(|(m, _, _)| metric < *m) {
            best = Some((metric, f[0].to_string(), gateway));
        }
    }
    best.map(|(_, i, g)| (i, g))
}

/// The first IPv4 address of interface `name` and its prefix length.
fn interface_ipv4(name: &str) -> Option<(Ipv4Addr, u8)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() && found.is_none() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string of the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr points to a sockaddr, at least its family field.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if ifname.to_bytes() != name.as_bytes() || i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address and netmask are sockaddr_in.
        let (a, m) =
            unsafe { (*(ifa.ifa_addr as *const libc::sockaddr_in), *(ifa.ifa_netmask as *const libc::sockaddr_in)) };
        let addr = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        let prefix = u32::from_be(m.sin_addr.s_addr).count_ones() as u8;
        found = Some((addr, prefix));
    }
    // SAFETY: frees the list getifaddrs returned.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// The first `nameserver A.B.C.D` line of a resolv.conf.
pub fn first_nameserver(text: &str) -> Option<Ipv4Addr> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver")).then(|| w.next()?.parse().ok()).flatten()
    })
}

/// The passt binary in PATH.
pub fn find_binary() -> Result<PathBuf, PasstError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let p = dir.join("passt");
        if is_executable(&p) {
            return Ok(p);
        }
    }
    Err(PasstError::NotInstalled)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where passt's frames reach ember.
pub enum Endpoint {
    /// `-F`: ember's end of a socketpair, non-blocking.
    Socket(File),
    /// `-s PATH`: passt listens there for one client (the Linux lane's QEMU).
    Path(PathBuf),
}

/// A running passt; stopped (SIGTERM) and reaped when dropped.
pub struct Passt {
    process: ChildProcess,
    /// The read end of passt's stderr, kept open and never read once passt
    /// is ready: its write end is non-blocking, so a chatty passt loses
    /// messages instead of blocking, and never gets SIGPIPE.
    _stderr: File,
}

impl Passt {
    /// Starts passt for a guest with `guest`'s addresses and `publish`ed
    /// ports, and waits until it is ready. `listen`: a socket path passt
    /// should listen on (the lane's QEMU connects there); None: a socketpair,
    /// whose ember end is returned.
    pub fn start(
        guest: &GuestIpv4,
        publish: &[Publish],
        listen: Option<&Path>,
    ) -> Result<(Passt, Endpoint), PasstError> {
        let bin = find_binary()?;
        for p in publish {
            p.check_free()?;
        }
        let mut cmd = Command::new(&bin);
        cmd.args(["-f", "-q"]);
        // IPv4 as ember's init configures it; IPv6 as passt finds it.
        cmd.arg("-a").arg(guest.addr.to_string());
        cmd.arg("-n").arg(guest.prefix.to_string());
        cmd.arg("-g").arg(guest.gateway.to_string());
        cmd.arg("-m").arg(guest.mtu.to_string());
        for p in publish {
            cmd.args(p.passt_args());
        }
        let (ready_r, ready_w) = pipe()?;
        // Writable for `nobody`, whom passt becomes when started as root.
        // SAFETY: fchmod on a descriptor we own.
        if unsafe { libc::fchmod(ready_w.as_raw_fd(), 0o622) } != 0 {
            return Err(PasstError::Io { what: "fchmod on a pipe", source: io::Error::last_os_error() });
        }
        cmd.arg("-P").arg(format!("/proc/self/fd/{}", ready_w.as_raw_fd()));
        let mut keep: Vec<RawFd> = vec![ready_w.as_raw_fd()];
        let (ours, theirs) = match listen {
            None => {
                let (a, b) = UnixStream::pair().map_err(io_err("socketpair"))?;
                a.set_nonblocking(true).map_err(io_err("socketpair"))?;
                cmd.arg("-F").arg(b.as_raw_fd().to_string());
                keep.push(b.as_raw_fd());
                (Some(a), Some(b))
            }
            Some(path) => {
                // passt binds the socket after dropping root for `nobody`
                // (65534 on Debian): hand it the (private) directory.
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0
                    && let Some(dir) = path.parent()
                {
                    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY))
                        .map_err(io_err("handing the socket's directory to nobody"))?;
                }
                cmd.arg("-1").arg("-s").arg(path);
                (None, None)
            }
        };
        let (err_r, err_w) = pipe()?;
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(err_w.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(err_w));
        // SAFETY: between fork and exec only async-signal-safe calls: fcntl to
        // let the two descriptors through exec, and prctl.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep {
                    let flags = libc::fcntl(*fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Should ember die before passt drops its privileges.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        // Ours went to the child with the Command; drop every copy we hold.
        drop(cmd);
        let child = spawned.map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PasstError::NotInstalled,
            _ => PasstError::Io { what: "starting passt", source: e },
        })?;
        drop(ready_w);
        drop(theirs);
        let process = ChildProcess::adopt(child).map_err(|source| PasstError::Io { what: "pidfd_open", source })?;
        let pid = process.pid();
        let mut stderr = File::from(err_r);
        let passt = Passt { process, _stderr: stderr.try_clone().map_err(io_err("dup"))? };
        // The PID line, or EOF. passt may keep the file open: stop at the newline.
        let mut line = Vec::new();
        let mut ready = File::from(ready_r);
        let mut buf = [0u8; 32];
        while !line.contains(&b'\n') {
            match ready.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if line.is_empty() {
            // EOF without a PID: passt exited (dropping reaps it). Its last words say why.
            drop(passt);
            let mut msg = String::new();
            let _ = stderr.read_to_string(&mut msg);
            let why = msg
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty() && !l.starts_with("Failed to send") && !l.contains("Changing to nobody"))
                .unwrap_or("it exited without a message")
                .to_string();
            return Err(PasstError::Failed(why));
        }
        log::debug!("passt {pid} ready: {}", String::from_utf8_lossy(&line).trim());
        let endpoint = match ours {
            Some(s) => Endpoint::Socket(File::from(OwnedFd::from(s))),
            None => Endpoint::Path(listen.map(Path::to_path_buf).unwrap_or_default()),
        };
        Ok((passt, endpoint))
    }

    /// passt's process ID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), PasstError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(PasstError::Io { what: "pipe2", source: io::Error::last_os_error() });
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs() {
        let p = Publish::parse("8080:80").unwrap();
        assert_eq!(p, Publish { host_ip: None, host_port: 8080, guest_port: 80, proto: Proto::Tcp });
        assert_eq!(p.passt_args(), ["-t".to_string(), "8080:80".into()]);
        let p = Publish::parse("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(p.passt_args(), ["-u".to_string(), "127.0.0.1/5353:53".into()]);
        assert_eq!(p.spec(), "127.0.0.1:5353:53/udp");
        assert_eq!(Publish::parse("1:2/tcp").unwrap().proto, Proto::Tcp);
        for bad in [
            "",
            "80",
            "0:80",
            "80:0",
            "65536:80",
            "a:80",
            "80:80/sctp",
            "1.2.3:80:80",
            "::1:80:80",
            "80:80:80:80",
            "+80:80",
            "80:",
            ":80",
            "80:80/",
            "99999999999999999999:1",
        ] {
            assert_eq!(Publish::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn default_route_and_name_server() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route(table), Some(("eth0".into(), Ipv4Addr::new(192, 0, 2, 1))));
        assert_eq!(default_route("Iface\n"), None);
        let ns = Some(Ipv4Addr::new(10, 0, 0, 53));
        assert_eq!(first_nameserver("# x\nsearch a\nnameserver fd00::1\nnameserver 10.0.0.53\n"), ns);
        assert_eq!(first_nameserver("nameserver fd00::1\n"), None);
        let g = GuestIpv4 {
            addr: Ipv4Addr::new(10, 1, 0, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 1, 0, 1),
            dns: None,
            mtu: MTU,
        };
        assert_eq!(g.kernel_param(), "ember.net=10.1.0.2/24,10.1.0.1,65520");
    }
}
