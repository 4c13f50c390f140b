//! Distribution API operations on a [`Repository`]: manifests (with platform selection),
//! blobs and Range reads, uploads, manifest PUT, and the referrers API with the OCI 1.1
//! tag-schema fallback.

use crate::body::{BodyError, read_capped, read_slice};
use crate::client::{FromMirror, Op, Repository, error_text};
pub use crate::content::sha256_digest;
use crate::content::verify;
use crate::error::{RegistryError, Result};
use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, StatusCode};
use std::time::{Duration, Instant};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest type we read.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// How far into a blob a range is still read when the registry ignores `Range` and sends the
/// whole blob (the bytes before the range are read and dropped): beyond it the read fails with
/// a clear error instead of downloading gigabytes for one span.
pub const MAX_RANGE_IGNORED_READ: u64 = 64 << 20;

/// Largest manifest we accept (the spec suggests registries cap at 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;

/// A manifest as fetched: raw bytes (their digest is the manifest's identity).
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
}

impl FetchedManifest {
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_MANIFEST_LIST
    }
}

/// The platform to pick from an index: the host's (`linux/amd64` on x86-64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Self { os: "linux".into(), architecture: architecture.into(), variant: None }
    }
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?.to_string();
        let architecture = parts.next().filter(|p| !p.is_empty())?.to_string();
        let variant = parts.next().map(ToString::to_string);
        Some(Self { os, architecture, variant })
    }
}

impl Repository {
    pub(crate) fn bad(&self, what: &str, message: impl Into<String>) -> RegistryError {
        RegistryError::BadResponse {
            registry: self.image.registry.clone(),
            what: what.to_string(),
            message: message.into(),
        }
    }

    fn range_ignored(&self, digest: &str, end: u64) -> RegistryError {
        self.bad(
            &format!("blob {digest}"),
            format!(
                "the registry ignores Range requests; bytes up to {end} would mean reading past the first {MAX_RANGE_IGNORED_READ} bytes of the blob"
            ),
        )
    }

    fn not_found(&self, what: String) -> RegistryError {
        RegistryError::NotFound { registry: self.image.registry.clone(), what }
    }

    async fn body(&self, resp: reqwest::Response, what: &str, limit: usize) -> Result<Bytes> {
        read_capped(resp, limit).await.map_err(|e| match e {
            BodyError::TooLarge { limit } => self.bad(what, format!("larger than {limit} bytes")),
            BodyError::Transport(e) => RegistryError::Transport {
                registry: self.image.registry.clone(),
                context: format!("reading {what}"),
                message: error_text(&e),
            },
        })
    }

