//! Unpacking layers: what containerd's overlay applier makes, and hostile streams refused or kept
//! inside the layer directory. Runs as root (owners, devices, trusted xattrs).

use clip_unpack::{Limits, UnpackError, unpack_layer};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h
}

/// A header with `name` written raw (the tar crate's builder refuses `..`).
fn raw(kind: tar::EntryType, name: &str, link: &str, size: u64) -> tar::Header {
    let mut h = header(kind, 0o644, 0, size);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    h
}

fn finish(b: tar::Builder<Vec<u8>>) -> Vec<u8> {
    b.into_inner().expect("tar")
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(tar)))
}

fn unpack(blob: &[u8], root: &Path) -> Result<clip_unpack::Unpacked, UnpackError> {
    unpack_layer(blob, root, &[], None, Limits::default())
}

#[test]
fn a_layer_unpacks_as_containerd_applies_it_to_an_overlay_upper_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, below) = (dir.path().join("layer"), dir.path().join("below"));
    std::fs::create_dir_all(&root).expect("root");
    // The layer below has `m/` (mode 0700, owner 5): a missing parent takes its attributes.
    std::fs::create_dir_all(below.join("m")).expect("below");
    std::fs::set_permissions(below.join("m"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::lchown(below.join("m"), Some(5), Some(5)).expect("chown");

    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut header(tar::EntryType::Directory, 0o750, 1000, 0), "d", &b""[..]).expect("d");
    b.append_data(&mut header(tar::EntryType::Regular, 0o4755, 0, 5), "d/suid", &b"hello"[..]).expect("suid");
    let mut x = header(tar::EntryType::Regular, 0o644, 7, 2);
    b.append_pax_extensions([("SCHILY.xattr.user.note", &b"v"[..]), ("mtime", &b"1600000000.5"[..])]).expect("pax");
    b.append_data(&mut x, "d/attr", &b"hi"[..]).expect("attr");
    b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0, 0), "d/sym", "suid").expect("sym");
    b.append_link(&mut header(tar::EntryType::Link, 0o4755, 0, 0), "d/hard", "d/suid").expect("hard");
    b.append_data(&mut header(tar::EntryType::Fifo, 0o600, 0, 0), "d/fifo", &b""[..]).expect("fifo");
    let mut null = header(tar::EntryType::Char, 0o666, 0, 0);
    null.set_device_major(1).expect("major");
    null.set_device_minor(3).expect("minor");
    b.append_data(&mut null, "d/null", &b""[..]).expect("null");
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 3, 0), "d/.wh.gone", &b""[..]).expect("wh");
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, 0), "o/.wh..wh..opq", &b""[..]).expect("opq");
    b.append_data(&mut header(tar::EntryType::Regular, 0o600, 0, 1), "m/n/f", &b"x"[..]).expect("deep");
    let tar = finish(b);
    let compressed = zstd::encode_all(&tar[..], 3).expect("zstd");

    let done =
        unpack_layer(&compressed[..], &root, std::slice::from_ref(&below), Some(&diff_id(&tar)), Limits::default())
            .expect("unpacks");
    assert_eq!(done.diff_id, diff_id(&tar));
    assert_eq!(done.uncompressed_bytes, tar.len() as u64);

    let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).expect(p);
    let d = meta("d");
    assert_eq!((d.mode() & 0o7777, d.uid(), d.mtime()), (0o750, 1000, 1_600_000_000), "directory time set last");
    let suid = meta("d/suid");
    assert_eq!(
        (suid.mode() & 0o7777, suid.nlink()),
        (0o4755, 2),
        "setuid kept after chown; hard link (its header sets the shared inode, as in containerd)"
    );
    assert_eq!(std::fs::read(root.join("d/hard")).expect("hard"), b"hello");
    let attr = meta("d/attr");
    assert_eq!((attr.uid(), attr.mtime(), attr.mtime_nsec()), (7, 1_600_000_000, 500_000_000));
    assert_eq!(xattr::get(root.join("d/attr"), "user.note").expect("xattr"), Some(b"v".to_vec()));
    assert_eq!(std::fs::read_link(root.join("d/sym")).expect("sym"), Path::new("suid"));
    assert!(meta("d/fifo").file_type().is_fifo());
    let null = meta("d/null");
    assert!(null.file_type().is_char_device() && null.rdev() == nix::libc::makedev(1, 3));
    let gone = meta("d/gone");
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0 && gone.uid() == 3, "whiteout as 0:0 device");
    assert!(!root.join("d/.wh.gone").exists() && !root.join("o/.wh..wh..opq").exists());
    assert_eq!(xattr::get(root.join("o"), "trusted.overlay.opaque").expect("opaque"), Some(b"y".to_vec()));
    let m = meta("m");
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o700, 5), "a missing parent copies the layer below");
    assert_eq!(meta("m/n").mode() & 0o7777, 0o755, "no layer below has it: 0755");
}

