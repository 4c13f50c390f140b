//! Encoding an index (`FORMAT.md`): [`EntryEncoder`] encodes the entries the indexer hands over
//! straight into the buffer that becomes the index; [`IndexData::encode`] appends the other
//! sections and the header and checksum, without copying the entries again.

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

/// Entries encoded in two passes, so that an indexer can give its own memory back while the
/// records are written: first every entry's strings in id order ([`Self::push_strings`]: the
/// string table gets the media type, then each entry's name, link target and xattrs; the xattr
/// records follow), then every entry's record in *reverse* id order ([`Self::put_record_back`])
/// into its fixed slot of the index's buffer, whose pages are only touched as they are written.
#[derive(Debug)]
pub struct EntryEncoder {
    /// Header space, then `entry_count` records (zeroed, untouched until written).
    out: Vec<u8>,
    xattrs: Vec<u8>,
    strings: Vec<u8>,
    entry_count: u32,
    xattr_count: u32,
    media_type: (u32, u32),
    /// Entries whose strings were pushed.
    pushed: u32,
    /// Records not written yet: those of ids below this.
    records_due: u32,
    /// Where the strings and xattr records of the last entry still due end.
    strings_end: usize,
    xattrs_end: u32,
    /// The record being written (reused: no allocation per record).
    record: Vec<u8>,
}

impl EntryEncoder {
    /// An encoder for exactly `entries` entries.
    pub fn new(media_type: &str, entries: usize) -> Result<Self, IndexError> {
        let entry_count = len_u32(entries, "entries")?;
        let len = entries.checked_mul(ENTRY_LEN).and_then(|l| l.checked_add(HEADER_LEN));
        let len = len.ok_or_else(|| IndexError::Invalid("too many entries for one index".into()))?;
        // Zeroed by the allocator (fresh pages for a large buffer): nothing is touched here.
        let out = vec![0u8; len];
        let mut e = Self {
            out,
            xattrs: Vec::new(),
            strings: Vec::new(),
            entry_count,
            xattr_count: 0,
            media_type: (0, 0),
            pushed: 0,
            records_due: entry_count,
            strings_end: 0,
            xattrs_end: 0,
            record: Vec::with_capacity(ENTRY_LEN),
        };
        e.media_type = e.add_str(media_type.as_bytes())?;
        e.strings_end = e.strings.len();
        Ok(e)
    }

    fn add_str(&mut self, s: &[u8]) -> Result<(u32, u32), IndexError> {
        let off = len_u32(self.strings.len(), "name bytes")?;
        self.strings.extend_from_slice(s);
        Ok((off, len_u32(s.len(), "name bytes")?))
    }

    /// First pass, in id order: the next entry's name, symlink target and xattrs.
    pub fn push_strings(&mut self, name: &[u8], link: &[u8], xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), IndexError> {
        if self.pushed == self.entry_count {
            return Err(IndexError::Invalid(format!("more than the {} entries announced", self.entry_count)));
        }
        self.add_str(name)?;
        self.add_str(link)?;
        for (k, v) in xattrs {
            let (ko, kl) = self.add_str(k)?;
            let (vo, vl) = self.add_str(v)?;
            for x in [ko, kl, vo, vl] {
                put_u32(&mut self.xattrs, x);
            }
            self.xattr_count =
                self.xattr_count.checked_add(1).ok_or_else(|| IndexError::Invalid("too many xattrs".into()))?;
        }
        self.pushed += 1;
        (self.strings_end, self.xattrs_end) = (self.strings.len(), self.xattr_count);
        Ok(())
    }

