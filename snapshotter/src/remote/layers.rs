//! The layer table: the lazy layers mounted here, by snapshot id; the layers a restart could not
//! serve yet and the FUSE connections the fd keeper handed back, until they are claimed; and a
//! gate per layer digest that orders the Prepares and Removes of one layer. A Remove deletes a
//! layer's caches only under the layer's gate, after seeing no snapshot left that uses it; a
//! Prepare holds the same gate from opening the layer until its snapshot is recorded. So the
//! Prepare comes wholly before (the layer is still in use: nothing is deleted) or wholly after
//! (it starts from fresh caches), never in between.
//!
//! Each map has its own lock, held only to look up, insert or take: a mount taken out is
//! unmounted after its lock is let go.

use clip_layerfs::keeper::Kept;
use clip_readpath::SpanCache;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// A mounted lazy layer.
pub(crate) struct Mounted {
    /// The FUSE session; dropping it unmounts.
    pub(crate) session: Option<fuser::BackgroundSession>,
    pub(crate) dir: PathBuf,
    pub(crate) spans: Arc<SpanCache>,
}

/// A layer a restart could not serve: its record, to serve it when next needed.
#[derive(Debug, Clone)]
pub(crate) struct Unservable(pub(crate) super::layout::RemoteLayer);

/// The lazy layers of the daemon.
#[derive(Default)]
pub struct LayerTable {
    mounts: Mutex<HashMap<u64, Mounted>>,
    unservable: Mutex<HashMap<u64, Unservable>>,
    kept: Mutex<HashMap<u64, Kept>>,
    /// Layers whose gate is held.
    gated: Mutex<HashSet<String>>,
    gate_opened: Condvar,
}

impl std::fmt::Debug for LayerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerTable").field("mounts", &self.mounts.lock().len()).finish_non_exhaustive()
    }
}

/// The gate of one layer, held: Prepares and Removes of that layer wait for it.
#[derive(Debug)]
#[must_use = "the gate is open again once this is dropped"]
pub struct LayerGate<'a> {
    table: &'a LayerTable,
    layer: String,
}

impl Drop for LayerGate<'_> {
    fn drop(&mut self) {
        self.table.gated.lock().remove(&self.layer);
        self.table.gate_opened.notify_all();
    }
}

impl LayerTable {
    /// The table of a daemon that found `kept` connections with its fd keeper.
    pub(crate) fn with_kept(kept: HashMap<u64, Kept>) -> Self {
        Self { kept: Mutex::new(kept), ..Self::default() }
    }

    /// Waits for the gate of `layer_digest` and holds it.
    pub fn gate(&self, layer_digest: &str) -> LayerGate<'_> {
        let mut gated = self.gated.lock();
        while gated.contains(layer_digest) {
            self.gate_opened.wait(&mut gated);
        }
        gated.insert(layer_digest.to_string());
        LayerGate { table: self, layer: layer_digest.to_string() }
    }

    /// Records a mount; returns the one it replaces (to be dropped by the caller).
    pub(crate) fn insert(&self, id: u64, mounted: Mounted) -> Option<Mounted> {
        self.mounts.lock().insert(id, mounted)
    }

    /// Takes snapshot `id`'s mount out of the table.
    pub(crate) fn take(&self, id: u64) -> Option<Mounted> {
        self.mounts.lock().remove(&id)
    }

    /// Takes every mount out of the table (shutdown).
    pub(crate) fn take_all(&self) -> Vec<Mounted> {
        self.mounts.lock().drain().map(|(_, m)| m).collect()
    }

    pub fn is_mounted(&self, id: u64) -> bool {
        self.mounts.lock().contains_key(&id)
    }

    /// The span cache of snapshot `id`'s mount.
    pub fn spans(&self, id: u64) -> Option<Arc<SpanCache>> {
        self.mounts.lock().get(&id).map(|m| m.spans.clone())
    }

    pub(crate) fn mark_unservable(&self, id: u64, layer: Unservable) {
        self.unservable.lock().insert(id, layer);
    }

    pub(crate) fn unservable(&self, id: u64) -> Option<Unservable> {
        self.unservable.lock().get(&id).cloned()
    }

    pub(crate) fn served_again(&self, id: u64) {
        self.unservable.lock().remove(&id);
    }

    /// The connection the keeper kept for snapshot `id`, taken.
    pub(crate) fn take_kept(&self, id: u64) -> Option<Kept> {
        self.kept.lock().remove(&id)
    }

    /// Every kept connection no snapshot claimed, taken.
    pub(crate) fn take_unclaimed(&self) -> Vec<(u64, Kept)> {
        self.kept.lock().drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_layer_gate_orders_its_holders_and_leaves_other_layers_alone() {
        let table = Arc::new(LayerTable::default());
        let held = table.gate("sha256:a");
        let entered = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (table, entered) = (table.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = table.gate("sha256:a");
                entered.store(true, Ordering::SeqCst);
            })
        };
        // Another layer's gate is free while the first is held.
        drop(table.gate("sha256:b"));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!entered.load(Ordering::SeqCst), "a second holder entered a held gate");
        drop(held);
        waiter.join().expect("waiter");
        assert!(entered.load(Ordering::SeqCst));
        assert!(table.gated.lock().is_empty());
    }
}
