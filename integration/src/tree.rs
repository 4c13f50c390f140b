//! A file tree as a comparable value: what a container sees of a root file system.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One entry: type, all mode bits, owner, size, link count, link target, device, xattrs
/// and the sha256 of a regular file's contents, whether it reports the root's device (on
/// overlayfs every entry does: nothing looks like a mount point), and which entry is the
/// first (by path) of its hardlink group. Times are left out (directories touched by layer
/// application differ between snapshotters without meaning anything); inode numbers too
/// (they differ between file systems), but which entries share an inode is compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryDesc {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub link: Option<PathBuf>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub sha256: Option<String>,
    /// `st_dev` equals the root's.
    pub root_device: bool,
    /// For a non-directory with more than one link: the smallest path with the same
    /// `(st_dev, st_ino)`.
    pub hardlink_group: Option<PathBuf>,
}

/// Every entry below `root` by relative path (the root itself is `""`), without overlayfs's
/// own `trusted.overlay.*` attributes (what a container sees).
pub fn describe_tree(root: &Path) -> Result<BTreeMap<PathBuf, EntryDesc>> {
    describe_tree_with(root, false)
}

/// [`describe_tree`], keeping `trusted.overlay.*` attributes when `overlay_xattrs` (to
/// compare a layer's own directory, where `trusted.overlay.opaque` matters).
pub fn describe_tree_with(root: &Path, overlay_xattrs: bool) -> Result<BTreeMap<PathBuf, EntryDesc>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<PathBuf, (u64, u64)> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let md = fs::symlink_metadata(&path).with_context(|| format!("lstat {}", path.display()))?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let sha256 = if kind == 'f' {
            let mut f = fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).with_context(|| format!("read {}", path.display()))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Some(hex::encode(h.finalize()))
        } else {
            None
        };
        let link = if kind == 'l' { Some(fs::read_link(&path)?) } else { None };
        inodes.insert(rel.clone(), (md.dev(), md.ino()));
        out.insert(
            rel.clone(),
            EntryDesc {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if kind == 'd' { 0 } else { md.size() },
                nlink: if kind == 'd' { 0 } else { md.nlink() },
                link,
                rdev: md.rdev(),
                xattrs: xattrs(&path, overlay_xattrs),
                sha256,
                root_device: false,
                hardlink_group: None,
            },
        );
        if kind == 'd' {
            for entry in fs::read_dir(&path).with_context(|| format!("readdir {}", path.display()))? {
                stack.push(rel.join(entry?.file_name()));
            }
        }
    }
    let root_dev = inodes.get(Path::new("")).map(|(d, _)| *d);
    let mut first_of: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    for (rel, e) in &mut out {
        let id = inodes[rel];
        e.root_device = Some(id.0) == root_dev;
        if e.kind != 'd' && e.nlink > 1 {
            // BTreeMap order: the first path seen for an inode is the smallest.
            e.hardlink_group = Some(first_of.entry(id).or_insert_with(|| rel.clone()).clone());
        }
    }
    Ok(out)
}

fn xattrs(path: &Path, overlay_xattrs: bool) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(names) = xattr::list(path) else {
        return out;
    };
    for name in names {
        let name = name.to_string_lossy().into_owned();
        // overlayfs-internal attributes are not part of what a container sees.
        if name.starts_with("trusted.overlay.") && !overlay_xattrs {
            continue;
        }
        if let Ok(Some(v)) = xattr::get(path, &name) {
            out.insert(name, v);
        }
    }
    out
}

/// Differences between two trees, at most `limit` of them, readable in a test failure.
pub fn diff_trees(
    left: &BTreeMap<PathBuf, EntryDesc>,
    right: &BTreeMap<PathBuf, EntryDesc>,
    limit: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, l) in left {
        match right.get(path) {
            None => out.push(format!("only left: {}", path.display())),
            Some(r) if r != l => out.push(format!("{}: {l:?} != {r:?}", path.display())),
            Some(_) => {}
        }
    }
    for path in right.keys() {
        if !left.contains_key(path) {
            out.push(format!("only right: {}", path.display()));
        }
    }
    out.truncate(limit);
    out
}
