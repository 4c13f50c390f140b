//! The snapshots service: containerd's `Snapshotter` API over [`MetaStore`] and
//! [`SnapshotDirs`], with overlayfs semantics. Every call runs in its own tracing span, on a
//! blocking thread (redb and the file system block), and is counted in [`Metrics`].

use crate::content_lookup::{BlobCheck, ContentLookup};
use crate::dirs::SnapshotDirs;
use crate::error::{Result, SnapshotError};
use crate::filter::{Adaptor, Filters};
use crate::labels;
use crate::metadata::{DiskUsage, Kind, LabelUpdate, MetaStore, Record};
use crate::metrics::Metrics;
use crate::mounts::mounts_for;
use crate::remote::{RemoteError, RemoteLayers};
use clip_config::labels::RemoteRequest;
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::Status;
use containerd_snapshots::{Info, Usage};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// The state every call works on.
#[derive(Debug)]
pub struct State {
    pub store: MetaStore,
    pub dirs: SnapshotDirs,
    /// Lazy layers; `None` serves only ordinary snapshots.
    pub remote: Option<Arc<RemoteLayers>>,
    /// One remote Prepare at a time per (parent, target): concurrent pulls of images sharing
    /// a layer must not mount it twice.
    remote_targets: parking_lot::Mutex<HashMap<(String, String), Arc<parking_lot::Mutex<()>>>>,
}

