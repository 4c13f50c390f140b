//! Keys: the public keys a node trusts ([`TrustedKeys`]) and the key a builder signs with
//! ([`SignKey`]). Both are ECDSA P-256, as cosign makes them: a public key is a PEM
//! `PUBLIC KEY` (`cosign.pub`); a signing key is a PEM PKCS#8 or SEC1 private key, or cosign's
//! own encrypted `cosign.key` (scrypt and NaCl secretbox around a PKCS#8 key), opened with its
//! password.

use crate::TrustError;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _, LineEnding};
use std::path::Path;

/// Largest key file read.
const MAX_KEY_FILE: u64 = 64 << 10;
/// The PEM labels of cosign's encrypted private keys (the second is what older cosign wrote).
const ENCRYPTED_LABELS: [&str; 2] = ["ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY"];

fn read_key_file(path: &Path) -> Result<String, TrustError> {
    let err = |message: String| TrustError::Key { path: path.display().to_string(), message };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(err(format!("{} bytes is not a key file", meta.len())));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

/// The public keys whose signatures a node accepts.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    /// Each key with the name it is logged by (its file).
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    /// Loads PEM public keys from `paths`; any that does not load is an error.
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Self, TrustError> {
        let mut keys = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let pem = read_key_file(path)?;
            let key = VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| TrustError::Key {
                path: path.display().to_string(),
                message: format!("not a PEM ECDSA P-256 public key: {e}"),
            })?;
            keys.push((path.display().to_string(), key));
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the trusted key that made `signature_b64` (base64 DER) over `payload`, if
    /// one did.
    pub fn signer(&self, payload: &[u8], signature_b64: &str) -> Option<&str> {
        let der = B64.decode(signature_b64.trim()).ok()?;
        let sig = Signature::from_der(&der).ok()?;
        self.keys.iter().find(|(_, k)| k.verify(payload, &sig).is_ok()).map(|(name, _)| name.as_str())
    }
}

/// A key to sign index artifacts with.
pub struct SignKey(SigningKey);

impl std::fmt::Debug for SignKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignKey(..)")
    }
}

impl SignKey {
    /// Loads a PEM private key; `password` opens cosign's encrypted format.
    pub fn load(path: &Path, password: Option<&[u8]>) -> Result<Self, TrustError> {
        let err = |message: String| TrustError::Key { path: path.display().to_string(), message };
        let pem = read_key_file(path)?;
        let pem = pem.trim();
        if let Some(label) = ENCRYPTED_LABELS.iter().find(|l| pem.starts_with(&format!("-----BEGIN {l}-----"))) {
            let password = password.ok_or_else(|| err("an encrypted cosign key needs its password".into()))?;
            let der = decrypt_cosign_key(pem, label, password).map_err(err)?;
            return SigningKey::from_pkcs8_der(&der).map(Self).map_err(|e| err(format!("not an ECDSA P-256 key: {e}")));
        }
        if let Ok(k) = SigningKey::from_pkcs8_pem(pem) {
            return Ok(Self(k));
        }
        p256::SecretKey::from_sec1_pem(pem)
            .map(|k| Self(SigningKey::from(k)))
            .map_err(|_| err("not a PEM ECDSA P-256 private key (PKCS#8, SEC1 or cosign's encrypted format)".into()))
    }

    /// The base64 DER ECDSA signature of `payload` (SHA-256), as cosign stores it.
    pub fn sign(&self, payload: &[u8]) -> String {
        let sig: DerSignature = self.0.sign(payload);
        B64.encode(sig.as_bytes())
    }

    /// The PEM public key (what `cosign verify --key` and `[trust] keys` take).
    pub fn public_pem(&self) -> Result<String, TrustError> {
        self.0
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| TrustError::Key { path: "(signing key)".into(), message: e.to_string() })
    }
}

