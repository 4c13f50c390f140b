//! Speculative fetching. A read that had to wait for the registry says where a container is
//! reading; what it reads next is most often the rest of that file and the files stored next
//! to it (a package, a directory: neighbours in the tar). The prefetcher fetches those spans on
//! a few worker threads, in parallel with the container's own fetches, so the container's
//! next reads find their spans local or already on the way (readers wait for a span in flight
//! instead of fetching it again, see [`crate::spans`]). No profiling, no image conversion.
//!
//! A small file's neighbours are guessed only once the layer has missed
//! `neighbours_after_misses` times: a short start (`python3 -c 'print(1)'`) is bound by the
//! link's bandwidth and every guessed byte delays it, while a start that keeps missing file
//! after file (`import torch` imports about a thousand modules, one round trip each) is bound by
//! round trips, and the next modules it imports are mostly stored beside the last.
//!
//! A guess that proves right (a read uses a prefetched span first) counts as a new hint, so a
//! reader moving through a package is followed with a short window rather than a wide one.
//!
//! In a large file (more spans than `file_spans`) the window ramps up, as the kernel's
//! read-ahead does: [`LARGE_FILE_FIRST_SPANS`] after a miss, doubled after each right guess up to
//! [`LARGE_FILE_MAX_SPANS`] (a right guess in a mapped library is often the kernel's own
//! read-around, not a reader going on; a reader that does go on is served by completion's
//! stream, which follows it: [`crate::complete`]). A reader going through the file gets the
//! wide window within a few reads; a loader touching scattered pages of a memory-mapped library
//! — a few percent of a 1 GB libtorch — is not sent 8 MiB after each page it touches. A reader
//! going *down* a file (a miss just below the one before) is followed downwards: at a Python
//! process's exit the CUDA libraries' destructors touch their code a page at a time from the
//! top down (measured on `import torch`), and each of those misses waited a round trip on its
//! own (`ahead`); going down, the window widens up to `DOWNWARD_MAX_SPANS` spans.
//!
//! At the first miss in a large file that is a shared library, its dynamic-linking tables
//! ([`crate::elf`]: relocations, symbols, their names, RELRO) are fetched whole, in parallel
//! requests: the loader reads all of them, in an order no window follows. Then the pages its
//! relocations write outside RELRO, exactly (`prefetch/library.rs`).
//!
//! Newest hints first: a container moves on, and an old hint is worth less than a new one; the
//! queue is bounded and drops the oldest.

use crate::spans::{Cause, FileSpans, Hint, LargeFileReads, MissObserver, SpanCache};
use crate::workers::Workers;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

mod library;

/// How the prefetcher guesses.
#[derive(Debug, Clone, Copy)]
pub struct PrefetchPolicy {
    /// Worker threads (parallel requests); 0 turns prefetching off.
    pub threads: usize,
    /// Spans around a miss in a small file fetched ahead (after it; half as many before it)...
    pub neighbour_spans: u32,
    /// ...once the layer has missed this many times (a long run of misses is a start bound by
    /// round trips; a short start pays for every guessed byte on a slow link).
    pub neighbours_after_misses: u32,
    /// The rest of the file read is fetched when it has at most this many spans (else the
    /// next this many).
    pub file_spans: u32,
    /// Spans in one request.
    pub group_spans: u32,
    /// A shared library's loader tables fetched whole at its first miss, then the pages its
    /// relocations write ([`crate::elf`]; `prefetch/library.rs`).
    pub library_tables: bool,
}

/// A layer at most this large (compressed) is fetched whole, in one request, at its first miss:
/// a few round trips cost more than its bytes.
const SMALL_LAYER_BYTES: u64 = 2 << 20;

/// A file of fewer spans than this is small: its neighbours are fetched after a miss in it.
const SMALL_FILE_SPANS: u32 = 2;

/// The prefetch window in a large file after a miss (spans); each right guess doubles it...
pub const LARGE_FILE_FIRST_SPANS: u32 = 2;
/// ...up to this (and `file_spans`). Measured on `import torch` over 100 Mbit/20 ms: a fixed 32
/// fetched 454 MB in 43.5 s, a ramp to 32 389 MB in 40.6 s, a fixed 8 339 MB in 38.2 s.
pub const LARGE_FILE_MAX_SPANS: u32 = 8;

