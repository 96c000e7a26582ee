//! Container images as VMs: `ember run IMAGE [CMD...]`, `ember pull`,
//! `ember images`, `ember rmi`.
//!
//! The path of one image run, through four files:
//! - [`reference`]: what the user typed -> a registry, an archive or a directory.
//! - [`registry`] / [`archive`]: manifest, config and layers into the
//!   [`store`], each blob checked against its digest.
//! - [`rootfs`]: the layers flattened (whiteouts applied) into a read-only
//!   squashfs disk, cached by the image's config digest.
//! - [`spec`]: Entrypoint/Cmd/Env/WorkingDir/User with `docker run`'s
//!   overrides, packed as a cpio the guest's init reads.
//!
//! The VM itself is the default guest's kernel and initramfs with that disk
//! as /dev/vda; the init (guest-kernels/init) mounts it under an overlay whose
//! upper layer is a tmpfs, so a run never changes the image and nothing one
//! run writes is seen by the next, and `ember-exec` (guest-kernels/ember-exec.c)
//! enters it as the image's user.

pub mod archive;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod spec;
pub mod store;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use thiserror::Error;

use self::reference::ImageRef;
use self::store::{ImageRecord, Store};

/// Errors getting or preparing an image.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A bad reference.
    #[error("invalid image reference: {0}")]
    Reference(#[from] reference::ReferenceError),
    /// No such image or tag.
    #[error("image not found: {0}")]
    NotFound(String),
    /// `ember rmi` of a name that is not there.
    #[error("no image `{0}` in the store (`ember images` lists them)")]
    NotPulled(String),
    /// Network or protocol trouble.
    #[error("registry {registry} {what}")]
    Registry {
        /// host[:port]
        registry: String,
        /// What went wrong.
        what: String,
    },
    /// Credentials missing or refused.
    #[error(
        "registry {registry} refused access{}: log in with `docker login {registry}` (ember reads ~/.docker/config.json)",
        if *had_credentials { " with the credentials in ~/.docker/config.json" } else { "" }
    )]
    AuthRefused {
        /// host[:port]
        registry: String,
        /// Whether credentials were offered.
        had_credentials: bool,
    },
    /// A blob whose bytes do not hash to its name.
    #[error("blob {expected} is corrupt: its {bytes} bytes hash to {got}; nothing of it was kept")]
    DigestMismatch {
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        got: String,
        /// How many bytes were read.
        bytes: u64,
    },
    /// An index with no linux/amd64 entry.
    #[error("{image} has no linux/amd64 image (it has: {have})")]
    NoPlatform {
        /// The image.
        image: String,
        /// The platforms it offers.
        have: String,
    },
    /// Malformed JSON.
    #[error("malformed {0}")]
    BadJson(&'static str, #[source] serde_json::Error),
    /// A malformed archive.
    #[error("{0} is not a readable image archive: {1}")]
    BadArchive(String, String),
    /// A malformed or hostile layer.
    #[error("layer {0} is unusable: {1}")]
    BadLayer(String, String),
    /// Something ember does not do.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The image's architecture.
    #[error("the image is for {0}; ember runs linux/amd64 images")]
    WrongPlatform(String),
    /// No Entrypoint, no Cmd, no command given.
    #[error("the image has no Entrypoint or Cmd: give a command after the image name")]
    NoCommand,
    /// A NUL byte where none can go.
    #[error("{0} contains a NUL byte")]
    Nul(String),
    /// A bad `docker run` option.
    #[error("{0}")]
    BadOption(String),
    /// A host program is missing.
    #[error("`{0}` is not installed: apt-get install {1}")]
    MissingTool(&'static str, &'static str),
    /// Building the root file system failed.
    #[error("building the image's root file system failed: {0}")]
    Build(String),
    /// Host I/O.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// Download progress: bytes and rate per blob, on a terminal only.
pub struct Progress {
    show: bool,
}

impl Progress {
    /// Shown when stderr is a terminal.
    pub fn auto() -> Progress {
        Progress { show: std::io::stderr().is_terminal() }
    }

    /// Wraps a blob download.
    pub fn wrap<R: Read + 'static>(&self, name: &str, size: u64, r: R) -> Box<dyn Read> {
        if !self.show {
            return Box::new(r);
        }
        let pb = indicatif::ProgressBar::new(size);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} {wide_bar}",
        ) {
            pb.set_style(style);
        }
        pb.set_message(format!("ember: pulling {name}"));
        Box::new(pb.wrap_read(r))
    }
}

