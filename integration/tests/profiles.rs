//! Access profiles end to end: the first lazy start of an image records which spans it read
//! and publishes the profile to the registry; a cold node finds it there and fetches those
//! spans first (bytes by cause `profile`); a corrupt or foreign profile is ignored with a log
//! line and the start goes on without it.

use anyhow::Result;
use bytes::Bytes;
use clip_config::SnapshotterConfig;
use clip_integration::bed::{IndexedImage, hosts_stack, lazy_config};
use clip_integration::containerd::Containerd;
use clip_integration::images::TestImage;
use clip_integration::metrics::{scrape, sum};
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run, wait_until};
use clip_registry::api::Subject;
use clip_registry::credentials::CredentialChain;
use clip_registry::{HostsConfig, Platform, Reference, RegistryClient};
use std::process::Command;
use std::time::Duration;

const NUMPY: &[&str] = &["python3", "-c", "import numpy; print(numpy.__version__, 'ok')"];

/// On-demand fetching only (so the bytes by cause are the start's and the profile's), with a
/// metrics endpoint and a short quiet period.
fn config(port: u16) -> SnapshotterConfig {
    let mut c = lazy_config(false);
    c.metrics_address = format!("127.0.0.1:{port}");
    c.lazy.profiles.quiet_ms = 1000;
    c
}

/// A node: snapshotter and containerd on `image`'s registry, with its metrics port.
fn node(td: &TestDir, image: &IndexedImage) -> Result<(ClipSnapshotter, Containerd, u16)> {
    let port = clip_integration::free_port()?;
    let (snap, ctrd) = hosts_stack(td, &image.registry, config(port))?;
    Ok((snap, ctrd, port))
}

/// `clip-snapshotter pull`, then `cmd` in a container of the image.
fn start(ctrd: &Containerd, reference: &str, name: &str, cmd: &[&str]) -> Result<String> {
    run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .arg(reference))?;
    let mut args = vec!["run", "--rm", "--snapshotter", "clip", reference, name];
    args.extend_from_slice(cmd);
    Ok(String::from_utf8_lossy(&ctrd.ctr_run("t", &args)?.stdout).into_owned())
}

fn profile_bytes(m: &str) -> u64 {
    sum(m, "clip_snapshotter_fetched_bytes_by_cause_total{", &["cause=\"profile\""])
}

fn event(m: &str, name: &str) -> u64 {
    sum(m, "clip_snapshotter_profiles_total{", &[&format!("event=\"{name}\"")])
}

#[test]
fn a_profile_recorded_on_one_node_is_published_found_on_a_cold_node_and_used() -> Result<()> {
    require_root();
    let td = TestDir::new("profiles")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;

    // Node A: the first start ever records the profile and publishes it.
    let (snap_a, ctrd_a, port_a) = node(&td, &image)?;
    let out = start(&ctrd_a, &image.reference, "p1", NUMPY)?;
    assert!(out.trim().ends_with("ok"), "{out}");
    let published = wait_until(Duration::from_secs(30), || event(&scrape(port_a), "published") == 1);
    let m = scrape(port_a);
    assert!(published, "no profile published:\n{m}\n{}", snap_a.log());
    assert_eq!(event(&m, "recorded"), 1, "{m}");
    assert_eq!(profile_bytes(&m), 0, "node A had no profile to replay: {m}");
    let kept = std::fs::read_dir(snap_a.root().join("profiles"))?.collect::<std::io::Result<Vec<_>>>()?;
    assert_eq!(kept.len(), 1, "one profile kept under the root");
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(kept[0].path())?)?;
    let reads = profile["reads"].as_array().map_or(0, Vec::len);
    assert!(reads > 10, "the profile holds {reads} reads: {profile}");
    ctrd_a.purge()?;
    drop((ctrd_a, snap_a));

    // The registry lists it as a referrer of the image manifest.
    let referrers = rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let repo = client.repository(&Reference::parse(&image.reference)?, CredentialChain::anonymous())?;
        let (manifest, _) = repo.get_image_manifest("latest", &Platform::default()).await?;
        anyhow::Ok(repo.referrers(&manifest.digest, Some(clip_index::profile::PROFILE_ARTIFACT_TYPE)).await?)
    })?;
    assert_eq!(referrers.len(), 1, "{referrers:?}");

    // Node B, cold: finds the profile in the registry and fetches its spans first.
    let td_b = TestDir::new("profiles-b")?;
    let (snap_b, ctrd_b, port_b) = node(&td_b, &image)?;
    let before = image.registry.blob_bytes_served();
    let out = start(&ctrd_b, &image.reference, "p2", NUMPY)?;
    assert!(out.trim().ends_with("ok"), "{out}");
    let m = scrape(port_b);
    let fetched = image.registry.blob_bytes_served() - before;
    let (profiled, hits) = (profile_bytes(&m), sum(&m, "clip_snapshotter_profile_hits_total{", &[]));
    let foreground = sum(&m, "clip_snapshotter_fetched_bytes_by_cause_total{", &["cause=\"foreground\""]);
    eprintln!(
        "cold node with the profile: {fetched} bytes from the registry, {profiled} by the profile, {foreground} by the container's own misses; {hits} reads hit profiled spans"
    );
    assert_eq!(event(&m, "found_registry"), 1, "{m}\n{}", snap_b.log());
    assert!(profiled > 0 && hits > 0, "the profile was not used:\n{m}");
    assert!(profiled > foreground, "the profile brought less than the misses: {profiled} vs {foreground}\n{m}");
    assert_eq!(event(&m, "recorded"), 0, "a node that found a profile records none: {m}");
    ctrd_b.purge()?;
    Ok(())
}

