//! Turns tar entries into the index's tree: normalised paths, implicit parent directories,
//! last-entry-wins duplicates, resolved hardlinks, link counts, and breadth-first ids so that
//! every directory's children are contiguous and sorted by name.
//!
//! Compact for layers of millions of entries: a node is a fixed record that names its parent by
//! id and its name by a range of one names buffer; a directory's children are found through one
//! hash table keyed by (parent id, name); link targets, xattrs and device numbers, which few
//! entries have, live in side tables. The finished tree is put in breadth-first order in place
//! and encoded straight into the index's buffer ([`EntryEncoder`]), never copied into records
//! first: the strings in order, then the records last first, the nodes' memory given back as
//! the records' is taken, so the two are never whole at once (64 + 88 MB for a million entries).

use super::header::{normalize, split_last, tar_fields};
use crate::IndexError;
use crate::format::{EntryEncoder, EntryKind, EntryRecord};
use hashbrown::HashMap;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::io::Read;

/// Most entries one layer may hold (guards memory on hostile input).
pub const MAX_ENTRIES: usize = 16 << 20;
/// While the records are written, the nodes' memory goes back every this many nodes (1 MiB).
const RELEASE_EVERY: usize = 16 << 10;

/// One entry (ids in order of first mention; the root is 0; a parent's id is below its
/// children's, since a path's parents are made before it).
#[derive(Debug, Clone, Copy)]
struct Node {
    parent: u32,
    name_off: u32,
    name_len: u32,
    kind: EntryKind,
    mode: u32,
    /// uid, gid.
    owner: (u32, u32),
    /// Position in the tar stream (0 for implicit directories): the last header wins. Once the
    /// nodes are put in breadth-first order, the node's id before it ([`TreeBuilder::reorder`]).
    seq: u32,
    nlink: u32,
    mtime_nsec: u32,
    mtime_sec: i64,
    size: u64,
    data_offset: u64,
}

impl Node {
    fn implicit_dir(parent: u32, name_off: u32, name_len: u32) -> Self {
        Self {
            parent,
            name_off,
            name_len,
            kind: EntryKind::Dir,
            mode: 0o755,
            owner: (0, 0),
            seq: 0,
            nlink: 1,
            mtime_nsec: 0,
            mtime_sec: 0,
            size: 0,
            data_offset: 0,
        }
    }
}

#[derive(Debug)]
pub struct TreeBuilder {
    nodes: Vec<Node>,
    /// Every node's name, back to back.
    names: Vec<u8>,
    /// Node ids by (parent id, name).
    children: hashbrown::HashTable<u32>,
    /// foldhash, seeded at random per builder: a layer is written before it is indexed, so its
    /// author cannot see this seed to aim collisions at it (SipHash cost a fifth of indexing a
    /// million entries).
    hasher: hashbrown::DefaultHashBuilder,
    /// Symlink targets and (normalised) hardlink target paths.
    links: HashMap<u32, Vec<u8>>,
    xattrs: HashMap<u32, Vec<(Vec<u8>, Vec<u8>)>>,
    devs: HashMap<u32, (u32, u32)>,
    /// The directory of the last entry: tar streams list a directory's entries together.
    last_dir: (Vec<u8>, u32),
    /// Entries seen so far.
    seq: u32,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        let mut t = Self {
            nodes: Vec::new(),
            names: Vec::new(),
            children: hashbrown::HashTable::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            links: HashMap::new(),
            xattrs: HashMap::new(),
            devs: HashMap::new(),
            last_dir: (Vec::new(), 0),
            seq: 0,
        };
        t.nodes.push(Node::implicit_dir(0, 0, 0));
        t
    }
}

/// Sets or clears `id`'s value in a side table (a `new` node has none to clear).
fn put<V>(map: &mut HashMap<u32, V>, id: u32, v: Option<V>, new: bool) {
    match v {
        Some(v) => {
            map.insert(id, v);
        }
        None if !new => {
            map.remove(&id);
        }
        None => {}
    }
}

