//! The main job: an image indexed with `clip-builder index`, pulled with `clip-snapshotter
//! pull`, started with `ctr run --snapshotter clip` before most of it is downloaded.

use anyhow::{Context, Result};
use clip_config::{BuildRegistry, SnapshotterConfig};
use clip_integration::bed::{IndexedImage, containerd_for, hosts_stack, lazy_config};
use clip_integration::containerd::{Containerd, ContainerdOptions, Flavor};
use clip_integration::fault_proxy::{Fault, FaultProxy};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::tree::diff_trees;
use clip_integration::{TestDir, require_root, run};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

#[test]
fn python_image_starts_lazily_from_the_plain_registry_with_a_fraction_of_its_bytes() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let (reg, reference, image_bytes) = (&image.registry, image.reference.clone(), image.layer_bytes);

    // No hosts.toml: `pull --plain-http` reaches the loopback registry, and so does the daemon
    // (as containerd reaches loopback registries). On-demand fetching only: what the
    // container's own reads cost (the prefetcher's speculative fetches are measured by the
    // cold-start benchmark).
    let snap = ClipSnapshotter::start_configured(&td, "clip", &lazy_config(false), &[])?;
    let ctrd = containerd_for(&td, &snap, Flavor::V2)?;
    let before = reg.blob_bytes_served();
    let out = run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--json", "--plain-http", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .arg(&reference))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("pull --json")?;
    assert_eq!(report["lazy_layers"], 4, "{report}\n{}", snap.log());
    assert!(td.lazy_layers() >= 4, "FUSE layers in /proc/mounts:\n{}", std::fs::read_to_string("/proc/mounts")?);

    let out = ctrd.ctr_run(
        "t",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &reference,
            "lazy1",
            "python3",
            "-c",
            "import numpy; print(numpy.__version__, 1)",
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.trim().ends_with(" 1"), "{stdout}");
    let fetched = reg.blob_bytes_served() - before;
    eprintln!(
        "import numpy ran with {fetched} of {image_bytes} compressed bytes fetched ({:.1}%)",
        fetched as f64 * 100.0 / image_bytes as f64
    );
    assert!(fetched * 4 < image_bytes, "fetched {fetched} of {image_bytes}: more than 25%");

    // The container's root file system is the one overlayfs unpacking gives.
    run(ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", "overlayfs", &reference]))?;
    let overlay = ctrd.image_tree(&td, &reference, "overlayfs")?;
    let clip = ctrd.image_tree(&td, &reference, "clip")?;
    let diffs = diff_trees(&overlay, &clip, 20);
    assert!(diffs.is_empty(), "rootfs differs:\n{}", diffs.join("\n"));
    eprintln!("{} entries identical on overlayfs and lazy clip", clip.len());

    // `ctr image rm` lets containerd collect everything: snapshots removed through clip, FUSE
    // layers unmounted.
    run(ctrd.ctr("t").args(["images", "rm", "--sync", &reference]))?;
    let gone = clip_integration::wait_until(std::time::Duration::from_secs(30), || {
        let listed = clip_integration::run_stdout(ctrd.ctr("t").args(["snapshots", "--snapshotter", "clip", "ls"]))
            .unwrap_or_default();
        listed.lines().count() <= 1 && td.lazy_layers() == 0
    });
    assert!(gone, "snapshots or FUSE layers left after image removal:\n{}", snap.log());
    ctrd.purge()?;
    Ok(())
}

/// `clip-snapshotter pull` with the given extra arguments; returns its JSON report or output.
/// Every regular file below `dir`.
fn private_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

fn pull(ctrd: &Containerd, args: &[&str], reference: &str) -> Result<std::process::Output> {
    pull_with_stdin(ctrd, args, reference, "")
}

