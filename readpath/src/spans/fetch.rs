//! Fetching spans: one Range request for a run of spans (or one streamed request for
//! background completion), each span verified against the index's digest, inflated from its
//! checkpoint (its zran history from the span before it, else its window) and written to the
//! cache atomically.

use super::states::Claimed;
use super::{Cause, SpanCache, SpanError, cache_err, has_len};
use clip_index::{HISTORY_BYTES, IndexError, SpanInfo};
use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

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

/// Large files remembered as missed at most, per layer ([`SpanCache::first_miss_in`]).
const FILES_MISSED_LIMIT: usize = 4096;

impl SpanCache {
    /// Whether this is the first miss the prefetcher sees in the file whose data starts at
    /// `data_start` (false for every file once [`FILES_MISSED_LIMIT`] were seen).
    pub(crate) fn first_miss_in(&self, data_start: u64) -> bool {
        let mut seen = self.guesses.files_missed.lock();
        seen.len() < FILES_MISSED_LIMIT && seen.insert(data_start)
    }

    /// Bytes `[start, end)` for the prefetcher's own use (a library's headers): a span in flight
    /// is waited for, a missing one fetched as a prefetch; the bytes are read without counting a
    /// container read or telling any observer. An error when a span is not local after that
    /// (evicted at once).
    pub fn read_for_prefetch(&self, start: u64, end: u64) -> Result<Vec<u8>, SpanError> {
        if end <= start {
            return Ok(Vec::new());
        }
        let spans = self.index.spans_for(start, end - start).map_err(|e| SpanError::Range { start, end, source: e })?;
        let mut out = Vec::with_capacity((end - start) as usize);
        for i in spans {
            self.make_local(i, Cause::Prefetch)?;
            let s = self.index.span(i).map_err(|e| SpanError::Span { span: i, source: e })?;
            let (from, to) = (start.max(s.uncomp_start), end.min(s.uncomp_end));
            let path = self.span_path(i);
            if !self.is_cached(i) {
                return Err(cache_err(&path, std::io::Error::new(std::io::ErrorKind::NotFound, "span not local")));
            }
            let f = fs::File::open(&path).map_err(|e| cache_err(&path, e))?;
            let mut buf = vec![0u8; (to - from) as usize];
            f.read_exact_at(&mut buf, from - s.uncomp_start).map_err(|e| cache_err(&path, e))?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    /// Fetches the missing spans of `first..=last` that nobody fetches yet, in requests of at
    /// most `max_group` spans, for the prefetcher or a profile replay (`cause`). Returns how
    /// many spans it fetched.
    pub fn fetch_missing(&self, first: u32, last: u32, max_group: u32, cause: Cause) -> Result<u32, SpanError> {
        self.fetch_run(first, last, max_group, cause, true)
    }

    /// [`Self::fetch_missing`] for the prefetcher of spans a reader is known to want (the pages
    /// a library's relocations write, [`crate::elf`]): their first read is no right guess, so it
    /// opens no window after it.
    pub fn fetch_wanted(&self, first: u32, last: u32, max_group: u32) -> Result<u32, SpanError> {
        self.fetch_run(first, last, max_group, Cause::Prefetch, false)
    }

    /// [`Self::fetch_missing`]; `guess`: the spans' first read tells the prefetcher its guess was right.
    fn fetch_run(&self, first: u32, last: u32, max_group: u32, cause: Cause, guess: bool) -> Result<u32, SpanError> {
        if cause == Cause::Profile {
            self.guesses.replaying.store(true, Ordering::Relaxed);
        }
        let last = self.clamp(last);
        let mut fetched = 0;
        let mut i = first;
        while i <= last && i < self.index.span_count() {
            let claim = self
                .inflight
                .claim_run(i, last, max_group.max(1) as usize, u64::MAX, &self.local, |j| self.comp_len(j));
            let Some(&end) = claim.spans.last() else {
                i += 1;
                continue;
            };
            let group = self.span_infos(&claim.spans)?;
            i = end + 1;
            self.fetch_group(&group, cause)?;
            fetched += group.len() as u32;
            match cause {
                Cause::Profile => self.guesses.replayed.lock().extend(claim.spans.iter().copied()),
                _ if guess => self.guesses.speculative.lock().extend(claim.spans.iter().copied()),
                _ => {}
            }
            drop(claim);
        }
        Ok(fetched)
    }

    /// Makes span `i` local for `cause`: waits for a fetch of it in flight (a container's read
    /// of the same bytes, most often), else fetches it.
    fn make_local(&self, i: u32, cause: Cause) -> Result<(), SpanError> {
        loop {
            if self.is_cached(i) {
                return Ok(());
            }
            if let Claimed::Mine(claim) = self.inflight.claim_or_wait(i, i, &self.local, |j| self.comp_len(j)) {
                let group = self.span_infos(&claim.spans)?;
                let fetched = self.fetch_group(&group, cause);
                self.guesses.speculative.lock().extend(claim.spans.iter().copied());
                drop(claim);
                return fetched;
            }
        }
    }

    /// Fetches `group` (contiguous spans) in one request, verifies and writes each; a bad
    /// read-ahead span is just not cached. A gzip span's history window comes from the span
    /// before it: for the first, its local file, else its window from the windows blob (fetched
    /// in parallel with the spans); for every later one, what the group inflated to so far. So
    /// a group costs at most one window, and none when it continues local data.
    pub(super) fn fetch_group(&self, group: &[SpanInfo], cause: Cause) -> Result<(), SpanError> {
        // Every fetch but completion's is demand, which completion gives way to.
        let _demand = (cause != Cause::Stream).then(|| self.demand().begin());
        let s = &group[0];
        let start = s.comp_start;
        let end = group.last().map_or(s.comp_end, |g| g.comp_end);
        let began = std::time::Instant::now();
        let external = self.index.has_external_windows();
        let mut history = if external { self.local_history(s) } else { None };
        // The span before on its way in an earlier request (most often a container's miss this
        // prefetch follows): its bytes give the history, with no request for the window. Not for
        // a container's read, which waits on no fetch but its own.
        let neighbour = (external && history.is_none() && cause != Cause::Foreground)
            .then(|| s.index.checked_sub(1).and_then(|p| self.inflight.fetch_of(p)))
            .flatten();
        let after_neighbour = neighbour.is_some();
        let need_window = external && history.is_none() && !after_neighbour;
        // When each of the two requests was answered (debug log: whether the window delays a
        // miss; measured on the torch start, it rarely does).
        let (mut span_ms, mut window_ms) = (0u64, 0u64);
        let (compressed, window) = if need_window {
            std::thread::scope(|scope| {
                let window = scope.spawn(|| (self.fetch_window(s, cause), began.elapsed().as_millis() as u64));
                let compressed = self.source.fetch(start, end - start);
                span_ms = began.elapsed().as_millis() as u64;
                let window = match window.join() {
                    Ok((window, ms)) => {
                        window_ms = ms;
                        window
                    }
                    Err(_) => Err(fetch_failed(start, end, "the window fetch panicked")),
                };
                (compressed, window)
            })
        } else {
            (self.source.fetch(start, end - start), Ok(None))
        };
        let compressed = compressed.map_err(|source| SpanError::Fetch { start, end, source })?;
        let mut window = window?;
        self.count_fetch(compressed.len() as u64, cause);
        if let Some(fetch) = neighbour {
            // Waits at most as long again as this request took; then asks for the window.
            fetch.wait_for(began.elapsed());
            history = self.local_history(s);
            if history.is_none() {
                window = self.fetch_window(s, cause)?;
            }
        }
        tracing::debug!(layer = %self.index.layer_digest(), first = s.index, spans = group.len(), bytes = end - start, window = need_window, span_ms, window_ms, after_neighbour, ?cause, ms = began.elapsed().as_millis() as u64, by = std::thread::current().name().unwrap_or("fuse"), "spans fetched");
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
    /// transfer. With `yield_to_demand` it ends after the span during which a demand fetch
    /// began. Returns how many spans it made local, and whether it gave way.
    pub(super) fn stream_group(&self, group: &[SpanInfo], yield_to_demand: bool) -> Result<(u32, bool), SpanError> {
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
        let mut yielded = false;
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
                        Ok(true) => {
                            self.stream_use.streamed(span.index);
                            next += 1;
                            if yield_to_demand && self.demand().fetching() && next < group.len() {
                                yielded = true;
                                stop = Some(Ok(()));
                            }
                        }
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
        tracing::debug!(layer = %self.layer, first = s.index, spans = next, bytes = received, cause = ?Cause::Stream, yielded, ms = began.elapsed().as_millis() as u64, "spans streamed");
        match stop {
            Some(Err(e)) => return Err(e),
            Some(Ok(())) => {}
            None => streamed.map_err(|source| SpanError::Fetch { start, end, source })?,
        }
        Ok((next as u32, yielded))
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
            self.opts.windows.as_ref().ok_or_else(|| fetch_failed(off, end, "the index's windows blob is unknown"))?;
        let bytes = source.fetch(off, u64::from(len)).map_err(|source| SpanError::Fetch { start: off, end, source })?;
        self.count_fetch(bytes.len() as u64, cause);
        Ok(Some(bytes))
    }

    /// Counts one range request of `bytes` for `cause`.
    fn count_fetch(&self, bytes: u64, cause: Cause) {
        self.opts.metrics.fetches.inc();
        self.count_bytes(bytes, cause);
    }

    fn count_bytes(&self, bytes: u64, cause: Cause) {
        let m = &self.opts.metrics;
        m.fetched_bytes.inc_by(bytes);
        match cause {
            Cause::Foreground => m.foreground_bytes.inc_by(bytes),
            Cause::Prefetch => m.prefetch_bytes.inc_by(bytes),
            Cause::Profile => m.profile_bytes.inc_by(bytes),
            Cause::Stream => m.stream_bytes.inc_by(bytes),
        };
    }

    fn write_span(&self, i: u32, data: &[u8]) -> Result<(), SpanError> {
        let path = self.span_path(i);
        clip_fsutil::atomic_write(&path, data, 0o600, clip_fsutil::Durability::Cache)
            .map_err(|e| cache_err(&path, e))?;
        if self.local.set(i) {
            self.opts.metrics.spans_local.inc();
        }
        if let Some(budget) = &self.opts.budget {
            budget.added(&path, data.len() as u64);
        }
        Ok(())
    }
}

pub(super) fn fetch_failed(start: u64, end: u64, message: &str) -> SpanError {
    SpanError::Fetch {
        start,
        end,
        source: IndexError::Fetch { offset: start, len: end - start, message: message.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
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
        assert_eq!((cache.local_bytes(), cache.local_spans()), (0, 0));
        // Requests of about 5 spans, each streamed in 1000-byte pieces.
        let mut from = 0;
        loop {
            match cache.stream_next(from, 5 * (64 << 10), false).expect("stream") {
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
        assert_eq!(cache.metrics().stream_bytes.get(), blob.bytes.len() as u64);
        // What the cache says it holds is what its files hold.
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
            .sum();
        assert_eq!(cache.local_bytes(), on_disk);
        assert_eq!(cache.local_spans(), index.span_count());
    }

    /// A gzip layer (the system's `gzip`) of 24 files of incompressible 64 KiB, indexed in 64 KiB
    /// spans with its windows split off: the index, the tar, the blob and the windows blob, both
    /// answering after `delay`. None without `gzip`.
    fn gzip_layer(delay: Duration) -> Option<(Arc<clip_index::Index>, Vec<u8>, Arc<SlowBlob>, Arc<SlowBlob>)> {
        use std::io::Write;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let files: Vec<(String, Vec<u8>)> = (0..24)
            .map(|n| {
                let bytes = (0..64 << 10)
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        (seed >> 56) as u8
                    })
                    .collect();
                (format!("r{n:02}"), bytes)
            })
            .collect();
        let (_, plain) = crate::testutil::layer_of(&files, Duration::ZERO);
        let tar = plain.bytes.clone();
        let mut gz = std::process::Command::new("gzip")
            .arg("-c")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let mut stdin = gz.stdin.take()?;
        let writer = std::thread::spawn(move || stdin.write_all(&tar));
        let out = gz.wait_with_output().ok()?;
        writer.join().ok()?.ok()?;
        let opts = clip_index::build::BuildOptions { span_size: 64 << 10, ..Default::default() };
        let full = clip_index::build::build_index(out.stdout.as_slice(), &opts).expect("index");
        let (small, windows) = full.split_windows().expect("split").expect("a gzip layer has windows");
        let index = Arc::new(clip_index::Index::open(small).expect("open"));
        assert!(index.has_external_windows());
        let blob = Arc::new(SlowBlob { bytes: out.stdout, requests: std::sync::atomic::AtomicU32::default(), delay });
        let windows = Arc::new(SlowBlob { bytes: windows, requests: std::sync::atomic::AtomicU32::default(), delay });
        Some((index, plain.bytes.clone(), blob, windows))
    }

    /// The prefetcher's run after a container's miss starts at the span after the miss, which is
    /// on its way: its history comes from that span when it lands, not from a request for its
    /// window (a third of all requests of a torch start were windows, most of them these).
    #[test]
    fn a_prefetch_after_a_span_in_flight_takes_its_history_from_it_not_from_a_window_request() {
        let Some((index, tar, blob, windows)) = gzip_layer(Duration::from_millis(300)) else { return };
        let k = 5;
        assert!(index.span_count() > k + 6 && index.history_len(&index.span(k + 1).expect("span")) > 0);
        let dir = tempfile::tempdir().expect("tmp");
        let options = crate::SpanCacheOptions { windows: Some(windows.clone()), ..Default::default() };
        let source: Arc<dyn RangeFetcher> = blob.clone();
        let cache =
            Arc::new(SpanCache::with_options(index.clone(), dir.path().to_path_buf(), source, options).expect("cache"));
        let reader = {
            let (cache, s) = (cache.clone(), index.span(k).expect("span"));
            std::thread::spawn(move || cache.read(s.uncomp_start, s.uncomp_end).map(|_| ()))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(cache.fetch_missing(k + 1, k + 2, 8, Cause::Prefetch).expect("prefetch"), 2);
        reader.join().expect("join").expect("read");
        assert_eq!(
            windows.requests.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "only the container's miss asked for a window"
        );
        for i in k..=k + 2 {
            let s = index.span(i).expect("span");
            let read = cache.read(s.uncomp_start, s.uncomp_end).expect("read");
            assert!(read == tar[s.uncomp_start as usize..s.uncomp_end as usize], "span {i} differs");
        }
        // With nothing in flight before it, a prefetch asks for its window as before.
        assert_eq!(cache.fetch_missing(k + 6, k + 6, 8, Cause::Prefetch).expect("prefetch"), 1);
        assert_eq!(windows.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
