//! containerd 2.x with the shipped config (`packaging/containerd/config-2.x.toml`) and the
//! clients users run on it: `ctr image pull` through the transfer service (labels from the
//! proxy plugin's `enable_remote_snapshot_annotations` export), `nerdctl run` (nerdctl 2.2's
//! client-side pull attaches no labels: clip finds each layer in containerd's content store)
//! and `nerdctl login` for a private registry (the snapshotter reads the `config.json` it
//! writes). The registries are reached as containerd reaches them: a loopback registry without
//! any `hosts.toml`.

use anyhow::{Context, Result};
use clip_config::SnapshotterConfig;
use clip_integration::bed::{IndexedImage, lazy_config};
use clip_integration::containerd::{Containerd, ContainerdOptions, Flavor};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run, wait_until};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const IMPORT_NUMPY: &str = "import numpy; print('numpy', numpy.__version__, 1)";

/// Where [`Containerd::start`] will put its API socket (the snapshotter is started first).
fn containerd_socket(td: &TestDir) -> std::path::PathBuf {
    td.path().join("containerd").join("containerd.sock")
}

/// On-demand fetching only (the bytes counted are what the container's reads needed), and
/// unlabelled Prepares looked up in this test's containerd.
fn snapshotter_config(td: &TestDir) -> SnapshotterConfig {
    let mut c = lazy_config(false);
    c.containerd_address = containerd_socket(td);
    c
}