/// `clip-snapshotter pull --json` of `reference` into namespace `t`, its output captured.
fn pull_command(ctrd: &Containerd, args: &[&str], reference: &str) -> Result<Command> {
    let mut cmd = Command::new(workspace_binary("clip-snapshotter")?);
    cmd.args(["pull", "--json", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .args(args)
        .arg(reference)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    Ok(cmd)
}

/// `clip-snapshotter pull` with `stdin` on its standard input (a credential read from `-`).
fn pull_with_stdin(ctrd: &Containerd, args: &[&str], reference: &str, stdin: &str) -> Result<std::process::Output> {
    use std::io::Write as _;
    let mut child = pull_command(ctrd, args, reference)?.stdin(std::process::Stdio::piped()).spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

#[test]
fn private_registries_work_with_label_credentials_only_and_wrong_ones_fail_clearly() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy-auth")?;
    let build = Registry::start_tls_auth_with(&td, "build", "builder", "Build-Token-5e1f")?;
    let other = Registry::start_tls_auth_with(&td, "other", "reader", "Other-Pass-77aa")?;
    let hosts_dir = td.sub("certs.d")?;
    build.write_hosts_toml(&hosts_dir)?;
    other.write_hosts_toml(&hosts_dir)?;
    let mut refs = Vec::new();
    for (reg, user, pass, image, tag) in [
        (&build, "builder", "Build-Token-5e1f", TestImage::Busybox, "busybox"),
        (&other, "reader", "Other-Pass-77aa", TestImage::Python, "pyapp"),
    ] {
        let reference = reg.push_layout(&image.layout()?, tag, &format!("userimages/{tag}"), "latest")?;
        let creds = td.path().join(format!("creds-{user}"));
        std::fs::write(&creds, format!("{user}:{pass}\n"))?;
        run(Command::new(workspace_binary("clip-builder")?)
            .args(["index", "--hosts-dir"])
            .arg(&hosts_dir)
            .arg("--creds-file")
            .arg(&creds)
            .arg(&reference))?;
        refs.push(reference);
    }
    // The snapshotter knows the build registry but holds no credentials for either registry.
    let mut config = lazy_config(true);
    config.registry.hosts_dir = Some(hosts_dir.clone());
    config.build_registry = Some(BuildRegistry {
        registry: build.host().to_string(),
        repository: "userimages".into(),
        insecure: false,
        ca_file: None,
        credentials: None,
    });
    let metrics_port = clip_integration::free_port()?;
    config.metrics_address = format!("127.0.0.1:{metrics_port}");
    let mut snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let hosts = hosts_dir.display().to_string();
    // The pull client knows the build registry from the snapshotter's config, as the daemon does.
    let config_path = td.path().join("clip.toml").display().to_string();

    // Wrong credentials: a clear failure naming the registry, nothing pulled.
    // Credentials come from a file or standard input, never from the command line.
    let out = pull_with_stdin(
        &ctrd,
        &["--config", &config_path, "--hosts-dir", &hosts, "--build-registry-creds-file", "-"],
        &refs[0],
        "builder:wrong\n",
    )?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(build.host()) && stderr.contains("access denied"), "{stderr}");

    // The build registry token as the only credential (the clip.build-registry-creds label).
    let builder_creds = td.path().join("creds-builder").display().to_string();
    let out = pull(
        &ctrd,
        &["--config", &config_path, "--hosts-dir", &hosts, "--build-registry-creds-file", &builder_creds],
        &refs[0],
    )?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["lazy_layers"], 1, "{report}");
    let run_out = ctrd.ctr_run(
        "t",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &refs[0],
            "b1",
            "sh",
            "-c",
            "cat /etc/hostname >/dev/null; ls /bin | wc -l",
        ],
    )?;
    assert!(String::from_utf8_lossy(&run_out.stdout).trim().parse::<u32>().unwrap_or(0) > 100);

    // Another registry with --creds (the clip.image-creds label).
    let out =
        pull_with_stdin(&ctrd, &["--hosts-dir", &hosts, "--creds-file", "-"], &refs[1], "reader:Other-Pass-77aa")?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["lazy_layers"], 4, "{report}");
    let run_out =
        ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &refs[1], "p2", "python3", "-c", "print(6*7)"])?;
    assert_eq!(String::from_utf8_lossy(&run_out.stdout).trim(), "42");

    // Private image contents are root's alone: the state root 0700, every cached span, index and
    // kept credential 0600 (a hostPath used to leave them 0755/0644 for the node's users).
    let root = td.path().join("clip-root");
    assert_eq!(std::fs::metadata(&root)?.permissions().mode() & 0o777, 0o700);
    let mut cached = 0;
    for dir in ["spans", "indexes", "credentials"] {
        for file in private_files(&root.join(dir)) {
            let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", file.display());
            cached += 1;
        }
    }
    assert!(cached > 5, "{cached} cache files checked");

    let log = snap.log();
    assert!(
        log.contains("using build registry credentials for image access (image was built and pushed by us)"),
        "{log}"
    );
    assert!(log.contains("credentials provided for runtime CLIP layer mounting"));
    // Secrets reach neither the daemon's log nor the labels containerd or clip return, nor its
    // metrics, nor the argv or environment of any process running now (the daemon, its fd
    // keeper, containerd and its shims).
    let labels = clip_integration::run_stdout(ctrd.ctr("t").args(["snapshots", "--snapshotter", "clip", "ls"]))?;
    let metrics = clip_integration::metrics::scrape(metrics_port);
    assert!(metrics.contains("clip_"), "metrics were scraped: {metrics}");
    let own = std::process::id().to_string();
    let mut processes = 0;
    for p in std::fs::read_dir("/proc")?.flatten().filter(|p| p.file_name() != own.as_str()) {
        let read = |what: &str| std::fs::read(p.path().join(what)).map(|b| String::from_utf8_lossy(&b).into_owned());
        if let (Ok(cmd), Ok(env)) = (read("cmdline"), read("environ")) {
            processes += 1;
            for secret in ["Build-Token-5e1f", "Other-Pass-77aa"] {
                assert!(!cmd.contains(secret) && !env.contains(secret), "{secret} in process {:?}", p.file_name());
            }
        }
    }
    assert!(processes > 5, "{processes} processes scanned");
    for secret in ["Build-Token-5e1f", "Other-Pass-77aa"] {
        assert!(!log.contains(secret), "{secret} in the snapshotter log");
        assert!(!labels.contains(secret));
        assert!(!metrics.contains(secret), "{secret} in the metrics");
    }
    for line in labels.lines().skip(1) {
        let key = line.split_whitespace().next().unwrap_or_default();
        let info =
            clip_integration::run_stdout(ctrd.ctr("t").args(["snapshots", "--snapshotter", "clip", "info", key]))?;
        for secret in ["Build-Token-5e1f", "Other-Pass-77aa"] {
            assert!(!info.contains(secret), "{secret} in the labels of {key}:\n{info}");
        }
    }

    // Label credentials survive a restart through the root-only store: after SIGKILL and
    // restart, files never fetched before (numpy) read from the private registry.
    let store = snap.root().join("credentials");
    assert_eq!(std::fs::metadata(&store)?.permissions().mode() & 0o777, 0o700);
    for f in std::fs::read_dir(&store)? {
        assert_eq!(f?.metadata()?.permissions().mode() & 0o777, 0o600);
    }
    snap.kill();
    snap.restart()?;
    let reconnected = ctrd.reaches("t", "clip", std::time::Duration::from_secs(30));
    assert!(reconnected);
    let out = ctrd.ctr_run(
        "t",
        &["run", "--rm", "--snapshotter", "clip", &refs[1], "p3", "python3", "-c", "import numpy; print(3)"],
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    assert!(snap.log().contains("restored label credentials"), "{}", snap.log());
    ctrd.purge()?;
    Ok(())
}

