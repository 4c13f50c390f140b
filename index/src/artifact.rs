//! How an image's CLIP indexes travel through a registry: one OCI artifact manifest per image,
//! whose `subject` is the image manifest (found through the referrers API or the OCI 1.1
//! tag-schema fallback `sha256-<hex>`), with one layer per image layer holding that layer's
//! packed index (gzip layers: a version-2 index without its zran windows, plus a second layer
//! holding the windows, each checked against a digest in the index). The builder publishes it;
//! the snapshotter discovers it.
//!
//! ```json
//! { "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
//!   "artifactType": "application/vnd.clip.index.v1",
//!   "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:44136f…", "size": 2 },
//!   "layers": [ { "mediaType": "application/vnd.clip.index.layer.v1+zstd", "digest": "…", "size": 96278,
//!                 "annotations": { "dev.clip.layer.digest": "sha256:…" } },
//!               { "mediaType": "application/vnd.clip.index.windows.v1", "digest": "…", "size": 2862855,
//!                 "annotations": { "dev.clip.layer.digest": "sha256:…" } } ],
//!   "subject": { "mediaType": "…manifest…", "digest": "sha256:…", "size": 1234 },
//!   "annotations": { "dev.clip.index.version": "1" } }
//! ```

/// `artifactType` of an image's index artifact.
pub const ARTIFACT_TYPE: &str = "application/vnd.clip.index.v1";
/// Media type of one layer's packed index (a zstd frame of the index bytes).
pub const LAYER_INDEX_MEDIA_TYPE: &str = "application/vnd.clip.index.layer.v1+zstd";
/// Media type of one layer's windows blob (the zran windows of an index of version 2, split
/// off so that readers fetch only the windows of the spans they read).
pub const LAYER_WINDOWS_MEDIA_TYPE: &str = "application/vnd.clip.index.windows.v1";
/// Annotation on each artifact layer: the digest of the image layer it indexes.
pub const LAYER_DIGEST_ANNOTATION: &str = "dev.clip.layer.digest";
/// Annotation on the artifact: the index format version.
pub const VERSION_ANNOTATION: &str = "dev.clip.index.version";
/// The OCI empty config descriptor's media type and content.
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG: &[u8] = b"{}";

use oci_spec::image::{Descriptor, ImageManifest, ImageManifestBuilder, MediaType};
use std::collections::HashMap;

/// Most blobs an index artifact may list: an index and a windows blob for each of 1,024
/// layers (images have at most a few hundred).
pub const MAX_ARTIFACT_BLOBS: usize = 2048;

/// OCI image manifest media type (the artifact is one).
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A manifest that is not a CLIP index artifact, or that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("not an OCI image manifest: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a CLIP index artifact (artifactType {0:?})")]
    NotAnIndex(Option<String>),
    #[error("invalid artifact: {0}")]
    Invalid(String),
}

/// Which blob of a layer an artifact layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// The layer's packed index ([`LAYER_INDEX_MEDIA_TYPE`]).
    Index,
    /// The zran windows split off the index ([`LAYER_WINDOWS_MEDIA_TYPE`]).
    Windows,
}

impl BlobKind {
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Index => LAYER_INDEX_MEDIA_TYPE,
            Self::Windows => LAYER_WINDOWS_MEDIA_TYPE,
        }
    }
}

/// One blob of the artifact: for image layer `layer_digest`, its index or windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactBlob {
    pub kind: BlobKind,
    pub digest: String,
    pub size: u64,
    pub layer_digest: String,
}

/// An image's index artifact: the typed view of its manifest (see the module docs).
#[derive(Debug, Clone)]
pub struct IndexArtifact {
    manifest: ImageManifest,
}

fn digest_of(d: &str) -> Result<oci_spec::image::Digest, ArtifactError> {
    d.parse().map_err(|e| ArtifactError::Invalid(format!("digest {d:?}: {e}")))
}

impl IndexArtifact {
    /// The artifact for the image manifest `subject`, with an empty config stored as
    /// `config_digest`, holding `blobs`.
    pub fn new(subject: Descriptor, config_digest: &str, blobs: &[ArtifactBlob]) -> Result<Self, ArtifactError> {
        let config = Descriptor::new(
            MediaType::Other(EMPTY_CONFIG_MEDIA_TYPE.into()),
            EMPTY_CONFIG.len() as u64,
            digest_of(config_digest)?,
        );
        let layers = blobs
            .iter()
            .map(|b| {
                let mut d =
                    Descriptor::new(MediaType::Other(b.kind.media_type().into()), b.size, digest_of(&b.digest)?);
                d.set_annotations(Some(HashMap::from([(LAYER_DIGEST_ANNOTATION.to_string(), b.layer_digest.clone())])));
                Ok(d)
            })
            .collect::<Result<Vec<_>, ArtifactError>>()?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .artifact_type(MediaType::Other(ARTIFACT_TYPE.into()))
            .config(config)
            .layers(layers)
            .subject(subject)
            .annotations(HashMap::from([(VERSION_ANNOTATION.to_string(), "1".to_string())]))
            .build()
            .map_err(|e| ArtifactError::Invalid(e.to_string()))?;
        Ok(Self { manifest })
    }

