//! Lazy layers: a layer's CLIP index served read-only over FUSE ([`fs`]), its bytes fetched
//! span by span on demand and kept in an on-disk span cache ([`spans`]).

pub mod fs;
pub mod spans;

pub use fs::{LayerFs, mount};
pub use spans::{BlobSource, FileBlob, RegistryBlob, SpanCache};
