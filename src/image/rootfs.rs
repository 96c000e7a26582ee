//! An image's layers, flattened into one read-only disk image for the guest.
//!
//! The layers are applied in order as image-spec `layer.md` says ("Applying
//! Changesets"): an entry replaces what was at its path (a non-directory also
//! replaces everything below it); `.wh.NAME` deletes NAME from the layers
//! below; `.wh..wh..opq` in a directory hides everything the layers below put
//! in it. Two passes over the tar streams: the first finds, for every path,
//! which layer's entry survives; the second writes only those entries, with
//! their own headers (owner, mode, times, device numbers, link targets) and
//! PAX xattrs (`security.capability`), into one tar stream.
//!
//! That stream goes straight into `tar2sqfs` (Debian's squashfs-tools-ng),
//! which writes a squashfs image: nothing is ever unpacked on the host, so
//! ownership, setuid bits and device nodes survive with ember running as any
//! user, and a layer's `../` or absolute symlink cannot touch a host file.
//! squashfs rather than ext4 or EROFS because it is the one Linux read-only
//! file system that Debian 12 can build from a tar stream without root
//! (`mke2fs -d` and `mkfs.erofs` take a directory there).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use super::ImageError;
use super::store::{HashingReader, ImageRecord, Store};

/// The squashfs compressor: zstd decompresses fast in the guest. Level 3, not
/// squashfs-tools-ng's default 15: measured on a 240 MB Debian root here,
/// level 15 took 56 s to pack to 99.5 MB, level 3 took 2.5 s for 107.8 MB
/// (lz4: 1.8 s, 133 MB). Decompression speed hardly depends on the level.
const COMPRESSOR: &str = "zstd";
/// See [`COMPRESSOR`].
const COMPRESSOR_OPTIONS: &str = "level=3";

/// A layer's decompressed tar stream; gzip and zstd are told by their magic
/// bytes (media types are not always right in the wild).
fn open_layer(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let f = File::open(path).map_err(|e| ImageError::Io(format!("cannot open layer {}", path.display()), e))?;
    decompress(f, path)
}

/// A path inside the image, relative and without `.`/`..` parts; None for the
/// root itself.
fn normalize(p: &Path, layer: &str) -> Result<Option<String>, ImageError> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::BadLayer(
                    layer.to_string(),
                    format!("entry `{}` leaves the root", p.display()),
                ));
            }
        }
    }
    Ok(if parts.is_empty() { None } else { Some(parts.join("/")) })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Winner {
    layer: usize,
    index: usize,
    dir: bool,
}

fn remove_below(map: &mut BTreeMap<String, Winner>, dir: &str) {
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let doomed: Vec<String> =
        map.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(k, _)| k.clone()).collect();
    for k in doomed {
        map.remove(&k);
    }
}

enum Change {
    Entry(String, Winner),
    Whiteout(String),
    Opaque(String),
}

/// Pass 1: which (layer, entry) survives at each path.
fn surviving(layers: &[PathBuf], digests: &[String]) -> Result<BTreeMap<String, Winner>, ImageError> {
    let mut map: BTreeMap<String, Winner> = BTreeMap::new();
    for (li, path) in layers.iter().enumerate() {
        let name = &digests[li];
        let bad = |e: io::Error| ImageError::BadLayer(name.clone(), e.to_string());
        let raw = File::open(path).map_err(|e| ImageError::Io(format!("cannot open layer {}", path.display()), e))?;
        let mut hashed = HashingReader::new(raw);
        let mut changes = Vec::new();
        {
            let mut tar = tar::Archive::new(decompress(&mut hashed, path)?);
            for (index, entry) in tar.entries().map_err(bad)?.enumerate() {
                let entry = entry.map_err(bad)?;
                let Some(p) = normalize(&entry.path().map_err(bad)?, name)? else { continue };
                let (dir, base) = p.rsplit_once('/').unwrap_or(("", &p));
                if base == ".wh..wh..opq" {
                    changes.push(Change::Opaque(dir.to_string()));
                } else if let Some(victim) = base.strip_prefix(".wh.") {
                    let v = if dir.is_empty() { victim.to_string() } else { format!("{dir}/{victim}") };
                    changes.push(Change::Whiteout(v));
                } else {
                    let is_dir = entry.header().entry_type().is_dir();
                    changes.push(Change::Entry(p, Winner { layer: li, index, dir: is_dir }));
                }
            }
            // Drain what the tar reader left (padding) so the digest covers it all.
            io::copy(&mut tar.into_inner(), &mut io::sink()).map_err(bad)?;
        }
        io::copy(&mut hashed, &mut io::sink()).map_err(bad)?;
        if &hashed.digest() != name {
            return Err(ImageError::DigestMismatch {
                expected: name.clone(),
                got: hashed.digest(),
                bytes: hashed.count,
            });
        }
        // Whiteouts and opaque markers act on the layers below only.
        for c in &changes {
            match c {
                Change::Whiteout(v) => {
                    map.remove(v);
                    remove_below(&mut map, v);
                }
                Change::Opaque(d) => remove_below(&mut map, d),
                Change::Entry(..) => {}
            }
        }
        for c in changes {
            if let Change::Entry(p, w) = c {
                if !w.dir {
                    remove_below(&mut map, &p);
                }
                map.insert(p, w);
            }
        }
    }
    Ok(map)
}

