//! The host side of a shared folder (`-v HOSTDIR:GUESTDIR[:ro]`): a 9P2000.L
//! file server for one directory, in its own process, jailed in that directory.
//!
//! The protocol work is the `p9` crate's (crosvm's 9P server, ~2.6k lines, no
//! dependencies beyond libc and serde): it turns one request into one reply
//! against the real file system, through `openat(2)` on descriptors it holds
//! (O_PATH | O_NOFOLLOW for every walked name). It does not confine itself:
//! a walk to `..` from its root, or a name holding `a/../..`, would leave the
//! directory, as crosvm relies on minijail around it. So ember runs it as a
//! child process (this binary, re-executed with [`SERVER_ARG`]) that jails
//! itself before it reads the first request ([`server_main`]):
//!
//! 1. a new mount namespace (and, when not root, a new user namespace in
//!    which the caller's uid and gid map to themselves, so no privilege is
//!    needed beyond the caller's own);
//! 2. HOSTDIR bind-mounted onto itself, then `mount_setattr(2)` on the whole
//!    tree: `nodev` and `nosuid` always (a device node the guest makes cannot
//!    be opened through it), `ro` for `:ro`, so the host kernel, not the
//!    guest's mount option, refuses every write with EROFS;
//! 3. `chroot` into it: `..` at the root is the root, and an absolute symlink
//!    resolves inside it, so neither reaches outside;
//! 4. as root, every capability but the file ones (chown, DAC, fowner,
//!    fsetid) dropped, then `PR_SET_NO_NEW_PRIVS`.
//!
//! Hard links: the guest can only link a file it can already reach. Opens get
//! `O_NONBLOCK` added (harmless for files), so a FIFO in the folder cannot
//! block the server and with it the VM's event loop.
//!
//! Transport between ember and the server: a socketpair, each message framed
//! by its length (u32, little endian): ember sends the bytes the guest put in
//! its request buffers, the server answers with the reply's bytes. The server
//! quits when the socket closes: when ember ends, however it ends.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use thiserror::Error;

use crate::host::child::ChildProcess;

/// The first argument that turns the ember binary into a file server.
pub const SERVER_ARG: &str = "__ember-9p-server";
/// The descriptor the server finds its socket on.
const SERVER_FD: i32 = 3;
/// The largest message either side accepts: the `p9` crate's own msize cap
/// (64 KiB of data plus header) with room to spare.
pub const MAX_MESSAGE: usize = 64 * 1024 + 1024;
/// How long ember waits for one reply before it gives the folder up: a
/// server that needs longer is stuck (a hung network file system under
/// HOSTDIR), and the VM's event loop must not wait on it forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a shared folder's server.
#[derive(Debug, Error)]
pub enum FsServerError {
    /// The folder is not there.
    #[error("-v {path}: no such directory on the host (create it first)")]
    Missing {
        /// HOSTDIR.
        path: PathBuf,
    },
    /// The folder is a file.
    #[error("-v {path}: not a directory (a shared folder is a directory)")]
    NotADirectory {
        /// HOSTDIR.
        path: PathBuf,
    },
    /// The server could not start or jail itself.
    #[error("-v {path}: cannot start its file server: {reason}")]
    Start {
        /// HOSTDIR.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// One running file server, as ember's virtio-9p device uses it.
///
/// The event loop's seccomp filter shapes this: the socket is used through
/// a `File` (read(2)/write(2), not send/recv), and the server is stopped and
/// reaped through a pidfd when dropped ([`ChildProcess`]).
pub struct FsServer {
    process: ChildProcess,
    sock: File,
    broken: bool,
}

impl FsServer {
    /// Starts the server for `dir` (read-only when `read_only`) and waits
    /// until it has jailed itself.
    pub fn start(dir: &Path, read_only: bool) -> Result<FsServer, FsServerError> {
        let exe = std::env::current_exe().map_err(|e| FsServerError::Start {
            path: dir.to_path_buf(),
            reason: format!("finding ember's binary: {e}"),
        })?;
        FsServer::start_with(&exe, dir, read_only)
    }

    /// [`FsServer::start`] with the ember binary at `exe` as the server (tests
    /// run from another binary).
    pub fn start_with(exe: &Path, dir: &Path, read_only: bool) -> Result<FsServer, FsServerError> {
        let fail = |reason: String| FsServerError::Start { path: dir.to_path_buf(), reason };
        match std::fs::metadata(dir) {
            Err(_) => return Err(FsServerError::Missing { path: dir.to_path_buf() }),
            Ok(m) if !m.is_dir() => return Err(FsServerError::NotADirectory { path: dir.to_path_buf() }),
            Ok(_) => {}
        }
        let dir = std::path::absolute(dir).map_err(|e| fail(e.to_string()))?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| fail(format!("a socketpair: {e}")))?;
        let theirs = OwnedFd::from(theirs);
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(exe);
        cmd.arg(SERVER_ARG).arg(&dir).arg(if read_only { "ro" } else { "rw" });
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        // SAFETY: between fork and exec only dup2, which is async-signal-safe
        // and clears FD_CLOEXEC on the copy. (No PR_SET_PDEATHSIG: it fires
        // when the *thread* that forked ends; the socket's EOF is the signal.)
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, SERVER_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| fail(format!("running {}: {e}", SERVER_ARG)))?;
        drop(theirs);
        let process = ChildProcess::adopt(child).map_err(|e| fail(format!("pidfd_open: {e}")))?;
        let _ = ours.set_read_timeout(Some(REPLY_TIMEOUT));
        let server = FsServer { process, sock: File::from(OwnedFd::from(ours)), broken: false };
        // The server says `ok` once jailed, or why it could not be (dropping
        // `server` then stops and reaps it).
        let mut sock = &server.sock;
        match read_frame(&mut sock) {
            Ok(m) if m == b"ok" => Ok(server),
            Ok(m) => Err(fail(String::from_utf8_lossy(&m).into_owned())),
            Err(e) => Err(fail(format!("it did not start: {e}"))),
        }
    }

