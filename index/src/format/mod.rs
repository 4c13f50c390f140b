//! The binary encoding of a CLIP index (see `index/FORMAT.md`) and [`Index`], a read-only view
//! over encoded bytes.
//!
//! Opening checks the header, the section bounds and the trailing sha256, and nothing per entry,
//! so it costs the same for ten files as for a million. Every accessor bounds-checks what it reads
//! and returns an error for hostile values; [`Index::validate`] checks every record once (the
//! snapshotter runs it when an index first arrives).
//!
//! An index is read from memory or, stored, from a read-only map of its file (`backing`), which
//! keeps a daemon's memory to the pages its lookups touch.
//!
//! By concern: [`codes`] (magic, versions, sizes, and the enums records store),
//! [`header`] (the fixed header, its layout in one place), [`records`] (what the
//! indexer hands the encoder), [`encode`] (entries encoded as they come, then the whole index), [`view`] ([`Index`]: opening and
//! reading entries and spans), [`windows`] (zran windows, inline or split off) and [`validate`].

mod backing;
mod codes;
mod compare;
mod encode;
pub(crate) mod header;
mod records;
mod validate;
mod view;
mod windows;

pub use encode::{EntryEncoder, IndexData};
pub use records::{CheckpointRecord, EntryRecord};
pub use validate::{NameError, validate_name};
pub use view::{Entry, Index, SpanInfo};

pub use codes::*;
