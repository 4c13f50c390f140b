//! The one-pass indexer: reads a layer blob once, as a stream, and produces its index.
//!
//! [`stream::LayerStream`] inflates (gzip via zlib with `Z_BLOCK`, zstd frame by frame, or plain),
//! hashes the blob and every span, and records seek points as it goes, on a thread of its own
//! ([`pipe`]); the `tar` crate parses the inflated stream it yields; [`tree`] turns the entries
//! into the index's sorted tree.

mod guard;
mod header;
mod pipe;
mod stream;
mod tree;

pub use guard::{MAX_META, MetaGuard};
pub use header::{MAX_PATH, TarFields, normalize, split_last, tar_fields};
pub use stream::{LayerStream, sniff};
pub use tree::MAX_ENTRIES;

/// How a layer's tar stream marks deletions (the image spec's whiteouts), and the overlayfs
/// attribute an opaque directory becomes: for every part that presents or unpacks a layer.
pub mod whiteout {
    /// `.wh.<name>`: `<name>` is deleted (overlayfs: a 0:0 character device `<name>`).
    pub const PREFIX: &[u8] = b".wh.";
    /// In a directory: the layers below contribute nothing to it.
    pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
    /// The overlayfs form of an opaque directory (`y`).
    pub const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
}

use crate::format::{EntryEncoder, IndexData};
use crate::{Index, IndexError};
use sha2::{Digest, Sha256};
use std::io::Read;

/// Default span size: uncompressed bytes between seek points.
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;
/// Smallest span size accepted.
pub const MIN_SPAN_SIZE: u64 = 64 << 10;

/// How to build an index.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Uncompressed bytes between seek points (about; gzip checkpoints fall on block boundaries).
    pub span_size: u64,
    /// The layer's digest (`sha256:<hex>`) as the manifest states it; verified against the blob.
    pub expected_digest: Option<String>,
    /// The layer's media type, recorded in the index.
    pub media_type: String,
    /// The layer's diff ID (`sha256:<hex>` of the uncompressed tar) as the image config states
    /// it; verified against the stream.
    pub expected_diff_id: Option<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self { span_size: DEFAULT_SPAN_SIZE, expected_digest: None, media_type: String::new(), expected_diff_id: None }
    }
}

/// Reads `blob` once and builds its index.
pub fn build_index(blob: impl Read + Send, opts: &BuildOptions) -> Result<Index, IndexError> {
    servable(Index::open(build_index_data(blob, opts)?.encode()?)?)
}

/// Reads `blob` once and builds its index without windows and the windows blob it refers to
/// (see [`IndexData::encode_split`]); a layer without windows (not gzip) gives its plain index
/// and `None`. What a builder publishes, made without holding the windows twice.
pub fn build_index_split(blob: impl Read + Send, opts: &BuildOptions) -> Result<(Index, Option<Vec<u8>>), IndexError> {
    let (index, windows) = build_index_data(blob, opts)?.encode_split()?;
    Ok((servable(Index::open(index)?)?, windows))
}

/// Seek points further apart than a reader may decode at once (a zstd blob of one large
/// frame): say so here, not at every node that would try to serve it.
fn servable(index: Index) -> Result<Index, IndexError> {
    for i in 0..index.span_count() {
        index.span(i).map_err(|e| IndexError::Invalid(format!("this layer cannot be served lazily: {e}")))?;
    }
    Ok(index)
}

