//! Index discovery: which index an image names for a layer ([`IndexDiscovery::bind`]), and
//! that index — from the local store or the registry ([`IndexDiscovery::load`]).
//!
//! An index serves only the image that published it: it is taken from the index artifact
//! whose `subject` is the image's own manifest, found among the referrers of that manifest in
//! the image's own repository (or from the artifact the orchestrator names in the
//! `clip.index-digest` label), and only for the layers that artifact lists. The local store is
//! keyed by layer and index blob ([`LayerKey`]), so an index another image published for a
//! shared layer is never found for this one. Once an image's artifact is read, the other
//! layers' indexes are fetched ahead, a few at a time, since containerd prepares layers one by
//! one.
//!
//! With `[trust]` keys, an artifact is used only when one of them signed it ([`clip_trust`]).

use super::error::RemoteError;
use super::layout::{CacheLayout, LayerKey};
use clip_config::labels::RemoteRequest;
use clip_index::artifact::{ARTIFACT_TYPE, BlobKind, IndexArtifact};
use clip_index::{Index, IndexError};
use clip_registry::{Platform, Repository};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Largest index blob accepted (a million-file layer is far below this).
const MAX_INDEX_BLOB: usize = 256 << 20;
/// Index fetches ahead under way at once.
const FETCHES_AHEAD: usize = 4;
/// Artifacts (and choices of artifact) remembered at most; past it they are read again.
const MAX_REMEMBERED: usize = 4096;
/// Referrers of one manifest examined at most (each one read is a round trip).
const MAX_CANDIDATES: usize = 8;

/// A layer's index and, for an index without windows, the digest of its windows blob.
pub(super) type Found = (Arc<Index>, Option<String>);

/// Which index an image names for one of its layers.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The layer and the index blob: what its caches are keyed by.
    pub key: LayerKey,
    /// The windows blob of an index without windows.
    pub windows_blob: Option<String>,
    /// The image manifest the artifact is for, when known.
    pub manifest_digest: Option<String>,
}

