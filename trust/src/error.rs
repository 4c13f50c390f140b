//! Why a signature could not be made or was not accepted. Messages name keys by their file and
//! artifacts by digest; never a key's bytes or a password.

use clip_registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("key {path}: {message}")]
    Key { path: String, message: String },
    #[error("{what}: {source}")]
    Registry {
        what: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("index artifact {digest} is not signed (no {tag} in its repository)")]
    Unsigned { digest: String, tag: String },
    #[error("index artifact {digest} has {signatures} signature(s), none by a trusted key")]
    Untrusted { digest: String, signatures: usize },
    #[error("signature payload: {0}")]
    Payload(String),
}

impl TrustError {
    pub(crate) fn registry(what: impl Into<String>) -> impl FnOnce(RegistryError) -> Self {
        let what = what.into();
        move |e| Self::Registry { what, source: Box::new(e) }
    }
}
