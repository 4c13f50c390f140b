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

/// A 64-bit shared library of two segments: the first (file and address 0, 16 KiB) holds its
/// headers, dynamic section (at 0x1000) and tables; the second, `data_len` bytes at file offset
/// 0x4000 and address 0x14000, begins with one page of RELRO. `rela` are the targets of its
/// RELA relocations (at 0x2000, at most 170), `relr` the words of its RELR table (at 0x3000).
pub(crate) fn elf_library(data_len: u64, rela: &[u64], relr: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; 0x4000 + data_len as usize];
    let put = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b[..6].copy_from_slice(b"\x7fELF\x02\x01");
    b[16] = 3; // ET_DYN
    put(&mut b, 0x20, 64); // e_phoff
    b[0x36] = 56; // e_phentsize
    b[0x38] = 4; // e_phnum
    let ph = |b: &mut Vec<u8>, n: usize, kind: u32, offset: u64, vaddr: u64, filesz: u64| {
        let at = 64 + n * 56;
        b[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        put(b, at + 8, offset);
        put(b, at + 16, vaddr);
        put(b, at + 32, filesz);
    };
    ph(&mut b, 0, 1, 0, 0, 0x4000); // PT_LOAD
    ph(&mut b, 1, 1, 0x4000, 0x14000, data_len); // PT_LOAD
    ph(&mut b, 2, 2, 0x1000, 0x1000, 0x80); // PT_DYNAMIC
    ph(&mut b, 3, 0x6474_e552, 0x4000, 0x14000, 0x1000); // PT_GNU_RELRO
    // DT_STRTAB, DT_STRSZ, DT_RELA, DT_RELASZ, DT_RELR, DT_RELRSZ.
    let tags =
        [(5, 0x3f00), (10, 16), (7, 0x2000), (8, 24 * rela.len() as u64), (36, 0x3000), (35, 8 * relr.len() as u64)];
    for (n, (k, v)) in tags.into_iter().enumerate() {
        put(&mut b, 0x1000 + n * 16, k);
        put(&mut b, 0x1000 + n * 16 + 8, v);
    }
    for (n, target) in rela.iter().enumerate() {
        put(&mut b, 0x2000 + n * 24, *target);
    }
    for (n, word) in relr.iter().enumerate() {
        put(&mut b, 0x3000 + n * 8, *word);
    }
    b
}
