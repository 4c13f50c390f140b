//! Where snapshot labels are parsed: size validation and the split between the labels stored
//! in metadata and the secret `clip.*` credential labels, which are never stored or returned.

use crate::error::{Result, SnapshotError};
use clip_config::labels::is_secret;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// containerd's limit on a label (`len(key) + len(value)`), from its `labels.Validate`.
pub const MAX_LABEL_SIZE: usize = 4096;

/// Labels of one request, split.
pub struct SnapshotLabels {
    /// What metadata stores and `Stat` returns.
    pub stored: BTreeMap<String, String>,
    /// Secret credential labels by name; their values never reach logs, errors or disk here.
    pub secrets: BTreeMap<String, String>,
}

impl std::fmt::Debug for SnapshotLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotLabels")
            .field("stored", &self.stored)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Validates and splits the labels of a Prepare, View, Commit or Update.
pub fn split<S: BuildHasher>(labels: HashMap<String, String, S>) -> Result<SnapshotLabels> {
    let mut stored = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for (key, value) in labels {
        validate(&key, &value)?;
        if is_secret(&key) {
            secrets.insert(key, value);
        } else {
            stored.insert(key, value);
        }
    }
    Ok(SnapshotLabels { stored, secrets })
}

/// containerd's rule: a non-empty key, and key plus value within [`MAX_LABEL_SIZE`].
pub fn validate(key: &str, value: &str) -> Result<()> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument("label key must not be empty".into()));
    }
    if key.len() + value.len() > MAX_LABEL_SIZE {
        // Name the key (truncated), never the value: it may be a secret.
        let shown: String = key.chars().take(128).collect();
        return Err(SnapshotError::InvalidArgument(format!(
            "label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {shown}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clip_config::labels::BUILD_REGISTRY_CREDS;

    #[test]
    fn secrets_are_split_off_and_oversized_labels_rejected() {
        let l = split(HashMap::from([
            ("a".to_string(), "1".to_string()),
            (BUILD_REGISTRY_CREDS.to_string(), "user:sentinel-pass".to_string()),
        ]))
        .expect("valid");
        assert_eq!(l.stored.len(), 1);
        assert!(l.secrets.contains_key(BUILD_REGISTRY_CREDS));
        assert!(!format!("{l:?}").contains("sentinel-pass"));
        let err = split(HashMap::from([("k".to_string(), "x".repeat(5000))]))
            .expect_err("oversized label");
        assert!(matches!(err, SnapshotError::InvalidArgument(_)));
        let err = split(HashMap::from([(BUILD_REGISTRY_CREDS.to_string(), "s3cret".repeat(1000))]))
            .expect_err("oversized secret");
        assert!(!err.to_string().contains("s3cret"));
    }
}

/// What a Prepare must carry to be served lazily: the target snapshot name containerd asks
/// for, and the image layer it is (CRI labels, or the same set from `clip-snapshotter pull`).
#[derive(Clone)]
pub struct RemoteRequest {
    /// `containerd.io/snapshot.ref`: the chain id the unpacker wants to exist.
    pub target: String,
    pub image_ref: String,
    pub layer_digest: String,
    pub manifest_digest: Option<String>,
    pub index_digest: Option<String>,
    /// The `clip.*` credential labels, by label name.
    pub secrets: BTreeMap<String, String>,
}

impl std::fmt::Debug for RemoteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRequest")
            .field("target", &self.target)
            .field("image_ref", &self.image_ref)
            .field("layer_digest", &self.layer_digest)
            .field("manifest_digest", &self.manifest_digest)
            .field("index_digest", &self.index_digest)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RemoteRequest {
    /// `Some` when the labels identify an image layer to serve remotely.
    pub fn from_labels(labels: &SnapshotLabels) -> Option<Self> {
        use clip_config::labels as l;
        let get = |k: &str| labels.stored.get(k).filter(|v| !v.is_empty()).cloned();
        Some(Self {
            target: get(l::TARGET_SNAPSHOT_REF)?,
            image_ref: get(l::CRI_IMAGE_REF)?,
            layer_digest: get(l::CRI_LAYER_DIGEST)?,
            manifest_digest: get(l::CRI_MANIFEST_DIGEST),
            index_digest: get(l::INDEX_DIGEST),
            secrets: labels.secrets.clone(),
        })
    }
}