    /// Sends one 9P request and returns the reply; an error means the
    /// server is gone or stuck, and the folder is given up for good.
    pub fn call(&mut self, request: &[u8]) -> io::Result<Vec<u8>> {
        if self.broken {
            return Err(io::Error::other("the shared folder's server has stopped"));
        }
        let r = write_frame(&mut self.sock, request).and_then(|()| read_frame(&mut self.sock));
        if r.is_err() {
            self.broken = true;
            self.process.terminate();
        }
        r
    }

    /// The server's process id (for logs).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

fn write_frame(w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("message too long"))?;
    let mut buf = Vec::with_capacity(4 + data.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::other(format!("a {len}-byte message is larger than {MAX_MESSAGE}")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// The server process: `ember __ember-9p-server DIR ro|rw`, socket on fd 3.
/// Returns the process's exit code.
pub fn server_main(args: &[OsString]) -> i32 {
    // SAFETY: fd 3 was put there by `FsServer::start` for this process alone.
    let mut sock = unsafe { UnixStream::from_raw_fd(SERVER_FD) };
    let (Some(dir), Some(mode)) = (args.first(), args.get(1)) else {
        let _ = write_frame(&mut sock, b"usage: DIR ro|rw");
        return 2;
    };
    let read_only = mode == OsStr::new("ro");
    // The p9 server opens /proc (for reopening its O_PATH descriptors) when
    // made: before the chroot, after which there is no /proc.
    let mut server = match p9::Server::new(Path::new("/"), Default::default(), Default::default()) {
        Ok(s) => s,
        Err(e) => {
            let _ = write_frame(&mut sock, format!("opening /proc: {e}").as_bytes());
            return 1;
        }
    };
    if let Err(e) = jail(Path::new(dir), read_only) {
        let _ = write_frame(&mut sock, e.as_bytes());
        return 1;
    }
    if write_frame(&mut sock, b"ok").is_err() {
        return 1;
    }
    let mut paths = FidPaths::default();
    loop {
        let mut request = match read_frame(&mut sock) {
            Ok(r) => r,
            Err(_) => return 0, // ember has gone: so do we
        };
        force_nonblocking_open(&mut request);
        let reply = match paths.symlink(&request) {
            Some(reply) => reply,
            None => {
                let mut reply = Vec::new();
                if server.handle_message(&mut Cursor::new(&request[..]), &mut reply).is_err() && reply.is_empty() {
                    // Not even a header to answer: an Rlerror(EINVAL) for its tag.
                    reply = error_reply(&request, libc::EINVAL as u32);
                }
                paths.observe(&request, &reply);
                reply
            }
        };
        if write_frame(&mut sock, &reply).is_err() {
            return 0;
        }
    }
}

/// 9P2000.L message types the path tracker reads (include/net/9p/9p.h).
const TSYMLINK: u8 = 16;
const RLCREATE: u8 = 15;
const RRENAMEAT: u8 = 75;
const TVERSION: u8 = 100;
const RATTACH: u8 = 105;
const RWALK: u8 = 111;
const TCLUNK: u8 = 120;
const TREMOVE: u8 = 122;

/// The path (inside the jail) of each fid the guest holds, for the one
/// request the `p9` crate refuses and a shared folder needs: Tsymlink
/// (crosvm's server answers EACCES; `ln -s` in a folder must work). Paths are
/// learnt from the replies the crate gives (attach, walks, creates) and
/// follow renames. A walk through `..`, `.` or a name holding `/` (which
/// Linux's client never sends) leaves the fid without a path: Tsymlink on it
/// fails with EOPNOTSUPP. Paths resolve inside the chroot, so a stale one can
/// only name another place in the folder.
#[derive(Default)]
struct FidPaths {
    paths: std::collections::HashMap<u32, String>,
}

/// A little-endian reader over a message body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (b, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_le_bytes(*b))
    }
    fn u32(&mut self) -> Option<u32> {
        let (b, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*b))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = usize::from(self.u16()?);
        let s = self.0.get(..n)?;
        self.0 = &self.0[n..];
        std::str::from_utf8(s).ok()
    }
}