/// `[lazy] unpack_without_index = false`.
fn containerd_unpacks_layers_without_an_index() -> SnapshotterConfig {
    let mut config = SnapshotterConfig::default();
    config.lazy.unpack_without_index = false;
    config
}

#[test]
fn a_layer_without_an_index_falls_back_to_an_ordinary_snapshot() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy-fallback")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    let reference = reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    let (snap, ctrd) = hosts_stack(&td, &reg, containerd_unpacks_layers_without_an_index())?;
    let out = pull(&ctrd, &["--plain-http"], &reference)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!((report["lazy_layers"].as_u64(), report["unpacked_layers"].as_u64()), (Some(0), Some(1)), "{report}");
    let run_out =
        ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &reference, "f1", "echo", "fallback works"])?;
    assert!(String::from_utf8_lossy(&run_out.stdout).contains("fallback works"));
    let log = snap.log();
    assert!(
        log.contains("serving the layer as an ordinary snapshot") && log.contains("no CLIP index is published"),
        "{log}"
    );
    // pull says why, per layer.
    let reason = report["not_lazy"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no CLIP index is published"), "{report}");
    assert_eq!(report["not_lazy"][0]["layer"], layout_layers(&layout, "busybox")?[0].0.as_str(), "{report}");
    ctrd.purge()?;
    Ok(())
}

