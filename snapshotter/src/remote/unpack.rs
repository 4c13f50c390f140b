//! Layers no index serves, downloaded and unpacked here in Prepare ([`clip_unpack`]) instead of
//! by containerd: the blob streams from the registry with the image's session and is inflated
//! and untarred as it arrives — no copy in containerd's content store, no second pass over it,
//! the unpack overlapped with the download. The download is resumed where it broke off and
//! checked against the layer's digest and size as it ends ([`Repository::blob_stream`]), the
//! unpacked stream against the diff ID the image config names; the caller discards the
//! directory on any error and falls back to containerd. SOCI's parallel pull mode is the peer.

use super::RemoteLayers;
use super::error::RemoteError;
use bytes::{Buf, Bytes};
use clip_config::labels::RemoteRequest;
use clip_registry::Repository;
use clip_registry::image::ImageLayer;
use clip_unpack::Unpacked;
use futures::StreamExt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Chunks of the body queued between the download and the unpack.
const QUEUE: usize = 32;

/// Layer media types unpacked here; others (encrypted, foreign, unknown) are left to containerd.
const UNPACKABLE: [&str; 4] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

/// A layer to unpack: what its image says of it, and its repository.
#[derive(Debug)]
pub struct UnpackSource {
    repo: Arc<Repository>,
    pub layer: ImageLayer,
}

impl RemoteLayers {
    /// Whether a layer that cannot be served lazily for this reason is unpacked here: when
    /// unpacking is on and the reason is the image's index (none, unusable, untrusted, or the
    /// layer found unlike it), not the registry.
    pub fn unpacks(&self, why: &RemoteError) -> bool {
        self.unpack_without_index
            && matches!(
                why,
                RemoteError::NoIndex { .. }
                    | RemoteError::NotInArtifact { .. }
                    | RemoteError::Untrusted { .. }
                    | RemoteError::Poisoned { .. }
                    | RemoteError::Artifact { .. }
                    | RemoteError::ForeignIndex { .. }
                    | RemoteError::MissingWindows { .. }
                    | RemoteError::Index { .. }
                    | RemoteError::WrongLayer { .. }
            )
    }

    /// What the image says of the requested layer, if it is one unpacked here. Blocking.
    pub fn unpack_source(&self, req: &RemoteRequest) -> Result<UnpackSource, RemoteError> {
        let repo = self.sessions.repository(&req.image_ref)?;
        let reference = req.manifest_digest.as_deref().unwrap_or(repo.image.manifest_reference());
        let layer = self
            .runtime
            .block_on(repo.image_layer(reference, &req.layer_digest))
            .map_err(|e| RemoteError::NotUnpackable { layer: req.layer_digest.clone(), reason: e.to_string() })?;
        if !UNPACKABLE.contains(&layer.media_type.as_str()) {
            return Err(RemoteError::NotUnpackable {
                layer: req.layer_digest.clone(),
                reason: format!("media type {} is left to containerd", layer.media_type),
            });
        }
        Ok(UnpackSource { repo, layer })
    }

    /// Downloads the layer and unpacks it into the empty directory `root` (`parents`: the
    /// directories of the layers below, nearest first). Blocking; on error `root` holds a
    /// partial tree for the caller to delete.
    pub fn unpack(&self, source: &UnpackSource, root: &Path, parents: &[PathBuf]) -> Result<Unpacked, RemoteError> {
        let layer = &source.layer;
        let download = Download::start(&self.runtime, source.repo.clone(), layer, self.read.fetch_timeout);
        let limits = clip_unpack::Limits { min_free: self.unpack_min_free };
        let unpacked = clip_unpack::unpack_layer(download, root, parents, Some(&layer.diff_id), limits);
        self.metrics.unpacked(unpacked.is_ok(), layer.size);
        unpacked.map_err(|e| RemoteError::Unpack { layer: layer.digest.clone(), source: e })
    }
}

/// The layer's body as a blocking reader, fed by a download task on the runtime; its last read
/// is the download's error unless the body was exactly the layer's size and digest.
struct Download {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    chunk: Bytes,
    task: tokio::task::JoinHandle<()>,
}

impl Download {
    /// `stall`: longest wait for the next piece of the body (then it is resumed, a few times).
    fn start(runtime: &tokio::runtime::Handle, repo: Arc<Repository>, layer: &ImageLayer, stall: Duration) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let (digest, size) = (layer.digest.clone(), layer.size);
        let task = runtime.spawn(async move {
            let mut body = match repo.blob_stream(&digest, size, stall).await {
                Ok(body) => Box::pin(body),
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            };
            while let Some(item) = body.next().await {
                let item = item.map_err(|e| e.to_string());
                let last = item.is_err();
                // The receiver is gone when the unpack failed: stop downloading.
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Self { rx, chunk: Bytes::new(), task }
    }
}

/// A download failure, passed through the inflater and tar as an I/O error.
#[derive(Debug)]
struct DownloadError(String);

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "downloading the layer: {}", self.0)
    }
}

impl std::error::Error for DownloadError {}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(std::io::Error::other(DownloadError(e))),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        self.task.abort();
    }
}
