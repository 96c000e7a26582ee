//! The JSON documents of an image, as far as ember reads them: OCI image-spec
//! `image-index.md`, `manifest.md`, `config.md`, and their Docker v2 schema 2
//! twins (`manifest list`, `image manifest`), which have the same shape.
//!
//! Written by hand rather than with the `oci-spec` crate: ember reads a dozen
//! fields, and these few serde structs cost nothing next to oci-spec's
//! builders and getters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ImageError;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The Accept header of a manifest request: every kind ember understands.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// The annotation an OCI layout uses to name an image (image-layout.md).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor (descriptor.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What it points at.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:...`.
    pub digest: String,
    /// Bytes.
    #[serde(default)]
    pub size: u64,
    /// For index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// For index entries of a layout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform of an index entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
}

/// An image index or manifest list.
#[derive(Debug, Deserialize)]
pub struct Index {
    /// The entries.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// The parts of the image config (config.md) a run uses.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ImageConfig {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// The execution parameters.
    #[serde(default)]
    pub config: Option<RunConfig>,
}

/// `config` inside the image config: Docker's names.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct RunConfig {
    /// `KEY=VALUE` entries.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// `user[:group]`, names or ids.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// A manifest document: an index (pick a platform) or a single manifest.
pub enum Document {
    /// Index / manifest list.
    Index(Index),
    /// Image manifest.
    Manifest(Manifest),
}

/// Parses a manifest document, telling an index from a manifest by its
/// `mediaType` (or, where absent, by which fields it has).
pub fn parse_document(bytes: &[u8], content_type: Option<&str>) -> Result<Document, ImageError> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| ImageError::BadJson("manifest", e))?;
    let mt = v.get("mediaType").and_then(|m| m.as_str()).or(content_type).unwrap_or("");
    let is_index = mt == OCI_INDEX || mt == DOCKER_LIST || (mt.is_empty() && v.get("manifests").is_some());
    if is_index {
        Ok(Document::Index(serde_json::from_value(v).map_err(|e| ImageError::BadJson("image index", e))?))
    } else if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        Err(ImageError::Unsupported("Docker schema 1 manifests (push the image again with a current tool)".into()))
    } else {
        Ok(Document::Manifest(serde_json::from_value(v).map_err(|e| ImageError::BadJson("image manifest", e))?))
    }
}

/// Picks linux/amd64 from an index, the only platform ember runs.
pub fn pick_platform<'a>(index: &'a Index, what: &str) -> Result<&'a Descriptor, ImageError> {
    index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
        .ok_or_else(|| {
            let have: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| format!("{}/{}", p.os, p.architecture)))
                .collect();
            ImageError::NoPlatform { image: what.to_string(), have: have.join(", ") }
        })
}