/// `dir/name`, for a plain name only.
fn child_path(dir: &str, name: &str) -> Option<String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return None;
    }
    Some(if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") })
}

impl FidPaths {
    /// Learns from a request and the reply the crate gave it.
    fn observe(&mut self, request: &[u8], reply: &[u8]) {
        let (Some(&t), Some(&r)) = (request.get(4), reply.get(4)) else { return };
        let mut b = Body(request.get(7..).unwrap_or_default());
        match (t, r) {
            (TVERSION, _) => self.paths.clear(),
            (_, RATTACH) => {
                if let Some(fid) = b.u32() {
                    self.paths.insert(fid, "/".into());
                }
            }
            (_, RWALK) => {
                let (Some(fid), Some(newfid), Some(n)) = (b.u32(), b.u32(), b.u16()) else { return };
                let walked = reply.get(7..9).map(|q| u16::from_le_bytes([q[0], q[1]]));
                // A partial walk leaves newfid unset: no path to build (fuzz/p9_server
                // spent most of its time building long ones only to drop them).
                let mut path = self.paths.get(&fid).cloned().filter(|_| walked == Some(n));
                for _ in 0..n {
                    // Once a name is missing or refused, the walk has no path.
                    let Some(p) = path else { break };
                    path = b.str().and_then(|name| child_path(&p, name));
                }
                match path {
                    Some(p) => self.paths.insert(newfid, p),
                    None => self.paths.remove(&newfid),
                };
            }
            (_, RLCREATE) => {
                let Some(fid) = b.u32() else { return };
                let path = b.str().and_then(|name| child_path(self.paths.get(&fid)?, name));
                match path {
                    Some(p) => self.paths.insert(fid, p),
                    None => self.paths.remove(&fid),
                };
            }
            (_, RRENAMEAT) => {
                let (Some(od), Some(on)) = (b.u32(), b.str()) else { return };
                let (Some(nd), Some(nn)) = (b.u32(), b.str()) else { return };
                let old = self.paths.get(&od).and_then(|d| child_path(d, on));
                let new = self.paths.get(&nd).and_then(|d| child_path(d, nn));
                let (Some(old), Some(new)) = (old, new) else { return };
                for p in self.paths.values_mut() {
                    if *p == old || p.starts_with(&format!("{old}/")) {
                        *p = format!("{new}{}", &p[old.len()..]);
                    }
                }
            }
            (TCLUNK | TREMOVE, _) => {
                if let Some(fid) = b.u32() {
                    self.paths.remove(&fid);
                }
            }
            _ => {}
        }
    }