/// The PKCS#8 DER inside cosign's encrypted key: base64 JSON naming scrypt parameters, a salt,
/// a secretbox nonce and the ciphertext.
fn decrypt_cosign_key(pem: &str, label: &str, password: &[u8]) -> Result<Vec<u8>, String> {
    use crypto_secretbox::aead::{Aead as _, KeyInit as _};
    #[derive(serde::Deserialize)]
    struct Envelope {
        kdf: Kdf,
        cipher: Cipher,
        ciphertext: String,
    }
    #[derive(serde::Deserialize)]
    struct Kdf {
        name: String,
        params: KdfParams,
        salt: String,
    }
    #[derive(serde::Deserialize)]
    struct KdfParams {
        #[serde(rename = "N")]
        n: u64,
        r: u32,
        p: u32,
    }
    #[derive(serde::Deserialize)]
    struct Cipher {
        name: String,
        nonce: String,
    }
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with(&format!("-----BEGIN {label}")) && !l.starts_with(&format!("-----END {label}")))
        .collect();
    let json = B64.decode(body.trim()).map_err(|e| format!("bad base64: {e}"))?;
    let env: Envelope = serde_json::from_slice(&json).map_err(|e| format!("not cosign's key envelope: {e}"))?;
    if env.kdf.name != "scrypt" || env.cipher.name != "nacl/secretbox" {
        return Err(format!("unknown key encryption {}/{}", env.kdf.name, env.cipher.name));
    }
    let KdfParams { n, r, p } = env.kdf.params;
    // Bounded: a hostile file must not ask for gigabytes of scrypt memory.
    if !n.is_power_of_two() || n > 1 << 20 || r > 32 || p > 16 {
        return Err(format!("scrypt parameters N={n} r={r} p={p} out of range"));
    }
    let params = scrypt::Params::new(n.trailing_zeros() as u8, r, p, 32).map_err(|e| format!("scrypt: {e}"))?;
    let salt = B64.decode(env.kdf.salt).map_err(|e| format!("bad salt: {e}"))?;
    let mut key = [0u8; 32];
    scrypt::scrypt(password, &salt, &params, &mut key).map_err(|e| format!("scrypt: {e}"))?;
    let nonce = B64.decode(env.cipher.nonce).map_err(|e| format!("bad nonce: {e}"))?;
    if nonce.len() != 24 {
        return Err("bad nonce length".into());
    }
    let ciphertext = B64.decode(env.ciphertext).map_err(|e| format!("bad ciphertext: {e}"))?;
    let cipher = crypto_secretbox::XSalsa20Poly1305::new(&key.into());
    cipher
        .decrypt(crypto_secretbox::Nonce::from_slice(&nonce), ciphertext.as_slice())
        .map_err(|_| "wrong password (or a damaged key)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key pair written as PEM files (PKCS#8 private, SPKI public).
    fn pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        use p256::pkcs8::EncodePrivateKey as _;
        let sk = SigningKey::from_slice(&[7u8; 32]).expect("key");
        let private = dir.join("k.pem");
        std::fs::write(&private, sk.to_pkcs8_pem(LineEnding::LF).expect("pem").as_bytes()).expect("write");
        let public = dir.join("k.pub");
        std::fs::write(&public, sk.verifying_key().to_public_key_pem(LineEnding::LF).expect("pub")).expect("write");
        (private, public)
    }

    #[test]
    fn a_signature_verifies_with_its_key_only_and_over_its_payload_only() {
        let dir = tempfile::tempdir().expect("dir");
        let (private, public) = pair(dir.path());
        let key = SignKey::load(&private, None).expect("signing key");
        let trusted = TrustedKeys::load(&[&public]).expect("trusted");
        let sig = key.sign(b"payload");
        assert!(trusted.signer(b"payload", &sig).is_some());
        assert!(trusted.signer(b"payloaf", &sig).is_none());
        assert!(trusted.signer(b"payload", "not base64!").is_none());
        let other = dir.path().join("other.pub");
        let sk2 = SigningKey::from_slice(&[9u8; 32]).expect("key");
        std::fs::write(&other, sk2.verifying_key().to_public_key_pem(LineEnding::LF).expect("pub")).expect("write");
        assert!(TrustedKeys::load(&[&other]).expect("other").signer(b"payload", &sig).is_none());
        assert_eq!(key.public_pem().expect("pem"), std::fs::read_to_string(&public).expect("read"));
    }

    #[test]
    fn bad_key_files_are_clear_errors_without_their_content() {
        let dir = tempfile::tempdir().expect("dir");
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "-----BEGIN PRIVATE KEY-----\nU2VjcmV0LUtleS1CeXRlcw==\n-----END PRIVATE KEY-----\n")
            .expect("w");
        let e = SignKey::load(&bad, None).expect_err("bad key");
        assert!(!e.to_string().contains("U2VjcmV0"), "{e}");
        assert!(TrustedKeys::load(&[&bad]).is_err());
        let enc = dir.path().join("cosign.key");
        std::fs::write(
            &enc,
            "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\ne30=\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
        )
        .expect("w");
        assert!(SignKey::load(&enc, None).expect_err("no password").to_string().contains("password"));
        assert!(SignKey::load(&enc, Some(b"pw")).is_err());
    }
}
