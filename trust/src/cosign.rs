//! Signatures in a registry, where cosign keeps them: the manifest tagged `sha256-<hex>.sig` in
//! the signed manifest's repository, one layer per signature (the payload as the blob, the
//! signature in an annotation). [`sign`] adds one; [`verify`] finds one by a trusted key.

use crate::payload::{MAX_PAYLOAD, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE, payload_for, signed_digest};
use crate::{SignKey, TrustError, TrustedKeys};
use bytes::Bytes;
use clip_registry::{RegistryError, Repository};
use oci_spec::image::{Descriptor, ImageManifest, ImageManifestBuilder, MediaType};
use std::collections::HashMap;

/// Signature layers examined at most in one `.sig` manifest.
const MAX_SIGNATURES: usize = 32;

/// The tag cosign keeps the signatures of `digest` under.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// The config cosign writes for a signature manifest whose one layer is `payload_digest`.
fn signature_config(payload_digest: &str) -> Vec<u8> {
    serde_json::json!({
        "architecture": "", "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
        "rootfs": {"type": "layers", "diff_ids": [payload_digest]}, "config": {}
    })
    .to_string()
    .into_bytes()
}

/// Signs the manifest `digest` of `repo` with `key`, adding the signature to its `.sig`
/// manifest; returns that manifest's digest.
pub async fn sign(repo: &Repository, digest: &str, key: &SignKey) -> Result<String, TrustError> {
    let reference = format!("{}/{}", repo.image.registry, repo.image.repository);
    let payload = payload_for(&reference, digest);
    let signature = key.sign(&payload);
    let payload_size = payload.len() as u64;
    let payload_digest =
        repo.push_blob(Bytes::from(payload)).await.map_err(TrustError::registry("pushing the signature payload"))?;
    let tag = signature_tag(digest);
    let mut layers = match repo.get_manifest(&tag).await {
        Ok(m) => serde_json::from_slice::<ImageManifest>(&m.bytes).map(|m| m.layers().clone()).unwrap_or_default(),
        Err(RegistryError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(TrustError::registry(format!("reading {tag}"))(e)),
    };
    let parse = |d: &str| d.parse::<oci_spec::image::Digest>().map_err(|e| TrustError::Payload(e.to_string()));
    let mut layer =
        Descriptor::new(MediaType::Other(SIMPLE_SIGNING_MEDIA_TYPE.into()), payload_size, parse(&payload_digest)?);
    layer.set_annotations(Some(HashMap::from([(SIGNATURE_ANNOTATION.to_string(), signature)])));
    layers.retain(|l| l.digest() != layer.digest() || l.annotations() != layer.annotations());
    layers.push(layer);
    let config = signature_config(&payload_digest);
    let config_size = config.len() as u64;
    let config_digest =
        repo.push_blob(Bytes::from(config)).await.map_err(TrustError::registry("pushing the signature config"))?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(MediaType::ImageConfig, config_size, parse(&config_digest)?))
        .layers(layers)
        .build()
        .map_err(|e| TrustError::Payload(e.to_string()))?;
    let bytes = serde_json::to_vec(&manifest).map_err(|e| TrustError::Payload(e.to_string()))?;
    repo.put_manifest(&tag, clip_registry::api::OCI_MANIFEST, Bytes::from(bytes))
        .await
        .map_err(TrustError::registry(format!("pushing {tag}")))
}

/// Finds a signature of the manifest `digest` in `repo` made by one of `keys` whose payload
/// vouches for that digest; returns the name of the key.
pub async fn verify(repo: &Repository, digest: &str, keys: &TrustedKeys) -> Result<String, TrustError> {
    let tag = signature_tag(digest);
    let fetched = match repo.get_manifest(&tag).await {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => return Err(TrustError::Unsigned { digest: digest.to_string(), tag }),
        Err(e) => return Err(TrustError::registry(format!("reading {tag}"))(e)),
    };
    let manifest: ImageManifest = serde_json::from_slice(&fetched.bytes)
        .map_err(|e| TrustError::Payload(format!("{tag} is not an image manifest: {e}")))?;
    let mut signatures = 0;
    for layer in manifest.layers().iter().take(MAX_SIGNATURES) {
        let signature = layer.annotations().as_ref().and_then(|a| a.get(SIGNATURE_ANNOTATION));
        let (Some(signature), true) = (
            signature,
            layer.media_type().to_string() == SIMPLE_SIGNING_MEDIA_TYPE && layer.size() <= MAX_PAYLOAD as u64,
        ) else {
            continue;
        };
        signatures += 1;
        let payload = match repo.get_blob(layer.digest().as_ref(), MAX_PAYLOAD).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(tag = %tag, error = %e, "a signature payload could not be read");
                continue;
            }
        };
        let Some(signer) = keys.signer(&payload, signature) else { continue };
        match signed_digest(&payload) {
            Ok(claimed) if claimed == digest => return Ok(signer.to_string()),
            Ok(claimed) => tracing::warn!(tag = %tag, %claimed, "a trusted signature vouches for another manifest"),
            Err(e) => tracing::warn!(tag = %tag, error = %e, "a trusted signature has an unusable payload"),
        }
    }
    Err(TrustError::Untrusted { digest: digest.to_string(), signatures })
}
