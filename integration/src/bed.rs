//! The preamble the lazy end-to-end tests share, as values: an image pushed to a fresh
//! registry and indexed by `clip-builder` ([`IndexedImage`]), the snapshotter config they start
//! from ([`lazy_config`], a `clip_config::SnapshotterConfig` value that
//! [`crate::snapshotter::ClipSnapshotter::start_configured`] writes), and a containerd wired to
//! the snapshotter ([`containerd_for`]).

use crate::containerd::{Containerd, ContainerdOptions, Flavor};
use crate::images::{TestImage, layout_layers};
use crate::registry::Registry;
use crate::snapshotter::{ClipSnapshotter, workspace_binary};
use crate::{TestDir, run};
use anyhow::Result;
use clip_config::SnapshotterConfig;
use std::path::PathBuf;
use std::process::Command;

/// A test image in a registry of the test, with its CLIP index published.
#[derive(Debug)]
pub struct IndexedImage {
    pub registry: Registry,
    pub layout: PathBuf,
    /// `host:port/repository:latest`.
    pub reference: String,
    /// Compressed bytes of the image's layers.
    pub layer_bytes: u64,
}

impl IndexedImage {
    /// `image` pushed to a new plain-HTTP registry `plain` as `repository:latest`, indexed
    /// with `clip-builder index --plain-http`.
    pub fn plain(td: &TestDir, image: TestImage, repository: &str) -> Result<Self> {
        let registry = Registry::start_plain(td, "plain")?;
        let layout = image.layout()?;
        let reference = registry.push_layout(&layout, image.tag(), repository, "latest")?;
        let layer_bytes = layout_layers(&layout, image.tag())?.iter().map(|(_, _, s)| s).sum();
        run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;
        Ok(Self { registry, layout, reference, layer_bytes })
    }
}

/// The config the lazy tests start from: background completion off (the bytes a test counts
/// are the ones its workload read) and, unless `prefetch`, no speculative fetching either.
pub fn lazy_config(prefetch: bool) -> SnapshotterConfig {
    let mut c = SnapshotterConfig::default();
    c.lazy.completion.enabled = false;
    if !prefetch {
        c.lazy.prefetch.threads = 0;
    }
    c
}

/// A private containerd of `flavor` (its shipped snippet) with `snap` as its `clip` proxy plugin.
pub fn containerd_for(td: &TestDir, snap: &ClipSnapshotter, flavor: Flavor) -> Result<Containerd> {
    Containerd::start(
        td,
        &ContainerdOptions {
            flavor,
            clip_socket: Some(snap.socket().to_path_buf()),
            clip_root: Some(snap.root().to_path_buf()),
            ..Default::default()
        },
    )
}

/// A snapshotter and a containerd (2.x) for the images of `registry`, reached through a
/// `hosts.toml` written under `<td>/certs.d` (the snapshotter's `hosts_dir`): the stack most
/// lazy tests run on. `config` is the rest of the snapshotter's config.
pub fn hosts_stack(
    td: &TestDir,
    registry: &Registry,
    mut config: SnapshotterConfig,
) -> Result<(ClipSnapshotter, Containerd)> {
    let hosts_dir = td.sub("certs.d")?;
    registry.write_hosts_toml(&hosts_dir)?;
    config.registry.hosts_dir = Some(hosts_dir);
    let snap = ClipSnapshotter::start_configured(td, "clip", &config, &[])?;
    let ctrd = containerd_for(td, &snap, Flavor::V2)?;
    Ok((snap, ctrd))
}
