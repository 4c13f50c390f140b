//! Where a span is fetched: the read path under the FUSE layer. For the uncompressed range a
//! read needs, the spans holding it are taken from the on-disk span cache, or fetched (the
//! missing neighbours in one Range request), verified against the index's span digests,
//! inflated from their checkpoint and written to the cache (atomically). One lock per span
//! makes concurrent readers of a span share one fetch.

use clip_index::{Index, IndexError, SpanInfo};
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Compressed bytes of one layer blob, by range. Blocking; called from FUSE worker threads.
pub trait BlobSource: Send + Sync {
    /// Bytes `[start, end)` of the compressed blob.
    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, String>;
}

/// A layer blob in a registry, read with Range GETs through the credential chain.
#[derive(Debug)]
pub struct RegistryBlob {
    pub repo: Arc<clip_registry::Repository>,
    pub digest: String,
    pub runtime: tokio::runtime::Handle,
    /// Bound on one fetch with all its retries: a FUSE read never waits longer.
    pub timeout: std::time::Duration,
}

impl BlobSource for RegistryBlob {
    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let fetch = self.repo.get_blob_range(&self.digest, start, end);
        // The timer must be made inside the runtime.
        match self.runtime.block_on(async { tokio::time::timeout(self.timeout, fetch).await }) {
            Ok(result) => result.map(|b| b.to_vec()).map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?} (with retries)", self.timeout)),
        }
    }
}

/// A layer blob in a local file (tests, and layers already downloaded).
#[derive(Debug)]
pub struct FileBlob(pub fs::File);

impl BlobSource for FileBlob {
    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; (end - start) as usize];
        self.0.read_exact_at(&mut buf, start).map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

/// Why a read failed; the FUSE layer answers `EIO` for all of them.
#[derive(Debug, thiserror::Error)]
pub enum SpanError {
    #[error("fetching compressed bytes {start}-{end}: {message}")]
    Fetch { start: u64, end: u64, message: String },
    #[error("span {0}: {1}")]
    Index(u32, IndexError),
    #[error("span cache {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
}

/// The span cache and fetcher of one layer.
pub struct SpanCache {
    index: Arc<Index>,
    dir: PathBuf,
    source: Arc<dyn BlobSource>,
    /// Spans being fetched right now (by a reader or the prefetcher); readers of one wait for
    /// that fetch instead of starting their own.
    inflight: Mutex<HashSet<u32>>,
    landed: Condvar,
    /// Spans the prefetcher fetched that no read has used yet: the first read of one tells
    /// the prefetcher its guess was right, and to go on.
    speculative: Mutex<HashSet<u32>>,
    pub stats: SpanStats,
    /// Prometheus handles (no-ops when not registered).
    pub metrics: crate::metrics::LayerMetrics,
    /// How many missing spans after the requested ones one fetch may add (read-ahead).
    pub readahead_spans: u32,
    /// Foreground reads in flight (shared across layers; background fetching yields to them).
    pub foreground: Arc<std::sync::atomic::AtomicU32>,
    /// The windows blob, for an index whose windows are separate.
    pub windows: Option<Arc<dyn BlobSource>>,
    /// The daemon's disk budget (`None`: unbounded, untracked).
    pub budget: Option<Arc<super::budget::CacheBudget>>,
    /// Speculative fetching of what a miss suggests is read next (`None`: off).
    pub prefetcher: Option<Arc<super::prefetch::Prefetcher>>,
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
        let mut inflight = self.cache.inflight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for i in &self.spans {
            inflight.remove(i);
        }
        drop(inflight);
        self.cache.landed.notify_all();
    }
}

