//! Where a span is fetched: the read path under the FUSE layer. For the uncompressed range a
//! read needs, the spans holding it are taken from the on-disk span cache, or fetched (the
//! missing neighbours in one Range request), verified against the index's span digests,
//! inflated from their checkpoint and written to the cache (atomically). One lock per span
//! makes concurrent readers of a span share one fetch.

use crate::budget::CacheBudget;
use crate::metrics::LayerMetrics;
use clip_index::{HISTORY_BYTES, Index, IndexError, RangeFetcher, SpanInfo};
use parking_lot::{Condvar, Mutex};
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Told of every read that had to fetch, or that used a span fetched speculatively first: where
/// a container is reading ([`crate::prefetch::Prefetcher`] guesses from it).
pub trait MissObserver: Send + Sync {
    /// A read of spans `first..=last` of `cache` had to fetch (or used a guessed span first);
    /// `file` are the spans of the file it read.
    fn missed(&self, cache: &Arc<SpanCache>, first: u32, last: u32, file: Option<std::ops::RangeInclusive<u32>>);
}

/// Told of every container read (hits included): which spans of which layer it used. What
/// records access profiles ([`crate::profile::Recorder`]) listens here.
pub trait ReadObserver: Send + Sync {
    fn read(&self, layer: &Arc<str>, spans: std::ops::RangeInclusive<u32>);
}

/// Why a read failed; the FUSE layer answers `EIO` for all of them.
#[derive(Debug, thiserror::Error)]
pub enum SpanError {
    #[error("fetching compressed bytes {start}-{end}: {source}")]
    Fetch {
        start: u64,
        end: u64,
        #[source]
        source: IndexError,
    },
    #[error("span {span}: {source}")]
    Span {
        span: u32,
        #[source]
        source: IndexError,
    },
    #[error("reading {start}-{end}: {source}")]
    Range {
        start: u64,
        end: u64,
        #[source]
        source: IndexError,
    },
    #[error("span cache {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How [`SpanCache::ensure_through`] made a span local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// It was local, or another reader's fetch brought it.
    Hit,
    /// This call fetched it.
    Fetched,
}

/// Whether `f` holds exactly `len` bytes (a span or passthrough file a crash left empty does not).
pub(crate) fn has_len(f: &fs::File, len: u64) -> bool {
    f.metadata().is_ok_and(|m| m.len() == len)
}

/// Fetches again of a span that failed verification before the read fails.
const VERIFY_RETRIES: u32 = 2;

/// Counters of one layer's read path.
#[derive(Debug, Default)]
pub struct SpanStats {
    pub fetched_bytes: AtomicU64,
    pub fetches: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Of `fetched_bytes`: for container reads, for the prefetcher's guesses, for an access
    /// profile's replay, for completion.
    pub foreground_bytes: AtomicU64,
    pub prefetch_bytes: AtomicU64,
    pub profile_bytes: AtomicU64,
    pub stream_bytes: AtomicU64,
    /// Container reads that used a span the profile replay fetched first (hits), and fetches
    /// a container read had to make itself while this layer was replaying a profile (misses).
    pub profile_hits: AtomicU64,
    pub profile_misses: AtomicU64,
    /// The span of the latest read that had to fetch (completion moves there).
    pub last_miss: AtomicU32,
}

/// What one step of [`SpanCache::stream_next`] left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streamed {
    /// Go on from this span.
    GoOn(u32),
    /// Every span is local.
    Complete,
    /// The disk budget has no room for the rest.
    NoRoom,
}

/// Why bytes are fetched (metrics, and the completion's place in line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A container's read is waiting.
    Foreground,
    /// The prefetcher's guess of what is read next.
    Prefetch,
    /// The replay of the image's access profile.
    Profile,
    /// Background completion of the layer.
    Stream,
}

/// The last [`HISTORY_BYTES`] of `history` followed by `data`: the history of the next span.
fn carry_history(history: Option<Vec<u8>>, data: &[u8]) -> Vec<u8> {
    if data.len() >= HISTORY_BYTES {
        return data[data.len() - HISTORY_BYTES..].to_vec();
    }
    let mut h = history.unwrap_or_default();
    h.extend_from_slice(data);
    let excess = h.len().saturating_sub(HISTORY_BYTES);
    h.drain(..excess);
    h
}

