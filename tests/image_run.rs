//! `ember run IMAGE`: images built by the tests (tests/common/oci.rs), moved
//! through a real registry (Debian's docker-registry on 127.0.0.1) and
//! archives with skopeo, pulled by the ember binary on the host, and run in
//! the Linux lane, where every test checks what the guest saw.
//!
//! The host side (pull, store, root file system) runs on the host as a user's
//! `ember pull`/`ember run` would; the VMs run in one Linux lane for the whole
//! binary (its outer machine sees the store read-only, as `ember run`'s own
//! fallback does). `through_the_host_as_a_user_types_it` runs one image the
//! way a user types it, fallback included.

#[path = "common/lane_retry.rs"]
mod lane_retry;
#[path = "common/oci.rs"]
mod oci;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ember::lane::{Invocation, LaneConfig, LinuxLane, Outcome};
use lane_retry::past_a_wedge;
use oci::{Config, Entry, Registry, layer_tar, run, temp_dir, write_image};

static LANE: OnceLock<Option<Mutex<LinuxLane>>> = OnceLock::new();
static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ember"))
}

/// The test images, in one OCI layout, and a store with `base` pulled.
struct Fixture {
    dir: PathBuf,
    layout: PathBuf,
    store: PathBuf,
}

impl Fixture {
    fn image(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.layout.display())
    }
}

/// Layer 1 of `base`: files whose fate layer 2 decides, links, a device node,
/// a setuid binary, owners, an xattr.
fn layer_one() -> Vec<u8> {
    layer_tar(&[
        Entry::Dir("data", 0o755, 0, 0),
        Entry::File("data/keep.txt", 0o640, 1000, 1000, b"kept\n".to_vec()),
        Entry::File("data/old.txt", 0o644, 0, 0, b"old\n".to_vec()),
        Entry::Hardlink("data/hl", "data/keep.txt"),
        Entry::Symlink("data/link", "/etc/passwd"),
        Entry::Dir("opq", 0o755, 0, 0),
        Entry::File("opq/a", 0o644, 0, 0, b"a\n".to_vec()),
        Entry::File("opq/b", 0o644, 0, 0, b"b\n".to_vec()),
        Entry::File("bin/suid", 0o4755, 0, 0, b"#!/bin/sh\necho suid\n".to_vec()),
        Entry::Dir("srv", 0o755, 0, 0),
        Entry::CharDev("srv/null", 1, 3),
        Entry::FileXattr("bin/cap", 0o755, "user.ember", b"xattr-kept", b"#!/bin/sh\n".to_vec()),
        // A file capability (struct vfs_cap_data, revision 2: effective,
        // CAP_NET_BIND_SERVICE permitted), as `setcap` writes it.
        Entry::FileXattr(
            "bin/netbind",
            0o755,
            "security.capability",
            &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            b"#!/bin/sh\n".to_vec(),
        ),
        Entry::Dir("work", 0o755, 0, 0),
    ])
}

/// Layer 2: a whiteout, an opaque directory with a new file, a replaced file.
fn layer_two() -> Vec<u8> {
    layer_tar(&[
        Entry::File("data/.wh.old.txt", 0o644, 0, 0, vec![]),
        Entry::Dir("opq", 0o755, 0, 0),
        Entry::File("opq/.wh..wh..opq", 0o644, 0, 0, vec![]),
        Entry::File("opq/c", 0o600, 0, 0, b"c\n".to_vec()),
    ])
}

fn base_config() -> Config {
    Config {
        env: vec!["GREETING=hello", "PATH=/bin"],
        cmd: Some(vec!["/bin/sh", "-c", "echo default-cmd; pwd; echo $GREETING"]),
        workdir: "/work",
        ..Default::default()
    }
}

/// `ember ARGS` on the host with the test's store.
fn host_ember(store: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).env("EMBER_IMAGE_STORE", store).output().unwrap()
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        oci::sweep_stale();
        let dir = temp_dir("images");
        let layout = dir.join("layout");
        let base = [oci::busybox_layer(), layer_one(), layer_two()];
        write_image(&layout, "base", &base, &base_config());
        let store = dir.join("store");
        let out = host_ember(&store, &["pull", &format!("oci:{}:base", layout.display())]);
        assert!(out.status.success(), "ember pull: {}", String::from_utf8_lossy(&out.stderr));
        Fixture { dir, layout, store }
    })
}

