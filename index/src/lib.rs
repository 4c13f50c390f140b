//! `clip-index`: the only crate that knows the CLIP index's bytes.
//!
//! A CLIP index describes one image layer (a tar stream, plain or gzip- or zstd-compressed) so
//! that any file's bytes can be read by fetching only a few compressed *spans* of the unmodified
//! blob:
//! - [`build`]: the one-pass indexer. It reads a blob once as a stream, inflating, hashing and
//!   parsing tar in the same pass, and records every entry with full metadata, seek points
//!   (zran checkpoints for gzip, frame starts for zstd, fixed chunks for plain tar) and a sha256
//!   of every span's compressed bytes;
//! - [`format`]: the versioned binary encoding (`index/FORMAT.md`) and [`Index`], a view over
//!   encoded bytes — in memory, or a read-only map of a stored index file — that opens without
//!   per-entry work and looks paths up by binary search;
//! - [`reader`]: random access: which spans cover a range, decoding a span after verifying its
//!   digest, and a convenience read through a caller-supplied [`reader::RangeFetcher`].
//!
//! Fetching and caching are the caller's: this crate does no I/O beyond the reader it is given and
//! the stored index file a caller asks it to open ([`Index::open_file`]).

pub mod build;
mod error;
pub mod format;
mod inflate;
pub mod reader;

pub mod artifact;
pub mod profile;
pub use build::{BuildOptions, build_index, build_index_split};
pub use error::IndexError;
pub use format::{Compression, Entry, EntryId, EntryKind, Index, SpanInfo};
pub use reader::{HISTORY_BYTES, RangeFetcher};
