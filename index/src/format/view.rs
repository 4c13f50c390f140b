//! [`Index`]: the read-only view over an encoded index — opening (header, bounds, checksum),
//! entries, lookups, xattrs and spans.

use super::backing::Backing;
use super::codes::{
    CHECKPOINT_LEN, CheckpointKind, Compression, ENTRY_LEN, EntryId, EntryKind, FLAG_EXTERNAL_WINDOWS, HEADER_LEN,
    LARGE_PACK_LEN, LARGE_PACK_LEVEL, MAX_INDEX_LEN, MAX_SPAN_COMPRESSED_LEN, MAX_SPAN_LEN, MAX_UNPACK_RATIO,
    MIN_UNPACKED_ALLOWANCE, PACK_JOB_LEN, TRAILER_LEN, VERSION, VERSION_EXTERNAL_WINDOWS, XATTR_LEN, rd_u32, rd_u64,
};
use super::header::{Header, Sections};
use crate::IndexError;
use crate::error::format_err;
use sha2::{Digest, Sha256};

/// An index opened over its encoded bytes.
#[derive(Clone)]
pub struct Index {
    pub(crate) bytes: std::sync::Arc<Backing>,
    compression: Compression,
    span_size: u64,
    compressed_size: u64,
    uncompressed_size: u64,
    pub(crate) entry_count: u32,
    xattr_count: u32,
    pub(crate) checkpoint_count: u32,
    entries_off: usize,
    xattrs_off: usize,
    checkpoints_off: usize,
    pub(crate) strings: (usize, usize),
    pub(crate) windows: (usize, usize),
    media_type: (u32, u32),
    layer_digest: [u8; 32],
    /// Version 2 with the windows in a separate blob: offset (in `bytes`) of the table of
    /// their sha256 digests, one per checkpoint.
    pub(crate) external_windows: Option<usize>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("compression", &self.compression)
            .field("entries", &self.entry_count)
            .field("spans", &self.checkpoint_count)
            .field("compressed_size", &self.compressed_size)
            .finish_non_exhaustive()
    }
}

/// A decoded entry (metadata only; names and targets are borrowed from the index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub id: EntryId,
    pub parent: EntryId,
    pub name: &'a [u8],
    pub kind: EntryKind,
    /// The 12 permission bits (setuid, setgid, sticky, rwx×3).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    /// Offset of the file's data in the uncompressed tar stream.
    pub data_offset: u64,
    /// Symlink target (empty otherwise).
    pub link: &'a [u8],
    /// Hardlink target entry (hardlinks only).
    pub hardlink_target: EntryId,
    pub first_child: u32,
    pub child_count: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattr_first: u32,
    pub xattr_count: u32,
}

/// A span: the compressed byte range from one checkpoint to the next, and what it inflates to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanInfo {
    pub index: u32,
    pub kind: CheckpointKind,
    pub comp_start: u64,
    /// Exclusive.
    pub comp_end: u64,
    pub uncomp_start: u64,
    /// Exclusive.
    pub uncomp_end: u64,
    pub bits: u8,
    pub digest: [u8; 32],
    pub(crate) window: (u64, u32),
}

impl Index {
    /// The packed form of an index: one zstd frame of its bytes, as published to registries
    /// (about half the size; see `FORMAT.md`).
    /// An index of [`LARGE_PACK_LEN`] or more is packed at [`LARGE_PACK_LEVEL`] by up to 4
    /// threads (zstd's workers; the frame differs from a single thread's, not what it unpacks
    /// to): level 9 on one core was a third of indexing a million-file layer. Each worker takes
    /// [`PACK_JOB_LEN`] at a time: zstd's default job (4 windows, 16 MiB at level 9) made the
    /// workers' buffers 112 MB for a 93 MB index, the builder's peak; 4 MiB jobs take 50 MB, as
    /// fast, 0.1% larger.
    pub fn pack(&self) -> Result<Vec<u8>, IndexError> {
        let large = self.bytes.len() >= LARGE_PACK_LEN;
        let level = if large { LARGE_PACK_LEVEL } else { super::codes::ZSTD_LEVEL };
        let mut packer = zstd::bulk::Compressor::new(level)?;
        if large {
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
            packer.set_parameter(zstd::zstd_safe::CParameter::NbWorkers(workers as u32))?;
            packer.set_parameter(zstd::zstd_safe::CParameter::JobSize(PACK_JOB_LEN))?;
        }
        Ok(packer.compress(&self.bytes)?)
    }

