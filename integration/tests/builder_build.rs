//! `clip-builder build`: buildah build FROM the python image, push with the build registry
//! token given only through the environment, index and publish; the secret never appears on a
//! command line or in output; the temporary authfile is gone; the image then starts lazily.
//! And `clip-builder index` of an already indexed image does no layer work.

use anyhow::{Context, Result};
use clip_integration::bed::{hosts_stack, lazy_config};
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const SECRET: &str = "Build-Secret-4242";

/// Scans every process's argv, and the environment of every process but this test and the
/// builder itself (`builder`, whose caller gave it the token that way: its own executable, also
/// in the instant between a fork and the exec of buildah), for the sentinel.
fn watch_cmdlines(stop: Arc<AtomicBool>, builder: PathBuf) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let mut scans = 0;
        let mut bad = Vec::new();
        let own = std::process::id().to_string();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(procs) = std::fs::read_dir("/proc") {
                for p in procs.flatten() {
                    let read = |what: &str| {
                        std::fs::read(p.path().join(what)).map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                    };
                    let cmd = read("cmdline").unwrap_or_default();
                    if cmd.contains(SECRET) && !cmd.contains("builder_build-") {
                        bad.push(cmd.clone());
                    }
                    let pid = p.file_name().to_string_lossy().into_owned();
                    if pid != own
                        && std::fs::read_link(p.path().join("exe")).is_ok_and(|exe| exe != builder)
                        && read("environ").is_ok_and(|env| env.contains(SECRET))
                    {
                        bad.push(format!("environment of {pid} ({cmd})"));
                    }
                }
            }
            scans += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        (scans, bad)
    })
}