/// The lane, or None when the host has no /dev/kvm at all (then we skip, loudly).
fn lane() -> Option<MutexGuard<'static, LinuxLane>> {
    LANE.get_or_init(|| {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: /dev/kvm absent — image runs not tested");
            return None;
        }
        ember::guest::default_guest(false).unwrap_or_else(|e| panic!("building the default guest: {e}"));
        let lane = LinuxLane::start(bin()).unwrap_or_else(|e| panic!("the Linux lane cannot start: {e}"));
        eprintln!("Linux lane: {}", lane.describe());
        Some(Mutex::new(lane))
    })
    .as_ref()
    .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
}

/// `ember ARGS` in the lane with `store` as the image store. A wedged outer
/// machine (the test machine, not ember) is retried once, loudly (`lane_retry`).
fn vm_with(store: &Path, args: &[&str]) -> Option<Outcome> {
    vm_timed(store, args, LaneConfig::default().timeout)
}

/// [`vm_with`] with a longer limit than the lane's default, for a run that does much more than boot.
fn vm_timed(store: &Path, args: &[&str], timeout: Duration) -> Option<Outcome> {
    let mut l = lane()?;
    let mut inv = Invocation::new(args.iter().copied());
    inv.env.push(("EMBER_IMAGE_STORE".into(), store.display().to_string()));
    Some(past_a_wedge(&format!("`ember {args:?}`"), || l.run_with_timeout(&inv, timeout)))
}

fn vm(args: &[&str]) -> Option<Outcome> {
    vm_with(&fixture().store, args)
}

/// The guest's console output, with the tty's CR LF turned back into LF.
fn text(o: &Outcome) -> String {
    o.stdout_lossy().replace("\r\n", "\n")
}

fn show(o: &Outcome) -> String {
    format!("status {}\n--- stdout\n{}\n--- stderr\n{}", o.status, o.stdout_lossy(), o.stderr_lossy())
}

/// Runs and expects `status` and exactly `stdout`.
fn expect(args: &[&str], status: i32, stdout: &str) {
    let Some(o) = vm(args) else { return };
    assert_eq!((o.status, text(&o).as_str()), (status, stdout), "ember {args:?}\n{}", show(&o));
}

#[test]
fn image_config_and_docker_run_overrides() {
    let f = fixture();
    let img = f.image("base");
    // The image's Cmd, WorkingDir and Env.
    expect(&["run", &img], 0, "default-cmd\n/work\nhello\n");
    // A command after IMAGE replaces Cmd; `--` before it is accepted.
    expect(&["run", &img, "echo", "a b", "$HOME"], 0, "a b $HOME\n");
    expect(&["run", &img, "--", "echo", "--", "x"], 0, "-- x\n");
    // Exit status and death by signal, as docker run reports them.
    expect(&["run", &img, "sh", "-c", "exit 7"], 7, "");
    expect(&["run", &img, "sh", "-c", "kill -9 $$"], 137, "");
    // -e, --env-file, -w.
    let envfile = f.dir.join("env.list");
    std::fs::write(&envfile, "# comment\nFROMFILE=ff\nGREETING=file\n").unwrap();
    expect(
        &[
            "run",
            "--env-file",
            envfile.to_str().unwrap(),
            "-e",
            "GREETING=bye",
            "-e",
            "NEW=1",
            "-w",
            "/tmp/wd",
            &img,
            "sh",
            "-c",
            "echo $GREETING $NEW $FROMFILE; pwd",
        ],
        0,
        "bye 1 ff\n/tmp/wd\n",
    );
    // -u by name (groups from /etc/group, HOME from /etc/passwd) and by ids.
    expect(
        &["run", "-u", "app", &img, "sh", "-c", "id; echo $HOME"],
        0,
        "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)\n/home/app\n",
    );
    expect(&["run", "--user", "1234:5", &img, "sh", "-c", "id -u; id -g"], 0, "1234\n5\n");
    // --entrypoint replaces the Entrypoint and drops the image's Cmd.
    expect(&["run", "--entrypoint", "/bin/echo", &img, "hi", "there"], 0, "hi there\n");
    // --hostname and Docker's /etc files.
    expect(
        &[
            "run",
            "--hostname",
            "box",
            "-i",
            "-t",
            &img,
            "sh",
            "-c",
            "hostname; cat /etc/hostname; grep -c box /etc/hosts",
        ],
        0,
        "box\nbox\n1\n",
    );
}

