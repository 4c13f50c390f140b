//! Where a lazy layer's FUSE mount is made, served again after a restart, and taken down.
//! Every new mount's `/dev/fuse` descriptor is also handed to the fd keeper
//! ([`clip_layerfs::keeper`]), so a restarted daemon finds its mounts alive and serves them
//! again ([`clip_layerfs::reattach`]) instead of breaking the containers that use them.

use super::{OpenedLayer, RemoteError, RemoteLayers};
use clip_config::SnapshotterConfig;
use clip_layerfs::keeper::{KeeperClient, Kept};
use clip_layerfs::session_state::SessionState;
use clip_layerfs::{self as layerfs, LayerFs};
use clip_readpath::{MissObserver, RangeFetcher, ReadObserver, SpanCache, SpanCacheOptions};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A mounted remote layer.
pub(super) struct Mounted {
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
    pub(super) spans: Arc<SpanCache>,
}

/// The daemon's link to its fd keeper: connected at start when one runs (to take back what
/// it holds), started with the first lazy mount otherwise.
#[derive(Debug)]
pub(super) struct KeeperHandle {
    root: PathBuf,
    orphan_timeout: std::time::Duration,
    enabled: bool,
    client: parking_lot::Mutex<Option<Arc<KeeperClient>>>,
    start_failed: std::sync::atomic::AtomicBool,
}

