//! Access profiles: which spans of an image's layers a container start read, in the order it
//! first read them, and how a profile travels through a registry. The snapshotter records one
//! per image (from a container's first read until reads go quiet), keeps it under its root,
//! publishes it as an OCI artifact whose `subject` is the image manifest (found like the index
//! artifact: the referrers API or the tag-schema fallback), and replays it on cold nodes: the
//! profile's spans are fetched first, merged into few large requests. A profile is only a hint:
//! every span it brings is verified against the layer's index like any other, so a wrong or
//! stale profile costs bandwidth, never correctness.
//!
//! The profile blob (JSON; `reads` are `[position in layers, span]`, first read first):
//! ```json
//! { "schemaVersion": 1, "image": "sha256:…(image manifest)",
//!   "layers": ["sha256:…", "sha256:…"], "reads": [[1, 40], [1, 41], [0, 3]], "recordedMs": 2140 }
//! ```
//! The artifact: an OCI image manifest with `artifactType` [`PROFILE_ARTIFACT_TYPE`], the empty
//! config, one layer of [`PROFILE_MEDIA_TYPE`] (the blob above) and the image manifest as `subject`
//! (pushed with `clip_registry::Repository::push_artifact`).

use oci_spec::image::ImageManifest;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// `artifactType` of an image's access profile artifact.
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.clip.profile.v1";
/// Media type of the profile blob.
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.clip.profile.v1+json";
/// Largest profile blob accepted (a profile of every span of a large image is far below this).
pub const MAX_PROFILE_BYTES: usize = 16 << 20;
/// Most reads one profile holds.
pub const MAX_PROFILE_READS: usize = 1 << 20;
const VERSION: u32 = 1;

/// A profile that cannot be used; the snapshotter logs it and starts without.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("not an access profile: {0}")]
    Json(#[from] serde_json::Error),
    #[error("access profile version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("invalid access profile: {0}")]
    Invalid(String),
    #[error("the access profile is for image {found}, not {expected}")]
    Foreign { expected: String, found: String },
    #[error("not an access profile artifact (artifactType {0:?})")]
    NotAProfile(Option<String>),
}

/// One image's access profile (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessProfile {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Digest of the image manifest it was recorded for.
    pub image: String,
    /// Layer digests `reads` refer to by position.
    pub layers: Vec<String>,
    /// `(position in layers, span)`, in the order first read.
    pub reads: Vec<(u32, u32)>,
    /// How long the recording lasted, from the first read.
    #[serde(rename = "recordedMs", default)]
    pub recorded_ms: u64,
}

fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl AccessProfile {
    /// A profile of `image` from reads named by layer digest, in order.
    pub fn from_reads<'a>(image: &str, reads: impl IntoIterator<Item = (&'a str, u32)>, recorded_ms: u64) -> Self {
        let mut layers: Vec<String> = Vec::new();
        let mut position: HashMap<String, u32> = HashMap::new();
        let reads = reads
            .into_iter()
            .take(MAX_PROFILE_READS)
            .map(|(layer, span)| {
                let n = *position.entry(layer.to_string()).or_insert_with(|| {
                    layers.push(layer.to_string());
                    (layers.len() - 1) as u32
                });
                (n, span)
            })
            .collect();
        Self { schema_version: VERSION, image: image.to_string(), layers, reads, recorded_ms }
    }

    /// Parses and checks a profile blob: version, digests, layer positions, size.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProfileError> {
        if bytes.len() > MAX_PROFILE_BYTES {
            return Err(ProfileError::Invalid(format!("{} bytes, more than {MAX_PROFILE_BYTES}", bytes.len())));
        }
        let p: Self = serde_json::from_slice(bytes)?;
        if p.schema_version != VERSION {
            return Err(ProfileError::Version(p.schema_version));
        }
        if !is_digest(&p.image) {
            return Err(ProfileError::Invalid(format!("image digest {:?}", p.image)));
        }
        if let Some(bad) = p.layers.iter().find(|l| !is_digest(l)) {
            return Err(ProfileError::Invalid(format!("layer digest {bad:?}")));
        }
        if p.reads.len() > MAX_PROFILE_READS {
            return Err(ProfileError::Invalid(format!("{} reads, more than {MAX_PROFILE_READS}", p.reads.len())));
        }
        if let Some((n, _)) = p.reads.iter().find(|(n, _)| *n as usize >= p.layers.len()) {
            return Err(ProfileError::Invalid(format!("a read names layer {n} of {}", p.layers.len())));
        }
        Ok(p)
    }

    /// The blob's JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A profile recorded for another image is not used.
    pub fn check_image(&self, manifest_digest: &str) -> Result<(), ProfileError> {
        if self.image == manifest_digest {
            Ok(())
        } else {
            Err(ProfileError::Foreign { expected: manifest_digest.to_string(), found: self.image.clone() })
        }
    }

    /// The reads of `layer` as `(rank, span)`: rank is the read's place in the whole profile.
    pub fn reads_of(&self, layer: &str) -> Vec<(u32, u32)> {
        let Some(n) = self.layers.iter().position(|l| l == layer) else { return Vec::new() };
        self.reads
            .iter()
            .enumerate()
            .filter(|(_, (l, _))| *l as usize == n)
            .map(|(rank, (_, span))| (rank as u32, *span))
            .collect()
    }
}

