//! Speculative fetching. A read that had to wait for the registry says where a container is
//! reading; what it reads next is most often the rest of that file and the files stored next
//! to it (a package, a directory: neighbours in the tar). The prefetcher fetches those spans on
//! a few worker threads, in parallel with the container's own fetches, so the container's
//! next reads find their spans local or already on the way (readers wait for a span in flight
//! instead of fetching it again, see [`super::spans`]). No profiling, no image conversion.
//!
//! A guess that proves right (a read uses a prefetched span first) counts as a new hint, so a
//! reader moving through a package is followed with a short window rather than a wide one.
//!
//! Newest hints first: a container moves on, and an old hint is worth less than a new one; the
//! queue is bounded and drops the oldest.

use super::spans::SpanCache;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

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

/// Hints kept at most (older ones are dropped).
const QUEUE_LIMIT: usize = 64;

struct Job {
    cache: Weak<SpanCache>,
    first: u32,
    last: u32,
    /// Spans per request (0: the policy's).
    group: u32,
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    stop: AtomicBool,
}

/// The daemon's prefetcher: a queue of hints and the threads that fetch them.
pub struct Prefetcher {
    policy: PrefetchPolicy,
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        for n in 0..policy.threads {
            let shared = shared.clone();
            let group = policy.group_spans.max(1);
            let spawned = std::thread::Builder::new()
                .name(format!("clip-prefetch-{n}"))
                .spawn(move || work(&shared, group));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a prefetch thread");
            }
        }
        Some(Arc::new(Self { policy, shared }))
    }

    /// A read of spans `first..=last` had to fetch, or used a guessed span first; `file` are
    /// the spans of the file read.
    pub fn missed(&self, cache: &Arc<SpanCache>, first: u32, last: u32, file: Option<std::ops::RangeInclusive<u32>>) {
        let p = self.policy;
        let count = cache.index().span_count();
        if count == 0 {
            return;
        }
        if cache.index().compressed_size() <= SMALL_LAYER_BYTES {
            let mut queue = self.shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.push_front(Job { cache: Arc::downgrade(cache), first: 0, last: count - 1, group: count });
            queue.truncate(QUEUE_LIMIT);
            drop(queue);
            self.shared.ready.notify_all();
            return;
        }
        let mut jobs = Vec::with_capacity(3);
        // The rest of the file first: the reader is inside it.
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
        // Then its neighbours in the tar.
        if p.neighbour_spans > 0 {
            jobs.push((last + 1, last.saturating_add(p.neighbour_spans)));
            if first > 0 {
                jobs.push((first.saturating_sub((p.neighbour_spans / 2).max(1)), first - 1));
            }
        }
        let weak = Arc::downgrade(cache);
        let mut queue = self.shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Pushed to the front in reverse, so the file's rest is taken first.
        for (a, b) in jobs.into_iter().rev() {
            let b = b.min(count - 1);
            if a > b {
                continue;
            }
            queue.push_front(Job { cache: weak.clone(), first: a, last: b, group: 0 });
        }
        queue.truncate(QUEUE_LIMIT);
        drop(queue);
        self.shared.ready.notify_all();
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.ready.notify_all();
    }
}

fn work(shared: &Shared, group: u32) {
    loop {
        let job = {
            let mut queue = shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(job) = queue.pop_front() {
                    break job;
                }
                queue = shared.ready.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        let Some(cache) = job.cache.upgrade() else { continue };
        // The background completer yields to this as to a container's read.
        cache.foreground.fetch_add(1, Ordering::Relaxed);
        let group = if job.group > 0 { job.group } else { group };
        match cache.fetch_missing(job.first, job.last, group) {
            Ok(0) => {}
            Ok(n) => {
                cache.metrics.prefetched_spans.inc_by(u64::from(n));
                tracing::trace!(layer = %cache.index().layer_digest(), first = job.first, last = job.last, spans = n, "prefetched");
            }
            Err(e) => tracing::debug!(layer = %cache.index().layer_digest(), error = %e, "prefetch failed (a read will fetch again)"),
        }
        cache.foreground.fetch_sub(1, Ordering::Relaxed);
    }
}
