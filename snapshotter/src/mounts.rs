//! The mounts a snapshot is used through, the way containerd's overlayfs snapshotter makes them.
//!
//! - no parent: a bind mount of the snapshot's own `fs` (`rw` when active, `ro` for a view);
//! - a view of exactly one parent: a read-only bind mount of the parent's `fs`;
//! - otherwise overlayfs: `lowerdir` = the parents' `fs`, nearest first, and for an active
//!   snapshot `upperdir`/`workdir`. containerd's mount code shortens long `lowerdir` lists
//!   (128 layers and more) by mounting from their common parent directory. Over lazily
//!   served (FUSE) layers the overlay spans several file systems; `xino=on` makes it report
//!   one device and unique inode numbers for every entry, as overlayfs on one file system does
//!   (without it every non-directory shows its layer's device: `os.path.ismount` is true for
//!   files). Layer file systems number their inodes from 1, far below the bits xino keeps.
//!
//! A user-namespaced container's snapshot (containerd's `uidmapping`/`gidmapping` labels, see
//! [`clip_config::idmap`]) carries `uidmap=`/`gidmap=` options: containerd's mount code then
//! mounts the lower layers idmapped (clip's FUSE layers allow it) instead of copying and
//! chowning the whole root file system.

use crate::dirs::SnapshotDirs;
use crate::metadata::{Kind, Resolved};
use containerd_snapshots::api::types::Mount;

pub fn mounts_for(dirs: &SnapshotDirs, snapshot: &Resolved) -> Vec<Mount> {
    let id = snapshot.record.id;
    let kind = snapshot.record.kind;
    let parents = &snapshot.parent_ids;
    // A user-namespaced container's snapshot: containerd idmaps the lower layers (or the bind
    // mount) with these options. Its labels were checked when it was prepared.
    let id_map: Vec<String> = clip_config::idmap::IdMap::from_labels(&snapshot.record.labels)
        .ok()
        .flatten()
        .map_or_else(Vec::new, |m| m.mount_options().into());
    let bind = |path: std::path::PathBuf, ro: bool| Mount {
        r#type: "bind".into(),
        source: path.to_string_lossy().into_owned(),
        target: String::new(),
        options: [id_map.clone(), vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()]].concat(),
    };
    if parents.is_empty() {
        return vec![bind(dirs.fs(id), kind == Kind::View)];
    }
    if kind != Kind::Active && parents.len() == 1 {
        return vec![bind(dirs.fs(parents[0]), true)];
    }
    let mut options = id_map;
    if kind == Kind::Active {
        options.push(format!("workdir={}", dirs.work(id).display()));
        options.push(format!("upperdir={}", dirs.fs(id).display()));
    }
    let lower: Vec<String> = parents.iter().map(|p| dirs.fs(*p).to_string_lossy().into_owned()).collect();
    if snapshot.lazy_parents {
        options.push("xino=on".into());
    }
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount { r#type: "overlay".into(), source: "overlay".into(), target: String::new(), options }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Record, Timestamp};

    fn resolved(kind: Kind, parent_ids: Vec<u64>) -> Resolved {
        let now = Timestamp::now();
        Resolved {
            key: "k".into(),
            record: Record {
                id: 9,
                kind,
                parent: String::new(),
                labels: std::collections::BTreeMap::new(),
                created: now,
                updated: now,
                usage: None,
                remote: None,
            },
            parent_ids,
            lazy_parents: false,
        }
    }

    #[test]
    fn overlays_over_lazy_layers_use_xino() {
        let dirs = SnapshotDirs::open(tempfile::tempdir().expect("tmp").path()).expect("dirs");
        let mut r = resolved(Kind::Active, vec![3, 2]);
        assert!(!mounts_for(&dirs, &r)[0].options.iter().any(|o| o.starts_with("xino")));
        r.lazy_parents = true;
        assert!(mounts_for(&dirs, &r)[0].options.iter().any(|o| o == "xino=on"));
    }

    #[test]
    fn shapes() {
        let dirs = SnapshotDirs::open(tempfile::tempdir().expect("tmp").path()).expect("dirs");
        let m = mounts_for(&dirs, &resolved(Kind::Active, vec![]));
        assert_eq!((m[0].r#type.as_str(), m[0].options[0].as_str()), ("bind", "rw"));
        assert!(m[0].source.ends_with("/snapshots/9/fs"));
        let m = mounts_for(&dirs, &resolved(Kind::View, vec![3]));
        assert_eq!((m[0].r#type.as_str(), m[0].options[0].as_str()), ("bind", "ro"));
        assert!(m[0].source.ends_with("/snapshots/3/fs"));
        let m = mounts_for(&dirs, &resolved(Kind::Active, vec![3, 2]));
        assert_eq!(m[0].r#type, "overlay");
        let lower = &m[0].options[2];
        assert!(lower.starts_with("lowerdir=") && lower.contains("/snapshots/3/fs:"), "{lower}");
        assert!(lower.ends_with("/snapshots/2/fs"), "{lower}");
        assert!(m[0].options[1].starts_with("upperdir=") && m[0].options[1].ends_with("/9/fs"));
        let m = mounts_for(&dirs, &resolved(Kind::View, vec![3, 2]));
        assert_eq!(m[0].options.len(), 1);
        assert!(m[0].options[0].starts_with("lowerdir="));
    }

    #[test]
    fn user_namespaced_snapshots_ask_containerd_for_idmapped_mounts() {
        let dirs = SnapshotDirs::open(tempfile::tempdir().expect("tmp").path()).expect("dirs");
        for parents in [vec![], vec![3, 2]] {
            let mut r = resolved(Kind::Active, parents);
            r.record.labels.insert(clip_config::idmap::UID_MAPPING.into(), "0:65536:65536".into());
            r.record.labels.insert(clip_config::idmap::GID_MAPPING.into(), "0:131072:65536".into());
            let m = mounts_for(&dirs, &r);
            assert_eq!(&m[0].options[..2], ["uidmap=0:65536:65536", "gidmap=0:131072:65536"], "{m:?}");
            // A mapping that is not one (never stored: Prepare refuses it) asks for nothing.
            r.record.labels.insert(clip_config::idmap::GID_MAPPING.into(), "0:1".into());
            assert!(!mounts_for(&dirs, &r)[0].options.iter().any(|o| o.contains("map=")));
        }
    }
}
