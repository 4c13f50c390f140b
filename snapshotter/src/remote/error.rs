//! Why a layer could not be served lazily. The snapshot service turns every one of these into
//! a fallback (an ordinary snapshot containerd unpacks) and records it in the `clip.not-lazy`
//! label; the messages name what failed, never a secret.

use clip_index::IndexError;
use clip_index::artifact::ArtifactError;
use clip_layerfs::keeper::KeeperError;
use clip_registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A bad image reference, or no way to reach its registry (hosts configuration).
    #[error(transparent)]
    Registry(Box<RegistryError>),
    /// A registry request failed.
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: Box<RegistryError>,
    },
    /// A `clip.*` credential label does not parse.
    #[error("label {label}: {source}")]
    CredentialLabel {
        label: &'static str,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("no CLIP index is published for {image} ({manifest})")]
    NoIndex { image: String, manifest: String },
    #[error("index artifact {artifact}: {source}")]
    Artifact {
        artifact: String,
        #[source]
        source: ArtifactError,
    },
    /// `[trust]` keys are set and no trusted key signed the index artifact.
    #[error("index artifact {artifact} is not trusted: {source}")]
    Untrusted {
        artifact: String,
        #[source]
        source: clip_trust::TrustError,
    },
    /// A `clip.plain-http` label for a registry that is not on this machine.
    #[error(
        "the clip.plain-http label is honoured only for loopback registries; {registry} needs a hosts.toml (server = \"http://{registry}\") to be reached over plain HTTP"
    )]
    PlainHttpRefused { registry: String },
    /// The layer, with this index, was found not to be what the index says.
    #[error("layer {layer} was found not to match its index on this node ({marker}); it is not served lazily again")]
    Poisoned { layer: String, marker: String },
    /// The artifact named by the `clip.index-digest` label is for another image.
    #[error("index artifact {artifact} is for manifest {subject}, not for this image's {manifest}")]
    ForeignIndex { artifact: String, subject: String, manifest: String },
    #[error("index artifact {artifact} has no index for layer {layer}")]
    NotInArtifact { artifact: String, layer: String },
    #[error("index artifact {artifact} lacks the windows of layer {layer}")]
    MissingWindows { artifact: String, layer: String },
    #[error("index {blob}: {source}")]
    Index {
        blob: String,
        #[source]
        source: IndexError,
    },
    #[error("index {blob} is for layer {actual}, not {expected}")]
    WrongLayer { blob: String, expected: String, actual: String },
    #[error("index {path} is gone and its registry did not answer")]
    IndexGone { path: String },
    /// A local file or mount operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fd keeper: {0}")]
    Keeper(#[from] KeeperError),
    /// A layer no index serves cannot be unpacked here either (containerd unpacks it).
    #[error("layer {layer} is not unpacked here: {reason}")]
    NotUnpackable { layer: String, reason: String },
    /// Unpacking a layer here failed (containerd then unpacks it).
    #[error("unpacking layer {layer}: {source}")]
    Unpack {
        layer: String,
        #[source]
        source: clip_unpack::UnpackError,
    },
    #[error("layer {layer} of {image} cannot be served: {source}")]
    Unservable {
        layer: String,
        image: String,
        #[source]
        source: Box<RemoteError>,
    },
}

impl From<RegistryError> for RemoteError {
    fn from(e: RegistryError) -> Self {
        Self::Registry(Box::new(e))
    }
}

impl RemoteError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub(crate) fn request(what: impl Into<String>) -> impl FnOnce(RegistryError) -> Self {
        let what = what.into();
        move |source| Self::Request { what, source: Box::new(source) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_index_is_said_the_way_the_pull_client_recognises() {
        let e = super::RemoteError::NoIndex { image: "r.example/a:1".into(), manifest: "sha256:00".into() };
        assert!(e.to_string().starts_with(clip_config::labels::NOT_LAZY_NO_INDEX), "{e}");
    }
}