impl State {
    /// Opens (or creates) the state under `root`: `metadata.redb` and `snapshots/`.
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| SnapshotError::io(format!("creating {}", root.display()), e))?;
        // Private image contents (span caches, indexes, credentials) live below: only root
        // may traverse it, whatever mode a hostPath or an older version created it with.
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| SnapshotError::io(format!("chmod 0700 {}", root.display()), e))?;
        let dirs = SnapshotDirs::open(root)?;
        let store = MetaStore::open(&root.join("metadata.redb"))?;
        Ok(Self { store, dirs, remote: None, remote_targets: parking_lot::Mutex::new(HashMap::new()) })
    }

    /// Serves again the remote layers the metadata records: their kept FUSE connections when
    /// the mounts survived (a daemon restart), else new mounts (a reboot). Returns how many
    /// layers are served; failures are logged.
    pub fn restore_remote_layers(&self) -> Result<usize> {
        let Some(remote) = &self.remote else {
            return Ok(0);
        };
        let mut n = 0;
        let mut failed = Vec::new();
        let mut unservable_info = HashMap::new();
        // One registry that does not answer costs one round of retries, not one per layer.
        let mut unreachable = std::collections::HashSet::new();
        for (name, record) in self.store.list()? {
            let Some(info) = &record.remote else { continue };
            let dir = self.dirs.fs(record.id);
            let fetch = !unreachable.contains(&info.image_ref);
            let opened = remote.reopen(info, fetch);
            if opened.is_err() {
                unreachable.insert(info.image_ref.clone());
            }
            match opened.and_then(|layer| remote.restore(record.id, &dir, layer)) {
                Ok(how) => {
                    tracing::info!(snapshot = %name, id = record.id, layer = %info.layer_digest, how, "remote layer served");
                    n += 1;
                }
                Err(reason) => {
                    tracing::error!(snapshot = %name, layer = %info.layer_digest, %reason, "cannot serve a remote layer again");
                    clip_fsutil::mountinfo::unmount_below(&dir);
                    unservable_info.insert(record.id, info.clone());
                    failed.push((name, record.id));
                }
            }
        }
        // Never leave an empty directory where a layer should be. The record stays: containerd
        // keeps its own record of the snapshot (and answers a Prepare of its chain id with
        // "already exists" from it, without asking here), so removing ours would leave
        // containerd pointing at nothing. The layer is served again when it is next used.
        for (name, id) in &failed {
            let dir = self.dirs.fs(*id);
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(info) = unservable_info.get(id) {
                remote.mark_unservable(*id, info);
            }
            tracing::error!(snapshot = %name, "an unservable remote snapshot is left in place without its directory until it is next used");
        }
        remote.forget_unclaimed();
        Ok(n)
    }

    /// Deletes snapshot directories no snapshot refers to (leftovers of crashes and of
    /// removals whose directory deletion failed). Returns how many were removed.
    pub fn cleanup(&self) -> Result<usize> {
        let removed = self.store.with_ids_locked(|live| self.dirs.remove_orphans(live))?;
        for path in &removed {
            tracing::info!(path = %path.display(), "removed orphaned snapshot directory");
        }
        Ok(removed.len())
    }

    /// `blob_check`: whether the layer's blob is in containerd's content store (then it is not
    /// unpacked here).
    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        blob_check: &BlobCheck,
    ) -> Result<Vec<Mount>> {
        let mut labels = labels::split(labels)?;
        let request = match RemoteRequest::from_labels(&labels) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(reason = %e, "malformed lazy-serving labels; preparing an ordinary snapshot");
                labels.stored.insert(NOT_LAZY.into(), not_lazy_reason(&e.to_string()));
                None
            }
        };
        if kind == Kind::Active
            && let (Some(remote), Some(req)) = (&self.remote, request)
        {
            match self.prepare_remote(remote, key, parent, &labels, &req, blob_check) {
                Ok(()) => {
                    return Err(SnapshotError::AlreadyExists(format!("target snapshot {}", req.target)));
                }
                Err(RemoteFallback::Error(e)) => return Err(e),
                Err(RemoteFallback::Reason(reason)) => {
                    tracing::info!(layer = %req.layer_digest, image = %req.image_ref, %reason, "serving the layer as an ordinary snapshot (containerd unpacks it)");
                    labels.stored.insert(NOT_LAZY.into(), not_lazy_reason(&reason.to_string()));
                }
            }
        }
        if !parent.is_empty() {
            let p = self.store.resolve(parent)?;
            let mut ids = p.parent_ids.clone();
            ids.push(p.record.id);
            self.serve_unservable(&ids)?;
        }
        let id_map = id_map(&labels.stored)?;
        let resolved = self.store.create(kind, key, parent, labels.stored, |id| {
            self.dirs.create(id)?;
            match (&id_map, kind) {
                // As containerd's overlayfs snapshotter: the pod's root owns its upper dir.
                (Some(m), Kind::Active) => self.dirs.give_upper_to(id, m.root()),
                _ => Ok(()),
            }
        })?;
        tracing::debug!(id = resolved.record.id, "snapshot created");
        Ok(mounts_for(&self.dirs, &resolved))
    }

    /// Serves `req` lazily: an existing remote layer for the same target and parent, or a new
    /// one mounted over FUSE and committed under `key`.
    fn prepare_remote(
        &self,
        remote: &RemoteLayers,
        key: &str,
        parent: &str,
        labels: &labels::SnapshotLabels,
        req: &RemoteRequest,
        blob_check: &BlobCheck,
    ) -> std::result::Result<(), RemoteFallback> {
        let slot = (parent.to_string(), req.target.clone());
        let lock = self.remote_targets.lock().entry(slot.clone()).or_default().clone();
        let result = {
            let _serialized = lock.lock();
            self.prepare_remote_locked(remote, key, parent, labels, req, blob_check)
        };
        let mut targets = self.remote_targets.lock();
        if Arc::strong_count(&lock) == 2 {
            targets.remove(&slot);
        }
        result
    }

    fn prepare_remote_locked(
        &self,
        remote: &RemoteLayers,
        key: &str,
        parent: &str,
        labels: &labels::SnapshotLabels,
        req: &RemoteRequest,
        blob_check: &BlobCheck,
    ) -> std::result::Result<(), RemoteFallback> {
        let unpack_here = |why: &RemoteError| {
            if !remote.unpacks(why) {
                return false;
            }
            let local = blob_check.is_local();
            if local {
                tracing::info!(layer = %req.layer_digest, "the layer's blob is in containerd's content store: containerd unpacks it from there");
            }
            !local
        };
        // From opening the layer until its snapshot is recorded, a Remove of the layer's last
        // snapshot cannot delete its caches.
        let _gate = remote.gate(&req.layer_digest);
        // A layer this snapshotter unpacked for another namespace is not shared with this one:
        // that would hand a layer to whoever names its chain, without their registry ever
        // serving it to them.
        let foreign_unpack = |name: &str, r: &crate::metadata::Record| {
            r.labels.contains_key(clip_config::labels::UNPACKED_BY_CLIP) && namespace_of(name) != namespace_of(key)
        };
        let existing = self
            .store
            .for_target(parent, &req.target)
            .map_err(RemoteFallback::Error)?
            .into_iter()
            .find(|(name, r)| !foreign_unpack(name, r));
        // Unpacked by containerd, or here, either checked against its diff ID.
        if existing.as_ref().is_some_and(|(_, r)| r.remote.is_none()) {
            return Ok(());
        }
        // Which index this image names for the layer decides whether an existing lazy snapshot
        // of the same chain can serve it.
        let (repo, binding) = match remote.bind(req) {
            Ok(bound) => bound,
            Err(why) if unpack_here(&why) => return self.prepare_unpacked(remote, key, parent, labels, req, &why),
            Err(e) => return Err(RemoteFallback::Reason(e.into())),
        };
        if let Some((name, Some(r))) = existing.map(|(n, r)| (n, r.remote)) {
            if r.key() == binding.key && !remote.is_poisoned(&binding.key) {
                return Ok(());
            }
            // Another image's layer or index under this chain ID: this image gets a snapshot of
            // its own, which then alone answers for the chain ID here (`claim_target`; the
            // other one's users keep it by its name).
            let theirs = r.key();
            tracing::warn!(
                snapshot = %name, target = %req.target, image = %req.image_ref, %theirs, ours = %binding.key,
                "a lazy snapshot of this chain was made from another image's layer or index; not sharing it"
            );
        }
        let layer = match remote.open(&repo, req, binding) {
            Ok(layer) => layer,
            Err(why) if unpack_here(&why) => return self.prepare_unpacked(remote, key, parent, labels, req, &why),
            Err(e) => return Err(RemoteFallback::Reason(e.into())),
        };
        let mounted = std::cell::Cell::new(None);
        let info = layer.record(&req.image_ref);
        let result = self.store.create_remote(key, parent, labels.stored.clone(), info, |id| {
            self.dirs.create(id)?;
            remote.mount(id, &self.dirs.fs(id), layer)?;
            mounted.set(Some(id));
            Ok(())
        });
        match result {
            Ok(r) => {
                tracing::info!(layer = %req.layer_digest, image = %req.image_ref, id = r.record.id, "layer mounted lazily");
                self.store.claim_target(key, parent, &req.target).map_err(RemoteFallback::Error)
            }
            Err(e) => {
                if let Some(id) = mounted.get() {
                    remote.unmount(id);
                }
                match e {
                    SnapshotError::AlreadyExists(_)
                    | SnapshotError::NotFound(_)
                    | SnapshotError::InvalidArgument(_) => Err(RemoteFallback::Error(e)),
                    other => Err(RemoteFallback::Reason(other)),
                }
            }
        }
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let resolved = self.store.resolve(key)?;
        if resolved.record.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key:?} is committed; mounts exist only for active snapshots and views"
            )));
        }
        self.serve_unservable(&resolved.parent_ids)?;
        Ok(mounts_for(&self.dirs, &resolved))
    }

    /// Serves the layers among `ids` that a restart could not serve; an error if one still
    /// cannot be (a mount must never show an empty layer).
    pub(crate) fn serve_unservable(&self, ids: &[u64]) -> Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        Ok(remote.serve_unservable(ids, |id| self.dirs.fs(id))?)
    }

    fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        let labels = labels::split(labels)?;
        let resolved = self.store.resolve(key)?;
        if resolved.record.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key:?} is {}, not active",
                resolved.record.kind.as_str()
            )));
        }
        let usage = self.dirs.usage(resolved.record.id)?;
        self.store.commit(key, name, labels.stored, usage)?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let lazy = self.store.resolve(key)?.record.remote;
        let (Some(remote), Some(layer)) = (&self.remote, lazy) else {
            let record = self.store.remove(key)?;
            self.remove_dir(record.id);
            return Ok(());
        };
        // The record goes, and with the layer's last one its caches, while no Prepare of the
        // same layer is between opening it and recording its snapshot.
        let gate = remote.gate(&layer.layer_digest);
        let record = self.store.remove(key)?;
        remote.unmount(record.id);
        let key = layer.key();
        let still_used = self.store.list()?.iter().any(|(_, r)| r.remote.as_ref().is_some_and(|o| o.key() == key));
        if !still_used {
            remote.delete_layer_caches(&gate, &key);
        }
        drop(gate);
        self.remove_dir(record.id);
        Ok(())
    }

    /// Deletes a removed snapshot's directory, or leaves it to Cleanup.
    pub(crate) fn remove_dir(&self, id: u64) {
        if let Err(e) = self.dirs.remove(id) {
            // The record is gone; Cleanup deletes the directory later.
            tracing::warn!(id, error = %e, "snapshot directory left for cleanup");
        }
    }

    fn usage(&self, key: &str) -> Result<DiskUsage> {
        let resolved = self.store.resolve(key)?;
        match resolved.record.kind {
            Kind::Active => self.dirs.usage(resolved.record.id),
            // A lazy layer holds what it fetched so far (nothing while it is not served).
            Kind::Committed if resolved.record.remote.is_some() => {
                Ok(self.remote.as_ref().and_then(|r| r.cached_usage(resolved.record.id)).unwrap_or_default())
            }
            Kind::Committed | Kind::View => Ok(resolved.record.usage.unwrap_or_default()),
        }
    }

    fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        let name = info.name;
        let mut new_labels = labels::split(info.labels)?;
        let paths = fieldpaths.unwrap_or_default();
        let update = if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            if let Some(bad) = paths.iter().find(|p| *p != "labels" && !p.starts_with("labels.")) {
                return Err(immutable(bad, &name));
            }
            LabelUpdate::ReplaceAll(new_labels.stored)
        } else {
            let mut keys = Vec::new();
            for path in &paths {
                let Some(key) = path.strip_prefix("labels.") else {
                    return Err(immutable(path, &name));
                };
                if clip_config::labels::is_secret(key) {
                    continue;
                }
                keys.push((key.to_string(), new_labels.stored.remove(key)));
            }
            LabelUpdate::Keys(keys)
        };
        // The upper dir was given to the mapped root at Prepare: the mapping stays.
        let record = self.store.update_labels_checked(&name, update, |before, after| {
            if id_map(before)? == id_map(after).unwrap_or(None) {
                Ok(())
            } else {
                Err(SnapshotError::InvalidArgument(format!(
                    "the user-namespace mapping of snapshot {name} cannot change after it was prepared"
                )))
            }
        })?;
        Ok(to_info(name, record))
    }

    fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = Filters::parse_all(filters).map_err(|e| SnapshotError::InvalidArgument(e.to_string()))?;
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|(name, record)| filters.matches(&Adapted { name, record }))
            .map(|(name, record)| to_info(name, record))
            .collect())
    }
}