    /// Opens an index in either form: packed (a zstd frame, decompressed up to
    /// [`MAX_UNPACK_RATIO`] times its size, at least [`MIN_UNPACKED_ALLOWANCE`], at most
    /// [`MAX_INDEX_LEN`]) or plain.
    pub fn open_any(bytes: Vec<u8>) -> Result<Self, IndexError> {
        if bytes.starts_with(&super::codes::ZSTD_MAGIC) {
            let allowance = bytes.len().saturating_mul(MAX_UNPACK_RATIO).clamp(MIN_UNPACKED_ALLOWANCE, MAX_INDEX_LEN);
            let mut out = Vec::new();
            let dec = zstd::stream::read::Decoder::new(&bytes[..])?;
            std::io::Read::read_to_end(&mut std::io::Read::take(dec, allowance as u64 + 1), &mut out)
                .map_err(|e| format_err(format!("bad packed index: {e}")))?;
            if out.len() > allowance {
                return Err(format_err(format!(
                    "a packed index of {} bytes unpacks to more than {allowance} bytes",
                    bytes.len()
                )));
            }
            drop(bytes);
            return Self::open(out);
        }
        Self::open(bytes)
    }

    /// Opens an index over `bytes` (kept, never copied): checks magic, version, checksum and
    /// section bounds.
    pub fn open(bytes: Vec<u8>) -> Result<Self, IndexError> {
        Self::open_backing(Backing::Owned(bytes))
    }

    /// Opens a stored index file in place: a plain one is mapped read-only (see `backing.rs` for
    /// what that asks of the file), so the process holds only the pages that lookups touch — the
    /// checksum's pass over the whole file is released again; a packed one is read and unpacked
    /// as [`open_any`](Self::open_any) does.
    pub fn open_file(path: &std::path::Path) -> Result<Self, IndexError> {
        match Backing::map_file(path, MAX_INDEX_LEN)? {
            Backing::Owned(bytes) => Self::open_any(bytes),
            mapped @ Backing::Mapped(..) => {
                let opened = Self::open_backing(mapped);
                if let Ok(idx) = &opened {
                    idx.bytes.release_resident();
                }
                opened
            }
        }
    }

    /// Whether the index is read from a map of its file (see [`open_file`](Self::open_file)).
    pub fn is_mapped(&self) -> bool {
        self.bytes.is_mapped()
    }

    /// Whether any entry is named `name` (a pass over every entry, whose pages of a mapped index
    /// are released again).
    pub fn has_entry_named(&self, name: &[u8]) -> bool {
        let found = (0..self.entry_count).any(|id| self.entry(id).is_ok_and(|e| e.name == name));
        self.release_resident();
        found
    }

    /// Drops the pages of a mapped index that a whole pass touched from this process's resident
    /// memory (they stay in the page cache); for callers that scan every entry once.
    pub fn release_resident(&self) {
        self.bytes.release_resident();
    }

