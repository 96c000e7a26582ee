//! The image store in `${XDG_CACHE_HOME:-~/.cache}/ember/images/`:
//!
//! ```text
//! blobs/sha256/HEX     manifests, configs and layers, named by their digest
//! images/HEX.json      one record per pulled name (HEX: sha256 of the name)
//! rootfs/HEX.sqfs      the root file system of an image, by config digest
//! tmp/                 downloads and builds in progress
//! ```
//!
//! Every write goes to a unique file in `tmp/` and is renamed into place only
//! once complete and verified, so a killed pull leaves nothing a later run
//! trusts, and two pulls of the same image at once both end with the same
//! files. `ember rmi` takes `.lock` exclusively to collect unreferenced blobs;
//! pulls and runs hold it shared.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ImageError;

/// What `ember images` lists: one pulled or imported name.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The name as the user gives it again (`127.0.0.1:5000/app:1`, `oci:/x:tag`).
    pub name: String,
    /// Digest of the manifest (what `NAME@DIGEST` pins).
    pub manifest_digest: String,
    /// Digest of the image config: the image's identity, and the rootfs cache key.
    pub config_digest: String,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    /// Bytes of config and layers as stored.
    pub size: u64,
    /// When it was pulled (seconds since the epoch).
    pub pulled: u64,
}

/// sha256 of bytes, as `sha256:HEX`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A reader that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    /// Bytes read so far.
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }
    /// `sha256:HEX` of everything read.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex(&self.hasher.clone().finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The store.
pub struct Store {
    root: PathBuf,
    _lock: File,
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let what = format!("{what} {}", path.display());
    move |e| ImageError::Io(what, e)
}

fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}.{}.{nanos}", std::process::id())
}