/// A miss at most this many spans below the window under the previous hint is a reader going
/// down the file (a few pages of each span are touched, not all of them).
const DOWNWARD_SLACK: u32 = 2;

/// The widest window for a reader going down a large file. Measured on the `import torch`
/// exit (destructors reading libraries' code from the top down), slow link, medians of 3 the
/// same morning: the exit took 2.75 s with 32 against 3.18 s with [`LARGE_FILE_MAX_SPANS`],
/// in 1,492 requests against 1,632, for the same bytes.
const DOWNWARD_MAX_SPANS: u32 = 32;

/// Hints kept at most (older ones are dropped).
const QUEUE_LIMIT: usize = 64;

enum Job {
    Spans {
        cache: Weak<SpanCache>,
        first: u32,
        last: u32,
        /// Spans per request (0: the policy's).
        group: u32,
    },
    /// The first miss in a large file: if it is a shared library, its loader's tables...
    Library { cache: Weak<SpanCache>, data: std::ops::Range<u64> },
    /// ...then, once they are read, the pages its relocations write (the worker reading the
    /// relocation tables waits for their fetches in flight).
    Relocated { cache: Weak<SpanCache>, data: std::ops::Range<u64>, library: Box<crate::elf::Library> },
    /// Runs of spans a reader is known to want (first, last), one run per request, each to the
    /// next free worker; their reads are no right guesses ([`SpanCache::fetch_wanted`]).
    Wanted { cache: Weak<SpanCache>, runs: VecDeque<(u32, u32)> },
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
        let workers = Workers::start("clip-prefetch", policy.threads, VecDeque::new(), move |workers, job| {
            work(workers, job, group);
        });
        Some(Arc::new(Self { policy, workers }))
    }
}

impl MissObserver for Prefetcher {
    fn missed(&self, cache: &Arc<SpanCache>, first: u32, last: u32, file: Option<FileSpans>, hint: Hint) {
        let p = self.policy;
        let count = cache.index().span_count();
        if count == 0 {
            return;
        }
        let weak = Arc::downgrade(cache);
        if cache.index().compressed_size() <= SMALL_LAYER_BYTES {
            self.enqueue([Job::Spans { cache: weak, first: 0, last: count - 1, group: count }]);
            return;
        }
        let mut library = None;
        let mut jobs = Vec::with_capacity(3);
        // The rest of the file first: the reader is inside it.
        let small_file = file.as_ref().is_none_or(|f| f.spans.end() - f.spans.start() < SMALL_FILE_SPANS);
        if let Some(FileSpans { data, spans: file }) = file {
            if p.library_tables
                && hint == Hint::Miss
                && data.end - data.start >= crate::elf::MIN_FILE_BYTES
                && cache.first_miss_in(data.start)
            {
                library = Some(Job::Library { cache: weak.clone(), data });
            }
            let (fs, fe) = (*file.start(), *file.end());
            if fe > last || fs < first {
                if fe - fs < p.file_spans {
                    jobs.push((last + 1, fe));
                    if fs < first {
                        jobs.push((fs, first - 1));
                    }
                } else {
                    let max = (p.file_spans.min(LARGE_FILE_MAX_SPANS), p.file_spans.min(DOWNWARD_MAX_SPANS));
                    jobs.extend(ahead(cache.large_file_reads(), first, last, (fs, fe), hint, max));
                }
            }
        }
        // Then its neighbours in the tar, after a read of a small file (a module of a package
        // is read with its siblings); a large file is read in place (an mmap of a library
        // touches its own pages, not the next file's).
        let missed_enough = cache.metrics().span_misses.get() >= u64::from(p.neighbours_after_misses);
        if p.neighbour_spans > 0 && small_file && missed_enough {
            jobs.push((last + 1, last.saturating_add(p.neighbour_spans)));
            if first > 0 {
                jobs.push((first.saturating_sub((p.neighbour_spans / 2).max(1)), first - 1));
            }
        }
        let spans = jobs.into_iter().filter_map(|(a, b)| {
            let b = b.min(count - 1);
            (a <= b).then(|| Job::Spans { cache: weak.clone(), first: a, last: b, group: 0 })
        });
        self.enqueue(library.into_iter().chain(spans));
    }
}