fn decompress<'a, R: Read + 'a>(r: R, path: &Path) -> Result<Box<dyn Read + 'a>, ImageError> {
    let mut br = BufReader::new(r);
    let head = br.fill_buf().map_err(|e| ImageError::Io(format!("cannot read layer {}", path.display()), e))?;
    Ok(match head {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(br)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(
            ruzstd::decoding::StreamingDecoder::new(br)
                .map_err(|e| ImageError::BadLayer(path.display().to_string(), format!("zstd: {e}")))?,
        ),
        _ => Box::new(br),
    })
}

/// Pass 2: the surviving entries, as one tar stream into `out`.
fn write_merged(
    layers: &[PathBuf],
    digests: &[String],
    map: &BTreeMap<String, Winner>,
    out: impl Write,
) -> Result<(), ImageError> {
    let mut b = tar::Builder::new(out);
    let werr = |e: io::Error| ImageError::Io("cannot feed tar2sqfs".into(), e);
    for (li, path) in layers.iter().enumerate() {
        let name = &digests[li];
        let bad = |e: io::Error| ImageError::BadLayer(name.clone(), e.to_string());
        let mut tar = tar::Archive::new(open_layer(path)?);
        for (index, entry) in tar.entries().map_err(bad)?.enumerate() {
            let mut entry = entry.map_err(bad)?;
            let Some(p) = normalize(&entry.path().map_err(bad)?, name)? else { continue };
            if map.get(&p) != Some(&Winner { layer: li, index, dir: entry.header().entry_type().is_dir() }) {
                continue;
            }
            let xattrs: Vec<(String, Vec<u8>)> = match entry.pax_extensions().map_err(bad)? {
                Some(exts) => exts
                    .filter_map(|x| x.ok())
                    .filter_map(|x| {
                        let k = x.key().ok()?;
                        k.starts_with("SCHILY.xattr.").then(|| (k.to_string(), x.value_bytes().to_vec()))
                    })
                    .collect(),
                None => Vec::new(),
            };
            if !xattrs.is_empty() {
                b.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).map_err(werr)?;
            }
            let mut h = entry.header().clone();
            let kind = h.entry_type();
            if kind.is_hard_link() || kind.is_symlink() {
                let target = entry.link_name().map_err(bad)?.unwrap_or_default().into_owned();
                let target = if kind.is_hard_link() {
                    normalize(&target, name)?.map(PathBuf::from).unwrap_or_default()
                } else {
                    target
                };
                h.set_size(0);
                b.append_link(&mut h, &p, &target).map_err(werr)?;
            } else if kind.is_dir() {
                b.append_data(&mut h, format!("{p}/"), io::empty()).map_err(werr)?;
            } else {
                b.append_data(&mut h, &p, &mut entry).map_err(werr)?;
            }
        }
    }
    b.finish().map_err(werr)
}

fn tar2sqfs(out: &Path) -> Result<std::process::Child, ImageError> {
    Command::new("tar2sqfs")
        .args(["--quiet", "--force", "--compressor", COMPRESSOR, "--comp-extra", COMPRESSOR_OPTIONS])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ImageError::MissingTool("tar2sqfs", "squashfs-tools-ng")
            } else {
                ImageError::Io("cannot start tar2sqfs".into(), e)
            }
        })
}