impl SpanCache {
    /// `dir` holds this layer's decompressed spans, one file per span.
    pub fn new(index: Arc<Index>, dir: PathBuf, source: Arc<dyn BlobSource>) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self {
            index,
            dir,
            source,
            inflight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
            speculative: Mutex::new(HashSet::new()),
            stats: SpanStats::default(),
            metrics: crate::metrics::LayerMetrics::default(),
            readahead_spans: 0,
            foreground: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            windows: None,
            budget: None,
            prefetcher: None,
        })
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    fn span_path(&self, i: u32) -> PathBuf {
        self.dir.join(format!("{i:08}"))
    }

    /// Whether span `i` is in the cache.
    pub fn is_cached(&self, i: u32) -> bool {
        self.span_path(i).exists()
    }

    /// Fetches span `i` into the cache unless it is there (background completion).
    pub fn prefetch(&self, i: u32) -> Result<(), SpanError> {
        let s = self.index.span(i).map_err(|e| SpanError::Index(i, e))?;
        self.ensure(&s)
    }

    /// Fetches the missing spans of `first..=last` that nobody fetches yet, in requests of at
    /// most `max_group` spans (the prefetcher). Returns how many spans it fetched.
    pub fn fetch_missing(&self, first: u32, last: u32, max_group: u32) -> Result<u32, SpanError> {
        let last = last.min(self.index.span_count().saturating_sub(1));
        let mut fetched = 0;
        let mut i = first;
        while i <= last && i < self.index.span_count() {
            let claim = {
                let mut inflight = self.inflight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let spans = self.claim_run(&mut inflight, i, last, max_group.max(1) as usize);
                Claim { cache: self, spans }
            };
            if claim.spans.is_empty() {
                i += 1;
                continue;
            }
            let group = claim
                .spans
                .iter()
                .map(|j| self.index.span(*j).map_err(|e| SpanError::Index(*j, e)))
                .collect::<Result<Vec<_>, _>>()?;
            i = claim.spans[claim.spans.len() - 1] + 1;
            self.fetch_group(&group)?;
            fetched += group.len() as u32;
            self.speculative
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(claim.spans.iter().copied());
            drop(claim);
        }
        Ok(fetched)
    }

    /// Claims (marks in flight) the run of spans from `first` through `last`, at most `max`,
    /// that are neither local nor being fetched; stops at the first that is.
    fn claim_run(&self, inflight: &mut HashSet<u32>, first: u32, last: u32, max: usize) -> Vec<u32> {
        let mut spans = Vec::new();
        let mut j = first;
        while j < self.index.span_count()
            && j <= last
            && spans.len() < max
            && !inflight.contains(&j)
            && !self.is_cached(j)
        {
            inflight.insert(j);
            spans.push(j);
            j += 1;
        }
        spans
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
        result
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
        let misses = self.stats.cache_misses.load(Ordering::Relaxed);
        let result = self.read_inner(start, end, readahead);
        self.foreground.fetch_sub(1, Ordering::Relaxed);
        let Some(p) = &self.prefetcher else { return result };
        let Ok(spans) = self.index.spans_for(start, end.saturating_sub(start).max(1)) else { return result };
        // A miss, or the first use of a guessed span: guess on from here.
        let guessed_right = {
            let mut speculative = self.speculative.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            !speculative.is_empty() && spans.clone().fold(false, |hit, i| speculative.remove(&i) || hit)
        };
        if guessed_right || self.stats.cache_misses.load(Ordering::Relaxed) != misses {
            let file_spans =
                file.and_then(|f| self.index.spans_for(f.start, f.end.saturating_sub(f.start).max(1)).ok());
            p.missed(self, *spans.start(), *spans.end(), file_spans);
        }
        result
    }

    fn read_inner(&self, start: u64, end: u64, readahead: u32) -> Result<Vec<u8>, SpanError> {
        if end <= start {
            return Ok(Vec::new());
        }
        let spans = self.index.spans_for(start, end - start).map_err(|e| SpanError::Index(0, e))?;
        let mut out = Vec::with_capacity((end - start) as usize);
        let last = *spans.end();
        for i in spans {
            let s = self.index.span(i).map_err(|e| SpanError::Index(i, e))?;
            let from = start.max(s.uncomp_start);
            let to = end.min(s.uncomp_end);
            let path = self.span_path(i);
            // The budget may evict a span between making it local and opening it: fetch again.
            let mut attempts = 0;
            let f = loop {
                self.ensure_through(&s, last, readahead)?;
                match fs::File::open(&path) {
                    Ok(f) => break f,
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
        Ok(out)
    }

    fn ensure(&self, s: &SpanInfo) -> Result<(), SpanError> {
        self.ensure_through(s, s.index, 0)
    }

    /// Makes span `s` local: wait for the fetch of it in flight, or fetch it together with the
    /// missing spans after it that the same read needs (through span `last`) and the
    /// read-ahead, in one request; verify, inflate, write.
    fn ensure_through(&self, s: &SpanInfo, last: u32, readahead: u32) -> Result<(), SpanError> {
        if self.is_cached(s.index) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.metrics.span_hits.inc();
            return Ok(());
        }
        let claim = {
            let mut inflight = self.inflight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut waited = false;
            while inflight.contains(&s.index) {
                waited = true;
                inflight = self
                    .landed
                    .wait_timeout(inflight, std::time::Duration::from_millis(500))
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
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
                return Ok(());
            }
            // Coalesce: the following spans that are missing too, while nobody else fetches them.
            let spans = self.claim_run(&mut inflight, s.index, last.saturating_add(readahead), usize::MAX);
            Claim { cache: self, spans }
        };
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.metrics.span_misses.inc();
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
            match self.fetch_group(&group) {
                Err(SpanError::Index(i, e)) if attempt < VERIFY_RETRIES => {
                    attempt += 1;
                    tracing::warn!(layer = %self.index.layer_digest(), span = i, error = %e, attempt, "span failed verification; fetching it again");
                }
                other => break other,
            }
        };
        drop(claim);
        result
    }

    /// Fetches `group` (contiguous spans) in one request, verifies and writes each; a bad
    /// read-ahead span is just not cached.
    fn fetch_group(&self, group: &[SpanInfo]) -> Result<(), SpanError> {
        let s = &group[0];
        let start = s.comp_start;
        let end = group.last().map_or(s.comp_end, |g| g.comp_end);
        let began = std::time::Instant::now();
        // The compressed bytes and their windows (a separate blob) in parallel: one round trip.
        let (compressed, windows) = if !self.index.has_external_windows() {
            (self.source.fetch(start, end), Ok(None))
        } else {
            std::thread::scope(|scope| {
                let windows = scope.spawn(|| self.fetch_windows(group));
                let compressed = self.source.fetch(start, end);
                let windows = windows.join().unwrap_or_else(|_| {
                    Err(SpanError::Fetch { start, end, message: "the windows fetch panicked".into() })
                });
                (compressed, windows)
            })
        };
        let compressed = compressed.map_err(|message| SpanError::Fetch { start, end, message })?;
        let windows = windows?;
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        self.stats.fetched_bytes.fetch_add(compressed.len() as u64, Ordering::Relaxed);
        self.metrics.fetches.inc();
        self.metrics.fetched_bytes.inc_by(compressed.len() as u64);
        tracing::debug!(layer = %self.index.layer_digest(), first = s.index, spans = group.len(), bytes = end - start, ms = began.elapsed().as_millis() as u64, by = std::thread::current().name().unwrap_or("fuse"), "spans fetched");
        for (n, span) in group.iter().enumerate() {
            let from = (span.comp_start - start) as usize;
            let to = (span.comp_end - start) as usize;
            let Some(bytes) = compressed.get(from..to) else {
                return Err(SpanError::Fetch { start, end, message: "short answer".into() });
            };
            let window = match (&windows, self.index.window_location(span)) {
                (Some((wstart, w)), Some((off, len))) => {
                    w.get((off - wstart) as usize..(off - wstart) as usize + len as usize)
                }
                _ => None,
            };
            let data = match self.index.decode_span_with(span, bytes, None, window) {
                Ok(d) => d,
                Err(e) if n == 0 => return Err(SpanError::Index(span.index, e)),
                Err(_) => break,
            };
            if n > 0 && self.is_cached(span.index) {
                continue;
            }
            self.write_span(span.index, &data)?;
        }
        Ok(())
    }

    /// For an index without windows: the windows of `group`, in one range request of the
    /// windows blob (they are contiguous there), with the offset where that range starts.
    fn fetch_windows(&self, group: &[SpanInfo]) -> Result<Option<(u64, Vec<u8>)>, SpanError> {
        if !self.index.has_external_windows() {
            return Ok(None);
        }
        let locations: Vec<(u64, u32)> = group.iter().filter_map(|s| self.index.window_location(s)).collect();
        let (Some(first), Some(last)) =
            (locations.iter().map(|l| l.0).min(), locations.iter().map(|l| l.0 + u64::from(l.1)).max())
        else {
            return Ok(None);
        };
        let source = self.windows.as_ref().ok_or_else(|| SpanError::Fetch {
            start: first,
            end: last,
            message: "the index's windows blob is unknown".into(),
        })?;
        let bytes =
            source.fetch(first, last).map_err(|message| SpanError::Fetch { start: first, end: last, message })?;
        self.stats.fetched_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.metrics.fetched_bytes.inc_by(bytes.len() as u64);
        Ok(Some((first, bytes)))
    }

    fn write_span(&self, i: u32, data: &[u8]) -> Result<(), SpanError> {
        let path = self.span_path(i);
        let tmp = self.dir.join(format!(".tmp-{i:08}-{:?}", std::thread::current().id()));
        fs::write(&tmp, data).map_err(|e| cache_err(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| cache_err(&path, e))?;
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

fn cache_err(path: &std::path::Path, source: std::io::Error) -> SpanError {
    SpanError::Cache { path: path.display().to_string(), source }
}
