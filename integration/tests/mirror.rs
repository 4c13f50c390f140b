//! A fleet behind a pull-through cache (the Distribution registry with `proxy.remoteurl`, a
//! `hosts.toml` mirror): what the origin registry serves while three cold nodes start the
//! python image lazily through it, one after the other, with the daemon's defaults.

use anyhow::Result;
use clip_config::SnapshotterConfig;
use clip_integration::bed::{IndexedImage, containerd_for};
use clip_integration::containerd::Flavor;
use clip_integration::images::TestImage;
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run};
use std::process::Command;

#[test]
fn a_fleet_behind_a_pull_through_mirror_costs_the_origin_about_one_image() -> Result<()> {
    require_root();
    let td = TestDir::new("mirror")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let mirror = Registry::start_pull_through(&td, "mirror", &image.registry)?;
    let hosts = td.sub("certs.d")?;
    image.registry.write_hosts_toml_with_mirror(&hosts, &mirror)?;
    let before = image.registry.blob_bytes_served();
    let mut per_node = Vec::new();
    for n in 0..3 {
        let node = TestDir::new(&format!("mirror-node{n}"))?;
        let mut config = SnapshotterConfig::default();
        config.registry.hosts_dir = Some(hosts.clone());
        let snap = ClipSnapshotter::start_configured(&node, "clip", &config, &[])?;
        let ctrd = containerd_for(&node, &snap, Flavor::V2)?;
        let origin0 = image.registry.blob_bytes_served();
        let mirror0 = mirror.blob_bytes_served();
        run(Command::new(workspace_binary("clip-snapshotter")?)
            .args(["pull", "-n", "t", "--hosts-dir"])
            .arg(&hosts)
            .arg("--containerd-address")
            .arg(ctrd.socket())
            .arg(&image.reference))?;
        let out = ctrd.ctr_run(
            "t",
            &[
                "run",
                "--rm",
                "--snapshotter",
                "clip",
                &image.reference,
                "m1",
                "python3",
                "-c",
                "import numpy; print('ok')",
            ],
        )?;
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok"), "{}", snap.log());
        // Background completion included (its default start delay is 5 s).
        std::thread::sleep(std::time::Duration::from_secs(8));
        let (origin, served) = (image.registry.blob_bytes_served() - origin0, mirror.blob_bytes_served() - mirror0);
        eprintln!("node {n}: the origin served {origin} bytes, the mirror {served}");
        per_node.push(origin);
        ctrd.purge()?;
    }
    let origin = image.registry.blob_bytes_served() - before;
    let ratio = origin as f64 / image.layer_bytes as f64;
    eprintln!(
        "three nodes through the mirror: the origin served {origin} bytes, {ratio:.2}x the image's {} (per node {per_node:?})",
        image.layer_bytes
    );
    // Before ranges of a blob the mirror was pulling through went to the origin, the first
    // node's parallel range requests made the mirror fetch every blob two or three times
    // (measured 2.60x here; 1.58x since). What is left above 1.0x: Distribution's proxy
    // fetches a blob it does not have twice when one client asks (once to store, once for
    // the client), so the small blobs read whole (indexes, windows) cost twice; each hang-up
    // on a blob still being pulled through costs what was in flight; and the first node's
    // own ranges go to the origin until the mirror has the blob.
    assert!(ratio < 1.8, "the origin served {ratio:.2}x the image");
    assert!(per_node[1] + per_node[2] < image.layer_bytes / 20, "later nodes reached the origin: {per_node:?}");
    Ok(())
}