/// The fallback of `clip-snapshotter pull` with the python image (four layers, the largest 51
/// MB) and no index: each layer streams from the registry into containerd's content store,
/// checked against its descriptor on the way, never held whole (before, a layer was read into
/// memory and copied once more into the write's messages); a layer whose bytes are not its
/// digest's fails the pull and leaves nothing in the store.
#[test]
fn layers_without_an_index_stream_into_containerd_checked_and_never_held_whole() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy-fallback-stream")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Python.layout()?;
    let reference = reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let layers = layout_layers(&layout, "pyapp")?;
    let (largest, _, largest_size) = layers.iter().max_by_key(|l| l.2).cloned().context("layers")?;
    let (_snap, ctrd) = hosts_stack(&td, &reg, containerd_unpacks_layers_without_an_index())?;
    let pull_watched = || -> Result<(std::process::Output, u64)> {
        let child = pull_command(&ctrd, &["--plain-http"], &reference)?.spawn()?;
        Ok(clip_integration::process::wait_with_peak_rss(child)?)
    };
    let in_store = || -> Result<String> {
        let listed = clip_integration::run_stdout(ctrd.ctr("t").args(["content", "ls", "-q"]))?;
        let active = clip_integration::run_stdout(ctrd.ctr("t").args(["content", "active"]))?;
        Ok(format!("{listed}\n{active}"))
    };

    // The registry's copy of the largest layer has one byte changed (same size).
    let hex = largest.trim_start_matches("sha256:");
    let flipped = reg.flip_blob(&largest)?;
    let (out, _) = pull_watched()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a corrupted layer was pulled");
    assert!(stderr.contains(&largest) && stderr.contains("does not match its digest"), "{stderr}");
    let store = in_store()?;
    assert!(!store.contains(hex), "the corrupted layer is in containerd's content store:\n{store}");

    flipped.restore()?;
    let (out, peak) = pull_watched()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["unpacked_layers"].as_u64(), Some(layers.len() as u64), "{report}");
    eprintln!(
        "pull of {} layers without an index: peak RSS {} MB, largest layer {} MB",
        layers.len(),
        peak >> 20,
        largest_size >> 20
    );
    // Before, the largest layer alone took twice its size (51 MB read whole, then copied into
    // the write's messages): 168 MB measured. Now a few MiB per download (four at once: the
    // layer applied and three ahead) over the process's own 20-odd MB.
    assert!(peak > 0 && peak < largest_size, "the pull's peak RSS {peak} against a {largest_size}-byte layer");
    assert!(in_store()?.contains(hex));
    let run_out = ctrd.ctr_run(
        "t",
        &["run", "--rm", "--snapshotter", "clip", &reference, "s1", "python3", "-c", "import numpy; print(7)"],
    )?;
    assert_eq!(String::from_utf8_lossy(&run_out.stdout).trim(), "7");
    ctrd.purge()?;
    Ok(())
}

