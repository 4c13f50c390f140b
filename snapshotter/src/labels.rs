//! Snapshot labels as the snapshots service sees them: parsed in [`clip_config::labels`], with
//! malformed labels turned into `InvalidArgument`.

use crate::error::{Result, SnapshotError};
pub use clip_config::labels::{RemoteRequest, SnapshotLabels};
use std::collections::HashMap;
use std::hash::BuildHasher;

/// Validates and splits the labels of a Prepare, View, Commit or Update.
pub fn split<S: BuildHasher>(labels: HashMap<String, String, S>) -> Result<SnapshotLabels> {
    clip_config::labels::split(labels).map_err(|e| SnapshotError::InvalidArgument(e.0))
}
