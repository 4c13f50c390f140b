//! Where a span is fetched: the read path under the FUSE layer. For the uncompressed range a
//! read needs, the spans holding it are taken from the on-disk span cache, or fetched (the
//! missing neighbours in one Range request), verified against the index's span digests,
//! inflated from their checkpoint and written to the cache (atomically). One lock per span
//! makes concurrent readers of a span share one fetch.

use clip_index::{Index, IndexError, SpanInfo};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    locks: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
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
}

impl std::fmt::Debug for SpanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpanCache({})", self.dir.display())
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
            locks: Mutex::new(HashMap::new()),
            stats: SpanStats::default(),
            metrics: crate::metrics::LayerMetrics::default(),
            readahead_spans: 0,
            foreground: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            windows: None,
            budget: None,
        })
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    fn span_path(&self, i: u32) -> PathBuf {
        self.dir.join(format!("{i:08}"))
    }

    fn lock_for(&self, i: u32) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(i).or_default().clone()
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

    fn read_inner(&self, start: u64, end: u64, readahead: u32) -> Result<Vec<u8>, SpanError> {
        if end <= start {
            return Ok(Vec::new());
        }
        let spans = self
            .index
            .spans_for(start, end - start)
            .map_err(|e| SpanError::Index(0, e))?;
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
            f.read_exact_at(&mut buf, from - s.uncomp_start)
                .map_err(|e| cache_err(&path, e))?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    fn ensure(&self, s: &SpanInfo) -> Result<(), SpanError> {
        self.ensure_through(s, s.index, 0)
    }

    /// Makes span `s` local: fetch it together with the missing spans after it that the same
    /// read needs (through span `last`) and the read-ahead, in one request; verify, inflate,
    /// write.
    fn ensure_through(&self, s: &SpanInfo, last: u32, readahead: u32) -> Result<(), SpanError> {
        if self.is_cached(s.index) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.metrics.span_hits.inc();
            return Ok(());
        }
        let lock = self.lock_for(s.index);
        let _guard = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.is_cached(s.index) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.metrics.span_misses.inc();
        // Coalesce: the following spans that are missing too, while nobody else fetches them.
        let mut group = vec![s.clone()];
        let mut next = s.index + 1;
        let limit = last.saturating_add(readahead);
        while next < self.index.span_count() && next <= limit && !self.is_cached(next) {
            match self.index.span(next) {
                Ok(n) => group.push(n),
                Err(_) => break,
            }
            next += 1;
        }
        // A span that fails verification (a byte flipped on the way) is fetched again; a
        // registry that keeps answering wrong bytes fails the read, never serves them.
        let mut attempt = 0;
        loop {
            match self.fetch_group(&group) {
                Err(SpanError::Index(i, e)) if attempt < VERIFY_RETRIES => {
                    attempt += 1;
                    tracing::warn!(layer = %self.index.layer_digest(), span = i, error = %e, attempt, "span failed verification; fetching it again");
                }
                other => return other,
            }
        }
    }

    /// Fetches `group` (contiguous spans) in one request, verifies and writes each; a bad
    /// read-ahead span is just not cached.
    fn fetch_group(&self, group: &[SpanInfo]) -> Result<(), SpanError> {
        let s = &group[0];
        let start = s.comp_start;
        let end = group.last().map_or(s.comp_end, |g| g.comp_end);
        let compressed = self
            .source
            .fetch(start, end)
            .map_err(|message| SpanError::Fetch { start, end, message })?;
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        self.stats.fetched_bytes.fetch_add(compressed.len() as u64, Ordering::Relaxed);
        self.metrics.fetches.inc();
        self.metrics.fetched_bytes.inc_by(compressed.len() as u64);
        let windows = self.fetch_windows(group)?;
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
        let (Some(first), Some(last)) = (locations.iter().map(|l| l.0).min(), locations.iter().map(|l| l.0 + u64::from(l.1)).max()) else {
            return Ok(None);
        };
        let source = self.windows.as_ref().ok_or_else(|| SpanError::Fetch {
            start: first,
            end: last,
            message: "the index's windows blob is unknown".into(),
        })?;
        let bytes = source
            .fetch(first, last)
            .map_err(|message| SpanError::Fetch { start: first, end: last, message })?;
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
    SpanError::Cache {
        path: path.display().to_string(),
        source,
    }
}
