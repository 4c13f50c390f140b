//! The cache layout: where a lazy layer's files live under the daemon's root — its index and
//! windows sidecar (`indexes/`), its span cache (`spans/`), its passthrough copies (`files/`) —
//! and each mount's FUSE session state (`sessions/<id>`). Layer digests are file names only
//! after label parsing checked them ([`clip_config::labels::RemoteRequest`]).

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

impl CacheLayout {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stored index of a layer.
    pub fn index_path(&self, layer_digest: &str) -> PathBuf {
        self.root.join("indexes").join(format!("{}.clip", file_name(layer_digest)))
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

    pub fn span_dir(&self, layer_digest: &str) -> PathBuf {
        self.spans_root().join(file_name(layer_digest))
    }

    pub fn files_dir(&self, layer_digest: &str) -> PathBuf {
        self.files_root().join(file_name(layer_digest))
    }

    /// The FUSE session state of snapshot `id`'s mount (survives restarts with the mount).
    pub fn session_state_dir(&self, id: u64) -> PathBuf {
        self.root.join("sessions").join(id.to_string())
    }

    pub fn profiles_dir(&self) -> PathBuf {
        self.root.join("profiles")
    }

    pub fn plain_http_file(&self) -> PathBuf {
        self.root.join(PLAIN_HTTP_FILE)
    }

    /// Deletes everything kept for a layer: its span cache, passthrough copies and index. The
    /// caller orders this after the layer's last use ([`super::layers::LayerTable::gate`]).
    pub fn delete_layer(&self, layer_digest: &str) -> DeletedLayer {
        let deleted = DeletedLayer { spans: self.span_dir(layer_digest), files: self.files_dir(layer_digest) };
        for dir in [&deleted.spans, &deleted.files] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a layer cache");
            }
        }
        let index = self.index_path(layer_digest);
        let _ = std::fs::remove_file(Self::windows_path(&index));
        let _ = std::fs::remove_file(&index);
        deleted
    }
}
