//! What the metadata database stores per snapshot.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The three kinds of snapshot containerd knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Active,
    View,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::View => "view",
            Self::Committed => "committed",
        }
    }
}

/// Nanoseconds since the epoch; exact round trip with protobuf timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: u64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self { secs: d.as_secs(), nanos: d.subsec_nanos() }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        UNIX_EPOCH + Duration::new(t.secs, t.nanos)
    }
}

/// Disk usage of one snapshot's own directory (parents excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub size: i64,
    pub inodes: i64,
}

/// One snapshot, keyed in the database by its key (active, view) or name (committed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory `snapshots/<id>`; never reused while the record exists.
    pub id: u64,
    pub kind: Kind,
    /// Name of the committed parent, or empty.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: Timestamp,
    pub updated: Timestamp,
    /// Measured at commit for committed snapshots; active ones are measured on demand.
    #[serde(default)]
    pub usage: Option<DiskUsage>,
    /// Set for a layer served lazily over FUSE (committed at creation).
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

pub use crate::remote::RemoteLayer;
