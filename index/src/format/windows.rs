//! The zran windows of gzip checkpoints: inline in the index (version 1) or split off into a
//! separate blob with a digest per window (version 2), and reading one back.

use super::codes::{FLAG_EXTERNAL_WINDOWS, HEADER_LEN, VERSION_EXTERNAL_WINDOWS, sha256};
use super::header::Header;
use super::view::{Index, SpanInfo};
use crate::IndexError;
use crate::error::format_err;

impl Index {
    /// Checks an externally fetched window of span `s` against its digest and decompresses it.
    pub fn external_window(&self, s: &SpanInfo, zstd_window: &[u8]) -> Result<Vec<u8>, IndexError> {
        let table = self.external_windows.ok_or_else(|| format_err("this index holds its windows itself"))?;
        let at = table + s.index as usize * 32;
        if sha256(zstd_window)[..] != self.bytes[at..at + 32] || zstd_window.len() != s.window.1 as usize {
            return Err(IndexError::Compressed(format!("span {}: window does not match its digest", s.index)));
        }
        zstd::bulk::decompress(zstd_window, crate::inflate::WINDOW_SIZE)
            .map_err(|e| format_err(format!("span {}: bad window: {e}", s.index)))
    }

    /// Whether the index holds windows of its own (a version-1 gzip index) that
    /// [`split_windows`](Self::split_windows) would split off.
    pub fn has_windows(&self) -> bool {
        self.external_windows.is_none() && self.windows.1 > 0
    }

    /// Splits an index into a small one without windows (version 2, with a digest per window)
    /// and the windows blob it refers to, so that a reader fetches only the windows of the
    /// spans it reads. `None` when there are no windows to split off.
    pub fn split_windows(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>, IndexError> {
        let Some(digests) = self.window_digests()? else { return Ok(None) };
        let (wo, wl) = self.windows;
        let prefix = self.bytes[..self.strings.0 + self.strings.1].to_vec();
        Ok(Some((without_windows(prefix, self.strings.1, &digests)?, self.bytes[wo..wo + wl].to_vec())))
    }

    /// The sha256 of each checkpoint's window in the windows section (`None` when the index has
    /// no windows of its own).
    fn window_digests(&self) -> Result<Option<Vec<u8>>, IndexError> {
        if !self.has_windows() {
            return Ok(None);
        }
        let (wo, wl) = self.windows;
        let spans = (0..self.checkpoint_count).map(|i| self.span(i).map(|s| s.window));
        digest_windows(&self.bytes[wo..wo + wl], spans).map(Some)
    }

    /// The (uncompressed) history window of a block checkpoint.
    pub(crate) fn window(&self, s: &SpanInfo) -> Result<Vec<u8>, IndexError> {
        let (off, len) = s.window;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.external_windows.is_some() {
            return Err(format_err(format!("span {}: the window is in the separate windows blob", s.index)));
        }
        let (wo, wl) = self.windows;
        let end = off.checked_add(u64::from(len)).filter(|e| *e <= wl as u64);
        let end = end.ok_or_else(|| format_err(format!("span {}: window outside the index", s.index)))?;
        let z = &self.bytes[wo + off as usize..wo + end as usize];
        let w = zstd::bulk::decompress(z, crate::inflate::WINDOW_SIZE)
            .map_err(|e| format_err(format!("span {}: bad window: {e}", s.index)))?;
        Ok(w)
    }
}

/// The sha256 of each checkpoint's window, in order, from the windows section and each
/// checkpoint's (offset, length) in it: a version-2 index's window table.
pub(super) fn digest_windows(
    windows: &[u8],
    spans: impl ExactSizeIterator<Item = Result<(u64, u32), IndexError>>,
) -> Result<Vec<u8>, IndexError> {
    let mut digests = Vec::with_capacity(spans.len() * 32);
    for (i, span) in spans.enumerate() {
        let (off, len) = span?;
        let z = windows
            .get(off as usize..off as usize + len as usize)
            .ok_or_else(|| format_err(format!("span {i}: window outside the index")))?;
        digests.extend_from_slice(&sha256(z));
    }
    Ok(digests)
}

/// A version-2 index from a version-1 index's bytes up to the end of its strings (`prefix`,
/// whose string table is `strings_len` long) and its window digests: sections up to the strings
/// unchanged, the digests after the strings inside the string table, the windows section empty.
pub(super) fn without_windows(mut out: Vec<u8>, strings_len: usize, digests: &[u8]) -> Result<Vec<u8>, IndexError> {
    let so = out.len() - strings_len;
    out.reserve_exact(digests.len() + super::codes::TRAILER_LEN);
    out.extend_from_slice(digests);
    let mut header = Header::decode(&out)?;
    header.version = VERSION_EXTERNAL_WINDOWS;
    header.flags = FLAG_EXTERNAL_WINDOWS;
    header.window_table = u32::try_from(strings_len).map_err(|_| format_err("strings too large"))?;
    header.sections.strings_len = (strings_len + digests.len()) as u64;
    header.sections.windows_off = (so as u64) + header.sections.strings_len;
    header.sections.windows_len = 0;
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    let checksum = sha256(&out);
    out.extend_from_slice(&checksum);
    Ok(out)
}
