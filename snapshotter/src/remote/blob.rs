//! A layer blob (or an index's windows blob) in a registry as the read path's
//! [`RangeFetcher`]: Range GETs through the image's credential chain, bounded in time.

use clip_index::{IndexError, RangeFetcher};
use std::sync::Arc;

/// A blob of `repo`, read with Range GETs on `runtime` from the read path's threads.
#[derive(Debug)]
pub struct RegistryBlob {
    pub repo: Arc<clip_registry::Repository>,
    pub digest: String,
    pub runtime: tokio::runtime::Handle,
    /// Bound on one fetch with all its retries: a FUSE read never waits longer.
    pub timeout: std::time::Duration,
}

impl RangeFetcher for RegistryBlob {
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
        let fetch = self.repo.get_blob_range(&self.digest, offset, offset + len);
        let failed = |message: String| IndexError::Fetch { offset, len, message };
        // The timer must be made inside the runtime.
        match self.runtime.block_on(async { tokio::time::timeout(self.timeout, fetch).await }) {
            Ok(result) => result.map(|b| b.to_vec()).map_err(|e| failed(e.to_string())),
            Err(_) => Err(failed(format!("no answer within {:?} (with retries)", self.timeout))),
        }
    }
}
