//! The cache layout: where a lazy layer's files live under the daemon's root — its index and
//! windows sidecar (`indexes/`), its span cache (`spans/`), its passthrough copies (`files/`) —
//! and each mount's FUSE session state (`sessions/<id>`).
//!
//! A layer's caches are keyed by the layer *and the index it is served with* ([`LayerKey`]):
//! two images that share a layer share its caches only when their own index artifacts name
//! the same index blob, so one image's index never decides what another image's layer shows.
//! Digests are file names only after they were checked ([`clip_config::digest`]).

use std::path::{Path, PathBuf};

/// Registries a client asked to reach over plain HTTP, a host a line, under the root.
const PLAIN_HTTP_FILE: &str = "plain-http-registries";

/// The paths of the lazy layers under one root.
#[derive(Debug, Clone)]
pub struct CacheLayout {
    root: PathBuf,
}

/// What [`CacheLayout::delete_layer`] deleted, for the disk budget.
#[derive(Debug)]
pub struct DeletedLayer {
    pub spans: PathBuf,
    pub files: PathBuf,
}

fn file_name(layer_digest: &str) -> String {
    layer_digest.replace(':', "-")
}

/// What a served layer's caches are keyed by: the layer and the index blob that describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerKey {
    pub layer_digest: String,
    /// `None`: a layer recorded by an earlier version, keyed by the layer alone.
    pub index_blob: Option<String>,
}

impl LayerKey {
    pub fn bound(layer_digest: &str, index_blob: &str) -> Self {
        Self { layer_digest: layer_digest.to_string(), index_blob: Some(index_blob.to_string()) }
    }

    /// The file name the key's caches go by.
    pub fn file_name(&self) -> String {
        match &self.index_blob {
            Some(blob) => format!("{}.{}", file_name(&self.layer_digest), file_name(blob)),
            None => file_name(&self.layer_digest),
        }
    }
}

/// What a snapshot's record keeps of its lazy layer, to serve it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteLayer {
    pub image_ref: String,
    pub layer_digest: String,
    /// The index blob the layer is served with, from the image's own index artifact: the
    /// layer's caches are keyed by layer and index together. `None` in records of earlier
    /// versions, whose caches are keyed by the layer alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_blob: Option<String>,
    /// The windows blob of an index without windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_blob: Option<String>,
}

impl RemoteLayer {
    /// The key the layer's caches go by.
    pub fn key(&self) -> LayerKey {
        LayerKey { layer_digest: self.layer_digest.clone(), index_blob: self.index_blob.clone() }
    }
}

impl std::fmt::Display for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.index_blob {
            Some(blob) => write!(f, "{} (index {blob})", self.layer_digest),
            None => f.write_str(&self.layer_digest),
        }
    }
}

impl CacheLayout {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stored index of a layer.
    pub fn index_path(&self, key: &LayerKey) -> PathBuf {
        self.root.join("indexes").join(format!("{}.clip", key.file_name()))
    }

    /// The digest of the windows blob of an index without windows, beside the index.
    pub fn windows_path(index_path: &Path) -> PathBuf {
        index_path.with_extension("windows")
    }

    /// Every layer's span cache is below this.
    pub fn spans_root(&self) -> PathBuf {
        self.root.join("spans")
    }

    /// Every layer's passthrough copies are below this.
    pub fn files_root(&self) -> PathBuf {
        self.root.join("files")
    }

    pub fn span_dir(&self, key: &LayerKey) -> PathBuf {
        self.spans_root().join(key.file_name())
    }

    pub fn files_dir(&self, key: &LayerKey) -> PathBuf {
        self.files_root().join(key.file_name())
    }

    /// The FUSE session state of snapshot `id`'s mount (survives restarts with the mount).
    pub fn session_state_dir(&self, id: u64) -> PathBuf {
        self.root.join("sessions").join(id.to_string())
    }

    /// The marker of a layer found not to be what its index says (never served again).
    pub fn poisoned_path(&self, key: &LayerKey) -> PathBuf {
        self.root.join("poisoned").join(key.file_name())
    }

    pub fn profiles_dir(&self) -> PathBuf {
        self.root.join("profiles")
    }

    pub fn plain_http_file(&self) -> PathBuf {
        self.root.join(PLAIN_HTTP_FILE)
    }

    /// Deletes everything kept for a layer: its span cache, passthrough copies and index. The
    /// caller orders this after the layer's last use ([`super::layers::LayerTable::gate`]).
    pub fn delete_layer(&self, key: &LayerKey) -> DeletedLayer {
        let deleted = DeletedLayer { spans: self.span_dir(key), files: self.files_dir(key) };
        for dir in [&deleted.spans, &deleted.files] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a layer cache");
            }
        }
        let index = self.index_path(key);
        let _ = std::fs::remove_file(Self::windows_path(&index));
        let _ = std::fs::remove_file(&index);
        deleted
    }
}
