//! Background completion: the missing remainder of each mounted layer comes in as large
//! sequential range requests — the request size is `request_bytes`, not the span size — on
//! `streams` threads, one layer per thread at a time, so several layers complete at once. Each
//! request continues where local data ends, so its spans take their history from the spans before
//! them and need no windows (see [`SpanCache::stream_next`]).
//!
//! It takes only the link's idle time: it follows the containers' demand ([`Demand`]), not a
//! fixed delay. A layer streams once demand has been quiet for `quiet` (and the layer has been
//! mounted for `start_delay`), and its request stops at the next span when demand begins. While
//! demand goes on, a layer streams only if reads use at least half of what it streamed lately
//! (its stream is ahead of a sequential reader: [`SpanCache::stream_hits`]); to find out, it may
//! make one small probe request every [`PROBE_EVERY`] just past where reads miss. A loader
//! touching scattered pages of a large library uses little of a probe; `cat` uses all of it. A stream moves to where reads miss:
//! after a miss it goes on just past it, ahead of the reader.

use crate::demand::Demand;
use crate::spans::{SpanCache, Streamed};

/// Told when a layer has become wholly local (the daemon verifies it: [`crate::verify`]).
pub trait CompletionObserver: Send + Sync {
    /// Called on the completion thread that finished `cache`, with no lock held.
    fn completed(&self, cache: &Arc<SpanCache>);
}
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often a layer may probe, while demand goes on, whether its stream is ahead of a reader;
/// the wait doubles after each probe while reads use nothing streamed, up to [`PROBE_MOST_EVERY`]
/// (a torch start on a slow link probed three layers every 2 s, its scattered reads using
/// almost none of it: completion streamed 26-35 MB of the 290 MB the start fetched; 10-19 MB
/// with the back-off).
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// The longest wait between two probes of a layer.
pub const PROBE_MOST_EVERY: Duration = Duration::from_secs(16);
/// Compressed bytes of one probe request.
pub const PROBE_BYTES: u64 = 512 << 10;
/// The streamed spans and their reads are counted over about this long (halved after each).
const USE_WINDOW: Duration = Duration::from_secs(4);

/// How layers are completed in the background.
#[derive(Debug, Clone, Copy)]
pub struct CompletionPolicy {
    /// Layers completed at once (threads); 0 turns completion off.
    pub streams: usize,
    /// Compressed bytes per range request.
    pub request_bytes: u64,
    /// Time after a layer is mounted before its completion may start.
    pub start_delay: Duration,
    /// How long demand must have been quiet before a layer streams.
    pub quiet: Duration,
}

struct Layer {
    cache: Weak<SpanCache>,
    since: Instant,
    /// Where its stream goes on from.
    next: u32,
    /// The misses seen when the stream last looked (a new one moves the stream).
    misses: u64,
    /// The stream hits and streamed spans seen when it last looked.
    hits: u64,
    streamed: u64,
    /// Streamed spans and reads of them lately (since `window_from`, the older half-weighted).
    window_hits: u64,
    window_streamed: u64,
    window_from: Instant,
    /// Its next probe while demand goes on, and the wait after the last.
    probe_at: Instant,
    probe_gap: Duration,
    /// A thread is streaming it now.
    busy: bool,
}

/// What one request of a stream may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The link is idle: a full request that gives way when demand begins.
    Idle,
    /// Reads use most of what this layer streams: a full request alongside them.
    AheadOfReads,
    /// A small request to see whether reads use it.
    Probe,
}

struct Shared {
    policy: CompletionPolicy,
    observer: Option<Arc<dyn CompletionObserver>>,
    layers: Mutex<Vec<Layer>>,
    stop: AtomicBool,
}

/// The daemon's background completion.
pub struct Completer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Completer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Completer({:?})", self.shared.policy)
    }
}

