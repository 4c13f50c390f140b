//! The read-path settings of lazy layers, from `[lazy]`: read-ahead, passthrough, the bound on
//! one fetch, and the shared parts every layer's span cache is wired to — the prefetcher, the
//! background completer, the containers' demand on the link (completion follows it) and the
//! disk budget of all span caches.

use crate::metrics::Metrics;
use clip_config::SnapshotterConfig;
use clip_readpath::{
    CacheBudget, Completer, CompletionPolicy, Demand, MissObserver, PrefetchPolicy, Prefetcher, RangeFetcher,
    ReadObserver, SpanCacheOptions,
};
use std::sync::Arc;
use std::time::Duration;

/// Spans in one speculative request (about 1-2 MB compressed for the builder's 256 KiB spans).
const PREFETCH_GROUP_SPANS: u32 = 8;

/// How every lazy layer of the daemon reads.
pub struct ReadSettings {
    /// Missing spans fetched together with a requested one.
    pub readahead_spans: u32,
    /// Whether large local files are served with FUSE passthrough.
    pub passthrough: bool,
    /// Bound on one span fetch with its retries.
    pub fetch_timeout: Duration,
    /// Speculative fetching after misses (`None`: off).
    prefetcher: Option<Arc<Prefetcher>>,
    /// Background completion of mounted layers (`None`: off).
    pub(crate) completer: Option<Completer>,
    /// The containers' demand on the link, across layers (completion follows it).
    demand: Arc<Demand>,
    /// The disk budget of all span caches.
    pub budget: Arc<CacheBudget>,
}

impl std::fmt::Debug for ReadSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadSettings")
            .field("readahead_spans", &self.readahead_spans)
            .field("passthrough", &self.passthrough)
            .field("fetch_timeout", &self.fetch_timeout)
            .finish_non_exhaustive()
    }
}

impl ReadSettings {
    /// The settings `[lazy]` asks for, with the disk budget counted from what is on disk.
    pub fn new(
        cfg: &SnapshotterConfig,
        layout: &super::layout::CacheLayout,
        metrics: &Metrics,
        completed: Arc<dyn clip_readpath::CompletionObserver>,
    ) -> Self {
        let budget = CacheBudget::new(cfg.lazy.cache_max_bytes)
            .with_metrics(metrics.cache_bytes.clone(), metrics.cache_evictions.clone());
        metrics.cache_limit_bytes.set(i64::try_from(cfg.lazy.cache_max_bytes).unwrap_or(i64::MAX));
        budget.scan(&layout.spans_root(), &layout.files_root());
        tracing::info!(bytes = budget.used(), limit = cfg.lazy.cache_max_bytes, "span caches counted");
        let completer = if cfg.lazy.completion.enabled {
            Completer::start(
                CompletionPolicy {
                    streams: cfg.lazy.completion.layers,
                    request_bytes: cfg.lazy.completion.request_bytes,
                    start_delay: Duration::from_millis(cfg.lazy.completion.start_delay_ms),
                    quiet: Duration::from_millis(cfg.lazy.completion.quiet_ms),
                },
                Some(completed),
            )
        } else {
            tracing::info!("background completion is off");
            None
        };
        Self {
            readahead_spans: cfg.lazy.readahead_spans,
            passthrough: cfg.lazy.passthrough,
            fetch_timeout: Duration::from_secs(cfg.lazy.fetch_timeout_s),
            prefetcher: Prefetcher::start(PrefetchPolicy {
                threads: cfg.lazy.prefetch.threads,
                neighbour_spans: cfg.lazy.prefetch.neighbour_spans,
                neighbours_after_misses: cfg.lazy.prefetch.neighbours_after_misses,
                file_spans: cfg.lazy.prefetch.file_spans,
                group_spans: PREFETCH_GROUP_SPANS,
                library_tables: cfg.lazy.prefetch.library_tables,
            }),
            completer,
            demand: Arc::new(Demand::default()),
            budget: Arc::new(budget),
        }
    }

    /// How a layer's span cache is wired: these settings, the layer's metrics, its windows
    /// blob, and who is told of its reads.
    pub fn span_cache_options(
        &self,
        metrics: clip_readpath::LayerMetrics,
        windows: Option<Arc<dyn RangeFetcher>>,
        reads: Option<Arc<dyn ReadObserver>>,
    ) -> SpanCacheOptions {
        SpanCacheOptions {
            metrics,
            readahead_spans: self.readahead_spans,
            demand: Some(self.demand.clone()),
            windows,
            budget: Some(self.budget.clone()),
            observer: self.prefetcher.clone().map(|p| p as Arc<dyn MissObserver>),
            reads,
        }
    }
}
