//! The disk budget of the span caches of all layers: a size limit (`[lazy] cache_max_bytes`)
//! enforced by evicting the least recently used span files, down to 90 % of the limit. A span
//! is only a copy of registry bytes, so an evicted span is fetched again when read; a reader
//! that loses the race retries ([`super::SpanCache`]). Files materialized for FUSE passthrough
//! are counted but never evicted while their layer is mounted (the kernel reads them
//! directly); they go with the layer's caches when its last snapshot is removed.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
struct State {
    used: u64,
    tick: u64,
    /// Evictable span files: last use -> path; path -> (last use, size).
    lru: BTreeMap<u64, PathBuf>,
    spans: HashMap<PathBuf, (u64, u64)>,
    /// Pinned bytes (passthrough copies), by layer directory.
    pinned: HashMap<PathBuf, u64>,
}

/// Shared by every [`super::SpanCache`] of a daemon.
#[derive(Debug, Default)]
pub struct CacheBudget {
    /// 0: unlimited.
    max_bytes: u64,
    state: Mutex<State>,
    pub used_gauge: prometheus_client::metrics::gauge::Gauge,
    pub evictions: prometheus_client::metrics::counter::Counter,
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

impl CacheBudget {
    pub fn new(max_bytes: u64) -> Self {
        Self { max_bytes, ..Self::default() }
    }

    /// Reports usage and evictions into these metrics.
    pub fn with_metrics(
        mut self,
        used: prometheus_client::metrics::gauge::Gauge,
        evictions: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        self.used_gauge = used;
        self.evictions = evictions;
        self
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes in the caches now.
    pub fn used(&self) -> u64 {
        self.state.lock().used
    }

    /// Whether `bytes` more fit below the level evictions bring usage down to (90 % of the
    /// limit) — completion stops short of making the cache evict what it just fetched.
    pub fn fits(&self, bytes: u64) -> bool {
        self.max_bytes == 0 || self.used().saturating_add(bytes) <= self.max_bytes / 10 * 9
    }

    /// Counts what is on disk at start: span files under `spans_root/<layer>/` (oldest
    /// modification first in the LRU order) and materialized files under `files_root`.
    pub fn scan(&self, spans_root: &Path, files_root: &Path) {
        let mut found: Vec<(std::time::SystemTime, PathBuf, u64)> = Vec::new();
        for layer in std::fs::read_dir(spans_root).into_iter().flatten().flatten() {
            for span in std::fs::read_dir(layer.path()).into_iter().flatten().flatten() {
                let Ok(md) = span.metadata() else { continue };
                if md.is_file() && !span.file_name().to_string_lossy().starts_with('.') {
                    found.push((md.modified().unwrap_or(std::time::UNIX_EPOCH), span.path(), md.len()));
                }
            }
        }
        found.sort();
        for (_, path, size) in found {
            self.insert(path, size);
        }
        for layer in std::fs::read_dir(files_root).into_iter().flatten().flatten() {
            let size = dir_size(&layer.path());
            self.pin(&layer.path(), size);
        }
        self.evict_if_needed();
    }

    fn insert(&self, path: PathBuf, size: u64) {
        let mut s = self.state.lock();
        s.tick += 1;
        let tick = s.tick;
        if let Some((old_tick, old_size)) = s.spans.insert(path.clone(), (tick, size)) {
            s.lru.remove(&old_tick);
            s.used = s.used.saturating_sub(old_size);
        }
        s.lru.insert(tick, path);
        s.used += size;
        self.used_gauge.set(i64::try_from(s.used).unwrap_or(i64::MAX));
    }

    /// A span file was written: count it, then evict if over the limit.
    pub fn added(&self, path: &Path, size: u64) {
        self.insert(path.to_path_buf(), size);
        self.evict_if_needed();
    }

    /// A span file was read: it becomes the most recently used.
    pub fn touch(&self, path: &Path) {
        let mut s = self.state.lock();
        s.tick += 1;
        let tick = s.tick;
        if let Some(entry) = s.spans.get_mut(path) {
            let old = std::mem::replace(&mut entry.0, tick);
            s.lru.remove(&old);
            s.lru.insert(tick, path.to_path_buf());
        }
    }

    /// Reserves `bytes` for a passthrough copy in `dir`, unless pinned copies would then take
    /// more than half the limit (the file is then served by FUSE reads from the spans).
    pub fn try_pin(&self, dir: &Path, bytes: u64) -> bool {
        if self.max_bytes > 0 {
            let pinned: u64 = self.state.lock().pinned.values().sum();
            if pinned + bytes > self.max_bytes / 2 {
                return false;
            }
        }
        self.pin(dir, bytes);
        self.evict_if_needed();
        true
    }

    /// Pinned bytes (a passthrough copy) of the layer whose files live in `dir`.
    pub fn pin(&self, dir: &Path, bytes: u64) {
        let mut s = self.state.lock();
        *s.pinned.entry(dir.to_path_buf()).or_default() += bytes;
        s.used += bytes;
        self.used_gauge.set(i64::try_from(s.used).unwrap_or(i64::MAX));
    }

    /// Gives back `bytes` pinned for a passthrough copy in `dir` that was not made.
    pub fn unpin(&self, dir: &Path, bytes: u64) {
        let mut s = self.state.lock();
        if let Some(p) = s.pinned.get_mut(dir) {
            let given = bytes.min(*p);
            *p -= given;
            s.used = s.used.saturating_sub(given);
        }
        self.used_gauge.set(i64::try_from(s.used).unwrap_or(i64::MAX));
    }

    /// A layer's span directory and passthrough directory were deleted.
    pub fn forget_layer(&self, spans_dir: &Path, files_dir: &Path) {
        let mut s = self.state.lock();
        let gone: Vec<PathBuf> = s.spans.keys().filter(|p| p.starts_with(spans_dir)).cloned().collect();
        for p in gone {
            if let Some((tick, size)) = s.spans.remove(&p) {
                s.lru.remove(&tick);
                s.used = s.used.saturating_sub(size);
            }
        }
        if let Some(bytes) = s.pinned.remove(files_dir) {
            s.used = s.used.saturating_sub(bytes);
        }
        self.used_gauge.set(i64::try_from(s.used).unwrap_or(i64::MAX));
    }

    /// Deletes least recently used spans until usage is at most 90 % of the limit.
    fn evict_if_needed(&self) {
        if self.max_bytes == 0 {
            return;
        }
        let target = self.max_bytes / 10 * 9;
        let mut s = self.state.lock();
        if s.used <= self.max_bytes {
            return;
        }
        while s.used > target {
            let Some((_, path)) = s.lru.pop_first() else { break };
            let size = s.spans.remove(&path).map_or_else(|| file_size(&path), |(_, size)| size);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot evict a span"),
            }
            s.used = s.used.saturating_sub(size);
            self.evictions.inc();
        }
        self.used_gauge.set(i64::try_from(s.used).unwrap_or(i64::MAX));
    }
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_given_back_frees_its_room() {
        let dir = tempfile::tempdir().expect("tmp");
        let files = dir.path().join("files/l1");
        let budget = CacheBudget::new(1000);
        assert!(budget.try_pin(&files, 400));
        assert!(!budget.try_pin(&files, 200), "pinned copies are capped at half the limit");
        budget.unpin(&files, 400);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_pin(&files, 500), "the room of a failed copy is free again");
        budget.unpin(&files, 10_000);
        assert_eq!(budget.used(), 0, "never gives back more than was pinned");
    }