/// Opens a stored index (and its windows blob's digest) if present, mapped from its file (the
/// daemon holds only the pages lookups touch); a corrupt one is deleted and reported as absent.
fn open_local(path: &Path, layer_digest: &str) -> Result<Option<Found>, RemoteError> {
    let opened = match Index::open_file(path) {
        Err(IndexError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(IndexError::Io(e)) => return Err(RemoteError::io(format!("reading {}", path.display()))(e)),
        other => other,
    };
    match opened.and_then(|i| i.validate().map(|()| i)) {
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

/// Validates a fetched index blob for `binding` and stores it (with its windows digest) at
/// `path`, atomically.
fn store_index(path: &Path, binding: &Binding, blob_digest: &str, bytes: Vec<u8>) -> Result<Found, RemoteError> {
    let layer = &binding.key.layer_digest;
    let invalid = |source| RemoteError::Index { blob: blob_digest.to_string(), source };
    let index = Index::open_any(bytes).map_err(invalid)?;
    index.validate().map_err(invalid)?;
    if index.layer_digest() != *layer {
        return Err(RemoteError::WrongLayer {
            blob: blob_digest.to_string(),
            expected: layer.clone(),
            actual: index.layer_digest(),
        });
    }
    if index.has_external_windows() && binding.windows_blob.is_none() {
        return Err(RemoteError::MissingWindows { artifact: blob_digest.to_string(), layer: layer.clone() });
    }
    let windows_digest = binding.windows_blob.clone().filter(|_| index.has_external_windows());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(RemoteError::io(format!("creating {}", dir.display())))?;
    }
    if let Some(d) = &windows_digest {
        clip_fsutil::atomic_write(
            &CacheLayout::windows_path(path),
            d.as_bytes(),
            0o600,
            clip_fsutil::Durability::Durable,
        )
        .map_err(RemoteError::io("storing the windows digest"))?;
    }
    clip_fsutil::atomic_write(path, index.bytes(), 0o600, clip_fsutil::Durability::Durable)
        .map_err(RemoteError::io(format!("storing index {}", path.display())))?;
    // Served from the stored file's map, so the fetched bytes are not held for the mount's life.
    let index = match Index::open_file(path) {
        Ok(stored) if stored.same_bytes(&index) => stored,
        Ok(_) | Err(_) => {
            tracing::warn!(path = %path.display(), "the index just stored reads back differently; serving it from memory");
            index
        }
    };
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
    /// Index fetches started ahead of their layers' Prepare.
    fetches: parking_lot::Mutex<HashMap<LayerKey, Arc<IndexFetch>>>,
    /// Bounds the fetches ahead under way at once.
    fetch_slots: Arc<tokio::sync::Semaphore>,
    /// Artifact manifests already read, by digest.
    artifacts: parking_lot::Mutex<HashMap<String, IndexArtifact>>,
    /// The artifact chosen for each image manifest, by manifest digest.
    chosen: parking_lot::Mutex<HashMap<String, String>>,
    /// The keys an artifact must be signed with (`None`: any image's own artifact is used).
    trust: Option<clip_trust::TrustedKeys>,
    /// Artifacts whose signature was verified, by digest.
    signed: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl IndexDiscovery {
    pub fn new(
        layout: CacheLayout,
        runtime: tokio::runtime::Handle,
        wait_limit: std::time::Duration,
        trust: Option<clip_trust::TrustedKeys>,
    ) -> Self {
        Self {
            trust,
            signed: parking_lot::Mutex::new(std::collections::HashSet::new()),
            layout,
            runtime,
            wait_limit,
            fetches: parking_lot::Mutex::new(HashMap::new()),
            fetch_slots: Arc::new(tokio::sync::Semaphore::new(FETCHES_AHEAD)),
            artifacts: parking_lot::Mutex::new(HashMap::new()),
            chosen: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// The stored index of a key, if any (a corrupt one is deleted and reported absent).
    pub fn local(&self, key: &LayerKey) -> Result<Option<Found>, RemoteError> {
        open_local(&self.layout.index_path(key), &key.layer_digest)
    }

    /// Which index the requested image names for the requested layer: its own index artifact's
    /// blob for that layer. Starts fetching the artifact's other indexes. Blocking.
    pub fn bind(&self, repo: &Arc<Repository>, req: &RemoteRequest) -> Result<Binding, RemoteError> {
        let (artifact_digest, artifact, manifest_digest) = match &req.index_digest {
            Some(d) => {
                let artifact = self.artifact(repo, d)?;
                // The orchestrator named it; it must still be for this image when both are known.
                if let (Some(manifest), Some(subject)) = (&req.manifest_digest, artifact.subject_digest())
                    && *manifest != subject
                {
                    return Err(RemoteError::ForeignIndex { artifact: d.clone(), subject, manifest: manifest.clone() });
                }
                self.check_signed(repo, d)?;
                let manifest = req.manifest_digest.clone().or_else(|| artifact.subject_digest());
                (d.clone(), artifact, manifest)
            }
            None => {
                let (digest, artifact) = self.referred_artifact(repo, req)?;
                let manifest = artifact.subject_digest();
                (digest, artifact, manifest)
            }
        };
        let index_blob = artifact.blob_for(&req.layer_digest, BlobKind::Index).ok_or_else(|| {
            RemoteError::NotInArtifact { artifact: artifact_digest.clone(), layer: req.layer_digest.clone() }
        })?;
        self.prefetch_indexes(repo, &artifact, &req.layer_digest);
        Ok(Binding {
            key: LayerKey::bound(&req.layer_digest, &index_blob),
            windows_blob: artifact.blob_for(&req.layer_digest, BlobKind::Windows),
            manifest_digest,
        })
    }

    /// The image's own index artifact for `req.layer_digest`: the newest referrer of its
    /// manifest, in its repository, whose subject is that manifest and which lists the layer.
    fn referred_artifact(
        &self,
        repo: &Arc<Repository>,
        req: &RemoteRequest,
    ) -> Result<(String, IndexArtifact), RemoteError> {
        let rt = &self.runtime;
        let manifest = match &req.manifest_digest {
            Some(d) => d.clone(),
            None => {
                rt.block_on(repo.get_image_manifest(repo.image.manifest_reference(), &Platform::default()))
                    .map_err(RemoteError::request(format!("resolving {}", req.image_ref)))?
                    .0
                    .digest
            }
        };
        // A choice made before was checked then (signature included).
        let chosen = self.chosen.lock().get(&manifest).cloned();
        if let Some(d) = chosen {
            let artifact = self.artifact(repo, &d)?;
            if artifact.blob_for(&req.layer_digest, BlobKind::Index).is_some() {
                return Ok((d, artifact));
            }
        }
        let found = rt
            .block_on(repo.referrers(&manifest, Some(ARTIFACT_TYPE)))
            .map_err(RemoteError::request(format!("looking up the index of {manifest}")))?;
        let mut refused = None;
        for candidate in found.iter().rev().take(MAX_CANDIDATES) {
            let digest = candidate.digest().to_string();
            if !clip_config::digest::is_digest(&digest) {
                continue;
            }
            let artifact = match self.artifact(repo, &digest) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(artifact = %digest, error = %e, "a referrer of the image is not a usable index artifact");
                    refused = Some(e);
                    continue;
                }
            };
            // The referrers list is the registry's word; the artifact's own subject decides.
            if artifact.subject_digest().as_deref() != Some(manifest.as_str()) {
                tracing::warn!(artifact = %digest, manifest = %manifest, "a listed referrer names another subject; ignored");
                continue;
            }
            if artifact.blob_for(&req.layer_digest, BlobKind::Index).is_none() {
                continue;
            }
            if let Err(e) = self.check_signed(repo, &digest) {
                tracing::info!(artifact = %digest, error = %e, "an index artifact of the image is not signed by a trusted key");
                refused = Some(e);
                continue;
            }
            let mut chosen = self.chosen.lock();
            if chosen.len() >= MAX_REMEMBERED {
                chosen.clear();
            }
            chosen.insert(manifest.clone(), digest.clone());
            return Ok((digest, artifact));
        }
        Err(refused.unwrap_or(RemoteError::NoIndex { image: req.image_ref.clone(), manifest }))
    }

    /// The index of a bound layer: stored, fetched ahead, or fetched now from the image's
    /// repository (and stored). Blocking.
    pub fn load(&self, repo: &Arc<Repository>, binding: &Binding) -> Result<Found, RemoteError> {
        let poisoned = self.layout.poisoned_path(&binding.key);
        if poisoned.exists() {
            return Err(RemoteError::Poisoned {
                layer: binding.key.to_string(),
                marker: poisoned.display().to_string(),
            });
        }
        let path = self.layout.index_path(&binding.key);
        let layer = &binding.key.layer_digest;
        if let Some(i) = open_local(&path, layer)? {
            return Ok(i);
        }
        self.wait_for_index(&binding.key);
        if let Some(i) = open_local(&path, layer)? {
            return Ok(i);
        }
        let Some(blob) = &binding.key.index_blob else {
            return Err(RemoteError::IndexGone { path: path.display().to_string() });
        };
        let bytes = self
            .runtime
            .block_on(repo.get_blob(blob, MAX_INDEX_BLOB))
            .map_err(RemoteError::request(format!("fetching index {blob}")))?;
        store_index(&path, binding, blob, bytes.to_vec())
    }

    /// Starts fetching the indexes of the artifact's layers other than `current` that are
    /// neither local nor on the way, [`FETCHES_AHEAD`] at a time; [`Self::wait_for_index`]
    /// waits for them.
    fn prefetch_indexes(&self, repo: &Arc<Repository>, artifact: &IndexArtifact, current: &str) {
        for layer in artifact.indexed_layers() {
            if layer == current || !clip_config::digest::is_digest(&layer) {
                continue;
            }
            let Some(blob) = artifact.blob_for(&layer, BlobKind::Index).filter(|b| clip_config::digest::is_digest(b))
            else {
                continue;
            };
            let binding = Binding {
                key: LayerKey::bound(&layer, &blob),
                windows_blob: artifact.blob_for(&layer, BlobKind::Windows),
                manifest_digest: None,
            };
            let path = self.layout.index_path(&binding.key);
            if path.exists() {
                continue;
            }
            let done = {
                let mut inflight = self.fetches.lock();
                if inflight.contains_key(&binding.key) {
                    continue;
                }
                let done = Arc::new(IndexFetch::default());
                inflight.insert(binding.key.clone(), done.clone());
                done
            };
            let (repo, slots) = (repo.clone(), self.fetch_slots.clone());
            self.runtime.spawn(async move {
                let _slot = slots.acquire_owned().await;
                match repo.get_blob(&blob, MAX_INDEX_BLOB).await {
                    Ok(bytes) => {
                        let stored =
                            tokio::task::spawn_blocking(move || store_index(&path, &binding, &blob, bytes.to_vec()))
                                .await;
                        match stored {
                            Ok(Ok(_)) => tracing::debug!(layer = %layer, "index fetched ahead"),
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
    fn wait_for_index(&self, key: &LayerKey) {
        let fetch = self.fetches.lock().get(key).cloned();
        if let Some(fetch) = fetch {
            fetch.wait(self.wait_limit);
            self.fetches.lock().remove(key);
        }
    }

    /// With `[trust]` keys: that one of them signed the artifact `digest` (looked up once).
    fn check_signed(&self, repo: &Repository, digest: &str) -> Result<(), RemoteError> {
        let Some(keys) = &self.trust else { return Ok(()) };
        if self.signed.lock().contains(digest) {
            return Ok(());
        }
        let signer = self
            .runtime
            .block_on(clip_trust::cosign::verify(repo, digest, keys))
            .map_err(|source| RemoteError::Untrusted { artifact: digest.to_string(), source })?;
        tracing::info!(artifact = %digest, key = %signer, "index artifact signed by a trusted key");
        let mut signed = self.signed.lock();
        if signed.len() >= MAX_REMEMBERED {
            signed.clear();
        }
        signed.insert(digest.to_string());
        Ok(())
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
        let mut artifacts = self.artifacts.lock();
        if artifacts.len() >= MAX_REMEMBERED {
            artifacts.clear();
        }
        artifacts.insert(digest.to_string(), value.clone());
        Ok(value)
    }
}
