//! Which spans of a layer are local and which are being fetched, known in memory: a bitmap of
//! local spans (rebuilt from the span directory's listing when the cache opens) and the spans in
//! flight, each with its own landing that its waiters sleep on until the fetch ends, however it
//! ends. No file-system call is made under the lock.

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// A bitmap of spans, set and read without a lock.
#[derive(Debug)]
pub(crate) struct SpanBits {
    words: Vec<AtomicU64>,
}

impl SpanBits {
    pub(crate) fn new(spans: u32) -> Self {
        Self { words: (0..spans.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    pub(crate) fn get(&self, i: u32) -> bool {
        self.words.get((i / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Sets span `i`; whether it was clear.
    pub(crate) fn set(&self, i: u32) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.fetch_or(1 << (i % 64), Ordering::AcqRel) & (1 << (i % 64)) == 0)
    }

    /// Clears span `i`; whether it was set.
    pub(crate) fn clear(&self, i: u32) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel) & (1 << (i % 64)) != 0)
    }

    pub(crate) fn count(&self) -> u32 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones()).sum()
    }
}

/// Where reads in a layer's large files were and which way they went: the prefetcher's memory
/// between two hints (what it makes of them is [`crate::prefetch`]'s).
#[derive(Debug, Default)]
pub struct LargeFileReads {
    /// Spans fetched ahead: small after a miss, doubled after each right guess.
    pub(crate) window: AtomicU32,
    /// The first span of the latest hint, plus one (0: none yet).
    pub(crate) at: AtomicU32,
    /// The reader goes down the file.
    pub(crate) downward: AtomicBool,
}

/// The end of one span's fetch, which its waiters sleep on.
#[derive(Debug, Default)]
pub(crate) struct Landing {
    landed: Mutex<bool>,
    cv: Condvar,
}

impl Landing {
    fn wait(&self) {
        let mut landed = self.landed.lock();
        self.cv.wait_while(&mut landed, |l| !*l);
    }

    /// Waits for the fetch to end, at most `timeout`; whether it ended.
    pub(crate) fn wait_for(&self, timeout: std::time::Duration) -> bool {
        let mut landed = self.landed.lock();
        self.cv.wait_while_for(&mut landed, |l| !*l, timeout);
        *landed
    }

    fn land(&self) {
        *self.landed.lock() = true;
        self.cv.notify_all();
    }
}

/// The spans of a layer being fetched right now (by a reader, the prefetcher, a profile replay
/// or completion): readers of one wait for that fetch instead of starting their own. All the
/// spans of one fetch share its landing.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    spans: Mutex<HashMap<u32, Arc<Landing>>>,
}

/// Spans claimed for one fetch: released when it ends (however it ends), waking their waiters.
#[derive(Debug)]
pub(crate) struct Claim<'a> {
    inflight: &'a InFlight,
    landing: Arc<Landing>,
    pub(crate) spans: Vec<u32>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut map = self.inflight.spans.lock();
        for i in &self.spans {
            map.remove(i);
        }
        drop(map);
        self.landing.land();
    }
}

/// What [`InFlight::claim_or_wait`] found.
pub(crate) enum Claimed<'a> {
    /// The span was being fetched; that fetch has ended (look again).
    Waited,
    /// This caller fetches it (with the spans after it that [`InFlight::claim_run`] added).
    Mine(Claim<'a>),
}