/// The spans to fetch for a hint at `first..=last` in a large file of spans `file` (first,
/// last), with windows of at most `max` spans (up, down): after the read, or before it for a
/// reader going down the file. A miss elsewhere starts small again. `reads` remembers the hint
/// for the next.
fn ahead(
    reads: &LargeFileReads,
    first: u32,
    last: u32,
    file: (u32, u32),
    hint: Hint,
    (max, down_max): (u32, u32),
) -> Option<(u32, u32)> {
    let small = LARGE_FILE_FIRST_SPANS.min(max);
    let window = reads.window.load(Ordering::Relaxed).max(small);
    let previous = reads.at.swap(first.saturating_add(1), Ordering::Relaxed).checked_sub(1);
    let just_below = previous.is_some_and(|p| first < p && p - first <= window + DOWNWARD_SLACK);
    let downward = match hint {
        Hint::Miss => just_below,
        Hint::GuessedRight => just_below && reads.downward.load(Ordering::Relaxed),
    };
    reads.downward.store(downward, Ordering::Relaxed);
    let cap = if downward { down_max } else { max };
    let next = if hint == Hint::Miss && !downward { small } else { window.saturating_mul(2).min(cap) };
    reads.window.store(next, Ordering::Relaxed);
    let (fs, fe) = file;
    if downward {
        (first > fs).then(|| (first.saturating_sub(next).max(fs), first - 1))
    } else {
        (last < fe).then(|| (last + 1, last.saturating_add(next).min(fe)))
    }
}

impl Prefetcher {
    /// Puts `jobs` at the head of the queue ([`push_front`]).
    fn enqueue(&self, jobs: impl IntoIterator<Item = Job>) {
        push_front(&self.workers, jobs);
    }
}

/// Puts `jobs` at the head of the queue, the first of them first, dropping the oldest hints
/// beyond the limit, and wakes the workers.
fn push_front(workers: &Workers<VecDeque<Job>>, jobs: impl IntoIterator<Item = Job>) {
    let jobs: Vec<Job> = jobs.into_iter().collect();
    workers.push(|queue| {
        for job in jobs.into_iter().rev() {
            queue.push_front(job);
        }
        queue.truncate(QUEUE_LIMIT);
    });
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.workers.stop();
    }
}

fn work(workers: &Workers<VecDeque<Job>>, job: Job, group: u32) {
    match job {
        Job::Spans { cache, first, last, group: own } => {
            let Some(cache) = cache.upgrade() else { return };
            let group = if own > 0 { own } else { group };
            prefetched(&cache, first, last, cache.fetch_missing(first, last, group, Cause::Prefetch));
        }
        Job::Library { cache, data } => {
            let Some(cache) = cache.upgrade() else { return };
            let Some((library, runs)) = library::tables(&cache, &data, group) else { return };
            let weak = Arc::downgrade(&cache);
            let tables = runs.into_iter().map(|(first, last)| Job::Spans { cache: weak.clone(), first, last, group });
            let relocated = Job::Relocated { cache: weak.clone(), data, library: Box::new(library) };
            push_front(workers, tables.chain([relocated]));
        }
        Job::Relocated { cache, data, library } => {
            let Some(cache) = cache.upgrade() else { return };
            let runs = library::relocated_runs(&cache, &data, &library);
            if !runs.is_empty() {
                push_front(workers, [Job::Wanted { cache: Arc::downgrade(&cache), runs }]);
            }
        }
        Job::Wanted { cache, mut runs } => {
            let Some(layer) = cache.upgrade() else { return };
            let Some((first, last)) = runs.pop_front() else { return };
            if !runs.is_empty() {
                // The rest to the next free worker: the runs are fetched in parallel.
                push_front(workers, [Job::Wanted { cache, runs }]);
            }
            let cache = layer;
            prefetched(&cache, first, last, cache.fetch_wanted(first, last, group));
        }
    }
}

