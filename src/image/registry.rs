//! A pull over the OCI distribution API (distribution-spec `spec.md`, "Pulling
//! manifests" and "Pulling blobs"): `GET /v2/NAME/manifests/REF`, then
//! `GET /v2/NAME/blobs/DIGEST` for the config and each layer.
//!
//! Authentication follows Docker's token flow (distribution's `token.md`): a
//! 401 carries `WWW-Authenticate: Bearer realm=..,service=..,scope=..`; ember
//! asks the realm for a token (with the user's basic credentials from
//! `~/.docker/config.json`, if any) and retries. A 401 with `Basic` is
//! answered with those credentials directly.
//!
//! Loopback registries are spoken to over plain HTTP, as Docker does; any
//! other over TLS unless named with `--insecure-registry`.

use std::time::Duration;

use super::manifest::{self, Document};
use super::reference::RegistryRef;
use super::store::{ImageRecord, Store, digest_of};
use super::{ImageError, Progress};

/// Largest manifest ember accepts (the spec suggests registries take 4 MiB).
const MAX_MANIFEST: u64 = 4 << 20;

struct Client<'a> {
    agent: ureq::Agent,
    base: String,
    r: &'a RegistryRef,
    basic: Option<String>,
    bearer: Option<String>,
}

/// `auth` of the registry in `$DOCKER_CONFIG/config.json` (default `~/.docker`):
/// base64 of `user:password`, used as is in a Basic header.
fn docker_credentials(registry: &str) -> Option<String> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".docker")))?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let mut keys = vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}")];
    if registry == super::reference::DOCKER_HUB {
        keys.push("https://index.docker.io/v1/".to_string());
    }
    keys.iter().find_map(|k| auths.get(k)?.get("auth")?.as_str().map(str::to_string)).filter(|a| !a.is_empty())
}