impl InFlight {
    /// Claims the run of spans from `first` through `last`, at most `max` of them and (after
    /// the first) at most `max_bytes` compressed (`bytes` of each), that are neither `local` nor
    /// in flight; stops at the first that is.
    pub(crate) fn claim_run(
        &self,
        first: u32,
        last: u32,
        max: usize,
        max_bytes: u64,
        local: &SpanBits,
        bytes: impl Fn(u32) -> Option<u64>,
    ) -> Claim<'_> {
        let mut map = self.spans.lock();
        self.claim_locked(&mut map, first, last, max, max_bytes, local, bytes)
    }

    /// [`Self::claim_run`] under the lock the caller holds.
    #[allow(clippy::too_many_arguments)]
    fn claim_locked(
        &self,
        map: &mut HashMap<u32, Arc<Landing>>,
        first: u32,
        last: u32,
        max: usize,
        max_bytes: u64,
        local: &SpanBits,
        bytes: impl Fn(u32) -> Option<u64>,
    ) -> Claim<'_> {
        let landing = Arc::new(Landing::default());
        let mut spans = Vec::new();
        let mut total = 0u64;
        let mut j = first;
        while j <= last
            && spans.len() < max
            && (spans.is_empty() || total < max_bytes)
            && !map.contains_key(&j)
            && !local.get(j)
        {
            let Some(b) = bytes(j) else { break };
            map.insert(j, landing.clone());
            spans.push(j);
            total += b;
            j += 1;
        }
        Claim { inflight: self, landing, spans }
    }

    /// The fetch of span `i` in flight, if any.
    pub(crate) fn fetch_of(&self, i: u32) -> Option<Arc<Landing>> {
        self.spans.lock().get(&i).cloned()
    }

    /// Claims span `first` and the missing run after it through `last` (as [`Self::claim_run`]),
    /// or, when `first` is in flight, waits for that fetch to end.
    pub(crate) fn claim_or_wait(
        &self,
        first: u32,
        last: u32,
        local: &SpanBits,
        bytes: impl Fn(u32) -> Option<u64>,
    ) -> Claimed<'_> {
        let mut map = self.spans.lock();
        if let Some(landing) = map.get(&first).cloned() {
            drop(map);
            landing.wait();
            return Claimed::Waited;
        }
        let claim = self.claim_locked(&mut map, first, last, usize::MAX, u64::MAX, local, bytes);
        // Released before the claim can drop: dropping a claim takes this lock.
        drop(map);
        // Empty only when `first` became local meanwhile: look again.
        if claim.spans.is_empty() { Claimed::Waited } else { Claimed::Mine(claim) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_clear_and_count() {
        let b = SpanBits::new(130);
        assert!(b.set(0) && b.set(64) && b.set(129));
        assert!(!b.set(64), "set twice");
        assert!(b.get(129) && !b.get(128) && !b.get(500));
        assert_eq!(b.count(), 3);
        assert!(b.clear(64) && !b.clear(64));
        assert_eq!(b.count(), 2);
    }

    /// A span that landed between a reader's look and its claim: the empty claim is dropped
    /// after the in-flight map's lock is released (dropping it under the lock deadlocked the
    /// FUSE thread: seen as an `import torch` that never ended).
    #[test]
    fn claiming_a_span_that_became_local_returns_instead_of_deadlocking() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let inflight = InFlight::default();
            let local = SpanBits::new(4);
            local.set(1);
            let waited = matches!(inflight.claim_or_wait(1, 3, &local, |_| Some(1)), Claimed::Waited);
            let _ = tx.send((waited, inflight.spans.lock().is_empty()));
        });
        let (waited, nothing_in_flight) =
            rx.recv_timeout(std::time::Duration::from_secs(10)).expect("claim_or_wait deadlocked");
        assert!(waited && nothing_in_flight);
    }

    #[test]
    fn a_waiter_wakes_when_the_claim_ends_and_claims_stop_at_local_or_claimed_spans() {
        let inflight = Arc::new(InFlight::default());
        let local = SpanBits::new(10);
        local.set(5);
        let claim = inflight.claim_run(2, 9, usize::MAX, u64::MAX, &local, |_| Some(1));
        assert_eq!(claim.spans, vec![2, 3, 4], "stops before the local span 5");
        let again = inflight.claim_run(3, 9, usize::MAX, u64::MAX, &local, |_| Some(1));
        assert!(again.spans.is_empty(), "span 3 is claimed already");
        drop(again);
        let landing = inflight.spans.lock().get(&3).cloned().expect("span 3 in flight");
        let holders = Arc::strong_count(&landing);
        let waiter = {
            let inflight = inflight.clone();
            std::thread::spawn(move || {
                let local = SpanBits::new(10);
                matches!(inflight.claim_or_wait(3, 3, &local, |_| Some(1)), Claimed::Waited)
            })
        };
        // The waiter holds span 3's landing once it sleeps on it.
        while Arc::strong_count(&landing) <= holders {
            std::thread::yield_now();
        }
        drop(claim);
        assert!(waiter.join().expect("waiter"), "the waiter saw the fetch in flight end");
        assert!(inflight.spans.lock().is_empty());
    }
}
