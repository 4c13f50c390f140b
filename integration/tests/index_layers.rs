//! clip-index against real tools: layers made by `tar` + `gzip`, multi-member gzip, `zstd`
//! (one and several frames), plain tar, and the test bed's buildah images. For every entry the
//! metadata must match what `tar -x` produces, and every regular file read through the index by
//! random access must equal the extracted file.

use clip_index::format::EntryKind;
use clip_index::reader::FileFetcher;
use clip_index::{BuildOptions, Index, IndexError, RangeFetcher};
use clip_integration::images::{TestImage, blob_path, layout_layers};
use clip_integration::{TestDir, require_root, run};
use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn sh(script: &str) -> anyhow::Result<()> {
    run(Command::new("bash").arg("-ec").arg(script))?;
    Ok(())
}

/// A source tree exercising every entry type and metadata the index must keep.
fn make_tree(root: &Path) -> anyhow::Result<()> {
    let r = root.display();
    sh(&format!(
        r"
        mkdir -p {r}/dir/sub {r}/opaque {r}/empty-dir
        head -c 3000000 /dev/urandom > {r}/dir/random.bin
        seq 1 2000000 > {r}/dir/counting.txt
        : > {r}/empty-file
        echo hello > {r}/dir/sub/hello.txt
        cp {r}/dir/sub/hello.txt {r}/setuid; chmod 4755 {r}/setuid
        cp {r}/dir/sub/hello.txt {r}/setgid; chmod 2711 {r}/setgid
        mkdir {r}/sticky; chmod 1777 {r}/sticky
        chmod 0600 {r}/dir/sub/hello.txt
        ln -s sub/hello.txt {r}/dir/rel-link
        ln -s /etc/absolute {r}/abs-link
        ln {r}/dir/counting.txt {r}/hardlink-to-counting
        ln {r}/dir/counting.txt {r}/dir/sub/second-hardlink
        L=$(printf 'l%.0s' $(seq 1 150)); mkdir -p {r}/long/$L/$L; echo deep > {r}/long/$L/$L/$L.txt
        mknod {r}/chardev c 1 3; mknod {r}/blockdev b 7 0; mkfifo {r}/fifo
        : > {r}/.wh.deleted-file; : > {r}/opaque/.wh..wh..opq
        setfattr -n user.test -v xattr-value {r}/dir/sub/hello.txt
        setfattr -n trusted.overlay.opaque -v y {r}/opaque 2>/dev/null || true
        chown 1234:5678 {r}/dir/random.bin
        touch -h -d '2021-03-04 05:06:07.123456789' {r}/dir/random.bin {r}/dir/rel-link
        "
    ))
}

struct Layer {
    name: &'static str,
    blob: PathBuf,
}

fn make_layers(td: &TestDir) -> anyhow::Result<(PathBuf, Vec<Layer>)> {
    let src = td.sub("src")?;
    make_tree(&src)?;
    let d = td.path().display();
    let s = src.display();
    sh(&format!(
        r"
        cd {d}
        tar --format=posix --xattrs --xattrs-include='*' --numeric-owner -C {s} -cf layer.tar .
        gzip -6 -c layer.tar > layer.tar.gz
        pigz -c -b 128 layer.tar > layer.pigz.tar.gz
        split -b 1500000 layer.tar part.
        for p in part.*; do gzip -c $p; done > layer.multi.tar.gz
        zstd -q -c layer.tar > layer.tar.zst
        for p in part.*; do zstd -q -c $p; done > layer.multi.tar.zst
        "
    ))?;
    let p = |n: &str| td.path().join(n);
    Ok((
        src,
        vec![
            Layer { name: "plain", blob: p("layer.tar") },
            Layer { name: "gzip", blob: p("layer.tar.gz") },
            Layer { name: "gzip multi-member", blob: p("layer.multi.tar.gz") },
            Layer { name: "pigz", blob: p("layer.pigz.tar.gz") },
            Layer { name: "zstd", blob: p("layer.tar.zst") },
            Layer { name: "zstd multi-frame", blob: p("layer.multi.tar.zst") },
        ],
    ))
}

fn index_of(blob: &Path, span: u64) -> anyhow::Result<Index> {
    let f = std::fs::File::open(blob)?;
    let opts = BuildOptions { span_size: span, ..BuildOptions::default() };
    let idx = clip_index::build_index(std::io::BufReader::new(f), &opts)?;
    idx.validate()?;
    // The encoding round-trips, packed and plain.
    let again = Index::open_any(idx.pack()?)?;
    assert_eq!(again.bytes(), idx.bytes());
    Ok(idx)
}

