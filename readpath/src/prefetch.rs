//! Speculative fetching. A read that had to wait for the registry says where a container is
//! reading; what it reads next is most often the rest of that file and the files stored next
//! to it (a package, a directory: neighbours in the tar). The prefetcher fetches those spans on
//! a few worker threads, in parallel with the container's own fetches, so the container's
//! next reads find their spans local or already on the way (readers wait for a span in flight
//! instead of fetching it again, see [`crate::spans`]). No profiling, no image conversion.
//!
//! A guess that proves right (a read uses a prefetched span first) counts as a new hint, so a
//! reader moving through a package is followed with a short window rather than a wide one.
//!
//! Newest hints first: a container moves on, and an old hint is worth less than a new one; the
//! queue is bounded and drops the oldest.

use crate::spans::{Cause, MissObserver, SpanCache};
use crate::workers::{Workers, yielding};
use std::collections::VecDeque;
use std::sync::{Arc, Weak};

/// How the prefetcher guesses.
#[derive(Debug, Clone, Copy)]
pub struct PrefetchPolicy {
    /// Worker threads (parallel requests); 0 turns prefetching off.
    pub threads: usize,
    /// Spans around a miss fetched ahead (after it; half as many before it).
    pub neighbour_spans: u32,
    /// The rest of the file read is fetched when it has at most this many spans (else the
    /// next this many).
    pub file_spans: u32,
    /// Spans in one request.
    pub group_spans: u32,
}

/// A layer at most this large (compressed) is fetched whole, in one request, at its first miss:
/// a few round trips cost more than its bytes.
const SMALL_LAYER_BYTES: u64 = 2 << 20;

/// A file of fewer spans than this is small: its neighbours are fetched after a miss in it.
const SMALL_FILE_SPANS: u32 = 2;

/// Hints kept at most (older ones are dropped).
const QUEUE_LIMIT: usize = 64;

struct Job {
    cache: Weak<SpanCache>,
    first: u32,
    last: u32,
    /// Spans per request (0: the policy's).
    group: u32,
}

/// The daemon's prefetcher: a queue of hints and the threads that fetch them.
pub struct Prefetcher {
    policy: PrefetchPolicy,
    workers: Arc<Workers<VecDeque<Job>>>,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prefetcher({:?})", self.policy)
    }
}

impl Prefetcher {
    /// Starts the worker threads; `None` when the policy turns prefetching off.
    pub fn start(policy: PrefetchPolicy) -> Option<Arc<Self>> {
        if policy.threads == 0 {
            return None;
        }
        let group = policy.group_spans.max(1);
        let workers = Workers::start("clip-prefetch", policy.threads, VecDeque::new(), move |job| work(&job, group));
        Some(Arc::new(Self { policy, workers }))
    }
}

impl MissObserver for Prefetcher {
    fn missed(&self, cache: &Arc<SpanCache>, first: u32, last: u32, file: Option<std::ops::RangeInclusive<u32>>) {
        let p = self.policy;
        let count = cache.index().span_count();
        if count == 0 {
            return;
        }
        if cache.index().compressed_size() <= SMALL_LAYER_BYTES {
            self.enqueue([Job { cache: Arc::downgrade(cache), first: 0, last: count - 1, group: count }]);
            return;
        }
        let mut jobs = Vec::with_capacity(3);
        // The rest of the file first: the reader is inside it.
        let small_file = file.as_ref().is_none_or(|f| f.end() - f.start() < SMALL_FILE_SPANS);
        if let Some(file) = file {
            let (fs, fe) = (*file.start(), *file.end());
            if fe > last || fs < first {
                if fe - fs < p.file_spans {
                    jobs.push((last + 1, fe));
                    if fs < first {
                        jobs.push((fs, first - 1));
                    }
                } else {
                    jobs.push((last + 1, last.saturating_add(p.file_spans).min(fe)));
                }
            }
        }
        // Then its neighbours in the tar, after a read of a small file (a module of a package
        // is read with its siblings); a large file is read in place (an mmap of a library
        // touches its own pages, not the next file's).
        if p.neighbour_spans > 0 && small_file {
            jobs.push((last + 1, last.saturating_add(p.neighbour_spans)));
            if first > 0 {
                jobs.push((first.saturating_sub((p.neighbour_spans / 2).max(1)), first - 1));
            }
        }
        let weak = Arc::downgrade(cache);
        self.enqueue(jobs.into_iter().filter_map(|(a, b)| {
            let b = b.min(count - 1);
            (a <= b).then(|| Job { cache: weak.clone(), first: a, last: b, group: 0 })
        }));
    }
}