/// `nerdctl --snapshotter clip run` of `import numpy` in `reference`: it prints its line, and
/// fetches less than a quarter of the image's `image_bytes` from `reg`.
fn nerdctl_import_numpy(
    mut nerdctl: Command,
    reg: &Registry,
    snap: &ClipSnapshotter,
    reference: &str,
    image_bytes: u64,
    what: &str,
) -> Result<()> {
    let before = reg.blob_bytes_served();
    let out = run(nerdctl
        .args(["--snapshotter", "clip", "run", "--rm", "--net", "host", reference, "python3", "-c"])
        .arg(IMPORT_NUMPY))
    .with_context(|| snap.log())?;
    assert!(stdout(&out).trim().ends_with(" 1"), "{}", stdout(&out));
    let fetched = reg.blob_bytes_served() - before;
    eprintln!(
        "{what}, import numpy: {fetched} of {image_bytes} compressed bytes ({:.1}%)",
        fetched as f64 * 100.0 / image_bytes as f64
    );
    assert!(fetched * 4 < image_bytes, "fetched {fetched} of {image_bytes}");
    Ok(())
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ctr_transfer_pull_and_nerdctl_run_start_the_python_image_lazily_on_containerd_2() -> Result<()> {
    require_root();
    let td = TestDir::new("ctrd2-lazy")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let (reg, reference, image_bytes) = (&image.registry, image.reference.clone(), image.layer_bytes);

    // containerd's own hosts.toml dir, empty for now: the loopback registry is reached as
    // containerd reaches it.
    let hosts = td.path().join("containerd").join("certs.d");
    let mut config = snapshotter_config(&td);
    config.registry.hosts_dir = Some(hosts.clone());
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { flavor: Flavor::V2, clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let version = stdout(&ctrd.ctr_run("t", &["version"])?);
    assert!(version.contains(&clip_integration::gotools::containerd2_version()), "{version}");

    // ctr 2.x pulls through the transfer service.
    let before = reg.blob_bytes_served();
    run(ctrd.ctr("t").args(["image", "pull", "--snapshotter", "clip", &reference])).with_context(|| snap.log())?;
    let log = snap.log();
    assert_eq!(count(&log, "layer mounted lazily"), 4, "{log}");
    assert_eq!(count(&log, "unlabelled Prepare found"), 0, "the transfer service passed no labels:\n{log}");
    assert!(!log.contains("ordinary snapshot (containerd unpacks it)"), "{log}");
    assert_eq!(td.lazy_layers(), 4);
    let out = ctrd.ctr_run(
        "t",
        &["run", "--rm", "--snapshotter", "clip", &reference, "ctr2-lazy", "python3", "-c", IMPORT_NUMPY],
    )?;
    assert!(stdout(&out).trim().ends_with(" 1"), "{}", stdout(&out));
    let fetched = reg.blob_bytes_served() - before;
    eprintln!(
        "ctr image pull (transfer service) + ctr run, import numpy: {fetched} of {image_bytes} compressed bytes ({:.1}%)",
        fetched as f64 * 100.0 / image_bytes as f64
    );
    assert!(fetched * 4 < image_bytes, "fetched {fetched} of {image_bytes}");
    run(ctrd.ctr("t").args(["images", "rm", "--sync", &reference]))?;
    assert!(
        wait_until(Duration::from_secs(30), || td.lazy_layers() == 0),
        "FUSE layers left after rmi:\n{}",
        snap.log()
    );

    // nerdctl 2.2 pulls client-side and attaches no labels for a snapshotter it does not know;
    // clip finds the layers in containerd's content store. Its source label has no port
    // (containerd drops it), so clip needs the registry configured somewhere: here the
    // hosts.toml a user of an HTTP registry writes into containerd's certs.d.
    reg.write_hosts_toml(ctrd.hosts_dir())?;
    let data_root = td.sub("nerdctl")?;
    let docker_config = td.sub("docker")?;
    let nerdctl = ctrd.nerdctl("nerd", &data_root, &docker_config)?;
    nerdctl_import_numpy(nerdctl, reg, &snap, &reference, image_bytes, "nerdctl run")?;
    let log = snap.log();
    assert_eq!(count(&log, "unlabelled Prepare found"), 4, "{log}");
    assert_eq!(count(&log, "layer mounted lazily"), 8, "{log}");
    assert_eq!(td.lazy_layers(), 4);
    run(ctrd.nerdctl("nerd", &data_root, &docker_config)?.args(["rmi", &reference]))?;
    ctrd.purge()?;
    assert!(
        wait_until(Duration::from_secs(30), || td.lazy_layers() == 0),
        "FUSE layers left after nerdctl rmi:\n{}",
        snap.log()
    );
    Ok(())
}

#[test]
fn nerdctl_login_then_run_of_a_private_image_is_lazy_and_without_login_fails_clearly() -> Result<()> {
    require_root();
    let td = TestDir::new("ctrd2-login")?;
    let reg = Registry::start_tls_auth_with(&td, "private", "nerd-user", "Nerd-Pass-31f")?;
    let layout = TestImage::Python.layout()?;
    let reference = reg.push_layout(&layout, "pyapp", "team/python", "v1")?;
    let image_bytes: u64 = layout_layers(&layout, "pyapp")?.iter().map(|(_, _, s)| s).sum();
    let hosts = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts)?;
    let creds = td.path().join("creds");
    std::fs::write(&creds, "nerd-user:Nerd-Pass-31f\n")?;
    run(Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--hosts-dir"])
        .arg(&hosts)
        .arg("--creds-file")
        .arg(&creds)
        .arg(&reference))?;

    let docker_config = td.sub("docker")?;
    let mut config = snapshotter_config(&td);
    config.registry.hosts_dir = Some(hosts.clone());
    config.registry.docker_config = Some(docker_config.join("config.json"));
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { flavor: Flavor::V2, clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    copy_hosts(&hosts, ctrd.hosts_dir())?;
    let data_root = td.sub("nerdctl")?;
    let nerdctl = || ctrd.nerdctl("nerd", &data_root, &docker_config);

    // No login: nerdctl says the registry refused, and nothing is left mounted.
    let out =
        nerdctl()?.args(["--snapshotter", "clip", "run", "--rm", "--net", "host", &reference, "true"]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran without credentials");
    assert!(stderr.contains("pull access denied") && stderr.contains("authorization"), "{stderr}");
    assert_eq!(td.lazy_layers(), 0);
    let listed = stdout(&ctrd.ctr_run("nerd", &["snapshots", "--snapshotter", "clip", "ls"])?);
    assert!(listed.lines().count() <= 1, "snapshots left: {listed}");

    // `nerdctl login` writes config.json; the snapshotter reads it.
    let mut login = nerdctl()?;
    login
        .args(["login", "--username", "nerd-user", "--password-stdin", reg.host()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = login.spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"Nerd-Pass-31f\n")?;
    }
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "nerdctl login: {}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(docker_config.join("config.json"))?;
    assert!(written.contains(reg.host()), "{written}");

    nerdctl_import_numpy(nerdctl()?, &reg, &snap, &reference, image_bytes, "nerdctl login + run of a private image")?;
    let after_numpy = reg.blob_bytes_served();
    let log = snap.log();
    assert_eq!(count(&log, "layer mounted lazily"), 4, "{log}");
    assert_eq!(td.lazy_layers(), 4);

    // Files never read before are fetched later with the credentials from config.json.
    let out = run(nerdctl()?.args([
        "--snapshotter",
        "clip",
        "run",
        "--rm",
        "--net",
        "host",
        &reference,
        "sh",
        "-c",
        "find /usr/share /usr/lib/python3 -type f -exec cat {} + | wc -c",
    ]))
    .with_context(|| snap.log())?;
    let read: u64 = stdout(&out).trim().parse().context("wc -c")?;
    let later = reg.blob_bytes_served() - after_numpy;
    eprintln!("later reads: {read} bytes of files, {later} compressed bytes fetched for them");
    assert!(read > 20 << 20 && later > 4 << 20, "read {read}, fetched {later}");
    assert!(!snap.log().contains("EIO"), "{}", snap.log());

    run(nerdctl()?.args(["rmi", &reference]))?;
    ctrd.purge()?;
    assert!(wait_until(Duration::from_secs(30), || td.lazy_layers() == 0), "FUSE layers left:\n{}", snap.log());
    Ok(())
}

/// Copies a `hosts.toml` tree into containerd's own (nerdctl and the transfer service use it).
fn copy_hosts(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let d = to.join(e.file_name());
        std::fs::create_dir_all(&d)?;
        std::fs::copy(e.path().join("hosts.toml"), d.join("hosts.toml"))?;
    }
    Ok(())
}

/// A layer whose hardlink header says another mode, owner and time than its target's: the
/// shared inode takes the last header's (containerd applies each header in tar order).
fn hardlink_layer() -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_mtime(1_700_000_000);
    dir.set_size(0);
    b.append_data(&mut dir, "links/", std::io::empty())?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o640);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(7);
    b.append_data(&mut h, "links/hard1", &b"linked\n"[..])?;
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Link);
    l.set_mode(0o644);
    l.set_uid(7);
    l.set_gid(8);
    l.set_mtime(1_700_000_100);
    l.set_size(0);
    b.append_link(&mut l, "links/hard2", "links/hard1")?;
    Ok(b.into_inner()?)
}

