//! The containers' demand on the link, shared by every layer of a daemon: the fetches a start
//! waits for or soon will — a container read that missed, the prefetcher's guesses after a miss,
//! a profile replay. Background completion ([`crate::complete`]) follows it: it streams only
//! while demand has been quiet for a while, and a request it makes stops at the next span as
//! soon as demand begins — unless reads are using what it streams (it is ahead of a reader).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Demand fetches in flight and when the last one ended.
#[derive(Debug)]
pub struct Demand {
    fetching: AtomicU32,
    /// Milliseconds after `epoch` when the last demand fetch ended (0: none yet).
    last_end_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Demand {
    fn default() -> Self {
        Self { fetching: AtomicU32::new(0), last_end_ms: AtomicU64::new(0), epoch: Instant::now() }
    }
}

/// One demand fetch, counted until dropped.
#[derive(Debug)]
pub struct DemandFetch<'a>(&'a Demand);

impl Drop for DemandFetch<'_> {
    fn drop(&mut self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        self.0.last_end_ms.fetch_max(now.max(1), Ordering::Relaxed);
        self.0.fetching.fetch_sub(1, Ordering::Release);
    }
}

impl Demand {
    /// Counts a demand fetch until the guard is dropped.
    pub fn begin(&self) -> DemandFetch<'_> {
        self.fetching.fetch_add(1, Ordering::Acquire);
        DemandFetch(self)
    }

    /// Whether a demand fetch is in flight.
    pub fn fetching(&self) -> bool {
        self.fetching.load(Ordering::Acquire) > 0
    }

    /// How long the link has been free of demand: zero while a demand fetch is in flight, the
    /// time since this tracker was made when there was none yet.
    pub fn quiet_for(&self) -> Duration {
        if self.fetching() {
            return Duration::ZERO;
        }
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_only_after_every_fetch_ended() {
        let d = Demand::default();
        std::thread::sleep(Duration::from_millis(20));
        assert!(d.quiet_for() >= Duration::from_millis(20));
        let a = d.begin();
        let b = d.begin();
        assert!(d.fetching());
        assert_eq!(d.quiet_for(), Duration::ZERO);
        drop(a);
        assert_eq!(d.quiet_for(), Duration::ZERO, "one fetch is still in flight");
        drop(b);
        assert!(!d.fetching());
        assert!(d.quiet_for() < Duration::from_millis(15), "quiet is counted from the last end");
        std::thread::sleep(Duration::from_millis(30));
        assert!(d.quiet_for() >= Duration::from_millis(30));
    }
}
