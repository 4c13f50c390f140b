//! TLS trust of registry endpoints with configured CA files (`hosts.toml` `ca`, `ca_file`).
//!
//! The platform's roots plus the configured certificates, as reqwest's own rustls set-up has
//! them, and one more rule that Go's `crypto/x509` (so containerd, buildah, skopeo, nerdctl)
//! applies: a configured certificate that the server presents as its own is trusted as it is,
//! even when it is a CA — the self-signed `openssl req -x509` recipe of Docker's registry docs
//! makes one with `CA:TRUE`, which webpki refuses as `CaUsedAsEndEntity`. Such a certificate
//! must still name the host (subjectAltName), be within its validity period, allow server
//! authentication when it lists key usages, and sign the handshake. Nothing else is accepted.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use std::sync::Arc;

/// A CA file that cannot be used, or a TLS set-up that fails.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("not a PEM certificate bundle: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("no certificate in the PEM file")]
    NoCertificate,
    #[error("TLS set-up: {0}")]
    Setup(#[from] Error),
}

/// The certificates of a PEM bundle.
pub fn parse_pem_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// A rustls client configuration trusting the platform's roots and `configured`.
pub fn client_config(configured: Vec<CertificateDer<'static>>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner = rustls_platform_verifier::Verifier::new_with_extra_roots(configured.clone(), provider.clone())?;
    let verifier = Arc::new(ConfiguredCertVerifier { inner, configured });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct ConfiguredCertVerifier {
    inner: rustls_platform_verifier::Verifier,
    configured: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for ConfiguredCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(v) => Ok(v),
            Err(e) if self.configured.iter().any(|c| c.as_ref() == end_entity.as_ref()) => {
                check_configured_leaf(end_entity, server_name, now).map_err(|why| {
                    tracing::debug!(chain_error = %e, %why, "a configured certificate presented as the server's own is not valid for it");
                    why
                })?;
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What Go checks of a leaf that is itself a trusted root: name, validity, key usage.
fn check_configured_leaf(cert: &CertificateDer<'_>, server_name: &ServerName<'_>, now: UnixTime) -> Result<(), Error> {
    let bad = |e: CertificateError| Error::InvalidCertificate(e);
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|_| bad(CertificateError::BadEncoding))?;
    ee.verify_is_valid_for_subject_name(server_name).map_err(|_| bad(CertificateError::NotValidForName))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| bad(CertificateError::BadEncoding))?;
    let t = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = parsed.validity();
    if t < validity.not_before.timestamp() {
        return Err(bad(CertificateError::NotValidYet));
    }
    if t > validity.not_after.timestamp() {
        return Err(bad(CertificateError::Expired));
    }
    if let Ok(Some(eku)) = parsed.extended_key_usage()
        && !eku.value.any
        && !eku.value.server_auth
    {
        return Err(bad(CertificateError::InvalidPurpose));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed `CA:TRUE` certificate for IP 127.0.0.1 made with openssl, as DER.
    fn recipe_cert(extra: &[&str]) -> CertificateDer<'static> {
        let dir = tempfile::tempdir().expect("tmp");
        let (key, crt) = (dir.path().join("k"), dir.path().join("c"));
        let status = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(extra)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success());
        parse_pem_bundle(&std::fs::read(&crt).expect("read")).expect("pem").remove(0)
    }

    #[test]
    fn a_configured_leaf_must_name_the_host_be_valid_and_allow_server_auth() {
        let cert = recipe_cert(&[]);
        let now = UnixTime::now();
        let ip = |s: &str| ServerName::try_from(s.to_string()).expect("name");
        assert!(check_configured_leaf(&cert, &ip("127.0.0.1"), now).is_ok());
        assert!(matches!(
            check_configured_leaf(&cert, &ip("127.0.0.2"), now),
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
        ));
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.as_secs() + 5 * 86400));
        assert!(matches!(
            check_configured_leaf(&cert, &ip("127.0.0.1"), later),
            Err(Error::InvalidCertificate(CertificateError::Expired))
        ));
        let client_only = recipe_cert(&["-addext", "extendedKeyUsage=clientAuth"]);
        // A minute on: made after `now`, the certificate may not be valid at `now` yet.
        let soon = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.as_secs() + 60));
        assert!(matches!(
            check_configured_leaf(&client_only, &ip("127.0.0.1"), soon),
            Err(Error::InvalidCertificate(CertificateError::InvalidPurpose))
        ));
        assert!(parse_pem_bundle(b"not a pem").is_err());
    }
}
