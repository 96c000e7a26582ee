//! What the guest's init runs for an image, computed on the host the way
//! `docker run` does, and how it reaches the guest.
//!
//! Docker's rules (`docker run` reference, "ENTRYPOINT" and "CMD"): the command
//! is Entrypoint + Cmd; a command given after IMAGE replaces Cmd and keeps the
//! Entrypoint; `--entrypoint` replaces the Entrypoint and drops the image's
//! Cmd. `-e`/`--env-file` override the image's Env by key (`-e KEY` alone
//! takes KEY from ember's own environment, or drops it if unset). PATH has
//! Docker's default when the image sets none.
//!
//! The result travels as a second, uncompressed newc cpio archive appended to
//! the initramfs (the kernel unpacks concatenated archives in order,
//! Documentation/driver-api/early-userspace/buffer-format.rst), as files
//! under `/ember/image/`: `argv` and `env` (NUL-separated), `workdir`, `user`,
//! `hostname`, `hosts`, `resolv.conf`. No length limit, no quoting, and no
//! kernel command line space used.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::ImageError;
use super::manifest::RunConfig;

/// Docker's PATH for images that set none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `docker run` options that shape the process.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `-e KEY[=VALUE]`.
    pub env: Vec<String>,
    /// `--env-file FILE`.
    pub env_files: Vec<PathBuf>,
    /// `-w DIR`.
    pub workdir: Option<String>,
    /// `-u USER[:GROUP]`.
    pub user: Option<String>,
    /// `--entrypoint CMD` (empty: none).
    pub entrypoint: Option<String>,
    /// `--hostname NAME`.
    pub hostname: Option<String>,
    /// `--name NAME`: also the hostname unless `--hostname` is given.
    pub name: Option<String>,
}

/// The process the guest's init starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// Entrypoint + Cmd.
    pub argv: Vec<Vec<u8>>,
    /// `KEY=VALUE`.
    pub env: Vec<Vec<u8>>,
    /// Absolute working directory.
    pub workdir: String,
    /// `USER[:GROUP]` as given (names or ids; empty: root).
    pub user: String,
    /// The guest's hostname.
    pub hostname: String,
}

fn set_env(env: &mut Vec<Vec<u8>>, entry: Vec<u8>) {
    let key_len = entry.iter().position(|&b| b == b'=').unwrap_or(entry.len());
    let key = entry[..key_len].to_vec();
    env.retain(|e| !(e.starts_with(&key) && e.get(key.len()) == Some(&b'=')));
    env.push(entry);
}

/// `KEY=VALUE` as given, or `KEY` filled in from our environment (None: unset).
fn env_entry(s: &str) -> Option<Vec<u8>> {
    if s.contains('=') {
        return Some(s.as_bytes().to_vec());
    }
    let v = std::env::var_os(s)?;
    let mut e = format!("{s}=").into_bytes();
    e.extend_from_slice(v.as_bytes());
    Some(e)
}

