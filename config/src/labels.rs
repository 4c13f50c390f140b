//! Where snapshot labels are parsed: the names of the labels clip reads, size validation, the
//! split between the labels stored in metadata and the secret `clip.*` credential labels (never
//! stored or returned), and the lazy-serving request they make. Credential values are parsed by
//! `clip-registry`.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// A malformed label; the message names the label, never a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LabelError(pub String);

use crate::digest::is_digest;

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
/// `true`: reach the image's registry over plain HTTP unless a `hosts.toml` configures it
/// (`clip-snapshotter pull --plain-http`).
pub const PLAIN_HTTP: &str = "containerd.io/snapshot/clip.plain-http";
/// Set by the snapshotter on a snapshot it could not serve lazily: why (no secret in it).
pub const NOT_LAZY_REASON: &str = "containerd.io/snapshot/clip.not-lazy";
/// How a [`NOT_LAZY_REASON`] begins when the image has no index at all: none of its layers will
/// be served lazily (the pull client then downloads the next layers while one is applied).
pub const NOT_LAZY_NO_INDEX: &str = "no CLIP index is published for ";

/// Set by the snapshotter on a layer it unpacked itself because no index serves it (with
/// [`NOT_LAZY_REASON`] saying why): the diff ID it checked.
pub const UNPACKED_BY_CLIP: &str = "containerd.io/snapshot/clip.unpacked";

/// Labels whose values are secrets: never stored in metadata, never returned by `Stat`.
pub const SECRET_LABELS: [&str; 3] = [BUILD_REGISTRY_CREDS, IMAGE_CREDS, SOURCE_IMAGE_CREDS];

/// Whether `key` names a label whose value is a secret.
pub fn is_secret(key: &str) -> bool {
    SECRET_LABELS.contains(&key)
}

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
pub fn split<S: BuildHasher>(labels: HashMap<String, String, S>) -> Result<SnapshotLabels, LabelError> {
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
pub fn validate(key: &str, value: &str) -> Result<(), LabelError> {
    if key.is_empty() {
        return Err(LabelError("label key must not be empty".into()));
    }
    if key.len() + value.len() > MAX_LABEL_SIZE {
        // Name the key (truncated), never the value: it may be a secret.
        let shown: String = key.chars().take(128).collect();
        return Err(LabelError(format!(
            "label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {shown}"
        )));
    }
    Ok(())
}

/// The labels containerd's CRI plugin puts on the Prepare of layer `i` of an image
/// (`snapshotters.AppendInfoHandlerWrapper`): the target chain id, the image, its manifest, the
/// layer, and this and the following layers within the label size limit.
pub fn cri_layer_labels(
    target: &str,
    image_ref: &str,
    manifest_digest: &str,
    layer_digests: &[String],
    i: usize,
) -> HashMap<String, String> {
    let mut labels = HashMap::from([
        (TARGET_SNAPSHOT_REF.to_string(), target.to_string()),
        (CRI_IMAGE_REF.to_string(), image_ref.to_string()),
        (CRI_MANIFEST_DIGEST.to_string(), manifest_digest.to_string()),
        (CRI_LAYER_DIGEST.to_string(), layer_digests.get(i).cloned().unwrap_or_default()),
    ]);
    let mut layers = String::new();
    for d in layer_digests.iter().skip(i) {
        if layers.len() + d.len() + 1 + CRI_IMAGE_LAYERS.len() > 4000 {
            break;
        }
        if !layers.is_empty() {
            layers.push(',');
        }
        layers.push_str(d);
    }
    labels.insert(CRI_IMAGE_LAYERS.to_string(), layers);
    labels
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
    /// The registry is reached over plain HTTP ([`PLAIN_HTTP`]).
    pub plain_http: bool,
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
            .field("plain_http", &self.plain_http)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RemoteRequest {
    /// `Ok(Some)` when the labels identify an image layer to serve remotely, `Ok(None)` when
    /// they do not, an error when they try to but are malformed (a digest that is not one:
    /// digests become file names).
    pub fn from_labels(labels: &SnapshotLabels) -> Result<Option<Self>, LabelError> {
        let get = |k: &str| labels.stored.get(k).filter(|v| !v.is_empty()).cloned();
        let (Some(target), Some(image_ref), Some(layer_digest)) =
            (get(TARGET_SNAPSHOT_REF), get(CRI_IMAGE_REF), get(CRI_LAYER_DIGEST))
        else {
            return Ok(None);
        };
        let digest = |label: &str, v: Option<String>| -> Result<Option<String>, LabelError> {
            match v {
                Some(d) if !is_digest(&d) => Err(LabelError(format!("label {label} is not a sha256/sha512 digest"))),
                other => Ok(other),
            }
        };
        Ok(Some(Self {
            target,
            image_ref,
            layer_digest: digest(CRI_LAYER_DIGEST, Some(layer_digest))?.unwrap_or_default(),
            manifest_digest: digest(CRI_MANIFEST_DIGEST, get(CRI_MANIFEST_DIGEST))?,
            index_digest: digest(INDEX_DIGEST, get(INDEX_DIGEST))?,
            plain_http: get(PLAIN_HTTP).is_some_and(|v| v == "true"),
            secrets: labels.secrets.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = split(HashMap::from([("k".to_string(), "x".repeat(5000))])).expect_err("oversized label");
        assert!(err.to_string().contains("maximum size"));
        let err = split(HashMap::from([(BUILD_REGISTRY_CREDS.to_string(), "s3cret".repeat(1000))]))
            .expect_err("oversized secret");
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn remote_requests_need_well_formed_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let base = |layer: &str| {
            split(HashMap::from([
                (TARGET_SNAPSHOT_REF.to_string(), "chain".to_string()),
                (CRI_IMAGE_REF.to_string(), "reg/x:1".to_string()),
                (CRI_LAYER_DIGEST.to_string(), layer.to_string()),
            ]))
            .expect("valid")
        };
        assert_eq!(RemoteRequest::from_labels(&base(&d)).expect("ok").expect("remote").layer_digest, d);
        assert!(RemoteRequest::from_labels(&base("sha256:../../etc/passwd")).is_err());
        assert!(RemoteRequest::from_labels(&base(&format!("sha256:{}", "A".repeat(64)))).is_err());
        assert!(
            RemoteRequest::from_labels(&split(HashMap::<String, String>::new()).expect("empty")).expect("ok").is_none()
        );
    }
}
