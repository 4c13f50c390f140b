//! Content digests (`sha256:<64 hex>`, `sha512:<128 hex>`, lowercase): the one check clip makes
//! of a digest from a label, a reference, an artifact or a sidecar file before using it in a
//! path or a request.

/// A string that is not a digest clip accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm")]
    NoAlgorithm(String),
    #[error("invalid digest {0:?}")]
    Invalid(String),
}

/// Checks `d` is a sha256 or sha512 digest in canonical form.
pub fn validate(d: &str) -> Result<(), DigestError> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(DigestError::NoAlgorithm(d.to_string()));
    };
    let lower_hex = |n: usize| hex.len() == n && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let ok = match algo {
        "sha256" => lower_hex(64),
        "sha512" => lower_hex(128),
        _ => false,
    };
    if ok { Ok(()) } else { Err(DigestError::Invalid(d.to_string())) }
}

/// Whether `s` passes [`validate`].
pub fn is_digest(s: &str) -> bool {
    validate(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sha256_and_sha512_only() {
        let h64 = "0123456789abcdef".repeat(4);
        assert!(is_digest(&format!("sha256:{h64}")));
        assert!(is_digest(&format!("sha512:{h64}{h64}")));
        assert!(!is_digest(&format!("sha256:{}", h64.to_uppercase())));
        assert!(!is_digest(&format!("sha256:{}", &h64[1..])));
        assert!(!is_digest(&format!("md5:{h64}")));
        assert_eq!(validate("abc"), Err(DigestError::NoAlgorithm("abc".into())));
        assert!(matches!(validate("sha256:../../etc"), Err(DigestError::Invalid(_))));
    }
}
