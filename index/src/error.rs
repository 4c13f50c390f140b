//! The crate's error type.

/// Everything that can go wrong building, parsing or reading an index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt compressed stream: {0}")]
    Compressed(String),
    #[error("invalid tar stream: {0}")]
    Tar(String),
    #[error("layer digest mismatch: expected {expected}, blob hashes to {actual}")]
    LayerDigest { expected: String, actual: String },
    #[error("the layer's uncompressed digest is {actual}, but the image config names {expected} (its diff ID)")]
    DiffId { expected: String, actual: String },
    #[error("invalid index: {0}")]
    Format(String),
    #[error("span {span} failed verification: sha256 of the fetched bytes is {actual}, the index says {expected}")]
    SpanDigest { span: u32, expected: String, actual: String },
    #[error("fetching bytes {offset}+{len} of the blob failed: {message}")]
    Fetch { offset: u64, len: u64, message: String },
    /// A fetch that failed with an error of its own (the registry's, the file's).
    #[error("fetching bytes {offset}+{len} of the blob failed: {source}")]
    FetchFailed {
        offset: u64,
        len: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn format_err(msg: impl Into<String>) -> IndexError {
    IndexError::Format(msg.into())
}
