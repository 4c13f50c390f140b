//! cosign's simple-signing payload: the JSON document a signature covers. Its claim that
//! matters here is the digest of the signed manifest (`critical.image.docker-manifest-digest`).

use crate::TrustError;
use serde::{Deserialize, Serialize};

/// Media type of a signature layer: the payload, with the signature in an annotation.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding the base64 (DER) ECDSA signature of the payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a cosign image signature.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Largest payload read (cosign's are a few hundred bytes).
pub const MAX_PAYLOAD: usize = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    critical: Critical,
    optional: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The payload cosign signs for the manifest `digest` of repository `docker_reference`
/// (`host/repository`), byte for byte as cosign writes it.
pub fn payload_for(docker_reference: &str, digest: &str) -> Vec<u8> {
    let p = Payload {
        critical: Critical {
            identity: Identity { docker_reference: docker_reference.to_string() },
            image: Image { docker_manifest_digest: digest.to_string() },
            kind: SIGNATURE_TYPE.to_string(),
        },
        optional: None,
    };
    serde_json::to_vec(&p).unwrap_or_default()
}

/// The manifest digest a (verified) payload vouches for.
pub fn signed_digest(payload: &[u8]) -> Result<String, TrustError> {
    let p: Payload = serde_json::from_slice(payload)
        .map_err(|e| TrustError::Payload(format!("not a simple-signing payload: {e}")))?;
    if p.critical.kind != SIGNATURE_TYPE {
        return Err(TrustError::Payload(format!("type {:?} is not {SIGNATURE_TYPE:?}", p.critical.kind)));
    }
    Ok(p.critical.image.docker_manifest_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_cosigns_and_its_claim_is_read_back() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let p = payload_for("127.0.0.1:5000/t/bb", &d);
        assert_eq!(
            String::from_utf8_lossy(&p),
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"127.0.0.1:5000/t/bb"}},"image":{{"docker-manifest-digest":"{d}"}},"type":"cosign container image signature"}},"optional":null}}"#
            )
        );
        assert_eq!(signed_digest(&p).expect("claim"), d);
        assert!(signed_digest(br#"{"critical":{"identity":{"docker-reference":""},"image":{"docker-manifest-digest":"x"},"type":"other"},"optional":null}"#).is_err());
        assert!(signed_digest(b"[]").is_err());
    }
}
