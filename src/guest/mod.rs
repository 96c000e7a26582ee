//! The default guest: ember's own microVM Linux kernel and initramfs, built
//! from Debian packages by the scripts in `guest-kernels/` and cached in
//! `${XDG_CACHE_HOME:-~/.cache}/ember/`.
//!
//! The scripts are compiled into the binary, so `ember run` works from any
//! directory: they are written to a content-addressed folder in the cache and
//! run from there. `build.sh` prints `KEY=value` lines on stdout (progress goes
//! to stderr, i.e. straight to the user); ember remembers the last answer in
//! `build.sh.env` beside them, so a cached boot costs no script at all.
//!
//! Also here: how a command given after `--` reaches the guest's init
//! (`ember.argv=`, see guest-kernels/init), and in [`init`] the rest of the
//! init's protocol: the lines it prints when it is ready or at its snapshot point.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

pub mod init;

/// The guest-kernels/ files the build needs, embedded at compile time.
const SCRIPTS: &[(&str, &str)] = &[
    ("build.sh", include_str!("../../guest-kernels/build.sh")),
    ("initramfs.sh", include_str!("../../guest-kernels/initramfs.sh")),
    ("rootfs.sh", include_str!("../../guest-kernels/rootfs.sh")),
    ("tools.sh", include_str!("../../guest-kernels/tools.sh")),
    ("init", include_str!("../../guest-kernels/init")),
    ("microvm.config", include_str!("../../guest-kernels/microvm.config")),
    ("lib.sh", include_str!("../../guest-kernels/lib.sh")),
    ("freestanding.h", include_str!("../../guest-kernels/freestanding.h")),
    ("ember-exit.c", include_str!("../../guest-kernels/ember-exit.c")),
    ("ember-getpid.c", include_str!("../../guest-kernels/ember-getpid.c")),
    ("ember-mounts.c", include_str!("../../guest-kernels/ember-mounts.c")),
    ("ember-session.c", include_str!("../../guest-kernels/ember-session.c")),
    ("ember-exec.c", include_str!("../../guest-kernels/ember-exec.c")),
];

/// The kernel command line of a Linux guest unless the user gives one: console
/// on COM1 only, reboot through the i8042 (ember exits 0), a panic resets at
/// once (ember reports a crash), no boot chatter, and no legacy BSD ptys. The
/// default kernel has CONFIG_LEGACY_PTY_COUNT=256, like Debian's: without
/// `pty.legacy_count=0` it makes 512 tty devices at boot (drivers/tty/pty.c),
/// 0.26 s of a 1.1 s boot in the nested lane (initcall_debug: pty_init); the
/// Unix 98 ptys of /dev/pts are unaffected.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 quiet pty.legacy_count=0";

/// [`DEFAULT_CMDLINE`] followed by `words` (the init's `ember.*` parameters): what the benches boot.
pub fn default_cmdline_with(words: &str) -> String {
    format!("{DEFAULT_CMDLINE} {words}")
}

/// [`DEFAULT_CMDLINE`] plus `ember.debug` ([`init::DEBUG_PARAM`]), so the init prints its ready marker
/// even under `quiet`: the command line of the benches that time a boot to the init.
pub fn debug_cmdline() -> String {
    default_cmdline_with(init::DEBUG_PARAM)
}

/// Source of `ember-getpid`, the getpid(2) loop in the default guest's
/// initramfs; `ember bench` builds the same program for the host and containers.
pub const GETPID_SOURCE: &str = include_str!("../../guest-kernels/ember-getpid.c");
/// The header `ember-getpid.c` includes (raw system calls, the ELF entry point).
pub const FREESTANDING_HEADER: &str = include_str!("../../guest-kernels/freestanding.h");

/// Errors building or finding the default guest.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The cache directory cannot be written.
    #[error("cannot write the guest build scripts to {path}")]
    Scripts {
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// bash could not be started.
    #[error("cannot run bash to build the default guest")]
    Spawn(#[source] std::io::Error),
    /// The build failed.
    #[error("building the default guest failed (exit status {0}); its log is named above")]
    Build(i32),
    /// The build printed no artifact paths.
    #[error("the guest build did not report {0}")]
    Missing(&'static str),
    /// An argument cannot be passed (NUL byte).
    #[error("argument {0} of the command contains a NUL byte")]
    NulInArgument(usize),
}

/// Paths of a built default guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArtifacts {
    /// Compressed kernel (64-bit boot protocol).
    pub bzimage: PathBuf,
    /// Uncompressed ELF kernel (PVH entry).
    pub vmlinux: PathBuf,
    /// busybox + ember's init.
    pub initramfs: PathBuf,
    /// `make kernelrelease` of the kernel.
    pub kernel_release: String,
}

/// ember's cache root.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x).join("ember"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/ember"),
    }
}

fn scripts_hash() -> u64 {
    let mut h = DefaultHasher::new();
    SCRIPTS.hash(&mut h);
    h.finish()
}

fn parse_artifacts(text: &str) -> Result<GuestArtifacts, GuestError> {
    let get = |key: &'static str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .next_back()
            .map(str::to_string)
            .ok_or(GuestError::Missing(key))
    };
    Ok(GuestArtifacts {
        bzimage: get("EMBER_BZIMAGE")?.into(),
        vmlinux: get("EMBER_VMLINUX")?.into(),
        initramfs: get("EMBER_INITRAMFS")?.into(),
        kernel_release: get("EMBER_KERNEL_RELEASE")?,
    })
}

fn exists(a: &GuestArtifacts) -> bool {
    [&a.bzimage, &a.vmlinux, &a.initramfs].iter().all(|p| p.is_file())
}

