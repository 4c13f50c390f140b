//! The indexer's tree from tar streams in the orders real and hostile layers use: implicit
//! parents, duplicates, kinds that change, hardlink chains, devices, xattrs — and the same
//! bytes every time (the tree's hash table is randomly keyed; nothing may depend on its order).

use clip_index::format::EntryKind;
use clip_index::{BuildOptions, Index, build_index};

enum Item<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str, u32),
    Char(&'a str, u32, u32),
    Xattr(&'a str, &'a str, &'a [u8]),
}

fn layer(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for item in items {
        match *item {
            Item::Dir(p, mode) => b.append_data(&mut header(tar::EntryType::Directory, mode), p, std::io::empty()),
            Item::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, data)
            }
            Item::Symlink(p, target) => b.append_link(&mut header(tar::EntryType::Symlink, 0o777), p, target),
            Item::Hardlink(p, target, mode) => b.append_link(&mut header(tar::EntryType::Link, mode), p, target),
            Item::Char(p, major, minor) => {
                let mut h = header(tar::EntryType::Char, 0o666);
                h.set_device_major(major).expect("major");
                h.set_device_minor(minor).expect("minor");
                b.append_data(&mut h, p, std::io::empty())
            }
            Item::Xattr(p, name, value) => {
                let key = format!("SCHILY.xattr.{name}");
                b.append_pax_extensions([(key.as_str(), value)]).expect("pax");
                b.append_data(&mut header(tar::EntryType::Regular, 0o600), p, std::io::empty())
            }
        }
        .expect("append");
    }
    b.into_inner().expect("tar")
}

fn index(items: &[Item<'_>]) -> Index {
    build_index(&layer(items)[..], &BuildOptions::default()).expect("index")
}

fn entry<'a>(index: &'a Index, path: &str) -> clip_index::format::Entry<'a> {
    let id = index.lookup(path).expect("lookup").unwrap_or_else(|| panic!("{path} missing"));
    index.entry(id).expect("entry")
}

#[test]
fn a_layer_in_any_order_gives_the_tree_containerd_would_unpack_and_the_same_bytes_each_time() {
    use Item::*;
    let items = [
        File("z/deep/er/file", b"zz", 0o644), // parents implicit, listed before the root
        Dir(".", 0o700),
        File("a/one", b"1", 0o600),
        Dir("a", 0o711), // after its child: its own metadata still wins over the implicit one
        File("a/two", b"first", 0o644),
        File("a/two", b"second!", 0o640), // last entry wins
        Symlink("a/link", "../z/deep"),
        Hardlink("b/hard1", "a/one", 0o644),
        Hardlink("b/hard2", "b/hard1", 0o604), // a chain: leads to a/one
        Char("dev/null", 1, 3),
        Xattr("x", "user.k", b"v"),
        File("y", b"file first", 0o644),
        Dir("y", 0o755), // a file replaced by a directory: children may follow
        File("y/child", b"", 0o644),
    ];
    let first = index(&items);
    first.validate().expect("validate");
    for _ in 0..4 {
        assert_eq!(index(&items).bytes(), first.bytes(), "indexing is not deterministic");
    }
    let i = &first;
    assert_eq!(entry(i, "").mode, 0o700);
    assert_eq!((entry(i, "a").mode, entry(i, "z").mode, entry(i, "z/deep").mode), (0o711, 0o755, 0o755));
    assert_eq!((entry(i, "a/two").size, entry(i, "a/two").mode), (7, 0o640));
    assert_eq!(entry(i, "a/link").link, b"../z/deep");
    let (one, h1, h2) = (entry(i, "a/one"), entry(i, "b/hard1"), entry(i, "b/hard2"));
    assert_eq!((one.nlink, h1.nlink, h2.nlink), (3, 3, 3));
    assert_eq!((h1.data_offset, h2.data_offset, h2.size), (one.data_offset, one.data_offset, 1));
    assert_eq!((one.mode, h1.mode), (0o604, 0o604), "the group takes the last header's mode");
    assert_eq!(i.resolve_hardlink(h2).expect("resolve").id, one.id);
    let null = entry(i, "dev/null");
    assert_eq!((null.kind, null.dev_major, null.dev_minor), (EntryKind::CharDevice, 1, 3));
    assert_eq!(i.xattrs(&entry(i, "x")).expect("xattrs"), vec![(&b"user.k"[..], &b"v"[..])]);
    assert_eq!(entry(i, "y").kind, EntryKind::Dir);
    // Directories: 2 + subdirectories; the root has a, b, dev, y, z.
    assert_eq!((entry(i, "").nlink, entry(i, "a").nlink, entry(i, "z/deep").nlink), (7, 2, 3));
    // Breadth-first, children sorted by name.
    let names: Vec<&[u8]> = i.children(&entry(i, "")).expect("children").map(|c| i.entry(c).expect("e").name).collect();
    assert_eq!(names, [&b"a"[..], b"b", b"dev", b"x", b"y", b"z"]);
}

#[test]
fn hostile_trees_are_refused_with_the_path_that_breaks_them() {
    use Item::*;
    let refuse = |items: &[Item<'_>], want: &str| {
        let e = build_index(&layer(items)[..], &BuildOptions::default()).expect_err("refused");
        assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
    };
    // A directory replaced by a file while it has children.
    refuse(&[File("d/child", b"", 0o644), File("d", b"now a file", 0o644)], "\"d/child\" lies below \"d\"");
    refuse(&[File("f", b"", 0o644), File("f/g/h", b"", 0o644)], "lies below \"f\"");
    refuse(&[Hardlink("h", "missing/file", 0o644)], "points to missing");
    refuse(&[Hardlink("h1", "h2", 0o644), Hardlink("h2", "h1", 0o644)], "does not lead to a regular file");
    refuse(&[Dir("d", 0o755), Hardlink("h", "d", 0o644)], "does not lead to a regular file");
    // Many duplicates of one name stay one entry.
    let many: Vec<Item<'_>> = (0..20_000).map(|_| File("same", b"", 0o644)).collect();
    assert_eq!(index(&many).entry_count(), 2);
}
