//! A private temp dir for one test: everything a test starts lives below it.

use anyhow::Result;
use std::path::{Path, PathBuf};

/// A temp dir under `$CLIP_TEST_TMP` (default `/var/tmp`: on disk, so overlay upper dirs work).
/// On drop it unmounts whatever is still mounted below it, then deletes it, unless
/// `CLIP_KEEP_TEST_DIRS` is set (for post-mortems).
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(name: &str) -> Result<Self> {
        let base = std::env::var_os("CLIP_TEST_TMP").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        std::fs::create_dir_all(&base)?;
        let dir = tempfile::Builder::new().prefix(&format!("clip-{name}-")).tempdir_in(base)?;
        Ok(Self { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/nonexistent"), tempfile::TempDir::path)
    }

    /// How many of clip's lazy layers (its FUSE mounts, source `clip:sha256:...`) are mounted
    /// below this dir now.
    pub fn lazy_layers(&self) -> usize {
        clip_fsutil::mountinfo::mounts()
            .iter()
            .filter(|m| m.source.starts_with("clip:sha256:") && m.mount_point.starts_with(self.path()))
            .count()
    }

    /// `path()/sub`, created.
    pub fn sub(&self, sub: &str) -> Result<PathBuf> {
        let p = self.path().join(sub);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        crate::unmount_below(dir.path());
        if std::env::var_os("CLIP_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", dir.keep().display());
        }
    }
}
