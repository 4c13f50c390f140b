//! The owned form of an index, produced by the indexer and encoded once.

use super::codes::{CheckpointKind, Compression, EntryId, EntryKind};

/// An entry before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    pub parent: EntryId,
    pub name: Vec<u8>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    pub data_offset: u64,
    /// Symlink target.
    pub link: Vec<u8>,
    /// Hardlink target entry.
    pub hardlink_target: EntryId,
    pub first_child: u32,
    pub child_count: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A seek point and the span that starts there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub kind: CheckpointKind,
    pub uncompressed: u64,
    /// First compressed byte of the span (for a block checkpoint with `bits > 0`, the partly
    /// consumed byte).
    pub comp_start: u64,
    pub bits: u8,
    /// The 32 KiB history window (block checkpoints), uncompressed here.
    pub window: Vec<u8>,
    /// sha256 of the span's compressed bytes.
    pub digest: [u8; 32],
}

/// Everything an index holds, before encoding.
#[derive(Debug, Clone)]
pub struct IndexData {
    pub compression: Compression,
    pub span_size: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub layer_digest: [u8; 32],
    pub media_type: String,
    pub entries: Vec<EntryRecord>,
    pub checkpoints: Vec<CheckpointRecord>,
}
