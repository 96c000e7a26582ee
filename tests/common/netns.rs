//! Network namespaces for the network tests and benchmarks: each test makes
//! its own (`ip netns add`), puts its taps, veths and addresses in it, runs
//! ember inside it (`ip netns exec`), and the namespace is deleted on drop,
//! also when the test fails: nothing the tests send can leave it.
#![allow(dead_code)] // each user needs a different subset

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

/// A network namespace, deleted (with every interface in it) on drop.
pub struct NetNs {
    /// Its name under /var/run/netns.
    pub name: String,
}

impl NetNs {
    /// Creates `ember-<tag>-<pid>` with its loopback up. None (and a SKIPPED
    /// line) when this host cannot make namespaces (not root, no `ip`).
    pub fn new(tag: &str) -> Option<NetNs> {
        let name = format!("ember-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(o) if o.status.success() => {}
            other => {
                eprintln!(
                    "SKIPPED: cannot create a network namespace ({other:?}): network tests need root and iproute2"
                );
                return None;
            }
        }
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS ARGS...`; panics if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").arg("-n").arg(&self.name).args(args).output().expect("run ip");
        assert!(out.status.success(), "ip -n {} {args:?}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip netns exec NS PROGRAM`, to add arguments to.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `sh -c SCRIPT` inside the namespace.
    pub fn sh(&self, script: &str) -> Output {
        self.command("sh").args(["-c", script]).output().expect("run sh in the namespace")
    }

    /// A tap NAME in the namespace with address ADDR (e.g. 10.0.0.1/24), up.
    pub fn add_tap(&self, name: &str, addr: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["addr", "add", addr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// The MAC address of interface `dev`, as 12 hex digits.
    pub fn mac_hex(&self, dev: &str) -> String {
        let out = self.ip(&["-o", "link", "show", dev]);
        let at = out.find("link/ether ").expect("an Ethernet interface") + "link/ether ".len();
        out[at..at + 17].replace(':', "")
    }

    /// Moves the calling thread into the namespace (setns(2) is per thread):
    /// sockets it opens afterwards live there.
    pub fn enter_this_thread(&self) {
        let f = File::open(format!("/var/run/netns/{}", self.name)).expect("open the namespace");
        // SAFETY: setns on a descriptor we own; only this thread changes namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// An AF_PACKET socket bound to one interface: sends and receives whole
/// Ethernet frames (the test's side of a tap). Open it in a thread that
/// entered the namespace.
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    /// Binds to `dev`, with a receive timeout of `timeout`.
    pub fn bind(dev: &str, timeout: std::time::Duration) -> PacketSocket {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: creates a new socket, owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {dev}");
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: binds with a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: timeout.as_secs() as i64, tv_usec: timeout.subsec_micros() as i64 };
        // SAFETY: sets SO_RCVTIMEO from a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSocket { fd }
    }

    /// The next frame, or None at the timeout.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 65536];
        // SAFETY: receives into our buffer.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), b.as_mut_ptr() as *mut libc::c_void, b.len(), 0) };
        (n >= 0).then(|| {
            b.truncate(n as usize);
            b
        })
    }

    /// Sends one frame out of the interface.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sends from our buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
