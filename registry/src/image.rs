//! Image-spec computations on an image's config: its diff IDs, the chain ids containerd
//! names snapshots by, and what an image says of one of its layers.

use crate::api::Platform;
use crate::client::Repository;
use crate::error::RegistryError;
use oci_spec::image::ImageManifest;
use sha2::{Digest, Sha256};

/// Largest image config read for its diff IDs.
const MAX_CONFIG: usize = 8 << 20;

/// A layer as its image describes it: its descriptor and its diff ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub diff_id: String,
}

/// Why an image's description of a layer is unknown.
#[derive(Debug, thiserror::Error)]
pub enum ImageLayerError {
    #[error("reading the image manifest: {0}")]
    Manifest(#[source] RegistryError),
    #[error("the image does not list the layer")]
    NotListed,
    #[error("reading the image config: {0}")]
    Config(#[source] RegistryError),
    #[error(transparent)]
    DiffIds(#[from] DiffIdError),
}

impl Repository {
    /// The diff IDs the config of the image `manifest` names, one per layer, checked.
    pub async fn image_diff_ids(&self, manifest: &ImageManifest) -> Result<Vec<String>, ImageLayerError> {
        let config = manifest.config().digest().to_string();
        let bytes = self.get_blob(&config, MAX_CONFIG).await.map_err(ImageLayerError::Config)?;
        Ok(diff_ids(&bytes, manifest.layers().len())?)
    }

    /// Layer `layer_digest` of the image `manifest_reference` (for this machine's platform):
    /// its descriptor in the manifest and its diff ID in the config.
    pub async fn image_layer(
        &self,
        manifest_reference: &str,
        layer_digest: &str,
    ) -> Result<ImageLayer, ImageLayerError> {
        let (_, manifest) = self
            .get_image_manifest(manifest_reference, &Platform::default())
            .await
            .map_err(ImageLayerError::Manifest)?;
        let position = manifest
            .layers()
            .iter()
            .position(|l| l.digest().to_string() == layer_digest)
            .ok_or(ImageLayerError::NotListed)?;
        let descriptor = &manifest.layers()[position];
        let diff_ids = self.image_diff_ids(&manifest).await?;
        Ok(ImageLayer {
            digest: layer_digest.to_string(),
            size: descriptor.size(),
            media_type: descriptor.media_type().to_string(),
            diff_id: diff_ids[position].clone(),
        })
    }
}

/// Why an image config's diff IDs cannot be used. Never quotes the config.
#[derive(Debug, thiserror::Error)]
pub enum DiffIdError {
    #[error("the image config is not JSON ({0:?} error at line {1} column {2})")]
    NotJson(serde_json::error::Category, usize, usize),
    #[error("the image config has no rootfs.diff_ids")]
    Missing,
    #[error("the image config has a malformed diff ID")]
    Malformed,
    #[error("the image config names {ids} diff IDs for {layers} layers")]
    Count { ids: usize, layers: usize },
}

/// The diff IDs (uncompressed layer digests) an image config names, one per each of `layers`
/// layers, each a well-formed digest.
pub fn diff_ids(config: &[u8], layers: usize) -> Result<Vec<String>, DiffIdError> {
    let value: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| DiffIdError::NotJson(e.classify(), e.line(), e.column()))?;
    let ids: Vec<String> = value["rootfs"]["diff_ids"]
        .as_array()
        .ok_or(DiffIdError::Missing)?
        .iter()
        .map(|d| d.as_str().filter(|d| clip_config::digest::is_digest(d)).map(ToString::to_string))
        .collect::<Option<_>>()
        .ok_or(DiffIdError::Malformed)?;
    if ids.len() != layers {
        return Err(DiffIdError::Count { ids: ids.len(), layers });
    }
    Ok(ids)
}

/// The chain ids of an image's layers (as containerd names their snapshots) from the config's diff ids.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{prev} {d}")))),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn diff_ids_are_checked() {
        let d = format!("sha256:{}", "a".repeat(64));
        let config = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["{d}","{d}"]}}}}"#);
        assert_eq!(super::diff_ids(config.as_bytes(), 2).expect("ok"), vec![d.clone(), d.clone()]);
        assert!(matches!(super::diff_ids(config.as_bytes(), 3), Err(super::DiffIdError::Count { ids: 2, layers: 3 })));
        let bad = r#"{"rootfs":{"diff_ids":["sha256:../../etc"]}}"#;
        assert!(matches!(super::diff_ids(bad.as_bytes(), 1), Err(super::DiffIdError::Malformed)));
        assert!(matches!(super::diff_ids(b"{}", 0), Err(super::DiffIdError::Missing)));
        let e = super::diff_ids(b"{\"x\": SECRET", 0).expect_err("not json");
        assert!(!e.to_string().contains("SECRET"));
    }

    #[test]
    fn chain_ids_follow_containerd() {
        let ids = super::chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        use sha2::Digest;
        assert_eq!(ids[1], format!("sha256:{}", hex::encode(sha2::Sha256::digest("sha256:a sha256:b"))));
    }
}