fn xattrs_of(path: &Path) -> Vec<(String, String)> {
    let out = Command::new("getfattr").args(["-h", "-d", "-m", "-", "--absolute-names"]).arg(path).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut v: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    v.sort();
    v
}

/// Compares every entry of `idx` with the tree `tar -x` made at `extracted`; returns the number of
/// regular files whose bytes were compared.
fn compare(idx: &Index, blob: &Path, extracted: &Path, check_xattrs: bool) -> anyhow::Result<usize> {
    let fetcher = FileFetcher(std::fs::File::open(blob)?);
    let mut seen = BTreeSet::new();
    let mut files = 0;
    for id in 1..idx.entry_count() {
        let e = idx.entry(id)?;
        let rel = String::from_utf8(idx.path(id)?)?;
        let p = extracted.join(&rel);
        seen.insert(rel.clone());
        let md = std::fs::symlink_metadata(&p).map_err(|err| anyhow::anyhow!("{rel}: {err}"))?;
        let ft = md.file_type();
        let kind_ok = match e.kind {
            EntryKind::File | EntryKind::Hardlink => ft.is_file(),
            EntryKind::Dir => ft.is_dir(),
            EntryKind::Symlink => ft.is_symlink(),
            EntryKind::CharDevice => ft.is_char_device(),
            EntryKind::BlockDevice => ft.is_block_device(),
            EntryKind::Fifo => ft.is_fifo(),
        };
        assert!(kind_ok, "{rel}: index says {:?}, tar made {ft:?}", e.kind);
        if e.kind != EntryKind::Symlink {
            assert_eq!(e.mode, md.mode() & 0o7777, "{rel}: mode");
        }
        assert_eq!((e.uid, e.gid), (md.uid(), md.gid()), "{rel}: owner");
        if e.kind != EntryKind::Dir {
            assert_eq!(e.mtime_sec, md.mtime(), "{rel}: mtime");
            assert_eq!(i64::from(e.mtime_nsec), md.mtime_nsec(), "{rel}: mtime ns");
        }
        match e.kind {
            EntryKind::Symlink => {
                assert_eq!(e.link, std::fs::read_link(&p)?.as_os_str().as_encoded_bytes(), "{rel}: target");
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                let rdev = md.rdev();
                let (maj, min) = (((rdev >> 8) & 0xfff) as u32, ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32);
                assert_eq!((e.dev_major, e.dev_minor), (maj, min), "{rel}: device");
            }
            EntryKind::File | EntryKind::Hardlink => {
                let t = idx.resolve_hardlink(e.clone())?;
                assert_eq!(t.size, md.len(), "{rel}: size");
                assert_eq!(u64::from(e.nlink), md.nlink(), "{rel}: link count");
                let want = std::fs::read(&p)?;
                let got = idx.read(&fetcher, &e, 0, u64::MAX)?;
                assert!(got == want, "{rel}: bytes read through the index differ from tar -x");
                files += 1;
            }
            _ => {}
        }
        if check_xattrs {
            let mut x: Vec<(String, String)> = idx
                .xattrs(&e)?
                .iter()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()))
                .collect();
            x.sort();
            assert_eq!(x, xattrs_of(&p), "{rel}: xattrs");
        }
    }
    // Nothing tar extracted is missing from the index.
    let out = run(Command::new("find").arg(".").arg("-mindepth").arg("1").current_dir(extracted))?;
    let found: BTreeSet<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim_start_matches("./").to_string()).collect();
    assert_eq!(found, seen, "index and tar -x disagree on the set of paths");
    Ok(files)
}