/// The span cache and fetcher of one layer.
pub struct SpanCache {
    index: Arc<Index>,
    /// The layer's digest (named in observers' calls without formatting it each time).
    layer: Arc<str>,
    dir: PathBuf,
    source: Arc<dyn RangeFetcher>,
    /// Spans being fetched right now (by a reader or the prefetcher); readers of one wait for
    /// that fetch instead of starting their own.
    inflight: Mutex<HashSet<u32>>,
    landed: Condvar,
    /// Spans the prefetcher fetched that no read has used yet: the first read of one tells
    /// the prefetcher its guess was right, and to go on.
    speculative: Mutex<HashSet<u32>>,
    /// Spans a profile replay fetched that no read has used yet (profile hits).
    replayed: Mutex<HashSet<u32>>,
    /// Whether a profile replay was ever asked of this layer (its misses count).
    replaying: std::sync::atomic::AtomicBool,
    stats: SpanStats,
    metrics: LayerMetrics,
    readahead_spans: u32,
    pub(crate) foreground: Arc<AtomicU32>,
    windows: Option<Arc<dyn RangeFetcher>>,
    budget: Option<Arc<CacheBudget>>,
    observer: Option<Arc<dyn MissObserver>>,
    reads: Option<Arc<dyn ReadObserver>>,
}

/// How one layer's span cache is wired into the daemon; the default is a cache on its own.
#[derive(Default)]
pub struct SpanCacheOptions {
    /// Prometheus handles (no-ops when not registered).
    pub metrics: LayerMetrics,
    /// How many missing spans after the requested ones one fetch may add (read-ahead).
    pub readahead_spans: u32,
    /// Foreground reads in flight, shared across layers (background fetching yields to them).
    pub foreground: Option<Arc<AtomicU32>>,
    /// The windows blob, for an index whose windows are separate.
    pub windows: Option<Arc<dyn RangeFetcher>>,
    /// The daemon's disk budget (`None`: unbounded, untracked).
    pub budget: Option<Arc<CacheBudget>>,
    /// Told where reads miss, to fetch ahead (`None`: no speculation).
    pub observer: Option<Arc<dyn MissObserver>>,
    /// Told of every container read (`None`: nobody records).
    pub reads: Option<Arc<dyn ReadObserver>>,
}

impl std::fmt::Debug for SpanCacheOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanCacheOptions").field("readahead_spans", &self.readahead_spans).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SpanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpanCache({})", self.dir.display())
    }
}

/// Releases claimed spans when a fetch ends (however it ends) and wakes their waiters.
struct Claim<'a> {
    cache: &'a SpanCache,
    spans: Vec<u32>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut inflight = self.cache.inflight.lock();
        for i in &self.spans {
            inflight.remove(i);
        }
        drop(inflight);
        self.cache.landed.notify_all();
    }
}

impl SpanCache {
    /// `dir` holds this layer's decompressed spans, one file per span.
    pub fn new(index: Arc<Index>, dir: PathBuf, source: Arc<dyn RangeFetcher>) -> std::io::Result<Self> {
        Self::with_options(index, dir, source, SpanCacheOptions::default())
    }

