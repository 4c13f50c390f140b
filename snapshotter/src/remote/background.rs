//! The background fetcher: completes mounted layers one span at a time, at low priority. It
//! waits `background_start_delay_ms` after a layer is mounted, and pauses while any container
//! read is waiting for a fetch, so it never competes with a starting container for the link.

use super::RemoteLayers;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Runs until the manager is dropped. One thread per daemon.
pub(super) fn run(manager: &Weak<RemoteLayers>, start_delay: Duration) {
    loop {
        let Some(m) = manager.upgrade() else { return };
        if m.foreground.load(Ordering::Relaxed) > 0 {
            drop(m);
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        // The next missing span of the longest-mounted layer that is old enough.
        let candidate = {
            let mounts = m.mounts.lock();
            let mut layers: Vec<_> = mounts
                .values()
                .filter(|l| l.since.elapsed() >= start_delay && !l.complete.load(Ordering::Relaxed))
                .map(|l| (l.since, l.spans.clone(), l.complete.clone()))
                .collect();
            layers.sort_by_key(|(at, _, _)| *at);
            layers.into_iter().next()
        };
        drop(m);
        let Some((_, spans, complete)) = candidate else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        match (0..spans.index().span_count()).find(|i| !spans.is_cached(*i)) {
            None => {
                complete.store(true, Ordering::Relaxed);
                tracing::info!(layer = %spans.index().layer_digest(), "layer complete locally");
            }
            Some(i) => {
                let started = Instant::now();
                if let Err(e) = spans.prefetch(i) {
                    tracing::warn!(layer = %spans.index().layer_digest(), span = i, error = %e, "background fetch failed; retrying later");
                    std::thread::sleep(Duration::from_secs(2));
                } else {
                    // Stay gentle: leave the link idle about as long as the fetch took.
                    std::thread::sleep(started.elapsed().min(Duration::from_millis(200)));
                }
            }
        }
    }
}