impl Prefetcher {
    /// Puts `jobs` at the head of the queue, the first of them first, dropping the oldest hints
    /// beyond the limit, and wakes the workers.
    fn enqueue(&self, jobs: impl IntoIterator<Item = Job>) {
        let jobs: Vec<Job> = jobs.into_iter().collect();
        self.workers.push(|queue| {
            for job in jobs.into_iter().rev() {
                queue.push_front(job);
            }
            queue.truncate(QUEUE_LIMIT);
        });
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.workers.stop();
    }
}

fn work(job: &Job, group: u32) {
    let Some(cache) = job.cache.upgrade() else { return };
    let group = if job.group > 0 { job.group } else { group };
    match yielding(&cache, || cache.fetch_missing(job.first, job.last, group, Cause::Prefetch)) {
        Ok(0) => {}
        Ok(n) => {
            cache.metrics().prefetched_spans.inc_by(u64::from(n));
            tracing::trace!(layer = %cache.layer(), first = job.first, last = job.last, spans = n, "prefetched");
        }
        Err(e) => {
            tracing::debug!(layer = %cache.layer(), error = %e, "prefetch failed (a read will fetch again)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{SlowBlob, layer, span_range, wait_until};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    fn cache(
        index: &Arc<clip_index::Index>,
        blob: &Arc<SlowBlob>,
        dir: &std::path::Path,
        prefetch: Option<PrefetchPolicy>,
    ) -> Arc<SpanCache> {
        let observer = prefetch.and_then(Prefetcher::start).map(|p| p as Arc<dyn MissObserver>);
        let options = crate::SpanCacheOptions { observer, ..Default::default() };
        Arc::new(SpanCache::with_options(index.clone(), dir.to_path_buf(), blob.clone(), options).expect("cache"))
    }

    #[test]
    fn readers_of_a_span_in_flight_share_its_fetch() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(8, Duration::from_millis(200));
        let c = cache(&index, &blob, dir.path(), None);
        let (a, b) = span_range(&index, 3);
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || c.read(a, b).expect("read"))
            })
            .collect();
        let first = readers.into_iter().map(|r| r.join().expect("join")).collect::<Vec<_>>();
        assert!(first.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(blob.requests.load(Ordering::SeqCst), 1, "four readers of one span made more than one request");
    }

    #[test]
    fn a_miss_fetches_its_neighbours_and_a_right_guess_moves_on() {
        let dir = tempfile::tempdir().expect("tmp");
        // 40 files: over 2 MiB, so not fetched whole.
        let (index, blob) = layer(40, Duration::from_millis(5));
        assert!(index.compressed_size() > SMALL_LAYER_BYTES);
        let policy = PrefetchPolicy { threads: 2, neighbour_spans: 1, file_spans: 0, group_spans: 8 };
        let c = cache(&index, &blob, dir.path(), Some(policy));
        let (a, b) = span_range(&index, 10);
        c.read_hinted(a, b, 0, None).expect("read");
        assert!(wait_until(|| c.is_cached(11) && c.is_cached(9)), "the neighbours of a miss were not fetched");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!c.is_cached(12) && !c.is_cached(8), "fetched further than the window");
        // Reading the guessed span 11 is a right guess: the window moves on to 12.
        let (a, b) = span_range(&index, 11);
        c.read_hinted(a, b, 0, None).expect("read");
        assert!(wait_until(|| c.is_cached(12)), "a right guess did not move the window on");
        assert!(!c.is_cached(14));
        // Nothing was fetched twice: 10 by the reader, then 9, 11, 12 (and 10's rest) ahead.
        let cached = (0..index.span_count()).filter(|i| c.is_cached(*i)).count() as u64;
        assert!(c.metrics().fetches.get() <= cached);
    }

    #[test]
    fn a_small_layer_is_fetched_whole_at_its_first_miss() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(12, Duration::from_millis(5));
        assert!(index.compressed_size() <= SMALL_LAYER_BYTES && index.span_count() > 4);
        let policy = PrefetchPolicy { threads: 1, neighbour_spans: 1, file_spans: 0, group_spans: 2 };
        let c = cache(&index, &blob, dir.path(), Some(policy));
        let (a, b) = span_range(&index, 0);
        c.read_hinted(a, b, 0, None).expect("read");
        assert!(wait_until(|| (0..index.span_count()).all(|i| c.is_cached(i))), "the small layer was not completed");
        assert_eq!(blob.requests.load(Ordering::SeqCst), 2, "one request for the miss, one for the rest");
    }
}