use clip_config::labels::NOT_LAZY_REASON as NOT_LAZY;

/// The containerd namespace a backend key belongs to (containerd names them `<ns>/<id>/<name>`).
fn namespace_of(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

/// The reason stored in [`NOT_LAZY`], within containerd's label size limit.
pub(crate) fn not_lazy_reason(reason: &str) -> String {
    reason.chars().take(1024).collect()
}

/// Why a remote Prepare did not happen: a reason to fall back, or an error for containerd.
pub(crate) enum RemoteFallback {
    /// The layer cannot be served lazily: fall back to an ordinary snapshot, recording why.
    Reason(SnapshotError),
    /// The request itself is wrong (containerd gets the error).
    Error(SnapshotError),
}

fn immutable(path: &str, name: &str) -> SnapshotError {
    SnapshotError::InvalidArgument(format!("cannot update {path:?} field on snapshot {name:?}"))
}

/// A snapshot as containerd's filters see it: `kind`, `name`, `parent`, `labels.<key>`.
struct Adapted<'a> {
    name: &'a str,
    record: &'a Record,
}

impl Adaptor for Adapted<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first()?.as_str() {
            "kind" => Some(self.record.kind.as_str().to_string()),
            "name" => Some(self.name.to_string()),
            "parent" => Some(self.record.parent.clone()),
            "labels" => self.record.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

fn to_info(name: String, record: Record) -> Info {
    Info {
        kind: match record.kind {
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name,
        parent: record.parent,
        labels: record.labels.into_iter().collect(),
        created_at: record.created.into(),
        updated_at: record.updated.into(),
    }
}

/// The gRPC-facing snapshotter.
#[derive(Debug, Clone)]
pub struct ClipSnapshotter {
    state: Arc<State>,
    metrics: Arc<Metrics>,
    /// Finds the layer of a Prepare without layer labels; `None` leaves such Prepares ordinary.
    lookup: Option<Arc<ContentLookup>>,
}

impl ClipSnapshotter {
    pub fn new(state: Arc<State>, metrics: Arc<Metrics>, lookup: Option<Arc<ContentLookup>>) -> Self {
        Self { state, metrics, lookup }
    }

    /// Runs `f` on a blocking thread inside `span`, records the outcome, maps the error.
    async fn call<T: Send + 'static>(
        &self,
        method: &'static str,
        span: tracing::Span,
        f: impl FnOnce(&State) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let state = self.state.clone();
        let start = Instant::now();
        let inner_span = span.clone();
        let result = tokio::task::spawn_blocking(move || inner_span.in_scope(|| f(&state)))
            .instrument(span.clone())
            .await
            .unwrap_or_else(|e| Err(SnapshotError::Database(Box::new(e))));
        let elapsed = start.elapsed();
        let _guard = span.enter();
        match &result {
            Ok(_) => {
                self.metrics.observe_call(method, "OK", elapsed);
                tracing::debug!(elapsed_us = elapsed.as_micros() as u64, "ok");
            }
            Err(e) => {
                let code = format!("{:?}", e.code());
                self.metrics.observe_call(method, &code, elapsed);
                match e {
                    SnapshotError::Database(_) | SnapshotError::Io { .. } => {
                        tracing::error!(error = %e, "failed");
                    }
                    _ => tracing::debug!(error = %e, code, "refused"),
                }
            }
        }
        result.map_err(Status::from)
    }
}

#[containerd_snapshots::tonic::async_trait]
impl containerd_snapshots::Snapshotter for ClipSnapshotter {
    type Error = Status;