impl KeeperHandle {
    /// Connects to a running keeper and takes back what it holds, by snapshot id.
    pub(super) fn new(cfg: &SnapshotterConfig) -> (Self, HashMap<u64, Kept>) {
        let handle = Self {
            root: cfg.root.clone(),
            orphan_timeout: std::time::Duration::from_secs(cfg.lazy.orphan_timeout_s),
            enabled: cfg.lazy.survive_restarts,
            client: parking_lot::Mutex::new(None),
            start_failed: std::sync::atomic::AtomicBool::new(false),
        };
        if !handle.enabled {
            tracing::info!("survive_restarts is off: lazy mounts end with the daemon");
            return (handle, HashMap::new());
        }
        let Ok(client) = KeeperClient::connect_existing(&cfg.root) else {
            return (handle, HashMap::new());
        };
        let mut kept = HashMap::new();
        match client.list() {
            Ok(list) => {
                for k in list {
                    match k.key.parse::<u64>() {
                        Ok(id) => {
                            kept.insert(id, k);
                        }
                        Err(_) => {
                            let _ = client.drop_key(&k.key);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list the fd keeper's connections"),
        }
        tracing::info!(pid = client.pid, kept = kept.len(), "fd keeper connected");
        *handle.client.lock() = Some(Arc::new(client));
        (handle, kept)
    }

    /// The keeper, if one is connected.
    pub(super) fn connected(&self) -> Option<Arc<KeeperClient>> {
        self.client.lock().clone()
    }

    /// Hands a new mount's FUSE connection to the keeper, started if needed. Under the
    /// handle's lock, so that [`Self::stop_if_idle`] cannot stop the keeper in between.
    pub(super) fn keep(
        &self,
        key: &str,
        fd: std::os::fd::BorrowedFd<'_>,
        meta: &serde_json::Value,
    ) -> Result<(), RemoteError> {
        let mut guard = self.client.lock();
        if guard.is_none() && self.enabled && !self.start_failed.load(Ordering::Relaxed) {
            let started = std::env::current_exe()
                .map_err(RemoteError::io("finding this program"))
                .and_then(|exe| Ok(KeeperClient::connect_or_spawn(&self.root, &exe, self.orphan_timeout)?));
            match started {
                Ok(c) => {
                    tracing::info!(pid = c.pid, "fd keeper started");
                    *guard = Some(Arc::new(c));
                }
                Err(e) => {
                    self.start_failed.store(true, Ordering::Relaxed);
                    tracing::error!(error = %e, "no fd keeper; lazy mounts will not survive restarts");
                }
            }
        }
        match guard.as_ref() {
            Some(keeper) => Ok(keeper.put(key, fd, meta)?),
            None => Ok(()),
        }
    }

    /// Stops the keeper once it holds no connection (the last lazy layer went), so no idle
    /// process stays behind; the next lazy mount starts one again.
    pub(super) fn stop_if_idle(&self) {
        let mut guard = self.client.lock();
        let Some(keeper) = guard.as_ref() else { return };
        match keeper.list() {
            Ok(kept) if kept.is_empty() => {
                let pid = keeper.pid;
                match keeper.exit() {
                    Ok(()) => tracing::info!(pid, "fd keeper stopped: no lazy layer left"),
                    Err(e) => tracing::warn!(pid, error = %e, "the idle fd keeper did not stop"),
                }
                *guard = None;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot list the fd keeper's connections"),
        }
    }
}

impl RemoteLayers {
    fn layer_fs(
        &self,
        id: u64,
        layer: OpenedLayer,
        adopt: bool,
    ) -> Result<(LayerFs, Arc<SpanCache>, String), RemoteError> {
        let options = SpanCacheOptions {
            metrics: self.metrics.layer(&layer.layer_digest),
            readahead_spans: self.readahead_spans,
            foreground: Some(self.foreground.clone()),
            windows: layer.windows.map(|w| Arc::new(w) as Arc<dyn RangeFetcher>),
            budget: Some(self.budget.clone()),
            observer: self.prefetcher.clone().map(|p| p as Arc<dyn MissObserver>),
            reads: self.profiles.clone().map(|p| p as Arc<dyn ReadObserver>),
        };
        let spans =
            SpanCache::with_options(layer.index, self.span_dir(&layer.layer_digest), Arc::new(layer.source), options)
                .map_err(RemoteError::io("span cache"))?;
        let spans = Arc::new(spans);
        let files = self.files_dir(&layer.layer_digest);
        let state_dir = self.session_state_dir(id);
        let state = if adopt { SessionState::adopt(&state_dir) } else { SessionState::create(&state_dir) }
            .map_err(RemoteError::io(format!("session state {}", state_dir.display())))?;
        let fs = LayerFs::new(spans.clone());
        let fs = if self.passthrough { fs.with_passthrough(files) } else { fs };
        let fs = fs.with_session_state(state);
        Ok((fs, spans, layer.layer_digest))
    }

    fn insert(&self, id: u64, dir: &Path, session: fuser::BackgroundSession, spans: Arc<SpanCache>) {
        let mounted = Mounted { session: Some(session), dir: dir.to_path_buf(), spans };
        if let Some(c) = &self.completer {
            c.add(&mounted.spans);
        }
        if let Some(p) = &self.profiles {
            p.layer_mounted(&mounted.spans);
        }
        let old = self.mounts.lock().insert(id, mounted);
        drop(old);
    }

    fn session_state_dir(&self, id: u64) -> PathBuf {
        self.root.join("sessions").join(id.to_string())
    }

    /// Mounts an opened layer at `dir` as the snapshot `id`.
    pub fn mount(&self, id: u64, dir: &Path, layer: OpenedLayer) -> Result<(), RemoteError> {
        let (fs, spans, digest) = self.layer_fs(id, layer, false)?;
        let granted = fs.passthrough_granted();
        let (session, fd) =
            layerfs::mount(fs, dir, &digest).map_err(RemoteError::io(format!("FUSE mount at {}", dir.display())))?;
        let meta = serde_json::json!({
            "dir": dir,
            "layer": digest,
            "passthrough": granted.load(Ordering::Relaxed),
        });
        if let Err(e) = self.keeper.keep(&id.to_string(), fd.as_fd(), &meta) {
            tracing::warn!(id, error = %e, "the fd keeper refused the mount; it will not survive a restart");
        }
        self.insert(id, dir, session, spans);
        Ok(())
    }

    /// Serves snapshot `id`'s layer at `dir` after a restart: the kept FUSE connection when the
    /// mount is still there (running containers keep it), else a new mount.
    pub fn restore(&self, id: u64, dir: &Path, layer: OpenedLayer) -> Result<&'static str, RemoteError> {
        let kept = self.kept.lock().remove(&id);
        if let Some(k) = kept {
            if clip_fsutil::mountinfo::is_fuse_mount(dir)
                && k.meta.get("dir").and_then(serde_json::Value::as_str) == dir.to_str()
            {
                let passthrough = k.meta.get("passthrough").and_then(serde_json::Value::as_bool).unwrap_or(false);
                let (fs, spans, digest) = self.layer_fs(id, layer, true)?;
                let session = layerfs::reattach(fs, k.fd, &digest, passthrough)
                    .map_err(RemoteError::io(format!("serving the kept FUSE connection of {}", dir.display())))?;
                self.insert(id, dir, session, spans);
                return Ok("reattached");
            }
            if let Some(keeper) = self.keeper.connected() {
                let _ = keeper.drop_key(&id.to_string());
            }
        }
        // Nothing to serve again (a reboot, or the keeper died): a dead mount goes, a new one comes.
        crate::dirs::unmount_below(dir);
        self.mount(id, dir, layer).map(|()| "mounted")
    }

    /// Closes connections the keeper still holds for snapshots that no longer exist.
    pub fn forget_unclaimed(&self) {
        let rest: Vec<(u64, Kept)> = self.kept.lock().drain().collect();
        for (id, k) in rest {
            if let Some(dir) = k.meta.get("dir").and_then(serde_json::Value::as_str) {
                crate::dirs::unmount_below(Path::new(dir));
            }
            if let Some(keeper) = self.keeper.connected() {
                let _ = keeper.drop_key(&id.to_string());
            }
            tracing::info!(id, "closed a kept FUSE connection no snapshot uses");
        }
        self.keeper.stop_if_idle();
    }

    /// Unmounts the layer of snapshot `id`, if mounted here.
    pub fn unmount(&self, id: u64) {
        let removed = self.mounts.lock().remove(&id);
        if let Some(mut m) = removed {
            if let Err(e) = nix::mount::umount2(&m.dir, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(dir = %m.dir.display(), error = %e, "cannot unmount a layer");
            }
            // A fresh session's own unmount then finds nothing to do.
            drop(m.session.take());
        }
        let _ = std::fs::remove_dir_all(self.session_state_dir(id));
        if let Some(keeper) = self.keeper.connected()
            && let Err(e) = keeper.drop_key(&id.to_string())
        {
            tracing::warn!(id, error = %e, "the fd keeper did not close a connection");
        }
        self.keeper.stop_if_idle();
    }

    /// Remembers a layer a restart could not serve, to serve it when it is next needed.
    pub fn mark_unservable(&self, id: u64, image_ref: &str, layer_digest: &str) {
        self.unservable.lock().insert(id, (image_ref.to_string(), layer_digest.to_string()));
    }

    /// Serves the unservable layers among `ids` at `dir_of(id)`, fetching lost indexes.
    pub fn serve_unservable(&self, ids: &[u64], dir_of: impl Fn(u64) -> PathBuf) -> Result<(), RemoteError> {
        for id in ids {
            let entry = self.unservable.lock().get(id).cloned();
            let Some((image_ref, digest)) = entry else { continue };
            let dir = dir_of(*id);
            std::fs::create_dir_all(&dir).map_err(RemoteError::io(format!("creating {}", dir.display())))?;
            let layer = self.reopen(&image_ref, &digest, true).map_err(|e| RemoteError::Unservable {
                layer: digest.clone(),
                image: image_ref.clone(),
                source: Box::new(e),
            })?;
            self.mount(*id, &dir, layer)?;
            self.unservable.lock().remove(id);
            tracing::info!(id, layer = %digest, "an unservable layer is served again");
        }
        Ok(())
    }

    /// Whether snapshot `id`'s layer is served here.
    pub fn is_mounted(&self, id: u64) -> bool {
        self.mounts.lock().contains_key(&id)
    }

    /// Compressed bytes fetched so far for snapshot `id`'s layer.
    pub fn fetched_bytes(&self, id: u64) -> Option<u64> {
        self.mounts.lock().get(&id).map(|m| m.spans.stats().fetched_bytes.load(Ordering::Relaxed))
    }

    /// At shutdown: with a keeper, leave every mount to it (the next daemon serves them
    /// again; until then their reads wait); without one, unmount everything.
    pub fn shut_down(&self) {
        let all: Vec<Mounted> = self.mounts.lock().drain().map(|(_, m)| m).collect();
        if self.keeper.connected().is_some() {
            tracing::info!(mounts = all.len(), "leaving lazy mounts to the fd keeper for the next daemon");
            for mut m in all {
                // Dropping a session would unmount it.
                std::mem::forget(m.session.take());
            }
        } else {
            drop(all);
        }
    }
}