    /// Second pass, in reverse id order: the record of the last entry not yet written, whose
    /// name, link and xattrs must be those its strings were pushed with (checked).
    pub fn put_record_back(&mut self, e: &EntryRecord<'_>) -> Result<(), IndexError> {
        let mismatch = || IndexError::Invalid("an entry's record does not match its strings".into());
        if self.pushed != self.entry_count {
            return Err(IndexError::Invalid("records are written once every entry's strings are in".into()));
        }
        let id = self.records_due.checked_sub(1).ok_or_else(mismatch)?;
        let xattr_bytes: usize = e.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        let link_end = self.strings_end.checked_sub(xattr_bytes).ok_or_else(mismatch)?;
        let link_off = link_end.checked_sub(e.link.len()).ok_or_else(mismatch)?;
        let name_off = link_off.checked_sub(e.name.len()).ok_or_else(mismatch)?;
        let xattr_first = self.xattrs_end.checked_sub(len_u32(e.xattrs.len(), "xattrs")?).ok_or_else(mismatch)?;
        if self.strings[name_off..link_off] != *e.name || self.strings[link_off..link_end] != *e.link {
            return Err(mismatch());
        }
        let aux = if e.kind == EntryKind::Hardlink { e.hardlink_target } else { len_u32(link_off, "name bytes")? };
        let (x, y) = match e.kind {
            EntryKind::Dir => (e.first_child, e.child_count),
            EntryKind::CharDevice | EntryKind::BlockDevice => (e.dev_major, e.dev_minor),
            _ => (0, 0),
        };
        let r = &mut self.record;
        r.clear();
        put_u32(r, e.parent);
        put_u32(r, len_u32(name_off, "name bytes")?);
        put_u32(r, len_u32(e.name.len(), "name bytes")?);
        r.extend_from_slice(&[e.kind as u8, 0, 0, 0]);
        put_u32(r, e.mode);
        put_u32(r, e.uid);
        put_u32(r, e.gid);
        put_u32(r, e.nlink);
        r.extend_from_slice(&e.mtime_sec.to_le_bytes());
        put_u32(r, e.mtime_nsec);
        put_u32(r, len_u32(e.link.len(), "name bytes")?);
        put_u64(r, e.size);
        put_u64(r, e.data_offset);
        put_u32(r, aux);
        put_u32(r, x);
        put_u32(r, y);
        put_u32(r, xattr_first);
        put_u32(r, len_u32(e.xattrs.len(), "xattrs")?);
        put_u32(r, 0);
        let at = HEADER_LEN + id as usize * ENTRY_LEN;
        self.out[at..at + ENTRY_LEN].copy_from_slice(&self.record);
        self.records_due = id;
        (self.strings_end, self.xattrs_end) = (name_off, xattr_first);
        Ok(())
    }

