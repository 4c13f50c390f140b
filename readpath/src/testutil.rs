//! Helpers of the unit tests: a layer in memory behind a slow, counting fetcher.

use clip_index::{IndexError, RangeFetcher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// An uncompressed layer blob in memory that counts requests and answers slowly.
pub(crate) struct SlowBlob {
    pub(crate) bytes: Vec<u8>,
    pub(crate) requests: AtomicU32,
    pub(crate) delay: Duration,
}

impl RangeFetcher for SlowBlob {
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.bytes.get(offset as usize..(offset + len) as usize).map(<[u8]>::to_vec).ok_or_else(|| IndexError::Fetch {
            offset,
            len,
            message: "out of range".into(),
        })
    }
}

/// A tar of `files` files of 64 KiB each, indexed with 64 KiB spans.
pub(crate) fn layer(files: usize, delay: Duration) -> (Arc<clip_index::Index>, Arc<SlowBlob>) {
    let files: Vec<(String, Vec<u8>)> =
        (0..files).map(|n| (format!("f{n:03}"), vec![(n % 251) as u8; 64 << 10])).collect();
    layer_of(&files, delay)
}

/// A tar of these files, indexed with 64 KiB spans.
pub(crate) fn layer_of(files: &[(String, Vec<u8>)], delay: Duration) -> (Arc<clip_index::Index>, Arc<SlowBlob>) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).expect("append");
    }
    let bytes = b.into_inner().expect("tar");
    let opts = clip_index::build::BuildOptions { span_size: 64 << 10, ..Default::default() };
    let index = clip_index::build::build_index(bytes.as_slice(), &opts).expect("index");
    (Arc::new(index), Arc::new(SlowBlob { bytes, requests: AtomicU32::new(0), delay }))
}

/// Waits (up to 10 s) for `f` to hold.
pub(crate) fn wait_until(f: impl Fn() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Uncompressed offsets of span `i`.
pub(crate) fn span_range(index: &clip_index::Index, i: u32) -> (u64, u64) {
    let s = index.span(i).expect("span");
    (s.uncomp_start, s.uncomp_end)
}
