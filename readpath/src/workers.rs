//! A queue of jobs and the threads that take them, shared by the prefetcher and the profile
//! replayer: each job fetches for a layer's span cache, which background completion yields to
//! while it runs.

use parking_lot::{Condvar, Mutex};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The order jobs are taken in.
pub(crate) trait JobQueue: Send + 'static {
    type Job: Send + 'static;
    fn take(&mut self) -> Option<Self::Job>;
}

/// First in, first out (the prefetcher pushes its newest hints to the front).
impl<J: Send + 'static> JobQueue for VecDeque<J> {
    type Job = J;
    fn take(&mut self) -> Option<J> {
        self.pop_front()
    }
}

/// Greatest first.
impl<J: Ord + Send + 'static> JobQueue for BinaryHeap<J> {
    type Job = J;
    fn take(&mut self) -> Option<J> {
        self.pop()
    }
}

/// The queue and its threads; they end once [`Self::stop`] is called.
pub(crate) struct Workers<Q> {
    queue: Mutex<Q>,
    ready: Condvar,
    stop: AtomicBool,
}

impl<Q: JobQueue> Workers<Q> {
    /// Starts `threads` threads named `name-N` that run `run` on each job (given the workers,
    /// to queue the jobs a job finds).
    pub(crate) fn start(
        name: &str,
        threads: usize,
        queue: Q,
        run: impl Fn(&Self, Q::Job) + Send + Sync + 'static,
    ) -> Arc<Self> {
        let workers = Arc::new(Self { queue: Mutex::new(queue), ready: Condvar::new(), stop: AtomicBool::new(false) });
        let run = Arc::new(run);
        for n in 0..threads {
            let (workers, run) = (workers.clone(), run.clone());
            let spawned = std::thread::Builder::new().name(format!("{name}-{n}")).spawn(move || {
                while let Some(job) = workers.next() {
                    run(&workers, job);
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a {name} thread");
            }
        }
        workers
    }

    fn next(&self) -> Option<Q::Job> {
        let mut queue = self.queue.lock();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(job) = queue.take() {
                return Some(job);
            }
            self.ready.wait(&mut queue);
        }
    }

    /// Changes the queue (adds jobs) and wakes the threads.
    pub(crate) fn push(&self, f: impl FnOnce(&mut Q)) {
        f(&mut self.queue.lock());
        self.ready.notify_all();
    }

    /// Ends the threads (after their current job).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.ready.notify_all();
    }
}
