//! The FUSE layer over a registry: every layer of the python image, indexed and mounted from
//! the plain registry, looks exactly like the layer unpacked the way containerd's overlayfs
//! applier does it; a small read fetches a small part of the blob; a corrupted span is an I/O
//! error, never wrong bytes; a registry that disappears fails reads until it returns.

use anyhow::{Context, Result};
use clip_integration::fault_proxy::{Fault, FaultProxy};
use clip_integration::images::{TestImage, blob_path, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::tree::{describe_tree_with, diff_trees};
use clip_integration::{TestDir, require_root, run};
use clip_layerfs::{self as layerfs, LayerFs};
use clip_readpath::SpanCache;
use clip_registry::{CredentialChain, HostsConfig, Reference, RegistryClient};
use clip_snapshotter::remote::{RegistryBlob, Session};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Unpacks a layer the way containerd's overlayfs applier does: `.wh.<name>` becomes a 0:0
/// character device `<name>`, `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its dir.
fn unpack_like_containerd(blob: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    run(Command::new("tar")
        .args(["-x", "--numeric-owner", "--same-permissions", "--xattrs", "--xattrs-include=*", "-f"])
        .arg(blob)
        .arg("-C")
        .arg(dest))?;
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            if name == ".wh..wh..opq" {
                std::fs::remove_file(&path)?;
                xattr::set(&dir, "trusted.overlay.opaque", b"y")?;
            } else if let Some(target) = name.strip_prefix(".wh.") {
                let md = std::fs::symlink_metadata(&path)?;
                std::fs::remove_file(&path)?;
                let dev = dir.join(target);
                run(Command::new("mknod").arg("-m").arg("000").arg(&dev).args(["c", "0", "0"]))?;
                run(Command::new("chown").arg("-h").arg(format!("{}:{}", md.uid(), md.gid())).arg(&dev))?;
            } else if entry.file_type()?.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

struct Mounted {
    _session: fuser::BackgroundSession,
    spans: Arc<SpanCache>,
    mountpoint: PathBuf,
}

fn mount_layer(
    td: &TestDir,
    rt: &tokio::runtime::Runtime,
    registry_host: &str,
    repo: &str,
    blob: &Path,
    digest: &str,
    n: usize,
) -> Result<Mounted> {
    let index = clip_index::build_index(
        std::fs::File::open(blob)?,
        &clip_index::BuildOptions { expected_digest: Some(digest.to_string()), ..Default::default() },
    )?;
    let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
    let image = Reference::parse(&format!("{registry_host}/{repo}:latest"))?;
    let source = RegistryBlob {
        session: Session::Fixed(Arc::new(client.repository(&image, CredentialChain::anonymous())?)),
        digest: digest.to_string(),
        runtime: rt.handle().clone(),
        timeout: std::time::Duration::from_secs(30),
    };
    let spans = Arc::new(SpanCache::new(Arc::new(index), td.path().join(format!("spans-{n}")), Arc::new(source))?);
    let mountpoint = td.sub(&format!("mnt-{n}"))?;
    let (session, _fd) = layerfs::mount(LayerFs::new(spans.clone()), &mountpoint, digest)?;
    Ok(Mounted { _session: session, spans, mountpoint })
}

#[test]
fn fuse_layers_of_the_python_image_match_containerd_unpacking_and_fetch_lazily() -> Result<()> {
    require_root();
    let td = TestDir::new("layerfs")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Python.layout()?;
    reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let rt = tokio::runtime::Runtime::new()?;
    let layers = layout_layers(&layout, "pyapp")?;
    let mut total = 0;
    for (n, (digest, _, size)) in layers.iter().enumerate() {
        let blob = blob_path(&layout, digest)?;
        let m = mount_layer(&td, &rt, reg.host(), "testbed/python", &blob, digest, n)?;
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        assert!(mounts.contains(&format!("clip:{digest}")), "FUSE layer not in /proc/mounts");
        let reference = td.path().join(format!("ref-{n}"));
        unpack_like_containerd(&blob, &reference)?;
        let mut want = describe_tree_with(&reference, true)?;
        let mut got = describe_tree_with(&m.mountpoint, true)?;
        // The layer root itself is the mount point / extraction dir, not part of the layer.
        want.remove(Path::new(""));
        got.remove(Path::new(""));
        let diffs = diff_trees(&want, &got, 20);
        assert!(diffs.is_empty(), "layer {n} ({digest}) differs:\n{}", diffs.join("\n"));
        let fetched = m.spans.metrics().fetched_bytes.get();
        eprintln!("layer {n}: {} entries identical; whole-tree read fetched {fetched} of {size} bytes", got.len());
        total += got.len();
    }
    assert!(total > 5000);
    Ok(())
}

#[test]
fn small_reads_fetch_little_corrupted_spans_fail_and_a_vanished_registry_recovers() -> Result<()> {
    require_root();
    let td = TestDir::new("layerfs-faults")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Python.layout()?;
    reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let proxy = FaultProxy::start(reg.host(), Fault::None)?;
    let rt = tokio::runtime::Runtime::new()?;
    // The largest layer (numpy and friends).
    let (digest, _, size) =
        layout_layers(&layout, "pyapp")?.into_iter().max_by_key(|(_, _, s)| *s).context("layers")?;
    let blob = blob_path(&layout, &digest)?;
    let reference = td.path().join("ref");
    unpack_like_containerd(&blob, &reference)?;
    let m = mount_layer(&td, &rt, &proxy.host(), "testbed/python", &blob, &digest, 0)?;

    // Files of the reference, largest first, to pick from.
    let mut files: Vec<(PathBuf, u64)> = describe_tree_with(&reference, false)?
        .into_iter()
        .filter(|(_, e)| e.kind == 'f' && e.size > 10_000)
        .map(|(p, e)| (p, e.size))
        .collect();
    files.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
    assert!(files.len() > 10);

    // One small file: a small part of the blob.
    let (small, _) = files.last().context("a file")?.clone();
    let got = std::fs::read(m.mountpoint.join(&small))?;
    assert_eq!(got, std::fs::read(reference.join(&small))?);
    let fetched = m.spans.metrics().fetched_bytes.get();
    eprintln!("reading {} fetched {fetched} of {size} compressed bytes", small.display());
    assert!(fetched * 4 < size, "a small read fetched {fetched} of {size}");

    // A byte flipped in transit: an I/O error, not wrong bytes.
    proxy.set_mode(Fault::FlipByte);
    let (victim, _) = files[0].clone();
    let err = std::fs::read(m.mountpoint.join(&victim)).expect_err("corrupted span must fail");
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");

    // The registry disappears: reads of data not yet local fail; cached data still reads.
    proxy.set_mode(Fault::Down);
    let err = std::fs::read(m.mountpoint.join(&files[1].0)).expect_err("registry down");
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert_eq!(std::fs::read(m.mountpoint.join(&small))?, std::fs::read(reference.join(&small))?);

    // It returns: the same reads succeed with the right bytes.
    proxy.set_mode(Fault::None);
    for (f, _) in files.iter().take(3) {
        assert_eq!(std::fs::read(m.mountpoint.join(f))?, std::fs::read(reference.join(f))?, "{}", f.display());
    }
    Ok(())
}

fn libc_eio() -> i32 {
    5
}

/// A layer's bytes in memory.
struct InMemory(Vec<u8>);

impl clip_index::RangeFetcher for InMemory {
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, clip_index::IndexError> {
        let end = offset.checked_add(len).filter(|e| *e <= self.0.len() as u64);
        end.map(|e| self.0[offset as usize..e as usize].to_vec()).ok_or_else(|| clip_index::IndexError::Fetch {
            offset,
            len,
            message: "out of range".into(),
        })
    }
}

/// A directory read by the kernel in many requests, each starting where the last ended, lists
/// every entry once — with an opaque marker among its children (hidden: the entries after it
/// are shifted by one) and a whiteout (shown as the name it hides). Each request decodes only
/// the entries it answers.
#[test]
fn a_large_directory_with_an_opaque_marker_lists_every_entry_once_across_requests() -> Result<()> {
    require_root();
    let td = TestDir::new("layerfs-listing")?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, name, std::io::empty())?;
        Ok(())
    };
    // "+first" sorts before ".wh..wh..opq", the files after it.
    let files: Vec<String> = (0..3000).map(|n| format!("file-{n:05}-with-a-longer-name")).collect();
    for name in ["big/+first", "big/.wh..wh..opq", "big/.wh.gone"] {
        add(name)?;
    }
    for f in &files {
        add(&format!("big/{f}"))?;
    }
    let bytes = tar.into_inner()?;
    let index = clip_index::build_index(bytes.as_slice(), &clip_index::BuildOptions::default())?;
    let spans = Arc::new(SpanCache::new(Arc::new(index), td.path().join("spans"), Arc::new(InMemory(bytes)))?);
    let mountpoint = td.sub("mnt")?;
    let (_session, _fd) = layerfs::mount(LayerFs::new(spans), &mountpoint, "sha256:listing")?;
    let mut got: Vec<String> = std::fs::read_dir(mountpoint.join("big"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    got.sort();
    let mut want: Vec<String> = files.clone();
    want.push("+first".into());
    want.push("gone".into());
    want.sort();
    assert_eq!(got.len(), want.len(), "entries listed: {} against {}", got.len(), want.len());
    assert_eq!(got, want);
    let gone = std::fs::symlink_metadata(mountpoint.join("big/gone"))?;
    assert_eq!(gone.rdev(), 0, "a whiteout is a 0:0 character device");
    Ok(())
}