/// The python image (four layers, the largest 51 MB) without an index, as `[lazy]
/// unpack_without_index` (the default) serves it: the snapshotter downloads and unpacks each
/// layer in Prepare, so containerd neither downloads nor unpacks it (none of its blobs reaches
/// the content store); the root file system is the one containerd's overlayfs unpacking gives;
/// a layer whose bytes are not its digest's is never committed (containerd then pulls it, and
/// fails the same way).
#[test]
fn layers_without_an_index_are_unpacked_by_the_snapshotter_as_containerd_unpacks_them() -> Result<()> {
    require_root();
    let td = TestDir::new("unpack-noindex")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Python.layout()?;
    let reference = reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let layers = layout_layers(&layout, "pyapp")?;
    let (largest, _, _) = layers.iter().max_by_key(|l| l.2).cloned().context("layers")?;
    let port = clip_integration::free_port()?;
    let config = SnapshotterConfig { metrics_address: format!("127.0.0.1:{port}"), ..Default::default() };
    let (snap, ctrd) = hosts_stack(&td, &reg, config)?;
    let unpacked_here = || snap.log().matches("layer downloaded and unpacked here").count();

    // The registry's copy of the largest layer has one byte changed (same size).
    let flipped = reg.flip_blob(&largest)?;
    let out = pull(&ctrd, &["--plain-http"], &reference)?;
    assert!(!out.status.success(), "a corrupted layer was pulled");
    let log = snap.log();
    let failed = log.lines().find(|l| l.contains("unpacking a layer here failed")).unwrap_or_default();
    // Found by the inflater where the byte is, or by the digest at the end of the download.
    assert!(failed.contains(&largest) && failed.contains("reading the layer"), "{log}");
    let below = layers.iter().position(|l| l.0 == largest).context("position")?;
    assert_eq!(unpacked_here(), below, "only the layers below the corrupted one are committed\n{log}");

    // Restored: containerd's own pull (the path of nerdctl and CRI) gets every layer from the
    // snapshotter.
    flipped.restore()?;
    run(ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", "clip", &reference]))?;
    assert_eq!(unpacked_here(), layers.len(), "{}", snap.log());
    let store = clip_integration::run_stdout(ctrd.ctr("t").args(["content", "ls", "-q"]))?;
    for (digest, _, _) in &layers {
        assert!(!store.contains(digest.trim_start_matches("sha256:")), "{digest} is in the content store:\n{store}");
    }
    let report: serde_json::Value = serde_json::from_slice(&pull(&ctrd, &["--plain-http"], &reference)?.stdout)?;
    assert_eq!(report["existing_layers"].as_u64(), Some(layers.len() as u64), "{report}");

    let clip = ctrd.image_tree(&td, &reference, "clip")?;
    run(ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", "overlayfs", &reference]))?;
    let overlay = ctrd.image_tree(&td, &reference, "overlayfs")?;
    let diffs = diff_trees(&overlay, &clip, 20);
    assert!(diffs.is_empty(), "the unpacked tree differs from overlayfs':\n{}", diffs.join("\n"));
    let run_out = ctrd.ctr_run(
        "t",
        &["run", "--rm", "--snapshotter", "clip", &reference, "u1", "python3", "-c", "import numpy; print(8)"],
    )?;
    assert_eq!(String::from_utf8_lossy(&run_out.stdout).trim(), "8");
    // Another namespace (another tenant) gets the layers from its own registry access, not
    // from the snapshots unpacked for this one.
    run(ctrd.ctr("u").args(["images", "pull", "--plain-http", "--snapshotter", "clip", &reference]))?;
    assert_eq!(unpacked_here(), 2 * layers.len(), "{}", snap.log());
    let text = clip_integration::metrics::scrape(port);
    let family = "clip_snapshotter_layers_unpacked_total{";
    assert_eq!(clip_integration::metrics::sum(&text, family, &["\"ok\""]), 2 * layers.len() as u64, "{text}");
    assert_eq!(clip_integration::metrics::sum(&text, family, &["\"failed\""]), 1, "{text}");
    let bytes: u64 = layers.iter().map(|l| l.2).sum();
    assert_eq!(clip_integration::metrics::sum(&text, "clip_snapshotter_unpacked_layer_bytes_total", &[]), 2 * bytes);
    ctrd.purge()?;
    Ok(())
}

/// A layer without an index whose blob containerd already has (containerd 1.6's `ctr images
/// pull` downloads every layer before unpacking; here an earlier pull into overlayfs left it) is
/// unpacked by containerd from its content store, not downloaded again by the snapshotter.
#[test]
fn a_layer_already_in_containerds_content_store_is_not_downloaded_again() -> Result<()> {
    require_root();
    let td = TestDir::new("unpack-local")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    let reference = reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    // The snapshotter asks containerd (as on a node, where its default address is containerd's).
    let config = SnapshotterConfig { containerd_address: Containerd::socket_in(&td), ..Default::default() };
    let (snap, ctrd) = hosts_stack(&td, &reg, config)?;
    run(ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", "overlayfs", &reference]))?;
    run(ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", "clip", &reference]))?;
    let log = snap.log();
    assert!(log.contains("blob is in containerd's content store"), "{log}");
    assert!(!log.contains("layer downloaded and unpacked here"), "{log}");
    let out = ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &reference, "l1", "echo", "local"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "local");
    ctrd.purge()?;
    Ok(())
}

#[test]
fn containerd_1_6_smoke_pull_of_an_indexed_image_is_lazy() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy-1.6")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let reference = image.reference.clone();
    // containerd 1.6's own `ctr images pull` downloads every layer before unpacking, so lazy
    // starts on 1.6 go through `clip-snapshotter pull` (or CRI).
    let snap = ClipSnapshotter::start_configured(&td, "clip", &lazy_config(true), &[])?;
    let ctrd = containerd_for(&td, &snap, Flavor::V1_6)?;
    let version = clip_integration::run_stdout(ctrd.ctr("t").arg("version"))?;
    assert!(version.contains("1.6."), "{version}");
    let out = pull(&ctrd, &["--plain-http"], &reference)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["lazy_layers"], 4, "{report}\n{}", snap.log());
    let out = ctrd.ctr_run(
        "t",
        &["run", "--rm", "--snapshotter", "clip", &reference, "smoke", "python3", "-c", "import numpy; print(6*7)"],
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    ctrd.purge()?;
    Ok(())
}

#[test]
fn background_fetch_completes_layers_so_the_registry_can_go_away() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy-bg")?;
    let mut reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Python.layout()?;
    let reference = reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let image_bytes: u64 = layout_layers(&layout, "pyapp")?.iter().map(|(_, _, s)| s).sum();
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;
    let hosts_dir = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts_dir)?;
    let port = clip_integration::free_port()?;
    let mut config = SnapshotterConfig::default();
    config.metrics_address = format!("127.0.0.1:{port}");
    config.registry.hosts_dir = Some(hosts_dir.clone());
    config.lazy.completion.start_delay_ms = 200;
    config.lazy.passthrough = true;
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let before = reg.blob_bytes_served();
    run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--plain-http", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .arg(&reference))?;
    let metrics = || clip_integration::metrics::scrape(port);
    let value = |text: &str, name: &str| clip_integration::metrics::sum(text, name, &["layer=\""]);
    let done = clip_integration::wait_until(std::time::Duration::from_secs(120), || {
        let m = metrics();
        let total = value(&m, "clip_snapshotter_layer_spans{");
        total > 0 && value(&m, "clip_snapshotter_layer_spans_local{") == total
    });
    let m = metrics();
    assert!(done, "layers not completed in the background:\n{m}\n{}", snap.log());
    let fetched = reg.blob_bytes_served() - before;
    eprintln!(
        "background fetch completed 4 layers: {fetched} bytes fetched for {image_bytes} bytes of layers (indexes and windows included)"
    );
    // Every span once, plus the indexes and a few zran windows: completion streams on from
    // local data, whose spans need no windows (one span per request, each with its window, cost
    // about 10% more before).
    let streamed =
        clip_integration::metrics::sum(&m, "clip_snapshotter_fetched_bytes_by_cause_total{", &["cause=\"stream\""]);
    eprintln!("of which {streamed} bytes streamed by background completion");
    assert!(streamed * 2 > image_bytes, "completion streamed only {streamed} of {image_bytes}");
    assert!(fetched >= image_bytes && fetched < image_bytes + image_bytes * 4 / 100, "{fetched} vs {image_bytes}");
    assert!(value(&m, "clip_snapshotter_registry_fetched_bytes_total{") >= image_bytes);
    // Everything is local: the registry can go away and every file still reads.
    reg.daemon_mut().stop();
    let out = ctrd.ctr_run(
        "t",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &reference,
            "bg1",
            "sh",
            "-c",
            "python3 -c 'import numpy; print(7)' && find / -xdev -type f -exec cat {} + >/dev/null && echo all-read \
         && find / -xdev -type f -size +1048575c | wc -l",
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains('7') && stdout.contains("all-read"), "{stdout}");
    // Fully local files are opened with FUSE passthrough: the kernel reads them directly.
    let m = metrics();
    // Files of 1 MiB or more are opened with passthrough (smaller ones live in the page cache).
    let large: u64 = stdout.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    let passthrough = value(&m, "clip_snapshotter_fuse_passthrough_opens_total{");
    eprintln!("{passthrough} opens served by FUSE passthrough ({large} files of 1 MiB or more)");
    assert!(large > 10 && passthrough >= large, "{m}");
    // docs/metrics.md names every metric family the daemon serves.
    let page = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"))?;
    let families: Vec<&str> =
        m.lines().filter_map(|l| l.strip_prefix("# HELP clip_snapshotter_")?.split(' ').next()).collect();
    assert!(families.len() > 15, "{m}");
    for family in families {
        assert!(page.contains(&format!("`{family}")), "docs/metrics.md does not describe clip_snapshotter_{family}");
    }
    // The FUSE requests are counted per layer and operation: the walks and reads above looked
    // names up and read small files through FUSE.
    let requests = |op: &str| {
        clip_integration::metrics::sum(&m, "clip_snapshotter_fuse_requests_total{", &[&format!("op=\"{op}\"")])
    };
    eprintln!(
        "FUSE requests: {} lookup, {} read, {} readdirplus",
        requests("lookup"),
        requests("read"),
        requests("readdirplus")
    );
    assert!(requests("lookup") > 0 && requests("read") > 0, "{m}");
    ctrd.purge()?;
    Ok(())
}

