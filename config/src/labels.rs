//! Names of the snapshot labels clip reads. Parsing of their values lives with their users.

/// Set by containerd's unpacker on a Prepare that may be served remotely.
pub const TARGET_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Standard CRI labels (containerd `pkg/snapshotters`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// Prefix of clip's own labels (under `containerd.io/snapshot/` so containerd passes them on).
pub const CLIP_PREFIX: &str = "containerd.io/snapshot/clip.";
/// `username:password`: the short-lived build registry token (BuildRegistryCreds).
pub const BUILD_REGISTRY_CREDS: &str = "containerd.io/snapshot/clip.build-registry-creds";
/// `username:password`: runtime credentials for the image.
pub const IMAGE_CREDS: &str = "containerd.io/snapshot/clip.image-creds";
/// `username:password`: credentials for a custom base image's registry.
pub const SOURCE_IMAGE_CREDS: &str = "containerd.io/snapshot/clip.source-image-creds";
/// Optional digest of the image's index artifact.
pub const INDEX_DIGEST: &str = "containerd.io/snapshot/clip.index-digest";

/// Labels whose values are secrets: never stored in metadata, never returned by `Stat`.
pub const SECRET_LABELS: [&str; 3] = [BUILD_REGISTRY_CREDS, IMAGE_CREDS, SOURCE_IMAGE_CREDS];

/// Whether `key` names a label whose value is a secret.
pub fn is_secret(key: &str) -> bool {
    SECRET_LABELS.contains(&key)
}