    /// Serves Tsymlink (`fid[4] name[s] symtgt[s] gid[4]`) itself: the
    /// reply, or None for every other request.
    fn symlink(&self, request: &[u8]) -> Option<Vec<u8>> {
        if request.get(4) != Some(&TSYMLINK) {
            return None;
        }
        let mut b = Body(request.get(7..).unwrap_or_default());
        let (Some(fid), Some(name), Some(target)) = (b.u32(), b.str(), b.str()) else {
            return Some(error_reply(request, libc::EINVAL as u32));
        };
        let Some(path) = self.paths.get(&fid).and_then(|d| child_path(d, name)) else {
            return Some(error_reply(request, libc::EOPNOTSUPP as u32));
        };
        let (Ok(target), Ok(path)) = (CString::new(target), CString::new(path)) else {
            return Some(error_reply(request, libc::EINVAL as u32));
        };
        // SAFETY: NUL-terminated strings; `st` is ours to fill. Paths resolve
        // inside the jail (chroot).
        let st = unsafe {
            if libc::symlinkat(target.as_ptr(), libc::AT_FDCWD, path.as_ptr()) != 0 {
                return Some(error_reply(
                    request,
                    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as u32,
                ));
            }
            let mut st: libc::stat64 = std::mem::zeroed();
            if libc::fstatat64(libc::AT_FDCWD, path.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
                return Some(error_reply(request, libc::EIO as u32));
            }
            st
        };
        // Rsymlink (17): qid = type[1] (QTSYMLINK) version[4] (mtime, as the crate) path[8] (inode).
        let mut r = 20u32.to_le_bytes().to_vec();
        r.push(TSYMLINK + 1);
        r.extend_from_slice(&request[5..7]);
        r.push(0x02);
        r.extend_from_slice(&(st.st_mtime as u32).to_le_bytes());
        r.extend_from_slice(&st.st_ino.to_le_bytes());
        Some(r)
    }
}

/// What a guest controls in the server's own parsing, for `fuzz/`: `data`
/// split into a request and a reply, fed to the open-flag rewrite and the
/// fid-path tracker. (Tsymlink's handler is left out: it creates files.)
/// Beyond "no panic": a fid's path is always absolute and never holds `..`.
#[doc(hidden)]
pub fn fuzz_parsers(data: &[u8]) {
    let split = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let (request, reply) = data.split_at(split);
    let mut request = request.to_vec();
    force_nonblocking_open(&mut request);
    let mut paths = FidPaths::default();
    paths.observe(&[0, 0, 0, 0, 104, 0, 0, 0, 0, 0, 0], &[0, 0, 0, 0, RATTACH]);
    for chunk in request.chunks(32) {
        paths.observe(chunk, reply);
        paths.observe(&request, chunk);
    }
    for p in paths.paths.values() {
        assert!(p.starts_with('/') && !p.split('/').any(|c| c == ".."), "{p}");
    }
}

/// 9P2000.L message types whose open flags ember adjusts (Linux's
/// include/net/9p/9p.h: P9_TLOPEN, P9_TLCREATE).
const TLOPEN: u8 = 12;
const TLCREATE: u8 = 14;
/// P9_DOTL_NONBLOCK, the same value as Linux's O_NONBLOCK.
const P9_NONBLOCK: u32 = 0o4000;

/// Adds O_NONBLOCK to the flags of Tlopen (`size[4] type[1] tag[2] fid[4]
/// flags[4]`) and Tlcreate (`... fid[4] name[s] flags[4] mode[4] gid[4]`),
/// so opening a FIFO never waits for a writer.
fn force_nonblocking_open(msg: &mut [u8]) {
    let at = match msg.get(4) {
        Some(&TLOPEN) => 11,
        Some(&TLCREATE) => match msg.get(11..13) {
            Some(n) => 13 + usize::from(u16::from_le_bytes([n[0], n[1]])),
            None => return,
        },
        _ => return,
    };
    if let Some(f) = msg.get_mut(at..at + 4) {
        let flags = u32::from_le_bytes([f[0], f[1], f[2], f[3]]) | P9_NONBLOCK;
        f.copy_from_slice(&flags.to_le_bytes());
    }
}