impl TreeBuilder {
    pub fn add<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), IndexError> {
        if entry.header().entry_type() == tar::EntryType::XGlobalHeader {
            return Ok(());
        }
        let h = tar_fields(&mut entry)?;
        let path = normalize(&entry.path_bytes())?;
        if path.is_empty() && h.kind != EntryKind::Dir {
            return Err(IndexError::Tar("the layer root is not a directory".into()));
        }
        self.seq = self.seq.checked_add(1).ok_or_else(|| IndexError::Tar("too many tar entries".into()))?;
        let (id, new) = if path.is_empty() {
            (0, false)
        } else {
            let (dir, name) = split_last(&path);
            let parent = self.dir(dir)?;
            let known = self.nodes.len();
            let id = self.child_or_new(parent, name)?;
            (id, id as usize >= known)
        };
        let node = &mut self.nodes[id as usize];
        (node.kind, node.mode, node.owner) = (h.kind, h.mode, (h.uid, h.gid));
        (node.mtime_sec, node.mtime_nsec, node.size, node.data_offset) =
            (h.mtime_sec, h.mtime_nsec, h.size, h.data_offset);
        node.seq = self.seq;
        // Side tables: what this header says replaces what an earlier one of the path said.
        put(&mut self.links, id, Some(h.link).filter(|l| !l.is_empty()), new);
        put(&mut self.xattrs, id, Some(h.xattrs).filter(|x| !x.is_empty()), new);
        put(&mut self.devs, id, Some(h.dev).filter(|d| *d != (0, 0)), new);
        Ok(())
    }

    /// Entries so far, implicit directories and the root included.
    pub fn entry_count(&self) -> usize {
        self.nodes.len()
    }

    fn key_hash(&self, parent: u32, name: &[u8]) -> u64 {
        self.hasher.hash_one((parent, name))
    }

    fn name(&self, id: u32) -> &[u8] {
        self.name_of(&self.nodes[id as usize])
    }

    /// A node's name (the root's is empty).
    fn name_of(&self, n: &Node) -> &[u8] {
        &self.names[n.name_off as usize..n.name_off as usize + n.name_len as usize]
    }

    fn find_child(&self, parent: u32, name: &[u8]) -> Option<u32> {
        let hash = self.key_hash(parent, name);
        self.children.find(hash, |&c| self.nodes[c as usize].parent == parent && self.name(c) == name).copied()
    }

    /// The child `name` of `parent`, made (as an implicit directory) if it is new.
    fn child_or_new(&mut self, parent: u32, name: &[u8]) -> Result<u32, IndexError> {
        if let Some(id) = self.find_child(parent, name) {
            return Ok(id);
        }
        if self.nodes.len() >= MAX_ENTRIES {
            return Err(IndexError::Tar(format!("layer has more than {MAX_ENTRIES} entries")));
        }
        let too_long = || IndexError::Tar("the layer's names exceed 4 GiB".into());
        let name_off = u32::try_from(self.names.len()).map_err(|_| too_long())?;
        let name_len = u32::try_from(name.len()).map_err(|_| too_long())?;
        name_off.checked_add(name_len).ok_or_else(too_long)?;
        self.names.extend_from_slice(name);
        let id = self.nodes.len() as u32;
        self.nodes.push(Node::implicit_dir(parent, name_off, name_len));
        let hash = self.key_hash(parent, name);
        let Self { children, nodes, names, hasher, .. } = self;
        children.insert_unique(hash, id, |&c| {
            let n = &nodes[c as usize];
            hasher.hash_one((n.parent, &names[n.name_off as usize..n.name_off as usize + n.name_len as usize]))
        });
        Ok(id)
    }

    /// The node of directory `dir` (a normalised path), its missing parents made implicit.
    fn dir(&mut self, dir: &[u8]) -> Result<u32, IndexError> {
        if dir == self.last_dir.0.as_slice() {
            return Ok(self.last_dir.1);
        }
        let mut id = 0;
        if !dir.is_empty() {
            for comp in dir.split(|b| *b == b'/') {
                id = self.child_or_new(id, comp)?;
            }
        }
        self.last_dir = (dir.to_vec(), id);
        Ok(id)
    }

    /// The node at a normalised path, if there is one.
    fn lookup(&self, path: &[u8]) -> Option<u32> {
        if path.is_empty() {
            return Some(0);
        }
        path.split(|b| *b == b'/').try_fold(0, |id, comp| self.find_child(id, comp))
    }

    /// The path of node `id`, for messages.
    fn path_of(&self, mut id: u32) -> String {
        let mut parts = Vec::new();
        while id != 0 {
            parts.push(String::from_utf8_lossy(self.name(id)).into_owned());
            id = self.nodes[id as usize].parent;
        }
        parts.reverse();
        parts.join("/")
    }

    /// Checks the tree, resolves hardlinks and link counts, and encodes it into `out` in
    /// breadth-first order; `uncompressed_size` bounds the data ranges.
    pub fn finish(mut self, uncompressed_size: u64, out: &mut EntryEncoder) -> Result<(), IndexError> {
        let n = self.nodes.len();
        for id in 1..n as u32 {
            let node = self.nodes[id as usize];
            if self.nodes[node.parent as usize].kind != EntryKind::Dir {
                return Err(IndexError::Tar(format!(
                    "{:?} lies below {:?}, which is not a directory",
                    self.path_of(id),
                    self.path_of(node.parent)
                )));
            }
            if node.kind == EntryKind::File
                && node.data_offset.checked_add(node.size).is_none_or(|e| e > uncompressed_size)
            {
                return Err(IndexError::Tar(format!("{:?}: data runs past the end of the layer", self.path_of(id))));
            }
        }
        let hardlinks = self.resolve_hardlinks()?;
        self.children = hashbrown::HashTable::new(); // no lookups from here on: its memory goes
        // Directories: 2 + subdirectories (every node starts at 1).
        for id in 0..n {
            if self.nodes[id].kind == EntryKind::Dir {
                self.nodes[id].nlink += 1;
                if id != 0 {
                    let p = self.nodes[id].parent as usize;
                    self.nodes[p].nlink += 1;
                }
            }
        }
        let (order, new_id, first) = self.breadth_first();
        self.reorder(&order);
        drop(order);
        let mut nodes = std::mem::take(&mut self.nodes);
        let empty: &[(Vec<u8>, Vec<u8>)] = &[];
        let link_of = |old: u32, kind: EntryKind| match kind {
            EntryKind::Symlink => self.links.get(&old).map_or(&[][..], Vec::as_slice),
            _ => &[],
        };
        for node in &nodes {
            let old = node.seq;
            out.push_strings(
                self.name_of(node),
                link_of(old, node.kind),
                self.xattrs.get(&old).map_or(empty, Vec::as_slice),
            )?;
        }
        // The records, last first, each node's memory given back as the records' is taken.
        // A directory's first child id: 1 + the children of every directory before it.
        let mut next_first = n as u32;
        while let Some(node) = nodes.pop() {
            let old = node.seq;
            let child_count = first[old as usize + 1] - first[old as usize];
            next_first -= child_count;
            let is_root = nodes.is_empty();
            out.put_record_back(&EntryRecord {
                parent: if is_root { 0 } else { new_id[node.parent as usize] },
                name: self.name_of(&node),
                kind: node.kind,
                mode: node.mode,
                uid: node.owner.0,
                gid: node.owner.1,
                nlink: node.nlink,
                mtime_sec: node.mtime_sec,
                mtime_nsec: node.mtime_nsec,
                size: node.size,
                data_offset: node.data_offset,
                link: link_of(old, node.kind),
                hardlink_target: hardlinks.get(&old).map_or(0, |t| new_id[*t as usize]),
                first_child: next_first,
                child_count,
                dev_major: self.devs.get(&old).map_or(0, |d| d.0),
                dev_minor: self.devs.get(&old).map_or(0, |d| d.1),
                xattrs: self.xattrs.get(&old).map_or(empty, Vec::as_slice),
            })?;
            if nodes.len().is_multiple_of(RELEASE_EVERY) {
                nodes.shrink_to_fit();
            }
        }
        Ok(())
    }

    /// Puts the nodes in breadth-first order (`order[new id]` = old id) in place, each keeping
    /// its old id, which the side tables are keyed by, in `seq` (no longer needed for its own
    /// purpose once hardlinks are resolved).
    fn reorder(&mut self, order: &[u32]) {
        for (id, node) in self.nodes.iter_mut().enumerate() {
            node.seq = id as u32;
        }
        let mut placed = vec![false; order.len()];
        for start in 0..order.len() {
            if placed[start] {
                continue;
            }
            // Follow the cycle through `start`: each position takes the node `order` names.
            let first = self.nodes[start];
            let mut at = start;
            loop {
                placed[at] = true;
                let from = order[at] as usize;
                if from == start {
                    self.nodes[at] = first;
                    break;
                }
                self.nodes[at] = self.nodes[from];
                at = from;
            }
        }
    }

    /// Breadth-first order: the node ids in new-id order, each node's new id, and where each
    /// node's children start in the sorted child list (`first[id]..first[id + 1]`).
    fn breadth_first(&self) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let n = self.nodes.len();
        // Every node but the root, by (parent, name): each directory's children together, sorted.
        let mut kids: Vec<u32> = (1..n as u32).collect();
        kids.sort_unstable_by(|&a, &b| {
            (self.nodes[a as usize].parent, self.name(a)).cmp(&(self.nodes[b as usize].parent, self.name(b)))
        });
        let mut first = vec![0u32; n + 1];
        for &k in &kids {
            first[self.nodes[k as usize].parent as usize + 1] += 1;
        }
        for i in 0..n {
            first[i + 1] += first[i];
        }
        let mut order: Vec<u32> = Vec::with_capacity(n);
        let mut new_id = vec![0u32; n];
        order.push(0);
        let mut i = 0;
        while i < order.len() {
            let id = order[i] as usize;
            for &k in &kids[first[id] as usize..first[id + 1] as usize] {
                new_id[k as usize] = order.len() as u32;
                order.push(k);
            }
            i += 1;
        }
        (order, new_id, first)
    }

    /// Resolves every hardlink to the regular file it leads to (chains followed), gives it the
    /// file's data, counts links, and applies each group's last header: containerd's applier
    /// gives the shared inode each hardlink header's owner, xattrs, mode and times in tar order
    /// (archive.createTarFile: link, Lchown, setxattr, chmod, chtimes): the last header wins,
    /// xattrs accumulate. Returns hardlink → file.
    fn resolve_hardlinks(&mut self) -> Result<HashMap<u32, u32>, IndexError> {
        let mut targets: HashMap<u32, u32> = HashMap::new();
        for id in 0..self.nodes.len() as u32 {
            if self.nodes[id as usize].kind != EntryKind::Hardlink {
                continue;
            }
            let mut current = id;
            let mut hops = 0;
            let target = loop {
                let path = self.links.get(&current).map_or(&[][..], Vec::as_slice);
                let t = self.lookup(path).ok_or_else(|| {
                    IndexError::Tar(format!(
                        "hardlink {:?} points to missing {:?}",
                        self.path_of(id),
                        String::from_utf8_lossy(path)
                    ))
                })?;
                match self.nodes[t as usize].kind {
                    EntryKind::File => break t,
                    EntryKind::Hardlink if hops < 64 && t != id => {
                        current = t;
                        hops += 1;
                    }
                    _ => {
                        return Err(IndexError::Tar(format!(
                            "hardlink {:?} does not lead to a regular file",
                            self.path_of(id)
                        )));
                    }
                }
            };
            targets.insert(id, target);
        }
        let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (&link, &file) in &targets {
            let (size, off) = (self.nodes[file as usize].size, self.nodes[file as usize].data_offset);
            (self.nodes[link as usize].size, self.nodes[link as usize].data_offset) = (size, off);
            self.nodes[file as usize].nlink += 1;
            groups.entry(file).or_insert_with(|| vec![file]).push(link);
        }
        for (file, mut members) in groups {
            let nlink = self.nodes[file as usize].nlink;
            members.sort_by_key(|&i| self.nodes[i as usize].seq);
            let mut xattrs: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for i in &members {
                xattrs.extend(self.xattrs.get(i).into_iter().flatten().cloned());
            }
            let Some(&last) = members.last() else { continue };
            let last = self.nodes[last as usize];
            for &i in &members {
                let e = &mut self.nodes[i as usize];
                (e.mode, e.owner, e.mtime_sec, e.mtime_nsec) = (last.mode, last.owner, last.mtime_sec, last.mtime_nsec);
                e.nlink = nlink;
                if xattrs.is_empty() {
                    self.xattrs.remove(&i);
                } else {
                    self.xattrs.insert(i, xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
                }
            }
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hardlinks_take_the_last_headers_metadata_as_containerd_applies_it() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(3);
        h.set_mode(0o640);
        h.set_uid(1);
        h.set_gid(1);
        h.set_mtime(100);
        b.append_data(&mut h, "hard1", &b"abc"[..]).expect("append");
        b.append_pax_extensions([("SCHILY.xattr.user.a", &b"1"[..])]).expect("pax");
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Link);
        l.set_size(0);
        l.set_mode(0o644);
        l.set_uid(2);
        l.set_gid(3);
        l.set_mtime(200);
        b.append_link(&mut l, "hard2", "hard1").expect("link");
        let bytes = b.into_inner().expect("tar");
        let index = crate::build_index(&bytes[..], &crate::BuildOptions::default()).expect("index");
        for name in ["hard1", "hard2"] {
            let id = index.lookup(name).expect("lookup").expect("entry");
            let e = index.entry(id).expect("entry");
            assert_eq!((e.mode, e.uid, e.gid, e.mtime_sec, e.nlink), (0o644, 2, 3, 200, 2), "{name}");
            let xattrs = index.xattrs(&e).expect("xattrs");
            assert_eq!(xattrs, vec![(&b"user.a"[..], &b"1"[..])], "{name}");
        }
    }
}
