//! Verification when complete: once background completion has made a layer wholly local, its
//! local stream is checked against the layer's diff ID in the image config and its tree against
//! the index it was served with ([`clip_readpath::verify`]). A layer found different is
//! poisoned: its reads fail with EIO from then on, its caches and index are evicted, a marker
//! (`poisoned/<key>`) keeps it from being served or shared again on this node, and an error
//! line and the `layers_poisoned` metric name the image, layer and index.

use super::layout::{CacheLayout, LayerKey};
use super::sessions::Sessions;
use crate::metrics::Metrics;
use clip_readpath::verify::{Verdict, verify_local};
use clip_readpath::{CacheBudget, CompletionObserver, SpanCache};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// What a mounted layer was opened for.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub(crate) key: LayerKey,
    pub(crate) image_ref: String,
    pub(crate) manifest_digest: Option<String>,
}

/// Verifies layers as they become complete.
pub struct Verifier {
    layout: CacheLayout,
    sessions: Arc<Sessions>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    /// The disk budget, to forget evicted caches (set once the read settings exist).
    pub(crate) budget: OnceLock<Arc<CacheBudget>>,
    /// What each span cache directory was mounted for.
    served: Mutex<HashMap<PathBuf, Served>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

impl Verifier {
    pub(crate) fn new(
        layout: CacheLayout,
        sessions: Arc<Sessions>,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { layout, sessions, runtime, metrics, budget: OnceLock::new(), served: Mutex::new(HashMap::new()) }
    }

    /// Remembers what the span cache at `dir` serves.
    pub(crate) fn serving(&self, dir: PathBuf, served: Served) {
        self.served.lock().insert(dir, served);
    }

    /// Forgets a span cache directory (its layer's caches were deleted).
    pub(crate) fn forget(&self, dir: &std::path::Path) {
        self.served.lock().remove(dir);
    }

    /// The layer's diff ID, from the config of the image it was opened for.
    fn diff_id(&self, served: &Served) -> Result<String, String> {
        let repo = self.sessions.repository(&served.image_ref).map_err(|e| e.to_string())?;
        let reference = served.manifest_digest.as_deref().unwrap_or(repo.image.manifest_reference());
        let layer = self.runtime.block_on(repo.image_layer(reference, &served.key.layer_digest));
        Ok(layer.map_err(|e| e.to_string())?.diff_id)
    }

    fn poison(&self, cache: &SpanCache, served: &Served, why: &str) {
        cache.poison();
        let key = &served.key;
        let index = key.index_blob.as_deref().unwrap_or("(unbound)");
        tracing::error!(
            image = %served.image_ref, layer = %key.layer_digest, index, reason = %why,
            "a complete layer is not what its index says: poisoned (reads fail with EIO; caches evicted; never served again here)"
        );
        self.metrics.poisoned(&served.image_ref, &key.layer_digest, index);
        let marker = self.layout.poisoned_path(key);
        if let Some(dir) = marker.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let text = format!("image {}\nreason {why}\n", served.image_ref);
        if let Err(e) = clip_fsutil::atomic_write(&marker, text.as_bytes(), 0o600, clip_fsutil::Durability::Durable) {
            tracing::error!(marker = %marker.display(), error = %e, "cannot record a poisoned layer");
        }
        let deleted = self.layout.delete_layer(key);
        if let Some(budget) = self.budget.get() {
            budget.forget_layer(&deleted.spans, &deleted.files);
        }
    }
}

impl CompletionObserver for Verifier {
    fn completed(&self, cache: &Arc<SpanCache>) {
        let Some(served) = self.served.lock().get(cache.dir()).cloned() else { return };
        let _span = tracing::info_span!("verify", layer = %served.key).entered();
        let diff_id = match self.diff_id(&served) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(image = %served.image_ref, error = %e, "the layer's diff ID is unknown: its tree alone is checked");
                None
            }
        };
        match verify_local(cache, diff_id.as_deref()) {
            Verdict::Same => {
                self.metrics.verified("same");
                tracing::info!(
                    diff_id = diff_id.as_deref().unwrap_or("(unknown)"),
                    "complete layer verified against its diff ID and index"
                );
            }
            Verdict::Unverifiable(why) => {
                self.metrics.verified("unverifiable");
                tracing::warn!(reason = %why, "a complete layer could not be verified");
            }
            Verdict::Differs(why) => {
                self.metrics.verified("differs");
                self.poison(cache, &served, &why);
            }
        }
    }
}
