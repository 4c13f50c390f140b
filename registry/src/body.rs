//! Reading response bodies with a bound: every body a registry, a mirror or a token realm sends
//! is read piece by piece and refused as soon as it passes its limit, whatever its
//! `Content-Length` says (a chunked body has none), so a hostile answer costs at most the
//! limit in memory and never the whole stream.

use bytes::{Bytes, BytesMut};

/// Largest token-realm answer read (a JSON object with a token of a few KiB).
pub(crate) const MAX_TOKEN_BODY: usize = 64 << 10;
/// Bytes of an error answer kept for the error message (the rest is never read).
pub(crate) const MAX_ERROR_BODY: usize = 4 << 10;

/// Why a bounded read failed.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The body passed `limit` bytes (declared or sent).
    TooLarge { limit: usize },
    /// The connection failed mid-body.
    Transport(reqwest::Error),
}

/// The whole body, or [`BodyError::TooLarge`] as soon as more than `limit` bytes are declared
/// or have arrived.
pub(crate) async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut out = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// At most the first `limit` bytes of the body, as lossy text (for error messages); the rest
/// is never read, and a failed read gives what had arrived.
pub(crate) async fn read_prefix(mut resp: reqwest::Response, limit: usize) -> String {
    let mut out = Vec::new();
    while out.len() < limit {
        match resp.chunk().await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk[..chunk.len().min(limit - out.len())]),
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bytes `start..end` of a body that is a whole blob (a registry that ignored `Range`): what
/// comes before `start` is read and dropped, what comes after `end` is never read. `None`
/// when the body ends before `end`.
pub(crate) async fn read_slice(mut resp: reqwest::Response, start: u64, end: u64) -> Result<Option<Bytes>, BodyError> {
    let mut out = BytesMut::with_capacity((end - start) as usize);
    let mut at = 0u64;
    while at < end {
        let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? else {
            return Ok(None);
        };
        let (from, to) = (at, at + chunk.len() as u64);
        if to > start {
            let a = start.saturating_sub(from) as usize;
            let b = (end.min(to) - from) as usize;
            out.extend_from_slice(&chunk[a..b]);
        }
        at = to;
    }
    Ok(Some(out.freeze()))
}
