//! Content digests: computing a blob's and checking fetched bytes against the digest they were
//! asked for (sha256 and sha512; any other algorithm is refused, never taken as given).

use crate::error::{RegistryError, Result};
use sha2::{Digest, Sha256};

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks `bytes` against `digest`: sha256 and sha512 are computed and compared; a digest of any
/// other algorithm is refused (never taken as given).
pub(crate) fn verify(digest: &str, bytes: &[u8]) -> Result<()> {
    let actual = match digest.split_once(':') {
        Some(("sha256", _)) => format!("sha256:{}", hex::encode(Sha256::digest(bytes))),
        Some(("sha512", _)) => format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes))),
        _ => {
            return Err(RegistryError::DigestMismatch {
                digest: digest.to_string(),
                actual: "(unsupported digest algorithm: only sha256 and sha512 are verified)".into(),
            });
        }
    };
    if actual != digest {
        return Err(RegistryError::DigestMismatch { digest: digest.to_string(), actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_sha512_are_verified_and_other_algorithms_refused() {
        let data = b"layer bytes";
        let good256 = sha256_digest(data);
        let good512 = format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)));
        assert!(verify(&good256, data).is_ok());
        assert!(verify(&good512, data).is_ok());
        // Seen failing before: a sha512 digest was accepted for any content.
        let wrong512 = format!("sha512:{}", "0".repeat(128));
        assert!(matches!(verify(&wrong512, data), Err(RegistryError::DigestMismatch { .. })));
        assert!(matches!(verify(&good256, b"other bytes"), Err(RegistryError::DigestMismatch { .. })));
        assert!(matches!(verify("md5:00", data), Err(RegistryError::DigestMismatch { .. })));
    }
}