    /// [`Self::new`] wired into the daemon's metrics, budget, read-ahead and prefetcher.
    pub fn with_options(
        index: Arc<Index>,
        dir: PathBuf,
        source: Arc<dyn RangeFetcher>,
        options: SpanCacheOptions,
    ) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        options.metrics.spans_total.set(i64::from(index.span_count()));
        Ok(Self {
            layer: index.layer_digest().into(),
            index,
            dir,
            source,
            inflight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
            speculative: Mutex::new(HashSet::new()),
            replayed: Mutex::new(HashSet::new()),
            replaying: std::sync::atomic::AtomicBool::new(false),
            stats: SpanStats::default(),
            metrics: options.metrics,
            readahead_spans: options.readahead_spans,
            foreground: options.foreground.unwrap_or_default(),
            windows: options.windows,
            budget: options.budget,
            observer: options.observer,
            reads: options.reads,
        })
        .inspect(|cache| {
            cache.metrics.spans_local.set(i64::from(cache.local_spans()));
        })
    }

    /// This layer's counters.
    pub fn stats(&self) -> &SpanStats {
        &self.stats
    }

    /// This layer's Prometheus handles.
    pub fn metrics(&self) -> &LayerMetrics {
        &self.metrics
    }

    /// Spans one fetch adds after those a read needs.
    pub fn readahead_spans(&self) -> u32 {
        self.readahead_spans
    }

    /// The daemon's disk budget, if any (files made for passthrough are counted in it too).
    pub fn budget(&self) -> Option<&Arc<CacheBudget>> {
        self.budget.as_ref()
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The layer's digest.
    pub fn layer(&self) -> &Arc<str> {
        &self.layer
    }

    fn span_path(&self, i: u32) -> PathBuf {
        self.dir.join(format!("{i:08}"))
    }

    /// Whether span `i` is in the cache.
    pub fn is_cached(&self, i: u32) -> bool {
        self.span_path(i).exists()
    }

    /// Fetches the missing spans of `first..=last` that nobody fetches yet, in requests of at
    /// most `max_group` spans, for the prefetcher or a profile replay (`cause`). Returns how
    /// many spans it fetched.
    pub fn fetch_missing(&self, first: u32, last: u32, max_group: u32, cause: Cause) -> Result<u32, SpanError> {
        if cause == Cause::Profile {
            self.replaying.store(true, Ordering::Relaxed);
        }
        let last = last.min(self.index.span_count().saturating_sub(1));
        let mut fetched = 0;
        let mut i = first;
        while i <= last && i < self.index.span_count() {
            let claim = {
                let mut inflight = self.inflight.lock();
                let spans = self.claim_run(&mut inflight, i, last, max_group.max(1) as usize, u64::MAX);
                Claim { cache: self, spans }
            };
            if claim.spans.is_empty() {
                i += 1;
                continue;
            }
            let group = self.span_infos(&claim.spans)?;
            i = claim.spans[claim.spans.len() - 1] + 1;
            self.fetch_group(&group, cause)?;
            fetched += group.len() as u32;
            match cause {
                Cause::Profile => self.replayed.lock().extend(claim.spans.iter().copied()),
                _ => self.speculative.lock().extend(claim.spans.iter().copied()),
            }
            drop(claim);
        }
        Ok(fetched)
    }

    /// Claims (marks in flight) the run of spans from `first` through `last`, at most `max` of
    /// them and (after the first) at most `max_bytes` compressed, that are neither local nor
    /// being fetched; stops at the first that is.
    fn claim_run(&self, inflight: &mut HashSet<u32>, first: u32, last: u32, max: usize, max_bytes: u64) -> Vec<u32> {
        let mut spans = Vec::new();
        let mut bytes = 0u64;
        let mut j = first;
        while j < self.index.span_count()
            && (spans.is_empty() || bytes < max_bytes)
            && j <= last
            && spans.len() < max
            && !inflight.contains(&j)
            && !self.is_cached(j)
        {
            inflight.insert(j);
            spans.push(j);
            bytes += self.index.span(j).map_or(0, |s| s.comp_end - s.comp_start);
            j += 1;
        }
        spans
    }

    /// The index records of `spans`.
    fn span_infos(&self, spans: &[u32]) -> Result<Vec<SpanInfo>, SpanError> {
        spans.iter().map(|&j| self.index.span(j).map_err(|e| SpanError::Span { span: j, source: e })).collect()
    }

    /// Background completion: makes local the next run of missing spans at or after `from`
    /// (wrapping around) that nobody fetches yet, in one request of about `request_bytes`
    /// compressed bytes (the request size is the caller's, not the span size's). Returns where
    /// to go on from, or why completion of this layer is over.
    pub fn stream_next(&self, from: u32, request_bytes: u64) -> Result<Streamed, SpanError> {
        let count = self.index.span_count();
        let Some(first) = (from.min(count)..count).chain(0..from.min(count)).find(|i| !self.is_cached(*i)) else {
            return Ok(Streamed::Complete);
        };
        let claim = {
            let mut inflight = self.inflight.lock();
            let spans = self.claim_run(&mut inflight, first, u32::MAX, usize::MAX, request_bytes);
            Claim { cache: self, spans }
        };
        let Some(&last) = claim.spans.last() else {
            // Someone fetches it right now: go on after it.
            return Ok(Streamed::GoOn(first + 1));
        };
        let group = self.span_infos(&claim.spans)?;
        let bytes: u64 = group.iter().map(|s| s.uncomp_end - s.uncomp_start).sum();
        if self.budget.as_ref().is_some_and(|b| !b.fits(bytes)) {
            return Ok(Streamed::NoRoom);
        }
        let stored = self.stream_group(&group)?;
        self.metrics.streamed_spans.inc_by(u64::from(stored));
        drop(claim);
        Ok(Streamed::GoOn(last + 1))
    }

    /// Reads uncompressed layer bytes `[start, end)` (offsets in the tar stream).
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<u8>, SpanError> {
        self.read_ahead(start, end, self.readahead_spans)
    }

    /// [`Self::read`], fetching up to `readahead` missing spans after the last one needed in the
    /// same request (sequential readers).
    pub fn read_ahead(&self, start: u64, end: u64, readahead: u32) -> Result<Vec<u8>, SpanError> {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        let result = self.read_inner(start, end, readahead);
        self.foreground.fetch_sub(1, Ordering::Relaxed);
        result.map(|(bytes, _)| bytes)
    }

    /// [`Self::read_ahead`] for a read of a file whose data lies at `file` (uncompressed
    /// offsets): when the read had to fetch, the prefetcher is asked for the rest of the file
    /// and the spans around.
    pub fn read_hinted(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        readahead: u32,
        file: Option<std::ops::Range<u64>>,
    ) -> Result<Vec<u8>, SpanError> {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        let result = self.read_inner(start, end, readahead);
        self.foreground.fetch_sub(1, Ordering::Relaxed);
        let (result, fetched) = match result {
            Ok((bytes, fetched)) => (Ok(bytes), fetched),
            Err(e) => (Err(e), false),
        };
        let Some(observer) = &self.observer else { return result };
        let Ok(spans) = self.index.spans_for(start, end.saturating_sub(start).max(1)) else { return result };
        // A miss, or the first use of a guessed span: guess on from here.
        let guessed_right = {
            let mut speculative = self.speculative.lock();
            // Every guessed span this read uses is taken off the list (no short cut as with `any`).
            #[allow(clippy::unnecessary_fold)]
            let hit = !speculative.is_empty() && spans.clone().fold(false, |hit, i| speculative.remove(&i) || hit);
            hit
        };
        if guessed_right || fetched {
            let file_spans =
                file.and_then(|f| self.index.spans_for(f.start, f.end.saturating_sub(f.start).max(1)).ok());
            observer.missed(self, *spans.start(), *spans.end(), file_spans);
        }
        result
    }

    /// The bytes, and whether this read had to fetch any of them itself.
    fn read_inner(&self, start: u64, end: u64, readahead: u32) -> Result<(Vec<u8>, bool), SpanError> {
        if end <= start {
            return Ok((Vec::new(), false));
        }
        let mut fetched = false;
        let spans = self.index.spans_for(start, end - start).map_err(|e| SpanError::Range { start, end, source: e })?;
        let mut out = Vec::with_capacity((end - start) as usize);
        let last = *spans.end();
        if let Some(reads) = &self.reads {
            reads.read(&self.layer, spans.clone());
        }
        if self.replaying.load(Ordering::Relaxed) {
            let mut replayed = self.replayed.lock();
            let hits = spans.clone().filter(|i| replayed.remove(i)).count() as u64;
            drop(replayed);
            if hits > 0 {
                self.stats.profile_hits.fetch_add(hits, Ordering::Relaxed);
                self.metrics.profile_hits.inc_by(hits);
            }
        }
        for i in spans {
            let s = self.index.span(i).map_err(|e| SpanError::Span { span: i, source: e })?;
            let from = start.max(s.uncomp_start);
            let to = end.min(s.uncomp_end);
            let path = self.span_path(i);
            // The budget may evict a span between making it local and opening it, and a crash
            // may have left a span file empty: fetch again.
            let mut attempts = 0;
            let f = loop {
                fetched |= self.ensure_through(&s, last, readahead)? == Local::Fetched;
                match fs::File::open(&path) {
                    Ok(f) if has_len(&f, s.uncomp_end - s.uncomp_start) => break f,
                    Ok(_) if attempts < 3 => {
                        tracing::warn!(layer = %self.index.layer_digest(), span = i, "span file has the wrong length; fetching it again");
                        let _ = fs::remove_file(&path);
                        attempts += 1;
                    }
                    Ok(_) => return Err(cache_err(&path, std::io::Error::other("span file has the wrong length"))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
                    Err(e) => return Err(cache_err(&path, e)),
                }
            };
            if let Some(budget) = &self.budget {
                budget.touch(&path);
            }
            let mut buf = vec![0u8; (to - from) as usize];
            f.read_exact_at(&mut buf, from - s.uncomp_start).map_err(|e| cache_err(&path, e))?;
            out.extend_from_slice(&buf);
        }
        Ok((out, fetched))
    }

    /// Makes span `s` local: wait for the fetch of it in flight, or fetch it together with the
    /// missing spans after it that the same read needs (through span `last`) and the
    /// read-ahead, in one request; verify, inflate, write.
    fn ensure_through(&self, s: &SpanInfo, last: u32, readahead: u32) -> Result<Local, SpanError> {
        if self.is_cached(s.index) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.metrics.span_hits.inc();
            return Ok(Local::Hit);
        }
        let claim = {
            let mut inflight = self.inflight.lock();
            let mut waited = false;
            while inflight.contains(&s.index) {
                waited = true;
                self.landed.wait_for(&mut inflight, std::time::Duration::from_millis(500));
            }
            if waited {
                tracing::trace!(layer = %self.index.layer_digest(), span = s.index, "waited for a fetch in flight");
            }
            if self.is_cached(s.index) {
                // Another reader or the prefetcher fetched it.
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                if waited {
                    self.metrics.span_hits.inc();
                }
                return Ok(Local::Hit);
            }
            // Coalesce: the following spans that are missing too, while nobody else fetches them.
            let spans = self.claim_run(&mut inflight, s.index, last.saturating_add(readahead), usize::MAX, u64::MAX);
            Claim { cache: self, spans }
        };
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.stats.last_miss.store(s.index, Ordering::Relaxed);
        self.metrics.span_misses.inc();
        if self.replaying.load(Ordering::Relaxed) {
            self.stats.profile_misses.fetch_add(1, Ordering::Relaxed);
            self.metrics.profile_misses.inc();
        }
        let mut group = vec![s.clone()];
        for &i in &claim.spans[1..] {
            match self.index.span(i) {
                Ok(n) => group.push(n),
                Err(_) => break,
            }
        }
        // A span that fails verification (a byte flipped on the way) is fetched again; a
        // registry that keeps answering wrong bytes fails the read, never serves them.
        let mut attempt = 0;
        let result = loop {
            match self.fetch_group(&group, Cause::Foreground) {
                Err(SpanError::Span { span: i, source: e }) if attempt < VERIFY_RETRIES => {
                    attempt += 1;
                    tracing::warn!(layer = %self.index.layer_digest(), span = i, error = %e, attempt, "span failed verification; fetching it again");
                }
                other => break other,
            }
        };
        drop(claim);
        result.map(|()| Local::Fetched)
    }

    /// Fetches `group` (contiguous spans) in one request, verifies and writes each; a bad
    /// read-ahead span is just not cached. A gzip span's history window comes from the span
    /// before it: for the first, its local file, else its window from the windows blob (fetched
    /// in parallel with the spans); for every later one, what the group inflated to so far. So
    /// a group costs at most one window, and none when it continues local data.
    fn fetch_group(&self, group: &[SpanInfo], cause: Cause) -> Result<(), SpanError> {
        let s = &group[0];
        let start = s.comp_start;
        let end = group.last().map_or(s.comp_end, |g| g.comp_end);
        let began = std::time::Instant::now();
        let external = self.index.has_external_windows();
        let mut history = if external { self.local_history(s) } else { None };
        let need_window = external && history.is_none();
        let (compressed, window) = if need_window {
            std::thread::scope(|scope| {
                let window = scope.spawn(|| self.fetch_window(s, cause));
                let compressed = self.source.fetch(start, end - start);
                let window =
                    window.join().unwrap_or_else(|_| Err(fetch_failed(start, end, "the window fetch panicked")));
                (compressed, window)
            })
        } else {
            (self.source.fetch(start, end - start), Ok(None))
        };
        let compressed = compressed.map_err(|source| SpanError::Fetch { start, end, source })?;
        let window = window?;
        self.count_fetch(compressed.len() as u64, cause);
        tracing::debug!(layer = %self.index.layer_digest(), first = s.index, spans = group.len(), bytes = end - start, window = need_window, ?cause, ms = began.elapsed().as_millis() as u64, by = std::thread::current().name().unwrap_or("fuse"), "spans fetched");
        for (n, span) in group.iter().enumerate() {
            let from = (span.comp_start - start) as usize;
            let to = (span.comp_end - start) as usize;
            let Some(bytes) = compressed.get(from..to) else {
                return Err(fetch_failed(start, end, "short answer"));
            };
            if !self.store_span(span, bytes, n, &mut history, window.as_deref())? {
                break;
            }
        }
        Ok(())
    }

    /// Decodes `span`, the `n`th of its request, from its compressed `bytes` (after `history`,
    /// carried on to the next span, or from `window`), verifies and writes it. `Ok(false)`: a
    /// span after the first failed (read-ahead is best effort; the rest is fetched later).
    fn store_span(
        &self,
        span: &SpanInfo,
        bytes: &[u8],
        n: usize,
        history: &mut Option<Vec<u8>>,
        window: Option<&[u8]>,
    ) -> Result<bool, SpanError> {
        let decoded = match history.as_deref() {
            Some(h) => self.index.decode_span_after(span, bytes, None, h),
            None => self.index.decode_span_with(span, bytes, None, window),
        };
        let data = match decoded {
            Ok(d) => d,
            Err(e) if n == 0 => return Err(SpanError::Span { span: span.index, source: e }),
            Err(_) => return Ok(false),
        };
        if self.index.has_external_windows() {
            *history = Some(carry_history(history.take(), &data));
        }
        if !(n > 0 && self.is_cached(span.index)) {
            self.write_span(span.index, &data)?;
        }
        Ok(true)
    }

    /// Background completion's fetch of `group` (contiguous spans, claimed): one request whose
    /// spans are inflated and written as their bytes arrive, so inflating overlaps the
    /// transfer. Returns how many spans it made local.
    fn stream_group(&self, group: &[SpanInfo]) -> Result<u32, SpanError> {
        let s = &group[0];
        let (start, end) = (s.comp_start, group.last().map_or(s.comp_end, |g| g.comp_end));
        let began = std::time::Instant::now();
        let external = self.index.has_external_windows();
        let mut history = if external { self.local_history(s) } else { None };
        let window = if external && history.is_none() { self.fetch_window(s, Cause::Stream)? } else { None };
        // `pending` holds the bytes from `held` (a blob offset) on: spans of a gzip layer may
        // share the byte their boundary falls in.
        let (mut pending, mut held, mut next, mut received) = (Vec::new(), start, 0usize, 0u64);
        let mut stop: Option<Result<(), SpanError>> = None;
        let streamed = {
            let mut sink = |piece: &[u8]| -> Result<(), IndexError> {
                received += piece.len() as u64;
                pending.extend_from_slice(piece);
                while let Some(span) = group.get(next) {
                    if held + (pending.len() as u64) < span.comp_end {
                        break;
                    }
                    let bytes = &pending[(span.comp_start - held) as usize..(span.comp_end - held) as usize];
                    let stored = self.store_span(span, bytes, next, &mut history, window.as_deref());
                    // Keep what the next span needs.
                    let keep_from = group.get(next + 1).map_or(span.comp_end, |n| n.comp_start.min(span.comp_end));
                    pending.drain(..(keep_from - held) as usize);
                    held = keep_from;
                    match stored {
                        Ok(true) => next += 1,
                        Ok(false) => stop = Some(Ok(())),
                        Err(e) => stop = Some(Err(e)),
                    }
                    if stop.is_some() {
                        return Err(IndexError::Invalid("stopped by the reader".into()));
                    }
                }
                Ok(())
            };
            self.source.fetch_streaming(start, end - start, &mut sink)
        };
        self.count_fetch(received, Cause::Stream);
        tracing::debug!(layer = %self.layer, first = s.index, spans = next, bytes = received, cause = ?Cause::Stream, ms = began.elapsed().as_millis() as u64, "spans streamed");
        match stop {
            Some(Err(e)) => return Err(e),
            Some(Ok(())) => {}
            None => streamed.map_err(|source| SpanError::Fetch { start, end, source })?,
        }
        Ok(next as u32)
    }

    /// The history window of span `s` from the local file of the span before it (`Some(empty)`
    /// when `s` needs none), or `None` when that span is not local.
    fn local_history(&self, s: &SpanInfo) -> Option<Vec<u8>> {
        let need = self.index.history_len(s);
        if need == 0 {
            return Some(Vec::new());
        }
        let prev = self.index.span(s.index.checked_sub(1)?).ok()?;
        let f = fs::File::open(self.span_path(prev.index)).ok()?;
        let len = prev.uncomp_end - prev.uncomp_start;
        if !has_len(&f, len) || len < need as u64 {
            return None;
        }
        let mut buf = vec![0u8; need];
        f.read_exact_at(&mut buf, len - need as u64).ok()?;
        Some(buf)
    }

    /// Span `s`'s window from the separate windows blob (zstd-compressed, checked when used).
    fn fetch_window(&self, s: &SpanInfo, cause: Cause) -> Result<Option<Vec<u8>>, SpanError> {
        let Some((off, len)) = self.index.window_location(s) else { return Ok(None) };
        let end = off + u64::from(len);
        let source =
            self.windows.as_ref().ok_or_else(|| fetch_failed(off, end, "the index's windows blob is unknown"))?;
        let bytes = source.fetch(off, u64::from(len)).map_err(|source| SpanError::Fetch { start: off, end, source })?;
        self.count_bytes(bytes.len() as u64, cause);
        Ok(Some(bytes))
    }

    /// Counts one range request of `bytes` for `cause`.
    fn count_fetch(&self, bytes: u64, cause: Cause) {
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        self.metrics.fetches.inc();
        self.count_bytes(bytes, cause);
    }

    fn count_bytes(&self, bytes: u64, cause: Cause) {
        self.stats.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.fetched_bytes.inc_by(bytes);
        let (stat, metric) = match cause {
            Cause::Foreground => (&self.stats.foreground_bytes, &self.metrics.foreground_bytes),
            Cause::Prefetch => (&self.stats.prefetch_bytes, &self.metrics.prefetch_bytes),
            Cause::Profile => (&self.stats.profile_bytes, &self.metrics.profile_bytes),
            Cause::Stream => (&self.stats.stream_bytes, &self.metrics.stream_bytes),
        };
        stat.fetch_add(bytes, Ordering::Relaxed);
        metric.inc_by(bytes);
    }

    fn write_span(&self, i: u32, data: &[u8]) -> Result<(), SpanError> {
        let path = self.span_path(i);
        clip_fsutil::atomic_write(&path, data, 0o644, clip_fsutil::Durability::Cache)
            .map_err(|e| cache_err(&path, e))?;
        self.metrics.spans_local.inc();
        if let Some(budget) = &self.budget {
            budget.added(&path, data.len() as u64);
        }
        Ok(())
    }

    /// How many spans are local (a directory listing; for start-up and progress).
    pub fn local_spans(&self) -> u32 {
        (0..self.index.span_count()).filter(|i| self.is_cached(*i)).count() as u32
    }
}

