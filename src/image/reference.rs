//! Image references, in the transport syntax skopeo and podman use:
//!
//! | form | meaning |
//! |---|---|
//! | `[REGISTRY[:PORT]/]NAME[:TAG][@sha256:DIGEST]` | a registry (OCI distribution API v2) |
//! | `oci:DIR[:REF]` | an OCI image layout directory (image-spec `image-layout.md`) |
//! | `oci-archive:FILE[:REF]` | the same layout in a tar file |
//! | `docker-archive:FILE[:REF]` | what `docker save` / `podman save` write |
//! | `dir:PATH` | a plain root file system tree, used as it is |
//!
//! A registry name without a registry part is Docker Hub's, as in Docker:
//! `alpine` is `docker.io/library/alpine:latest` (distribution's `reference`
//! grammar: the first component is a registry when it contains `.` or `:`, or
//! is `localhost`).

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// Docker Hub as it is named in references.
pub const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's API endpoint.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Errors in an image reference.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Empty.
    #[error("empty image reference")]
    Empty,
    /// A transport with no path.
    #[error("`{0}` names no path after the transport")]
    NoPath(String),
    /// Bad repository name.
    #[error(
        "`{0}` is not a valid repository name (lowercase letters, digits and `._-` separators, components joined by `/`)"
    )]
    BadName(String),
    /// Bad tag.
    #[error("`{0}` is not a valid tag (letters, digits, `_.-`, at most 128, not starting with `.` or `-`)")]
    BadTag(String),
    /// Bad digest.
    #[error("`{0}` is not a valid digest (sha256: followed by 64 lowercase hex digits)")]
    BadDigest(String),
}

/// An image in a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRef {
    /// `host[:port]` as written (Docker Hub: `docker.io`).
    pub registry: String,
    /// The repository path, e.g. `library/alpine`.
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// A pinned manifest digest (`sha256:...`).
    pub digest: Option<String>,
}

impl RegistryRef {
    /// The host the API is spoken to (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { DOCKER_HUB_API } else { &self.registry }
    }

    /// The manifest reference: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// Whether the registry is on this machine's loopback, where Docker (and
    /// ember) speak plain HTTP.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => self.registry.split(':').next().unwrap_or(""),
        };
        host == "localhost" || host == "::1" || host.starts_with("127.")
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A registry.
    Registry(RegistryRef),
    /// An OCI image layout directory, and which of its images.
    OciDir(PathBuf, Option<String>),
    /// An OCI image layout in a tar file.
    OciArchive(PathBuf, Option<String>),
    /// A `docker save` archive.
    DockerArchive(PathBuf, Option<String>),
    /// A root file system tree.
    Dir(PathBuf),
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with = |f: &mut fmt::Formatter<'_>, t: &str, p: &PathBuf, r: &Option<String>| {
            write!(f, "{t}:{}", p.display())?;
            match r {
                Some(r) => write!(f, ":{r}"),
                None => Ok(()),
            }
        };
        match self {
            ImageRef::Registry(r) => r.fmt(f),
            ImageRef::OciDir(p, r) => with(f, "oci", p, r),
            ImageRef::OciArchive(p, r) => with(f, "oci-archive", p, r),
            ImageRef::DockerArchive(p, r) => with(f, "docker-archive", p, r),
            ImageRef::Dir(p) => write!(f, "dir:{}", p.display()),
        }
    }
}

/// Splits `PATH[:REF]`. A path that exists wins (paths may hold `:`); else a
/// `docker-archive` REF (`name:tag`) starts at the first `:`, an `oci` REF at
/// the last `:` not followed by a `/`.
fn path_and_ref(s: &str, docker: bool) -> (PathBuf, Option<String>) {
    if std::path::Path::new(s).exists() {
        return (PathBuf::from(s), None);
    }
    for (i, _) in s.match_indices(':') {
        if std::path::Path::new(&s[..i]).exists() {
            let r = &s[i + 1..];
            return (PathBuf::from(&s[..i]), if r.is_empty() { None } else { Some(r.to_string()) });
        }
    }
    let split = if docker { s.split_once(':') } else { s.rsplit_once(':') };
    match split {
        Some((p, r)) if !r.contains('/') && !p.is_empty() => {
            (PathBuf::from(p), if r.is_empty() { None } else { Some(r.to_string()) })
        }
        _ => (PathBuf::from(s), None),
    }
}

fn valid_component(c: &str) -> bool {
    // distribution/reference: [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
    if c.is_empty() || !c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit()) {
        return false;
    }
    if !c.ends_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit()) {
        return false;
    }
    c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-'))
}

