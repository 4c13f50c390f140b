//! Where a span is fetched: the read path under the FUSE layer. For the uncompressed range a
//! read needs, the spans holding it are taken from the on-disk span cache, or fetched (the
//! missing neighbours in one Range request), verified against the index's span digests,
//! inflated from their checkpoint and written to the cache (atomically).
//!
//! By concern: `states` knows in memory which spans are local (a bitmap, rebuilt from the span
//! directory at open) and which are in flight, with a wait per span, so concurrent readers of a
//! span share one fetch; `fetch` fetches, verifies, inflates and writes; this file reads.
//! The counters are the layer's [`LayerMetrics`] (one set per layer).

mod fetch;
mod states;

use crate::budget::CacheBudget;
use crate::demand::Demand;
use crate::metrics::LayerMetrics;
use clip_index::{Index, IndexError, RangeFetcher, SpanInfo};
use parking_lot::Mutex;
pub(crate) use states::LargeFileReads;
use states::{Claimed, InFlight, SpanBits};
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Told of every read that had to fetch, or that used a span fetched speculatively first: where
/// a container is reading ([`crate::prefetch::Prefetcher`] guesses from it).
pub trait MissObserver: Send + Sync {
    /// A read of spans `first..=last` of `cache` had to fetch (`hint` [`Hint::Miss`]) or used a
    /// guessed span first ([`Hint::GuessedRight`]); `file`: the file it read.
    fn missed(&self, cache: &Arc<SpanCache>, first: u32, last: u32, file: Option<FileSpans>, hint: Hint);
}

/// The file a read was in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpans {
    /// Where its data lies in the layer (uncompressed offsets).
    pub data: std::ops::Range<u64>,
    /// The spans that hold it.
    pub spans: std::ops::RangeInclusive<u32>,
}

/// What a read told the prefetcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// It had to fetch.
    Miss,
    /// It used a span fetched ahead first (and fetched nothing itself).
    GuessedRight,
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
    #[error("layer {layer} is not what its index says; it is no longer served")]
    Poisoned { layer: String },
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

/// Opens of a span file that vanished (evicted) or was short (a crash) before the read fails.
const OPEN_RETRIES: u32 = 3;

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

/// Spans fetched ahead of any read, until a read uses them: the prefetcher's guesses (the first
/// read of one tells the prefetcher it guessed right) and a profile replay's (profile hits).
#[derive(Debug, Default)]
struct Guesses {
    speculative: Mutex<HashSet<u32>>,
    replayed: Mutex<HashSet<u32>>,
    /// Whether a profile replay was ever asked of this layer (its misses count).
    replaying: AtomicBool,
    /// How reads move through the layer's large files: the prefetcher's window there.
    large_file: LargeFileReads,
    /// Large files whose first miss the prefetcher saw, by their data's offset (bounded).
    files_missed: Mutex<HashSet<u64>>,
}

/// Which spans background completion made local that no read has used yet, and how many
/// streamed spans reads have used (whether completion is ahead of a reader).
#[derive(Debug)]
struct StreamUse {
    unread: SpanBits,
    hits: AtomicU64,
}

impl StreamUse {
    fn streamed(&self, span: u32) {
        self.unread.set(span);
    }