    async fn stat(&self, key: String) -> std::result::Result<Info, Status> {
        let span = tracing::debug_span!("stat", key = %key);
        self.call("stat", span, move |s| {
            let r = s.store.resolve(&key)?;
            Ok(to_info(key, r.record))
        })
        .await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> std::result::Result<Info, Status> {
        let span = tracing::info_span!("update", key = %info.name, fieldpaths = ?fieldpaths);
        self.call("update", span, move |s| s.update(info, fieldpaths)).await
    }

    async fn usage(&self, key: String) -> std::result::Result<Usage, Status> {
        let span = tracing::debug_span!("usage", key = %key);
        let u = self.call("usage", span, move |s| s.usage(&key)).await?;
        Ok(Usage { inodes: u.inodes, size: u.size })
    }

    async fn mounts(&self, key: String) -> std::result::Result<Vec<Mount>, Status> {
        let span = tracing::debug_span!("mounts", key = %key);
        self.call("mounts", span, move |s| s.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<Mount>, Status> {
        let span = tracing::info_span!("prepare", key = %key, parent = %parent);
        let (labels, blob_check) = match (&self.lookup, &self.state.remote) {
            (Some(lookup), Some(_)) => {
                let labels = lookup.label_unlabelled(&parent, labels).instrument(span.clone()).await;
                let check = lookup.blob_check(&labels);
                (labels, check)
            }
            _ => (labels, BlobCheck::none()),
        };
        self.call("prepare", span, move |s| s.create(Kind::Active, &key, &parent, labels, &blob_check)).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<Mount>, Status> {
        let span = tracing::info_span!("view", key = %key, parent = %parent);
        self.call("view", span, move |s| s.create(Kind::View, &key, &parent, labels, &BlobCheck::none())).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> std::result::Result<(), Status> {
        let span = tracing::info_span!("commit", name = %name, key = %key);
        self.call("commit", span, move |s| s.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> std::result::Result<(), Status> {
        let span = tracing::info_span!("remove", key = %key);
        self.call("remove", span, move |s| s.remove(&key)).await
    }

    async fn clear(&self) -> std::result::Result<(), Status> {
        let span = tracing::info_span!("cleanup");
        self.call("cleanup", span, |s| s.cleanup().map(|_| ())).await
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<std::result::Result<Info, Status>>>;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> std::result::Result<Self::InfoStream, Status> {
        let span = tracing::debug_span!("walk", filters = ?filters);
        let infos = self.call("walk", span, move |s| s.list(&filters)).await?;
        Ok(futures::stream::iter(infos.into_iter().map(Ok).collect::<Vec<_>>()))
    }
}

/// The user-namespace mapping `labels` carry (containerd's `remap-ids` labels), checked.
fn id_map(labels: &std::collections::BTreeMap<String, String>) -> Result<Option<clip_config::idmap::IdMap>> {
    clip_config::idmap::IdMap::from_labels(labels).map_err(|e| SnapshotError::InvalidArgument(e.0))
}
