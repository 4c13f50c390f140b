//! The binary encoding of a CLIP index (see `index/FORMAT.md`) and [`Index`], a read-only view
//! over encoded bytes.
//!
//! Opening checks the header, the section bounds and the trailing sha256, and nothing per entry,
//! so it costs the same for ten files as for a million. Every accessor bounds-checks what it reads
//! and returns an error for hostile values; [`Index::validate`] checks every record once (the
//! snapshotter runs it when an index first arrives).

use crate::IndexError;
use crate::error::format_err;
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"CLIPIDX\0";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 152;
pub const ENTRY_LEN: usize = 88;
pub const XATTR_LEN: usize = 16;
pub const CHECKPOINT_LEN: usize = 64;
pub const TRAILER_LEN: usize = 32;
/// Largest index accepted (guards allocation on hostile input).
pub const MAX_INDEX_LEN: usize = 1 << 31;

/// Compression of the layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Gzip = 1,
    Zstd = 2,
}

impl Compression {
    fn from_u8(v: u8) -> Result<Self, IndexError> {
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
    fn from_u8(v: u8) -> Result<Self, IndexError> {
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
    fn from_u8(v: u8) -> Result<Self, IndexError> {
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

// ---------------------------------------------------------------------------------------------
// Owned form, produced by the indexer and encoded once.

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

/// sha256 of `data` (the checksum the trailer holds).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

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
                let z = zstd::bulk::compress(&c.window, 19)?;
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
        let mut out = Vec::with_capacity(windows_off as usize + windows.len() + TRAILER_LEN);
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, VERSION);
        out.extend_from_slice(&[self.compression as u8, 0, 0, 0]);
        put_u64(&mut out, self.span_size);
        put_u64(&mut out, self.compressed_size);
        put_u64(&mut out, self.uncompressed_size);
        out.extend_from_slice(&self.layer_digest);
        put_u32(&mut out, mt_off);
        put_u32(&mut out, mt_len);
        put_u32(&mut out, len_u32(self.entries.len(), "entries")?);
        put_u32(&mut out, xattr_count);
        put_u32(&mut out, len_u32(self.checkpoints.len(), "checkpoints")?);
        put_u32(&mut out, 0);
        for v in [
            entries_off,
            xattrs_off,
            checkpoints_off,
            strings_off,
            strings.len() as u64,
            windows_off,
            windows.len() as u64,
        ] {
            put_u64(&mut out, v);
        }
        debug_assert_eq!(out.len(), HEADER_LEN);
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

// ---------------------------------------------------------------------------------------------
// Read-only view.

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// An index opened over its encoded bytes.
#[derive(Clone)]
pub struct Index {
    bytes: std::sync::Arc<[u8]>,
    compression: Compression,
    span_size: u64,
    compressed_size: u64,
    uncompressed_size: u64,
    entry_count: u32,
    xattr_count: u32,
    checkpoint_count: u32,
    entries_off: usize,
    xattrs_off: usize,
    checkpoints_off: usize,
    strings: (usize, usize),
    windows: (usize, usize),
    media_type: (u32, u32),
    /// Version 2 with the windows in a separate blob: offset (in `bytes`) of the table of
    /// their sha256 digests, one per checkpoint.
    external_windows: Option<usize>,
}

/// Header flag (byte 13, version 2): the windows section is a separate blob.
const FLAG_EXTERNAL_WINDOWS: u8 = 1;
/// The version of an index whose windows are a separate blob.
pub const VERSION_EXTERNAL_WINDOWS: u32 = 2;

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
    window: (u64, u32),
}

impl Index {
    /// The packed form of an index: one zstd frame of its bytes, as published to registries
    /// (about half the size; see `FORMAT.md`).
    pub fn pack(&self) -> Result<Vec<u8>, IndexError> {
        Ok(zstd::bulk::compress(&self.bytes, 19)?)
    }

    /// Opens an index in either form: packed (a zstd frame, decompressed up to
    /// [`MAX_INDEX_LEN`]) or plain.
    pub fn open_any(bytes: Vec<u8>) -> Result<Self, IndexError> {
        if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let mut out = Vec::new();
            let dec = zstd::stream::read::Decoder::new(&bytes[..])?;
            std::io::Read::read_to_end(&mut std::io::Read::take(dec, MAX_INDEX_LEN as u64 + 1), &mut out)
                .map_err(|e| format_err(format!("bad packed index: {e}")))?;
            if out.len() > MAX_INDEX_LEN {
                return Err(format_err("packed index unpacks to more than 2 GiB"));
            }
            return Self::open(out);
        }
        Self::open(bytes)
    }

    /// Opens an index over `bytes`: checks magic, version, checksum and section bounds.
    pub fn open(bytes: impl Into<std::sync::Arc<[u8]>>) -> Result<Self, IndexError> {
        let bytes: std::sync::Arc<[u8]> = bytes.into();
        let b = &bytes[..];
        if b.len() < HEADER_LEN + TRAILER_LEN {
            return Err(format_err(format!("{} bytes is too short for an index", b.len())));
        }
        if b.len() > MAX_INDEX_LEN {
            return Err(format_err("index larger than 2 GiB"));
        }
        if &b[..8] != MAGIC {
            return Err(format_err("not a CLIP index (bad magic)"));
        }
        let version = rd_u32(b, 8);
        if version != VERSION && version != VERSION_EXTERNAL_WINDOWS {
            return Err(format_err(format!(
                "unsupported index version {version} (this build reads {VERSION} and {VERSION_EXTERNAL_WINDOWS})"
            )));
        }
        let flags = b[13];
        let external = match (version, flags) {
            (VERSION, 0) => false,
            (VERSION_EXTERNAL_WINDOWS, FLAG_EXTERNAL_WINDOWS) => true,
            _ => return Err(format_err(format!("version {version} with flags {flags:#x} is not valid"))),
        };
        let body = b.len() - TRAILER_LEN;
        if Sha256::digest(&b[..body])[..] != b[body..] {
            return Err(format_err("index checksum mismatch (truncated or corrupted)"));
        }
        let compression = Compression::from_u8(b[12])?;
        let span_size = rd_u64(b, 16);
        let compressed_size = rd_u64(b, 24);
        let uncompressed_size = rd_u64(b, 32);
        let media_type = (rd_u32(b, 72), rd_u32(b, 76));
        let entry_count = rd_u32(b, 80);
        let xattr_count = rd_u32(b, 84);
        let checkpoint_count = rd_u32(b, 88);
        let sec = |i: usize| rd_u64(b, 96 + 8 * i);
        let (entries_off, xattrs_off, checkpoints_off, strings_off, strings_len, windows_off, windows_len) =
            (sec(0), sec(1), sec(2), sec(3), sec(4), sec(5), sec(6));
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
            let table = u64::from(rd_u32(b, 92));
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
            media_type,
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

    /// sha256 of the encoded index, `sha256:<hex>` (its content address).
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(&self.bytes)))
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
        format!("sha256:{}", hex::encode(&self.bytes[40..72]))
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
            (rd_u64(n, 8) + u64::from(n[16] > 0), rd_u64(n, 0))
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