/// Counts the spans a prefetch of `first..=last` fetched, or says why it failed.
fn prefetched(cache: &SpanCache, first: u32, last: u32, result: Result<u32, crate::spans::SpanError>) {
    match result {
        Ok(0) => {}
        Ok(n) => {
            cache.metrics().prefetched_spans.inc_by(u64::from(n));
            tracing::trace!(layer = %cache.layer(), first, last, spans = n, "prefetched");
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
        let policy = PrefetchPolicy {
            threads: 2,
            neighbour_spans: 1,
            neighbours_after_misses: 0,
            file_spans: 0,
            group_spans: 8,
            library_tables: true,
        };
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
    fn neighbours_are_guessed_only_once_the_layer_has_missed_often_enough() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(40, Duration::from_millis(5));
        let policy = PrefetchPolicy {
            threads: 2,
            neighbour_spans: 1,
            neighbours_after_misses: 3,
            file_spans: 0,
            group_spans: 8,
            library_tables: true,
        };
        let c = cache(&index, &blob, dir.path(), Some(policy));
        for span in [10, 20] {
            let (a, b) = span_range(&index, span);
            c.read_hinted(a, b, 0, None).expect("read");
        }
        std::thread::sleep(Duration::from_millis(200));
        let guessed = [9, 11, 19, 21].iter().filter(|i| c.is_cached(**i)).count();
        assert_eq!(guessed, 0, "neighbours guessed after two misses");
        assert_eq!(blob.requests.load(Ordering::SeqCst), 2);
        // The third miss opens the guessing.
        let (a, b) = span_range(&index, 30);
        c.read_hinted(a, b, 0, None).expect("read");
        assert!(wait_until(|| c.is_cached(29) && c.is_cached(31)), "the third miss's neighbours were not fetched");
    }

    #[test]
    fn a_small_layer_is_fetched_whole_at_its_first_miss() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(12, Duration::from_millis(5));
        assert!(index.compressed_size() <= SMALL_LAYER_BYTES && index.span_count() > 4);
        let policy = PrefetchPolicy {
            threads: 1,
            neighbour_spans: 1,
            neighbours_after_misses: 0,
            file_spans: 0,
            group_spans: 2,
            library_tables: true,
        };
        let c = cache(&index, &blob, dir.path(), Some(policy));
        let (a, b) = span_range(&index, 0);
        c.read_hinted(a, b, 0, None).expect("read");
        assert!(wait_until(|| (0..index.span_count()).all(|i| c.is_cached(i))), "the small layer was not completed");
        assert_eq!(blob.requests.load(Ordering::SeqCst), 2, "one request for the miss, one for the rest");
    }

    #[test]
    fn in_a_large_file_the_window_ramps_up_with_right_guesses_and_drops_at_a_miss() {
        let r = LargeFileReads::default();
        let file = (0, 10_000);
        assert_eq!(ahead(&r, 100, 100, file, Hint::Miss, (32, 32)), Some((101, 102)));
        let ramp: Vec<_> = (0..5).map(|n| ahead(&r, 101 + n, 101 + n, file, Hint::GuessedRight, (32, 32))).collect();
        assert_eq!(ramp, [Some((102, 105)), Some((103, 110)), Some((104, 119)), Some((105, 136)), Some((106, 137))]);
        assert_eq!(
            ahead(&r, 5000, 5000, file, Hint::Miss, (32, 32)),
            Some((5001, 5002)),
            "a miss elsewhere starts small again"
        );
        assert_eq!(ahead(&r, 10_000, 10_000, file, Hint::Miss, (32, 32)), None, "nothing past the file");
        let one = LargeFileReads::default();
        assert_eq!(ahead(&one, 7, 7, file, Hint::GuessedRight, (1, 1)), Some((8, 8)), "never past file_spans");
    }

    /// The hints of a library's destructors at exit run from the top of its code down:
    /// misses just below each other. The window turns downwards and ramps up; a miss far away, or
    /// one above, is a reader going up again.
    #[test]
    fn a_reader_going_down_a_large_file_is_followed_downwards() {
        let r = LargeFileReads::default();
        let file = (1000, 2000);
        assert_eq!(ahead(&r, 1553, 1553, file, Hint::Miss, (8, 32)), Some((1554, 1555)), "one miss says nothing yet");
        assert_eq!(
            ahead(&r, 1552, 1552, file, Hint::Miss, (8, 32)),
            Some((1548, 1551)),
            "a miss just below turns it down"
        );
        assert_eq!(ahead(&r, 1551, 1551, file, Hint::GuessedRight, (8, 32)), Some((1543, 1550)));
        assert_eq!(
            ahead(&r, 1549, 1549, file, Hint::GuessedRight, (8, 32)),
            Some((1533, 1548)),
            "a page skipped is still going down; going down, the window widens past 8"
        );
        assert_eq!(
            ahead(&r, 1003, 1003, file, Hint::GuessedRight, (8, 32)),
            Some((1004, 1011)),
            "a jump is not a step down"
        );
        assert_eq!(
            ahead(&r, 1002, 1002, file, Hint::Miss, (8, 32)),
            Some((1000, 1001)),
            "never below the file's first span"
        );
        assert_eq!(ahead(&r, 1000, 1000, file, Hint::Miss, (8, 32)), None);
        assert_eq!(
            ahead(&r, 1500, 1500, file, Hint::Miss, (8, 32)),
            Some((1501, 1502)),
            "a miss above goes up, small again"
        );
        assert_eq!(
            ahead(&r, 1480, 1480, file, Hint::Miss, (8, 32)),
            Some((1481, 1482)),
            "far below is not a step down"
        );
    }

    /// A container reading a large file from its end to its start, span by span: the reader
    /// fetched every span itself before (one round trip each); now most are fetched ahead.
    #[test]
    fn a_reader_going_down_a_large_file_finds_most_spans_fetched_ahead() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(40, Duration::from_millis(20));
        let policy = PrefetchPolicy {
            threads: 2,
            neighbour_spans: 0,
            neighbours_after_misses: 0,
            file_spans: 16,
            group_spans: 8,
            library_tables: false,
        };
        let c = cache(&index, &blob, dir.path(), Some(policy));
        let file = || Some(0..index.span(index.span_count() - 1).expect("span").uncomp_end);
        for i in (10..=35).rev() {
            let (a, b) = span_range(&index, i);
            c.read_hinted(a, b, 0, file()).expect("read");
        }
        let misses = c.metrics().span_misses.get();
        assert!(misses <= 8, "the reader fetched {misses} of 26 spans itself");
    }

    #[test]
    fn a_scattered_reader_of_a_large_file_is_sent_a_small_window_a_sequential_one_a_wide_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(40, Duration::from_millis(5));
        let policy = PrefetchPolicy {
            threads: 1,
            neighbour_spans: 0,
            neighbours_after_misses: 0,
            file_spans: 16,
            group_spans: 64,
            library_tables: true,
        };
        let c = cache(&index, &blob, dir.path(), Some(policy));
        // The whole layer as one large file (40 spans > 16).
        let file = || Some(0..index.span(index.span_count() - 1).expect("span").uncomp_end);
        let (a, b) = span_range(&index, 5);
        c.read_hinted(a, b, 0, file()).expect("read");
        assert!(wait_until(|| c.is_cached(6) && c.is_cached(7)), "the first window was not fetched");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!c.is_cached(8), "a miss in a large file fetched more than {LARGE_FILE_FIRST_SPANS} spans ahead");
        // Reading on uses the guesses: the window doubles each time.
        let (a, b) = span_range(&index, 6);
        c.read_hinted(a, b, 0, file()).expect("read");
        assert!(wait_until(|| (7..=10).all(|i| c.is_cached(i))), "a right guess did not widen the window to 4");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!c.is_cached(11));
    }
}
