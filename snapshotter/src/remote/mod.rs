//! The lazy-layer engine: for a Prepare that names an image layer, find the layer's CLIP index
//! and serve the layer read-only over FUSE with the image's credentials. The snapshot service
//! commits such a layer at once, so containerd neither downloads nor unpacks it. Failures are
//! returned as reasons; the caller falls back to an ordinary snapshot.
//!
//! [`RemoteLayers`] only wires its parts, each of which owns one concern and its own lock and
//! takes no other part's lock:
//! - [`sessions`]: where credentials are chosen — one registry session per image, from its
//!   credential inputs (labels, pull secrets, minter, `config.json`);
//! - [`discover`]: index discovery — the local index store, else the registry;
//! - [`layout`]: the cache layout — the paths of a layer's index, spans, files and sessions;
//! - [`layers`]: the layer table — mounts by snapshot id, and a gate per layer that orders the
//!   Prepares and Removes of one layer;
//! - [`settings`]: the read-path settings every layer's span cache is wired with;
//! - [`mount`]: where a mount is made, served again after a restart, and taken down, with the
//!   fd [`keeper`] holding every mount's FUSE connection across restarts;
//! - [`blob`]: a layer blob as the read path's range fetcher; [`profiles`]: access profiles;
//! - [`verify`]: verification of layers that became complete, and poisoning;
//! - [`unpack`]: layers no index serves, downloaded and unpacked here instead of by containerd.
//!
//! Labels are parsed in [`clip_config::labels`]; spans are fetched in [`clip_readpath::spans`].

mod blob;
mod creds_store;
pub mod discover;
mod error;
mod keeper;
pub mod layers;
pub mod layout;
mod mount;
mod profiles;
pub mod sessions;
pub mod settings;
pub mod unpack;
pub mod verify;

pub use blob::RegistryBlob;
pub use creds_store::CredentialStore;
pub use discover::Binding;
pub use error::RemoteError;
pub use layers::{LayerGate, LayerTable};
pub use layout::{CacheLayout, LayerKey, RemoteLayer};
pub use sessions::{Session, Sessions};
pub use settings::ReadSettings;

use clip_config::SnapshotterConfig;
use clip_config::labels::RemoteRequest;
use clip_index::Index;
use clip_registry::Repository;
use discover::IndexDiscovery;
use std::sync::Arc;

/// The lazy-layer engine of a daemon: its parts, wired.
pub struct RemoteLayers {
    layout: CacheLayout,
    sessions: Arc<Sessions>,
    discovery: IndexDiscovery,
    table: LayerTable,
    read: ReadSettings,
    keeper: keeper::KeeperHandle,
    /// Access profiles: recorded, kept, published, replayed (`None`: off).
    profiles: Option<Arc<profiles::ProfileBook>>,
    /// Checks layers as they become complete.
    verifier: Arc<verify::Verifier>,
    metrics: Arc<crate::metrics::Metrics>,
    runtime: tokio::runtime::Handle,
    /// `[lazy] unpack_without_index`.
    unpack_without_index: bool,
    /// `[lazy] unpack_min_free_mb`, bytes.
    unpack_min_free: u64,
}

impl std::fmt::Debug for RemoteLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteLayers({})", self.layout.root().display())
    }
}

/// A layer ready to mount.
#[derive(Debug)]
pub struct OpenedLayer {
    index: Arc<Index>,
    source: RegistryBlob,
    /// The windows blob of an index without windows.
    windows: Option<RegistryBlob>,
    key: LayerKey,
    /// The image the layer was opened for, and its manifest when known (to find its diff ID).
    image_ref: String,
    manifest_digest: Option<String>,
}

impl OpenedLayer {
    /// What the snapshot's record keeps to serve the layer again after a restart.
    pub fn record(&self, image_ref: &str) -> RemoteLayer {
        RemoteLayer {
            image_ref: image_ref.to_string(),
            layer_digest: self.key.layer_digest.clone(),
            index_blob: self.key.index_blob.clone(),
            windows_blob: self.windows.as_ref().map(|w| w.digest.clone()),
        }
    }
}

impl RemoteLayers {
    /// Builds the engine from the daemon config; mints nothing yet.
    pub async fn new(
        cfg: &SnapshotterConfig,
        runtime: tokio::runtime::Handle,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let layout = CacheLayout::new(&cfg.root);
        let sessions = Arc::new(Sessions::new(cfg, &layout).await?);
        let (keeper, kept) = keeper::KeeperHandle::new(cfg);
        let verifier =
            Arc::new(verify::Verifier::new(layout.clone(), sessions.clone(), runtime.clone(), metrics.clone()));
        let read = ReadSettings::new(cfg, &layout, &metrics, verifier.clone());
        let _ = verifier.budget.set(read.budget.clone());
        let profiles =
            profiles::ProfileBook::start(&cfg.lazy.profiles, layout.profiles_dir(), runtime.clone(), metrics.clone());
        let trust = if cfg.trust.keys.is_empty() {
            None
        } else {
            let keys = clip_trust::TrustedKeys::load(&cfg.trust.keys)?;
            tracing::info!(keys = cfg.trust.keys.len(), "trust: only signed indexes are served lazily");
            Some(keys)
        };
        Ok(Self {
            discovery: IndexDiscovery::new(layout.clone(), runtime.clone(), read.fetch_timeout, trust),
            layout,
            sessions,
            table: LayerTable::with_kept(kept),
            read,
            keeper,
            profiles,
            verifier,
            metrics,
            runtime,
            unpack_without_index: cfg.lazy.unpack_without_index,
            unpack_min_free: cfg.lazy.unpack_min_free_mb.saturating_mul(1 << 20),
        })
    }

