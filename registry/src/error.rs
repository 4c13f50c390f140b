//! The registry client's typed errors. None of them ever carries a credential: messages name
//! the registry and the credential *source*, never a value.

use crate::source::Source;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("registry {registry}: access denied ({status}) for {repository}; credentials tried: {tried}")]
    Unauthorized { registry: String, repository: String, status: u16, tried: SourceList },
    #[error("registry {registry}: {what} not found")]
    NotFound { registry: String, what: String },
    #[error("registry {registry}: {method} {path} answered {status}: {body}")]
    Status { registry: String, method: String, path: String, status: u16, body: String },
    #[error("registry {registry}: {context}: {message}")]
    Transport { registry: String, context: String, message: String },
    #[error("registry {registry}: range {start}-{end} of {digest} not satisfiable (blob is shorter)")]
    RangeNotSatisfiable { registry: String, digest: String, start: u64, end: u64 },
    #[error("registry {registry}: {what}: {message}")]
    BadResponse { registry: String, what: String, message: String },
    #[error("content of {digest} does not match its digest (got {actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("hosts configuration {path}: {message}")]
    HostsConfig { path: String, message: String },
    #[error("credentials ({source_name}): {message}")]
    Credentials { source_name: &'static str, message: String },
    #[error("token minting ({kind}): {message}")]
    Mint { kind: &'static str, message: String },
}

impl RegistryError {
    /// Whether retrying the same request later may succeed (5xx, resets, timeouts).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

/// The credential sources tried, for error messages.
#[derive(Debug, Default, Clone)]
pub struct SourceList(pub Vec<Source>);

impl std::fmt::Display for SourceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.0.iter().map(|s| s.name()).collect();
        f.write_str(&names.join(", "))
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// An error with its causes (reqwest's: connection refused, reset, timeout...; the AWS SDK's,
/// whose own text is a terse "service error"), joined by `: `.
pub fn error_text<E: std::error::Error>(e: &E) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}
