//! One lazy layer's life under concurrent snapshot calls. A Remove of the last snapshot that uses
//! a layer deletes the layer's caches; a Prepare of another snapshot of the same layer arriving
//! meanwhile must either come first (the layer stays in use, nothing is deleted) or after (it
//! starts from fresh caches) — never in between, where it would be served from a cache directory
//! that is then deleted under it and its reads would fail with EIO from then on.

use anyhow::{Context, Result, bail};
use clip_integration::bed::{IndexedImage, lazy_config};
use clip_integration::images::{TestImage, file_digests_under, layout_layers};
use clip_integration::snapshotter::{ClipSnapshotter, snapshots_client};
use clip_integration::{TestDir, require_root, sha256_file};
use containerd_snapshots::api::snapshots::v1 as api;
use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::tonic::{Code, transport::Channel};
use std::path::PathBuf;
use std::time::Duration;

/// Rounds of the race; each starts from a layer without caches. On the code before the layer
/// gates, about one round in a hundred deleted the caches under the new snapshot.
const ROUNDS: usize = 300;

/// Prepares `key` as the lazy layer `layer` of `image` for the chain `target`: the snapshotter
/// commits it under `key` and answers AlreadyExists.
async fn prepare_lazy(
    client: &mut SnapshotsClient<Channel>,
    key: &str,
    target: &str,
    image: &str,
    layer: &str,
) -> Result<()> {
    let labels = clip_config::labels::cri_layer_labels(target, image, "", &[layer.to_string()], 0)
        .into_iter()
        .filter(|(k, _)| k != clip_config::labels::CRI_MANIFEST_DIGEST)
        .collect();
    let answer = client
        .prepare(api::PrepareSnapshotRequest {
            snapshotter: "clip".into(),
            key: key.into(),
            parent: String::new(),
            labels,
        })
        .await;
    match answer {
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => bail!("prepare {key}: {s}"),
        Ok(_) => bail!("prepare {key} was not served lazily (an ordinary snapshot was made)"),
    }
}

async fn remove(client: &mut SnapshotsClient<Channel>, key: &str) -> Result<()> {
    client
        .remove(api::RemoveSnapshotRequest { snapshotter: "clip".into(), key: key.into() })
        .await
        .with_context(|| format!("remove {key}"))?;
    Ok(())
}

/// The directory a view of `parent` shows (one layer: a read-only bind mount of it).
async fn view_dir(client: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> Result<PathBuf> {
    let mounts = client
        .view(api::ViewSnapshotRequest {
            snapshotter: "clip".into(),
            key: key.into(),
            parent: parent.into(),
            labels: std::collections::HashMap::new(),
        })
        .await
        .with_context(|| format!("view {key}"))?
        .into_inner()
        .mounts;
    let m = mounts.first().context("a view without mounts")?;
    Ok(PathBuf::from(&m.source))
}

#[test]
fn a_remove_racing_a_prepare_of_the_same_layer_never_strands_the_new_snapshot() -> Result<()> {
    require_root();
    let td = TestDir::new("layer-lifecycle")?;
    let image = IndexedImage::plain(&td, TestImage::Busybox, "testbed/busybox")?;
    let layer = layout_layers(&image.layout, TestImage::Busybox.tag())?[0].0.clone();
    let expected = file_digests_under(&image.layout, TestImage::Busybox.tag(), "bin", &td.sub("expected")?)?;
    let (file, digest) = expected.iter().max_by_key(|(p, _)| p.len()).context("no file under bin")?;
    let hosts_dir = td.sub("certs.d")?;
    image.registry.write_hosts_toml(&hosts_dir)?;
    let mut config = lazy_config(false);
    config.registry.hosts_dir = Some(hosts_dir);
    // Every read goes through the span cache of the mount; no fd keeper to start and stop.
    config.lazy.passthrough = false;
    config.lazy.survive_restarts = false;
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    // The layer's span cache: `spans/<layer>.<index blob>` (caches are keyed by layer and index).
    let (spans_root, prefix) = (snap.root().join("spans"), format!("{}.", layer.replace(':', "-")));
    let span_cache_exists = || {
        std::fs::read_dir(&spans_root)
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with(&prefix))))
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut first = snapshots_client(snap.socket()).await?;
        let mut second = snapshots_client(snap.socket()).await?;
        for round in 0..ROUNDS {
            // The snapshot is committed under the Prepare's key; the target only names it.
            let (a, b) = (format!("layer-a-{round}"), format!("layer-b-{round}"));
            prepare_lazy(&mut first, &a, &format!("chain-a-{round}"), &image.reference, &layer).await?;
            // The only snapshot of the layer goes while another snapshot of it is prepared, the
            // Prepare sent a little later each round (0 to 5 ms, three times over) to sweep the
            // Remove's steps.
            let target_b = format!("chain-b-{round}");
            let lag = Duration::from_micros((round % 100) as u64 * 50);
            let (removed, prepared) = tokio::join!(remove(&mut first, &a), async {
                tokio::time::sleep(lag).await;
                prepare_lazy(&mut second, &b, &target_b, &image.reference, &layer).await
            });
            removed?;
            prepared?;
            if !span_cache_exists() {
                bail!("round {round}: the layer's span cache was deleted under its new snapshot");
            }
            let view = format!("view-{round}");
            let dir = view_dir(&mut first, &view, &b).await?;
            let path = dir.join(file.trim_start_matches('/'));
            let read = tokio::task::spawn_blocking(move || sha256_file(&path)).await?;
            match read {
                Ok(d) if &d == digest => {}
                Ok(d) => bail!("round {round}: {file} read as {d}, not {digest}"),
                Err(e) => bail!("round {round}: the new snapshot of the layer cannot be read: {e:#}"),
            }
            remove(&mut first, &view).await?;
            remove(&mut first, &b).await?;
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
