//! The constants and codes of the encoding — magic, versions, record sizes, limits, and the
//! enums stored as bytes — with the little-endian readers: the leaf every other part of the
//! format names.

use crate::IndexError;
use crate::error::format_err;
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"CLIPIDX\0";
pub const VERSION: u32 = 1;
/// The version of an index whose windows are a separate blob.
pub const VERSION_EXTERNAL_WINDOWS: u32 = 2;
/// Header flag (byte 13, version 2): the windows section is a separate blob.
pub(crate) const FLAG_EXTERNAL_WINDOWS: u8 = 1;
pub const HEADER_LEN: usize = 152;
pub const ENTRY_LEN: usize = 88;
pub const XATTR_LEN: usize = 16;
pub const CHECKPOINT_LEN: usize = 64;
pub const TRAILER_LEN: usize = 32;
/// The first bytes of a zstd frame: a packed index starts with them.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest index accepted (guards allocation on hostile input).
pub const MAX_INDEX_LEN: usize = 1 << 31;
/// Largest span accepted, uncompressed: a reader decodes a span whole, so this bounds the memory
/// one read can take. A layer whose seek points lie further apart (a zstd blob of one large
/// frame) is not served lazily.
pub const MAX_SPAN_LEN: u64 = 64 << 20;
/// Largest span accepted, compressed (deflate and zstd add a little to incompressible data).
pub const MAX_SPAN_COMPRESSED_LEN: u64 = MAX_SPAN_LEN + (1 << 20);
/// A packed index may unpack to at most this many times its size (or to
/// [`MIN_UNPACKED_ALLOWANCE`]): an index's records pack 3-10x, a zstd bomb far more.
pub const MAX_UNPACK_RATIO: usize = 64;
/// What any packed index may unpack to, whatever its size.
pub const MIN_UNPACKED_ALLOWANCE: usize = 64 << 20;

/// zstd level of packed indexes and of checkpoint windows (any level decodes). Measured on the
/// python image and a 100,000-file layer: level 9 packs within 2% of level 19's size (smaller,
/// on the many-files index) at 1/20 to 1/75 of its time, which at 19 was most of indexing.
pub const ZSTD_LEVEL: i32 = 9;
/// Bytes each zstd worker packs at a time when a large index is packed on several threads
/// ([`super::Index::pack`]).
pub const PACK_JOB_LEN: u32 = 4 << 20;
/// Packed indexes of this many bytes or more are packed on several threads, at
/// [`LARGE_PACK_LEVEL`].
pub const LARGE_PACK_LEN: usize = 8 << 20;
/// zstd level of large packed indexes. Measured on the 93 MB index of a million-file layer
/// (`zstd -T2 -B4194304`): level 3 packs it in 0.10 s to 4.11 MB, level 9 in 0.48 s to 4.01 MB —
/// a sixth of that layer's indexing time saved for 2.5% more bytes at every pull (8 ms at 100
/// Mbit/s).
pub const LARGE_PACK_LEVEL: i32 = 3;

/// Compression of the layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Gzip = 1,
    Zstd = 2,
}

impl Compression {
    pub(crate) fn from_u8(v: u8) -> Result<Self, IndexError> {
        match v {
            0 => Ok(Self::None),
            1 => Ok(Self::Gzip),
            2 => Ok(Self::Zstd),
            _ => Err(format_err(format!("unknown compression {v}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }
}

/// Type of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    /// A hard link: `link_target()` is the entry it shares data and inode with.
    Hardlink = 4,
    CharDevice = 5,
    BlockDevice = 6,
    Fifo = 7,
}

impl EntryKind {
    pub(crate) fn from_u8(v: u8) -> Result<Self, IndexError> {
        Ok(match v {
            1 => Self::File,
            2 => Self::Dir,
            3 => Self::Symlink,
            4 => Self::Hardlink,
            5 => Self::CharDevice,
            6 => Self::BlockDevice,
            7 => Self::Fifo,
            _ => return Err(format_err(format!("unknown entry kind {v}"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Dir => "dir",
            Self::Symlink => "symlink",
            Self::Hardlink => "hardlink",
            Self::CharDevice => "char",
            Self::BlockDevice => "block",
            Self::Fifo => "fifo",
        }
    }
}

/// Seek point kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Start of the blob (gzip: start of the first member's header).
    Start = 0,
    /// gzip: a deflate block boundary inside a member, with bit offset and window.
    Block = 1,
    /// gzip: start of a later member's header.
    Member = 2,
    /// zstd: start of a frame.
    Frame = 3,
    /// plain tar: any offset.
    Plain = 4,
}

impl CheckpointKind {
    pub(crate) fn from_u8(v: u8) -> Result<Self, IndexError> {
        Ok(match v {
            0 => Self::Start,
            1 => Self::Block,
            2 => Self::Member,
            3 => Self::Frame,
            4 => Self::Plain,
            _ => return Err(format_err(format!("unknown checkpoint kind {v}"))),
        })
    }
}

/// Index of an entry; the root directory is entry 0.
pub type EntryId = u32;

/// sha256 of `data` (the checksum the trailer holds).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub(crate) fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
