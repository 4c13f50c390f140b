//! Verifying a layer once it is wholly local: its span files, read in order, are the layer's
//! uncompressed tar stream as the index decoded it. That stream must hash to the layer's diff ID
//! (the image config's word, which is what containerd's chain IDs are made of), and the tree
//! derived from it must be the tree the index described (names, owners, modes, data offsets...).
//! Either difference means the index (or the bytes it decoded) lied: the caller poisons the
//! layer. Nothing is fetched; the work is one pass over local files.

use crate::spans::SpanCache;
use clip_index::{BuildOptions, IndexError};
use std::io::Read;

/// What the layer's own bytes say of its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The stream hashes to the diff ID (when one was given) and has the index's tree.
    Same,
    /// It does not: why.
    Differs(String),
    /// The check could not be made (a span file vanished meanwhile: evicted); try again when
    /// the layer is complete again.
    Unverifiable(String),
}

/// The span files of a cache, one after the other, as one stream.
struct LocalStream<'a> {
    cache: &'a SpanCache,
    next: u32,
    file: Option<std::fs::File>,
    /// A span file was missing.
    missing: Option<u32>,
}

impl Read for LocalStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(f) = &mut self.file {
                let n = f.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                self.file = None;
            }
            if self.next >= self.cache.index().span_count() {
                return Ok(0);
            }
            let path = self.cache.span_path(self.next);
            match std::fs::File::open(&path) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    self.missing = Some(self.next);
                    return Err(e);
                }
            }
            self.next += 1;
        }
    }
}

/// Checks a complete layer's local stream against `diff_id` (if known) and its index's tree.
pub fn verify_local(cache: &SpanCache, diff_id: Option<&str>) -> Verdict {
    let mut stream = LocalStream { cache, next: 0, file: None, missing: None };
    let opts = BuildOptions {
        span_size: 16 << 20,
        expected_diff_id: diff_id.map(ToString::to_string),
        ..BuildOptions::default()
    };
    let derived = clip_index::build_index(&mut stream, &opts);
    if let Some(span) = stream.missing {
        return Verdict::Unverifiable(format!("span {span} is no longer local"));
    }
    let derived = match derived {
        Ok(d) => d,
        Err(e @ (IndexError::DiffId { .. } | IndexError::Tar(_) | IndexError::Compressed(_))) => {
            return Verdict::Differs(e.to_string());
        }
        Err(e) => return Verdict::Differs(format!("the layer's own bytes do not index: {e}")),
    };
    match cache.index().tree_difference(&derived) {
        Ok(None) => Verdict::Same,
        Ok(Some(d)) => Verdict::Differs(d),
        Err(e) => Verdict::Differs(e.to_string()),
    }
}