    #[test]
    fn evicts_least_recently_used_spans_below_the_limit() {
        let dir = tempfile::tempdir().expect("tmp");
        let layer = dir.path().join("spans/l1");
        std::fs::create_dir_all(&layer).expect("mkdir");
        let budget = CacheBudget::new(1000);
        let mut paths = Vec::new();
        for i in 0..4 {
            let p = layer.join(format!("{i:08}"));
            std::fs::write(&p, vec![0u8; 300]).expect("write");
            paths.push(p);
        }
        budget.added(&paths[0], 300);
        budget.added(&paths[1], 300);
        budget.added(&paths[2], 300);
        budget.touch(&paths[0]); // 1 is now the oldest
        budget.added(&paths[3], 300); // 1200 > 1000: evict down to <= 900
        assert!(!paths[1].exists(), "the least recently used span stays");
        assert!(paths[0].exists() && paths[3].exists());
        assert!(budget.used() <= 900, "{}", budget.used());
        assert!(budget.try_pin(&dir.path().join("files/l1"), 500));
        // 900 + 500 > 1000: spans go until <= 900, the pinned copy stays.
        assert_eq!(budget.used(), 300 + 500);
        assert!(!budget.try_pin(&dir.path().join("files/l1"), 1), "pinned copies are capped at half the limit");
        budget.forget_layer(&layer, &dir.path().join("files/l1"));
        assert_eq!(budget.used(), 0);
        // A fresh budget finds what is on disk.
        let again = CacheBudget::new(0);
        again.scan(&dir.path().join("spans"), &dir.path().join("files"));
        assert_eq!(again.used(), 300);
    }
}