    /// The registry sessions (the CRI image-service proxy hands pull secrets to them).
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// The read-path settings.
    pub fn read_settings(&self) -> &ReadSettings {
        &self.read
    }

    /// Holds the gate of a layer: hold it from opening a layer to recording its snapshot, and
    /// from removing a snapshot of it to deleting its caches ([`layers`]).
    pub fn gate(&self, layer_digest: &str) -> LayerGate<'_> {
        self.table.gate(layer_digest)
    }

    /// Deletes everything kept for a layer no snapshot uses any more: its span cache,
    /// passthrough copies and index. Call under the layer's [`Self::gate`].
    pub fn delete_layer_caches(&self, _gate: &LayerGate<'_>, key: &LayerKey) {
        let deleted = self.layout.delete_layer(key);
        self.verifier.forget(&deleted.spans);
        self.read.budget.forget_layer(&deleted.spans, &deleted.files);
        if let Some(p) = &self.profiles {
            p.layer_gone(&key.layer_digest);
        }
        tracing::info!(layer = %key, "layer caches deleted");
    }

    /// Which index the requested image names for the requested layer ([`discover`]), with the
    /// image's registry session. Blocking (call from a blocking thread, never from async code).
    pub fn bind(&self, req: &RemoteRequest) -> Result<(Arc<Repository>, Binding), RemoteError> {
        self.sessions.remember_labels(&req.image_ref, &req.secrets)?;
        if req.plain_http {
            self.sessions.remember_plain_http(&req.image_ref)?;
        }
        let repo = self.sessions.repository(&req.image_ref)?;
        let binding = self.discovery.bind(&repo, req)?;
        Ok((repo, binding))
    }

    /// Whether the layer, with this index, was found not to be what the index says.
    pub fn is_poisoned(&self, key: &LayerKey) -> bool {
        self.layout.poisoned_path(key).exists()
    }

    /// Opens the index a layer is bound to. Blocking.
    pub fn open(
        &self,
        repo: &Arc<Repository>,
        req: &RemoteRequest,
        binding: Binding,
    ) -> Result<OpenedLayer, RemoteError> {
        // The profile lookup (a few round trips) goes on while the index is fetched: a replay
        // that starts sooner ends sooner, and the start waits for its last span.
        if let Some(p) = &self.profiles {
            p.image_opened(repo, req);
        }
        let (index, windows) = self.discovery.load(repo, &binding)?;
        let mut opened = self.opened(&req.image_ref, index, windows, binding.key);
        opened.manifest_digest = binding.manifest_digest;
        Ok(opened)
    }

    fn opened(&self, image_ref: &str, index: Arc<Index>, windows: Option<String>, key: LayerKey) -> OpenedLayer {
        let blob = |digest: String| RegistryBlob {
            session: Session::Image { sessions: self.sessions.clone(), image_ref: image_ref.to_string() },
            digest,
            runtime: self.runtime.clone(),
            timeout: self.read.fetch_timeout,
        };
        OpenedLayer {
            index,
            windows: windows.map(blob),
            source: blob(key.layer_digest.clone()),
            key,
            image_ref: image_ref.to_string(),
            manifest_digest: None,
        }
    }

    /// Opens a recorded layer again (restarts): from the local index store, else (when `fetch`)
    /// the recorded index blob from the image's repository (the index was lost). A record of
    /// an earlier version names no index blob: its image's index is looked up again.
    pub fn reopen(&self, record: &RemoteLayer, fetch: bool) -> Result<OpenedLayer, RemoteError> {
        let key = record.key();
        if let Some((index, windows)) = self.discovery.local(&key)? {
            return Ok(self.opened(&record.image_ref, index, windows, key));
        }
        if !fetch {
            let path = self.layout.index_path(&key);
            return Err(RemoteError::IndexGone { path: path.display().to_string() });
        }
        tracing::warn!(layer = %key, image = %record.image_ref, "the stored index is gone; fetching it again");
        let repo: Arc<Repository> = self.sessions.repository(&record.image_ref)?;
        let binding = if key.index_blob.is_some() {
            Binding { key, windows_blob: record.windows_blob.clone(), manifest_digest: None }
        } else {
            let req = RemoteRequest {
                target: String::new(),
                image_ref: record.image_ref.clone(),
                layer_digest: record.layer_digest.clone(),
                manifest_digest: None,
                index_digest: None,
                plain_http: false,
                secrets: std::collections::BTreeMap::new(),
            };
            self.discovery.bind(&repo, &req)?
        };
        let (index, windows) = self.discovery.load(&repo, &binding)?;
        Ok(self.opened(&record.image_ref, index, windows, binding.key))
    }
}