/// What a run needs of an image.
pub struct Prepared {
    /// The image's record (None for `dir:`).
    pub record: Option<ImageRecord>,
    /// The squashfs root.
    pub rootfs: PathBuf,
    /// Whether `rootfs` is this run's own (a `dir:` build) to delete afterwards.
    pub temporary: bool,
    /// The image's Entrypoint/Cmd/Env/...
    pub config: manifest::RunConfig,
}

/// Options of a pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Registries spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Ask the registry again even when the name is in the store.
    pub refresh: bool,
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A stamp of a local archive or layout (size and mtime of its index), so a
/// re-run of an unchanged archive is served from the store.
fn stamp(p: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let f = if p.is_dir() { p.join("index.json") } else { p.to_path_buf() };
    let m = std::fs::metadata(f).ok()?;
    Some(format!("{}:{}.{}", m.size(), m.mtime(), m.mtime_nsec()))
}

/// Gets `r` into the store (from the store itself when it is there already,
/// unless `refresh`), under its canonical name.
pub fn fetch(store: &Store, r: &ImageRef, o: &PullOptions) -> Result<ImageRecord, ImageError> {
    let progress = Progress::auto();
    let (name, local) = match r {
        ImageRef::Registry(reg) => (reg.to_string(), None),
        ImageRef::OciDir(p, t) => (ImageRef::OciDir(absolute(p), t.clone()).to_string(), Some(p)),
        ImageRef::OciArchive(p, t) => (ImageRef::OciArchive(absolute(p), t.clone()).to_string(), Some(p)),
        ImageRef::DockerArchive(p, t) => (ImageRef::DockerArchive(absolute(p), t.clone()).to_string(), Some(p)),
        ImageRef::Dir(_) => return Err(ImageError::Unsupported("pulling a dir: tree (run it directly)".into())),
    };
    let stamp_name = local.and_then(|p| stamp(p)).map(|s| format!("{name}#{s}"));
    if !o.refresh
        && let Some(rec) = store.find(stamp_name.as_deref().unwrap_or(&name))
        && rec.layers.iter().chain([&rec.config_digest]).all(|d| store.has_blob(d))
    {
        return Ok(ImageRecord { name, ..rec });
    }
    let mut rec = match r {
        ImageRef::Registry(reg) => registry::pull(store, reg, &o.insecure, &progress)?,
        ImageRef::OciDir(p, t) => archive::import_oci_dir(store, p, t.as_deref(), &name)?,
        ImageRef::OciArchive(p, t) => archive::import_oci_archive(store, p, t.as_deref(), &name)?,
        ImageRef::DockerArchive(p, t) => archive::import_docker_archive(store, p, t.as_deref(), &name)?,
        ImageRef::Dir(_) => unreachable!("refused above"),
    };
    store.save_record(&rec)?;
    if let Some(s) = stamp_name {
        // The stamped name serves later runs; the plain one is what `ember images` shows.
        store.save_record(&ImageRecord { name: s, ..rec.clone() })?;
    }
    rec.name = name;
    Ok(rec)
}

/// The image config of a record, checked for linux/amd64.
pub fn config_of(store: &Store, rec: &ImageRecord) -> Result<manifest::ImageConfig, ImageError> {
    let bytes = store.read_blob(&rec.config_digest)?;
    let cfg: manifest::ImageConfig =
        serde_json::from_slice(&bytes).map_err(|e| ImageError::BadJson("image config", e))?;
    if (!cfg.architecture.is_empty() && cfg.architecture != "amd64") || (!cfg.os.is_empty() && cfg.os != "linux") {
        return Err(ImageError::WrongPlatform(format!("{}/{}", cfg.os, cfg.architecture)));
    }
    Ok(cfg)
}