    fn read(&self, span: u32) {
        if self.unread.get(span) && self.unread.clear(span) {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The span cache and fetcher of one layer.
pub struct SpanCache {
    index: Arc<Index>,
    /// The layer's digest (named in observers' calls without formatting it each time).
    layer: Arc<str>,
    dir: PathBuf,
    source: Arc<dyn RangeFetcher>,
    /// Spans in the cache.
    local: SpanBits,
    inflight: InFlight,
    guesses: Guesses,
    /// The span of the latest read that had to fetch (completion moves there).
    last_miss: AtomicU32,
    /// The daemon's demand on the link (background completion follows it).
    demand: Arc<Demand>,
    /// Whether reads use what background completion streams.
    stream_use: StreamUse,
    opts: SpanCacheOptions,
    /// The layer was found not to be what its index says: no read is served any more.
    poisoned: std::sync::atomic::AtomicBool,
}

/// How one layer's span cache is wired into the daemon; the default is a cache on its own.
#[derive(Default)]
pub struct SpanCacheOptions {
    /// The layer's counters (Prometheus handles; no-ops when not registered, readable always).
    pub metrics: LayerMetrics,
    /// How many missing spans after the requested ones one fetch may add (read-ahead).
    pub readahead_spans: u32,
    /// The daemon's demand on the link, shared across layers (`None`: this layer's own).
    pub demand: Option<Arc<Demand>>,
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

/// The spans listed in a span directory (names `{i:08}`; temporary files are not spans).
fn listed_spans(dir: &std::path::Path, count: u32) -> SpanBits {
    let bits = SpanBits::new(count);
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if let Some(i) = name.to_str().filter(|n| n.len() == 8).and_then(|n| n.parse::<u32>().ok())
            && i < count
        {
            bits.set(i);
        }
    }
    bits
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
        mut opts: SpanCacheOptions,
    ) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let local = listed_spans(&dir, index.span_count());
        let stream_use = StreamUse { unread: SpanBits::new(index.span_count()), hits: AtomicU64::new(0) };
        opts.metrics.spans_total.set(i64::from(index.span_count()));
        opts.metrics.spans_local.set(i64::from(local.count()));
        Ok(Self {
            layer: index.layer_digest().into(),
            index,
            dir,
            source,
            local,
            inflight: InFlight::default(),
            guesses: Guesses::default(),
            last_miss: AtomicU32::new(0),
            demand: opts.demand.take().unwrap_or_default(),
            stream_use,
            opts,
            poisoned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Stops serving the layer: every read from now on fails (its bytes or its tree were found
    /// to differ from what the index says, see [`crate::verify`]).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::SeqCst);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// The directory of the layer's span files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// This layer's counters.
    pub fn metrics(&self) -> &LayerMetrics {
        &self.opts.metrics
    }

    /// The span of the latest read that had to fetch.
    pub fn last_miss(&self) -> u32 {
        self.last_miss.load(Ordering::Relaxed)
    }

    /// How reads move through this layer's large files (see [`crate::prefetch`]).
    pub(crate) fn large_file_reads(&self) -> &LargeFileReads {
        &self.guesses.large_file
    }

    /// The daemon's demand on the link this layer's fetches count in.
    pub fn demand(&self) -> &Arc<Demand> {
        &self.demand
    }

    /// How many spans background completion made local were then read (each counted once).
    pub fn stream_hits(&self) -> u64 {
        self.stream_use.hits.load(Ordering::Relaxed)
    }

    /// Spans one fetch adds after those a read needs.
    pub fn readahead_spans(&self) -> u32 {
        self.opts.readahead_spans
    }

    /// The daemon's disk budget, if any (files made for passthrough are counted in it too).
    pub fn budget(&self) -> Option<&Arc<CacheBudget>> {
        self.opts.budget.as_ref()
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The layer's digest.
    pub fn layer(&self) -> &Arc<str> {
        &self.layer
    }

    pub(crate) fn span_path(&self, i: u32) -> PathBuf {
        self.dir.join(format!("{i:08}"))
    }

    /// Whether span `i` is in the cache: the bitmap, else (a span another mount of the same
    /// layer wrote) its file, which is then taken into the bitmap.
    pub fn is_cached(&self, i: u32) -> bool {
        if self.local.get(i) {
            return true;
        }
        let on_disk = i < self.index.span_count() && self.span_path(i).exists();
        if on_disk && self.local.set(i) {
            self.opts.metrics.spans_local.inc();
        }
        on_disk
    }

    /// Span `i`'s file is gone (evicted) or broken: no longer local.
    fn forget_local(&self, i: u32) {
        if self.local.clear(i) {
            self.opts.metrics.spans_local.dec();
        }
    }

    /// The compressed size of span `j`, `None` past the last span.
    fn comp_len(&self, j: u32) -> Option<u64> {
        self.index.span(j).ok().map(|s| s.comp_end - s.comp_start)
    }

    /// The last span, or `last` if it is before it.
    fn clamp(&self, last: u32) -> u32 {
        last.min(self.index.span_count().saturating_sub(1))
    }

    /// The index records of `spans`.
    fn span_infos(&self, spans: &[u32]) -> Result<Vec<SpanInfo>, SpanError> {
        spans.iter().map(|&j| self.index.span(j).map_err(|e| SpanError::Span { span: j, source: e })).collect()
    }

    /// Background completion: makes local the next run of missing spans at or after `from`
    /// (wrapping around) that nobody fetches yet, in one request of about `request_bytes`
    /// compressed bytes (the request size is the caller's, not the span size's). With
    /// `yield_to_demand`, the request stops at the next span once a demand fetch begins
    /// ([`Demand`]). Returns where to go on from, or why completion of this layer is over.
    pub fn stream_next(&self, from: u32, request_bytes: u64, yield_to_demand: bool) -> Result<Streamed, SpanError> {
        let count = self.index.span_count();
        let Some(first) = (from.min(count)..count).chain(0..from.min(count)).find(|i| !self.is_cached(*i)) else {
            return Ok(Streamed::Complete);
        };
        let claim = self
            .inflight
            .claim_run(first, self.clamp(u32::MAX), usize::MAX, request_bytes, &self.local, |j| self.comp_len(j));
        let Some(&last) = claim.spans.last() else {
            // Someone fetches it right now: go on after it.
            return Ok(Streamed::GoOn(first + 1));
        };
        let group = self.span_infos(&claim.spans)?;
        let bytes: u64 = group.iter().map(|s| s.uncomp_end - s.uncomp_start).sum();
        if self.opts.budget.as_ref().is_some_and(|b| !b.fits(bytes)) {
            return Ok(Streamed::NoRoom);
        }
        let (stored, yielded) = self.stream_group(&group, yield_to_demand)?;
        self.opts.metrics.streamed_spans.inc_by(u64::from(stored));
        drop(claim);
        Ok(Streamed::GoOn(if yielded { first + stored } else { last + 1 }))
    }

    /// Reads uncompressed layer bytes `[start, end)` (offsets in the tar stream).
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<u8>, SpanError> {
        self.read_ahead(start, end, self.opts.readahead_spans)
    }

    /// [`Self::read`], fetching up to `readahead` missing spans after the last one needed in the
    /// same request (sequential readers).
    pub fn read_ahead(&self, start: u64, end: u64, readahead: u32) -> Result<Vec<u8>, SpanError> {
        self.read_inner(start, end, readahead).map(|(bytes, _)| bytes)
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
        let result = self.read_inner(start, end, readahead);
        let (result, fetched) = match result {
            Ok((bytes, fetched)) => (Ok(bytes), fetched),
            Err(e) => (Err(e), false),
        };
        let Some(observer) = &self.opts.observer else { return result };
        let Ok(spans) = self.index.spans_for(start, end.saturating_sub(start).max(1)) else { return result };
        // A miss, or the first use of a guessed span: guess on from here.
        let guessed_right = {
            let mut speculative = self.guesses.speculative.lock();
            // Every guessed span this read uses is taken off the list (no short cut as with `any`).
            #[allow(clippy::unnecessary_fold)]
            let hit = !speculative.is_empty() && spans.clone().fold(false, |hit, i| speculative.remove(&i) || hit);
            hit
        };
        if guessed_right || fetched {
            let file = file.and_then(|data| {
                let spans = self.index.spans_for(data.start, data.end.saturating_sub(data.start).max(1)).ok()?;
                Some(FileSpans { data, spans })
            });
            let hint = if fetched { Hint::Miss } else { Hint::GuessedRight };
            observer.missed(self, *spans.start(), *spans.end(), file, hint);
        }
        result
    }

    /// The bytes, and whether this read had to fetch any of them itself.
    fn read_inner(&self, start: u64, end: u64, readahead: u32) -> Result<(Vec<u8>, bool), SpanError> {
        if self.is_poisoned() {
            return Err(SpanError::Poisoned { layer: self.layer.to_string() });
        }
        if end <= start {
            return Ok((Vec::new(), false));
        }
        let mut fetched = false;
        let spans = self.index.spans_for(start, end - start).map_err(|e| SpanError::Range { start, end, source: e })?;
        let mut out = Vec::with_capacity((end - start) as usize);
        let last = *spans.end();
        if let Some(reads) = &self.opts.reads {
            reads.read(&self.layer, spans.clone());
        }
        if self.guesses.replaying.load(Ordering::Relaxed) {
            let mut replayed = self.guesses.replayed.lock();
            let hits = spans.clone().filter(|i| replayed.remove(i)).count() as u64;
            drop(replayed);
            if hits > 0 {
                self.opts.metrics.profile_hits.inc_by(hits);
            }
        }
        for i in spans {
            self.stream_use.read(i);
            let s = self.index.span(i).map_err(|e| SpanError::Span { span: i, source: e })?;
            let from = start.max(s.uncomp_start);
            let to = end.min(s.uncomp_end);
            let path = self.span_path(i);
            // The budget may evict a span between making it local and opening it, and a crash
            // may have left a span file short: fetch again.
            let mut attempts = 0;
            let f = loop {
                fetched |= self.ensure_through(&s, last, readahead)? == Local::Fetched;
                match fs::File::open(&path) {
                    Ok(f) if has_len(&f, s.uncomp_end - s.uncomp_start) => break f,
                    Ok(_) if attempts < OPEN_RETRIES => {
                        tracing::warn!(layer = %self.layer, span = i, "span file has the wrong length; fetching it again");
                        let _ = fs::remove_file(&path);
                        self.forget_local(i);
                        attempts += 1;
                    }
                    Ok(_) => return Err(cache_err(&path, std::io::Error::other("span file has the wrong length"))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < OPEN_RETRIES => {
                        self.forget_local(i);
                        attempts += 1;
                    }
                    Err(e) => return Err(cache_err(&path, e)),
                }
            };
            if let Some(budget) = &self.opts.budget {
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
        let through = self.clamp(last.saturating_add(readahead));
        let claim = loop {
            if self.is_cached(s.index) {
                // Local, or another reader or the prefetcher fetched it.
                self.opts.metrics.span_hits.inc();
                return Ok(Local::Hit);
            }
            match self.inflight.claim_or_wait(s.index, through, &self.local, |j| self.comp_len(j)) {
                Claimed::Mine(claim) => break claim,
                Claimed::Waited => {
                    tracing::trace!(layer = %self.layer, span = s.index, "waited for a fetch in flight");
                }
            }
        };
        self.last_miss.store(s.index, Ordering::Relaxed);
        self.opts.metrics.span_misses.inc();
        if self.guesses.replaying.load(Ordering::Relaxed) {
            self.opts.metrics.profile_misses.inc();
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
                    tracing::warn!(layer = %self.layer, span = i, error = %e, attempt, "span failed verification; fetching it again");
                }
                other => break other,
            }
        };
        drop(claim);
        result.map(|()| Local::Fetched)
    }

    /// How many spans are local.
    pub fn local_spans(&self) -> u32 {
        self.local.count()
    }

    /// The bytes the local spans hold on disk (what they inflate to): the layer's share of the
    /// node's disk that image garbage collection can win back.
    pub fn local_bytes(&self) -> u64 {
        (0..self.index.span_count())
            .filter(|&i| self.local.get(i))
            .filter_map(|i| self.index.span(i).ok())
            .map(|s| s.uncomp_end.saturating_sub(s.uncomp_start))
            .sum()
    }
}

fn cache_err(path: &std::path::Path, source: std::io::Error) -> SpanError {
    SpanError::Cache { path: path.display().to_string(), source }
}