/// An Rlerror (type 7: `size[4] type[1] tag[2] ecode[4]`) for `request`'s tag.
pub(crate) fn error_reply(request: &[u8], errno: u32) -> Vec<u8> {
    let tag = request.get(5..7).map_or([0xff, 0xff], |t| [t[0], t[1]]);
    let mut r = Vec::with_capacity(11);
    r.extend_from_slice(&11u32.to_le_bytes());
    r.push(7);
    r.extend_from_slice(&tag);
    r.extend_from_slice(&errno.to_le_bytes());
    r
}

fn errno_text(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} holds a NUL byte", p.display()))
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// Steps 1-4 of the module header, in this (single-threaded) process.
fn jail(dir: &Path, read_only: bool) -> Result<(), String> {
    // SAFETY: (the whole function) plain system calls on NUL-terminated paths and
    // properly sized structures; every result is checked.
    unsafe {
        let (uid, gid) = (libc::getuid(), libc::getgid());
        let root = uid == 0;
        let flags = if root { libc::CLONE_NEWNS } else { libc::CLONE_NEWNS | libc::CLONE_NEWUSER };
        if libc::unshare(flags) != 0 {
            return Err(errno_text(if root {
                "a new mount namespace"
            } else {
                "a new user namespace (are unprivileged user namespaces turned off? sysctl kernel.unprivileged_userns_clone)"
            }));
        }
        if !root {
            std::fs::write("/proc/self/setgroups", "deny").map_err(|e| format!("setgroups: {e}"))?;
            std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1")).map_err(|e| format!("uid_map: {e}"))?;
            std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1")).map_err(|e| format!("gid_map: {e}"))?;
        }
        let slash = c"/";
        if libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(errno_text("making mounts private"));
        }
        let d = cstr(dir)?;
        if libc::mount(d.as_ptr(), d.as_ptr(), std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()) != 0 {
            return Err(errno_text("bind-mounting the folder"));
        }
        let mut attr = MountAttr {
            attr_set: MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let r = libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            d.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        );
        if r != 0 {
            return Err(errno_text("mount_setattr (nodev, nosuid, ro)"));
        }
        if libc::chdir(d.as_ptr()) != 0 || libc::chroot(c".".as_ptr()) != 0 || libc::chdir(slash.as_ptr()) != 0 {
            return Err(errno_text("chroot into the folder"));
        }
        if root {
            drop_capabilities()?;
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(errno_text("PR_SET_NO_NEW_PRIVS"));
        }
    }
    Ok(())
}

