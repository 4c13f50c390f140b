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