    fn open_backing(bytes: Backing) -> Result<Self, IndexError> {
        let bytes = std::sync::Arc::new(bytes);
        let b = &bytes[..];
        if b.len() < HEADER_LEN + TRAILER_LEN {
            return Err(format_err(format!("{} bytes is too short for an index", b.len())));
        }
        if b.len() > MAX_INDEX_LEN {
            return Err(format_err("index larger than 2 GiB"));
        }
        let h = Header::decode(b)?;
        let version = h.version;
        if version != VERSION && version != VERSION_EXTERNAL_WINDOWS {
            return Err(format_err(format!(
                "unsupported index version {version} (this build reads {VERSION} and {VERSION_EXTERNAL_WINDOWS})"
            )));
        }
        let flags = h.flags;
        let external = match (version, flags) {
            (VERSION, 0) => false,
            (VERSION_EXTERNAL_WINDOWS, FLAG_EXTERNAL_WINDOWS) => true,
            _ => return Err(format_err(format!("version {version} with flags {flags:#x} is not valid"))),
        };
        let body = b.len() - TRAILER_LEN;
        if Sha256::digest(&b[..body])[..] != b[body..] {
            return Err(format_err("index checksum mismatch (truncated or corrupted)"));
        }
        let compression = Compression::from_u8(h.compression)?;
        let (span_size, compressed_size, uncompressed_size) = (h.span_size, h.compressed_size, h.uncompressed_size);
        let (entry_count, xattr_count, checkpoint_count) = (h.entry_count, h.xattr_count, h.checkpoint_count);
        let Sections { entries_off, xattrs_off, checkpoints_off, strings_off, strings_len, windows_off, windows_len } =
            h.sections;
        let check = |name: &str, off: u64, len: Option<u64>| -> Result<(usize, usize), IndexError> {
            let len = len.ok_or_else(|| format_err(format!("{name}: size overflows")))?;
            let end = off.checked_add(len).ok_or_else(|| format_err(format!("{name}: offset overflows")))?;
            if off < HEADER_LEN as u64 || end > body as u64 {
                return Err(format_err(format!("{name} section {off}+{len} lies outside the index")));
            }
            Ok((off as usize, len as usize))
        };
        let (eo, _) = check("entries", entries_off, u64::from(entry_count).checked_mul(ENTRY_LEN as u64))?;
        let (xo, _) = check("xattrs", xattrs_off, u64::from(xattr_count).checked_mul(XATTR_LEN as u64))?;
        let (co, _) =
            check("checkpoints", checkpoints_off, u64::from(checkpoint_count).checked_mul(CHECKPOINT_LEN as u64))?;
        let strings = check("strings", strings_off, Some(strings_len))?;
        let windows = check("windows", windows_off, Some(windows_len))?;
        let external_windows = if external {
            if windows_len != 0 {
                return Err(format_err("an index with external windows has a windows section"));
            }
            let table = u64::from(h.window_table);
            let need = u64::from(checkpoint_count) * 32;
            if table.checked_add(need).is_none_or(|end| end > strings_len) {
                return Err(format_err("window digest table lies outside the strings"));
            }
            Some(strings.0 + table as usize)
        } else {
            None
        };
        let idx = Self {
            bytes,
            compression,
            span_size,
            compressed_size,
            uncompressed_size,
            entry_count,
            xattr_count,
            checkpoint_count,
            entries_off: eo,
            xattrs_off: xo,
            checkpoints_off: co,
            strings,
            windows,
            media_type: h.media_type,
            layer_digest: h.layer_digest,
            external_windows,
        };
        if entry_count == 0 {
            return Err(format_err("index has no root directory"));
        }
        let root = idx.entry(0)?;
        if root.kind != EntryKind::Dir || root.parent != 0 || !root.name.is_empty() {
            return Err(format_err("entry 0 is not the root directory"));
        }
        if checkpoint_count == 0 && compressed_size > 0 {
            return Err(format_err("index has no checkpoints"));
        }
        Ok(idx)
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether two opened indexes have the same bytes: the same length and trailing checksum
    /// (each is the sha256 of everything before it, checked when the index was opened), so no
    /// pass over either's bytes.
    pub fn same_bytes(&self, other: &Index) -> bool {
        let (a, b) = (&self.bytes[..], &other.bytes[..]);
        a.len() == b.len() && a[a.len() - TRAILER_LEN..] == b[b.len() - TRAILER_LEN..]
    }

    /// sha256 of the encoded index, `sha256:<hex>` (its content address).
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(&self.bytes[..])))
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }
    pub fn span_size(&self) -> u64 {
        self.span_size
    }
    pub fn compressed_size(&self) -> u64 {
        self.compressed_size
    }
    pub fn uncompressed_size(&self) -> u64 {
        self.uncompressed_size
    }
    pub fn entry_count(&self) -> u32 {
        self.entry_count
    }
    pub fn span_count(&self) -> u32 {
        self.checkpoint_count
    }

    /// `sha256:<hex>` of the layer blob.
    pub fn layer_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.layer_digest))
    }

    pub fn media_type(&self) -> Result<&str, IndexError> {
        let s = self.string(self.media_type.0, self.media_type.1)?;
        std::str::from_utf8(s).map_err(|_| format_err("media type is not UTF-8"))
    }

    fn string(&self, off: u32, len: u32) -> Result<&[u8], IndexError> {
        let (so, sl) = self.strings;
        let end = (off as usize).checked_add(len as usize).filter(|e| *e <= sl);
        let end = end.ok_or_else(|| format_err(format!("string {off}+{len} outside the string table")))?;
        Ok(&self.bytes[so + off as usize..so + end])
    }

    /// Entry `id`.
    pub fn entry(&self, id: EntryId) -> Result<Entry<'_>, IndexError> {
        if id >= self.entry_count {
            return Err(format_err(format!("entry {id} out of range ({} entries)", self.entry_count)));
        }
        let at = self.entries_off + id as usize * ENTRY_LEN;
        let r = &self.bytes[at..at + ENTRY_LEN];
        let kind = EntryKind::from_u8(r[12])?;
        let name = self.string(rd_u32(r, 4), rd_u32(r, 8))?;
        let aux = rd_u32(r, 64);
        let link_len = rd_u32(r, 44);
        let (link, hardlink_target) = match kind {
            EntryKind::Symlink => (self.string(aux, link_len)?, 0),
            EntryKind::Hardlink => (&[][..], aux),
            _ => (&[][..], 0),
        };
        let (a, b) = (rd_u32(r, 68), rd_u32(r, 72));
        let (first_child, child_count, dev_major, dev_minor) = match kind {
            EntryKind::Dir => (a, b, 0, 0),
            EntryKind::CharDevice | EntryKind::BlockDevice => (0, 0, a, b),
            _ => (0, 0, 0, 0),
        };
        Ok(Entry {
            id,
            parent: rd_u32(r, 0),
            name,
            kind,
            mode: rd_u32(r, 16) & 0o7777,
            uid: rd_u32(r, 20),
            gid: rd_u32(r, 24),
            nlink: rd_u32(r, 28),
            mtime_sec: rd_u64(r, 32) as i64,
            mtime_nsec: rd_u32(r, 40),
            size: rd_u64(r, 48),
            data_offset: rd_u64(r, 56),
            link,
            hardlink_target,
            first_child,
            child_count,
            dev_major,
            dev_minor,
            xattr_first: rd_u32(r, 76),
            xattr_count: rd_u32(r, 80),
        })
    }

    /// The children of directory `dir`, sorted by name.
    pub fn children(&self, dir: &Entry<'_>) -> Result<std::ops::Range<EntryId>, IndexError> {
        if dir.kind != EntryKind::Dir {
            return Ok(0..0);
        }
        let end = dir.first_child.checked_add(dir.child_count).filter(|e| *e <= self.entry_count);
        let end = end.ok_or_else(|| format_err(format!("entry {}: children out of range", dir.id)))?;
        if dir.child_count > 0 && dir.first_child <= dir.id {
            return Err(format_err(format!("entry {}: children precede their parent", dir.id)));
        }
        Ok(dir.first_child..end)
    }

    /// Tells a mapped index that its tree is being walked (a directory listed): from now on its
    /// page faults read around them, so a cold walk reads the breadth-first index in large
    /// pieces. No-op for an owned index, and after the first call.
    pub fn expect_walk(&self) {
        self.bytes.read_around();
    }

    /// Looks up `name` in directory `dir` (binary search over its sorted children).
    pub fn child(&self, dir: &Entry<'_>, name: &[u8]) -> Result<Option<EntryId>, IndexError> {
        let range = self.children(dir)?;
        let (mut lo, mut hi) = (range.start, range.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.entry(mid)?;
            match e.name.cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(mid)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Looks up a path (`a/b/c`, leading `/` or `./` allowed).
    pub fn lookup(&self, path: &str) -> Result<Option<EntryId>, IndexError> {
        let mut cur = self.entry(0)?;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            match self.child(&cur, comp.as_bytes())? {
                Some(id) => cur = self.entry(id)?,
                None => return Ok(None),
            }
        }
        Ok(Some(cur.id))
    }

    /// The full path of an entry, without a leading `/` (root: empty).
    pub fn path(&self, id: EntryId) -> Result<Vec<u8>, IndexError> {
        let mut parts = Vec::new();
        let mut cur = self.entry(id)?;
        while cur.id != 0 {
            parts.push(cur.name.to_vec());
            if cur.parent >= cur.id {
                return Err(format_err(format!("entry {}: parent does not precede it", cur.id)));
            }
            cur = self.entry(cur.parent)?;
        }
        parts.reverse();
        Ok(parts.join(&b'/'))
    }

    /// How many extended attributes the layer's entries carry in all.
    pub fn xattr_total(&self) -> u32 {
        self.xattr_count
    }

    /// The extended attributes of an entry, as (name, value) pairs.
    pub fn xattrs(&self, e: &Entry<'_>) -> Result<Vec<(&[u8], &[u8])>, IndexError> {
        let end = e.xattr_first.checked_add(e.xattr_count).filter(|x| *x <= self.xattr_count);
        let end = end.ok_or_else(|| format_err(format!("entry {}: xattrs out of range", e.id)))?;
        (e.xattr_first..end)
            .map(|i| {
                let at = self.xattrs_off + i as usize * XATTR_LEN;
                let r = &self.bytes[at..at + XATTR_LEN];
                Ok((self.string(rd_u32(r, 0), rd_u32(r, 4))?, self.string(rd_u32(r, 8), rd_u32(r, 12))?))
            })
            .collect()
    }

    /// The entry whose data and inode a (possibly hardlink) entry uses.
    pub fn resolve_hardlink<'a>(&'a self, e: Entry<'a>) -> Result<Entry<'a>, IndexError> {
        if e.kind != EntryKind::Hardlink {
            return Ok(e);
        }
        let t = self.entry(e.hardlink_target)?;
        if t.kind != EntryKind::File {
            return Err(format_err(format!("entry {}: hardlink target {} is not a regular file", e.id, t.id)));
        }
        Ok(t)
    }

    /// Span `i`.
    pub fn span(&self, i: u32) -> Result<SpanInfo, IndexError> {
        if i >= self.checkpoint_count {
            return Err(format_err(format!("span {i} out of range ({} spans)", self.checkpoint_count)));
        }
        let at = self.checkpoints_off + i as usize * CHECKPOINT_LEN;
        let r = &self.bytes[at..at + CHECKPOINT_LEN];
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&r[32..64]);
        let (comp_end, uncomp_end) = if i + 1 < self.checkpoint_count {
            let n = &self.bytes[at + CHECKPOINT_LEN..at + 2 * CHECKPOINT_LEN];
            (rd_u64(n, 8).saturating_add(u64::from(n[16] > 0)), rd_u64(n, 0))
        } else {
            (self.compressed_size, self.uncompressed_size)
        };
        let s = SpanInfo {
            index: i,
            kind: CheckpointKind::from_u8(r[17])?,
            uncomp_start: rd_u64(r, 0),
            comp_start: rd_u64(r, 8),
            bits: r[16],
            window: (rd_u64(r, 24), rd_u32(r, 20)),
            comp_end,
            uncomp_end,
            digest,
        };
        if s.comp_end < s.comp_start || s.uncomp_end < s.uncomp_start || s.bits > 7 || s.comp_end > self.compressed_size
        {
            return Err(format_err(format!("span {i} has inconsistent bounds")));
        }
        // A reader decodes a span whole: a hostile index must not make it allocate a terabyte.
        if s.uncomp_end - s.uncomp_start > MAX_SPAN_LEN || s.comp_end - s.comp_start > MAX_SPAN_COMPRESSED_LEN {
            return Err(format_err(format!(
                "span {i} is {} bytes ({} compressed), more than the {MAX_SPAN_LEN} bytes a span may hold",
                s.uncomp_end - s.uncomp_start,
                s.comp_end - s.comp_start
            )));
        }
        Ok(s)
    }

    /// The span holding uncompressed offset `off` (binary search over checkpoints).
    pub fn span_at(&self, off: u64) -> Result<u32, IndexError> {
        if self.checkpoint_count == 0 {
            return Err(format_err("index has no spans"));
        }
        let (mut lo, mut hi) = (0u32, self.checkpoint_count);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let at = self.checkpoints_off + mid as usize * CHECKPOINT_LEN;
            if rd_u64(&self.bytes, at) <= off {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Whether the windows are a separate blob (see [`Index::split_windows`]).
    pub fn has_external_windows(&self) -> bool {
        self.external_windows.is_some()
    }

    /// Where span `s`'s zstd-compressed window lies in the windows blob (or section), or
    /// `None` for a span that needs none.
    pub fn window_location(&self, s: &SpanInfo) -> Option<(u64, u32)> {
        (s.window.1 > 0).then_some(s.window)
    }
}