/// Everything an image run needs on the host: the image in the store and its
/// root file system built. `scratch`: where a `dir:` image's disk goes.
pub fn prepare(reference: &str, o: &PullOptions, scratch: &std::path::Path) -> Result<Prepared, ImageError> {
    let r = reference::parse(reference)?;
    if let ImageRef::Dir(p) = &r {
        let out = scratch.join("rootfs.sqfs");
        rootfs::build_from_dir(p, &out)?;
        return Ok(Prepared { record: None, rootfs: out, temporary: true, config: Default::default() });
    }
    let store = Store::open(&Store::default_root(), false)?;
    let rec = fetch(&store, &r, o)?;
    let cfg = config_of(&store, &rec)?;
    let rootfs = rootfs::build(&store, &rec)?;
    Ok(Prepared { record: Some(rec), rootfs, temporary: false, config: cfg.config.unwrap_or_default() })
}

/// `ember images`: a table of the store.
pub fn list_table() -> Result<String, ImageError> {
    let store = Store::open(&Store::default_root(), false)?;
    let mut out = format!(
        "{:<50} {:<20} {:<19} {:<12} {:>10}  {}\n",
        "REPOSITORY", "TAG", "DIGEST", "IMAGE ID", "SIZE", "PULLED"
    );
    for r in store.list().into_iter().filter(|r| !r.name.contains('#')) {
        let (repo, tag) = split_name(&r.name);
        let age = Store::now().saturating_sub(r.pulled);
        let ago = match age {
            0..=1 => "just now".to_string(),
            2..=119 => format!("{age} seconds ago"),
            120..=7199 => format!("{} minutes ago", age / 60),
            7200..=172_799 => format!("{} hours ago", age / 3600),
            _ => format!("{} days ago", age / 86400),
        };
        let id: String = r.config_digest.trim_start_matches("sha256:").chars().take(12).collect();
        let digest: String = r.manifest_digest.chars().take(19).collect();
        out += &format!("{repo:<50} {tag:<20} {digest:<19} {id:<12} {:>10}  {ago}\n", human(r.size));
    }
    Ok(out)
}

fn split_name(n: &str) -> (String, String) {
    if let Some((repo, d)) = n.split_once('@') {
        return (repo.to_string(), format!("@{}", &d[..d.len().min(19)]));
    }
    let slash = n.rfind('/').map_or(0, |i| i + 1);
    match n[slash..].rfind(':') {
        Some(i) => (n[..slash + i].to_string(), n[slash + i + 1..].to_string()),
        None => (n.to_string(), "<none>".to_string()),
    }
}

fn human(b: u64) -> String {
    match b {
        0..=1023 => format!("{b} B"),
        1024..=1_048_575 => format!("{:.1} KiB", b as f64 / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", b as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", b as f64 / 1_073_741_824.0),
    }
}

/// `ember pull`: fetch (always asking the registry again) and build the root file system.
pub fn pull(reference: &str, o: &PullOptions) -> Result<ImageRecord, ImageError> {
    let r = reference::parse(reference)?;
    let store = Store::open(&Store::default_root(), false)?;
    let rec = fetch(&store, &r, &PullOptions { refresh: true, ..o.clone() })?;
    config_of(&store, &rec)?;
    rootfs::build(&store, &rec)?;
    Ok(rec)
}

/// `ember rmi`: forget a name and delete what no other image uses.
pub fn remove(reference: &str) -> Result<ImageRecord, ImageError> {
    let name = match reference::parse(reference)? {
        ImageRef::Registry(r) => r.to_string(),
        ImageRef::OciDir(p, t) => ImageRef::OciDir(absolute(&p), t).to_string(),
        ImageRef::OciArchive(p, t) => ImageRef::OciArchive(absolute(&p), t).to_string(),
        ImageRef::DockerArchive(p, t) => ImageRef::DockerArchive(absolute(&p), t).to_string(),
        ImageRef::Dir(_) => return Err(ImageError::NotPulled(reference.to_string())),
    };
    let store = Store::open(&Store::default_root(), true)?;
    // Stamped twins of a local archive's name go with it.
    for r in store.list() {
        if r.name.starts_with(&format!("{name}#")) {
            store.remove(&r.name)?;
        }
    }
    store.remove(&name)
}
