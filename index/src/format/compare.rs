//! [`Index::tree_difference`]: whether two indexes describe the same file tree — what a node
//! checks once a layer is wholly local, between the index it served and one it derived from
//! the layer's own bytes.

use super::view::{Entry, Index};
use crate::IndexError;

/// The fields of an entry that decide what a reader sees (not where records lie in the file),
/// named.
fn seen(e: &Entry<'_>) -> [(&'static str, String); 15] {
    let bytes = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    [
        ("parent", e.parent.to_string()),
        ("name", bytes(e.name)),
        ("kind", e.kind.name().to_string()),
        ("mode", format!("{:o}", e.mode)),
        ("uid", e.uid.to_string()),
        ("gid", e.gid.to_string()),
        ("links", e.nlink.to_string()),
        ("mtime", format!("{}.{:09}", e.mtime_sec, e.mtime_nsec)),
        ("size", e.size.to_string()),
        ("data offset", e.data_offset.to_string()),
        ("link target", bytes(e.link)),
        ("hardlink target", e.hardlink_target.to_string()),
        ("children", format!("{}+{}", e.first_child, e.child_count)),
        ("device", format!("{}:{}", e.dev_major, e.dev_minor)),
        ("kind code", format!("{:?}", e.kind)),
    ]
}

impl Index {
    /// The first difference between the file trees of `self` and `other` (names, kinds, modes,
    /// owners, times, sizes, data offsets, link targets, devices, xattrs), or `None`. The pages
    /// of a mapped index that the comparison touched are released again.
    pub fn tree_difference(&self, other: &Index) -> Result<Option<String>, IndexError> {
        let difference = self.first_difference(other);
        self.release_resident();
        other.release_resident();
        difference
    }

    fn first_difference(&self, other: &Index) -> Result<Option<String>, IndexError> {
        if self.uncompressed_size() != other.uncompressed_size() {
            return Ok(Some(format!(
                "tar stream of {} bytes, not {}",
                other.uncompressed_size(),
                self.uncompressed_size()
            )));
        }
        if self.entry_count() != other.entry_count() {
            return Ok(Some(format!("{} entries, not {}", other.entry_count(), self.entry_count())));
        }
        for id in 0..self.entry_count() {
            let (a, b) = (self.entry(id)?, other.entry(id)?);
            let path = || self.path_of(id).unwrap_or_else(|_| format!("entry {id}"));
            for ((field, ours), (_, theirs)) in seen(&a).into_iter().zip(seen(&b)) {
                if ours != theirs {
                    return Ok(Some(format!("{}: {field} {ours:?} in the index, {theirs:?} in the layer", path())));
                }
            }
            if self.xattrs(&a)? != other.xattrs(&b)? {
                return Ok(Some(format!("{}: xattrs differ", path())));
            }
        }
        Ok(None)
    }

    /// The path of entry `id` from the root (for messages).
    fn path_of(&self, mut id: u32) -> Result<String, IndexError> {
        let mut parts = Vec::new();
        while id != 0 && parts.len() < 4096 {
            let e = self.entry(id)?;
            parts.push(String::from_utf8_lossy(e.name).into_owned());
            id = e.parent;
        }
        parts.reverse();
        Ok(format!("/{}", parts.join("/")))
    }
}

#[cfg(test)]
mod tests {
    use crate::{BuildOptions, build_index};

    fn tar_of(files: &[(&str, u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, uid) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o644);
            h.set_uid(u64::from(*uid));
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, &b"abc"[..]).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn same_trees_agree_and_an_owner_changed_is_named() {
        let opts = BuildOptions::default();
        let a = build_index(&tar_of(&[("etc/passwd", 0), ("bin/sh", 0)])[..], &opts).expect("a");
        let b = build_index(&tar_of(&[("etc/passwd", 0), ("bin/sh", 0)])[..], &opts).expect("b");
        assert_eq!(a.tree_difference(&b).expect("compare"), None);
        let c = build_index(&tar_of(&[("etc/passwd", 4242), ("bin/sh", 0)])[..], &opts).expect("c");
        let d = a.tree_difference(&c).expect("compare").expect("a difference");
        assert!(d.starts_with("/etc/passwd"), "{d}");
    }
}