/// `clip-builder profile` records the profile at build time: even the first node to start the
/// image finds one.
#[test]
fn clip_builder_profile_records_at_build_time_and_the_first_node_uses_it() -> Result<()> {
    require_root();
    let td = TestDir::new("profiles-builder")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let out = run(Command::new(workspace_binary("clip-builder")?)
        .args(["profile", "--plain-http", "--json", "--cmd", "python3 -c 'import numpy; print(1)'"])
        .arg(&image.reference))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    eprintln!("clip-builder profile: {report}");
    assert_eq!(report["exit_code"], 0, "{report}");
    assert!(report["reads"].as_u64().unwrap_or(0) > 10, "{report}");
    let left: Vec<_> = clip_fsutil::mountinfo::mounts()
        .into_iter()
        .filter(|m| m.mount_point.to_string_lossy().contains("/clip-profile-"))
        .collect();
    assert!(left.is_empty(), "clip-builder profile left mounts behind: {left:?}");

    let (snap, ctrd, port) = node(&td, &image)?;
    let out = start(&ctrd, &image.reference, "pb1", NUMPY)?;
    assert!(out.trim().ends_with("ok"), "{out}");
    let m = scrape(port);
    assert_eq!(event(&m, "found_registry"), 1, "{m}\n{}", snap.log());
    assert!(profile_bytes(&m) > 0, "{m}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(event(&scrape(port), "recorded"), 0, "the first node found a profile and records none");
    ctrd.purge()?;
    Ok(())
}

/// Publishes `blob` as an access profile artifact of `reference`'s manifest.
fn push_profile(reference: &str, blob: Vec<u8>) -> Result<()> {
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let repo = client.repository(&Reference::parse(reference)?, CredentialChain::anonymous())?.for_push();
        let (manifest, _) = repo.get_image_manifest("latest", &Platform::default()).await?;
        let (kind, media_type) = (clip_index::profile::PROFILE_ARTIFACT_TYPE, clip_index::profile::PROFILE_MEDIA_TYPE);
        repo.push_artifact(&Subject::from(&manifest), kind, media_type, Bytes::from(blob)).await?;
        anyhow::Ok(())
    })
}

