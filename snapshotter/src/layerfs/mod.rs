//! Lazy layers: a layer's CLIP index served read-only over FUSE ([`fs`]), its bytes fetched
//! span by span on demand and kept in an on-disk span cache ([`spans`]) within a disk budget
//! ([`budget`]), with what a miss suggests fetched ahead ([`prefetch`]); a kept FUSE
//! connection served again after a restart ([`reattach`]).

pub mod budget;
pub mod fs;
pub mod prefetch;
pub mod reattach;
pub mod session_state;
pub mod spans;

pub use fs::{LayerFs, mount};
pub use reattach::reattach;
pub use spans::{BlobSource, FileBlob, RegistryBlob, SpanCache};