/// sha256 of `path` in the image: the last layer (of the OCI layout) that holds it.
fn file_sha256_in_layers(layout: &std::path::Path, tag: &str, path: &str) -> Result<String> {
    let mut found = None;
    for (digest, _, _) in layout_layers(layout, tag)? {
        let blob = clip_integration::images::blob_path(layout, &digest)?;
        let out = Command::new("tar").arg("-xzOf").arg(&blob).arg(path.trim_start_matches('/')).output()?;
        if out.status.success() {
            found = Some(clip_integration::sha256_hex(&out.stdout));
        }
    }
    found.with_context(|| format!("{path} is in no layer"))
}

#[test]
fn corrupted_spans_fail_reads_a_vanished_registry_recovers_and_a_restart_remounts() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy-faults")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let proxy = FaultProxy::start(reg.host(), Fault::None)?;
    let layout = TestImage::Python.layout()?;
    reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let reference = format!("{}/testbed/python:latest", proxy.host());
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;
    let hosts_dir = td.sub("certs.d")?;
    let d = hosts_dir.join(proxy.host());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", proxy.host()))?;
    let mut config = lazy_config(true);
    config.registry.hosts_dir = Some(hosts_dir.clone());
    let mut snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let out = pull(&ctrd, &["--plain-http"], &reference)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let py = |id: &str| -> Result<std::process::Output> {
        Ok(ctrd
            .ctr("t")
            .args([
                "run",
                "--rm",
                "--snapshotter",
                "clip",
                &reference,
                id,
                "python3",
                "-c",
                "import numpy; print(41+1)",
            ])
            .output()?)
    };
    // Every blob answer has a flipped byte: reads fail with I/O errors; nothing wrong runs.
    proxy.set_mode(Fault::FlipByte);
    let out = py("c1")?;
    assert!(!out.status.success(), "a container ran on corrupted data: {out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("42"));
    assert!(snap.log().contains("layer read failed"), "the failed reads are logged");

    // The registry disappears: reads of data not yet local fail ...
    proxy.set_mode(Fault::Down);
    assert!(!py("c2")?.status.success());
    // ... and it comes back: the same container starts, with the right bytes.
    proxy.set_mode(Fault::None);
    let out = py("c3")?;
    assert!(out.status.success(), "{out:?}\n{}", snap.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let target = "/usr/bin/python3.11";
    let want = file_sha256_in_layers(&layout, "pyapp", target)?;
    let out = ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &reference, "c4", "sha256sum", target])?;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&want));

    // SIGKILL and restart: the layers are mounted again and new containers start.
    snap.kill();
    snap.restart()?;
    assert!(snap.log().contains("remounted=4"), "{}", snap.log());
    // containerd's proxy client reconnects with backoff; wait until it talks to the new daemon.
    let reconnected = ctrd.reaches("t", "clip", std::time::Duration::from_secs(30));
    assert!(reconnected, "containerd did not reconnect to the restarted snapshotter");
    let out = py("c5")?;
    assert!(out.status.success(), "{out:?}\n{}", snap.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    ctrd.purge()?;
    Ok(())
}

