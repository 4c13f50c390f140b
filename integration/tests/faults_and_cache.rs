//! Faults and bounded disk: a full read of every file of the python image through a proxy that
//! breaks about 10 % of registry requests (503s, resets, truncated answers, flipped bytes,
//! delays) is byte-exact, while the span cache, limited to a fraction of the image, stays
//! under its limit; removing the image deletes its layer caches.

use anyhow::{Context, Result};
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::fault_proxy::{Fault, FaultProxy};
use clip_integration::images::{TestImage, file_digests_under};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run, wait_until};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const CACHE_LIMIT: u64 = 48 << 20;

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

#[test]
fn a_full_read_through_ten_percent_faults_is_exact_and_the_cache_stays_bounded() -> Result<()> {
    require_root();
    let td = TestDir::new("faults-cache")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let proxy = FaultProxy::start(reg.host(), Fault::None)?;
    let layout = TestImage::Python.layout()?;
    reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let reference = format!("{}/testbed/python:latest", proxy.host());
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;
    let expected = file_digests_under(&layout, "pyapp", "", &td.sub("expected")?)?;
    let uncompressed: u64 = dir_bytes(&td.path().join("expected"));

    let hosts_dir = td.sub("certs.d")?;
    let d = hosts_dir.join(proxy.host());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", proxy.host()))?;
    let mut config = lazy_config(true);
    config.registry.hosts_dir = Some(hosts_dir.clone());
    config.lazy.cache_max_bytes = CACHE_LIMIT;
    config.lazy.fetch_timeout_s = 60;
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--plain-http", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .arg(&reference))?;

    // From here on, about one registry request in ten goes wrong.
    let connections_before = proxy.connections();
    proxy.set_mode(Fault::Random(10));
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, root) = (peak.clone(), done.clone(), snap.root().to_path_buf());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let used = dir_bytes(&root.join("spans")) + dir_bytes(&root.join("files"));
                peak.fetch_max(used, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = ctrd
        .ctr("t")
        .args([
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &reference,
            "reader",
            "sh",
            "-c",
            "find / -xdev -type f -print0 | xargs -0 sha256sum",
        ])
        .output()?;
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    if !out.status.success() {
        let _ = std::fs::write(td.path().join("../faults-cache-daemon.log"), snap.log());
    }
    assert!(
        out.status.success(),
        "reader failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        snap.log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut checked = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (sum, path) = line.split_once("  ").context("sha256sum line")?;
        if let Some(want) = expected.get(path) {
            assert_eq!(want, sum, "{path}");
            checked += 1;
        }
    }
    let faults = proxy.faults_injected();
    let connections = proxy.connections() - connections_before;
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "{checked} of {} files read byte-exact through {faults} faults in {connections} registry connections; \
         cache peak {peak} B (limit {CACHE_LIMIT} B) for {uncompressed} B of files",
        expected.len()
    );
    assert!(checked + 10 >= expected.len(), "only {checked} of {} files were read", expected.len());
    assert!(faults * 20 >= connections && faults > 20, "too few faults: {faults} of {connections}");
    assert!(uncompressed > 3 * CACHE_LIMIT, "the image must be bigger than the cache");
    // Eviction runs after each write: allow one fetch group beyond the limit.
    assert!(peak <= CACHE_LIMIT + (8 << 20), "cache peaked at {peak} B, limit {CACHE_LIMIT} B");
    let evictions: u64 = snap.log().lines().filter(|l| l.contains("cannot evict")).count() as u64;
    assert_eq!(evictions, 0);

    // Removing the image deletes its layers' caches.
    proxy.set_mode(Fault::None);
    run(ctrd.ctr("t").args(["images", "rm", "--sync", &reference]))?;
    let emptied = wait_until(Duration::from_secs(30), || {
        dir_bytes(&snap.root().join("spans")) + dir_bytes(&snap.root().join("files")) == 0
    });
    assert!(
        emptied,
        "caches left: {} B",
        dir_bytes(&snap.root().join("spans")) + dir_bytes(&snap.root().join("files"))
    );
    ctrd.purge()?;
    Ok(())
}