    /// Parses a fetched manifest; anything but a CLIP index artifact is an error, and so is
    /// one with more than [`MAX_ARTIFACT_BLOBS`] layers (lookups walk them).
    pub fn parse(bytes: &[u8]) -> Result<Self, ArtifactError> {
        let manifest: ImageManifest = serde_json::from_slice(bytes)?;
        let artifact_type = manifest.artifact_type().as_ref().map(ToString::to_string);
        if artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(ArtifactError::NotAnIndex(artifact_type));
        }
        if manifest.layers().len() > MAX_ARTIFACT_BLOBS {
            return Err(ArtifactError::Invalid(format!(
                "{} layers, more than the {MAX_ARTIFACT_BLOBS} an index artifact may have",
                manifest.layers().len()
            )));
        }
        Ok(Self { manifest })
    }

    /// The manifest's JSON (what is pushed and what its digest is taken of).
    pub fn to_bytes(&self) -> Result<Vec<u8>, ArtifactError> {
        Ok(serde_json::to_vec(&self.manifest)?)
    }

    /// The digest of the image manifest the artifact is for.
    pub fn subject_digest(&self) -> Option<String> {
        self.manifest.subject().as_ref().map(|s| s.digest().to_string())
    }

    /// The artifact's blobs that name the image layer they are for, in order.
    pub fn blobs(&self) -> Vec<ArtifactBlob> {
        self.manifest
            .layers()
            .iter()
            .filter_map(|l| {
                let media_type = l.media_type().to_string();
                let kind = [BlobKind::Index, BlobKind::Windows].into_iter().find(|k| k.media_type() == media_type)?;
                let layer_digest = l.annotations().as_ref()?.get(LAYER_DIGEST_ANNOTATION)?.clone();
                Some(ArtifactBlob { kind, digest: l.digest().to_string(), size: l.size(), layer_digest })
            })
            .collect()
    }

    /// The digest of `layer`'s blob of `kind`.
    pub fn blob_for(&self, layer: &str, kind: BlobKind) -> Option<String> {
        self.blobs().into_iter().find(|b| b.kind == kind && b.layer_digest == layer).map(|b| b.digest)
    }

    /// The image layers the artifact has an index for.
    pub fn indexed_layers(&self) -> Vec<String> {
        self.blobs().into_iter().filter(|b| b.kind == BlobKind::Index).map(|b| b.layer_digest).collect()
    }

    /// Every blob the manifest references (config and layers), to copy it.
    pub fn referenced_blobs(&self) -> Vec<String> {
        std::iter::once(self.manifest.config().digest().to_string())
            .chain(self.manifest.layers().iter().map(|l| l.digest().to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn round_trip_and_lookups() {
        let subject = Descriptor::new(MediaType::ImageManifest, 1234, digest_of(&d(1)).expect("digest"));
        let blobs = vec![
            ArtifactBlob { kind: BlobKind::Index, digest: d(2), size: 10, layer_digest: d(8) },
            ArtifactBlob { kind: BlobKind::Windows, digest: d(3), size: 20, layer_digest: d(8) },
            ArtifactBlob { kind: BlobKind::Index, digest: d(4), size: 30, layer_digest: d(9) },
        ];
        let a = IndexArtifact::new(subject, &d(5), &blobs).expect("artifact");
        let bytes = a.to_bytes().expect("json");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("value");
        assert_eq!(v["artifactType"], ARTIFACT_TYPE);
        assert_eq!(v["mediaType"], OCI_MANIFEST_MEDIA_TYPE);
        assert_eq!(v["config"]["mediaType"], EMPTY_CONFIG_MEDIA_TYPE);
        assert_eq!(v["layers"][1]["annotations"][LAYER_DIGEST_ANNOTATION], d(8).as_str());
        let back = IndexArtifact::parse(&bytes).expect("parse");
        assert_eq!(back.blobs(), blobs);
        assert_eq!(back.subject_digest(), Some(d(1)));
        assert_eq!(back.blob_for(&d(8), BlobKind::Windows), Some(d(3)));
        assert_eq!(back.blob_for(&d(9), BlobKind::Windows), None);
        assert_eq!(back.indexed_layers(), vec![d(8), d(9)]);
        assert_eq!(back.referenced_blobs(), vec![d(5), d(2), d(3), d(4)]);
    }

    #[test]
    fn other_manifests_are_refused() {
        let plain = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
        assert!(matches!(IndexArtifact::parse(plain), Err(ArtifactError::NotAnIndex(None))));
        assert!(matches!(IndexArtifact::parse(b"[1,2]"), Err(ArtifactError::Json(_))));
    }
}
