//! Turns tar entries into the index's tree: normalised paths, implicit parent directories,
//! last-entry-wins duplicates, resolved hardlinks, link counts, and breadth-first ids so that
//! every directory's children are contiguous and sorted by name.
//!
//! Compact for layers of millions of entries: a node is a fixed record that names its parent by
//! id and its name by a range of one names buffer; a directory's children are found through one
//! hash table keyed by (parent id, name); link targets, xattrs and device numbers, which few
//! entries have, live in side tables. The finished tree is encoded entry by entry into the
//! index's buffer ([`EntryEncoder`]), never copied into records first.

use crate::IndexError;
use crate::format::{EntryEncoder, EntryKind, EntryRecord, validate_name};
use hashbrown::HashMap;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::io::Read;

/// Most entries one layer may hold (guards memory on hostile input).
pub const MAX_ENTRIES: usize = 16 << 20;
/// Longest path accepted.
pub const MAX_PATH: usize = 64 << 10;

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
    /// Position in the tar stream (0 for implicit directories): the last header wins.
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

/// What one tar header says about its entry (the path aside), PAX records applied.
#[derive(Debug, Clone)]
pub struct TarFields {
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Data bytes (files only).
    pub size: u64,
    pub data_offset: u64,
    /// A symlink's target as written; a hardlink's target path, normalised ([`normalize`]).
    pub link: Vec<u8>,
    /// Major and minor of a device.
    pub dev: (u32, u32),
    /// `SCHILY.xattr.*` records: names without the prefix, sorted, the last of a name kept.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
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

/// Splits a tar path into components: leading `/` and `./` dropped, `.` and empty components
/// skipped, `..` rejected.
pub fn normalize(path: &[u8]) -> Result<Vec<u8>, IndexError> {
    if path.len() > MAX_PATH {
        return Err(IndexError::Tar(format!("path of {} bytes is too long", path.len())));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in path.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                return Err(IndexError::Tar(format!(
                    "path {:?} escapes the layer root (..)",
                    String::from_utf8_lossy(path)
                )));
            }
            c => {
                validate_name(c).map_err(|e| IndexError::Tar(e.to_string()))?;
                parts.push(c);
            }
        }
    }
    Ok(parts.join(&b'/'))
}

fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    if sec < 0 && nsec > 0 {
        // -1.5 means 1.5 s before the epoch.
        return Some((sec - 1, 1_000_000_000 - nsec));
    }
    Some((sec, nsec))
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

/// Reads one tar header (and its PAX records): the one place a layer's tar header is
/// interpreted, for indexing and for unpacking.
pub fn tar_fields<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<TarFields, IndexError> {
    let terr = |e: std::io::Error| IndexError::Tar(e.to_string());
    let header = entry.header();
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Link => EntryKind::Hardlink,
        tar::EntryType::Char => EntryKind::CharDevice,
        tar::EntryType::Block => EntryKind::BlockDevice,
        tar::EntryType::Fifo => EntryKind::Fifo,
        tar::EntryType::GNUSparse => {
            return Err(IndexError::Tar("GNU sparse files are not supported in layers".into()));
        }
        other => return Err(IndexError::Tar(format!("unsupported tar entry type {:?}", other.as_byte() as char))),
    };
    let mode = header.mode().map_err(terr)? & 0o7777;
    let mut uid = u32::try_from(header.uid().map_err(terr)?).unwrap_or(u32::MAX);
    let mut gid = u32::try_from(header.gid().map_err(terr)?).unwrap_or(u32::MAX);
    let mut mtime_sec = i64::try_from(header.mtime().map_err(terr)?).unwrap_or(i64::MAX);
    let mut mtime_nsec = 0;
    let dev = match kind {
        EntryKind::CharDevice | EntryKind::BlockDevice => {
            (header.device_major().map_err(terr)?.unwrap_or(0), header.device_minor().map_err(terr)?.unwrap_or(0))
        }
        _ => (0, 0),
    };
    let link = entry.link_name_bytes().map(std::borrow::Cow::into_owned).unwrap_or_default();
    let size = if kind == EntryKind::File { entry.size() } else { 0 };
    let data_offset = if kind == EntryKind::File { entry.raw_file_position() } else { 0 };
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(terr)? {
        for ext in pax {
            let ext = ext.map_err(terr)?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"mtime" {
                if let Some((s, ns)) = parse_pax_time(value) {
                    mtime_sec = s;
                    mtime_nsec = ns;
                }
            } else if key == b"uid" {
                uid = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(uid);
            } else if key == b"gid" {
                gid = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(gid);
            }
        }
    }
    xattrs.sort();
    xattrs.dedup_by(|a, b| a.0 == b.0);
    let link = match kind {
        EntryKind::Hardlink => normalize(&link)?,
        EntryKind::Symlink => link,
        _ => Vec::new(),
    };
    Ok(TarFields { kind, mode, uid, gid, mtime_sec, mtime_nsec, size, data_offset, link, dev, xattrs })
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

/// A normalised path's parent and last component (the root's parent is itself).
pub fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
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
        let n = &self.nodes[id as usize];
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
        // A directory's first child id: 1 + the children of every directory before it.
        let mut next_first = 1u32;
        for &id in &order {
            let node = self.nodes[id as usize];
            let child_count = first[id as usize + 1] - first[id as usize];
            let is_root = id == 0;
            let empty: &[(Vec<u8>, Vec<u8>)] = &[];
            out.push(&EntryRecord {
                parent: if is_root { 0 } else { new_id[node.parent as usize] },
                name: if is_root { &[] } else { self.name(id) },
                kind: node.kind,
                mode: node.mode,
                uid: node.owner.0,
                gid: node.owner.1,
                nlink: node.nlink,
                mtime_sec: node.mtime_sec,
                mtime_nsec: node.mtime_nsec,
                size: node.size,
                data_offset: node.data_offset,
                link: match node.kind {
                    EntryKind::Symlink => self.links.get(&id).map_or(&[][..], Vec::as_slice),
                    _ => &[],
                },
                hardlink_target: hardlinks.get(&id).map_or(0, |t| new_id[*t as usize]),
                first_child: next_first,
                child_count,
                dev_major: self.devs.get(&id).map_or(0, |d| d.0),
                dev_minor: self.devs.get(&id).map_or(0, |d| d.1),
                xattrs: self.xattrs.get(&id).map_or(empty, Vec::as_slice),
            })?;
            next_first += child_count;
        }
        Ok(())
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
    use super::*;

    #[test]
    fn normalizes_and_rejects_traversal() {
        assert_eq!(normalize(b"./a//b/").unwrap_or_default(), b"a/b");
        assert_eq!(normalize(b"/etc/passwd").unwrap_or_default(), b"etc/passwd");
        assert!(normalize(b"a/../../etc").is_err());
        assert!(normalize(b"..").is_err());
        assert_eq!(normalize(b"./").unwrap_or_default(), b"");
    }

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

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000.123456789"), Some((1_700_000_000, 123_456_789)));
        assert_eq!(parse_pax_time(b"5.5"), Some((5, 500_000_000)));
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
