//! A whole blob streamed as it arrives, checked against its descriptor on the way: for layers
//! too large to hold (the pull client's fallback writes them into containerd's content store).

use crate::client::{Repository, error_text};
use crate::content::DigestCheck;
use crate::error::{RegistryError, Result};
use bytes::Bytes;
use futures::StreamExt;

impl Repository {
    /// Blob `digest`, whose descriptor says it has `size` bytes, as its chunks arrive, checked on
    /// the way: a byte past `size` is an error as soon as it comes, and the stream's last item is
    /// an error unless it had exactly `size` bytes of the digest's content. So a consumer holds
    /// one chunk at a time and must not keep what it wrote until the stream ended without an
    /// error. Not retried once the body has begun.
    pub async fn blob_stream(
        &self,
        digest: &str,
        size: u64,
    ) -> Result<impl futures::Stream<Item = Result<Bytes>> + Send + use<>> {
        let check = DigestCheck::new(digest)?;
        let resp = self.blob_response(digest).await?;
        if !resp.status().is_success() {
            return Err(self.bad(&format!("blob {digest}"), format!("unexpected status {}", resp.status())));
        }
        let (registry, what) = (self.image.registry.clone(), format!("blob {digest}"));
        let state = (resp.bytes_stream().boxed(), Some(check), 0u64);
        Ok(futures::stream::unfold(state, move |(mut body, check, seen)| {
            let (registry, what) = (registry.clone(), what.clone());
            async move {
                let mut check = check?;
                let bad = |message: String| RegistryError::BadResponse {
                    registry: registry.clone(),
                    what: what.clone(),
                    message,
                };
                match body.next().await {
                    Some(Ok(chunk)) => {
                        let seen = seen + chunk.len() as u64;
                        if seen > size {
                            return Some((
                                Err(bad(format!("more than the {size} bytes its descriptor says"))),
                                (body, None, seen),
                            ));
                        }
                        check.update(&chunk);
                        Some((Ok(chunk), (body, Some(check), seen)))
                    }
                    Some(Err(e)) => Some((
                        Err(RegistryError::Transport {
                            registry,
                            context: format!("reading {what}"),
                            message: error_text(&e),
                        }),
                        (body, None, seen),
                    )),
                    None if seen != size => {
                        Some((Err(bad(format!("{seen} bytes, its descriptor says {size}"))), (body, None, seen)))
                    }
                    None => check.finish().err().map(|e| (Err(e), (body, None, seen))),
                }
            }
        }))
    }
}
