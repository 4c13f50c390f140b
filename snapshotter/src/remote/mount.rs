//! Where a lazy layer's FUSE mount is made, served again after a restart, and taken down.
//! Every new mount's `/dev/fuse` descriptor is also handed to the fd keeper
//! ([`super::keeper`]), so a restarted daemon finds its mounts alive and serves them again
//! ([`clip_layerfs::reattach`]) instead of breaking the containers that use them.

use super::layers::{Mounted, Unservable};
use super::{OpenedLayer, RemoteError, RemoteLayers};
use crate::metadata::DiskUsage;
use clip_layerfs::keeper::Kept;
use clip_layerfs::session_state::SessionState;
use clip_layerfs::{self as layerfs, LayerFs};
use clip_readpath::{RangeFetcher, ReadObserver, SpanCache};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl RemoteLayers {
    fn layer_fs(
        &self,
        id: u64,
        layer: OpenedLayer,
        adopt: bool,
    ) -> Result<(LayerFs, Arc<SpanCache>, String), RemoteError> {
        let options = self.read.span_cache_options(
            self.metrics.layer(&layer.key.layer_digest),
            layer.windows.map(|w| Arc::new(w) as Arc<dyn RangeFetcher>),
            self.profiles.clone().map(|p| p as Arc<dyn ReadObserver>),
        );
        let span_dir = self.layout.span_dir(&layer.key);
        self.verifier.serving(
            span_dir.clone(),
            super::verify::Served {
                key: layer.key.clone(),
                image_ref: layer.image_ref.clone(),
                manifest_digest: layer.manifest_digest.clone(),
            },
        );
        let spans = SpanCache::with_options(layer.index, span_dir, Arc::new(layer.source), options)
            .map_err(RemoteError::io("span cache"))?;
        let spans = Arc::new(spans);
        let files = self.layout.files_dir(&layer.key);
        let state_dir = self.layout.session_state_dir(id);
        let state = if adopt { SessionState::adopt(&state_dir) } else { SessionState::create(&state_dir) }
            .map_err(RemoteError::io(format!("session state {}", state_dir.display())))?;
        let fs = LayerFs::new(spans.clone());
        let fs = if self.read.passthrough { fs.with_passthrough(files) } else { fs };
        let fs = fs.with_session_state(state);
        Ok((fs, spans, layer.key.layer_digest))
    }

    fn insert(&self, id: u64, dir: &Path, session: fuser::BackgroundSession, spans: Arc<SpanCache>) {
        let mounted = Mounted { session: Some(session), dir: dir.to_path_buf(), spans };
        if let Some(c) = &self.read.completer {
            c.add(&mounted.spans);
        }
        if let Some(p) = &self.profiles {
            p.layer_mounted(&mounted.spans);
        }
        let old = self.table.insert(id, mounted);
        drop(old);
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
        let kept = self.table.take_kept(id);
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
        clip_fsutil::mountinfo::unmount_below(dir);
        self.mount(id, dir, layer).map(|()| "mounted")
    }

    /// Closes connections the keeper still holds for snapshots that no longer exist.
    pub fn forget_unclaimed(&self) {
        let rest: Vec<(u64, Kept)> = self.table.take_unclaimed();
        for (id, k) in rest {
            if let Some(dir) = k.meta.get("dir").and_then(serde_json::Value::as_str) {
                clip_fsutil::mountinfo::unmount_below(Path::new(dir));
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
        let removed = self.table.take(id);
        if let Some(mut m) = removed {
            if let Err(e) = nix::mount::umount2(&m.dir, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(dir = %m.dir.display(), error = %e, "cannot unmount a layer");
            }
            // A fresh session's own unmount then finds nothing to do.
            drop(m.session.take());
        }
        let _ = std::fs::remove_dir_all(self.layout.session_state_dir(id));
        if let Some(keeper) = self.keeper.connected()
            && let Err(e) = keeper.drop_key(&id.to_string())
        {
            tracing::warn!(id, error = %e, "the fd keeper did not close a connection");
        }
        self.keeper.stop_if_idle();
    }

    /// Remembers a layer a restart could not serve, to serve it when it is next needed.
    pub fn mark_unservable(&self, id: u64, record: &super::RemoteLayer) {
        self.table.mark_unservable(id, Unservable(record.clone()));
    }

    /// Serves the unservable layers among `ids` at `dir_of(id)`, fetching lost indexes.
    pub fn serve_unservable(&self, ids: &[u64], dir_of: impl Fn(u64) -> PathBuf) -> Result<(), RemoteError> {
        for id in ids {
            let Some(Unservable(record)) = self.table.unservable(*id) else { continue };
            let dir = dir_of(*id);
            std::fs::create_dir_all(&dir).map_err(RemoteError::io(format!("creating {}", dir.display())))?;
            let digest = record.layer_digest.clone();
            let layer = self.reopen(&record, true).map_err(|e| RemoteError::Unservable {
                layer: digest.clone(),
                image: record.image_ref.clone(),
                source: Box::new(e),
            })?;
            self.mount(*id, &dir, layer)?;
            self.table.served_again(*id);
            tracing::info!(id, layer = %digest, "an unservable layer is served again");
        }
        Ok(())
    }

    /// Whether snapshot `id`'s layer is served here.
    pub fn is_mounted(&self, id: u64) -> bool {
        self.table.is_mounted(id)
    }

    /// What snapshot `id`'s lazy layer holds on this node: the bytes and files of its local
    /// spans (its `Usage`, which containerd sums into the image file system kubelet collects).
    pub fn cached_usage(&self, id: u64) -> Option<DiskUsage> {
        self.table.spans(id).map(|s| DiskUsage {
            size: i64::try_from(s.local_bytes()).unwrap_or(i64::MAX),
            inodes: i64::from(s.local_spans()),
        })
    }

    /// Compressed bytes fetched so far for snapshot `id`'s layer.
    pub fn fetched_bytes(&self, id: u64) -> Option<u64> {
        self.table.spans(id).map(|s| s.metrics().fetched_bytes.get())
    }

    /// At shutdown: with a keeper, leave every mount to it (the next daemon serves them
    /// again; until then their reads wait); without one, unmount everything.
    pub fn shut_down(&self) {
        let all: Vec<Mounted> = self.table.take_all();
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
