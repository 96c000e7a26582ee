//! Images from files: an OCI image layout (image-spec `image-layout.md`:
//! `index.json` + `blobs/sha256/`), the same in a tar (`oci-archive:`), and
//! `docker save`'s archive (`manifest.json` listing a config file and layer
//! tars). Every blob is copied into the store through the digest check, so a
//! corrupted archive is refused before anything of it is used.

use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::ImageError;
use super::manifest::{self, Document, REF_NAME};
use super::store::{HashingReader, ImageRecord, Store};

/// Opens a file of an archive or layout: regular files only, so a FIFO
/// planted in a layout cannot hang ember (see `host_file`).
fn open(p: &Path) -> Result<File, ImageError> {
    crate::host_file::open_image(p, false, crate::host_file::Allow::RegularFile)
        .map_err(|e| ImageError::Io(format!("cannot open {}", p.display()), e))
}

/// Imports image `tag` (None: the only one) of the OCI layout at `dir`.
pub fn import_oci_dir(store: &Store, dir: &Path, tag: Option<&str>, name: &str) -> Result<ImageRecord, ImageError> {
    let blob = |d: &str| dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let index_path = dir.join("index.json");
    let mut index_bytes = Vec::new();
    crate::host_file::open_image(&index_path, false, crate::host_file::Allow::RegularFile)
        .and_then(|mut f| io::Read::read_to_end(&mut f, &mut index_bytes))
        .map_err(|e| ImageError::Io(format!("{} is not an OCI image layout (no index.json)", dir.display()), e))?;
    let Document::Index(index) = manifest::parse_document(&index_bytes, Some(manifest::OCI_INDEX))? else {
        return Err(ImageError::Unsupported("an index.json that is not an index".into()));
    };
    let names: Vec<&str> =
        index.manifests.iter().filter_map(|d| d.annotations.get(REF_NAME).map(|s| s.as_str())).collect();
    let top = match tag {
        Some(t) => index.manifests.iter().find(|d| d.annotations.get(REF_NAME).is_some_and(|n| n == t)),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => None,
    }
    .ok_or_else(|| ImageError::NotFound(format!("{name}: the layout holds {}", names.join(", "))))?
    .clone();
    let copy = |d: &manifest::Descriptor| -> Result<u64, ImageError> {
        if !store.has_blob(&d.digest) {
            store.put_blob(&d.digest, open(&blob(&d.digest))?, Some(d.size).filter(|s| *s > 0))?;
        }
        Ok(d.size)
    };
    copy(&top)?;
    let mut desc = top;
    let m = loop {
        match manifest::parse_document(&store.read_blob(&desc.digest)?, Some(&desc.media_type))? {
            Document::Manifest(m) => break m,
            Document::Index(i) => {
                desc = manifest::pick_platform(&i, name)?.clone();
                copy(&desc)?;
            }
        }
    };
    let mut size = copy(&m.config)?;
    for l in &m.layers {
        size += copy(l)?;
    }
    Ok(ImageRecord {
        name: name.to_string(),
        manifest_digest: desc.digest,
        config_digest: m.config.digest.clone(),
        layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
        size,
        pulled: Store::now(),
    })
}

/// A relative path inside an archive with no `..`, or None.
fn safe_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Unpacks the regular files of a tar into `into` (a fresh directory).
fn unpack_files(archive: &Path, into: &Path) -> Result<(), ImageError> {
    let bad = |e: io::Error| ImageError::BadArchive(archive.display().to_string(), e.to_string());
    let mut tar = tar::Archive::new(open(archive)?);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let Some(rel) = safe_relative(&path) else {
            return Err(ImageError::BadArchive(
                archive.display().to_string(),
                format!("unsafe path {}", path.display()),
            ));
        };
        if entry.header().entry_type().is_file() {
            let dst = into.join(&rel);
            if let Some(p) = dst.parent() {
                fs::create_dir_all(p).map_err(|e| ImageError::Io(format!("cannot create {}", p.display()), e))?;
            }
            let mut out =
                File::create(&dst).map_err(|e| ImageError::Io(format!("cannot create {}", dst.display()), e))?;
            let want = entry.header().size().unwrap_or(0);
            let n = io::copy(&mut entry, &mut out).map_err(bad)?;
            if n != want {
                return Err(ImageError::BadArchive(archive.display().to_string(), "truncated".into()));
            }
        }
    }
    Ok(())
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Imports from an `oci-archive:` tar.
pub fn import_oci_archive(
    store: &Store,
    file: &Path,
    tag: Option<&str>,
    name: &str,
) -> Result<ImageRecord, ImageError> {
    let tmp = TempDir(store.temp_path("oci-archive"));
    unpack_files(file, &tmp.0)?;
    import_oci_dir(store, &tmp.0, tag, name)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Imports from a `docker save` archive: the config file's and each layer
/// tar's sha256 become their digests (a docker-archive carries no manifest of
/// digests; the config's `rootfs.diff_ids` are those same layer digests).
pub fn import_docker_archive(
    store: &Store,
    file: &Path,
    tag: Option<&str>,
    name: &str,
) -> Result<ImageRecord, ImageError> {
    let tmp = TempDir(store.temp_path("docker-archive"));
    unpack_files(file, &tmp.0)?;
    let mpath = tmp.0.join("manifest.json");
    let bytes = fs::read(&mpath).map_err(|_| {
        ImageError::BadArchive(file.display().to_string(), "no manifest.json (not a docker save archive)".into())
    })?;
    let entries: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&bytes).map_err(|e| ImageError::BadJson("docker-archive manifest.json", e))?;
    let matches = |e: &DockerArchiveEntry, t: &str| {
        e.repo_tags
            .iter()
            .flatten()
            .any(|rt| rt == t || rt.ends_with(&format!("/{t}")) || rt.split(':').next() == Some(t))
    };
    let entry = match tag {
        Some(t) => entries.iter().find(|e| matches(e, t)),
        None if entries.len() == 1 => entries.first(),
        None => None,
    }
    .ok_or_else(|| {
        let tags: Vec<String> = entries.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect();
        ImageError::NotFound(format!("{name}: the archive holds {}", tags.join(", ")))
    })?;
    let put = |rel: &str| -> Result<(String, u64), ImageError> {
        let p = safe_relative(Path::new(rel))
            .map(|r| tmp.0.join(r))
            .ok_or_else(|| ImageError::BadArchive(file.display().to_string(), format!("unsafe path {rel}")))?;
        let mut hr = HashingReader::new(open(&p)?);
        io::copy(&mut hr, &mut io::sink()).map_err(|e| ImageError::Io(format!("cannot read {}", p.display()), e))?;
        let d = hr.digest();
        if !store.has_blob(&d) {
            store.put_blob(&d, open(&p)?, Some(hr.count))?;
        }
        Ok((d, hr.count))
    };
    let (config_digest, mut size) = put(&entry.config)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (d, s) = put(l)?;
        size += s;
        layers.push(d);
    }
    Ok(ImageRecord {
        name: name.to_string(),
        // No manifest in the archive: the config digest stands for it.
        manifest_digest: config_digest.clone(),
        config_digest,
        layers,
        size,
        pulled: Store::now(),
    })
}
