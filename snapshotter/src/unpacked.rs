//! The Prepare of a layer no index serves, unpacked here ([`crate::remote::unpack`]): an active
//! snapshot is created under containerd's key, the layer is downloaded and unpacked into its
//! directory, and it is committed under the target name, so containerd's unpacker finds the
//! target and neither downloads nor unpacks the layer. On any failure the snapshot goes and
//! the caller falls back to an ordinary snapshot containerd unpacks — except when the unpack
//! stopped to keep the disk from filling (`[lazy] unpack_min_free_mb`): then the Prepare fails,
//! since containerd's unpack of the same layer would fill it.

use crate::error::SnapshotError;
use crate::labels::SnapshotLabels;
use crate::metadata::Kind;
use crate::remote::{RemoteError, RemoteLayers};
use crate::service::{RemoteFallback, State, not_lazy_reason};
use clip_config::labels::{NOT_LAZY_REASON, RemoteRequest, UNPACKED_BY_CLIP};
use std::path::PathBuf;
use std::time::Instant;

/// Ends the key of the active snapshot a layer is unpacked into until it is committed.
const UNPACKING: &str = " (unpacking)";

impl State {
    /// Unpacks `req`'s layer as the committed snapshot `req.target` over `parent`. `why`: why
    /// it is not served lazily (kept in the snapshot's `clip.not-lazy` label).
    pub(crate) fn prepare_unpacked(
        &self,
        remote: &RemoteLayers,
        key: &str,
        parent: &str,
        labels: &SnapshotLabels,
        req: &RemoteRequest,
        why: &RemoteError,
    ) -> Result<(), RemoteFallback> {
        let fallback = |e: RemoteError| RemoteFallback::Reason(SnapshotError::from(e));
        let started = Instant::now();
        let source = remote.unpack_source(req).map_err(&fallback)?;
        let parents: Vec<PathBuf> = if parent.is_empty() {
            Vec::new()
        } else {
            let p = self.store.resolve(parent).map_err(RemoteFallback::Error)?;
            let mut ids = p.parent_ids.clone();
            ids.insert(0, p.record.id);
            self.serve_unservable(&ids).map_err(RemoteFallback::Reason)?;
            ids.iter().map(|id| self.dirs.fs(*id)).collect()
        };
        let mut stored = labels.stored.clone();
        stored.insert(NOT_LAZY_REASON.into(), not_lazy_reason(&why.to_string()));
        // Unpacked under a key of its own, committed under containerd's key as a lazy layer is.
        let unpacking = format!("{key}{UNPACKING}");
        let created = self
            .store
            .create(Kind::Active, &unpacking, parent, stored.clone(), |id| self.dirs.create(id))
            .map_err(RemoteFallback::Error)?;
        let id = created.record.id;
        let discard = || {
            let _ = self.store.remove(&unpacking);
            self.remove_dir(id);
        };
        let unpacked = match remote.unpack(&source, &self.dirs.fs(id), &parents) {
            Ok(u) => u,
            Err(e @ RemoteError::Unpack { source: clip_unpack::UnpackError::DiskReserve { .. }, .. }) => {
                // containerd's own unpack would go on until the disk is full: the Prepare fails.
                discard();
                tracing::error!(layer = %req.layer_digest, image = %req.image_ref, error = %e, "unpacking a layer here stopped: the disk is too full for it");
                return Err(RemoteFallback::Error(SnapshotError::FailedPrecondition(e.to_string())));
            }
            Err(e) => {
                discard();
                tracing::warn!(layer = %req.layer_digest, image = %req.image_ref, error = %e, "unpacking a layer here failed; containerd unpacks it");
                return Err(fallback(e));
            }
        };
        stored.insert(UNPACKED_BY_CLIP.into(), unpacked.diff_id.clone());
        let committed = self.dirs.usage(id).and_then(|usage| self.store.commit(&unpacking, key, stored, usage));
        if let Err(e) = committed {
            discard();
            return Err(RemoteFallback::Error(e));
        }
        self.store.claim_target(key, parent, &req.target).map_err(RemoteFallback::Error)?;
        tracing::info!(
            layer = %req.layer_digest, image = %req.image_ref, id, entries = unpacked.entries,
            compressed = source.layer.size, uncompressed = unpacked.uncompressed_bytes,
            seconds = format_args!("{:.2}", started.elapsed().as_secs_f64()),
            reason = %why, "layer downloaded and unpacked here (no index serves it)"
        );
        Ok(())
    }

    /// Removes the snapshots of unpacks a previous run of the daemon did not finish (killed
    /// mid-download): no Prepare outlives the daemon, and containerd never learned their keys,
    /// so nothing else would remove them or the partial trees they hold. Startup only (an
    /// unpack is in progress at any other time). Returns how many were removed.
    pub fn discard_interrupted_unpacks(&self) -> crate::error::Result<usize> {
        let mut removed = 0;
        for (key, record) in self.store.list()? {
            if record.kind == Kind::Active && key.ends_with(UNPACKING) {
                self.store.remove(&key)?;
                self.remove_dir(record.id);
                tracing::info!(snapshot = %key, id = record.id, "removed the snapshot of an unpack the daemon did not finish");
                removed += 1;
            }
        }
        Ok(removed)
    }
}