/// `key="value"` parameters of a WWW-Authenticate challenge.
fn challenge_params(h: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = h.split_once(' ').map_or("", |(_, r)| r);
    while let Some((k, r)) = rest.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_string();
        let (v, r) = match r.strip_prefix('"') {
            Some(q) => q.split_once('"').unwrap_or((q, "")),
            None => r.split_once(',').unwrap_or((r, "")),
        };
        out.push((k, v.to_string()));
        rest = r;
    }
    out
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl<'a> Client<'a> {
    fn new(r: &'a RegistryRef, insecure: &[String]) -> Client<'a> {
        let plain = r.is_loopback() || insecure.iter().any(|i| i == &r.registry);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            agent,
            base: format!("{}://{}/v2/{}", if plain { "http" } else { "https" }, r.api_host(), r.repository),
            r,
            basic: docker_credentials(&r.registry),
            bearer: None,
        }
    }

    fn unreachable(&self, e: ureq::Error) -> ImageError {
        ImageError::Registry { registry: self.r.registry.clone(), what: format!("cannot be reached: {e}") }
    }

    /// GET with the credentials we have; on a 401, authenticate once and retry.
    fn get(&mut self, path: &str, accept: &str) -> Result<ureq::http::Response<ureq::Body>, ImageError> {
        let url = format!("{}/{path}", self.base);
        for attempt in 0..2 {
            let mut req = self.agent.get(&url).header("Accept", accept);
            if let Some(t) = &self.bearer {
                req = req.header("Authorization", &format!("Bearer {t}"));
            } else if let (Some(b), 1) = (&self.basic, attempt) {
                req = req.header("Authorization", &format!("Basic {b}"));
            }
            let resp = req.call().map_err(|e| self.unreachable(e))?;
            if resp.status().as_u16() != 401 || attempt == 1 {
                return Ok(resp);
            }
            let challenge =
                resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            if challenge.to_ascii_lowercase().starts_with("bearer") {
                self.fetch_token(&challenge)?;
            } else if self.basic.is_none() {
                return Ok(resp);
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn fetch_token(&mut self, challenge: &str) -> Result<(), ImageError> {
        let params = challenge_params(challenge);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let realm = get("realm").ok_or_else(|| ImageError::Registry {
            registry: self.r.registry.clone(),
            what: format!("sent a Bearer challenge without a realm: {challenge}"),
        })?;
        let scope = get("scope").unwrap_or_else(|| format!("repository:{}:pull", self.r.repository));
        let mut url = format!("{realm}?scope={}", query_escape(&scope));
        if let Some(s) = get("service") {
            url += &format!("&service={}", query_escape(&s));
        }
        let mut req = self.agent.get(&url);
        if let Some(b) = &self.basic {
            req = req.header("Authorization", &format!("Basic {b}"));
        }
        let mut resp = req.call().map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(self.auth_refused());
        }
        let body = resp.body_mut().with_config().limit(1 << 20).read_to_vec().map_err(|e| self.unreachable(e))?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| ImageError::BadJson("token", e))?;
        let token = v.get("token").or_else(|| v.get("access_token")).and_then(|t| t.as_str());
        self.bearer = Some(token.ok_or_else(|| self.auth_refused())?.to_string());
        Ok(())
    }

    fn auth_refused(&self) -> ImageError {
        ImageError::AuthRefused { registry: self.r.registry.clone(), had_credentials: self.basic.is_some() }
    }

    fn check(&self, status: u16, what: &str) -> Result<(), ImageError> {
        match status {
            200..=299 => Ok(()),
            401 | 403 => Err(self.auth_refused()),
            404 => Err(ImageError::NotFound(format!("{} ({what})", self.r))),
            s => Err(ImageError::Registry {
                registry: self.r.registry.clone(),
                what: format!("answered {s} for {what}"),
            }),
        }
    }

    /// A manifest document and its digest, verified against `expected` when known.
    fn manifest(&mut self, reference: &str, expected: Option<&str>) -> Result<(Vec<u8>, String, Document), ImageError> {
        let mut resp = self.get(&format!("manifests/{reference}"), manifest::ACCEPT)?;
        self.check(resp.status().as_u16(), "manifest")?;
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = resp.body_mut().with_config().limit(MAX_MANIFEST).read_to_vec().map_err(|e| self.unreachable(e))?;
        let digest = digest_of(&body);
        if let Some(e) = expected.filter(|e| *e != digest) {
            return Err(ImageError::DigestMismatch { expected: e.to_string(), got: digest, bytes: body.len() as u64 });
        }
        let doc = manifest::parse_document(&body, ct.as_deref())?;
        Ok((body, digest, doc))
    }

    fn blob(&mut self, store: &Store, d: &manifest::Descriptor, progress: &Progress) -> Result<u64, ImageError> {
        if store.has_blob(&d.digest) {
            return Ok(d.size);
        }
        let resp = self.get(&format!("blobs/{}", d.digest), "*/*")?;
        self.check(resp.status().as_u16(), &format!("blob {}", d.digest))?;
        let reader = resp.into_body().into_reader();
        let size = if d.size > 0 { Some(d.size) } else { None };
        store.put_blob(&d.digest, progress.wrap(&short(&d.digest), d.size, reader), size)
    }
}

fn short(d: &str) -> String {
    d.trim_start_matches("sha256:").chars().take(12).collect()
}

/// Pulls `r` into the store and records it under its name.
pub fn pull(
    store: &Store,
    r: &RegistryRef,
    insecure: &[String],
    progress: &Progress,
) -> Result<ImageRecord, ImageError> {
    let mut c = Client::new(r, insecure);
    let (mut body, mut digest, mut doc) = c.manifest(r.manifest_ref(), r.digest.as_deref())?;
    if let Document::Index(index) = &doc {
        store.put_bytes(Some(&digest), &body)?;
        let d = manifest::pick_platform(index, &r.to_string())?.clone();
        (body, digest, doc) = c.manifest(&d.digest, Some(&d.digest))?;
    }
    let Document::Manifest(m) = doc else {
        return Err(ImageError::Unsupported("an image index that points at another index".into()));
    };
    store.put_bytes(Some(&digest), &body)?;
    let mut size = c.blob(store, &m.config, progress)?;
    for l in &m.layers {
        size += c.blob(store, l, progress)?;
    }
    Ok(ImageRecord {
        name: r.to_string(),
        manifest_digest: digest,
        config_digest: m.config.digest.clone(),
        layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
        size,
        pulled: Store::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed() {
        let p = challenge_params(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[1], ("service".into(), "registry.example".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull".into()));
        assert_eq!(query_escape("repository:a/b:pull,push"), "repository:a/b:pull%2Cpush");
    }
}