fn random_id() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The process for `ember run [OPTIONS] IMAGE [CMD...]`.
pub fn make_spec(cfg: &RunConfig, o: &RunOptions, cmd: &[OsString]) -> Result<RunSpec, ImageError> {
    let entrypoint: Vec<Vec<u8>> = match &o.entrypoint {
        Some(e) if e.is_empty() => vec![],
        Some(e) => vec![e.as_bytes().to_vec()],
        None => cfg.entrypoint.iter().flatten().map(|s| s.as_bytes().to_vec()).collect(),
    };
    let args: Vec<Vec<u8>> = if !cmd.is_empty() {
        cmd.iter().map(|s| s.as_bytes().to_vec()).collect()
    } else if o.entrypoint.is_some() {
        vec![]
    } else {
        cfg.cmd.iter().flatten().map(|s| s.as_bytes().to_vec()).collect()
    };
    let argv: Vec<Vec<u8>> = entrypoint.into_iter().chain(args).collect();
    if argv.is_empty() {
        return Err(ImageError::NoCommand);
    }
    if let Some(i) = argv.iter().position(|a| a.contains(&0)) {
        return Err(ImageError::Nul(format!("argument {i}")));
    }
    let mut env: Vec<Vec<u8>> = Vec::new();
    for e in cfg.env.iter().flatten() {
        set_env(&mut env, e.as_bytes().to_vec());
    }
    if !env.iter().any(|e| e.starts_with(b"PATH=")) {
        env.insert(0, DEFAULT_PATH.as_bytes().to_vec());
    }
    for f in &o.env_files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| ImageError::Io(format!("--env-file: cannot read {}", f.display()), e))?;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if let Some(e) = env_entry(line) {
                set_env(&mut env, e);
            }
        }
    }
    for e in &o.env {
        if e.is_empty() || e.starts_with('=') {
            return Err(ImageError::BadOption(format!("-e `{e}`: expected KEY[=VALUE]")));
        }
        if let Some(e) = env_entry(e) {
            set_env(&mut env, e);
        }
    }
    if env.iter().any(|e| e.contains(&0)) {
        return Err(ImageError::Nul("an environment variable".into()));
    }
    let workdir = o.workdir.clone().or_else(|| cfg.working_dir.clone().filter(|w| !w.is_empty())).unwrap_or("/".into());
    if !workdir.starts_with('/') {
        return Err(ImageError::BadOption(format!("the working directory `{workdir}` is not an absolute path")));
    }
    let hostname = o.hostname.clone().or_else(|| o.name.clone()).unwrap_or_else(random_id);
    if hostname.is_empty() || hostname.len() > 64 || hostname.contains(['/', '\0', '\n', ' ']) {
        return Err(ImageError::BadOption(format!("`{hostname}` is not a valid hostname")));
    }
    if !env.iter().any(|e| e.starts_with(b"HOSTNAME=")) {
        env.push(format!("HOSTNAME={hostname}").into_bytes());
    }
    let user = o.user.clone().or_else(|| cfg.user.clone()).unwrap_or_default();
    if user.contains(['\0', '\n']) {
        return Err(ImageError::BadOption(format!("`{user}` is not a valid user")));
    }
    Ok(RunSpec { argv, env, workdir, user, hostname })
}

/// One newc cpio entry (buffer-format.rst: "070701", 13 eight-digit hex
/// fields, the NUL-terminated name, then the data, each padded to 4 bytes).
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn joined(list: &[Vec<u8>]) -> Vec<u8> {
    list.iter().flat_map(|a| a.iter().copied().chain([0])).collect()
}

/// `/etc/resolv.conf` for the guest: the host's name servers, as Docker copies
/// them, without loopback ones (they would be the guest's own loopback).
fn resolv_conf() -> Vec<u8> {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut out = String::from("# written by ember from the host's /etc/resolv.conf\n");
    for l in host.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["nameserver", a, ..] if a.starts_with("127.") || *a == "::1" => {}
            ["nameserver" | "search" | "options" | "domain", ..] => out += &format!("{l}\n"),
            _ => {}
        }
    }
    out.into_bytes()
}

/// The cpio archive holding `spec` for the init (see the module docs).
pub fn spec_cpio(spec: &RunSpec) -> Vec<u8> {
    let hosts =
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n", spec.hostname);
    let mut out = Vec::new();
    cpio_entry(&mut out, 1, "ember", 0o040755, b"");
    cpio_entry(&mut out, 2, "ember/image", 0o040755, b"");
    let files: [(&str, Vec<u8>); 7] = [
        ("argv", joined(&spec.argv)),
        ("env", joined(&spec.env)),
        ("workdir", spec.workdir.as_bytes().to_vec()),
        ("user", spec.user.as_bytes().to_vec()),
        ("hostname", spec.hostname.as_bytes().to_vec()),
        ("hosts", hosts.into_bytes()),
        ("resolv.conf", resolv_conf()),
    ];
    for (i, (n, data)) in files.iter().enumerate() {
        cpio_entry(&mut out, 3 + i as u32, &format!("ember/image/{n}"), 0o100644, data);
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, b"");
    out
}