/// Reads `blob` once and returns the index before encoding: the blob is inflated on a thread of
/// its own ([`pipe`]) while this one parses the tar stream and builds the tree.
pub fn build_index_data(blob: impl Read + Send, opts: &BuildOptions) -> Result<IndexData, IndexError> {
    if opts.span_size < MIN_SPAN_SIZE {
        return Err(IndexError::Invalid(format!("span size {} is below the minimum {MIN_SPAN_SIZE}", opts.span_size)));
    }
    let stream = stream::LayerStream::new(blob, opts.span_size)?;
    let compression = stream.compression();
    let (tree, (diff_id, done)) = std::thread::scope(|scope| -> Result<_, IndexError> {
        let (inflating, chunks) = pipe::Inflating::spawn(scope, stream, opts.expected_diff_id.is_some());
        let tree = read_tree(chunks)?;
        Ok((tree, inflating.finish()?))
    })?;
    if let (Some(expected), Some(actual)) = (&opts.expected_diff_id, diff_id)
        && !expected.eq_ignore_ascii_case(&actual)
    {
        return Err(IndexError::DiffId { expected: expected.clone(), actual });
    }
    let done = done?;
    let layer_digest: [u8; 32] = done.blob_digest;
    let actual = format!("sha256:{}", hex::encode(layer_digest));
    if let Some(expected) = &opts.expected_digest
        && !expected.eq_ignore_ascii_case(&actual)
    {
        return Err(IndexError::LayerDigest { expected: expected.clone(), actual });
    }
    let mut entries = EntryEncoder::new(&opts.media_type, tree.entry_count())?;
    tree.finish(done.uncompressed_size, &mut entries)?;
    Ok(IndexData {
        compression,
        span_size: opts.span_size,
        compressed_size: done.compressed_size,
        uncompressed_size: done.uncompressed_size,
        layer_digest,
        entries,
        checkpoints: done.checkpoints,
        windows: done.windows,
    })
}

/// Parses a layer's whole uncompressed stream into its tree.
fn read_tree(uncompressed: impl Read) -> Result<tree::TreeBuilder, IndexError> {
    let mut tree = tree::TreeBuilder::default();
    let mut tar_stream = DiffIdReader::new(uncompressed, false);
    {
        let mut archive = tar::Archive::new(&mut tar_stream);
        let entries = archive.entries_with_seek().map_err(|e| tar_err(&e))?;
        for entry in entries {
            let entry = entry.map_err(|e| tar_err(&e))?;
            tree.add(entry)?;
        }
    }
    // Whatever follows the end-of-archive marker is still part of the blob: hash and inflate it.
    std::io::copy(&mut tar_stream, &mut std::io::sink()).map_err(|e| tar_err(&e))?;
    Ok(tree)
}

/// The uncompressed tar stream of a layer as the tar crate should read it: its metadata entries
/// bounded ([`MetaGuard`]), hashed as it is read (for the diff ID), and skipping forward by
/// reading.
pub struct DiffIdReader<R> {
    inner: MetaGuard<R>,
    hash: Option<Sha256>,
    /// Where skipped bytes are read to (see the `Seek` impl).
    scratch: Vec<u8>,
    /// Bytes read so far: the position a seek reports (tar keeps its offsets by it).
    pos: u64,
}

impl<R> std::fmt::Debug for DiffIdReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiffIdReader").field("pos", &self.pos).finish_non_exhaustive()
    }
}

impl<R: Read> DiffIdReader<R> {
    /// `hash`: compute the diff ID.
    pub fn new(inner: R, hash: bool) -> Self {
        Self { inner: MetaGuard::new(inner), hash: hash.then(Sha256::new), scratch: Vec::new(), pos: 0 }
    }

    /// `sha256:<hex>` of everything read so far (once; `None` when not hashing).
    pub fn diff_id(&mut self) -> Option<String> {
        self.hash.take().map(|h| format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// Uncompressed bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn get_mut(&mut self) -> &mut R {
        self.inner.get_mut()
    }
}

/// Forward only: the tar reader skips each entry's data by seeking; a stream skips by reading
/// (every byte is inflated and hashed anyway), here through one reused buffer — without it, tar
/// zeroes a fresh 32 KiB buffer per entry, a tenth of indexing a million small files.
impl<R: Read> std::io::Seek for DiffIdReader<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let std::io::SeekFrom::Current(mut amt @ 0..) = pos else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "a layer stream only skips forward"));
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(64 << 10, 0);
        while amt > 0 {
            let n = usize::try_from(amt).unwrap_or(usize::MAX).min(scratch.len());
            let n = self.read(&mut scratch[..n])?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the layer ends inside an entry"));
            }
            amt -= n as i64;
        }
        self.scratch = scratch;
        Ok(self.pos)
    }
}

impl<R: Read> Read for DiffIdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// An I/O error from inside the stream keeps its message; tar's own errors are tar errors.
fn tar_err(e: &std::io::Error) -> IndexError {
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<stream::StreamError>()) {
        return IndexError::Compressed(inner.0.clone());
    }
    IndexError::Tar(e.to_string())
}

/// sha256 of a byte slice as an array.
pub(crate) fn sha256(b: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(b).into()
}