/// The profile blob's digest in a fetched artifact manifest (anything but a profile artifact
/// for `subject` is an error).
pub fn profile_blob(manifest: &[u8], subject: &str) -> Result<String, ProfileError> {
    let m: ImageManifest = serde_json::from_slice(manifest)?;
    let artifact_type = m.artifact_type().as_ref().map(ToString::to_string);
    if artifact_type.as_deref() != Some(PROFILE_ARTIFACT_TYPE) {
        return Err(ProfileError::NotAProfile(artifact_type));
    }
    let found = m.subject().as_ref().map(|s| s.digest().to_string()).unwrap_or_default();
    if found != subject {
        return Err(ProfileError::Foreign { expected: subject.to_string(), found });
    }
    m.layers()
        .iter()
        .find(|l| l.media_type().to_string() == PROFILE_MEDIA_TYPE)
        .map(|l| l.digest().to_string())
        .ok_or_else(|| ProfileError::Invalid("the artifact holds no profile blob".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn round_trip_and_reads_by_layer() {
        let (a, b) = (d(1), d(2));
        let p = AccessProfile::from_reads(&d(9), [(a.as_str(), 5), (b.as_str(), 0), (a.as_str(), 6)], 1200);
        assert_eq!(p.layers, vec![a.clone(), b.clone()]);
        assert_eq!(p.reads, vec![(0, 5), (1, 0), (0, 6)]);
        let back = AccessProfile::parse(&p.to_json()).expect("parse");
        assert_eq!(back, p);
        assert_eq!(back.reads_of(&a), vec![(0, 5), (2, 6)]);
        assert_eq!(back.reads_of(&b), vec![(1, 0)]);
        assert!(back.reads_of(&d(3)).is_empty());
        assert!(back.check_image(&d(9)).is_ok());
        assert!(matches!(back.check_image(&d(8)), Err(ProfileError::Foreign { .. })));
    }

    #[test]
    fn bad_profiles_are_refused() {
        let ok = AccessProfile::from_reads(&d(9), [(d(1).as_str(), 1)], 0);
        let mut v: serde_json::Value = serde_json::from_slice(&ok.to_json()).expect("json");
        v["reads"] = serde_json::json!([[3, 1]]);
        assert!(matches!(AccessProfile::parse(v.to_string().as_bytes()), Err(ProfileError::Invalid(_))));
        v["reads"] = serde_json::json!([]);
        v["schemaVersion"] = 7.into();
        assert!(matches!(AccessProfile::parse(v.to_string().as_bytes()), Err(ProfileError::Version(7))));
        v["schemaVersion"] = 1.into();
        v["image"] = "latest".into();
        assert!(matches!(AccessProfile::parse(v.to_string().as_bytes()), Err(ProfileError::Invalid(_))));
        assert!(matches!(AccessProfile::parse(b"\x1f\x8b garbage"), Err(ProfileError::Json(_))));
    }

    #[test]
    fn artifact_names_its_blob_and_subject() {
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": PROFILE_ARTIFACT_TYPE,
            "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": d(4), "size": 2 },
            "layers": [{ "mediaType": PROFILE_MEDIA_TYPE, "digest": d(5), "size": 77 }],
            "subject": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d(9), "size": 321 },
        });
        let bytes = serde_json::to_vec(&manifest).expect("json");
        assert_eq!(profile_blob(&bytes, &d(9)).expect("blob"), d(5));
        assert!(matches!(profile_blob(&bytes, &d(8)), Err(ProfileError::Foreign { .. })));
        let index_artifact = bytes.clone();
        let other = String::from_utf8(index_artifact).expect("utf8").replace(PROFILE_ARTIFACT_TYPE, "x/y");
        assert!(matches!(profile_blob(other.as_bytes(), &d(9)), Err(ProfileError::NotAProfile(_))));
    }
}
