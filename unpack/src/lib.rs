//! `clip-unpack`: where a layer is unpacked on the node. A layer blob (gzip, zstd or plain tar,
//! read as a stream) becomes an overlayfs lower directory the way containerd's overlay applier
//! makes one (`archive.Apply` with `OverlayConvertWhiteout`): whiteouts `.wh.<name>` as 0:0
//! character devices, opaque markers as `trusted.overlay.opaque=y`, owners, modes, extended
//! attributes and times as the headers say, directory times set last, missing parent
//! directories created with the attributes the layers below give them. The snapshotter uses it
//! for layers no CLIP index serves lazily, so containerd neither downloads nor unpacks them.
//!
//! Every stream is hostile: paths never leave the layer's directory (parent paths resolve their
//! symlinks inside it, as containerd's `RootPath` does; `..` in an entry's path is refused, as
//! the indexer refuses it), hard links only link inside it, metadata entries are bounded
//! ([`clip_index::build::MetaGuard`]), and the uncompressed stream is checked against the diff
//! ID. The caller checks the blob's own digest and discards the directory on any error. An
//! unpack stops before it leaves the disk less than [`Limits::min_free`] (a layer that inflates
//! without bound).
//!
//! - [`resolve`]: a path inside the layer directory, symlinks resolved within it;
//! - [`apply`]: one tar entry applied to the directory.

pub mod apply;
pub mod resolve;

use clip_index::build::{DiffIdReader, LayerStream, MAX_ENTRIES};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The blob does not inflate (or its download failed: the reader's error).
    #[error("reading the layer: {0}")]
    Stream(String),
    /// The tar stream is malformed or asks for something refused.
    #[error("layer entry {path:?}: {message}")]
    Entry { path: String, message: String },
    #[error("the layer's tar stream: {0}")]
    Tar(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the layer unpacks to {actual}, its image config says {expected}")]
    DiffId { expected: String, actual: String },
    /// Unpacking further would leave less than [`Limits::min_free`] on the disk.
    #[error(
        "stopped after writing {written} bytes: {available} bytes are left on the disk, the unpack must leave {min_free}"
    )]
    DiskReserve { written: u64, available: u64, min_free: u64 },
}

/// Bounds of one unpack beyond what the stream itself is checked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Bytes left free on the file system of the layer directory: checked every
    /// [`apply::FREE_CHECK_BYTES`] of file data written (0: not checked).
    pub min_free: u64,
}

impl UnpackError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { what: what.into(), source }
    }
}

/// What an unpack found.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed stream.
    pub diff_id: String,
    pub entries: u64,
    pub uncompressed_bytes: u64,
}

/// Unpacks the layer blob read from `blob` into the empty directory `root`. `parents`: the
/// directories of the layers below, nearest first (missing parent directories take their
/// attributes from them). `expected_diff_id`: the layer's diff ID from the image config.
/// Blocking. On error `root` holds a partial tree the caller deletes.
pub fn unpack_layer(
    blob: impl Read,
    root: &Path,
    parents: &[PathBuf],
    expected_diff_id: Option<&str>,
    limits: Limits,
) -> Result<Unpacked, UnpackError> {
    let stream = LayerStream::inflate_only(blob).map_err(|e| UnpackError::Stream(e.to_string()))?;
    let mut tar_stream = DiffIdReader::new(stream, true);
    let mut applier = apply::Applier::new(root, parents, limits);
    let mut entries = 0usize;
    {
        let mut archive = tar::Archive::new(&mut tar_stream);
        for entry in archive.entries_with_seek().map_err(|e| read_error(&e))? {
            let entry = entry.map_err(|e| read_error(&e))?;
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(UnpackError::Tar(format!("more than {MAX_ENTRIES} entries")));
            }
            applier.apply(entry)?;
        }
    }
    // Whatever follows the end-of-archive blocks is part of the stream the diff ID covers.
    std::io::copy(&mut tar_stream, &mut std::io::sink()).map_err(|e| read_error(&e))?;
    applier.finish()?;
    let uncompressed_bytes = tar_stream.position();
    let diff_id = tar_stream.diff_id().unwrap_or_default();
    if let Some(expected) = expected_diff_id
        && !expected.eq_ignore_ascii_case(&diff_id)
    {
        return Err(UnpackError::DiffId { expected: expected.to_string(), actual: diff_id });
    }
    Ok(Unpacked { diff_id, entries: entries as u64, uncompressed_bytes })
}

/// An error met while reading: the download's or the inflater's own message, else tar's.
fn read_error(e: &std::io::Error) -> UnpackError {
    match e.get_ref() {
        Some(inner) => UnpackError::Stream(inner.to_string()),
        None => UnpackError::Tar(e.to_string()),
    }
}
