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

    /// Splits an index into a small one without windows (version 2, with a digest per window)
    /// and the windows blob it refers to, so that a reader fetches only the windows of the
    /// spans it reads. `None` when there are no windows to split off.
    pub fn split_windows(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>, IndexError> {
        let (wo, wl) = self.windows;
        if self.external_windows.is_some() || wl == 0 {
            return Ok(None);
        }
        let windows = self.bytes[wo..wo + wl].to_vec();
        let (so, sl) = self.strings;
        let mut digests = Vec::with_capacity(self.checkpoint_count as usize * 32);
        for i in 0..self.checkpoint_count {
            let s = self.span(i)?;
            let (off, len) = s.window;
            let z = windows
                .get(off as usize..off as usize + len as usize)
                .ok_or_else(|| format_err(format!("span {i}: window outside the index")))?;
            digests.extend_from_slice(&sha256(z));
        }
        // Sections up to the strings are unchanged; the digests follow the strings inside the
        // string table; the windows section becomes empty.
        let mut out = self.bytes[..so + sl].to_vec();
        out.extend_from_slice(&digests);
        let mut header = Header::decode(&out)?;
        header.version = VERSION_EXTERNAL_WINDOWS;
        header.flags = FLAG_EXTERNAL_WINDOWS;
        header.window_table = u32::try_from(sl).map_err(|_| format_err("strings too large"))?;
        header.sections.strings_len = (sl + digests.len()) as u64;
        header.sections.windows_off = (so as u64) + header.sections.strings_len;
        header.sections.windows_len = 0;
        out[..HEADER_LEN].copy_from_slice(&header.encode());
        let checksum = sha256(&out);
        out.extend_from_slice(&checksum);
        Ok(Some((out, windows)))
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
