//! The snapshotter's typed error, mapped onto the gRPC codes containerd's `errdefs` expects.

use containerd_snapshots::tonic::{Code, Status};

/// Everything a snapshots call can fail with. The variant decides the gRPC code, which
/// containerd turns back into `errdefs.ErrNotFound`, `ErrAlreadyExists`, ...
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A lazy layer that cannot be served now (its registry is away); retried on next use.
    #[error("{0}")]
    Unavailable(String),
    /// A lazy layer that cannot be served (its index, registry or mount failed).
    #[error(transparent)]
    Remote(Box<crate::remote::RemoteError>),
    #[error("metadata database: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::remote::RemoteError> for SnapshotError {
    fn from(e: crate::remote::RemoteError) -> Self {
        Self::Remote(Box::new(e))
    }
}

impl SnapshotError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    /// The gRPC code this error travels as.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::Unavailable(_) | Self::Remote(_) => Code::Unavailable,
            Self::Database(_) | Self::Io { .. } => Code::Internal,
        }
    }
}

impl From<SnapshotError> for Status {
    fn from(err: SnapshotError) -> Self {
        // `{:#}`-style chains are not available on thiserror types; include the source by hand.
        let message = match &err {
            SnapshotError::Io { context, source } => format!("{context}: {source}"),
            other => other.to_string(),
        };
        Status::new(err.code(), message)
    }
}

macro_rules! db_error {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for SnapshotError {
            fn from(err: $t) -> Self {
                Self::Database(Box::new(err))
            }
        }
    )*};
}

db_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error,
);

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