/// Writes `base` (the default guest's initramfs) followed by the spec archive
/// to `out`. The second archive starts 4-byte aligned, as the kernel's
/// unpacker requires (init/initramfs.c skips the zero padding between).
pub fn write_initrd(base: &Path, spec: &RunSpec, out: &Path) -> Result<(), ImageError> {
    let mut bytes =
        std::fs::read(base).map_err(|e| ImageError::Io(format!("cannot read the initramfs {}", base.display()), e))?;
    while !bytes.len().is_multiple_of(4) {
        bytes.push(0);
    }
    bytes.extend_from_slice(&spec_cpio(spec));
    std::fs::write(out, bytes).map_err(|e| ImageError::Io(format!("cannot write {}", out.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RunConfig {
        RunConfig {
            env: Some(vec!["A=1".into(), "PATH=/bin".into()]),
            entrypoint: Some(vec!["/ep".into()]),
            cmd: Some(vec!["c1".into(), "c2".into()]),
            working_dir: Some("/w".into()),
            user: Some("nobody".into()),
        }
    }

    fn s(v: &[Vec<u8>]) -> Vec<String> {
        v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()
    }

    #[test]
    fn docker_rules_for_the_command() {
        let o = RunOptions { hostname: Some("h".into()), ..Default::default() };
        let sp = make_spec(&cfg(), &o, &[]).unwrap();
        assert_eq!(s(&sp.argv), ["/ep", "c1", "c2"]);
        assert_eq!((sp.workdir.as_str(), sp.user.as_str()), ("/w", "nobody"));
        let sp = make_spec(&cfg(), &o, &["x".into()]).unwrap();
        assert_eq!(s(&sp.argv), ["/ep", "x"]);
        let o2 = RunOptions { entrypoint: Some("/other".into()), ..o.clone() };
        assert_eq!(s(&make_spec(&cfg(), &o2, &[]).unwrap().argv), ["/other"]);
        let o3 = RunOptions { entrypoint: Some(String::new()), ..o.clone() };
        assert_eq!(s(&make_spec(&cfg(), &o3, &["ls".into()]).unwrap().argv), ["ls"]);
        assert!(matches!(make_spec(&cfg(), &o3, &[]), Err(ImageError::NoCommand)));
    }

    #[test]
    fn environment_overrides_by_key() {
        let o =
            RunOptions { env: vec!["A=2".into(), "B=x=y".into()], hostname: Some("h".into()), ..Default::default() };
        let sp = make_spec(&cfg(), &o, &[]).unwrap();
        assert_eq!(s(&sp.env), ["PATH=/bin", "A=2", "B=x=y", "HOSTNAME=h"]);
        let sp = make_spec(&RunConfig::default(), &o, &["sh".into()]).unwrap();
        assert_eq!(s(&sp.env)[0], DEFAULT_PATH);
        let bad = RunOptions { env: vec!["=x".into()], ..Default::default() };
        assert!(make_spec(&cfg(), &bad, &[]).is_err());
        let rel = RunOptions { workdir: Some("rel".into()), ..Default::default() };
        assert!(make_spec(&cfg(), &rel, &[]).is_err());
    }

    #[test]
    fn the_cpio_is_newc_and_aligned() {
        let sp = make_spec(&cfg(), &RunOptions { hostname: Some("h".into()), ..Default::default() }, &[]).unwrap();
        let c = spec_cpio(&sp);
        assert!(c.starts_with(b"070701"));
        assert_eq!(c.len() % 4, 0);
        assert!(c.windows(10).any(|w| w == b"TRAILER!!!"));
        assert!(c.windows(10).any(|w| w == b"/ep\0c1\0c2\0"));
    }
}