#[test]
fn every_format_reads_back_exactly_what_tar_extracts() -> anyhow::Result<()> {
    require_root();
    let td = TestDir::new("idxfmt")?;
    let (_src, layers) = make_layers(&td)?;
    let out = td.sub("x")?;
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(td.path().join("layer.tar"))
        .arg("-C")
        .arg(&out))?;
    for layer in &layers {
        let idx = index_of(&layer.blob, 64 << 10)?;
        // A single zstd frame has one span (no seek points inside a frame); the rest have many.
        let min_spans = if layer.name == "zstd" { 1 } else { 6 };
        assert!(idx.span_count() >= min_spans, "{}: only {} spans", layer.name, idx.span_count());
        let files = compare(&idx, &layer.blob, &out, true)?;
        assert!(files >= 8, "{}: only {files} files compared", layer.name);
        // Whiteouts and opaque markers are kept as entries.
        assert!(idx.lookup(".wh.deleted-file")?.is_some(), "{}", layer.name);
        assert!(idx.lookup("opaque/.wh..wh..opq")?.is_some(), "{}", layer.name);
        // Hardlinks share the data of their target.
        let h = idx.entry(idx.lookup("hardlink-to-counting")?.expect("hardlink"))?;
        let c = idx.lookup("dir/counting.txt")?.expect("target");
        assert!(h.kind == EntryKind::Hardlink && h.hardlink_target == c || idx.entry(c)?.kind == EntryKind::Hardlink);
        // The digest recorded is the blob's, and a wrong expectation is refused.
        let digest = format!("sha256:{}", clip_integration::sha256_file(&layer.blob)?);
        assert_eq!(idx.layer_digest(), digest);
        let opts =
            BuildOptions { expected_digest: Some(format!("sha256:{}", "0".repeat(64))), ..BuildOptions::default() };
        let err = clip_index::build_index(std::fs::File::open(&layer.blob)?, &opts).expect_err("wrong digest");
        assert!(matches!(err, IndexError::LayerDigest { .. }), "{err}");
    }
    // Multi-member gzip gets member checkpoints; multi-frame zstd gets frame checkpoints.
    let multi = index_of(&layers[2].blob, 64 << 10)?;
    assert!(
        (0..multi.span_count())
            .any(|i| multi.span(i).is_ok_and(|s| s.kind == clip_index::format::CheckpointKind::Member))
    );
    let zmulti = index_of(&layers[5].blob, 64 << 10)?;
    assert!(
        (0..zmulti.span_count())
            .any(|i| zmulti.span(i).is_ok_and(|s| s.kind == clip_index::format::CheckpointKind::Frame))
    );
    Ok(())
}

/// A fetcher that flips one bit of whatever it returns.
struct Corrupting(FileFetcher);

impl RangeFetcher for Corrupting {
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
        let mut v = self.0.fetch(offset, len)?;
        if let Some(b) = v.get_mut(len as usize / 2) {
            *b ^= 0x10;
        }
        Ok(v)
    }
}

#[test]
fn a_corrupted_span_is_an_error_never_wrong_bytes() -> anyhow::Result<()> {
    require_root();
    let td = TestDir::new("idxcorrupt")?;
    let (_src, layers) = make_layers(&td)?;
    for layer in &layers {
        let idx = index_of(&layer.blob, 64 << 10)?;
        let e = idx.entry(idx.lookup("dir/random.bin")?.expect("file"))?;
        let bad = Corrupting(FileFetcher(std::fs::File::open(&layer.blob)?));
        let err = idx.read(&bad, &e, 1000, 4096).expect_err("corruption must be detected");
        assert!(matches!(err, IndexError::SpanDigest { .. }), "{}: {err}", layer.name);
    }
    Ok(())
}

#[test]
fn python_image_layers_read_back_exactly() -> anyhow::Result<()> {
    require_root();
    let td = TestDir::new("idxpy")?;
    let layout = TestImage::Python.layout()?;
    for (digest, media_type, _) in layout_layers(&layout, "pyapp")? {
        let blob = blob_path(&layout, &digest)?;
        let opts = BuildOptions { expected_digest: Some(digest.clone()), media_type, ..BuildOptions::default() };
        let idx = clip_index::build_index(std::io::BufReader::new(std::fs::File::open(&blob)?), &opts)?;
        idx.validate()?;
        let out = td.sub(&digest[7..19])?;
        run(Command::new("tar").args(["--numeric-owner", "-xpzf"]).arg(&blob).arg("-C").arg(&out))?;
        let files = compare(&idx, &blob, &out, false)?;
        assert!(files > 0 || idx.entry_count() < 10);
    }
    Ok(())
}

/// The largest layer of the python test image (its blob) and its full index with `span_size` spans.
fn largest_python_layer(span_size: u64) -> anyhow::Result<(Vec<u8>, clip_index::Index)> {
    let layout = clip_integration::images::TestImage::Python.layout()?;
    let (digest, _, _) = clip_integration::images::layout_layers(&layout, "pyapp")?
        .into_iter()
        .max_by_key(|(_, _, s)| *s)
        .ok_or_else(|| anyhow::anyhow!("no layers"))?;
    let blob = std::fs::read(clip_integration::images::blob_path(&layout, &digest)?)?;
    let opts = clip_index::BuildOptions { span_size, expected_digest: Some(digest), ..Default::default() };
    let full = clip_index::build_index(&blob[..], &opts)?;
    Ok((blob, full))
}

