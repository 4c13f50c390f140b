//! Access profiles on the read path (the format is [`clip_index::profile`]): a [`Recorder`]
//! notes which spans of which layers a container start reads, in order, from its first read
//! until reads go quiet; a [`Replayer`] makes a recorded profile's spans local on a cold node
//! before the container asks for them: per layer, the profile's spans merged into few large
//! requests ([`plan_runs`]), fetched on a few threads in the order the profile first read them,
//! beside the container's own reads (which wait for a span in flight rather than fetch it
//! again). A wrong or stale profile costs bandwidth, never correctness: replayed spans are
//! verified like any other.

use crate::spans::{Cause, SpanCache};
use crate::workers::Workers;
use parking_lot::Mutex;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Where a recording is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// No read yet.
    Waiting,
    /// Reads are coming in.
    Running,
    /// Reads went quiet, or the time limit passed: the profile is complete.
    Done,
}

#[derive(Default)]
struct Recorded {
    seen: HashMap<Arc<str>, HashSet<u32>>,
    reads: Vec<(Arc<str>, u32)>,
    first: Option<Instant>,
    last_new: Option<Instant>,
}

/// Records the spans one image's container start reads, each once, in first-read order.
#[derive(Default)]
pub struct Recorder {
    state: Mutex<Recorded>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recorder({} reads)", self.state.lock().reads.len())
    }
}

impl Recorder {
    /// Notes a read of `spans` of `layer`.
    pub fn note(&self, layer: &Arc<str>, spans: RangeInclusive<u32>) {
        let now = Instant::now();
        let mut st = self.state.lock();
        st.first.get_or_insert(now);
        if st.reads.len() >= clip_index::profile::MAX_PROFILE_READS {
            return;
        }
        let seen = st.seen.entry(layer.clone()).or_default();
        let new: Vec<u32> = spans.filter(|i| seen.insert(*i)).collect();
        if !new.is_empty() {
            st.reads.extend(new.into_iter().map(|i| (layer.clone(), i)));
            st.last_new = Some(now);
        }
    }

    /// Where the recording is at `now`: done once no new span was read for `quiet`, or
    /// `limit` after the first read.
    pub fn status(&self, now: Instant, quiet: Duration, limit: Duration) -> Recording {
        let st = self.state.lock();
        let Some(first) = st.first else { return Recording::Waiting };
        let last = st.last_new.unwrap_or(first);
        if now.duration_since(last) >= quiet || now.duration_since(first) >= limit {
            Recording::Done
        } else {
            Recording::Running
        }
    }

    /// The reads so far, first read first, and how long after the first read the last new one
    /// came.
    pub fn reads(&self) -> (Vec<(Arc<str>, u32)>, Duration) {
        let st = self.state.lock();
        let span = match (st.first, st.last_new) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        };
        (st.reads.clone(), span)
    }
}

/// A recorder listens to the reads of the layers it is given to (`clip-builder profile`).
impl crate::spans::ReadObserver for Recorder {
    fn read(&self, layer: &Arc<str>, spans: RangeInclusive<u32>) {
        self.note(layer, spans);
    }
}

/// A run of spans fetched in one request; `rank` is the earliest place in the profile of a
/// span it holds (runs are fetched lowest rank first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u32,
    pub last: u32,
    pub rank: u32,
}

