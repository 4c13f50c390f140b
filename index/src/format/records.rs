//! What the indexer hands the encoder: entries one at a time, in id order (so a layer of a million
//! files is never held as a million records), and the checkpoints.

use super::codes::{CheckpointKind, EntryId, EntryKind};

/// An entry as it is encoded (names, link target and xattrs borrowed from whoever holds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord<'a> {
    pub parent: EntryId,
    pub name: &'a [u8],
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
    pub link: &'a [u8],
    /// Hardlink target entry.
    pub hardlink_target: EntryId,
    pub first_child: u32,
    pub child_count: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
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
    /// Bytes of the 32 KiB history window (block checkpoints), zstd-compressed at
    /// [`ZSTD_LEVEL`](super::codes::ZSTD_LEVEL) as the index stores it; the windows of all
    /// checkpoints lie back to back, in order, in one buffer beside them (0: none).
    pub window_len: u32,
    /// sha256 of the span's compressed bytes.
    pub digest: [u8; 32],
}