#[test]
fn a_plain_http_label_is_refused_for_a_registry_that_is_not_loopback_and_a_hosts_toml_serves_it() -> Result<()> {
    require_root();
    let td = TestDir::new("lazy-plain-ns")?;
    // A registry at the address of a network namespace of this test's own (not loopback, so no
    // default reaches it over plain HTTP).
    let link = clip_integration::netns::SlowLink::new(1000, 2)?;
    let reg = Registry::start_wrapped(&td, "ns", None, link.ns_ip(), &link.wrap())?;
    let layout = TestImage::Busybox.layout()?;
    let reference = reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;
    let snap = ClipSnapshotter::start_configured(&td, "clip", &lazy_config(true), &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    // `pull --plain-http` labels its Prepares `clip.plain-http`: one client's label must not
    // downgrade a remote registry for the node (seen before: honoured and recorded for good).
    let out = pull(&ctrd, &["--plain-http"], &reference)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["lazy_layers"], 0, "{report}");
    assert!(report["not_lazy"].to_string().contains("only for loopback registries"), "{report}");
    assert!(!snap.root().join("plain-http-registries").exists(), "recorded for good");
    ctrd.purge()?;
    drop(ctrd);
    drop(snap);
    // The node's own configuration does it: a hosts.toml naming the plain-HTTP server.
    let hosts = td.sub("certs.d")?;
    std::fs::create_dir_all(hosts.join(reg.host()))?;
    std::fs::write(hosts.join(reg.host()).join("hosts.toml"), format!("server = \"http://{}\"\n", reg.host()))?;
    let mut config = lazy_config(true);
    config.registry.hosts_dir = Some(hosts.clone());
    let node = TestDir::new("lazy-plain-ns-node")?;
    let snap = ClipSnapshotter::start_configured(&node, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &node,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let out = pull(&ctrd, &["--hosts-dir", &hosts.display().to_string()], &reference)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["lazy_layers"], 1, "{report}\n{}", snap.log());
    let out =
        ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &reference, "ns1", "sh", "-c", "ls /bin | wc -l"])?;
    assert!(String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().unwrap_or(0) > 100);
    ctrd.purge()?;
    drop(snap);
    drop(reg);
    Ok(())
}
