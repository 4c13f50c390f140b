//! Index discovery: finding a layer's CLIP index — the local index store, else the registry
//! (the `clip.index-digest` label, else the referrers of the image manifest). Once an image's
//! index artifact is read, the other layers' indexes are fetched ahead, in parallel, since
//! containerd prepares layers one by one.

use super::error::RemoteError;
use super::layout::CacheLayout;
use clip_config::labels::RemoteRequest;
use clip_index::Index;
use clip_index::artifact::{ARTIFACT_TYPE, BlobKind, IndexArtifact};
use clip_registry::{Platform, Repository};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Largest index blob accepted (a million-file layer is far below this).
const MAX_INDEX_BLOB: usize = 256 << 20;

/// A layer's index and, for an index without windows, the digest of its windows blob.
pub(super) type Found = (Arc<Index>, Option<String>);

/// Opens a stored index (and its windows blob's digest) if present; a corrupt one is deleted
/// and reported as absent.
fn open_local(path: &Path, layer_digest: &str) -> Result<Option<Found>, RemoteError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RemoteError::io(format!("reading {}", path.display()))(e)),
    };
    match Index::open_any(bytes).and_then(|i| i.validate().map(|()| i)) {
        Ok(i) if i.layer_digest() == layer_digest => {
            if !i.has_external_windows() {
                return Ok(Some((Arc::new(i), None)));
            }
            match std::fs::read_to_string(CacheLayout::windows_path(path)) {
                Ok(d) if clip_config::digest::is_digest(d.trim()) => {
                    Ok(Some((Arc::new(i), Some(d.trim().to_string()))))
                }
                _ => {
                    let _ = std::fs::remove_file(path);
                    Ok(None)
                }
            }
        }
        Ok(_) | Err(_) => {
            tracing::warn!(path = %path.display(), "stored index is corrupt or for another layer; fetching it again");
            let _ = std::fs::remove_file(path);
            Ok(None)
        }
    }
}

/// Validates a fetched index blob for `layer` and stores it (with its windows digest) at
/// `path`, atomically.
fn store_index(
    path: &Path,
    layer: &str,
    blob_digest: &str,
    windows_digest: Option<String>,
    bytes: &[u8],
    artifact_digest: &str,
) -> Result<Found, RemoteError> {
    let invalid = |source| RemoteError::Index { blob: blob_digest.to_string(), source };
    let index = Index::open_any(bytes.to_vec()).map_err(invalid)?;
    index.validate().map_err(invalid)?;
    if index.layer_digest() != layer {
        return Err(RemoteError::WrongLayer {
            blob: blob_digest.to_string(),
            expected: layer.to_string(),
            actual: index.layer_digest(),
        });
    }
    if index.has_external_windows() && windows_digest.is_none() {
        return Err(RemoteError::MissingWindows { artifact: artifact_digest.to_string(), layer: layer.to_string() });
    }
    let windows_digest = windows_digest.filter(|_| index.has_external_windows());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(RemoteError::io(format!("creating {}", dir.display())))?;
    }
    if let Some(d) = &windows_digest {
        clip_fsutil::atomic_write(
            &CacheLayout::windows_path(path),
            d.as_bytes(),
            0o644,
            clip_fsutil::Durability::Durable,
        )
        .map_err(RemoteError::io("storing the windows digest"))?;
    }
    clip_fsutil::atomic_write(path, bytes, 0o644, clip_fsutil::Durability::Durable)
        .map_err(RemoteError::io(format!("storing index {}", path.display())))?;
    Ok((Arc::new(index), windows_digest))
}

/// An index fetch under way ahead of its layer's Prepare.
#[derive(Debug, Default)]
struct IndexFetch {
    done: parking_lot::Mutex<bool>,
    cv: parking_lot::Condvar,
}

impl IndexFetch {
    fn finish(&self) {
        *self.done.lock() = true;
        self.cv.notify_all();
    }

    fn wait(&self, limit: std::time::Duration) {
        let mut done = self.done.lock();
        let _ = self.cv.wait_while_for(&mut done, |d| !*d, limit);
    }
}

/// Where layers' indexes are found, with the fetches under way and the artifacts read.
#[derive(Debug)]
pub struct IndexDiscovery {
    layout: CacheLayout,
    runtime: tokio::runtime::Handle,
    /// Bound on waiting for an index fetched ahead.
    wait_limit: std::time::Duration,
    /// Index fetches started ahead of their layers' Prepare, by layer digest.
    fetches: parking_lot::Mutex<HashMap<String, Arc<IndexFetch>>>,
    /// Artifact manifests already read, by digest.
    artifacts: parking_lot::Mutex<HashMap<String, IndexArtifact>>,
}

