//! The read-path counters of one lazily served layer: handles into the daemon's Prometheus
//! families (the daemon registers them; a cache on its own keeps unregistered no-op handles).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// One layer's read-path metrics.
#[derive(Clone, Debug, Default)]
pub struct LayerMetrics {
    pub fetched_bytes: Counter,
    pub fetches: Counter,
    pub span_hits: Counter,
    pub span_misses: Counter,
    pub spans_local: Gauge,
    pub spans_total: Gauge,
    pub read_seconds: Option<Histogram>,
    pub passthrough_opens: Counter,
    pub prefetched_spans: Counter,
    /// Compressed bytes fetched, by cause: container reads, prefetch guesses, access profile
    /// replay, completion.
    pub foreground_bytes: Counter,
    pub prefetch_bytes: Counter,
    pub profile_bytes: Counter,
    pub stream_bytes: Counter,
    /// Spans made local by background completion.
    pub streamed_spans: Counter,
    /// Reads that found a span the profile replay fetched (hits), fetches a read made itself
    /// while the layer replayed a profile (misses).
    pub profile_hits: Counter,
    pub profile_misses: Counter,
    /// FUSE requests the layer's mount answered, by operation (the order of [`FuseOp::NAMES`]).
    pub fuse_requests: [Counter; FuseOp::COUNT],
}

/// The FUSE operations counted per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuseOp {
    Lookup,
    Getattr,
    Readdir,
    Readdirplus,
    Open,
    Read,
    Getxattr,
    Readlink,
}

impl FuseOp {
    pub const COUNT: usize = 8;
    /// Label values, indexed by `op as usize`.
    pub const NAMES: [&'static str; Self::COUNT] =
        ["lookup", "getattr", "readdir", "readdirplus", "open", "read", "getxattr", "readlink"];
}

impl LayerMetrics {
    /// Counts one FUSE request of `op`.
    pub fn fuse_request(&self, op: FuseOp) {
        self.fuse_requests[op as usize].inc();
    }
}