    /// GET a manifest or index by tag or digest; verified when asked for by digest.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        self.retrying(|| self.get_manifest_once(reference)).await
    }

    async fn get_manifest_once(&self, reference: &str) -> Result<FetchedManifest> {
        let op = Op::new(Method::GET, format!("manifests/{reference}")).header(ACCEPT, MANIFEST_ACCEPT);
        let resp = self.send(&op).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(self.not_found(format!("manifest {}:{reference}", self.image.repository)));
        }
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let bytes = self.body(resp, "manifest", MAX_MANIFEST).await?;
        let digest = sha256_digest(&bytes);
        if reference.contains(':') {
            verify(reference, &bytes)?;
        }
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| self.bad("manifest", e.to_string()))?;
        let media_type = probe
            .media_type
            .or(header_type.filter(|t| t.contains("manifest") || t.contains("index")))
            .unwrap_or_else(|| if probe.manifests.is_some() { OCI_INDEX } else { OCI_MANIFEST }.to_string());
        Ok(FetchedManifest { bytes, media_type, digest })
    }

    /// The image manifest for `platform`: the manifest itself, or the matching entry of an
    /// index.
    pub async fn get_image_manifest(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<(FetchedManifest, ImageManifest)> {
        let mut fetched = self.get_manifest(reference).await?;
        if fetched.is_index() {
            let index: ImageIndex =
                serde_json::from_slice(&fetched.bytes).map_err(|e| self.bad("index", e.to_string()))?;
            let chosen = select_platform(index.manifests(), platform).ok_or_else(|| {
                self.not_found(format!(
                    "manifest for platform {}/{} in {reference}",
                    platform.os, platform.architecture
                ))
            })?;
            fetched = self.get_manifest(chosen.digest().as_ref()).await?;
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&fetched.bytes).map_err(|e| self.bad("image manifest", e.to_string()))?;
        Ok((fetched, manifest))
    }

    /// HEAD a manifest: its digest and size, or `None` when absent.
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<(String, u64)>> {
        let op = Op::new(Method::HEAD, format!("manifests/{reference}")).header(ACCEPT, MANIFEST_ACCEPT);
        let resp = self.send(&op).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let digest = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(ToString::to_string);
        let size = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        match digest {
            Some(d) => Ok(Some((d, size))),
            None => Ok(Some((self.get_manifest(reference).await?.digest, size))),
        }
    }

    /// A whole blob, verified against its digest. For large blobs use [`Self::blob_response`].
    pub async fn get_blob(&self, digest: &str, max_size: usize) -> Result<Bytes> {
        self.retrying(|| self.get_blob_once(digest, max_size)).await
    }

    async fn get_blob_once(&self, digest: &str, max_size: usize) -> Result<Bytes> {
        let resp = self.blob_response(digest).await?;
        let bytes = self.body(resp, &format!("blob {digest}"), max_size).await?;
        verify(digest, &bytes)?;
        Ok(bytes)
    }

    /// The response of a blob GET, for streaming: its body may take as long as it keeps coming
    /// ([`crate::op::Op::long_body`]). The caller verifies the digest.
    pub async fn blob_response(&self, digest: &str) -> Result<reqwest::Response> {
        let mut op = Op::new(Method::GET, format!("blobs/{digest}"));
        op.redirect_key = Some(digest.to_string());
        op.long_body = true;
        let resp = self.send(&op).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(self.not_found(format!("blob {digest}")));
        }
        Ok(resp)
    }

    /// Bytes `start..end` of a blob. A 206 must carry exactly the range; a 200 (server
    /// ignoring Range) is cut to it; 416 is [`RegistryError::RangeNotSatisfiable`]. Short
    /// or mismatched answers are retried as transient errors.
    pub async fn get_blob_range(&self, digest: &str, start: u64, end: u64) -> Result<Bytes> {
        if end <= start {
            return Ok(Bytes::new());
        }
        self.retrying(|| self.get_blob_range_once(digest, start, end)).await
    }

    async fn get_blob_range_once(&self, digest: &str, start: u64, end: u64) -> Result<Bytes> {
        let (resp, whole) = self.blob_range_response(digest, start, end).await?;
        let want = (end - start) as usize;
        if whole {
            // The whole blob came: read up to the range and no further, if the range is near
            // enough to its start.
            if end > MAX_RANGE_IGNORED_READ {
                return Err(self.range_ignored(digest, end));
            }
            let slice = read_slice(resp, start, end).await.map_err(|e| match e {
                BodyError::TooLarge { .. } => self.range_ignored(digest, end),
                BodyError::Transport(e) => RegistryError::Transport {
                    registry: self.image.registry.clone(),
                    context: format!("reading {digest} (Range ignored)"),
                    message: error_text(&e),
                },
            })?;
            return slice.ok_or_else(|| RegistryError::RangeNotSatisfiable {
                registry: self.image.registry.clone(),
                digest: digest.to_string(),
                start,
                end,
            });
        }
        let bytes = self.body(resp, "blob range", want).await?;
        if bytes.len() != want {
            return Err(RegistryError::Transport {
                registry: self.image.registry.clone(),
                context: format!("range {start}-{end} of {digest}"),
                message: format!("got {} bytes, wanted {want}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// The response to a Range GET of bytes `start..end` of a blob, for streaming: checked (a
    /// 206 must name the range; 404 and 416 are errors), with whether it is the whole blob (a
    /// 200 from a registry ignoring Range: the caller skips to `start`). Not retried.
    pub async fn blob_range_response(&self, digest: &str, start: u64, end: u64) -> Result<(reqwest::Response, bool)> {
        self.range_response(digest, start, end, false).await
    }

    /// [`Self::blob_range_response`] for the rest of a blob read as a stream from `start` (a
    /// whole-blob download resumed): bounded like a whole blob ([`Op::long_body`]), not like one
    /// request.
    pub(crate) async fn blob_rest_response(
        &self,
        digest: &str,
        start: u64,
        size: u64,
    ) -> Result<(reqwest::Response, bool)> {
        self.range_response(digest, start, size, true).await
    }

    async fn range_response(
        &self,
        digest: &str,
        start: u64,
        end: u64,
        long_body: bool,
    ) -> Result<(reqwest::Response, bool)> {
        let mut op =
            Op::new(Method::GET, format!("blobs/{digest}")).header(RANGE, format!("bytes={start}-{}", end - 1));
        op.redirect_key = Some(digest.to_string());
        op.long_body = long_body;
        op.skip_mirrors = self.mirror_warming(digest);
        let mut resp = self.send(&op).await?;
        if resp.status() == StatusCode::OK && resp.extensions().get::<FromMirror>().is_some() {
            // A pull-through mirror without the blob streams all of it from upstream, from the
            // start, while it stores it: hanging up leaves it storing, and the range comes
            // from the registry itself until the mirror has the blob.
            drop(resp);
            self.mirror_started(digest);
            op.skip_mirrors = true;
            resp = self.send(&op).await?;
        }
        match resp.status() {
            StatusCode::NOT_FOUND => Err(self.not_found(format!("blob {digest}"))),
            StatusCode::RANGE_NOT_SATISFIABLE => Err(RegistryError::RangeNotSatisfiable {
                registry: self.image.registry.clone(),
                digest: digest.to_string(),
                start,
                end,
            }),
            StatusCode::PARTIAL_CONTENT => {
                let range =
                    resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(parse_content_range);
                if let Some((s, e)) = range
                    && (s != start || e + 1 > end || e < s)
                {
                    return Err(self.bad("Content-Range", format!("asked {start}-{}, got {s}-{e}", end - 1)));
                }
                Ok((resp, false))
            }
            StatusCode::OK => Ok((resp, true)),
            other => Err(self.bad("blob range", format!("unexpected status {other}"))),
        }
    }

    /// Whether a mirror is known to be still pulling `digest` through (ask the registry).
    fn mirror_warming(&self, digest: &str) -> bool {
        self.warming.lock().get(digest).is_some_and(|(until, _)| Instant::now() < *until)
    }

    /// A mirror answered a range of `digest` with all of it: leave it alone for a while
    /// (doubling each time it still does not have it).
    fn mirror_started(&self, digest: &str) {
        let mut warming = self.warming.lock();
        let wait = warming.get(digest).map_or(MIRROR_FIRST_WAIT, |(_, w)| (*w * 2).min(MIRROR_MAX_WAIT));
        warming.insert(digest.to_string(), (Instant::now() + wait, wait));
        tracing::debug!(%digest, wait_ms = wait.as_millis() as u64, "a mirror is pulling this blob through; its ranges go to the registry meanwhile");
    }

    /// Whether a blob exists.
    pub async fn blob_exists(&self, digest: &str) -> Result<bool> {
        let resp = self.send(&Op::new(Method::HEAD, format!("blobs/{digest}"))).await?;
        Ok(resp.status().is_success())
    }

    /// Uploads a blob (monolithic POST + PUT) unless present; returns its digest.
    pub async fn push_blob(&self, bytes: Bytes) -> Result<String> {
        let digest = sha256_digest(&bytes);
        if self.blob_exists(&digest).await? {
            return Ok(digest);
        }
        let mut start = Op::new(Method::POST, "blobs/uploads/");
        start.push = true;
        let resp = self.send(&start).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.bad("upload start", format!("status {}", resp.status())));
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.bad("upload start", "no Location"))?
            .to_string();
        let base = resp.url().clone();
        let mut url = base.join(&location).map_err(|e| self.bad("upload Location", e.to_string()))?;
        url.query_pairs_mut().append_pair("digest", &digest);
        let mut put = Op::new(Method::PUT, "blobs/uploads/(location)").header(CONTENT_TYPE, "application/octet-stream");
        put.absolute_url = Some(url.to_string());
        put.body = Some(bytes);
        put.push = true;
        let resp = self.send(&put).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.bad("upload", format!("status {}", resp.status())));
        }
        Ok(digest)
    }

    /// PUTs a manifest under `reference` (tag or digest); returns its digest.
    pub async fn put_manifest(&self, reference: &str, media_type: &str, bytes: Bytes) -> Result<String> {
        let digest = sha256_digest(&bytes);
        let mut op = Op::new(Method::PUT, format!("manifests/{reference}")).header(CONTENT_TYPE, media_type);
        op.body = Some(bytes);
        op.push = true;
        let resp = self.send(&op).await?;
        if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::OK {
            return Err(self.bad("manifest upload", format!("status {}", resp.status())));
        }
        Ok(digest)
    }

    /// Manifests whose `subject` is `digest`: the referrers API, else the tag-schema fallback
    /// index `sha256-<hex>`. Filtered by `artifact_type` when given.
    pub async fn referrers(&self, digest: &str, artifact_type: Option<&str>) -> Result<Vec<Descriptor>> {
        let mut op = Op::new(Method::GET, format!("referrers/{digest}")).header(ACCEPT, OCI_INDEX);
        if let Some(t) = artifact_type {
            op.query.push(("artifactType".into(), t.to_string()));
        }
        // The tag-schema fallback is asked at the same time: registries without the API (most
        // today) then cost one round trip, not two.
        let tag = fallback_tag(digest);
        let (resp, fallback) = tokio::join!(self.send(&op), self.get_manifest(&tag));
        let resp = resp?;
        let index = if resp.status().is_success()
            && resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with(OCI_INDEX))
        {
            let bytes = self.body(resp, "referrers", MAX_MANIFEST).await?;
            Some(serde_json::from_slice::<ImageIndex>(&bytes).map_err(|e| self.bad("referrers", e.to_string()))?)
        } else {
            match fallback {
                Ok(m) => Some(
                    serde_json::from_slice::<ImageIndex>(&m.bytes)
                        .map_err(|e| self.bad("referrers tag", e.to_string()))?,
                ),
                Err(RegistryError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            }
        };
        let Some(index) = index else {
            return Ok(Vec::new());
        };
        Ok(index
            .manifests()
            .iter()
            .filter(|d| artifact_type.is_none_or(|t| d.artifact_type().as_ref().is_some_and(|a| a.to_string() == t)))
            .cloned()
            .collect())
    }

    /// Adds `descriptor` to the tag-schema fallback index of `subject` (for registries without
    /// the referrers API): read, append unless present, PUT.
    pub async fn add_referrer_to_fallback_tag(&self, subject: &str, descriptor: Descriptor) -> Result<()> {
        let mut manifests = self.fallback_referrers(subject).await?;
        if manifests.iter().any(|d| d.digest() == descriptor.digest()) {
            return Ok(());
        }
        manifests.push(descriptor);
        self.put_fallback_referrers(subject, &manifests).await
    }

    /// Takes the referrers of `artifact_type` off the tag-schema fallback index of `subject`
    /// (the artifacts stay; registries without the referrers API no longer list them). Returns
    /// how many were taken off.
    pub async fn unlist_referrers(&self, subject: &str, artifact_type: &str) -> Result<usize> {
        let mut manifests = self.fallback_referrers(subject).await?;
        let before = manifests.len();
        manifests.retain(|d| d.artifact_type().as_ref().is_none_or(|a| a.to_string() != artifact_type));
        let removed = before - manifests.len();
        if removed > 0 {
            self.put_fallback_referrers(subject, &manifests).await?;
        }
        Ok(removed)
    }

    /// The entries of the tag-schema fallback index of `subject` (none when it is absent).
    async fn fallback_referrers(&self, subject: &str) -> Result<Vec<Descriptor>> {
        match self.get_manifest(&fallback_tag(subject)).await {
            Ok(m) => Ok(serde_json::from_slice::<ImageIndex>(&m.bytes)
                .map_err(|e| self.bad("referrers tag", e.to_string()))?
                .manifests()
                .clone()),
            Err(RegistryError::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Writes the tag-schema fallback index of `subject` with `manifests`.
    async fn put_fallback_referrers(&self, subject: &str, manifests: &[Descriptor]) -> Result<()> {
        let index = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        let bytes = serde_json::to_vec(&index).map_err(|e| self.bad("referrers tag", e.to_string()))?;
        self.put_manifest(&fallback_tag(subject), OCI_INDEX, Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Publishes `blob` (of `blob_media_type`) as an artifact of `artifact_type` referring to
    /// `subject`: the blob, the empty config, the artifact manifest, listed as a referrer of
    /// `subject` ([`Self::push_referrer`]). Returns the artifact's digest.
    pub async fn push_artifact(
        &self,
        subject: &Subject,
        artifact_type: &str,
        blob_media_type: &str,
        blob: Bytes,
    ) -> Result<String> {
        let size = blob.len();
        let blob_digest = self.push_blob(blob).await?;
        let config = self.push_blob(Bytes::from_static(EMPTY_JSON)).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": { "mediaType": EMPTY_JSON_MEDIA_TYPE, "digest": config, "size": EMPTY_JSON.len() },
            "layers": [{ "mediaType": blob_media_type, "digest": blob_digest, "size": size }],
            "subject": { "mediaType": subject.media_type, "digest": subject.digest, "size": subject.size },
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| self.bad("artifact manifest", e.to_string()))?;
        self.push_referrer(&subject.digest, artifact_type, Bytes::from(bytes)).await
    }

    /// Pushes an artifact manifest of `artifact_type` whose `subject` is `subject` (stored under
    /// its digest) and lists it in the tag-schema fallback index of `subject`, so that
    /// registries without the referrers API find it too. Returns its digest.
    pub async fn push_referrer(&self, subject: &str, artifact_type: &str, manifest: Bytes) -> Result<String> {
        let digest = sha256_digest(&manifest);
        let size = manifest.len() as u64;
        self.put_manifest(&digest, OCI_MANIFEST, manifest).await?;
        let parsed: oci_spec::image::Digest =
            digest.parse().map_err(|e| self.bad("artifact digest", format!("{e}")))?;
        let mut descriptor = Descriptor::new(oci_spec::image::MediaType::ImageManifest, size, parsed);
        descriptor.set_artifact_type(Some(oci_spec::image::MediaType::Other(artifact_type.into())));
        self.add_referrer_to_fallback_tag(subject, descriptor).await?;
        Ok(digest)
    }

    /// Runs `f` again on transient failures that happen after the response started (bodies
    /// cut short, resets mid-body), with the client's backoff.
    async fn retrying<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let policy = self.client_retry();
        let mut attempt = 0;
        loop {
            match Box::pin(f()).await {
                Err(e) if e.is_transient() && attempt < policy.retries => {
                    tracing::debug!(error = %e, attempt, "transient failure reading a response; retrying");
                    tokio::time::sleep(crate::client::backoff(policy.base_delay, attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// How long ranges of a blob a mirror is pulling through go to the registry first, and at most.
const MIRROR_FIRST_WAIT: Duration = Duration::from_secs(2);
const MIRROR_MAX_WAIT: Duration = Duration::from_secs(60);

/// The OCI empty descriptor's media type and content (an artifact's config).
const EMPTY_JSON_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";

/// The manifest an artifact refers to (its `subject`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

impl From<&FetchedManifest> for Subject {
    fn from(m: &FetchedManifest) -> Self {
        Self { digest: m.digest.clone(), media_type: m.media_type.clone(), size: m.bytes.len() as u64 }
    }
}

/// OCI 1.1 referrers tag schema: `sha256:<hex>` -> `sha256-<hex>`.
pub fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim().strip_prefix("bytes ")?;
    let (range, _total) = v.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    Some((s.trim().parse().ok()?, e.trim().parse().ok()?))
}

/// The entry of an index for `platform` (variant compared when both name one).
pub fn select_platform<'a>(manifests: &'a [Descriptor], platform: &Platform) -> Option<&'a Descriptor> {
    manifests.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == platform.os
                && p.architecture().to_string() == platform.architecture
                && match (&platform.variant, p.variant()) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_and_fallback_tag() {
        assert_eq!(parse_content_range("bytes 100-199/1000"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(fallback_tag("sha256:abc"), "sha256-abc");
        assert_eq!(
            Platform::parse("linux/arm64/v8"),
            Some(Platform { os: "linux".into(), architecture: "arm64".into(), variant: Some("v8".into()) })
        );
    }

    #[test]
    fn platform_selection() {
        let index: ImageIndex = serde_json::from_str(r#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#).expect("index");
        let p = Platform { os: "linux".into(), architecture: "amd64".into(), variant: None };
        let d = select_platform(index.manifests(), &p).expect("amd64");
        assert!(d.digest().to_string().starts_with("sha256:2222"));
    }
}
