//! Indexes opened from their stored files (`Index::open_file`): mapped read-only, with only the
//! pages that lookups touch resident in the process; and hostile stored files refused cleanly.

use clip_index::format::{MAX_INDEX_LEN, TRAILER_LEN};
use clip_index::{BuildOptions, Index, IndexError, build_index};
use std::path::Path;

fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// An uncompressed layer of `dirs` directories of `per_dir` empty files each.
fn many_files(dirs: usize, per_dir: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..dirs {
        b.append_data(&mut header(tar::EntryType::Directory, 0o755), format!("d{d:03}/"), std::io::empty())
            .expect("dir");
        for f in 0..per_dir {
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644),
                format!("d{d:03}/file-{f:05}"),
                std::io::empty(),
            )
            .expect("file");
        }
    }
    b.into_inner().expect("tar")
}

fn index_of(tar: &[u8]) -> Index {
    build_index(tar, &BuildOptions::default()).expect("index")
}

/// Bytes of `path`'s map resident in this process (its `Rss` in /proc/self/smaps).
fn resident(path: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let name = path.to_str().expect("utf-8 path");
    let mut total = 0;
    let mut ours = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            ours = line.ends_with(name);
        } else if ours && let Some(kb) = line.strip_prefix("Rss:") {
            total += kb.trim().trim_end_matches("kB").trim().parse::<u64>().expect("Rss kB") * 1024;
        }
    }
    total
}

/// Whether the page holding `at` is mapped in this process (bit 63 of its /proc/self/pagemap
/// entry).
fn page_present(at: *const u8) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    f.seek(SeekFrom::Start((at as u64 / 4096) * 8)).expect("seek");
    let mut entry = [0u8; 8];
    f.read_exact(&mut entry).expect("read pagemap");
    u64::from_le_bytes(entry) >> 63 == 1
}

#[test]
fn a_stored_index_is_read_in_place_with_only_the_pages_lookups_touch_resident() {
    let built = index_of(&many_files(300, 1000));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("layer.index");
    std::fs::write(&path, built.bytes()).expect("store");
    let len = built.bytes().len() as u64;
    assert!(len > 24 << 20, "the index should span many pages: {len} bytes");

    let stored = Index::open_file(&path).expect("open_file");
    assert!(stored.is_mapped());
    assert!(stored.same_bytes(&built));
    stored.validate().expect("validate");
    let after_open = resident(&path);
    assert!(after_open <= 64 << 10, "opening and validating left {after_open} of {len} bytes resident");

    // Lookups read what the owned index reads, and fault in only their own pages (with what the
    // kernel maps around each fault): in one directory, not another's far off.
    let far = stored.entry(stored.entry_count() - 1).expect("entry"); // d299's last file
    assert_eq!(far.name, b"file-00999");
    let far_name = far.name.as_ptr();
    stored.release_resident();
    let paths = ["d000/file-00000", "d000/file-00500", "d000/file-00999"];
    for p in paths {
        let (a, b) = (stored.lookup(p).expect("lookup"), built.lookup(p).expect("lookup"));
        assert_eq!(a, b, "{p}");
        assert!(a.is_some(), "{p}");
    }
    assert_eq!(stored.lookup("d000/file-01000").expect("lookup"), None);
    let near = stored.entry(stored.lookup("d000/file-00000").expect("lookup").expect("entry")).expect("entry");
    assert!(page_present(near.name.as_ptr()), "a name the lookup compared is not resident");
    assert!(!page_present(far_name), "a name 4 MB from any lookup is resident");
    let after_lookups = resident(&path);
    assert!(after_lookups < len / 2, "three lookups left {after_lookups} of {len} bytes resident");

    // The measure can fail: a pass over every entry makes the whole map resident, and releasing
    // it gives it back.
    for id in 0..stored.entry_count() {
        assert_eq!(stored.entry(id).expect("entry"), built.entry(id).expect("entry"));
    }
    let scanned = resident(&path);
    assert!(scanned >= len / 2, "a full scan left only {scanned} of {len} bytes resident");
    stored.release_resident();
    assert!(resident(&path) <= 64 << 10, "released, yet {} bytes stay resident", resident(&path));
    assert_eq!(
        stored.entry(stored.entry_count() - 1).expect("entry"),
        built.entry(built.entry_count() - 1).expect("entry")
    );
}