impl Store {
    /// The default location: `$EMBER_IMAGE_STORE`, else `images/` in ember's cache.
    pub fn default_root() -> PathBuf {
        match std::env::var_os("EMBER_IMAGE_STORE").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => crate::guest::cache_dir().join("images"),
        }
    }

    /// Opens (creating) the store; `exclusive` for garbage collection. A store
    /// on a read-only file system (the Linux lane's view of the host) opens
    /// for reading: what is in it can run, nothing can be added.
    pub fn open(root: &Path, exclusive: bool) -> Result<Store, ImageError> {
        for d in ["blobs/sha256", "images", "rootfs", "tmp"] {
            if let Err(e) = fs::create_dir_all(root.join(d))
                && !(e.raw_os_error() == Some(libc::EROFS) && root.join(d).is_dir())
            {
                return Err(ImageError::Io(format!("cannot create {}", root.join(d).display()), e));
            }
        }
        let lock_path = root.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .or_else(|_| File::open(&lock_path))
            .map_err(io_err("cannot open", &lock_path))?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), op) } != 0 {
            return Err(ImageError::Io(format!("cannot lock {}", lock_path.display()), io::Error::last_os_error()));
        }
        Ok(Store { root: root.to_path_buf(), _lock: lock })
    }

    /// Where a blob lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_file()
    }

    /// A fresh path in `tmp/` for work in progress.
    pub fn temp_path(&self, prefix: &str) -> PathBuf {
        self.root.join("tmp").join(unique_name(prefix))
    }

    /// Copies `reader` into the store as blob `expected`, verifying its digest
    /// (and size, when known) before it becomes visible. Returns its size.
    pub fn put_blob(&self, expected: &str, reader: impl Read, size: Option<u64>) -> Result<u64, ImageError> {
        if !super::reference::valid_digest(expected) {
            return Err(ImageError::Unsupported(format!("digest `{expected}` (only sha256 is supported)")));
        }
        let tmp = self.temp_path("blob");
        let mut out = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
        let mut hr = HashingReader::new(reader);
        let copied = io::copy(&mut hr, &mut out).and_then(|_| out.sync_data());
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(ImageError::Io(format!("cannot store blob {expected}"), e));
        }
        let got = hr.digest();
        if got != expected || size.is_some_and(|s| s != hr.count) {
            let _ = fs::remove_file(&tmp);
            return Err(ImageError::DigestMismatch { expected: expected.to_string(), got, bytes: hr.count });
        }
        let dst = self.blob_path(expected);
        fs::rename(&tmp, &dst).map_err(io_err("cannot store", &dst))?;
        Ok(hr.count)
    }

    /// Stores bytes whose digest is `expected` (None: whatever they hash to).
    pub fn put_bytes(&self, expected: Option<&str>, bytes: &[u8]) -> Result<String, ImageError> {
        let d = expected.map(str::to_string).unwrap_or_else(|| digest_of(bytes));
        if !self.has_blob(&d) {
            self.put_blob(&d, bytes, Some(bytes.len() as u64))?;
        } else if digest_of(bytes) != d {
            return Err(ImageError::DigestMismatch { expected: d, got: digest_of(bytes), bytes: bytes.len() as u64 });
        }
        Ok(d)
    }

    /// Reads a whole (small) blob.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(digest);
        fs::read(&p).map_err(io_err("cannot read", &p))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("images").join(format!("{}.json", &digest_of(name.as_bytes())[7..]))
    }

    /// Saves (or replaces) the record of a name.
    pub fn save_record(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let tmp = self.temp_path("record");
        let json = serde_json::to_vec_pretty(rec).expect("a record serializes");
        fs::write(&tmp, json).map_err(io_err("cannot write", &tmp))?;
        let dst = self.record_path(&rec.name);
        fs::rename(&tmp, &dst).map_err(io_err("cannot write", &dst))
    }

    /// The record of a name, if pulled.
    pub fn find(&self, name: &str) -> Option<ImageRecord> {
        let bytes = fs::read(self.record_path(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every record, newest first.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut out: Vec<ImageRecord> = fs::read_dir(self.root.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| b.pulled.cmp(&a.pulled).then(a.name.cmp(&b.name)));
        out
    }

    /// Forgets a name, then deletes every blob and root file system that no
    /// remaining record uses. Needs the store opened exclusively.
    pub fn remove(&self, name: &str) -> Result<ImageRecord, ImageError> {
        let rec = self.find(name).ok_or_else(|| ImageError::NotPulled(name.to_string()))?;
        let p = self.record_path(name);
        fs::remove_file(&p).map_err(io_err("cannot remove", &p))?;
        let keep: std::collections::HashSet<String> = self
            .list()
            .into_iter()
            .flat_map(|r| {
                let mut v = r.layers.clone();
                v.push(r.config_digest.clone());
                v.push(r.manifest_digest.clone());
                v
            })
            .map(|d| d.trim_start_matches("sha256:").to_string())
            .collect();
        for dir in ["blobs/sha256", "rootfs"] {
            for e in fs::read_dir(self.root.join(dir)).into_iter().flatten().flatten() {
                let file = e.file_name().to_string_lossy().to_string();
                let hex = file.trim_end_matches(".sqfs").trim_end_matches(".lock");
                if !keep.contains(hex) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        for e in fs::read_dir(self.root.join("tmp")).into_iter().flatten().flatten() {
            let _ = fs::remove_file(e.path()).or_else(|_| fs::remove_dir_all(e.path()));
        }
        Ok(rec)
    }

    /// Where an image's root file system image is cached.
    pub fn rootfs_path(&self, config_digest: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{}.sqfs", config_digest.trim_start_matches("sha256:")))
    }

    /// Now, for records.
    pub fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_and_records_round_trip() {
        let dir = std::env::temp_dir().join(unique_name("ember-store-test"));
        let s = Store::open(&dir, false).unwrap();
        let d = digest_of(b"hello");
        assert!(matches!(s.put_blob(&d, &b"hellO"[..], None), Err(ImageError::DigestMismatch { .. })));
        assert!(!s.has_blob(&d));
        assert_eq!(s.put_blob(&d, &b"hello"[..], Some(5)).unwrap(), 5);
        assert_eq!(s.read_blob(&d).unwrap(), b"hello");
        let rec = ImageRecord {
            name: "x".into(),
            manifest_digest: d.clone(),
            config_digest: d.clone(),
            layers: vec![],
            size: 5,
            pulled: 1,
        };
        s.save_record(&rec).unwrap();
        assert_eq!(s.find("x"), Some(rec.clone()));
        assert_eq!(s.list(), vec![rec]);
        drop(s);
        let s = Store::open(&dir, true).unwrap();
        s.remove("x").unwrap();
        assert!(!s.has_blob(&d));
        assert!(matches!(s.remove("x"), Err(ImageError::NotPulled(_))));
        let _ = fs::remove_dir_all(&dir);
    }
}