    /// Checks an externally fetched window of span `s` against its digest and decompresses it.
    pub fn external_window(&self, s: &SpanInfo, zstd_window: &[u8]) -> Result<Vec<u8>, IndexError> {
        let table = self.external_windows.ok_or_else(|| format_err("this index holds its windows itself"))?;
        let at = table + s.index as usize * 32;
        if sha256(zstd_window)[..] != self.bytes[at..at + 32] || zstd_window.len() != s.window.1 as usize {
            return Err(IndexError::Compressed(format!("span {}: window does not match its digest", s.index)));
        }
        zstd::bulk::decompress(zstd_window, crate::inflate::WINDOW_SIZE)
            .map_err(|e| format_err(format!("span {}: bad window: {e}", s.index)))
    }

    /// Splits an index into a small one without windows (version 2, with a digest per window)
    /// and the windows blob it refers to, so that a reader fetches only the windows of the
    /// spans it reads. `None` when there are no windows to split off.
    pub fn split_windows(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>, IndexError> {
        let (wo, wl) = self.windows;
        if self.external_windows.is_some() || wl == 0 {
            return Ok(None);
        }
        let windows = self.bytes[wo..wo + wl].to_vec();
        let (so, sl) = self.strings;
        let mut digests = Vec::with_capacity(self.checkpoint_count as usize * 32);
        for i in 0..self.checkpoint_count {
            let s = self.span(i)?;
            let (off, len) = s.window;
            let z = windows
                .get(off as usize..off as usize + len as usize)
                .ok_or_else(|| format_err(format!("span {i}: window outside the index")))?;
            digests.extend_from_slice(&sha256(z));
        }
        // Sections up to the strings are unchanged; the digests follow the strings inside the
        // string table; the windows section becomes empty.
        let mut out = self.bytes[..so + sl].to_vec();
        out.extend_from_slice(&digests);
        let new_strings_len = (sl + digests.len()) as u64;
        let windows_off = (so as u64) + new_strings_len;
        out[8..12].copy_from_slice(&VERSION_EXTERNAL_WINDOWS.to_le_bytes());
        out[13] = FLAG_EXTERNAL_WINDOWS;
        out[92..96].copy_from_slice(&u32::try_from(sl).map_err(|_| format_err("strings too large"))?.to_le_bytes());
        out[96 + 8 * 4..96 + 8 * 5].copy_from_slice(&new_strings_len.to_le_bytes());
        out[96 + 8 * 5..96 + 8 * 6].copy_from_slice(&windows_off.to_le_bytes());
        out[96 + 8 * 6..96 + 8 * 7].copy_from_slice(&0u64.to_le_bytes());
        let checksum = sha256(&out);
        out.extend_from_slice(&checksum);
        Ok(Some((out, windows)))
    }

    /// The (uncompressed) history window of a block checkpoint.
    pub(crate) fn window(&self, s: &SpanInfo) -> Result<Vec<u8>, IndexError> {
        let (off, len) = s.window;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.external_windows.is_some() {
            return Err(format_err(format!("span {}: the window is in the separate windows blob", s.index)));
        }
        let (wo, wl) = self.windows;
        let end = off.checked_add(u64::from(len)).filter(|e| *e <= wl as u64);
        let end = end.ok_or_else(|| format_err(format!("span {}: window outside the index", s.index)))?;
        let z = &self.bytes[wo + off as usize..wo + end as usize];
        let w = zstd::bulk::decompress(z, crate::inflate::WINDOW_SIZE)
            .map_err(|e| format_err(format!("span {}: bad window: {e}", s.index)))?;
        Ok(w)
    }

    /// Checks every record once: names, tree links, hardlinks, xattrs, data ranges, spans.
    pub fn validate(&self) -> Result<(), IndexError> {
        for id in 0..self.entry_count {
            let e = self.entry(id)?;
            if id != 0 {
                if e.parent >= id {
                    return Err(format_err(format!("entry {id}: parent {} does not precede it", e.parent)));
                }
                let p = self.entry(e.parent)?;
                let r = self.children(&p)?;
                if !r.contains(&id) {
                    return Err(format_err(format!("entry {id}: not among its parent's children")));
                }
                validate_name(e.name).map_err(|m| format_err(format!("entry {id}: {m}")))?;
                if id > r.start && self.entry(id - 1)?.name >= e.name {
                    return Err(format_err(format!("entry {id}: siblings not sorted or duplicated")));
                }
            }
            if e.kind == EntryKind::Dir {
                for c in self.children(&e)? {
                    if self.entry(c)?.parent != id {
                        return Err(format_err(format!("entry {id}: child {c} names another parent")));
                    }
                }
            }
            if e.kind == EntryKind::Hardlink {
                self.resolve_hardlink(e.clone())?;
            }
            if e.kind == EntryKind::File {
                let end = e.data_offset.checked_add(e.size);
                if end.is_none_or(|end| end > self.uncompressed_size) {
                    return Err(format_err(format!("entry {id}: data lies outside the layer")));
                }
            }
            self.xattrs(&e)?;
        }
        let mut prev: Option<SpanInfo> = None;
        for i in 0..self.checkpoint_count {
            let s = self.span(i)?;
            if let Some(p) = &prev {
                if s.uncomp_start < p.uncomp_start || s.comp_start < p.comp_start {
                    return Err(format_err(format!("span {i}: checkpoints out of order")));
                }
            } else if s.uncomp_start != 0 || s.comp_start != 0 {
                return Err(format_err("span 0 does not start at 0"));
            }
            if self.external_windows.is_none() {
                self.window(&s)?;
            }
            prev = Some(s);
        }
        self.media_type()?;
        Ok(())
    }
}

/// A name is one path component: not empty, not `.` or `..`, no `/`, no NUL.
pub fn validate_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(format!("invalid name {:?}", String::from_utf8_lossy(name)));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(format!("name {:?} contains '/' or NUL", String::from_utf8_lossy(name)));
    }
    Ok(())
}