    /// Every record written, for exactly the entries announced.
    fn check_complete(&self) -> Result<(), IndexError> {
        let ends_met = self.strings_end == self.media_type.1 as usize && self.xattrs_end == 0;
        if self.pushed != self.entry_count || self.records_due != 0 || !ends_met {
            return Err(IndexError::Invalid("the index's entries were not all encoded".into()));
        }
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
    /// The checkpoints' packed windows, back to back in checkpoint order.
    pub windows: Vec<u8>,
}

impl IndexData {
    /// Encodes the index (see `FORMAT.md`), its windows inline (version 1).
    pub fn encode(self) -> Result<Vec<u8>, IndexError> {
        let (mut out, windows, _) = self.encode_parts()?;
        out.reserve_exact(windows.len() + TRAILER_LEN);
        out.extend_from_slice(&windows);
        drop(windows);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Encodes the index without its windows (version 2, a digest per window) and returns the
    /// windows blob it refers to — what [`Index::split_windows`](super::Index) makes of
    /// [`Self::encode`]'s bytes, without the windows ever being copied (for a 3.3 GB layer of
    /// large files they are 320 MB). Without windows (not gzip), the plain index and `None`.
    pub fn encode_split(self) -> Result<(Vec<u8>, Option<Vec<u8>>), IndexError> {
        if self.windows.is_empty() {
            return Ok((self.encode()?, None));
        }
        let mut at = 0u64;
        let spans = self.checkpoints.iter().map(|c| {
            at += u64::from(c.window_len);
            Ok((at - u64::from(c.window_len), c.window_len))
        });
        let digests = super::windows::digest_windows(&self.windows, spans)?;
        let (prefix, windows, strings_len) = self.encode_parts()?;
        Ok((super::windows::without_windows(prefix, strings_len, &digests)?, Some(windows)))
    }

    /// The index's bytes up to its windows section (header, entries, xattrs, checkpoints,
    /// strings), the windows, and the string table's length.
    fn encode_parts(self) -> Result<(Vec<u8>, Vec<u8>, usize), IndexError> {
        self.entries.check_complete()?;
        let EntryEncoder { mut out, xattrs, strings, entry_count, xattr_count, media_type, .. } = self.entries;
        let mut windows_len = 0u64;
        let mut cps = Vec::with_capacity(self.checkpoints.len() * CHECKPOINT_LEN);
        for c in &self.checkpoints {
            let woff = if c.window_len == 0 { 0 } else { windows_len };
            windows_len += u64::from(c.window_len);
            put_u64(&mut cps, c.uncompressed);
            put_u64(&mut cps, c.comp_start);
            cps.extend_from_slice(&[c.bits, c.kind as u8, 0, 0]);
            put_u32(&mut cps, c.window_len);
            put_u64(&mut cps, woff);
            cps.extend_from_slice(&c.digest);
        }
        if windows_len != self.windows.len() as u64 {
            return Err(IndexError::Invalid("the checkpoints do not account for the windows".into()));
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
                windows_len,
            },
        };
        out.reserve_exact(xattrs.len() + cps.len() + strings.len());
        out[..HEADER_LEN].copy_from_slice(&header.encode());
        out.extend_from_slice(&xattrs);
        out.extend_from_slice(&cps);
        out.extend_from_slice(&strings);
        Ok((out, self.windows, strings.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &[u8], first_child: u32, child_count: u32) -> EntryRecord<'_> {
        EntryRecord {
            parent: 0,
            name,
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            mtime_sec: 0,
            mtime_nsec: 0,
            size: 0,
            data_offset: 0,
            link: &[],
            hardlink_target: 0,
            first_child,
            child_count,
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        }
    }

    fn data(entries: EntryEncoder) -> IndexData {
        IndexData {
            compression: Compression::None,
            span_size: 1 << 20,
            compressed_size: 0,
            uncompressed_size: 0,
            layer_digest: [0; 32],
            entries,
            checkpoints: Vec::new(),
            windows: Vec::new(),
        }
    }

    #[test]
    fn records_are_written_last_first_for_exactly_the_strings_pushed() -> Result<(), IndexError> {
        let mut e = EntryEncoder::new("m", 2)?;
        assert!(e.put_record_back(&dir(b"a", 2, 0)).is_err(), "a record before all strings are in");
        e.push_strings(b"", b"", &[])?;
        e.push_strings(b"a", b"", &[(b"user.k".to_vec(), b"v".to_vec())])?;
        assert!(e.push_strings(b"b", b"", &[]).is_err(), "a third entry of two");
        assert!(e.put_record_back(&dir(b"b", 2, 0)).is_err(), "a record under another name");
        assert!(e.put_record_back(&dir(b"a", 2, 0)).is_err(), "a record without the xattr pushed");
        let xattrs = [(b"user.k".to_vec(), b"v".to_vec())];
        e.put_record_back(&EntryRecord { xattrs: &xattrs, ..dir(b"a", 2, 0) })?;
        let mut unfinished = EntryEncoder::new("m", 1)?;
        unfinished.push_strings(b"", b"", &[])?;
        assert!(data(unfinished).encode().is_err(), "an entry without its record");
        e.put_record_back(&dir(b"", 1, 1))?;
        let index = crate::Index::open(data(e).encode()?)?;
        let a = index.entry(index.lookup("a")?.ok_or_else(|| IndexError::Invalid("a is missing".into()))?)?;
        assert_eq!(index.xattrs(&a)?, vec![(&b"user.k"[..], &b"v"[..])]);
        Ok(())
    }
}
