//! Random access through an index: which spans hold a range, and decoding a span after checking
//! its digest. A mismatch is an error, never wrong bytes.

use crate::IndexError;
use crate::build::sha256;
use crate::format::{CheckpointKind, Compression, Entry, EntryKind, Index, SpanInfo};
use crate::inflate::{GZIP, Inflater, RAW, WINDOW_SIZE};

/// The most history a span can need: deflate's window ([`Index::history_len`] is at most this).
pub const HISTORY_BYTES: usize = WINDOW_SIZE;

/// Reads byte ranges of the layer blob (a local file, an HTTP Range request, a cache...): the
/// one blob-fetching trait of clip; the snapshotter's read path fetches spans through it too.
pub trait RangeFetcher: Send + Sync {
    /// Returns exactly `len` bytes at `offset` of the blob, or an error.
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError>;

    /// Hands the `len` bytes at `offset` to `sink` in order, in pieces as they arrive (a
    /// streaming body), so that the caller can work on the first while the rest travel; an
    /// error from `sink` stops the transfer and is returned. By default one [`Self::fetch`].
    fn fetch_streaming(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), IndexError>,
    ) -> Result<(), IndexError> {
        sink(&self.fetch(offset, len)?)
    }
}

/// A local blob file as a fetcher.
#[derive(Debug)]
pub struct FileFetcher(pub std::fs::File);

impl RangeFetcher for FileFetcher {
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
        use std::os::unix::fs::FileExt;
        let len_usize = usize::try_from(len).map_err(|_| IndexError::Invalid("range too large".into()))?;
        let mut buf = vec![0u8; len_usize];
        self.0.read_exact_at(&mut buf, offset).map_err(|e| IndexError::FetchFailed {
            offset,
            len,
            source: Box::new(e),
        })?;
        Ok(buf)
    }
}

impl Index {
    /// The spans covering uncompressed bytes `[off, off + len)`.
    pub fn spans_for(&self, off: u64, len: u64) -> Result<std::ops::RangeInclusive<u32>, IndexError> {
        let first = self.span_at(off)?;
        let last = self.span_at(off.saturating_add(len.max(1)) - 1)?;
        Ok(first..=last)
    }

    /// Verifies `compressed` (the bytes `[comp_start, comp_end)` of span `s`) against the span's
    /// digest.
    pub fn verify_span(&self, s: &SpanInfo, compressed: &[u8]) -> Result<(), IndexError> {
        let actual = sha256(compressed);
        if actual != s.digest || compressed.len() as u64 != s.comp_end - s.comp_start {
            return Err(IndexError::SpanDigest {
                span: s.index,
                expected: hex::encode(s.digest),
                actual: hex::encode(actual),
            });
        }
        Ok(())
    }

    /// Decodes span `s` from its verified compressed bytes, returning its uncompressed bytes
    /// `[s.uncomp_start, min(s.uncomp_end, upto))`.
    pub fn decode_span(&self, s: &SpanInfo, compressed: &[u8], upto: Option<u64>) -> Result<Vec<u8>, IndexError> {
        self.decode_span_with(s, compressed, upto, None)
    }

    /// [`Index::decode_span`] for an index with external windows: `window` is the span's
    /// zstd-compressed window as fetched from the windows blob (verified here).
    pub fn decode_span_with(
        &self,
        s: &SpanInfo,
        compressed: &[u8],
        upto: Option<u64>,
        window: Option<&[u8]>,
    ) -> Result<Vec<u8>, IndexError> {
        self.verify_span(s, compressed)?;
        let history = match (self.compression(), window, self.window_location(s)) {
            (Compression::Gzip, Some(z), Some(_)) => self.external_window(s, z)?,
            (Compression::Gzip, None, _) => self.window(s)?,
            _ => Vec::new(),
        };
        self.decode_verified(s, compressed, upto, &history)
    }

    /// How many bytes of the uncompressed data just before span `s` stand for its history
    /// window (0: `s` starts where no history is needed — a gzip member, a zstd frame, plain tar).
    pub fn history_len(&self, s: &SpanInfo) -> usize {
        if self.compression() == Compression::Gzip && s.kind == CheckpointKind::Block {
            usize::try_from(s.uncomp_start).unwrap_or(usize::MAX).min(WINDOW_SIZE)
        } else {
            0
        }
    }

    /// [`Index::decode_span`] with the span's history window taken from `preceding`: the
    /// uncompressed bytes that end where `s` starts (what the previous spans inflated to; at
    /// least [`Index::history_len`] of them). A reader that has the span before `s` needs no
    /// window from the index or the windows blob. The compressed bytes are verified as always,
    /// but the history is trusted as given: pass only bytes of spans that were verified (a wrong
    /// history inflates to wrong bytes).
    pub fn decode_span_after(
        &self,
        s: &SpanInfo,
        compressed: &[u8],
        upto: Option<u64>,
        preceding: &[u8],
    ) -> Result<Vec<u8>, IndexError> {
        self.verify_span(s, compressed)?;
        let need = self.history_len(s);
        if preceding.len() < need {
            return Err(IndexError::Invalid(format!(
                "span {}: {} bytes of history given, {need} needed",
                s.index,
                preceding.len()
            )));
        }
        self.decode_verified(s, compressed, upto, &preceding[preceding.len() - need..])
    }