/// `host[:port]` (or `[ipv6][:port]`): DNS labels or an address, and a
/// numeric port (distribution/reference's `domain` rule).
fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, p)) if !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit() || c == ':') => (h, p),
            _ => return false,
        },
        None => match r.split_once(':') {
            Some((h, p)) => (h, &r[h.len()..][..1 + p.len()]),
            None => (r, ""),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = r.starts_with('[')
        || (!host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    port_ok && host_ok
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether `d` is `sha256:` and 64 lowercase hex digits.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Parses an image reference (see the module docs).
pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
    if s.is_empty() {
        return Err(ReferenceError::Empty);
    }
    for (prefix, make) in [
        ("oci:", ImageRef::OciDir as fn(PathBuf, Option<String>) -> ImageRef),
        ("oci-archive:", ImageRef::OciArchive),
        ("docker-archive:", ImageRef::DockerArchive),
    ] {
        if let Some(rest) = s.strip_prefix(prefix) {
            if rest.is_empty() {
                return Err(ReferenceError::NoPath(s.to_string()));
            }
            let (p, r) = path_and_ref(rest, prefix == "docker-archive:");
            return Ok(make(p, r));
        }
    }
    if let Some(rest) = s.strip_prefix("dir:") {
        if rest.is_empty() {
            return Err(ReferenceError::NoPath(s.to_string()));
        }
        return Ok(ImageRef::Dir(PathBuf::from(rest)));
    }
    let rest = s.strip_prefix("docker://").unwrap_or(s);
    parse_registry(rest).map(ImageRef::Registry)
}

fn parse_registry(s: &str) -> Result<RegistryRef, ReferenceError> {
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => {
            if !valid_digest(d) {
                return Err(ReferenceError::BadDigest(d.to_string()));
            }
            (n, Some(d.to_string()))
        }
        None => (s, None),
    };
    // The tag is after a `:` in the last path component (a `:` earlier is a port).
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => {
            let t = &name_tag[last_slash + i + 1..];
            if !valid_tag(t) {
                return Err(ReferenceError::BadTag(t.to_string()));
            }
            (&name_tag[..last_slash + i], Some(t.to_string()))
        }
        None => (name_tag, None),
    };
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" || first.starts_with('[') => {
            (first.to_string(), rest.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    let repository = if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path };
    if repository.split('/').any(|c| !valid_component(c)) || !valid_registry(&registry) {
        return Err(ReferenceError::BadName(name.to_string()));
    }
    let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
    Ok(RegistryRef { registry, repository, tag, digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> RegistryRef {
        match parse(s).unwrap() {
            ImageRef::Registry(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn docker_hub_names_are_expanded() {
        let r = reg("alpine");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("docker.io", "library/alpine"));
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(reg("user/app:1.0").repository, "user/app");
        assert_eq!(reg("alpine").to_string(), "docker.io/library/alpine:latest");
    }

    #[test]
    fn registries_ports_tags_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = reg(&format!("127.0.0.1:5000/x/y:v1@{d}"));
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "x/y");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_ref(), d);
        assert!(r.is_loopback());
        let r = reg("localhost/busy");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost", "busy"));
        assert!(r.is_loopback());
        assert!(!reg("quay.io/a/b").is_loopback());
        assert_eq!(reg(&format!("a@{d}")).tag, None);
        assert_eq!(reg("docker://localhost:5000/a:b").tag.as_deref(), Some("b"));
    }

    #[test]
    fn bad_references_are_refused() {
        assert_eq!(parse(""), Err(ReferenceError::Empty));
        assert!(matches!(parse("Alpine"), Err(ReferenceError::BadName(_))));
        assert!(matches!(parse("a:b c"), Err(ReferenceError::BadTag(_))));
        assert!(matches!(parse("a@sha256:12"), Err(ReferenceError::BadDigest(_))));
        assert!(matches!(parse("a/../b"), Err(ReferenceError::BadName(_))));
        assert!(matches!(parse("oci:"), Err(ReferenceError::NoPath(_))));
        // fuzz/cli_values: a "registry" that is a transport prefix would print
        // as, and parse back into, an archive reference.
        assert!(matches!(parse("docker://oci-archive:app.tar:v/1"), Err(ReferenceError::BadName(_))));
        assert!(matches!(parse("a:b:c/d"), Err(ReferenceError::BadName(_))));
        assert!(parse("[::1]:5000/a").is_ok() && parse("reg-1.example.com:443/a/b").is_ok());
    }

    #[test]
    fn transports() {
        assert_eq!(parse("oci:/tmp/l:v1").unwrap(), ImageRef::OciDir("/tmp/l".into(), Some("v1".into())));
        assert_eq!(parse("oci:/tmp/a:b/l").unwrap(), ImageRef::OciDir("/tmp/a:b/l".into(), None));
        assert_eq!(parse("oci-archive:x.tar").unwrap(), ImageRef::OciArchive("x.tar".into(), None));
        assert_eq!(
            parse("docker-archive:/x.tar:app:1").unwrap(),
            ImageRef::DockerArchive("/x.tar".into(), Some("app:1".into()))
        );
        assert_eq!(parse("dir:/r").unwrap(), ImageRef::Dir("/r".into()));
    }
}