#[test]
fn build_pushes_with_an_env_token_indexes_and_the_image_starts_lazily() -> Result<()> {
    require_root();
    let td = TestDir::new("build")?;
    let reg = Registry::start_tls_auth_with(&td, "tls", "builder", SECRET)?;
    let tls = reg.tls().context("tls")?.clone();
    let layout = TestImage::Python.layout()?;
    let base = reg.push_layout(&layout, "pyapp", "userimages/python", "latest")?;
    let context = td.sub("context")?;
    std::fs::write(context.join("Containerfile"), format!("FROM {base}\nCOPY added.txt /added.txt\n"))?;
    std::fs::write(context.join("added.txt"), "added by clip-builder\n")?;
    let config = td.path().join("builder.toml");
    std::fs::write(
        &config,
        format!(
            "storage_root = \"{0}/buildah-root\"\nrunroot = \"{0}/buildah-run\"\nstorage_driver = \"vfs\"\nstate_dir = \"{0}/state\"\n\
             [build_registry]\nregistry = \"{1}\"\nrepository = \"userimages\"\nca_file = \"{2}\"\n",
            td.path().display(),
            reg.host(),
            tls.ca_cert.display()
        ),
    )?;
    let tmp = td.sub("tmp")?;
    let target = format!("{}/userimages/app:v1", reg.host());

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_cmdlines(stop.clone(), workspace_binary("clip-builder")?.canonicalize()?);
    let child = Command::new(workspace_binary("clip-builder")?)
        .args(["build", "--json", "--config"])
        .arg(&config)
        .args(["-t", &target])
        .arg(&context)
        .env("CLIP_BUILD_REGISTRY_CREDS", format!("builder:{SECRET}"))
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let out = child.wait_with_output()?;
    stop.store(true, Ordering::Relaxed);
    let (scans, bad) = watcher.join().map_err(|_| anyhow::anyhow!("watcher panicked"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "build failed:\n{stderr}");
    assert!(bad.is_empty(), "the token was on a command line or in a child's environment: {bad:?}");
    assert!(scans > 10, "the watcher ran during the build ({scans} scans)");
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
    let leftovers: Vec<_> = walk(&tmp).into_iter().filter(|p| p.ends_with("auth.json")).collect();
    assert!(leftovers.is_empty(), "authfile left behind: {leftovers:?}");
    let report: serde_json::Value = serde_json::from_str(&stdout)?;
    eprintln!(
        "build {:.1} s, push {:.1} s, index {:.1} s",
        report["build_seconds"].as_f64().unwrap_or_default(),
        report["push_seconds"].as_f64().unwrap_or_default(),
        report["index_seconds"].as_f64().unwrap_or_default()
    );
    let recorded = std::fs::read_to_string(td.path().join("state/images.json"))?;
    assert!(recorded.contains(report["index_digest"].as_str().context("index digest")?));

    // The snapshotter finds the index through referrers and runs the image lazily.
    let hosts_dir = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts_dir)?;
    // The build registry token applies only where the snapshotter knows the build registry.
    let mut snap_config = lazy_config(true);
    snap_config.registry.hosts_dir = Some(hosts_dir.clone());
    snap_config.build_registry = Some(clip_config::BuildRegistry {
        registry: reg.host().to_string(),
        repository: "userimages".into(),
        insecure: false,
        ca_file: None,
        credentials: None,
    });
    let snap = ClipSnapshotter::start_configured(&td, "clip", &snap_config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let out = run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--json", "-n", "t", "--config"])
        .arg(td.path().join("clip.toml"))
        .arg("--hosts-dir")
        .arg(&hosts_dir)
        .arg("--containerd-address")
        .arg(ctrd.socket())
        .arg(&target)
        .env("CLIP_BUILD_REGISTRY_CREDS", format!("builder:{SECRET}")))?;
    let pulled: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(pulled["lazy_layers"], 5, "{pulled}");
    let out = ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &target, "app1", "cat", "/added.txt"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "added by clip-builder");
    ctrd.purge()?;
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir() && !t.is_symlink()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn indexing_an_indexed_image_again_does_no_layer_work() -> Result<()> {
    require_root();
    let td = TestDir::new("reindex")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Python.layout()?;
    let reference = reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let config = td.path().join("builder.toml");
    std::fs::write(&config, format!("state_dir = \"{}/state\"\n", td.path().display()))?;
    let index_of = |reference: &str| -> Result<serde_json::Value> {
        let out = run(Command::new(workspace_binary("clip-builder")?)
            .args(["index", "--json", "--plain-http", "--config"])
            .arg(&config)
            .arg(reference))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let index = || index_of(&reference);
    let first = index()?;
    assert_eq!(first["reused"], false);
    let layer_digests: Vec<String> = layout_layers(&layout, "pyapp")?.into_iter().map(|(d, _, _)| d).collect();
    let gets_of_layers = |reg: &Registry| {
        reg.access_log()
            .iter()
            .filter(|e| e.method == "GET" && layer_digests.iter().any(|d| e.path.ends_with(d.as_str())))
            .count()
    };
    let before = gets_of_layers(&reg);
    let second = index()?;
    assert_eq!(second["reused"], true, "{second}");
    assert_eq!(second["index_digest"], first["index_digest"]);
    assert_eq!(gets_of_layers(&reg), before, "the second run fetched layers");
    // The same layers in another repository: indexes come from the builder's local cache.
    let other = reg.push_layout(&layout, "pyapp", "testbed/python-copy", "latest")?;
    let before = gets_of_layers(&reg);
    let third = index_of(&other)?;
    assert_eq!(third["reused"], false);
    assert_eq!(gets_of_layers(&reg), before, "layers indexed before were downloaded again");
    Ok(())
}

#[test]
fn an_index_copied_to_another_registry_serves_the_image_lazily_there() -> Result<()> {
    require_root();
    let td = TestDir::new("copyindex")?;
    let a = Registry::start_plain(&td, "a")?;
    let b = Registry::start_plain(&td, "b")?;
    let layout = TestImage::Python.layout()?;
    let ref_a = a.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let ref_b = b.push_layout(&layout, "pyapp", "mirror/python", "latest")?;
    let builder = workspace_binary("clip-builder")?;
    run(Command::new(&builder).args(["index", "--plain-http", &ref_a]))?;
    let dir = td.path().join("index-copy");
    run(Command::new(&builder).args(["fetch-index", "--plain-http", "--output"]).arg(&dir).arg(&ref_a))?;
    assert!(dir.join("artifact.json").exists());
    // Pushing it for a different image is refused.
    let busybox = b.push_layout(&TestImage::Busybox.layout()?, "busybox", "mirror/busybox", "latest")?;
    let wrong =
        Command::new(&builder).args(["push-index", "--plain-http", "--from"]).arg(&dir).arg(&busybox).output()?;
    assert!(!wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("the index is for"));
    run(Command::new(&builder).args(["push-index", "--plain-http", "--from"]).arg(&dir).arg(&ref_b))?;

    let (_snap, ctrd) = hosts_stack(&td, &b, lazy_config(true))?;
    let out = run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--json", "--plain-http", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .arg(&ref_b))?;
    let pulled: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(pulled["lazy_layers"], 4, "{pulled}");
    let out =
        ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &ref_b, "m1", "python3", "-c", "print(2+3)"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
    ctrd.purge()?;
    Ok(())
}