#[test]
fn a_corrupt_or_foreign_profile_is_ignored_with_a_log_line() -> Result<()> {
    require_root();
    let td = TestDir::new("profiles-bad")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let other = format!("sha256:{}", "ab".repeat(32));
    // Garbage, then a well-formed profile of another image (tried newest first).
    push_profile(&image.reference, b"{\"schemaVersion\": 1, \"reads\": [[0".to_vec())?;
    let foreign = clip_index::profile::AccessProfile::from_reads(&other, [(other.as_str(), 0)], 1);
    push_profile(&image.reference, foreign.to_json())?;

    let (snap, ctrd, port) = node(&td, &image)?;
    let out = start(&ctrd, &image.reference, "b1", NUMPY)?;
    assert!(out.trim().ends_with("ok"), "{out}");
    let recorded = wait_until(Duration::from_secs(30), || event(&scrape(port), "recorded") == 1);
    let m = scrape(port);
    let log = snap.log();
    assert!(recorded, "without a usable profile the start records its own:\n{m}\n{log}");
    assert_eq!(event(&m, "ignored"), 2, "{m}\n{log}");
    assert_eq!(event(&m, "found_registry"), 0, "{m}");
    assert_eq!(profile_bytes(&m), 0, "{m}");
    let ignored = log.lines().filter(|l| l.contains("access profile ignored")).count();
    assert_eq!(ignored, 2, "one log line per ignored profile:\n{log}");
    assert!(log.contains("the access profile is for image"), "{log}");
    assert!(log.contains("not an access profile"), "{log}");
    ctrd.purge()?;
    Ok(())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// The profile command is the image's own code: it runs as an unprivileged container (a user
/// namespace, no host network, a private `/dev`, no mount). Seen before (unshare + chroot as
/// host root): it listed the host's block devices, mounted, and reached the host's network.
#[test]
fn the_profile_command_runs_as_an_unprivileged_container() -> Result<()> {
    require_root();
    let td = TestDir::new("profiles-sandbox")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let listener = std::net::TcpListener::bind("0.0.0.0:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    // The host's own addresses: loopback, and every global one.
    let mut hosts = vec!["127.0.0.1".to_string()];
    let addrs = clip_integration::run_stdout(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]))?;
    hosts.extend(
        addrs
            .split_whitespace()
            .filter(|w| w.contains('/') && w.contains('.'))
            .filter_map(|w| w.split('/').next().map(str::to_string)),
    );
    let script = format!(
        "echo DEV: $(ls /dev); echo UIDMAP: $(cat /proc/self/uid_map); \
         mount -t tmpfs t /mnt 2>/dev/null && echo MOUNTED; \
         for h in {}; do python3 -c \"import socket,sys; socket.create_connection((sys.argv[1], {port}), 3)\" $h \
         2>/dev/null && echo REACHED $h; done",
        hosts.join(" ")
    );
    let out = Command::new(workspace_binary("clip-builder")?)
        .args(["profile", "--plain-http", "--json", "--cmd", &script])
        .arg(&image.reference)
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    let mut connections = 0;
    while listener.accept().is_ok() {
        connections += 1;
    }
    let dev = said.lines().find(|l| l.starts_with("DEV:")).unwrap_or_default();
    eprintln!("{dev}\n{}", said.lines().find(|l| l.starts_with("UIDMAP:")).unwrap_or_default());
    assert!(dev.contains("null") && dev.contains("urandom"), "the standard devices: {said}");
    for host_device in ["vda", "sda", "nvme", "loop", "fuse", "kmsg", "mem"] {
        assert!(!dev.split_whitespace().any(|d| d.starts_with(host_device)), "host device {host_device}: {dev}");
    }
    let uid_map = said.lines().find(|l| l.starts_with("UIDMAP:")).unwrap_or_default();
    assert_eq!(uid_map.split_whitespace().collect::<Vec<_>>(), ["UIDMAP:", "0", "1073741824", "65536"], "{said}");
    assert!(!said.contains("MOUNTED"), "the command mounted a file system:\n{said}");
    assert!(!said.contains("REACHED") && connections == 0, "the command reached the host's network:\n{said}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(report["reads"].as_u64().unwrap_or(0) > 0, "{report}");
    let left: Vec<_> = clip_fsutil::mountinfo::mounts()
        .into_iter()
        .filter(|m| m.mount_point.to_string_lossy().contains("clip-builder/profile-"))
        .collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    Ok(())
}