/// An image run splits its command's stdout and stderr like the default
/// guest (not terminals here: `--output=auto` splits): stdout holds exactly
/// the command's stdout, with LF line ends (no tty), stderr its stderr, and a
/// binary file comes out of `cat` byte for byte.
#[test]
fn an_image_command_keeps_stdout_and_stderr_apart() {
    let f = fixture();
    let img = f.image("base");
    let Some(o) = vm(&["run", &img, "sh", "-c", "echo out; echo err >&2; echo out2"]) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    assert_eq!(o.stdout_lossy(), "out\nout2\n", "{}", show(&o));
    assert!(o.stderr_lossy().lines().any(|l| l == "err"), "{}", show(&o));
    // The image's /bin/busybox is the host's (common/oci.rs, busybox_layer).
    let Some(o) = vm(&["run", &img, "cat", "/bin/busybox"]) else { return };
    let busybox = std::fs::read("/bin/busybox").unwrap();
    assert_eq!(o.status, 0, "{}", o.stderr_lossy());
    assert!(o.stdout == busybox, "{} bytes out, {} in /bin/busybox", o.stdout.len(), busybox.len());
}

#[test]
fn a_missing_entrypoint_exits_127_like_docker() {
    let f = fixture();
    let Some(o) = vm(&["run", &f.image("base"), "no-such-program"]) else { return };
    assert_eq!(o.status, 127, "{}", show(&o));
    assert!(
        text(&o).contains("executable file not found") || o.stderr_lossy().contains("executable file not found"),
        "{}",
        show(&o)
    );
}

#[test]
fn layers_are_applied_with_whiteouts_links_devices_and_modes() {
    let f = fixture();
    let script = "ls -1a /data /opq; stat -c '%n %a %u %g %h %F' /data/keep.txt /data/hl /bin/suid /home/app /srv/null /opq/c; \
                  readlink /data/link; cat /data/hl";
    expect(
        &["run", &f.image("base"), "sh", "-c", script],
        0,
        "/data:\n.\n..\nhl\nkeep.txt\nlink\n\n/opq:\n.\n..\nc\n\
         /data/keep.txt 640 1000 1000 2 regular file\n/data/hl 640 1000 1000 2 regular file\n\
         /bin/suid 4755 0 0 1 regular file\n/home/app 750 1000 1000 2 directory\n\
         /srv/null 666 0 0 1 character special file\n/opq/c 600 0 0 1 regular file\n/etc/passwd\nkept\n",
    );
    // The xattr made it into the image (read on the host side: busybox has no getfattr).
    let rec = std::fs::read_dir(f.store.join("rootfs"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "sqfs"));
    let sqfs = rec.expect("a built root file system").path();
    let x = run(Command::new("rdsquashfs").arg("-x").arg("/bin/cap").arg(&sqfs));
    assert!(x.contains("user.ember") && x.contains("xattr-kept"), "{x}");
    let x = run(Command::new("rdsquashfs").arg("-x").arg("/bin/netbind").arg(&sqfs));
    assert!(x.contains("security.capability"), "{x}");
}

#[test]
fn the_guest_sees_what_umoci_unpacks() {
    let f = fixture();
    let bundle = f.dir.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:base", f.layout.display())).arg(&bundle));
    let Some(o) = vm(&["run", &f.image("base"), "sh", "-c", "find / -xdev | sort | xargs stat -c '%n %a %u %g %F'"])
    else {
        return;
    };
    assert_eq!(o.status, 0, "{}", show(&o));
    // What ember's init adds: mount points and Docker's /etc files.
    let added = ["/", "/proc", "/sys", "/dev", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];
    let guest: Vec<String> =
        text(&o).lines().filter(|l| !added.contains(&l.split(' ').next().unwrap_or(""))).map(str::to_string).collect();
    let rootfs = bundle.join("rootfs");
    let mut host = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let md = e.path().symlink_metadata().unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(e.path());
                "directory"
            } else if ft.is_symlink() {
                "symbolic link"
            } else if ft.is_char_device() {
                "character special file"
            } else {
                "regular file"
            };
            let name = format!("/{}", e.path().strip_prefix(&rootfs).unwrap().display());
            if added.contains(&name.as_str()) {
                continue;
            }
            host.push(format!("{name} {:o} {} {} {kind}", md.mode() & 0o7777, md.uid(), md.gid()));
        }
    }
    host.sort();
    let mut guest_sorted = guest.clone();
    guest_sorted.sort();
    assert_eq!(guest_sorted, host, "guest (left) vs umoci unpack (right)");
    let _ = std::fs::remove_dir_all(&bundle);
}