fn finish(mut child: std::process::Child, fed: Result<(), ImageError>) -> Result<(), ImageError> {
    drop(child.stdin.take());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().map_err(|e| ImageError::Io("tar2sqfs".into(), e))?;
    fed?;
    if !status.success() {
        return Err(ImageError::Build(format!("tar2sqfs failed ({status}): {}", err.trim())));
    }
    Ok(())
}

/// Builds (or finds in the cache) the root file system image of `rec`.
pub fn build(store: &Store, rec: &ImageRecord) -> Result<PathBuf, ImageError> {
    let dst = store.rootfs_path(&rec.config_digest);
    if dst.is_file() {
        return Ok(dst);
    }
    // One builder per image at a time; a second run waits, then finds it built.
    let lock_path = dst.with_extension("lock");
    let lock =
        File::create(&lock_path).map_err(|e| ImageError::Io(format!("cannot create {}", lock_path.display()), e))?;
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if dst.is_file() {
        return Ok(dst);
    }
    let layers: Vec<PathBuf> = rec.layers.iter().map(|d| store.blob_path(d)).collect();
    let map = surviving(&layers, &rec.layers)?;
    let tmp = store.temp_path("rootfs");
    let mut child = tar2sqfs(&tmp)?;
    let stdin = child.stdin.take().expect("piped");
    let fed = write_merged(&layers, &rec.layers, &map, io::BufWriter::new(stdin));
    let r = finish(child, fed);
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &dst).map_err(|e| ImageError::Io(format!("cannot store {}", dst.display()), e))?;
    Ok(dst)
}

/// A squashfs image of a host directory tree (`dir:PATH`), at `out`.
pub fn build_from_dir(dir: &Path, out: &Path) -> Result<(), ImageError> {
    let md = fs::metadata(dir).map_err(|e| ImageError::Io(format!("cannot read {}", dir.display()), e))?;
    if !md.is_dir() {
        return Err(ImageError::Io(format!("{} is not a directory", dir.display()), io::ErrorKind::Other.into()));
    }
    let mut child = tar2sqfs(out)?;
    let stdin = child.stdin.take().expect("piped");
    let fed = (|| {
        let mut b = tar::Builder::new(io::BufWriter::new(stdin));
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        b.append_dir_all(".", dir).map_err(|e| ImageError::Io(format!("cannot read {}", dir.display()), e))?;
        b.finish().map_err(|e| ImageError::Io("cannot feed tar2sqfs".into(), e))
    })();
    finish(child, fed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, n: usize, entries: &[(&str, Option<&[u8]>)]) -> (PathBuf, String) {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, p, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
            }
        }
        let bytes = b.into_inner().unwrap();
        let path = dir.join(format!("l{n}"));
        fs::write(&path, &bytes).unwrap();
        (path, super::super::store::digest_of(&bytes))
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        let dir = std::env::temp_dir().join(format!("ember-rootfs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let l0 = layer(
            &dir,
            0,
            &[
                ("a", None),
                ("a/keep", Some(b"1")),
                ("a/gone", Some(b"2")),
                ("o", None),
                ("o/x", Some(b"3")),
                ("f", None),
                ("f/y", Some(b"4")),
            ],
        );
        let l1 = layer(
            &dir,
            1,
            &[
                ("a/.wh.gone", Some(b"")),
                ("o/.wh..wh..opq", Some(b"")),
                ("o/new", Some(b"5")),
                ("f", Some(b"now a file")),
            ],
        );
        let map = surviving(&[l0.0.clone(), l1.0.clone()], &[l0.1.clone(), l1.1.clone()]).unwrap();
        let keys: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["a", "a/keep", "f", "o", "o/new"]);
        assert_eq!(map["f"].layer, 1);
        // A layer whose bytes do not match its digest is refused.
        assert!(matches!(
            surviving(std::slice::from_ref(&l0.0), std::slice::from_ref(&l1.1)),
            Err(ImageError::DigestMismatch { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn paths_that_leave_the_root_are_refused() {
        assert!(normalize(Path::new("a/../../etc/passwd"), "l").is_err());
        assert_eq!(normalize(Path::new("./a//b/"), "l").unwrap().as_deref(), Some("a/b"));
        assert_eq!(normalize(Path::new("./"), "l").unwrap(), None);
    }
}