/// Merges one layer's profiled reads (`(rank, span)`) into runs: neighbouring spans, and spans
/// at most `gap` apart (the gap is fetched too: a round trip costs more than a span), up to
/// `max_bytes` compressed per run (`span_bytes` gives a span's size; `None` drops a span the
/// layer does not have). Ordered by rank.
pub fn plan_runs(reads: &[(u32, u32)], gap: u32, max_bytes: u64, span_bytes: impl Fn(u32) -> Option<u64>) -> Vec<Run> {
    let mut rank_of: HashMap<u32, u32> = HashMap::new();
    for &(rank, span) in reads {
        if span_bytes(span).is_none() {
            continue;
        }
        let r = rank_of.entry(span).or_insert(rank);
        *r = (*r).min(rank);
    }
    let mut by_span: Vec<(u32, u32)> = rank_of.into_iter().collect();
    by_span.sort_unstable();
    let mut runs: Vec<Run> = Vec::new();
    let mut bytes = 0u64;
    for (span, rank) in by_span {
        let size = span_bytes(span).unwrap_or(0);
        if let Some(run) = runs.last_mut() {
            let between: u64 = (run.last + 1..span).map(|i| span_bytes(i).unwrap_or(0)).sum();
            if span - run.last <= gap + 1 && bytes + between + size <= max_bytes {
                run.last = span;
                run.rank = run.rank.min(rank);
                bytes += between + size;
                continue;
            }
        }
        runs.push(Run { first: span, last: span, rank });
        bytes = size;
    }
    runs.sort_by_key(|r| (r.rank, r.first));
    runs
}

/// How profiles are replayed.
#[derive(Debug, Clone, Copy)]
pub struct ReplayPolicy {
    /// Parallel requests; 0 turns replay off.
    pub threads: usize,
    /// Spans between two profiled ones fetched with them rather than in another request.
    pub gap_spans: u32,
    /// Compressed bytes per request at most.
    pub request_bytes: u64,
}

struct Job {
    rank: u32,
    seq: u64,
    cache: Weak<SpanCache>,
    run: Run,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        (self.rank, self.seq) == (other.rank, other.seq)
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    /// The heap pops the greatest: the lowest rank, then the oldest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.rank, other.seq).cmp(&(self.rank, self.seq))
    }
}

/// The daemon's profile replayer: a queue of runs, lowest rank first, and the threads that
/// fetch them.
pub struct Replayer {
    policy: ReplayPolicy,
    workers: Arc<Workers<BinaryHeap<Job>>>,
    /// Order of queuing, among runs of the same rank.
    seq: AtomicU64,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replayer({:?})", self.policy)
    }
}

impl Replayer {
    /// Starts the threads; `None` when the policy turns replay off.
    pub fn start(policy: ReplayPolicy) -> Option<Self> {
        if policy.threads == 0 {
            return None;
        }
        let workers = Workers::start("clip-profile", policy.threads, BinaryHeap::new(), |_, job| work(&job));
        Some(Self { policy, workers, seq: AtomicU64::new(0) })
    }

    /// Queues the replay of `reads` (`(rank, span)`, from [`clip_index::profile::AccessProfile::reads_of`])
    /// of `cache`'s layer. Returns the requests planned and how many reads named a span the
    /// layer does not have (a profile of another build of the image: they are skipped).
    pub fn replay(&self, cache: &Arc<SpanCache>, reads: &[(u32, u32)]) -> (usize, usize) {
        let index = cache.index();
        let span_bytes = |i: u32| index.span(i).ok().map(|s| s.comp_end - s.comp_start);
        let foreign = reads.iter().filter(|(_, s)| *s >= index.span_count()).count();
        let runs = plan_runs(reads, self.policy.gap_spans, self.policy.request_bytes, span_bytes);
        let planned = runs.len();
        let weak = Arc::downgrade(cache);
        self.workers.push(|queue| {
            for run in runs {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                queue.push(Job { rank: run.rank, seq, cache: weak.clone(), run });
            }
        });
        (planned, foreign)
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        self.workers.stop();
    }
}

