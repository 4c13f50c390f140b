//! The index parser on arbitrary bytes: opening, validating and querying must never panic.
#![no_main]

use clip_index::{Index, IndexError, RangeFetcher};
use libfuzzer_sys::fuzz_target;

struct Zeros;
impl RangeFetcher for Zeros {
    fn fetch(&self, _offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
        Ok(vec![0; len.min(1 << 20) as usize])
    }
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes are almost always rejected by the checksum; also try them resealed so the
    // fuzzer reaches the structural checks.
    for bytes in [data.to_vec(), reseal(data)] {
        let Ok(idx) = Index::open_any(bytes) else { continue };
        let _ = idx.validate();
        let _ = idx.lookup("a/b");
        for id in 0..idx.entry_count().min(64) {
            if let Ok(e) = idx.entry(id) {
                let _ = idx.xattrs(&e);
                let _ = idx.path(id);
                let _ = idx.read(&Zeros, &e, 0, 4096);
            }
        }
    }
});

fn reseal(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() >= 32 {
        let body = v.len() - 32;
        let sum = clip_index::format::sha256(&v[..body]);
        v[body..].copy_from_slice(&sum);
    }
    v
}