impl IndexDiscovery {
    pub fn new(layout: CacheLayout, runtime: tokio::runtime::Handle, wait_limit: std::time::Duration) -> Self {
        Self {
            layout,
            runtime,
            wait_limit,
            fetches: parking_lot::Mutex::new(HashMap::new()),
            artifacts: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// The stored index of a layer, if any (a corrupt one is deleted and reported absent).
    pub fn local(&self, layer_digest: &str) -> Result<Option<Found>, RemoteError> {
        open_local(&self.layout.index_path(layer_digest), layer_digest)
    }

    /// The index of the requested layer: stored, fetched ahead, or fetched now (and stored).
    /// Blocking.
    pub fn find(&self, repo: &Arc<Repository>, req: &RemoteRequest) -> Result<Found, RemoteError> {
        let path = self.layout.index_path(&req.layer_digest);
        if let Some(i) = open_local(&path, &req.layer_digest)? {
            return Ok(i);
        }
        self.wait_for_index(&req.layer_digest);
        if let Some(i) = open_local(&path, &req.layer_digest)? {
            return Ok(i);
        }
        let rt = self.runtime.clone();
        let artifact_digest = match &req.index_digest {
            Some(d) => d.clone(),
            None => {
                let manifest_digest = match &req.manifest_digest {
                    Some(d) => d.clone(),
                    None => {
                        let image = &repo.image;
                        rt.block_on(repo.get_image_manifest(image.manifest_reference(), &Platform::default()))
                            .map_err(RemoteError::request(format!("resolving {}", req.image_ref)))?
                            .0
                            .digest
                    }
                };
                let found = rt
                    .block_on(repo.referrers(&manifest_digest, Some(ARTIFACT_TYPE)))
                    .map_err(RemoteError::request(format!("looking up the index of {manifest_digest}")))?;
                found.last().map(|d| d.digest().to_string()).ok_or_else(|| RemoteError::NoIndex {
                    image: req.image_ref.clone(),
                    manifest: manifest_digest.clone(),
                })?
            }
        };
        let artifact = self.artifact(repo, &artifact_digest)?;
        // The other layers' indexes are fetched now, in parallel: containerd prepares layers
        // one by one, and each would otherwise wait for its own round trips.
        self.prefetch_indexes(repo, &artifact_digest, &artifact, &req.layer_digest);
        let blob_digest = artifact.blob_for(&req.layer_digest, BlobKind::Index).ok_or_else(|| {
            RemoteError::NotInArtifact { artifact: artifact_digest.clone(), layer: req.layer_digest.clone() }
        })?;
        let windows_digest = artifact.blob_for(&req.layer_digest, BlobKind::Windows);
        let bytes = rt
            .block_on(repo.get_blob(&blob_digest, MAX_INDEX_BLOB))
            .map_err(RemoteError::request(format!("fetching index {blob_digest}")))?;
        store_index(&path, &req.layer_digest, &blob_digest, windows_digest, &bytes, &artifact_digest)
    }

    /// Starts fetching the indexes of the artifact's layers other than `current` that are
    /// neither local nor on the way; [`Self::wait_for_index`] waits for them.
    fn prefetch_indexes(&self, repo: &Arc<Repository>, artifact_digest: &str, artifact: &IndexArtifact, current: &str) {
        let digests: Vec<String> = artifact
            .indexed_layers()
            .into_iter()
            .filter(|d| d != current && clip_config::digest::is_digest(d))
            .collect();
        for layer in digests {
            let path = self.layout.index_path(&layer);
            if path.exists() {
                continue;
            }
            let done = {
                let mut inflight = self.fetches.lock();
                if inflight.contains_key(&layer) {
                    continue;
                }
                let done = Arc::new(IndexFetch::default());
                inflight.insert(layer.clone(), done.clone());
                done
            };
            let (Some(blob), windows) =
                (artifact.blob_for(&layer, BlobKind::Index), artifact.blob_for(&layer, BlobKind::Windows))
            else {
                done.finish();
                continue;
            };
            let repo = repo.clone();
            let artifact_digest = artifact_digest.to_string();
            self.runtime.spawn(async move {
                match repo.get_blob(&blob, MAX_INDEX_BLOB).await {
                    Ok(bytes) => {
                        let stored = tokio::task::spawn_blocking(move || {
                            store_index(&path, &layer, &blob, windows, &bytes, &artifact_digest).map(|_| layer)
                        })
                        .await;
                        match stored {
                            Ok(Ok(layer)) => tracing::debug!(layer = %layer, "index fetched ahead"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "an index fetched ahead is unusable"),
                            Err(e) => tracing::warn!(error = %e, "storing an index fetched ahead failed"),
                        }
                    }
                    Err(e) => tracing::debug!(blob = %blob, error = %e, "fetching an index ahead failed (its Prepare will try again)"),
                }
                done.finish();
            });
        }
    }

    /// Waits (bounded) for an index fetched ahead of its layer's Prepare.
    fn wait_for_index(&self, layer_digest: &str) {
        let fetch = self.fetches.lock().get(layer_digest).cloned();
        if let Some(fetch) = fetch {
            fetch.wait(self.wait_limit);
            self.fetches.lock().remove(layer_digest);
        }
    }

    fn artifact(&self, repo: &Repository, digest: &str) -> Result<IndexArtifact, RemoteError> {
        if let Some(a) = self.artifacts.lock().get(digest) {
            return Ok(a.clone());
        }
        let fetched = self
            .runtime
            .block_on(repo.get_manifest(digest))
            .map_err(RemoteError::request(format!("fetching index artifact {digest}")))?;
        let value = IndexArtifact::parse(&fetched.bytes)
            .map_err(|source| RemoteError::Artifact { artifact: digest.to_string(), source })?;
        self.artifacts.lock().insert(digest.to_string(), value.clone());
        Ok(value)
    }
}