fn work(job: &Job) {
    let Some(cache) = job.cache.upgrade() else { return };
    match cache.fetch_missing(job.run.first, job.run.last, u32::MAX, Cause::Profile) {
        Ok(n) => {
            tracing::trace!(layer = %cache.layer(), first = job.run.first, last = job.run.last, spans = n, "profile spans fetched");
        }
        Err(e) => {
            tracing::debug!(layer = %cache.layer(), error = %e, "profile replay fetch failed (a read will fetch again)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{layer, span_range, wait_until};

    /// A replay fetches the profile's spans in a few merged requests, counted as profile
    /// bytes; the container's reads of them are hits, a read elsewhere a miss.
    #[test]
    fn a_replay_makes_the_profiled_spans_local_in_few_requests() {
        let dir = tempfile::tempdir().expect("tmp");
        let (index, blob) = layer(40, Duration::from_millis(5));
        let cache = Arc::new(SpanCache::new(index.clone(), dir.path().to_path_buf(), blob.clone()).expect("cache"));
        let replayer =
            Replayer::start(ReplayPolicy { threads: 2, gap_spans: 1, request_bytes: 8 << 20 }).expect("replayer");
        // Spans 3-6 and 8 (one request: the gap of 7 is filled), then 20 (another); 500 is
        // not in this layer.
        let reads = [(0, 20), (1, 3), (2, 4), (3, 5), (4, 6), (5, 8), (6, 500)];
        assert_eq!(replayer.replay(&cache, &reads), (2, 1));
        let profiled = [3, 4, 5, 6, 7, 8, 20];
        assert!(wait_until(|| profiled.iter().all(|i| cache.is_cached(*i))), "the profile was not replayed");
        assert_eq!(blob.requests.load(Ordering::SeqCst), 2);
        assert!(!cache.is_cached(9) && !cache.is_cached(2));
        assert!(cache.metrics().profile_bytes.get() > 0);
        let (a, b) = span_range(&index, 4);
        cache.read(a, b).expect("read");
        let (a, b) = span_range(&index, 30);
        cache.read(a, b).expect("read");
        assert_eq!(cache.metrics().profile_hits.get(), 1);
        assert_eq!(cache.metrics().profile_misses.get(), 1);
    }

    #[test]
    fn runs_merge_neighbours_and_small_gaps_in_rank_order() {
        // Spans of 100 bytes; 9 and 20 are read first, then 10-12 and 14, then 30.
        let reads = [(0, 20), (1, 9), (2, 10), (3, 11), (4, 12), (5, 14), (6, 30), (7, 10)];
        let runs = plan_runs(&reads, 1, 1000, |i| (i < 40).then_some(100));
        assert_eq!(
            runs,
            vec![
                Run { first: 20, last: 20, rank: 0 },
                Run { first: 9, last: 14, rank: 1 },
                Run { first: 30, last: 30, rank: 6 },
            ]
        );
        // A byte limit splits a run; spans the layer lacks are dropped.
        let runs = plan_runs(&[(0, 1), (1, 2), (2, 3), (3, 99)], 0, 200, |i| (i < 40).then_some(100));
        assert_eq!(runs, vec![Run { first: 1, last: 2, rank: 0 }, Run { first: 3, last: 3, rank: 2 }]);
    }

    #[test]
    fn a_recording_ends_when_reads_go_quiet_or_at_the_limit() {
        let r = Recorder::default();
        let (t, quiet, limit) = (Instant::now(), Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(r.status(t, quiet, limit), Recording::Waiting);
        let (a, b): (Arc<str>, Arc<str>) = ("sha256:a".into(), "sha256:b".into());
        r.note(&a, 3..=4);
        r.note(&b, 0..=0);
        r.note(&a, 4..=5);
        assert_eq!(r.status(Instant::now(), quiet, limit), Recording::Running);
        let (reads, _) = r.reads();
        let reads: Vec<(&str, u32)> = reads.iter().map(|(l, s)| (&**l, *s)).collect();
        assert_eq!(reads, vec![("sha256:a", 3), ("sha256:a", 4), ("sha256:b", 0), ("sha256:a", 5)]);
        assert_eq!(r.status(Instant::now() + quiet, quiet, limit), Recording::Done);
        assert_eq!(r.status(Instant::now() + limit, Duration::from_secs(60), limit), Recording::Done);
    }
}