/// `-v` in an image run: the folder is mounted inside the image's root (over
/// the image's own /data), the image's user reads it, and a write from the
/// image's command is on the host when ember returns.
#[test]
fn a_shared_folder_is_mounted_inside_the_image() {
    let f = fixture();
    let img = f.image("base");
    let dir = std::env::temp_dir().join(format!("ember-image-share-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("in.txt"), "from the host\n").unwrap();
    let v = format!("{}:/data", dir.display());
    expect(
        &["run", "-v", &v, &img, "sh", "-c", "cat /data/in.txt; echo from-image > /data/out.txt"],
        0,
        "from the host\n",
    );
    assert_eq!(std::fs::read_to_string(dir.join("out.txt")).unwrap(), "from-image\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writes_are_discarded_between_runs() {
    let f = fixture();
    let img = f.image("base");
    expect(&["run", &img, "sh", "-c", "echo changed > /data/keep.txt; touch /new; rm /bin/wc; echo ok"], 0, "ok\n");
    expect(
        &["run", &img, "sh", "-c", "cat /data/keep.txt; test -e /new || echo no-new; test -e /bin/wc && echo wc"],
        0,
        "kept\nno-new\nwc\n",
    );
}

#[test]
fn registry_pulls_zstd_manifest_lists_auth_corruption_and_the_cache() {
    let f = fixture();
    let store = f.dir.join("store-registry");
    let mut reg = Registry::start("plain", None);
    reg.push(&f.image("base"), "test/base:1", &[]);
    reg.push(&f.image("base"), "test/zstd:1", &["--dest-compress-format", "zstd"]);
    // Docker's own manifest format (schema 2), as `docker push` writes it.
    reg.push(&f.image("base"), "test/v2s2:1", &["--format", "v2s2"]);
    // A manifest list: amd64 and a (fake) arm64 entry, and one with arm64 only.
    let manifest = write_image(&f.layout, "single", &[oci::busybox_layer()], &base_config());
    oci::write_index(&f.layout, "multi", &[(manifest.clone(), "linux", "arm64"), (manifest.clone(), "linux", "amd64")]);
    oci::write_index(&f.layout, "armonly", &[(manifest, "linux", "arm64")]);
    reg.push(&f.image("multi"), "test/multi:1", &["--all"]);
    reg.push(&f.image("armonly"), "test/armonly:1", &["--all"]);

    let pull = |name: &str| host_ember(&store, &["pull", &format!("{}/{name}", reg.addr)]);
    for name in ["test/base:1", "test/zstd:1", "test/multi:1", "test/v2s2:1"] {
        let o = pull(name);
        assert!(o.status.success(), "pull {name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = pull("test/armonly:1");
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no linux/amd64"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = pull("test/nosuch:1");
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"), "{}", String::from_utf8_lossy(&o.stderr));
    let images = String::from_utf8_lossy(&host_ember(&store, &["images"]).stdout).into_owned();
    assert!(images.contains(&format!("{}/test/zstd", reg.addr)) && images.contains("REPOSITORY"), "{images}");

    // Two pulls of one image into one store at once: both succeed, one record.
    let together = f.dir.join("store-together");
    let spawn = || {
        Command::new(bin())
            .args(["pull", &format!("{}/test/base:1", reg.addr)])
            .env("EMBER_IMAGE_STORE", &together)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "concurrent pull: {}", String::from_utf8_lossy(&o.stderr));
    }
    let listed = String::from_utf8_lossy(&host_ember(&together, &["images"]).stdout).lines().count();
    assert_eq!(listed, 2, "a header and one image");
    assert_eq!(std::fs::read_dir(together.join("tmp")).unwrap().count(), 0, "nothing left half-written");

    // A blob corrupted in the registry's storage is refused, and nothing is kept.
    let fresh = f.dir.join("store-corrupt");
    reg.push(&f.image("single"), "test/corrupt:1", &[]);
    let blobs = reg.data().join("docker/registry/v2/blobs/sha256");
    let mut biggest: Option<(u64, PathBuf)> = None;
    for prefix in std::fs::read_dir(&blobs).unwrap().flatten() {
        for b in std::fs::read_dir(prefix.path()).unwrap().flatten() {
            let data = b.path().join("data");
            let len = data.metadata().map(|m| m.len()).unwrap_or(0);
            if biggest.as_ref().is_none_or(|(l, _)| len > *l) {
                biggest = Some((len, data));
            }
        }
    }
    let (_, victim) = biggest.unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let o = host_ember(&fresh, &["pull", &format!("{}/test/corrupt:1", reg.addr)]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("corrupt"), "{}", String::from_utf8_lossy(&o.stderr));
    let kept: Vec<_> =
        std::fs::read_dir(fresh.join("blobs/sha256")).unwrap().flatten().map(|e| e.file_name()).collect();
    let victim_hex = victim.parent().unwrap().file_name().unwrap();
    assert!(!kept.iter().any(|k| k == victim_hex), "the corrupt blob was kept");

    // The registry goes away: what was pulled still runs, from the store.
    reg.stop();
    let zstd_ref = format!("{}/test/zstd:1", reg.addr);
    if let Some(o) = vm_with(&store, &["run", &zstd_ref, "sh", "-c", "echo from-zstd; cat /data/hl"]) {
        assert_eq!((o.status, text(&o).as_str()), (0, "from-zstd\nkept\n"), "{}", show(&o));
    }
    let o = host_ember(&store, &["pull", &zstd_ref]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be reached"), "{}", String::from_utf8_lossy(&o.stderr));
    // rmi forgets a name and its blobs.
    let o = host_ember(&store, &["rmi", &format!("{}/test/multi:1", reg.addr)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let images = String::from_utf8_lossy(&host_ember(&store, &["images"]).stdout).into_owned();
    assert!(!images.contains("test/multi"), "{images}");
}

#[test]
fn registry_basic_auth_from_docker_config() {
    let f = fixture();
    let dir = f.dir.join("auth");
    std::fs::create_dir_all(&dir).unwrap();
    let htpasswd = dir.join("htpasswd");
    let line = run(Command::new("htpasswd").args(["-Bbn", "ember", "s3cret"]));
    std::fs::write(&htpasswd, line).unwrap();
    let reg = Registry::start("auth", Some(&htpasswd));
    let mut push = Command::new("skopeo");
    push.args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", "ember:s3cret"])
        .arg(f.image("base"))
        .arg(format!("docker://{}/test/private:1", reg.addr));
    run(&mut push);
    let store = dir.join("store");
    let image = format!("{}/test/private:1", reg.addr);
    let docker_config = dir.join("docker");
    std::fs::create_dir_all(&docker_config).unwrap();
    let pull = |creds: Option<&str>| {
        match creds {
            Some(c) => {
                let auth = ember_b64(c);
                std::fs::write(
                    docker_config.join("config.json"),
                    format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
                )
                .unwrap();
            }
            None => {
                let _ = std::fs::remove_file(docker_config.join("config.json"));
            }
        }
        Command::new(bin())
            .args(["pull", &image])
            .env("EMBER_IMAGE_STORE", &store)
            .env("DOCKER_CONFIG", &docker_config)
            .output()
            .unwrap()
    };
    let o = pull(None);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("docker login"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = pull(Some("ember:wrong"));
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refused access with the credentials"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = pull(Some("ember:s3cret"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// base64 (RFC 4648), for a docker config's `auth`.
fn ember_b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn archives_and_directories() {
    let f = fixture();
    let da = f.dir.join("image.docker.tar");
    let oa = f.dir.join("image.oci.tar");
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(f.image("base"))
        .arg(format!("docker-archive:{}:test/base:1", da.display())));
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(f.image("base"))
        .arg(format!("oci-archive:{}:base", oa.display())));
    let store = f.dir.join("store-archives");
    let docker_ref = format!("docker-archive:{}:test/base:1", da.display());
    let oci_ref = format!("oci-archive:{}:base", oa.display());
    for r in [&docker_ref, &oci_ref] {
        let o = host_ember(&store, &["pull", r]);
        assert!(o.status.success(), "pull {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    for r in [&docker_ref, &oci_ref] {
        if let Some(o) = vm_with(&store, &["run", r, "cat", "/data/hl"]) {
            assert_eq!((o.status, text(&o).as_str()), (0, "kept\n"), "{r}\n{}", show(&o));
        }
    }
    // dir: a plain root file system tree, used as it is.
    let tree = f.dir.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap_or(());
    if let Some(o) = vm_with(&store, &["run", &format!("dir:{}", tree.display()), "/bin/sh", "-c", "echo from-dir"]) {
        assert_eq!((o.status, text(&o).as_str()), (0, "from-dir\n"), "{}", show(&o));
    }
    // A truncated archive is refused with a message, nothing run.
    let cut = f.dir.join("cut.tar");
    let bytes = std::fs::read(&da).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let o = host_ember(&store, &["pull", &format!("docker-archive:{}", cut.display())]);
    assert_eq!(o.status.code(), Some(125), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a readable image archive"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A layer tar whose one entry is `../escape` (the tar crate refuses to
/// write such a name, so the header is written by hand).
fn hostile_layer() -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_mode(0o644);
    h.set_size(3);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(b"bad");
    out.resize(out.len() + 509, 0);
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn bad_images_get_a_clear_message() {
    let f = fixture();
    let store = f.dir.join("store-bad");
    let layout = f.dir.join("bad-layout");
    write_image(&layout, "escape", &[hostile_layer()], &base_config());
    write_image(&layout, "arm", &[oci::busybox_layer()], &Config { architecture: "arm64", ..base_config() });
    write_image(&layout, "nocmd", &[oci::busybox_layer()], &Config { cmd: None, ..base_config() });
    let cases: [(&str, &str); 5] = [
        ("escape", "leaves the root"),
        ("arm", "linux/arm64"),
        ("nosuchtag", "not found"),
        ("nocmd", "no Entrypoint or Cmd"),
        ("", ""),
    ];
    for (tag, msg) in cases.iter().filter(|(t, _)| !t.is_empty()) {
        let o = host_ember(&store, &["run", &format!("oci:{}:{tag}", layout.display())]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{tag}: {err}");
        assert!(err.contains(msg), "{tag}: expected `{msg}` in: {err}");
    }
    // A full disk during a pull: a clear message, and nothing half-written kept.
    if unsafe { libc::geteuid() } == 0 {
        let small = f.dir.join("small-store");
        std::fs::create_dir_all(&small).unwrap();
        let mounted =
            Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"]).arg(&small).status().unwrap();
        if mounted.success() {
            let o = host_ember(&small, &["pull", &f.image("base")]);
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            let leftovers = std::fs::read_dir(small.join("tmp")).map(|d| d.count()).unwrap_or(0);
            let records = std::fs::read_dir(small.join("images")).map(|d| d.count()).unwrap_or(0);
            let _ = Command::new("umount").arg(&small).status();
            assert_eq!(o.status.code(), Some(125), "{err}");
            assert!(err.contains("No space left on device"), "{err}");
            assert_eq!((leftovers, records), (0, 0), "a failed pull left files behind");
        }
    } else {
        eprintln!("SKIPPED: the full-disk case needs root (a small tmpfs)");
    }
    let escape = Path::new("/tmp/escape");
    assert!(!escape.exists() || std::fs::read(escape).unwrap() != b"bad", "a layer wrote outside its root");
    for (args, msg) in [
        (vec!["run", "Bad_Name"], "invalid image reference"),
        (vec!["run", "-e", "A=1", "--", "true"], "applies to container images"),
        (vec!["pull", "oci:/nonexistent-layout"], "not an OCI image layout"),
        (vec!["rmi", "never/pulled"], "no image"),
    ] {
        let o = host_ember(&store, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: expected `{msg}` in: {err}");
    }
}

#[test]
fn through_the_host_as_a_user_types_it() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent");
        return;
    }
    let f = fixture();
    // On a host whose KVM cannot run Linux this goes through ember's own
    // fallback (a fresh outer machine); on hardware KVM it runs directly.
    let o = host_ember(&f.store, &["run", &f.image("base"), "sh", "-c", "echo through-the-host; exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).replace("\r\n", "\n"), "through-the-host\n");
}

#[test]
fn completions_cover_the_image_commands() {
    let o = Command::new(bin()).args(["completions", "bash"]).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for w in ["pull", "images", "rmi", "--entrypoint", "--env-file"] {
        assert!(s.contains(w), "bash completions lack {w}");
    }
}

/// A Debian 12 root (`debootstrap --variant=minbase`, plus perl-base's perl
/// and python3-minimal) as a tar, made once and cached in ember's cache: the
/// first run fetches ~40 MB of packages from Debian's archive.
fn debian_root_tar() -> PathBuf {
    let cache = ember::guest::cache_dir().join("test-images");
    std::fs::create_dir_all(&cache).unwrap();
    let tar = cache.join("debian-bookworm-minbase-python3.tar");
    if tar.is_file() {
        return tar;
    }
    let lock = std::fs::File::create(cache.join(".debian.lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if tar.is_file() {
        return tar;
    }
    let root = cache.join(format!("debian-root.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    eprintln!("image_run: building a Debian root with debootstrap (first run only)");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3-minimal", "bookworm"])
        .arg(&root)
        .arg("http://deb.debian.org/debian"));
    let tmp = cache.join(format!("debian.tar.{}", std::process::id()));
    run(Command::new("tar").args(["--numeric-owner", "--xattrs", "-C"]).arg(&root).arg("-cf").arg(&tmp).arg("."));
    std::fs::rename(&tmp, &tar).unwrap();
    let _ = std::fs::remove_dir_all(&root);
    tar
}

#[test]
fn a_debian_image_runs_its_own_programs() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm absent");
        return;
    }
    let f = fixture();
    let layer = std::fs::read(debian_root_tar()).unwrap();
    let cfg = Config {
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        cmd: Some(vec!["bash"]),
        ..Default::default()
    };
    let layout = f.dir.join("debian-layout");
    write_image(&layout, "12", &[layer], &cfg);
    let store = f.dir.join("store-debian");
    let image = format!("oci:{}:12", layout.display());
    let o = host_ember(&store, &["pull", &image]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = "apt-get --version | head -n1 | cut -d' ' -f1; perl -e 'print 6*7, qq(\\n)'; \
                  python3 -c 'import os, socket, select; print(6*7, os.getuid())'; \
                  . /etc/os-release; echo $ID $VERSION_ID; id -un";
    let Some(o) = vm_with(&store, &["run", "--memory", "512M", &image, "bash", "-c", script]) else { return };
    assert_eq!((o.status, text(&o).as_str()), (0, "apt\n42\n42 0\ndebian 12\nroot\n"), "{}", show(&o));
}

#[test]
fn ember_bench_runs_the_same_image_in_every_runtime() {
    let f = fixture();
    // The tier's inner half, as `ember bench --image` runs it in the lane.
    let args = [
        "bench",
        "--inner",
        "--image",
        &f.image("base"),
        "--runtimes",
        "crun,runc,ember,qemu-microvm,docker",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--density",
        "",
        "--",
        "/bin/echo",
        "bench-line",
    ];
    // Five runtimes one after the other, a dockerd started for the Docker row, all under TCG: on a
    // loaded 2-core machine this took longer than the lane's default 120 s once (a timeout, not a
    // failure of any runtime).
    let Some(o) = vm_timed(&f.store, &args, Duration::from_secs(420)) else { return };
    assert_eq!(o.status, 0, "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    let rows = v[0]["rows"].as_array().expect("rows");
    for r in rows {
        let (name, status) = (r["runtime"].as_str().unwrap(), r["status"].as_str().unwrap());
        match name {
            // Docker is measured where an engine runs (ember bench starts its own
            // when dockerd is installed); elsewhere its row says why not.
            "docker" if status.starts_with("skipped: ") => eprintln!("docker: {status}"),
            _ => assert_eq!((name, status, r["ok_runs"].as_u64()), (name, "ok", Some(1)), "{}", show(&o)),
        }
    }
    assert_eq!(rows.len(), 5);
}

#[test]
fn an_image_needs_no_shell() {
    let f = fixture();
    // One static program and nothing else: no /bin/sh, no /etc, no busybox applets.
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let layer = layer_tar(&[Entry::File("busybox", 0o755, 0, 0, busybox)]);
    let cfg =
        Config { entrypoint: Some(vec!["/busybox", "echo"]), cmd: Some(vec!["no", "shell"]), ..Default::default() };
    let layout = f.dir.join("noshell-layout");
    write_image(&layout, "1", &[layer], &cfg);
    let image = format!("oci:{}:1", layout.display());
    let store = f.dir.join("store-noshell");
    let o = host_ember(&store, &["pull", &image]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let Some(o) = vm_with(&store, &["run", &image]) else { return };
    assert_eq!((o.status, text(&o).as_str()), (0, "no shell\n"), "{}", show(&o));
}
