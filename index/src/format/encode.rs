//! Encoding an index (`FORMAT.md`): [`EntryEncoder`] encodes entries as the indexer hands them
//! over, in id order, straight into the buffer that becomes the index; [`IndexData::encode`]
//! appends the other sections and the header and checksum, without copying the entries again.

use super::codes::{CHECKPOINT_LEN, Compression, ENTRY_LEN, EntryKind, HEADER_LEN, TRAILER_LEN, VERSION};
use super::header::{Header, Sections};
use super::records::{CheckpointRecord, EntryRecord};
use crate::IndexError;
use sha2::{Digest, Sha256};

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn len_u32(n: usize, what: &str) -> Result<u32, IndexError> {
    u32::try_from(n).map_err(|_| IndexError::Invalid(format!("too many {what} for one index")))
}

/// Entries encoded as they are added: the index's buffer (header space, then the entry records),
/// the xattr records and the string table (the media type first, then each entry's name, link
/// target and xattrs in order).
#[derive(Debug)]
pub struct EntryEncoder {
    out: Vec<u8>,
    xattrs: Vec<u8>,
    strings: Vec<u8>,
    entry_count: u32,
    xattr_count: u32,
    media_type: (u32, u32),
}

impl EntryEncoder {
    /// An encoder with room for `entries` records.
    pub fn new(media_type: &str, entries: usize) -> Result<Self, IndexError> {
        let mut out = Vec::with_capacity(HEADER_LEN + entries.saturating_mul(ENTRY_LEN));
        out.resize(HEADER_LEN, 0);
        let mut e =
            Self { out, xattrs: Vec::new(), strings: Vec::new(), entry_count: 0, xattr_count: 0, media_type: (0, 0) };
        e.media_type = e.add_str(media_type.as_bytes())?;
        Ok(e)
    }

    fn add_str(&mut self, s: &[u8]) -> Result<(u32, u32), IndexError> {
        let off = len_u32(self.strings.len(), "name bytes")?;
        self.strings.extend_from_slice(s);
        Ok((off, len_u32(s.len(), "name bytes")?))
    }

    /// Encodes the next entry (its id is the number of entries pushed before it).
    pub fn push(&mut self, e: &EntryRecord<'_>) -> Result<(), IndexError> {
        let (name_off, name_len) = self.add_str(e.name)?;
        let (link_off, link_len) = self.add_str(e.link)?;
        let xattr_first = self.xattr_count;
        for (k, v) in e.xattrs {
            let (ko, kl) = self.add_str(k)?;
            let (vo, vl) = self.add_str(v)?;
            for x in [ko, kl, vo, vl] {
                put_u32(&mut self.xattrs, x);
            }
            self.xattr_count =
                self.xattr_count.checked_add(1).ok_or_else(|| IndexError::Invalid("too many xattrs".into()))?;
        }
        self.entry_count =
            self.entry_count.checked_add(1).ok_or_else(|| IndexError::Invalid("too many entries".into()))?;
        let b = &mut self.out;
        put_u32(b, e.parent);
        put_u32(b, name_off);
        put_u32(b, name_len);
        b.extend_from_slice(&[e.kind as u8, 0, 0, 0]);
        put_u32(b, e.mode);
        put_u32(b, e.uid);
        put_u32(b, e.gid);
        put_u32(b, e.nlink);
        b.extend_from_slice(&e.mtime_sec.to_le_bytes());
        put_u32(b, e.mtime_nsec);
        put_u32(b, link_len);
        put_u64(b, e.size);
        put_u64(b, e.data_offset);
        let aux = if e.kind == EntryKind::Hardlink { e.hardlink_target } else { link_off };
        put_u32(b, aux);
        let (x, y) = match e.kind {
            EntryKind::Dir => (e.first_child, e.child_count),
            EntryKind::CharDevice | EntryKind::BlockDevice => (e.dev_major, e.dev_minor),
            _ => (0, 0),
        };
        put_u32(b, x);
        put_u32(b, y);
        put_u32(b, xattr_first);
        put_u32(b, self.xattr_count - xattr_first);
        put_u32(b, 0);
        Ok(())
    }
}

/// Everything an index holds, before the final encoding.
#[derive(Debug)]
pub struct IndexData {
    pub compression: Compression,
    pub span_size: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub layer_digest: [u8; 32],
    /// The entries, encoded as they were added; the media type is its first string.
    pub entries: EntryEncoder,
    pub checkpoints: Vec<CheckpointRecord>,
}

impl IndexData {
    /// Encodes the index (see `FORMAT.md`).
    pub fn encode(self) -> Result<Vec<u8>, IndexError> {
        let EntryEncoder { mut out, xattrs, strings, entry_count, xattr_count, media_type } = self.entries;
        let mut windows = Vec::new();
        let mut cps = Vec::with_capacity(self.checkpoints.len() * CHECKPOINT_LEN);
        for c in &self.checkpoints {
            let (woff, wlen) = if c.window.is_empty() {
                (0u64, 0u32)
            } else {
                let off = windows.len() as u64;
                windows.extend_from_slice(&c.window);
                (off, len_u32(c.window.len(), "window bytes")?)
            };
            put_u64(&mut cps, c.uncompressed);
            put_u64(&mut cps, c.comp_start);
            cps.extend_from_slice(&[c.bits, c.kind as u8, 0, 0]);
            put_u32(&mut cps, wlen);
            put_u64(&mut cps, woff);
            cps.extend_from_slice(&c.digest);
        }
        let entries_off = HEADER_LEN as u64;
        let xattrs_off = out.len() as u64;
        let checkpoints_off = xattrs_off + xattrs.len() as u64;
        let strings_off = checkpoints_off + cps.len() as u64;
        let windows_off = strings_off + strings.len() as u64;
        let header = Header {
            version: VERSION,
            compression: self.compression as u8,
            flags: 0,
            span_size: self.span_size,
            compressed_size: self.compressed_size,
            uncompressed_size: self.uncompressed_size,
            layer_digest: self.layer_digest,
            media_type,
            entry_count,
            xattr_count,
            checkpoint_count: len_u32(self.checkpoints.len(), "checkpoints")?,
            window_table: 0,
            sections: Sections {
                entries_off,
                xattrs_off,
                checkpoints_off,
                strings_off,
                strings_len: strings.len() as u64,
                windows_off,
                windows_len: windows.len() as u64,
            },
        };
        out.reserve_exact(xattrs.len() + cps.len() + strings.len() + windows.len() + TRAILER_LEN);
        out[..HEADER_LEN].copy_from_slice(&header.encode());
        out.extend_from_slice(&xattrs);
        out.extend_from_slice(&cps);
        out.extend_from_slice(&strings);
        out.extend_from_slice(&windows);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }
}
