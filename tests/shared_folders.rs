//! The shared-folder file server (`-v`, src/host/p9_server.rs) spoken to
//! directly in 9P2000.L, as a hostile guest could, with no VM in between: a
//! guest's own kernel never sends `..` or a name holding `/`, so these
//! attempts can only be made here. Each test starts the real server (the
//! ember binary, jailed in a fresh directory) and checks what the host's file
//! system saw. Needs no /dev/kvm. The guest's view (mount, both sides
//! changing files, 64 MiB) is tested in tests/linux_lane.rs.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use ember::host::p9_server::FsServer;

// Message types (Linux include/net/9p/9p.h).
const RLERROR: u8 = 7;
const TLOPEN: u8 = 12;
const RLOPEN: u8 = 13;
const TLCREATE: u8 = 14;
const RLCREATE: u8 = 15;
const TSYMLINK: u8 = 16;
const RSYMLINK: u8 = 17;
const TMKNOD: u8 = 18;
const TVERSION: u8 = 100;
const TATTACH: u8 = 104;
const TWALK: u8 = 110;
const RWALK: u8 = 111;
const TREAD: u8 = 116;
const RREAD: u8 = 117;
const TWRITE: u8 = 118;
const RWRITE: u8 = 119;

const O_RDONLY: u32 = 0;
const O_RDWR: u32 = 2;

/// A 9P2000.L client over one server.
struct Client {
    server: FsServer,
    tag: u16,
}

/// A reply: its type and body.
struct Reply {
    ty: u8,
    body: Vec<u8>,
}

impl Reply {
    fn errno(&self) -> Option<u32> {
        (self.ty == RLERROR).then(|| u32::from_le_bytes(self.body[0..4].try_into().unwrap()))
    }
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl Client {
    fn new(dir: &Path, read_only: bool) -> Client {
        let server = FsServer::start_with(Path::new(env!("CARGO_BIN_EXE_ember")), dir, read_only)
            .unwrap_or_else(|e| panic!("the file server did not start: {e}"));
        let mut c = Client { server, tag: 0 };
        let mut b = 65560u32.to_le_bytes().to_vec();
        string(&mut b, "9P2000.L");
        assert_eq!(c.call(TVERSION, b).ty, TVERSION + 1);
        // Tattach fid 0: the folder's root.
        let mut b = vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        string(&mut b, "root");
        string(&mut b, "");
        b.extend_from_slice(&0u32.to_le_bytes());
        let r = c.call(TATTACH, b);
        assert_eq!(r.ty, TATTACH + 1, "attach: errno {:?}", r.errno());
        c
    }

    fn call(&mut self, ty: u8, body: Vec<u8>) -> Reply {
        self.tag = self.tag.wrapping_add(1);
        let mut m = ((body.len() + 7) as u32).to_le_bytes().to_vec();
        m.push(ty);
        m.extend_from_slice(&self.tag.to_le_bytes());
        m.extend_from_slice(&body);
        let r = self.server.call(&m).expect("the server answers");
        assert!(r.len() >= 7, "a reply has a header");
        assert_eq!(u16::from_le_bytes([r[5], r[6]]), self.tag, "the reply carries the request's tag");
        Reply { ty: r[4], body: r[7..].to_vec() }
    }

    /// Twalk `fid` -> `newfid` through `names`; the qids' paths on success.
    fn walk(&mut self, fid: u32, newfid: u32, names: &[&str]) -> Result<Vec<u64>, u32> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&newfid.to_le_bytes());
        b.extend_from_slice(&(names.len() as u16).to_le_bytes());
        names.iter().for_each(|n| string(&mut b, n));
        let r = self.call(TWALK, b);
        if let Some(e) = r.errno() {
            return Err(e);
        }
        assert_eq!(r.ty, RWALK);
        let n = usize::from(u16::from_le_bytes([r.body[0], r.body[1]]));
        if n < names.len() {
            return Err(libc::ENOENT as u32); // a partial walk: the name was not found
        }
        // qid: type[1] version[4] path[8]
        Ok((0..n).map(|i| u64::from_le_bytes(r.body[2 + 13 * i + 5..2 + 13 * i + 13].try_into().unwrap())).collect())
    }

    fn lopen(&mut self, fid: u32, flags: u32) -> Result<(), u32> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&flags.to_le_bytes());
        let r = self.call(TLOPEN, b);
        r.errno().map_or_else(
            || {
                let _: () = assert_eq!(r.ty, RLOPEN);
                Ok(())
            },
            Err,
        )
    }

    fn read(&mut self, fid: u32) -> Result<Vec<u8>, u32> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes());
        let r = self.call(TREAD, b);
        if let Some(e) = r.errno() {
            return Err(e);
        }
        assert_eq!(r.ty, RREAD);
        let n = u32::from_le_bytes(r.body[0..4].try_into().unwrap()) as usize;
        Ok(r.body[4..4 + n].to_vec())
    }

    /// Tlcreate `name` in the directory `fid` (which then is the open file).
    fn lcreate(&mut self, fid: u32, name: &str) -> Result<(), u32> {
        let mut b = fid.to_le_bytes().to_vec();
        string(&mut b, name);
        b.extend_from_slice(&O_RDWR.to_le_bytes());
        b.extend_from_slice(&0o644u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let r = self.call(TLCREATE, b);
        r.errno().map_or_else(
            || {
                let _: () = assert_eq!(r.ty, RLCREATE);
                Ok(())
            },
            Err,
        )
    }

    fn write(&mut self, fid: u32, data: &[u8]) -> Result<u32, u32> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        let r = self.call(TWRITE, b);
        if let Some(e) = r.errno() {
            return Err(e);
        }
        assert_eq!(r.ty, RWRITE);
        Ok(u32::from_le_bytes(r.body[0..4].try_into().unwrap()))
    }
}

