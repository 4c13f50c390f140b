//! `clip-readpath`: where a span is fetched. Under a lazy layer's FUSE file system, a read of
//! uncompressed tar bytes becomes spans taken from the on-disk span cache or fetched from the
//! blob (Range requests through a [`clip_index::RangeFetcher`]), verified against the index's
//! span digests and inflated from their checkpoints ([`spans`]), within the daemon's disk
//! budget ([`budget`]), with what a miss suggests fetched ahead ([`prefetch`]; a shared library's
//! dynamic-linking tables whole and the pages its relocations write: [`elf`]), access profiles recorded and replayed
//! ([`profile`]), the rest of each
//! layer streamed in behind in the link's idle time ([`complete`], following [`demand`]) and counted ([`metrics`]). No FUSE, no async runtime: plain threads, unit-testable on local files.
//! See `docs/architecture.md` for how it sits under `clip-layerfs`.

pub mod budget;
pub mod complete;
pub mod demand;
pub mod elf;
pub mod metrics;
pub mod prefetch;
pub mod profile;
pub mod spans;
#[cfg(test)]
mod testutil;
pub mod verify;
mod workers;

pub use budget::CacheBudget;
pub use clip_index::RangeFetcher;
pub use clip_index::reader::FileFetcher;
pub use complete::{Completer, CompletionObserver, CompletionPolicy};
pub use demand::Demand;
pub use metrics::{FuseOp, LayerMetrics};
pub use prefetch::{PrefetchPolicy, Prefetcher};
pub use profile::{Recorder, Recording, ReplayPolicy, Replayer};
pub use spans::{Cause, FileSpans, Hint, MissObserver, ReadObserver, SpanCache, SpanCacheOptions, SpanError, Streamed};