impl Completer {
    /// Starts the stream threads; `None` when the policy turns completion off. `observer` is
    /// told of each layer that becomes complete.
    pub fn start(policy: CompletionPolicy, observer: Option<Arc<dyn CompletionObserver>>) -> Option<Self> {
        if policy.streams == 0 {
            return None;
        }
        let shared =
            Arc::new(Shared { policy, observer, layers: Mutex::new(Vec::new()), stop: AtomicBool::new(false) });
        for n in 0..policy.streams {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("clip-stream-{n}")).spawn(move || work(&shared));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a completion thread");
            }
        }
        Some(Self { shared })
    }

    /// Completes `cache` from now on (until it is complete or dropped).
    pub fn add(&self, cache: &Arc<SpanCache>) {
        let now = Instant::now();
        self.shared.layers.lock().push(Layer {
            cache: Arc::downgrade(cache),
            since: now,
            next: 0,
            misses: 0,
            hits: cache.stream_hits(),
            streamed: cache.metrics().streamed_spans.get(),
            window_hits: 0,
            window_streamed: 0,
            window_from: now,
            probe_at: now,
            // The first probe, which no read can have used yet, doubles it to PROBE_EVERY.
            probe_gap: PROBE_EVERY / 2,
            busy: false,
        });
    }

    /// Layers not complete yet.
    pub fn pending(&self) -> usize {
        self.shared.layers.lock().len()
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// What `layer` may do now, given how long demand has been quiet.
fn turn(
    layer: &mut Layer,
    cache: &SpanCache,
    policy: &CompletionPolicy,
    demand: &Demand,
    now: Instant,
) -> Option<Turn> {
    if now.duration_since(layer.since) < policy.start_delay {
        return None;
    }
    let (hits, streamed) = (cache.stream_hits(), cache.metrics().streamed_spans.get());
    if now.saturating_duration_since(layer.window_from) >= USE_WINDOW {
        layer.window_hits /= 2;
        layer.window_streamed /= 2;
        layer.window_from = now;
    }
    layer.window_hits += hits.saturating_sub(layer.hits);
    layer.window_streamed += streamed.saturating_sub(layer.streamed);
    (layer.hits, layer.streamed) = (hits, streamed);
    if demand.quiet_for() >= policy.quiet {
        return Some(Turn::Idle);
    }
    if layer.window_hits > 0 && layer.window_hits * 2 >= layer.window_streamed {
        return Some(Turn::AheadOfReads);
    }
    if now >= layer.probe_at {
        layer.probe_gap =
            if layer.window_hits > 0 { PROBE_EVERY } else { layer.probe_gap.saturating_mul(2).min(PROBE_MOST_EVERY) };
        layer.probe_at = now + layer.probe_gap;
        return Some(Turn::Probe);
    }
    None
}

/// Takes the longest-waiting idle layer (they are kept in the order they came) that may stream
/// now; forgets dropped ones.
fn take(shared: &Shared) -> Option<(Arc<SpanCache>, u32, Turn)> {
    let mut layers = shared.layers.lock();
    layers.retain(|l| l.cache.strong_count() > 0);
    let now = Instant::now();
    for layer in layers.iter_mut().filter(|l| !l.busy) {
        let Some(cache) = layer.cache.upgrade() else { continue };
        let Some(turn) = turn(layer, &cache, &shared.policy, cache.demand(), now) else { continue };
        let misses = cache.metrics().span_misses.get();
        if misses != layer.misses {
            // A read missed since: go on just past it.
            layer.misses = misses;
            layer.next = cache.last_miss().saturating_add(1);
        }
        layer.busy = true;
        return Some((cache, layer.next, turn));
    }
    None
}

fn work(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((cache, from, turn)) = take(shared) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let (bytes, yield_to_demand) = match turn {
            Turn::Idle => (shared.policy.request_bytes, true),
            Turn::AheadOfReads => (shared.policy.request_bytes, false),
            Turn::Probe => (PROBE_BYTES.min(shared.policy.request_bytes), false),
        };
        let result = cache.stream_next(from, bytes, yield_to_demand);
        tracing::debug!(layer = %cache.layer(), ?turn, from, ?result, "completion turn");
        let digest = cache.index().layer_digest();
        let mut layers = shared.layers.lock();
        let Some(layer) = layers.iter_mut().find(|l| l.cache.as_ptr() == Arc::as_ptr(&cache)) else { continue };
        layer.busy = false;
        match result {
            Ok(Streamed::GoOn(next)) => layer.next = next,
            Ok(over) => {
                layers.retain(|l| l.cache.as_ptr() != Arc::as_ptr(&cache));
                drop(layers);
                if over == Streamed::Complete {
                    tracing::info!(layer = %digest, "layer complete locally");
                    if let Some(o) = &shared.observer {
                        o.completed(&cache);
                    }
                } else {
                    tracing::info!(layer = %digest, "the span cache is nearly full: background completion of this layer stops");
                }
            }
            Err(e) => {
                drop(layers);
                tracing::warn!(layer = %digest, error = %e, "background completion failed; retrying later");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{SlowBlob, layer, span_range, wait_until};
    use clip_index::{IndexError, RangeFetcher};

    fn policy(quiet: Duration) -> CompletionPolicy {
        CompletionPolicy { streams: 1, request_bytes: 64 << 20, start_delay: Duration::ZERO, quiet }
    }

    #[test]
    fn completion_takes_only_the_links_idle_time() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(40, Duration::ZERO);
        let cache = Arc::new(SpanCache::new(index.clone(), dir.path().to_path_buf(), blob).expect("cache"));
        let completer = Completer::start(policy(Duration::from_millis(100)), None).expect("on");
        // A container's fetch is going on: the layer may only probe.
        let demand = cache.demand().begin();
        completer.add(&cache);
        std::thread::sleep(Duration::from_millis(600));
        let probed = cache.local_spans();
        let probe_spans = (PROBE_BYTES / (64 << 10)) as u32 + 1;
        assert!(probed <= probe_spans, "{probed} spans streamed while demand went on (one probe is {probe_spans})");
        assert!(probed < index.span_count());
        // Demand ends: after the quiet time the rest streams in.
        drop(demand);
        assert!(wait_until(|| completer.pending() == 0), "{} of {} spans", cache.local_spans(), index.span_count());
        assert_eq!(cache.local_spans(), index.span_count());
    }

    /// A blob that streams in 1000-byte pieces and begins a demand fetch (a container read that
    /// missed) once `after` bytes went out.
    struct ReadBegins {
        blob: Arc<SlowBlob>,
        demand: Arc<Demand>,
        after: usize,
        began: AtomicBool,
    }

    impl RangeFetcher for ReadBegins {
        fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
            self.blob.fetch(offset, len)
        }

        fn fetch_streaming(
            &self,
            offset: u64,
            len: u64,
            sink: &mut dyn FnMut(&[u8]) -> Result<(), IndexError>,
        ) -> Result<(), IndexError> {
            let bytes = self.blob.fetch(offset, len)?;
            for (n, piece) in bytes.chunks(1000).enumerate() {
                if n * 1000 >= self.after && !self.began.swap(true, Ordering::Relaxed) {
                    // The read goes on past this test.
                    std::mem::forget(self.demand.begin());
                }
                sink(piece)?;
            }
            Ok(())
        }
    }

    #[test]
    fn a_stream_gives_way_at_the_next_span_when_demand_begins() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(40, Duration::ZERO);
        let demand = Arc::new(Demand::default());
        let source =
            Arc::new(ReadBegins { blob, demand: demand.clone(), after: 100 << 10, began: AtomicBool::new(false) });
        let opts = crate::SpanCacheOptions { demand: Some(demand.clone()), ..Default::default() };
        let cache =
            SpanCache::with_options(index.clone(), dir.path().to_path_buf(), source.clone(), opts).expect("cache");
        // One request for the whole layer; a read begins 100 KiB in, within the second span.
        let next = cache.stream_next(0, u64::MAX, true).expect("stream");
        assert_eq!(next, Streamed::GoOn(2), "the stream stops after the span during which demand began");
        assert_eq!(cache.local_spans(), 2);
        assert!(demand.fetching());
        // Without giving way (a stream ahead of its reader), the request runs to its end.
        let next = cache.stream_next(2, u64::MAX, false).expect("stream");
        assert_eq!(next, Streamed::GoOn(index.span_count()));
        assert_eq!(cache.local_spans(), index.span_count());
        let (start, end) = span_range(&index, 0);
        assert_eq!(cache.read(start, end).expect("read").len() as u64, end - start);
    }

    #[test]
    fn while_demand_goes_on_a_layer_streams_only_when_reads_use_its_spans() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(40, Duration::ZERO);
        let cache = SpanCache::new(index.clone(), dir.path().to_path_buf(), blob).expect("cache");
        let policy = policy(Duration::from_secs(60));
        let now = Instant::now();
        let mut l = Layer {
            cache: Weak::new(),
            since: now,
            next: 0,
            misses: 0,
            hits: 0,
            streamed: 0,
            window_hits: 0,
            window_streamed: 0,
            window_from: now,
            probe_at: now,
            probe_gap: PROBE_EVERY / 2,
            busy: false,
        };
        let _demand = cache.demand().begin();
        assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), now), Some(Turn::Probe));
        assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), now), None, "one probe per {PROBE_EVERY:?}");
        // The probe's spans are read: the stream is ahead of a reader and goes on beside it.
        assert_eq!(cache.stream_next(0, PROBE_BYTES, false).expect("probe"), Streamed::GoOn(8));
        let (start, _) = span_range(&index, 0);
        let (_, end) = span_range(&index, 3);
        cache.read(start, end).expect("read");
        assert_eq!(cache.stream_hits(), 4);
        assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), now), Some(Turn::AheadOfReads), "half was read");
        // ... until reads use less than half of what it streams: then it only probes again.
        assert_eq!(cache.stream_next(8, 16 * (64 << 10), false).expect("stream"), Streamed::GoOn(24));
        assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), now), None, "4 of 24 spans read");
        let later = now + PROBE_EVERY + Duration::from_millis(1);
        assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), later), Some(Turn::Probe));
        assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), later), None);
        // Probes nobody reads from come less and less often: 2 s after one whose reads used
        // streamed spans, then 4, 8, 16, 16 s.
        let mut at = later;
        for gap in [2, 4, 8, 16, 16] {
            let gap = Duration::from_secs(gap);
            let early = at + gap.saturating_sub(Duration::from_millis(1));
            assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), early), None);
            at += gap;
            l.window_from = at; // keeps the reads counted so far from halving away
            l.window_hits = 0;
            assert_eq!(turn(&mut l, &cache, &policy, cache.demand(), at), Some(Turn::Probe), "no probe {gap:?} after");
        }
        // A mount younger than start_delay never streams.
        let young = CompletionPolicy { start_delay: Duration::from_secs(60), quiet: Duration::ZERO, ..policy };
        assert_eq!(turn(&mut l, &cache, &young, cache.demand(), now), None);
    }
}
