//! A layer blob (or an index's windows blob) in a registry as the read path's
//! [`RangeFetcher`]: Range GETs through the image's current session (its credentials as they
//! are now, see [`super::sessions`]), bounded in time.

use super::sessions::Session;
use clip_index::{IndexError, RangeFetcher};

/// A blob of an image, read with Range GETs on `runtime` from the read path's threads.
#[derive(Debug)]
pub struct RegistryBlob {
    pub session: Session,
    pub digest: String,
    pub runtime: tokio::runtime::Handle,
    /// Bound on one fetch with all its retries: a FUSE read never waits longer.
    pub timeout: std::time::Duration,
}

impl RangeFetcher for RegistryBlob {
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
        let failed = |message: String| IndexError::Fetch { offset, len, message };
        let failed_with =
            |source: Box<dyn std::error::Error + Send + Sync>| IndexError::FetchFailed { offset, len, source };
        let repo = self.session.repository().map_err(|e| failed_with(e.into()))?;
        let fetch = repo.get_blob_range(&self.digest, offset, offset + len);
        // The timer must be made inside the runtime.
        match self.runtime.block_on(async { tokio::time::timeout(self.timeout, fetch).await }) {
            Ok(result) => result.map(|b| b.to_vec()).map_err(|e| failed_with(e.into())),
            Err(_) => Err(failed(format!("no answer within {:?} (with retries)", self.timeout))),
        }
    }

    /// One Range GET whose body goes to `sink` as it arrives; `timeout` bounds the wait for
    /// the answer and for each piece of the body (a stalled stream fails, a slow one goes on).
    fn fetch_streaming(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), IndexError>,
    ) -> Result<(), IndexError> {
        let failed = |message: String| IndexError::Fetch { offset, len, message };
        let stalled = || failed(format!("no data within {:?}", self.timeout));
        let failed_with =
            |source: Box<dyn std::error::Error + Send + Sync>| IndexError::FetchFailed { offset, len, source };
        let repo = self.session.repository().map_err(|e| failed_with(e.into()))?;
        self.runtime.block_on(async {
            let answer = repo.blob_range_response(&self.digest, offset, offset + len);
            let (mut resp, whole) = tokio::time::timeout(self.timeout, answer)
                .await
                .map_err(|_| stalled())?
                .map_err(|e| failed_with(e.into()))?;
            // A registry that ignored Range sends the blob from its start: read past what comes
            // before the range only that far.
            if whole && offset + len > clip_registry::api::MAX_RANGE_IGNORED_READ {
                return Err(failed(format!(
                    "the registry ignores Range requests; this span lies beyond the first {} bytes of the blob",
                    clip_registry::api::MAX_RANGE_IGNORED_READ
                )));
            }
            let mut skip = if whole { offset } else { 0 };
            let mut left = len;
            while left > 0 {
                let chunk = tokio::time::timeout(self.timeout, resp.chunk())
                    .await
                    .map_err(|_| stalled())?
                    .map_err(|e| failed_with(e.into()))?
                    .ok_or_else(|| failed(format!("the answer ended {left} bytes short")))?;
                let mut piece = &chunk[..];
                let skipped = skip.min(piece.len() as u64);
                piece = &piece[skipped as usize..];
                skip -= skipped;
                let take = left.min(piece.len() as u64) as usize;
                if take > 0 {
                    sink(&piece[..take])?;
                    left -= take as u64;
                }
            }
            Ok(())
        })
    }
}
