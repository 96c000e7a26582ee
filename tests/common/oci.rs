//! Test images, written as OCI image layouts (image-spec `image-layout.md`)
//! from layers built entry by entry, so a test says exactly what each layer
//! holds: whiteouts, opaque directories, hard links, device nodes, setuid
//! bits, owners, xattrs. skopeo then turns a layout into whatever a test needs
//! (a registry push, docker-archive, oci-archive, zstd layers).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// One entry of a layer.
pub enum Entry {
    /// path, mode, uid, gid
    Dir(&'static str, u32, u64, u64),
    /// path, mode, uid, gid, bytes
    File(&'static str, u32, u64, u64, Vec<u8>),
    /// path, target
    Symlink(&'static str, &'static str),
    /// path, target (an earlier path of the same layer)
    Hardlink(&'static str, &'static str),
    /// path, major, minor
    CharDev(&'static str, u32, u32),
    /// path, mode, xattr name, xattr value, bytes
    FileXattr(&'static str, u32, &'static str, &'static [u8], Vec<u8>),
}

/// A tar stream of `entries`.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            Entry::File(p, mode, uid, gid, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            Entry::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            Entry::CharDev(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            Entry::FileXattr(p, mode, k, v, data) => {
                let key = format!("SCHILY.xattr.{k}");
                b.append_pax_extensions([(key.as_str(), *v)]).unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// `sha256:HEX`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>())
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// Writes a blob into a layout; returns its descriptor JSON.
fn put(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let d = digest(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
}

/// The image config's `config` part.
pub struct Config {
    pub env: Vec<&'static str>,
    pub entrypoint: Option<Vec<&'static str>>,
    pub cmd: Option<Vec<&'static str>>,
    pub workdir: &'static str,
    pub user: &'static str,
    pub architecture: &'static str,
}

impl Default for Config {
    fn default() -> Self {
        Config { env: vec![], entrypoint: None, cmd: None, workdir: "", user: "", architecture: "amd64" }
    }
}

/// Writes image `tag` (layers as tar streams, bottom first) into the OCI
/// layout at `layout` (created if needed; other tags are kept). Returns the
/// manifest descriptor.
pub fn write_image(layout: &Path, tag: &str, layers: &[Vec<u8>], cfg: &Config) -> serde_json::Value {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(digest(l));
        layer_descs.push(put(layout, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(l)));
    }
    let config = serde_json::json!({
        "architecture": cfg.architecture,
        "os": "linux",
        "config": {
            "Env": cfg.env,
            "Entrypoint": cfg.entrypoint,
            "Cmd": cfg.cmd,
            "WorkingDir": cfg.workdir,
            "User": cfg.user,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_desc = put(layout, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    });
    let mdesc = put(layout, "application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
    add_to_index(layout, tag, mdesc.clone());
    mdesc
}

/// Names `desc` as `tag` in the layout's index.json.
pub fn add_to_index(layout: &Path, tag: &str, mut desc: serde_json::Value) {
    let path = layout.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let list = index["manifests"].as_array_mut().unwrap();
    list.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    list.push(desc);
    std::fs::write(&path, index.to_string()).unwrap();
}

/// An image index (a "manifest list") of `entries` (descriptor, os, arch),
/// stored as a blob and named `tag`.
pub fn write_index(layout: &Path, tag: &str, entries: &[(serde_json::Value, &str, &str)]) {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(d, os, arch)| {
            let mut d = d.clone();
            d["platform"] = serde_json::json!({"os": os, "architecture": arch});
            d
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let desc = put(layout, "application/vnd.oci.image.index.v1+json", index.to_string().as_bytes());
    add_to_index(layout, tag, desc);
}

/// The busybox user space every test image starts from: busybox-static and
/// a symlink per applet the tests use, /etc/passwd and /etc/group with a
/// non-root user in a supplementary group.
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut e = vec![
        Entry::Dir("bin", 0o755, 0, 0),
        Entry::File("bin/busybox", 0o755, 0, 0, busybox),
        Entry::Dir("etc", 0o755, 0, 0),
        Entry::File(
            "etc/passwd",
            0o644,
            0,
            0,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n".to_vec(),
        ),
        Entry::File("etc/group", 0o644, 0, 0, b"root:x:0:\napp:x:1000:\nextra:x:2000:app\n".to_vec()),
        Entry::Dir("home", 0o755, 0, 0),
        Entry::Dir("home/app", 0o750, 1000, 1000),
        Entry::Dir("root", 0o700, 0, 0),
        Entry::Dir("tmp", 0o1777, 0, 0),
    ];
    for a in [
        "sh", "ls", "cat", "echo", "id", "stat", "find", "env", "pwd", "touch", "kill", "hostname", "readlink", "sort",
        "mkdir", "rm", "sleep", "true", "false", "wc", "head", "grep", "xargs", "test",
    ] {
        e.push(Entry::Symlink(Box::leak(format!("bin/{a}").into_boxed_str()), "busybox"));
    }
    layer_tar(&e)
}

/// Runs a command; panics with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes what earlier test processes left under the temp dir
/// (`ember-test-*-PID` of PIDs that are gone).
pub fn sweep_stale() {
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("ember-test-").and_then(|r| r.rsplit('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh directory under the temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A registry (Debian's docker-registry) on 127.0.0.1 with a random port and
/// its own storage, stopped when dropped. `htpasswd`: a file for basic auth.
pub struct Registry {
    child: std::process::Child,
    pub addr: String,
    dir: PathBuf,
}

impl Registry {
    pub fn start(name: &str, htpasswd: Option<&Path>) -> Registry {
        let dir = temp_dir(&format!("registry-{name}"));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let auth = match htpasswd {
            Some(p) => format!("auth:\n  htpasswd:\n    realm: ember-test\n    path: {}\n", p.display()),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}/data\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("docker-registry (Debian package docker-registry)");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Registry { child, addr, dir }
    }

    /// skopeo copy of `src` (any skopeo transport) to `REGISTRY/name`.
    pub fn push(&self, src: &str, name: &str, extra: &[&str]) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .arg(src)
            .arg(format!("docker://{}/{name}", self.addr));
        run(&mut c);
    }

    /// Stops it now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its storage directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