/// `<tmp>/outside/secret` (not shared) next to `<tmp>/share` (shared), with a
/// file, a FIFO and two symlinks that point out of the share.
struct Tree {
    top: PathBuf,
    share: PathBuf,
}

impl Tree {
    fn new(name: &str) -> Tree {
        let top = std::env::temp_dir().join(format!("ember-9p-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let share = top.join("share");
        std::fs::create_dir_all(share.join("sub")).unwrap();
        std::fs::create_dir_all(top.join("outside")).unwrap();
        std::fs::write(top.join("outside/secret"), "SECRET").unwrap();
        std::fs::write(top.join("secret"), "SECRET").unwrap();
        std::fs::write(share.join("hello"), "hello from the host").unwrap();
        symlink(top.join("outside/secret"), share.join("abs")).unwrap();
        symlink("../outside/secret", share.join("rel")).unwrap();
        let fifo = std::ffi::CString::new(share.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
        Tree { top, share }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

#[test]
fn dot_dot_and_slashes_stay_inside_the_folder() {
    let t = Tree::new("dotdot");
    let mut c = Client::new(&t.share, false);
    let root = c.walk(0, 1, &[]).expect("clone the root fid");
    assert_eq!(root.len(), 0);
    // `..` at the root is the root: same qid path as `sub/..`.
    let up = c.walk(0, 2, &[".."]).expect("`..` from the root");
    let sub_up = c.walk(0, 3, &["sub", ".."]).expect("sub/..");
    assert_eq!(up[0], sub_up[1], "`..` of the folder's root is its root");
    for names in [&["..", "secret"][..], &["..", "..", "outside", "secret"], &["sub/../../secret"], &["../secret"]] {
        assert_eq!(c.walk(0, 4, names), Err(libc::ENOENT as u32), "walk {names:?} must not find the secret");
    }
    // The server still works, and reads what is inside.
    c.walk(0, 5, &["hello"]).unwrap();
    c.lopen(5, O_RDONLY).unwrap();
    assert_eq!(c.read(5).unwrap(), b"hello from the host");
}

#[test]
fn symlinks_out_of_the_folder_do_not_open_what_they_point_at() {
    let t = Tree::new("symlink");
    let mut c = Client::new(&t.share, false);
    for (fid, name) in [(1, "abs"), (2, "rel")] {
        c.walk(0, fid, &[name]).expect("the symlink itself is there");
        // Opening a symlink's fid must not follow it out of the folder: an
        // error, or at most the link itself, never the secret's bytes.
        if c.lopen(fid, O_RDONLY).is_ok() {
            assert_ne!(c.read(fid).unwrap_or_default(), b"SECRET", "{name} leaked the file it points at");
        }
        // Walking through it as a directory component fails too.
        assert!(c.walk(0, 10 + fid, &[name, "x"]).is_err());
    }
}

#[test]
fn writes_are_on_the_host_when_the_reply_comes_and_ro_is_enforced_by_the_host() {
    let t = Tree::new("rw");
    let mut c = Client::new(&t.share, false);
    c.walk(0, 1, &[]).unwrap();
    c.lcreate(1, "made-by-guest").expect("create in a writable folder");
    assert_eq!(c.write(1, b"written").unwrap(), 7);
    // No close, no fsync: the bytes are in the host's file already.
    assert_eq!(std::fs::read(t.share.join("made-by-guest")).unwrap(), b"written");
    drop(c);

    let mut ro = Client::new(&t.share, true);
    ro.walk(0, 1, &[]).unwrap();
    assert_eq!(ro.lcreate(1, "nope"), Err(libc::EROFS as u32), "create in a :ro folder");
    ro.walk(0, 2, &["hello"]).unwrap();
    assert_eq!(ro.lopen(2, O_RDWR), Err(libc::EROFS as u32), "open for writing in a :ro folder");
    assert!(!t.share.join("nope").exists());
    assert_eq!(std::fs::read(t.share.join("hello")).unwrap(), b"hello from the host");
    // Reading is fine.
    ro.walk(0, 3, &["hello"]).unwrap();
    ro.lopen(3, O_RDONLY).unwrap();
    assert_eq!(ro.read(3).unwrap(), b"hello from the host");
}

#[test]
fn a_fifo_does_not_block_the_server_and_device_nodes_do_not_open() {
    let t = Tree::new("special");
    let mut c = Client::new(&t.share, false);
    c.walk(0, 1, &["fifo"]).unwrap();
    // With no writer, a blocking open would never return (and, in a VM,
    // hold ember's event loop): the server opens it non-blocking.
    c.lopen(1, O_RDONLY).expect("a FIFO with no writer opens at once");
    // A character device made through the folder (1:3 is the host's
    // /dev/null; it could as well be a disk) must not be usable.
    let mut b = 0u32.to_le_bytes().to_vec();
    string(&mut b, "dev");
    b.extend_from_slice(&(libc::S_IFCHR | 0o666).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    let made = c.call(TMKNOD, b);
    if made.errno().is_none() {
        c.walk(0, 2, &["dev"]).unwrap();
        assert!(c.lopen(2, O_RDWR).is_err(), "a device node in a shared folder opened (the mount must be nodev)");
    }
}

#[test]
fn symlinks_are_made_where_the_guest_walked_and_not_in_ro_folders() {
    let t = Tree::new("mksymlink");
    let symlink_in = |c: &mut Client, fid: u32, name: &str, target: &str| {
        let mut b = fid.to_le_bytes().to_vec();
        string(&mut b, name);
        string(&mut b, target);
        b.extend_from_slice(&0u32.to_le_bytes());
        let r = c.call(TSYMLINK, b);
        r.errno().map_or_else(
            || {
                let _: () = assert_eq!(r.ty, RSYMLINK);
                Ok(())
            },
            Err,
        )
    };
    let mut c = Client::new(&t.share, false);
    c.walk(0, 1, &["sub"]).unwrap();
    symlink_in(&mut c, 1, "link", "../hello").expect("ln -s in a writable folder");
    assert_eq!(std::fs::read_link(t.share.join("sub/link")).unwrap(), Path::new("../hello"));
    // The guest's names are plain names: no `..`, no `/`.
    assert!(symlink_in(&mut c, 1, "../escape", "x").is_err());
    assert!(!t.top.join("escape").exists() && !t.share.join("escape").exists());
    drop(c);
    let mut ro = Client::new(&t.share, true);
    ro.walk(0, 1, &[]).unwrap();
    assert_eq!(symlink_in(&mut ro, 1, "nope", "x"), Err(libc::EROFS as u32));
}

#[test]
fn a_missing_folder_is_a_clear_error() {
    let e = FsServer::start_with(Path::new(env!("CARGO_BIN_EXE_ember")), Path::new("/nonexistent/ember-9p"), false)
        .err()
        .expect("no server for a missing folder");
    assert!(e.to_string().contains("no such directory"), "{e}");
}
