//! The indexer on arbitrary blobs (plain tar, gzip, zstd): errors are fine, panics are not.
#![no_main]

use clip_index::{BuildOptions, build_index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = BuildOptions { span_size: 64 << 10, ..BuildOptions::default() };
    if let Ok(idx) = build_index(data, &opts) {
        // An index we built must validate and survive its own encoding.
        assert!(idx.validate().is_ok());
        assert!(clip_index::Index::open(idx.bytes().to_vec()).is_ok());
    }
});
