//! Encoding an [`IndexData`] into an index's bytes (`FORMAT.md`).

use super::codes::{CHECKPOINT_LEN, ENTRY_LEN, EntryKind, HEADER_LEN, TRAILER_LEN, VERSION};
use super::header::{Header, Sections};
use super::records::IndexData;
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

impl IndexData {
    /// Encodes the index (see `FORMAT.md`).
    pub fn encode(&self) -> Result<Vec<u8>, IndexError> {
        let mut strings: Vec<u8> = Vec::new();
        let mut add_str = |s: &[u8]| -> Result<(u32, u32), IndexError> {
            let off = len_u32(strings.len(), "name bytes")?;
            strings.extend_from_slice(s);
            Ok((off, len_u32(s.len(), "name bytes")?))
        };
        let (mt_off, mt_len) = add_str(self.media_type.as_bytes())?;
        let mut entries = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        let mut xattrs = Vec::new();
        let mut xattr_count: u32 = 0;
        for e in &self.entries {
            let (name_off, name_len) = add_str(&e.name)?;
            let (link_off, link_len) = add_str(&e.link)?;
            let xattr_first = xattr_count;
            for (k, v) in &e.xattrs {
                let (ko, kl) = add_str(k)?;
                let (vo, vl) = add_str(v)?;
                for x in [ko, kl, vo, vl] {
                    put_u32(&mut xattrs, x);
                }
                xattr_count =
                    xattr_count.checked_add(1).ok_or_else(|| IndexError::Invalid("too many xattrs".into()))?;
            }
            put_u32(&mut entries, e.parent);
            put_u32(&mut entries, name_off);
            put_u32(&mut entries, name_len);
            entries.extend_from_slice(&[e.kind as u8, 0, 0, 0]);
            put_u32(&mut entries, e.mode);
            put_u32(&mut entries, e.uid);
            put_u32(&mut entries, e.gid);
            put_u32(&mut entries, e.nlink);
            entries.extend_from_slice(&e.mtime_sec.to_le_bytes());
            put_u32(&mut entries, e.mtime_nsec);
            put_u32(&mut entries, link_len);
            put_u64(&mut entries, e.size);
            put_u64(&mut entries, e.data_offset);
            let aux = if e.kind == EntryKind::Hardlink { e.hardlink_target } else { link_off };
            put_u32(&mut entries, aux);
            let (a, b) = match e.kind {
                EntryKind::Dir => (e.first_child, e.child_count),
                EntryKind::CharDevice | EntryKind::BlockDevice => (e.dev_major, e.dev_minor),
                _ => (0, 0),
            };
            put_u32(&mut entries, a);
            put_u32(&mut entries, b);
            put_u32(&mut entries, xattr_first);
            put_u32(&mut entries, xattr_count - xattr_first);
            put_u32(&mut entries, 0);
        }
        let mut windows = Vec::new();
        let mut cps = Vec::with_capacity(self.checkpoints.len() * CHECKPOINT_LEN);
        for c in &self.checkpoints {
            let (woff, wlen) = if c.window.is_empty() {
                (0u64, 0u32)
            } else {
                let z = zstd::bulk::compress(&c.window, super::codes::ZSTD_LEVEL)?;
                let off = windows.len() as u64;
                windows.extend_from_slice(&z);
                (off, len_u32(z.len(), "window bytes")?)
            };
            put_u64(&mut cps, c.uncompressed);
            put_u64(&mut cps, c.comp_start);
            cps.extend_from_slice(&[c.bits, c.kind as u8, 0, 0]);
            put_u32(&mut cps, wlen);
            put_u64(&mut cps, woff);
            cps.extend_from_slice(&c.digest);
        }
        let entries_off = HEADER_LEN as u64;
        let xattrs_off = entries_off + entries.len() as u64;
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
            media_type: (mt_off, mt_len),
            entry_count: len_u32(self.entries.len(), "entries")?,
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
        let mut out = Vec::with_capacity(windows_off as usize + windows.len() + TRAILER_LEN);
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&entries);
        out.extend_from_slice(&xattrs);
        out.extend_from_slice(&cps);
        out.extend_from_slice(&strings);
        out.extend_from_slice(&windows);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }
}