/// Keeps CAP_CHOWN (0), CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2),
/// CAP_FOWNER (3) and CAP_FSETID (4), what serving root's files needs, and
/// drops everything else (capabilities(7)), from the bounding set too.
fn drop_capabilities() -> Result<(), String> {
    const KEEP: u32 = 0b1_1111;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // SAFETY: prctl and capset with a v3 header and two data words, as capset(2) wants.
    unsafe {
        for cap in 0..64 {
            if cap >= 32 || KEEP & (1 << cap) == 0 {
                // EINVAL past the kernel's last capability: nothing to drop.
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
        }
        let mut header = Header { version: 0x2008_0522, pid: 0 };
        let data = [
            Data { effective: KEEP, permitted: KEEP, inheritable: 0 },
            Data { effective: 0, permitted: 0, inheritable: 0 },
        ];
        if libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) != 0 {
            return Err(errno_text("dropping capabilities"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_become_nonblocking() {
        // Tlopen: size, type 12, tag, fid, flags O_RDONLY.
        let mut m = vec![15, 0, 0, 0, TLOPEN, 1, 0, 9, 0, 0, 0, 0, 0, 0, 0];
        force_nonblocking_open(&mut m);
        assert_eq!(u32::from_le_bytes(m[11..15].try_into().unwrap()), P9_NONBLOCK);
        // Tlcreate with a 3-byte name: flags after it.
        let mut c = vec![0, 0, 0, 0, TLCREATE, 1, 0, 9, 0, 0, 0, 3, 0, b'a', b'b', b'c', 2, 0, 0, 0];
        force_nonblocking_open(&mut c);
        assert_eq!(u32::from_le_bytes(c[16..20].try_into().unwrap()), 2 | P9_NONBLOCK);
        // Truncated messages are left alone, never indexed past their end.
        let mut t = vec![0, 0, 0, 0, TLCREATE, 1, 0, 9, 0, 0, 0, 0xff, 0xff];
        force_nonblocking_open(&mut t);
        let mut s = vec![0, 0, 0, 0, TLOPEN];
        force_nonblocking_open(&mut s);
    }

    fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = ((body.len() + 7) as u32).to_le_bytes().to_vec();
        m.push(ty);
        m.extend_from_slice(&[1, 0]);
        m.extend_from_slice(body);
        m
    }

    fn s(name: &str) -> Vec<u8> {
        let mut b = (name.len() as u16).to_le_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        b
    }

    #[test]
    fn fid_paths_follow_attach_walks_creates_renames_and_clunks() {
        let mut p = FidPaths::default();
        p.observe(&msg(104, &[0, 0, 0, 0]), &msg(RATTACH, &[]));
        let walk = |fid: u32, newfid: u32, names: &[&str]| {
            let mut b = fid.to_le_bytes().to_vec();
            b.extend_from_slice(&newfid.to_le_bytes());
            b.extend_from_slice(&(names.len() as u16).to_le_bytes());
            names.iter().for_each(|n| b.extend(s(n)));
            msg(110, &b)
        };
        let rwalk = |n: u16| msg(RWALK, &n.to_le_bytes());
        p.observe(&walk(0, 1, &["a", "b"]), &rwalk(2));
        assert_eq!(p.paths[&1], "/a/b");
        // A partial walk, `..` and names with `/` leave no path.
        p.observe(&walk(0, 2, &["a", "x"]), &rwalk(1));
        p.observe(&walk(1, 3, &[".."]), &rwalk(1));
        p.observe(&walk(0, 4, &["a/b"]), &rwalk(1));
        assert!(![2, 3, 4].iter().any(|f| p.paths.contains_key(f)));
        // Tlcreate turns the directory's fid into the new file's.
        let mut c = 1u32.to_le_bytes().to_vec();
        c.extend(s("f"));
        p.observe(&msg(14, &c), &msg(RLCREATE, &[]));
        assert_eq!(p.paths[&1], "/a/b/f");
        // Renaming a/ to z/ moves every path under it.
        let mut r = 0u32.to_le_bytes().to_vec();
        r.extend(s("a"));
        r.extend(0u32.to_le_bytes());
        r.extend(s("z"));
        p.observe(&msg(74, &r), &msg(RRENAMEAT, &[]));
        assert_eq!(p.paths[&1], "/z/b/f");
        p.observe(&msg(TCLUNK, &1u32.to_le_bytes()), &msg(121, &[]));
        assert!(!p.paths.contains_key(&1));
        // A Tsymlink on a fid without a path is refused, not guessed.
        let mut t = 9u32.to_le_bytes().to_vec();
        t.extend(s("l"));
        t.extend(s("target"));
        t.extend(0u32.to_le_bytes());
        let reply = p.symlink(&msg(TSYMLINK, &t)).unwrap();
        assert_eq!(reply[4], 7);
        assert_eq!(u32::from_le_bytes(reply[7..11].try_into().unwrap()), libc::EOPNOTSUPP as u32);
        assert!(p.symlink(&msg(TCLUNK, &[])).is_none());
    }

    #[test]
    fn undecodable_requests_get_an_error_for_their_tag() {
        assert_eq!(error_reply(&[0, 0, 0, 0, 100, 0x34, 0x12], 22), vec![11, 0, 0, 0, 7, 0x34, 0x12, 22, 0, 0, 0]);
        assert_eq!(error_reply(&[], 22)[5..7], [0xff, 0xff]);
    }

    #[test]
    fn frames_round_trip_and_refuse_oversized_lengths() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        assert_eq!(read_frame(&mut Cursor::new(&buf)).unwrap(), b"hello");
        let huge = (MAX_MESSAGE as u32 + 1).to_le_bytes();
        assert!(read_frame(&mut Cursor::new(&huge[..])).is_err());
    }
}
