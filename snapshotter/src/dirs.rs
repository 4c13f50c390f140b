//! The snapshot directories under `<root>/snapshots`: `<id>/fs` (the layer or upper dir) and
//! `<id>/work` (overlayfs's work dir). Named by id, never by key.

use crate::error::{Result, SnapshotError};
use crate::metadata::DiskUsage;
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Paths and directory operations of the snapshot tree.
#[derive(Debug, Clone)]
pub struct SnapshotDirs {
    base: PathBuf,
}

impl SnapshotDirs {
    pub fn open(root: &Path) -> Result<Self> {
        let base = root.join("snapshots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(|e| SnapshotError::io(format!("creating {}", base.display()), e))?;
        Ok(Self { base })
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.base.join(id.to_string())
    }

    /// The layer contents (committed) or the upper dir (active).
    pub fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Gives `<id>/fs` (an active snapshot's upper dir) to a user-namespaced container's root
    /// (`uid`, `gid` on the host), as containerd's overlayfs snapshotter does: the container may
    /// then create files at the top of its root file system.
    pub fn give_upper_to(&self, id: u64, (uid, gid): (u32, u32)) -> Result<()> {
        let fs = self.fs(id);
        std::os::unix::fs::lchown(&fs, Some(uid), Some(gid))
            .map_err(|e| SnapshotError::io(format!("chown {}", fs.display()), e))
    }

    /// Creates `<id>/fs` (0755) and `<id>/work` (0711) atomically: built under a temporary
    /// name and renamed into place. A leftover directory of the same id is an orphan of a
    /// crashed transaction (the id was never recorded) and is replaced.
    pub fn create(&self, id: u64) -> Result<()> {
        let tmp = self.base.join(format!("new-{id}"));
        let target = self.dir(id);
        for stale in [&tmp, &target] {
            remove_tree(stale)?;
        }
        let mk = |p: &Path, mode: u32| -> Result<()> {
            fs::DirBuilder::new()
                .mode(mode)
                .create(p)
                .map_err(|e| SnapshotError::io(format!("creating {}", p.display()), e))?;
            // The umask must not change what containers see.
            fs::set_permissions(p, fs::Permissions::from_mode(mode))
                .map_err(|e| SnapshotError::io(format!("chmod {}", p.display()), e))
        };
        mk(&tmp, 0o700)?;
        mk(&tmp.join("fs"), 0o755)?;
        mk(&tmp.join("work"), 0o711)?;
        fs::rename(&tmp, &target)
            .map_err(|e| SnapshotError::io(format!("renaming {} to {}", tmp.display(), target.display()), e))
    }

    /// Deletes a snapshot's directory. It is first renamed out of the id namespace, so a
    /// half-deleted tree is never mistaken for a live snapshot.
    pub fn remove(&self, id: u64) -> Result<()> {
        let dir = self.dir(id);
        if !dir.exists() {
            return Ok(());
        }
        let trash = self.base.join(format!("rm-{id}-{}", std::process::id()));
        fs::rename(&dir, &trash).map_err(|e| SnapshotError::io(format!("renaming {}", dir.display()), e))?;
        remove_tree(&trash)
    }

    /// Deletes every entry of `snapshots/` that is not the directory of an id in `live`:
    /// leftovers of crashes (`new-*`, `rm-*`, unrecorded ids). Returns what was removed.
    pub fn remove_orphans(&self, live: &HashSet<u64>) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let entries =
            fs::read_dir(&self.base).map_err(|e| SnapshotError::io(format!("listing {}", self.base.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| SnapshotError::io(format!("listing {}", self.base.display()), e))?;
            let name = entry.file_name();
            let keep = name.to_str().and_then(|n| n.parse::<u64>().ok()).is_some_and(|id| live.contains(&id));
            if !keep {
                remove_tree(&entry.path())?;
                removed.push(entry.path());
            }
        }
        Ok(removed)
    }

    /// Real disk usage of `<id>/fs`: allocated blocks of each inode counted once, and the
    /// number of inodes (the directory itself included), like containerd's `fs.DiskUsage`.
    pub fn usage(&self, id: u64) -> Result<DiskUsage> {
        disk_usage(&self.fs(id))
    }
}

fn disk_usage(root: &Path) -> Result<DiskUsage> {
    let mut seen = HashSet::new();
    let mut usage = DiskUsage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            // Something removed concurrently does not use space any more.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SnapshotError::io(format!("stat {}", path.display()), e)),
        };
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            let entries =
                fs::read_dir(&path).map_err(|e| SnapshotError::io(format!("listing {}", path.display()), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| SnapshotError::io(format!("listing {}", path.display()), e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// `rm -rf` that tolerates a missing path, after detaching mounts below it.
fn remove_tree(path: &Path) -> Result<()> {
    clip_fsutil::mountinfo::unmount_below(path);
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotError::io(format!("stat {}", path.display()), e)),
        Ok(md) if md.is_dir() => {
            fs::remove_dir_all(path).map_err(|e| SnapshotError::io(format!("removing {}", path.display()), e))
        }
        Ok(_) => fs::remove_file(path).map_err(|e| SnapshotError::io(format!("removing {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_usage_and_orphans() {
        let root = tempfile::tempdir().expect("tempdir");
        let dirs = SnapshotDirs::open(root.path()).expect("open");
        dirs.create(1).expect("create 1");
        dirs.create(2).expect("create 2");
        let md = fs::metadata(dirs.fs(1)).expect("stat fs");
        assert_eq!(md.permissions().mode() & 0o777, 0o755);
        fs::write(dirs.fs(1).join("f"), vec![7u8; 10_000]).expect("write");
        fs::hard_link(dirs.fs(1).join("f"), dirs.fs(1).join("g")).expect("link");
        let u = dirs.usage(1).expect("usage");
        assert_eq!(u.inodes, 2, "dir + one file counted once despite the hard link");
        assert!(u.size >= 10_000, "{u:?}");
        fs::create_dir(root.path().join("snapshots/new-9")).expect("leftover");
        let removed = dirs.remove_orphans(&HashSet::from([1])).expect("orphans");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(dirs.fs(1).exists() && !dirs.dir(2).exists());
        dirs.remove(1).expect("remove");
        assert!(!dirs.dir(1).exists());
    }
}