#[test]
fn paths_and_links_never_leave_the_layer_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outside) = (dir.path().join("layer"), dir.path().join("outside"));
    std::fs::create_dir_all(&root).expect("root");
    std::fs::create_dir_all(&outside).expect("outside");
    std::fs::write(outside.join("secret"), b"secret").expect("secret");
    let out = outside.to_str().expect("utf-8");

    // A symlink to an absolute directory outside, then files written through it: they land
    // under the layer, at the same path.
    let mut b = tar::Builder::new(Vec::new());
    b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0, 0), "out", out).expect("link");
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, 3), "out/pwned", &b"bad"[..]).expect("through");
    // A file over a symlink that points at an outside file: the symlink is replaced.
    b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0, 0), "over", format!("{out}/secret")).expect("link");
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, 3), "over", &b"new"[..]).expect("over");
    // A directory written into, then replaced by a symlink to the outside, then written
    // through: the new path resolves again, inside.
    b.append_data(&mut header(tar::EntryType::Directory, 0o755, 0, 0), "dd", &b""[..]).expect("dd");
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, 1), "dd/f1", &b"1"[..]).expect("f1");
    b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0, 0), "dd", out).expect("dd link");
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, 1), "dd/f2", &b"2"[..]).expect("f2");
    let tar = finish(b);
    unpack(&tar, &root).expect("unpacks");
    assert!(!outside.join("pwned").exists() && !outside.join("f2").exists(), "nothing written outside");
    assert_eq!(std::fs::read(root.join(out.trim_start_matches('/')).join("f2")).expect("f2 inside"), b"2");
    assert_eq!(std::fs::read(root.join(out.trim_start_matches('/')).join("pwned")).expect("inside"), b"bad");
    assert_eq!(std::fs::read(outside.join("secret")).expect("secret"), b"secret");
    assert!(std::fs::symlink_metadata(root.join("over")).expect("over").is_file());

    // A hard link through a symlink to an outside file: resolved inside, where it is not.
    let mut b = tar::Builder::new(Vec::new());
    b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0, 0), "o2", out).expect("link");
    b.append_link(&mut header(tar::EntryType::Link, 0o644, 0, 0), "stolen", "o2/secret").expect("hard");
    let root2 = dir.path().join("layer2");
    std::fs::create_dir_all(&root2).expect("root2");
    let err = unpack(&finish(b), &root2).expect_err("refused");
    assert!(matches!(err, UnpackError::Entry { ref path, .. } if path == "stolen"), "{err}");
    assert_eq!(std::fs::metadata(outside.join("secret")).expect("secret").nlink(), 1, "never linked");

    for (name, link, kind) in [
        ("../escape", "", tar::EntryType::Regular),
        ("a/../../escape", "", tar::EntryType::Regular),
        ("hl", "../../outside/secret", tar::EntryType::Link),
        ("d/.wh..", "", tar::EntryType::Regular),
    ] {
        let mut bytes = raw(kind, name, link, 0).as_bytes().to_vec();
        bytes.extend([0u8; 1024]);
        let root3 = tempfile::tempdir_in(dir.path()).expect("root3");
        let err = unpack(&bytes, root3.path()).expect_err(name);
        assert!(matches!(err, UnpackError::Entry { .. }), "{name}: {err}");
        assert!(!dir.path().join("escape").exists(), "{name}");
    }
    assert_eq!(std::fs::metadata(outside.join("secret")).expect("secret").nlink(), 1);
}

#[test]
fn a_stream_that_is_not_its_diff_id_or_not_whole_or_bloated_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, 4096), "f", &[7u8; 4096][..]).expect("f");
    let tar = finish(b);

    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = unpack_layer(&tar[..], dir.path(), &[], Some(&wrong), Limits::default()).expect_err("diff id");
    assert!(matches!(err, UnpackError::DiffId { .. }), "{err}");

    let compressed = zstd::encode_all(&tar[..], 3).expect("zstd");
    let cut = &compressed[..compressed.len() / 2];
    let root = tempfile::tempdir_in(dir.path()).expect("root");
    let err = unpack(cut, root.path()).expect_err("truncated");
    assert!(err.to_string().contains("truncated") || err.to_string().contains("unexpected"), "{err}");

    // A PAX header claiming 8 GiB, a few KiB of zstd: refused at its header, memory untouched.
    let mut h = header(tar::EntryType::XHeader, 0o644, 0, 8 << 30);
    h.set_cksum();
    let mut bomb = h.as_bytes().to_vec();
    bomb.extend(std::iter::repeat_n(b'a', 64 << 20));
    let compressed = zstd::encode_all(&bomb[..], 3).expect("zstd");
    assert!(compressed.len() < 64 << 10);
    let root = tempfile::tempdir_in(dir.path()).expect("root");
    let err = unpack(&compressed, root.path()).expect_err("bomb");
    assert!(err.to_string().contains("metadata entry"), "{err}");
}

/// A layer that inflates without bound (1 GiB of zeros in a few KiB of zstd) stops once the disk
/// would be left with less than the limit, having written about the room the limit left.
#[test]
fn a_tar_bomb_stops_before_the_disk_is_left_with_less_than_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let encoder = zstd::Encoder::new(Vec::new(), 1).expect("zstd");
    let mut b = tar::Builder::new(encoder);
    let size = 1u64 << 30;
    b.append_data(&mut header(tar::EntryType::Regular, 0o644, 0, size), "zeros", std::io::repeat(0).take(size))
        .expect("zeros");
    let bomb = b.into_inner().expect("tar").finish().expect("zstd");
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let root = dir.path().join("layer");
    std::fs::create_dir(&root).expect("root");
    let st = nix::sys::statvfs::statvfs(dir.path()).expect("statvfs");
    let available = st.blocks_available() as u64 * st.fragment_size() as u64;
    // Leaves room for 64 MiB.
    let min_free = available.saturating_sub(64 << 20);
    let err = unpack_layer(&bomb[..], &root, &[], None, Limits { min_free }).expect_err("a tar bomb unpacked");
    let UnpackError::DiskReserve { written, .. } = err else { panic!("{err}") };
    let on_disk = std::fs::metadata(root.join("zeros")).expect("zeros").len();
    assert!(on_disk == written, "{on_disk} bytes on disk, {written} counted");
    assert!(written < (64 << 20) + 2 * clip_unpack::apply::FREE_CHECK_BYTES, "{written} bytes written");
    let text = UnpackError::DiskReserve { written, available: 0, min_free }.to_string();
    assert!(text.contains(&format!("the unpack must leave {min_free}")), "{text}");
}
