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
    let mut check = DigestCheck::new(digest)?;
    check.update(bytes);
    check.finish()
}

/// A digest checked as a blob's bytes pass, for blobs too large to hold: sha256 and sha512; a
/// digest of any other algorithm is refused when the check is made.
pub(crate) struct DigestCheck {
    digest: String,
    hasher: Hasher,
}

enum Hasher {
    Sha256(Sha256),
    Sha512(sha2::Sha512),
}

impl DigestCheck {
    pub(crate) fn new(digest: &str) -> Result<Self> {
        let hasher = match digest.split_once(':') {
            Some(("sha256", _)) => Hasher::Sha256(Sha256::new()),
            Some(("sha512", _)) => Hasher::Sha512(sha2::Sha512::new()),
            _ => {
                return Err(RegistryError::DigestMismatch {
                    digest: digest.to_string(),
                    actual: "(unsupported digest algorithm: only sha256 and sha512 are verified)".into(),
                });
            }
        };
        Ok(Self { digest: digest.to_string(), hasher })
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match &mut self.hasher {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// Whether the bytes seen are the digest's.
    pub(crate) fn finish(self) -> Result<()> {
        let actual = match self.hasher {
            Hasher::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Hasher::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        };
        if actual != self.digest {
            return Err(RegistryError::DigestMismatch { digest: self.digest, actual });
        }
        Ok(())
    }
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

    #[test]
    fn a_digest_checked_in_pieces_is_the_digest_of_the_whole() {
        let mut check = DigestCheck::new(&sha256_digest(b"layer bytes")).expect("sha256");
        check.update(b"layer ");
        check.update(b"bytes");
        assert!(check.finish().is_ok());
        let mut check = DigestCheck::new(&sha256_digest(b"layer bytes")).expect("sha256");
        check.update(b"layer bytez");
        assert!(matches!(check.finish(), Err(RegistryError::DigestMismatch { .. })));
    }
}