fn fetch_failed(start: u64, end: u64, message: &str) -> SpanError {
    SpanError::Fetch {
        start,
        end,
        source: IndexError::Fetch { offset: start, len: end - start, message: message.to_string() },
    }
}

fn cache_err(path: &std::path::Path, source: std::io::Error) -> SpanError {
    SpanError::Cache { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{SlowBlob, layer};
    use std::time::Duration;

    /// A blob that streams its answers in small pieces.
    struct Chunked(Arc<SlowBlob>);

    impl RangeFetcher for Chunked {
        fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
            self.0.fetch(offset, len)
        }

        fn fetch_streaming(
            &self,
            offset: u64,
            len: u64,
            sink: &mut dyn FnMut(&[u8]) -> Result<(), IndexError>,
        ) -> Result<(), IndexError> {
            let bytes = self.0.fetch(offset, len)?;
            bytes.chunks(1000).try_for_each(sink)
        }
    }

    #[test]
    fn completion_inflates_spans_as_their_bytes_arrive() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(20, Duration::ZERO);
        let source = Arc::new(Chunked(blob.clone()));
        let cache = SpanCache::new(index.clone(), dir.path().to_path_buf(), source).expect("cache");
        // Requests of about 5 spans, each streamed in 1000-byte pieces.
        let mut from = 0;
        loop {
            match cache.stream_next(from, 5 * (64 << 10)).expect("stream") {
                Streamed::GoOn(next) => from = next,
                Streamed::Complete => break,
                Streamed::NoRoom => panic!("no budget here"),
            }
        }
        assert!((0..index.span_count()).all(|i| cache.is_cached(i)));
        for i in 0..index.span_count() {
            let s = index.span(i).expect("span");
            let read = cache.read(s.uncomp_start, s.uncomp_end).expect("read");
            assert_eq!(read, blob.bytes[s.uncomp_start as usize..s.uncomp_end as usize], "span {i}");
        }
        assert_eq!(cache.stats().stream_bytes.load(Ordering::Relaxed), blob.bytes.len() as u64);
    }
}
