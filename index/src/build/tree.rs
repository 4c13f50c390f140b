//! Turns tar entries into the index's tree: normalised paths, implicit parent directories,
//! last-entry-wins duplicates, resolved hardlinks, link counts, and breadth-first ids so that
//! every directory's children are contiguous and sorted by name.

use crate::IndexError;
use crate::format::{EntryKind, EntryRecord, validate_name};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;

/// Most entries one layer may hold (guards memory on hostile input).
pub const MAX_ENTRIES: usize = 16 << 20;
/// Longest path accepted.
pub const MAX_PATH: usize = 64 << 10;

#[derive(Debug, Clone)]
struct Pending {
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_sec: i64,
    mtime_nsec: u32,
    size: u64,
    data_offset: u64,
    link: Vec<u8>,
    dev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Position in the tar stream (0 for implicit directories).
    seq: u64,
}

fn implicit_dir() -> Pending {
    Pending {
        kind: EntryKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        size: 0,
        data_offset: 0,
        link: Vec::new(),
        dev: (0, 0),
        xattrs: Vec::new(),
        seq: 0,
    }
}

#[derive(Debug, Default)]
pub struct TreeBuilder {
    /// Normalised path (components joined by `/`, root = empty) → entry.
    nodes: HashMap<Vec<u8>, Pending>,
    /// Entries seen so far.
    seq: u64,
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

impl TreeBuilder {
    pub fn add<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), IndexError> {
        let terr = |e: std::io::Error| IndexError::Tar(e.to_string());
        let header = entry.header();
        let etype = header.entry_type();
        let kind = match etype {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            tar::EntryType::Char => EntryKind::CharDevice,
            tar::EntryType::Block => EntryKind::BlockDevice,
            tar::EntryType::Fifo => EntryKind::Fifo,
            tar::EntryType::XGlobalHeader => return Ok(()),
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
        let path = normalize(&entry.path_bytes())?;
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
        if self.nodes.len() >= MAX_ENTRIES {
            return Err(IndexError::Tar(format!("layer has more than {MAX_ENTRIES} entries")));
        }
        if path.is_empty() && kind != EntryKind::Dir {
            return Err(IndexError::Tar("the layer root is not a directory".into()));
        }
        let link = match kind {
            EntryKind::Hardlink => normalize(&link)?,
            EntryKind::Symlink => link,
            _ => Vec::new(),
        };
        self.seq += 1;
        let p = Pending {
            kind,
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            size,
            data_offset,
            link,
            dev,
            xattrs,
            seq: self.seq,
        };
        self.nodes.insert(path, p);
        Ok(())
    }

    /// Builds the sorted tree; `uncompressed_size` bounds the data ranges.
    pub fn finish(mut self, uncompressed_size: u64) -> Result<Vec<EntryRecord>, IndexError> {
        self.nodes.entry(Vec::new()).or_insert_with(implicit_dir);
        // Implicit parents, and a check that no entry hangs below a non-directory.
        let paths: Vec<Vec<u8>> = self.nodes.keys().cloned().collect();
        let mut children: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
        for path in &paths {
            let mut cur = path.clone();
            while !cur.is_empty() {
                let (parent, name) = match cur.iter().rposition(|b| *b == b'/') {
                    Some(i) => (cur[..i].to_vec(), cur[i + 1..].to_vec()),
                    None => (Vec::new(), cur.clone()),
                };
                let existed = self.nodes.contains_key(&parent);
                let p = self.nodes.entry(parent.clone()).or_insert_with(implicit_dir);
                if p.kind != EntryKind::Dir {
                    return Err(IndexError::Tar(format!(
                        "{:?} lies below {:?}, which is not a directory",
                        String::from_utf8_lossy(path),
                        String::from_utf8_lossy(&parent)
                    )));
                }
                // Duplicates go at the sort + dedup below (a search here was quadratic in a
                // directory's size: 1,000 names per directory cost 49% of indexing 1M files).
                children.entry(parent.clone()).or_default().push(name);
                if existed {
                    break;
                }
                cur = parent;
            }
        }
        for list in children.values_mut() {
            list.sort();
            list.dedup();
        }
        // Breadth-first ids: root 0; each directory's children get consecutive ids in name order.
        let mut order: Vec<(Vec<u8>, u32)> = vec![(Vec::new(), 0)];
        let mut ids: HashMap<Vec<u8>, u32> = HashMap::new();
        ids.insert(Vec::new(), 0);
        let mut spans: Vec<(u32, u32)> = vec![(0, 0)];
        let mut i = 0;
        while i < order.len() {
            let (path, _) = order[i].clone();
            let first = order.len() as u32;
            let kids = children.get(&path).cloned().unwrap_or_default();
            for name in &kids {
                let child = if path.is_empty() { name.clone() } else { [&path[..], b"/", name].concat() };
                ids.insert(child.clone(), order.len() as u32);
                order.push((child, i as u32));
                spans.push((0, 0));
            }
            spans[i] = (first, kids.len() as u32);
            i += 1;
        }
        let mut out: Vec<EntryRecord> = Vec::with_capacity(order.len());
        for (idx, (path, parent)) in order.iter().enumerate() {
            let p = &self.nodes[path];
            let name = path.rsplit(|b| *b == b'/').next().unwrap_or_default().to_vec();
            let name = if idx == 0 { Vec::new() } else { name };
            if p.kind == EntryKind::File && p.data_offset.checked_add(p.size).is_none_or(|e| e > uncompressed_size) {
                return Err(IndexError::Tar(format!(
                    "{:?}: data runs past the end of the layer",
                    String::from_utf8_lossy(path)
                )));
            }
            out.push(EntryRecord {
                parent: *parent,
                name,
                kind: p.kind,
                mode: p.mode,
                uid: p.uid,
                gid: p.gid,
                nlink: 1,
                mtime_sec: p.mtime_sec,
                mtime_nsec: p.mtime_nsec,
                size: p.size,
                data_offset: p.data_offset,
                link: if p.kind == EntryKind::Symlink { p.link.clone() } else { Vec::new() },
                hardlink_target: 0,
                first_child: spans[idx].0,
                child_count: spans[idx].1,
                dev_major: p.dev.0,
                dev_minor: p.dev.1,
                xattrs: p.xattrs.clone(),
            });
        }
        // Hardlinks: resolve chains to a regular file; share its data; count links.
        for idx in 0..out.len() {
            if out[idx].kind != EntryKind::Hardlink {
                continue;
            }
            let mut target_path = self.nodes[&order[idx].0].link.clone();
            let mut hops = 0;
            let target = loop {
                let t = *ids.get(&target_path).ok_or_else(|| {
                    IndexError::Tar(format!(
                        "hardlink {:?} points to missing {:?}",
                        String::from_utf8_lossy(&order[idx].0),
                        String::from_utf8_lossy(&target_path)
                    ))
                })?;
                match out[t as usize].kind {
                    EntryKind::File => break t,
                    EntryKind::Hardlink if hops < 64 && t as usize != idx => {
                        target_path.clone_from(&self.nodes[&order[t as usize].0].link);
                        hops += 1;
                    }
                    _ => {
                        return Err(IndexError::Tar(format!(
                            "hardlink {:?} does not lead to a regular file",
                            String::from_utf8_lossy(&order[idx].0)
                        )));
                    }
                }
            };
            let (size, off) = (out[target as usize].size, out[target as usize].data_offset);
            let e = &mut out[idx];
            e.hardlink_target = target;
            e.size = size;
            e.data_offset = off;
            out[target as usize].nlink += 1;
        }
        // containerd's applier gives the shared inode each hardlink header's owner, xattrs,
        // mode and times in tar order (archive.createTarFile: link, Lchown, setxattr, chmod,
        // chtimes): the last header wins, xattrs accumulate.
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for idx in 0..out.len() {
            if out[idx].kind == EntryKind::Hardlink {
                let t = out[idx].hardlink_target as usize;
                out[idx].nlink = out[t].nlink;
                groups.entry(t).or_insert_with(|| vec![t]).push(idx);
            }
        }
        for mut members in groups.into_values() {
            members.sort_by_key(|&i| self.nodes[&order[i].0].seq);
            let mut xattrs: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for &i in &members {
                xattrs.extend(self.nodes[&order[i].0].xattrs.iter().cloned());
            }
            let Some(&last) = members.last() else { continue };
            let last = &self.nodes[&order[last].0];
            for &i in &members {
                let e = &mut out[i];
                (e.mode, e.uid, e.gid, e.mtime_sec, e.mtime_nsec) =
                    (last.mode, last.uid, last.gid, last.mtime_sec, last.mtime_nsec);
                e.xattrs = xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            }
        }
        // Directories: 2 + subdirectories.
        let mut subdirs = vec![0u32; out.len()];
        for e in out.iter().skip(1) {
            if e.kind == EntryKind::Dir {
                subdirs[e.parent as usize] += 1;
            }
        }
        for (e, n) in out.iter_mut().zip(subdirs) {
            if e.kind == EntryKind::Dir {
                e.nlink = 2 + n;
            }
        }
        Ok(out)
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
        let mut tree = TreeBuilder::default();
        let mut archive = tar::Archive::new(&bytes[..]);
        for e in archive.entries().expect("entries") {
            tree.add(e.expect("entry")).expect("add");
        }
        let out = tree.finish(bytes.len() as u64).expect("tree");
        for name in [&b"hard1"[..], b"hard2"] {
            let e = out.iter().find(|e| e.name == name).expect("entry");
            assert_eq!((e.mode, e.uid, e.gid, e.mtime_sec, e.nlink), (0o644, 2, 3, 200, 2), "{name:?}");
            assert_eq!(e.xattrs, vec![(b"user.a".to_vec(), b"1".to_vec())], "{name:?}");
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
