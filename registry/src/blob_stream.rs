//! A whole blob streamed as it arrives, checked against its descriptor on the way, and resumed
//! where it broke off: for layers too large to hold (the snapshotter's unpack of a layer no
//! index serves; the pull client's fallback writes them into containerd's content store).

use crate::client::{Repository, error_text};
use crate::content::DigestCheck;
use crate::error::{RegistryError, Result};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use std::time::Duration;

/// How many times one blob's download is resumed after its connection broke or stalled.
pub const BLOB_RESUMES: u32 = 4;

impl Repository {
    /// Blob `digest`, whose descriptor says it has `size` bytes, as its chunks arrive, checked on
    /// the way: a byte past `size` is an error as soon as it comes, and the stream's last item is
    /// an error unless it had exactly `size` bytes of the digest's content. So a consumer holds
    /// one chunk at a time and must not keep what it wrote until the stream ended without an
    /// error. A body that breaks off (a transport error, or no piece for `stall`) is resumed
    /// from the byte it reached with a ranged request, up to [`BLOB_RESUMES`] times, so a
    /// dropped connection costs the rest of the blob, not all of it again; a body the registry
    /// ends short of `size` is an error, not resumed.
    pub async fn blob_stream(
        &self,
        digest: &str,
        size: u64,
        stall: Duration,
    ) -> Result<impl futures::Stream<Item = Result<Bytes>> + Send + '_> {
        let check = DigestCheck::new(digest)?;
        let resp = self.blob_response(digest).await?;
        if !resp.status().is_success() {
            return Err(self.bad(&format!("blob {digest}"), format!("unexpected status {}", resp.status())));
        }
        let body = BlobBody {
            repo: self,
            digest: digest.to_string(),
            size,
            stall,
            body: Some(resp.bytes_stream().boxed()),
            skip: 0,
            check: Some(check),
            seen: 0,
            resumes: 0,
        };
        Ok(futures::stream::unfold(body, |mut body| async move {
            let item = body.next().await?;
            Some((item, body))
        }))
    }
}

/// The state of one blob's download.
struct BlobBody<'a> {
    repo: &'a Repository,
    digest: String,
    size: u64,
    stall: Duration,
    /// The current response's body; none between a break and its resumption.
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    /// Bytes of the current body already seen (a resumption the registry answered whole).
    skip: u64,
    /// None once the stream ended (with its last item).
    check: Option<DigestCheck>,
    seen: u64,
    resumes: u32,
}

impl BlobBody<'_> {
    /// The next chunk; an error ends the stream; `None` after its end.
    async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            self.check.as_ref()?;
            let Some(body) = self.body.as_mut() else {
                if let Err(e) = self.resume().await {
                    return Some(self.end(e));
                }
                continue;
            };
            // A broken body's error: the transport's, or none for a stall.
            let piece = match tokio::time::timeout(self.stall, body.next()).await {
                Ok(piece) => piece.map(|p| p.map_err(Some)),
                Err(_) => Some(Err(None)),
            };
            match piece {
                Some(Ok(mut chunk)) => {
                    if self.skip > 0 {
                        let skipped = self.skip.min(chunk.len() as u64);
                        self.skip -= skipped;
                        let _ = chunk.split_to(skipped as usize);
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    self.seen += chunk.len() as u64;
                    if self.seen > self.size {
                        let e = self.bad(format!("more than the {} bytes its descriptor says", self.size));
                        return Some(self.end(e));
                    }
                    self.check.as_mut()?.update(&chunk);
                    return Some(Ok(chunk));
                }
                Some(Err(_)) if self.seen == self.size => {
                    // Broke off after its last byte: nothing to resume.
                    self.body = Some(futures::stream::empty().boxed());
                }
                Some(Err(broke)) => {
                    let message = match broke {
                        Some(e) => error_text(&e),
                        None => format!("no data for {} s", self.stall.as_secs()),
                    };
                    if self.resumes >= BLOB_RESUMES {
                        return Some(self.end(RegistryError::Transport {
                            registry: self.repo.image.registry.clone(),
                            context: format!(
                                "reading blob {} (at byte {} of {}, after {} resumptions)",
                                self.digest, self.seen, self.size, self.resumes
                            ),
                            message,
                        }));
                    }
                    tracing::info!(digest = %self.digest, at = self.seen, size = self.size, %message, "a blob's download broke off; resuming it from there");
                    tokio::time::sleep(crate::client::backoff(self.repo.client_retry().base_delay, self.resumes)).await;
                    self.resumes += 1;
                    self.body = None;
                }
                None if self.seen != self.size => {
                    return Some(self.end(self.bad(format!("{} bytes, its descriptor says {}", self.seen, self.size))));
                }
                None => {
                    let check = self.check.take()?;
                    return check.finish().err().map(Err);
                }
            }
        }
    }

    /// Asks for the rest of the blob, from the byte reached.
    async fn resume(&mut self) -> Result<()> {
        let (resp, whole) = self.repo.blob_rest_response(&self.digest, self.seen, self.size).await?;
        // A registry that ignores Range sends all of it again: what was seen is skipped.
        self.skip = if whole { self.seen } else { 0 };
        self.body = Some(resp.bytes_stream().boxed());
        Ok(())
    }

    /// Ends the stream with `e` as its last item.
    fn end(&mut self, e: RegistryError) -> Result<Bytes> {
        self.check = None;
        Err(e)
    }

    fn bad(&self, message: String) -> RegistryError {
        self.repo.bad(&format!("blob {}", self.digest), message)
    }
}