#[test]
fn an_index_split_as_it_is_encoded_is_the_full_index_split_afterwards() -> anyhow::Result<()> {
    // Small spans: the windows outweigh the rest; one span per 64 MiB: the rest outweighs them.
    for span_size in [64 << 10, 64 << 20] {
        let (blob, full) = largest_python_layer(span_size)?;
        let (meta, windows) = full.split_windows()?.ok_or_else(|| anyhow::anyhow!("nothing to split"))?;
        let opts = clip_index::BuildOptions { span_size, ..Default::default() };
        let (split, split_windows) = clip_index::build_index_split(&blob[..], &opts)?;
        assert!(split.bytes() == meta.as_slice(), "{span_size}: the index without windows differs");
        assert!(split_windows.as_deref() == Some(windows.as_slice()), "{span_size}: the windows differ");
    }
    // A layer without windows (an uncompressed tar) is its plain index.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "f", &b"abc"[..])?;
    let plain = b.into_inner()?;
    let (index, windows) = clip_index::build_index_split(&plain[..], &clip_index::BuildOptions::default())?;
    assert!(windows.is_none());
    assert_eq!(index.bytes(), clip_index::build_index(&plain[..], &clip_index::BuildOptions::default())?.bytes());
    Ok(())
}

#[test]
fn split_windows_index_decodes_every_span_like_the_full_one_and_checks_windows() -> anyhow::Result<()> {
    let (blob, full) = largest_python_layer(512 << 10)?;
    let (meta, windows) = full.split_windows()?.ok_or_else(|| anyhow::anyhow!("nothing to split"))?;
    let split = clip_index::Index::open(meta.clone())?;
    split.validate()?;
    assert!(split.has_external_windows());
    assert_eq!(split.entry_count(), full.entry_count());
    let packed_full = full.pack()?.len();
    let packed_meta = split.pack()?.len();
    eprintln!(
        "index {} bytes packed -> {packed_meta} without windows + {} of windows ({} spans)",
        packed_full,
        windows.len(),
        split.span_count()
    );
    assert!(packed_meta * 3 < packed_full, "the index without windows is much smaller");
    for i in 0..split.span_count() {
        let s = split.span(i)?;
        let compressed = &blob[s.comp_start as usize..s.comp_end as usize];
        let window = split.window_location(&s).map(|(off, len)| &windows[off as usize..off as usize + len as usize]);
        let got = split.decode_span_with(&s, compressed, None, window)?;
        let want = full.decode_span(&full.span(i)?, compressed, None)?;
        assert!(got == want, "span {i} differs");
        if let Some(w) = window {
            let mut bad = w.to_vec();
            bad[w.len() / 2] ^= 1;
            assert!(split.decode_span_with(&s, compressed, None, Some(&bad)).is_err(), "a bad window must be refused");
            assert!(split.decode_span(&s, compressed, None).is_err(), "no window, no decode");
        }
    }
    Ok(())
}

#[test]
fn every_span_decodes_with_the_history_of_the_spans_before_it_and_a_short_history_is_refused() -> anyhow::Result<()> {
    let (blob, full) = largest_python_layer(256 << 10)?;
    let (meta, _windows) = full.split_windows()?.ok_or_else(|| anyhow::anyhow!("nothing to split"))?;
    let split = clip_index::Index::open(meta)?;
    // Walking the layer span by span, each span's history is the end of what came before: no
    // window is needed from anywhere.
    let mut history: Vec<u8> = Vec::new();
    let mut with_history = 0;
    for i in 0..split.span_count() {
        let s = split.span(i)?;
        let compressed = &blob[s.comp_start as usize..s.comp_end as usize];
        let got = split.decode_span_after(&s, compressed, None, &history)?;
        let want = full.decode_span(&full.span(i)?, compressed, None)?;
        assert!(got == want, "span {i} differs");
        let need = split.history_len(&s);
        if need > 0 {
            with_history += 1;
            let short = &history[history.len() - need + 1..];
            assert!(split.decode_span_after(&s, compressed, None, short).is_err(), "span {i}: short history taken");
        }
        history.extend_from_slice(&got);
        let keep = history.len().saturating_sub(64 << 10);
        history.drain(..keep);
    }
    assert!(with_history > 10, "{with_history} spans needed a history");
    eprintln!("{} spans decoded, {with_history} of them from the history of the spans before", split.span_count());
    Ok(())
}

/// A blob in memory that counts its range requests.
struct Counted {
    bytes: Vec<u8>,
    requests: std::sync::atomic::AtomicU64,
}

impl clip_index::RangeFetcher for Counted {
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.bytes.get(offset as usize..(offset + len) as usize).map(<[u8]>::to_vec).ok_or_else(|| IndexError::Fetch {
            offset,
            len,
            message: "out of range".into(),
        })
    }
}