#[test]
fn lazy_root_file_systems_look_exactly_as_on_overlayfs_on_containerd_2() -> Result<()> {
    require_root();
    let td = TestDir::new("ctrd2-identity")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let links = clip_integration::images::derive_layout_with_layer(
        &TestImage::Busybox.layout()?,
        "busybox",
        &td.path().join("links-layout"),
        &hardlink_layer()?,
    )?;
    let images = [
        reg.push_layout(&links, "busybox", "testbed/links", "latest")?,
        reg.push_layout(&TestImage::Python.layout()?, "pyapp", "testbed/python", "latest")?,
    ];
    for r in &images {
        run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", r]))?;
    }
    let snap = ClipSnapshotter::start_configured(&td, "clip", &snapshotter_config(&td), &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { flavor: Flavor::V2, clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let mut trees = Vec::new();
    for reference in &images {
        for snapshotter in ["overlayfs", "clip"] {
            run(ctrd.ctr("t").args(["image", "pull", "--snapshotter", snapshotter, reference]))?;
        }
        let overlay = ctrd.image_tree(&td, reference, "overlayfs")?;
        let clip = ctrd.image_tree(&td, reference, "clip")?;
        let diffs = clip_integration::tree::diff_trees(&overlay, &clip, 20);
        assert!(diffs.is_empty(), "{reference}: rootfs differs:\n{}", diffs.join("\n"));
        let off_device: Vec<_> = clip.iter().filter(|(_, e)| !e.root_device).map(|(p, _)| p).take(5).collect();
        assert!(off_device.is_empty(), "{reference}: entries on another device than the root: {off_device:?}");
        let hardlinked = clip.values().filter(|e| e.hardlink_group.is_some()).count();
        eprintln!(
            "{reference}: {} entries identical on overlayfs and lazy clip, one device, {hardlinked} hardlinked",
            clip.len()
        );
        trees.push(clip);
    }
    assert_eq!(count(&snap.log(), "layer mounted lazily"), 6, "{}", snap.log());
    let links = &trees[0];
    let (h1, h2) = (&links[Path::new("links/hard1")], &links[Path::new("links/hard2")]);
    assert_eq!((h1.mode, h1.uid, h1.gid, h1.nlink), (0o644, 7, 8, 2), "{h1:?}");
    assert_eq!(h1.hardlink_group, h2.hardlink_group);
    assert_eq!(h1.hardlink_group.as_deref(), Some(Path::new("links/hard1")));
    ctrd.purge()?;
    Ok(())
}
