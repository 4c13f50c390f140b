//! The binary encoding of a CLIP index (see `index/FORMAT.md`) and [`Index`], a read-only view
//! over encoded bytes.
//!
//! Opening checks the header, the section bounds and the trailing sha256, and nothing per entry,
//! so it costs the same for ten files as for a million. Every accessor bounds-checks what it reads
//! and returns an error for hostile values; [`Index::validate`] checks every record once (the
//! snapshotter runs it when an index first arrives).
//!
//! By concern: [`codes`] (magic, versions, sizes, and the enums records store),
//! [`header`] (the fixed header, its layout in one place), [`records`] (the owned
//! form the indexer fills), [`encode`](IndexData::encode), [`view`] ([`Index`]: opening and
//! reading entries and spans), [`windows`] (zran windows, inline or split off) and [`validate`].

mod codes;
mod compare;
mod encode;
pub(crate) mod header;
mod records;
mod validate;
mod view;
mod windows;

pub use records::{CheckpointRecord, EntryRecord, IndexData};
pub use validate::{NameError, validate_name};
pub use view::{Entry, Index, SpanInfo};

pub use codes::*;