    /// Decodes verified span bytes with `history` as the gzip window.
    fn decode_verified(
        &self,
        s: &SpanInfo,
        compressed: &[u8],
        upto: Option<u64>,
        history: &[u8],
    ) -> Result<Vec<u8>, IndexError> {
        let end = upto.map_or(s.uncomp_end, |u| u.clamp(s.uncomp_start, s.uncomp_end));
        let want = usize::try_from(end - s.uncomp_start).map_err(|_| IndexError::Invalid("span too large".into()))?;
        let out = match self.compression() {
            Compression::None => compressed[..want.min(compressed.len())].to_vec(),
            Compression::Zstd => decode_zstd(compressed, want)?,
            Compression::Gzip => Self::decode_gzip(s, compressed, want, history)?,
        };
        if out.len() != want {
            return Err(IndexError::Compressed(format!(
                "span {} inflated to {} bytes, expected {want}",
                s.index,
                out.len()
            )));
        }
        Ok(out)
    }

    fn decode_gzip(s: &SpanInfo, compressed: &[u8], want: usize, window: &[u8]) -> Result<Vec<u8>, IndexError> {
        let mut input = compressed;
        let mut inf = if s.kind == CheckpointKind::Block {
            let mut inf = Inflater::new(RAW)?;
            if s.bits > 0 {
                let (first, rest) = input.split_first().ok_or_else(|| IndexError::Compressed("empty span".into()))?;
                inf.prime(i32::from(s.bits), i32::from(*first >> (8 - s.bits)))?;
                input = rest;
            }
            inf.set_dictionary(window)?;
            inf
        } else {
            Inflater::new(GZIP)?
        };
        let mut raw = s.kind == CheckpointKind::Block;
        let mut out = vec![0u8; want];
        let mut produced = 0;
        while produced < want {
            let step = inf.inflate(input, &mut out[produced..], libz_rs_sys::Z_NO_FLUSH)?;
            input = &input[step.consumed..];
            produced += step.produced;
            if step.stream_end {
                if raw {
                    // A raw stream stops before the member's 8-byte trailer.
                    input = input.get(8..).unwrap_or_default();
                    raw = false;
                }
                if input.first() != Some(&0x1f) {
                    break;
                }
                inf.reset(GZIP)?;
            } else if step.consumed == 0 && step.produced == 0 {
                break;
            }
        }
        out.truncate(produced);
        Ok(out)
    }

    /// Reads `len` bytes at `offset` of a regular file (or hardlink) through `fetcher`: fetches
    /// the spans that hold them, verifies and decodes them, returns exactly the bytes asked for
    /// (fewer at the end of the file).
    pub fn read(
        &self,
        fetcher: &dyn RangeFetcher,
        entry: &Entry<'_>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, IndexError> {
        let e = self.resolve_hardlink(entry.clone())?;
        if e.kind != EntryKind::File {
            return Err(IndexError::Invalid(format!("entry {} is a {}, not a file", entry.id, e.kind.name())));
        }
        if offset >= e.size || len == 0 {
            return Ok(Vec::new());
        }
        let len = len.min(e.size - offset);
        let start = e.data_offset + offset;
        let end = start + len;
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        for i in self.spans_for(start, len)? {
            let s = self.span(i)?;
            let compressed = fetcher.fetch(s.comp_start, s.comp_end - s.comp_start)?;
            let data = self.decode_span(&s, &compressed, Some(end))?;
            let from = start.max(s.uncomp_start) - s.uncomp_start;
            let to = (end.min(s.uncomp_end) - s.uncomp_start).min(data.len() as u64);
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        Ok(out)
    }
}

fn decode_zstd(compressed: &[u8], want: usize) -> Result<Vec<u8>, IndexError> {
    use zstd::stream::raw::{Decoder, Operation};
    let mut dec = Decoder::new()?;
    let mut out = vec![0u8; want];
    let mut produced = 0;
    let mut input = compressed;
    while produced < want && !input.is_empty() {
        let st = dec
            .run_on_buffers(input, &mut out[produced..])
            .map_err(|e| IndexError::Compressed(format!("corrupt zstd span: {e}")))?;
        input = &input[st.bytes_read..];
        produced += st.bytes_written;
        if st.bytes_read == 0 && st.bytes_written == 0 {
            break;
        }
    }
    out.truncate(produced);
    Ok(out)
}
