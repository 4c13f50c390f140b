//! Prometheus metrics: per-call counts (by gRPC code) and latencies, served as text on
//! `metrics_address` (off unless configured).

pub use clip_readpath::LayerMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerOpLabels {
    layer: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    layer: String,
    /// `foreground` (container reads), `prefetch` (guesses after a miss), `profile` (access
    /// profile replay), `stream` (completion).
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnpackLabels {
    /// `ok`, `failed` (containerd then unpacked the layer).
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    /// `same`, `differs`, `unverifiable`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoisonedLabels {
    image: String,
    layer: String,
    index: String,
}

/// The daemon's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    fetched_bytes: Family<LayerLabels, Counter>,
    fetches: Family<LayerLabels, Counter>,
    span_hits: Family<LayerLabels, Counter>,
    span_misses: Family<LayerLabels, Counter>,
    spans_local: Family<LayerLabels, prometheus_client::metrics::gauge::Gauge>,
    spans_total: Family<LayerLabels, prometheus_client::metrics::gauge::Gauge>,
    read_seconds: Histogram,
    passthrough_opens: Family<LayerLabels, Counter>,
    prefetched_spans: Family<LayerLabels, Counter>,
    bytes_by_cause: Family<CauseLabels, Counter>,
    streamed_spans: Family<LayerLabels, Counter>,
    profile_hits: Family<LayerLabels, Counter>,
    profile_misses: Family<LayerLabels, Counter>,
    profile_events: Family<EventLabels, Counter>,
    fuse_requests: Family<LayerOpLabels, Counter>,
    /// Bytes in the span caches and passthrough copies, their limit, and evicted spans.
    pub cache_bytes: prometheus_client::metrics::gauge::Gauge,
    pub cache_limit_bytes: prometheus_client::metrics::gauge::Gauge,
    pub cache_evictions: Counter,
    verdicts: Family<VerdictLabels, Counter>,
    poisoned: Family<PoisonedLabels, prometheus_client::metrics::gauge::Gauge>,
    unpacks: Family<UnpackLabels, Counter>,
    unpacked_bytes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clip_snapshotter");
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0])
        });
        registry.register("grpc_calls", "snapshots API calls by method and gRPC code", calls.clone());
        registry.register("grpc_call_seconds", "snapshots API call latency by method", latency.clone());
        let fetched_bytes = Family::<LayerLabels, Counter>::default();
        let fetches = Family::<LayerLabels, Counter>::default();
        let span_hits = Family::<LayerLabels, Counter>::default();
        let span_misses = Family::<LayerLabels, Counter>::default();
        let spans_local = Family::<LayerLabels, prometheus_client::metrics::gauge::Gauge>::default();
        let spans_total = Family::<LayerLabels, prometheus_client::metrics::gauge::Gauge>::default();
        let read_seconds = Histogram::new([0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "registry_fetched_bytes",
            "compressed bytes fetched from registries, by layer",
            fetched_bytes.clone(),
        );
        registry.register(
            "registry_fetches",
            "range requests to registries, by layer (span data and history windows)",
            fetches.clone(),
        );
        registry.register("span_cache_hits", "span reads served from the local span cache", span_hits.clone());
        registry.register("span_cache_misses", "span reads that had to fetch", span_misses.clone());
        registry.register("layer_spans_local", "spans of a mounted layer that are local", spans_local.clone());
        registry.register("layer_spans", "spans of a mounted layer", spans_total.clone());
        registry.register("fuse_read_seconds", "latency of FUSE reads of lazy layers", read_seconds.clone());
        let passthrough_opens = Family::<LayerLabels, Counter>::default();
        registry.register(
            "fuse_passthrough_opens",
            "opens of fully local files served by FUSE passthrough",
            passthrough_opens.clone(),
        );
        let prefetched_spans = Family::<LayerLabels, Counter>::default();
        registry.register(
            "prefetched_spans",
            "spans fetched speculatively after a miss (rest of a file, tar neighbours)",
            prefetched_spans.clone(),
        );
        let bytes_by_cause = Family::<CauseLabels, Counter>::default();
        registry.register(
            "fetched_bytes_by_cause",
            "compressed bytes fetched, by layer and cause (foreground, prefetch, profile, stream)",
            bytes_by_cause.clone(),
        );
        let streamed_spans = Family::<LayerLabels, Counter>::default();
        registry.register("streamed_spans", "spans made local by background completion", streamed_spans.clone());
        let profile_hits = Family::<LayerLabels, Counter>::default();
        registry.register(
            "profile_hits",
            "container reads of spans an access profile replay fetched first",
            profile_hits.clone(),
        );
        let profile_misses = Family::<LayerLabels, Counter>::default();
        registry.register(
            "profile_misses",
            "fetches container reads made themselves in layers replaying an access profile",
            profile_misses.clone(),
        );
        let profile_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "profiles",
            "access profiles found (found_local, found_registry), ignored, recorded, published, publish_failed",
            profile_events.clone(),
        );
        let fuse_requests = Family::<LayerOpLabels, Counter>::default();
        registry.register(
            "fuse_requests",
            "FUSE requests answered by a lazy layer's mount, by layer and operation",
            fuse_requests.clone(),
        );
        let cache_bytes = prometheus_client::metrics::gauge::Gauge::default();
        let cache_limit_bytes = prometheus_client::metrics::gauge::Gauge::default();
        let cache_evictions = Counter::default();
        registry.register("cache_bytes", "bytes in the span caches and passthrough copies", cache_bytes.clone());
        registry.register("cache_limit_bytes", "the span cache limit (0: unlimited)", cache_limit_bytes.clone());
        registry.register("cache_evictions", "span files evicted to stay within the limit", cache_evictions.clone());
        let verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "layers_verified",
            "complete layers checked against their diff ID and index tree, by result (same, differs, unverifiable)",
            verdicts.clone(),
        );
        let poisoned = Family::<PoisonedLabels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "layers_poisoned",
            "layers found not to be what their index says (1 per image, layer and index): no longer served",
            poisoned.clone(),
        );
        let unpacks = Family::<UnpackLabels, Counter>::default();
        registry.register(
            "layers_unpacked",
            "layers no index serves, downloaded and unpacked by the snapshotter, by result (ok; failed: containerd unpacked it)",
            unpacks.clone(),
        );
        let unpacked_bytes = Counter::default();
        registry.register(
            "unpacked_layer_bytes",
            "compressed bytes of the layers the snapshotter downloaded and unpacked",
            unpacked_bytes.clone(),
        );
        Self {
            registry,
            calls,
            latency,
            fetched_bytes,
            fetches,
            span_hits,
            span_misses,
            spans_local,
            spans_total,
            read_seconds,
            passthrough_opens,
            prefetched_spans,
            bytes_by_cause,
            streamed_spans,
            profile_hits,
            profile_misses,
            profile_events,
            fuse_requests,
            cache_bytes,
            cache_limit_bytes,
            cache_evictions,
            verdicts,
            poisoned,
            unpacks,
            unpacked_bytes,
        }
    }

    /// Counts the result of verifying a complete layer.
    /// Records a layer unpacked here (`bytes`: its compressed size), or an unpack that failed.
    pub fn unpacked(&self, ok: bool, bytes: u64) {
        self.unpacks.get_or_create(&UnpackLabels { result: if ok { "ok" } else { "failed" } }).inc();
        if ok {
            self.unpacked_bytes.inc_by(bytes);
        }
    }

    pub fn verified(&self, result: &'static str) {
        self.verdicts.get_or_create(&VerdictLabels { result }).inc();
    }

    /// Records a poisoned layer.
    pub fn poisoned(&self, image: &str, layer: &str, index: &str) {
        let l = PoisonedLabels { image: image.to_string(), layer: layer.to_string(), index: index.to_string() };
        self.poisoned.get_or_create(&l).set(1);
    }

    /// The counters of one layer.
    pub fn layer(&self, layer_digest: &str) -> LayerMetrics {
        let l = LayerLabels { layer: layer_digest.to_string() };
        LayerMetrics {
            fetched_bytes: self.fetched_bytes.get_or_create(&l).clone(),
            fetches: self.fetches.get_or_create(&l).clone(),
            span_hits: self.span_hits.get_or_create(&l).clone(),
            span_misses: self.span_misses.get_or_create(&l).clone(),
            spans_local: self.spans_local.get_or_create(&l).clone(),
            spans_total: self.spans_total.get_or_create(&l).clone(),
            read_seconds: Some(self.read_seconds.clone()),
            passthrough_opens: self.passthrough_opens.get_or_create(&l).clone(),
            prefetched_spans: self.prefetched_spans.get_or_create(&l).clone(),
            foreground_bytes: self.by_cause(layer_digest, "foreground"),
            prefetch_bytes: self.by_cause(layer_digest, "prefetch"),
            stream_bytes: self.by_cause(layer_digest, "stream"),
            streamed_spans: self.streamed_spans.get_or_create(&l).clone(),
            profile_bytes: self.by_cause(layer_digest, "profile"),
            profile_hits: self.profile_hits.get_or_create(&l).clone(),
            profile_misses: self.profile_misses.get_or_create(&l).clone(),
            fuse_requests: clip_readpath::FuseOp::NAMES.map(|op| {
                self.fuse_requests.get_or_create(&LayerOpLabels { layer: layer_digest.to_string(), op }).clone()
            }),
        }
    }

    fn by_cause(&self, layer: &str, cause: &'static str) -> Counter {
        self.bytes_by_cause.get_or_create(&CauseLabels { layer: layer.to_string(), cause }).clone()
    }

    /// Counts an access profile event (`found_local`, `found_registry`, `ignored`, `recorded`,
    /// `published`, `publish_failed`).
    pub fn profile_event(&self, event: &'static str) {
        self.profile_events.get_or_create(&EventLabels { event }).inc();
    }

    /// Records one finished call.
    pub fn observe_call(&self, method: &'static str, code: &str, elapsed: Duration) {
        self.calls.get_or_create(&CallLabels { method, code: code.to_string() }).inc();
        self.latency.get_or_create(&MethodLabels { method }).observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `addr` until the process ends. Minimal HTTP/1.1: one response
/// per connection, then close.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    loop {
        let (mut conn, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics ") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