/// Runs one of the embedded scripts (`script`), or reuses its last answer:
/// its stdout is remembered in `<script>.env` beside the scripts and reused
/// while `valid` accepts it. Progress goes to the user's stderr.
fn cached_script<T>(
    script: &str,
    force: bool,
    parse: impl Fn(&str) -> Result<T, GuestError>,
    valid: impl Fn(&T) -> bool,
) -> Result<T, GuestError> {
    let dir = cache_dir().join(format!("scripts-{:016x}", scripts_hash()));
    let remembered = dir.join(format!("{script}.env"));
    if !force
        && let Some(t) = std::fs::read_to_string(&remembered).ok().and_then(|text| parse(&text).ok())
        && valid(&t)
    {
        return Ok(t);
    }
    write_scripts(&dir)?;
    eprintln!("ember: running {script} (results cached in {})", cache_dir().display());
    let out = Command::new("bash")
        .arg(dir.join(script))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(GuestError::Spawn)?;
    if !out.status.success() {
        return Err(GuestError::Build(out.status.code().unwrap_or(-1)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let t = parse(&text)?;
    let _ = std::fs::write(&remembered, text.as_bytes());
    Ok(t)
}

/// The default guest, from the cache when it is there, built otherwise
/// (progress on stderr). `force` rebuilds the answer by running the script.
pub fn default_guest(force: bool) -> Result<GuestArtifacts, GuestError> {
    cached_script("build.sh", force, parse_artifacts, exists)
}

/// The default guest's root file system as an ext4 image (guest-kernels/rootfs.sh),
/// from the cache when it is there, built otherwise (progress on stderr).
/// This is the cached pristine copy: boot a copy of it when it may be written.
pub fn default_rootfs() -> Result<PathBuf, GuestError> {
    let parse = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("EMBER_ROOTFS="))
            .next_back()
            .map(PathBuf::from)
            .ok_or(GuestError::Missing("EMBER_ROOTFS"))
    };
    cached_script("rootfs.sh", false, parse, |p: &PathBuf| p.is_file())
}

/// The benchmark tools image (guest-kernels/tools.sh): an ext4 file system with fio and iperf3
/// and the libraries they load, for a guest to mount read-only as an extra disk
/// (`--disk TOOLS,ro`, then `mount -o ro /dev/vdX /mnt && /mnt/bin/fio ...`). From the cache when
/// it is there, built otherwise (progress on stderr). `/mnt/bin/*` are wrappers that run the
/// binaries through the image's own dynamic loader, so they work wherever it is mounted.
/// The same files, unpacked, are in [`tools_tree`] (for containers and the host).
pub fn default_tools() -> Result<PathBuf, GuestError> {
    let parse = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("EMBER_TOOLS="))
            .next_back()
            .map(PathBuf::from)
            .ok_or(GuestError::Missing("EMBER_TOOLS"))
    };
    cached_script("tools.sh", false, parse, |p: &PathBuf| p.is_file() && tools_tree(p).join("bin/iperf3").is_file())
}

/// The directory tree the tools image `image` was made from (`bin/fio`, `bin/iperf3`, `lib/`, ...),
/// kept beside it: bind-mount it into a container, or run its `bin/` on the host.
pub fn tools_tree(image: &Path) -> PathBuf {
    image.parent().unwrap_or(Path::new("/")).join("tree")
}

fn write_scripts(dir: &Path) -> Result<(), GuestError> {
    let err = |source| GuestError::Scripts { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for (name, text) in SCRIPTS {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(*text) {
            continue;
        }
        // Written aside and renamed into place: another process (or thread) may be running this
        // very script, and bash reads a script as it goes; it keeps the old, complete file.
        let seq = TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{seq}", std::process::id()));
        std::fs::write(&tmp, text).map_err(err)?;
        // The scripts run each other directly (build.sh -> initramfs.sh).
        if name.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
    }
    Ok(())
}

/// Encodes a command for the guest's init: `ember.argv=x<hex>,x<hex>,...`
/// (one field per argument: `x` + lowercase hex of its bytes; see guest-kernels/init).
pub fn encode_argv(args: &[impl AsRef<[u8]>]) -> Result<String, GuestError> {
    let mut fields = Vec::with_capacity(args.len());
    for (i, a) in args.iter().enumerate() {
        let a = a.as_ref();
        if a.contains(&0) {
            return Err(GuestError::NulInArgument(i));
        }
        let mut f = String::with_capacity(1 + 2 * a.len());
        f.push('x');
        for b in a {
            f += &format!("{b:02x}");
        }
        fields.push(f);
    }
    Ok(format!("ember.argv={}", fields.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_encoding_matches_the_init() {
        assert_eq!(encode_argv(&["echo", "hi", ""]).unwrap(), "ember.argv=x6563686f,x6869,x");
        assert_eq!(encode_argv(&["a b'\"$\\"]).unwrap(), "ember.argv=x6120622722245c");
        assert!(encode_argv(&[b"a\0b".as_slice()]).is_err());
    }

    #[test]
    fn artifacts_parse() {
        let t =
            "noise\nEMBER_BZIMAGE=/c/bz\nEMBER_VMLINUX=/c/vm\nEMBER_INITRAMFS=/c/i.gz\nEMBER_KERNEL_RELEASE=6.1.1\n";
        let a = parse_artifacts(t).unwrap();
        assert_eq!(a.bzimage, PathBuf::from("/c/bz"));
        assert_eq!(a.kernel_release, "6.1.1");
        assert!(matches!(parse_artifacts("EMBER_BZIMAGE=x"), Err(GuestError::Missing(_))));
    }
}