#[test]
fn background_completion_streams_a_layer_in_large_requests_without_windows() -> anyhow::Result<()> {
    use clip_readpath::{Completer, CompletionPolicy, SpanCache, SpanCacheOptions};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let (blob, full) = largest_python_layer(256 << 10)?;
    let (meta, windows) = full.split_windows()?.ok_or_else(|| anyhow::anyhow!("nothing to split"))?;
    let split = Arc::new(clip_index::Index::open(meta)?);
    let td = tempfile::tempdir()?;
    let source = Arc::new(Counted { bytes: blob.clone(), requests: 0.into() });
    let windows = Arc::new(Counted { bytes: windows, requests: 0.into() });
    let options = SpanCacheOptions { windows: Some(windows.clone()), ..Default::default() };
    let cache = Arc::new(SpanCache::with_options(split.clone(), td.path().join("spans"), source.clone(), options)?);

    // A container read in the middle of the layer: its span needs its window (the span before
    // is not local); the read of the span after it needs none (history from the local span).
    let mid = split.span_count() / 2;
    let s = split.span(mid)?;
    cache.read(s.uncomp_start, s.uncomp_start + 1)?;
    assert_eq!(windows.requests.load(Ordering::SeqCst), 1, "a cold span takes its window");
    let next = split.span(mid + 1)?;
    cache.read(next.uncomp_start, next.uncomp_start + 1)?;
    assert_eq!(windows.requests.load(Ordering::SeqCst), 1, "a span after a local one takes no window");
    // The registry_fetches metric counts every range request, the window's too (it did not).
    let requests = source.requests.load(Ordering::SeqCst) + windows.requests.load(Ordering::SeqCst);
    assert_eq!(cache.metrics().fetches.get(), requests, "range requests counted");

    // Completion streams the rest in requests of 4 MiB, moving on past the latest miss first.
    let before = source.requests.load(Ordering::SeqCst);
    let completer = Completer::start(
        CompletionPolicy {
            streams: 1,
            request_bytes: 4 << 20,
            start_delay: std::time::Duration::ZERO,
            quiet: std::time::Duration::ZERO,
        },
        None,
    )
    .ok_or_else(|| anyhow::anyhow!("no completer"))?;
    completer.add(&cache);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while completer.pending() > 0 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(completer.pending(), 0, "the layer was not completed");
    let requests = source.requests.load(Ordering::SeqCst) - before;
    let streamed = cache.metrics().stream_bytes.get();
    let rest = blob.len() as u64 - (s.comp_end - s.comp_start) - (next.comp_end - next.comp_start);
    eprintln!(
        "{} spans: completed with {requests} requests, {streamed} bytes (the rest is {rest}), {} windows in all",
        split.span_count(),
        windows.requests.load(Ordering::SeqCst)
    );
    // From mid + 2 to the end, then from 0 to mid: at most one window (span 0 needs none; the
    // stream that starts after the local spans takes their history).
    assert!(windows.requests.load(Ordering::SeqCst) <= 2, "completion fetched windows");
    assert!(requests <= blob.len() as u64 / (4 << 20) + 3, "{requests} requests for {} bytes", blob.len());
    assert!(streamed <= rest + (512 << 10), "streamed {streamed} bytes for {rest}");
    // Every span is the bytes the full index decodes.
    for i in 0..split.span_count() {
        let si = split.span(i)?;
        let want = full.decode_span(&full.span(i)?, &blob[si.comp_start as usize..si.comp_end as usize], None)?;
        let got = cache.read(si.uncomp_start, si.uncomp_end)?;
        assert!(got == want, "span {i} differs");
    }
    assert_eq!(source.requests.load(Ordering::SeqCst) - before, requests, "reads after completion fetched");
    // Verification when complete: the local stream hashes to the layer's diff ID and has the
    // index's tree; a wrong diff ID, or an index with another tree, is told.
    use clip_readpath::verify::{Verdict, verify_local};
    let diff_id = {
        use sha2::Digest as _;
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2_free_gunzip(&blob)?, &mut tar)?;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar)))
    };
    assert_eq!(verify_local(&cache, Some(&diff_id)), Verdict::Same);
    let wrong = format!("sha256:{}", "0".repeat(64));
    assert!(matches!(verify_local(&cache, Some(&wrong)), Verdict::Differs(d) if d.contains("diff ID")));
    Ok(())
}

/// The uncompressed stream of a gzip blob, through `gzip -dc`.
fn flate2_free_gunzip(blob: &[u8]) -> anyhow::Result<std::io::Cursor<Vec<u8>>> {
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
    let input = blob.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| anyhow::anyhow!("writer"))??;
    Ok(std::io::Cursor::new(out.stdout))
}
