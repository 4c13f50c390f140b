//! Background completion: once a layer is mounted (and after a delay that leaves the link to
//! the starting container), its missing remainder comes in as large sequential range requests —
//! the request size is `request_bytes`, not the span size — on `streams` threads, one layer per
//! thread at a time, so several layers complete at once. Each request continues where local
//! data ends, so its spans take their history from the spans before them and need no windows
//! (see [`SpanCache::stream_next`]). Container reads come first: they fetch on their own, and
//! while any is waiting only one stream runs. A stream moves to where reads miss: after a miss
//! it goes on just past it, ahead of the reader.

use crate::spans::{SpanCache, Streamed};

/// Told when a layer has become wholly local (the daemon verifies it: [`crate::verify`]).
pub trait CompletionObserver: Send + Sync {
    /// Called on the completion thread that finished `cache`, with no lock held.
    fn completed(&self, cache: &Arc<SpanCache>);
}
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How layers are completed in the background.
#[derive(Debug, Clone, Copy)]
pub struct CompletionPolicy {
    /// Layers completed at once (threads); 0 turns completion off.
    pub streams: usize,
    /// Compressed bytes per range request.
    pub request_bytes: u64,
    /// Time after a layer is mounted before its completion starts.
    pub start_delay: Duration,
}

struct Layer {
    cache: Weak<SpanCache>,
    since: Instant,
    /// Where its stream goes on from.
    next: u32,
    /// The misses seen when the stream last looked (a new one moves the stream).
    misses: u64,
    /// A thread is streaming it now.
    busy: bool,
}

struct Shared {
    policy: CompletionPolicy,
    observer: Option<Arc<dyn CompletionObserver>>,
    layers: Mutex<Vec<Layer>>,
    /// Streams making a request now (while container reads wait, at most one).
    active: Mutex<usize>,
    stop: AtomicBool,
}

/// The daemon's background completion.
pub struct Completer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Completer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Completer({:?})", self.shared.policy)
    }
}

impl Completer {
    /// Starts the stream threads; `None` when the policy turns completion off. `observer` is
    /// told of each layer that becomes complete.
    pub fn start(policy: CompletionPolicy, observer: Option<Arc<dyn CompletionObserver>>) -> Option<Self> {
        if policy.streams == 0 {
            return None;
        }
        let shared = Arc::new(Shared {
            policy,
            observer,
            layers: Mutex::new(Vec::new()),
            active: Mutex::new(0),
            stop: AtomicBool::new(false),
        });
        for n in 0..policy.streams {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("clip-stream-{n}")).spawn(move || work(&shared));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a completion thread");
            }
        }
        Some(Self { shared })
    }

    /// Completes `cache` from now on (until it is complete or dropped).
    pub fn add(&self, cache: &Arc<SpanCache>) {
        self.shared.layers.lock().push(Layer {
            cache: Arc::downgrade(cache),
            since: Instant::now(),
            next: 0,
            misses: 0,
            busy: false,
        });
    }

    /// Layers not complete yet.
    pub fn pending(&self) -> usize {
        self.shared.layers.lock().len()
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Takes the longest-waiting idle layer that is old enough; forgets dropped ones.
fn take(shared: &Shared) -> Option<(Arc<SpanCache>, u32)> {
    let mut layers = shared.layers.lock();
    layers.retain(|l| l.cache.strong_count() > 0);
    let delay = shared.policy.start_delay;
    let layer = layers.iter_mut().filter(|l| !l.busy && l.since.elapsed() >= delay).min_by_key(|l| l.since)?;
    let cache = layer.cache.upgrade()?;
    let misses = cache.metrics().span_misses.get();
    if misses != layer.misses {
        // A read missed since: go on just past it.
        layer.misses = misses;
        layer.next = cache.last_miss().saturating_add(1);
    }
    layer.busy = true;
    Some((cache, layer.next))
}

fn work(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let Some((cache, from)) = take(shared) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        // Container reads first: while one waits, only one stream makes requests.
        loop {
            let mut active = shared.active.lock();
            if *active == 0 || cache.foreground.load(Ordering::Relaxed) == 0 {
                *active += 1;
                break;
            }
            drop(active);
            std::thread::sleep(Duration::from_millis(10));
        }
        let result = cache.stream_next(from, shared.policy.request_bytes);
        *shared.active.lock() -= 1;
        let digest = cache.index().layer_digest();
        let mut layers = shared.layers.lock();
        let Some(layer) = layers.iter_mut().find(|l| l.cache.as_ptr() == Arc::as_ptr(&cache)) else { continue };
        layer.busy = false;
        match result {
            Ok(Streamed::GoOn(next)) => layer.next = next,
            Ok(over) => {
                layers.retain(|l| l.cache.as_ptr() != Arc::as_ptr(&cache));
                drop(layers);
                if over == Streamed::Complete {
                    tracing::info!(layer = %digest, "layer complete locally");
                    if let Some(o) = &shared.observer {
                        o.completed(&cache);
                    }
                } else {
                    tracing::info!(layer = %digest, "the span cache is nearly full: background completion of this layer stops");
                }
            }
            Err(e) => {
                drop(layers);
                tracing::warn!(layer = %digest, error = %e, "background completion failed; retrying later");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}