/// Whether the page holding `at` (in a file map) is in the page cache (`mincore`), mapped
/// into this process or not.
fn page_cached(at: *const u8) -> bool {
    let page = (at as usize / 4096 * 4096) as *mut libc::c_void;
    let mut vec = [0u8; 1];
    // SAFETY: `page` is the start of a page of a live map; `vec` has room for its one page.
    #[allow(unsafe_code)]
    let r = unsafe { libc::mincore(page, 4096, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec[0] & 1 == 1
}

/// Drops `path`'s clean pages from the page cache (none may be mapped).
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    // SAFETY: a plain advice call on an open descriptor.
    #[allow(unsafe_code)]
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

#[test]
fn faults_read_single_pages_until_a_walk_turns_read_around_on() {
    let built = index_of(&many_files(300, 1000));
    // On disk (the target dir), not a tmpfs whose pages cannot be evicted.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let path = dir.path().join("layer.index");
    std::fs::write(&path, built.bytes()).expect("store");
    std::fs::File::open(&path).expect("open").sync_all().expect("sync");
    let stored = Index::open_file(&path).expect("open_file");
    let d150 = stored.entry(stored.lookup("d150").expect("lookup").expect("d150")).expect("entry");
    let first = stored.entry(stored.children(&d150).expect("children").start).expect("child");
    // Where d150's names lie, not read yet (a read maps the page and keeps it cached).
    let name = first.name.as_ptr();
    let ten_pages_on = name.wrapping_add(10 * 4096);
    let cold = || {
        stored.release_resident();
        evict(&path);
        assert!(!page_cached(name) && !page_cached(ten_pages_on), "evicted pages are still cached");
    };

    // Lookups' faults read their own page only: the measure can fail.
    cold();
    assert_eq!(stored.entry(first.id).expect("entry").name, b"file-00000");
    assert!(page_cached(name), "the faulted page is not cached");
    assert!(!page_cached(ten_pages_on), "a lookup's fault read 40 KiB past its page");

    // A walk: from now on a fault reads around it.
    stored.expect_walk();
    stored.expect_walk();
    cold();
    assert_eq!(stored.entry(first.id).expect("entry").name, b"file-00000");
    assert!(page_cached(ten_pages_on), "a fault in a walk did not read around");
    // An owned index takes the call and stays as it is.
    built.expect_walk();
    assert!(!built.is_mapped());
}

#[test]
fn a_packed_stored_index_is_read_and_unpacked() {
    let built = index_of(&many_files(2, 10));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("packed.index");
    std::fs::write(&path, built.pack().expect("pack")).expect("store");
    let stored = Index::open_file(&path).expect("open_file");
    assert!(!stored.is_mapped());
    assert_eq!(stored.bytes(), built.bytes());
}

#[test]
fn a_large_index_packed_by_several_workers_in_small_jobs_unpacks_to_the_same_bytes() {
    // 120,000 entries: about 10 MiB, over the size from which zstd's workers pack it in jobs.
    let built = index_of(&many_files(120, 1000));
    assert!(built.bytes().len() > 8 << 20, "{}", built.bytes().len());
    let packed = built.pack().expect("pack");
    assert!(packed.len() < built.bytes().len() / 4, "{} of {}", packed.len(), built.bytes().len());
    let unpacked = Index::open_any(packed).expect("open_any");
    assert_eq!(unpacked.bytes(), built.bytes());
}

#[test]
fn hostile_stored_files_are_refused_without_reading_them_whole() {
    let built = index_of(&many_files(2, 10));
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };

    // Missing: an I/O error the caller can tell apart (NotFound), not a panic.
    match Index::open_file(&dir.path().join("absent")) {
        Err(IndexError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("absent file: {other:?}"),
    }
    // A directory, an empty file, a truncated index, a flipped byte, garbage.
    assert!(Index::open_file(dir.path()).is_err());
    assert!(Index::open_file(&write("empty", b"")).is_err());
    let bytes = built.bytes();
    let cut = write("cut", &bytes[..bytes.len() - TRAILER_LEN / 2]);
    assert!(Index::open_file(&cut).expect_err("truncated").to_string().contains("checksum"));
    let mut flipped = bytes.to_vec();
    flipped[200] ^= 1;
    assert!(Index::open_file(&write("flipped", &flipped)).expect_err("flipped").to_string().contains("checksum"));
    assert!(Index::open_file(&write("garbage", &[0x5a; 4096])).is_err());
    // A zstd bomb posing as a packed index: refused after its allowance.
    let bomb = zstd::bulk::compress(&vec![0u8; 200 << 20], 19).expect("bomb");
    assert!(Index::open_file(&write("bomb", &bomb)).is_err());
    // A (sparse) file larger than any index: refused by its size, before a byte is read.
    let huge = dir.path().join("huge");
    std::fs::File::create(&huge).expect("create").set_len(MAX_INDEX_LEN as u64 + 1).expect("set_len");
    let e = Index::open_file(&huge).expect_err("huge");
    assert!(e.to_string().contains("more than an index may be"), "{e}");
}
