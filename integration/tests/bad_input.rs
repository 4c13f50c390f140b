//! Bad input at the snapshots API and from registries: oversized labels and malformed
//! user-namespace mappings are refused without echoing values; malformed lazy-serving labels and index digests that lead nowhere fall back
//! to ordinary snapshots; a corrupt local index is replaced; unknown labels are kept; the daemon
//! never panics and keeps serving. A layer without an index that inflates without bound (a tar
//! bomb) stops being unpacked before the disk is left with less than the configured room.

use anyhow::{Context, Result};
use clip_integration::bed::lazy_config;
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, snapshots_client, workspace_binary};
use clip_integration::{TestDir, require_root, run};
use containerd_snapshots::api::snapshots::v1 as api;
use containerd_snapshots::tonic::Code;
use std::path::Path;
use std::process::Command;

fn prepare(key: &str, labels: &[(&str, &str)]) -> api::PrepareSnapshotRequest {
    api::PrepareSnapshotRequest {
        snapshotter: "clip".into(),
        key: key.into(),
        parent: String::new(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

fn is_fuse_layer(mounts: &[containerd_snapshots::api::types::Mount]) -> bool {
    mounts.iter().any(|m| m.source.contains("/snapshots/") && m.r#type == "bind" && m.options.iter().any(|o| o == "ro"))
}

#[test]
fn bad_labels_and_bad_registry_answers_fail_clearly_or_fall_back_and_the_daemon_lives() -> Result<()> {
    use clip_config::labels as l;
    require_root();
    let td = TestDir::new("bad-input")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    let reference = reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;
    let layer = layout_layers(&layout, "busybox")?.remove(0).0;
    let hosts_dir = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts_dir)?;
    let mut config = lazy_config(true);
    config.containerd_address = td.path().join("no-containerd.sock");
    config.registry.hosts_dir = Some(hosts_dir.clone());
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let bad_digest = "sha256:../../../../../tmp/clip-bad-input";
    let nowhere = format!("sha256:{}", "f".repeat(64));

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut c = snapshots_client(snap.socket()).await?;
        // Oversized: refused, the value not echoed.
        let secret = "Sentinel-Value-0xC1".repeat(300);
        let err = c.prepare(prepare("big", &[(l::BUILD_REGISTRY_CREDS, &secret)])).await.expect_err("oversized label");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(!err.message().contains("Sentinel-Value"), "{}", err.message());
        let err = c.prepare(prepare("empty-key", &[("", "v")])).await.expect_err("empty key");
        assert_eq!(err.code(), Code::InvalidArgument);
        // A user-namespace mapping that is not one: refused, nothing recorded, never quoted.
        use clip_config::idmap::{GID_MAPPING, UID_MAPPING};
        for (key, uids) in [("idmap-wrap", "0:4294967295:2"), ("idmap-no-root", "1:Sentinel-Map:1")] {
            let err = c
                .prepare(prepare(key, &[(UID_MAPPING, uids), (GID_MAPPING, "0:65536:65536")]))
                .await
                .expect_err("bad mapping");
            assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
            assert!(
                !err.message().contains("Sentinel-Map") && !err.message().contains("4294967295"),
                "{}",
                err.message()
            );
            assert!(c.stat(api::StatSnapshotRequest { snapshotter: "clip".into(), key: key.into() }).await.is_err());
        }
        // A good one: the upper dir belongs to the mapped root, the mounts ask for idmapping.
        let r = c
            .prepare(prepare("idmapped", &[(UID_MAPPING, "0:65536:65536"), (GID_MAPPING, "0:131072:65536")]))
            .await?
            .into_inner();
        assert!(r.mounts[0].options.iter().any(|o| o == "uidmap=0:65536:65536"), "{:?}", r.mounts);
        let upper = std::fs::metadata(&r.mounts[0].source)?;
        use std::os::unix::fs::MetadataExt;
        assert_eq!((upper.uid(), upper.gid()), (65_536, 131_072));

        // A layer digest that is a path: an ordinary snapshot, nothing written outside the root.
        let r = c
            .prepare(prepare(
                "bad-digest",
                &[(l::TARGET_SNAPSHOT_REF, "t1"), (l::CRI_IMAGE_REF, &reference), (l::CRI_LAYER_DIGEST, bad_digest)],
            ))
            .await?
            .into_inner();
        assert!(!is_fuse_layer(&r.mounts), "{:?}", r.mounts);
        assert!(!Path::new("/tmp/clip-bad-input.clip").exists());

        // An index digest that leads nowhere: falls back to an ordinary snapshot.
        let r = c
            .prepare(prepare(
                "nowhere",
                &[
                    (l::TARGET_SNAPSHOT_REF, "t2"),
                    (l::CRI_IMAGE_REF, &reference),
                    (l::CRI_LAYER_DIGEST, &layer),
                    (l::INDEX_DIGEST, &nowhere),
                ],
            ))
            .await?
            .into_inner();
        assert!(!is_fuse_layer(&r.mounts), "{:?}", r.mounts);

        // What a transfer-service pull may send: partial or odd layer labels fall back, and
        // the ordinary snapshot says why.
        let r = c
            .prepare(prepare("partial", &[(l::TARGET_SNAPSHOT_REF, "t4"), (l::CRI_IMAGE_REF, &reference)]))
            .await?
            .into_inner();
        assert!(!is_fuse_layer(&r.mounts), "{:?}", r.mounts);
        let r = c
            .prepare(prepare(
                "odd-ref",
                &[
                    (l::TARGET_SNAPSHOT_REF, "t5"),
                    (l::CRI_IMAGE_REF, "Not A Reference!!"),
                    (l::CRI_LAYER_DIGEST, &layer),
                ],
            ))
            .await?
            .into_inner();
        assert!(!is_fuse_layer(&r.mounts), "{:?}", r.mounts);
        let info =
            c.stat(api::StatSnapshotRequest { snapshotter: "clip".into(), key: "odd-ref".into() }).await?.into_inner();
        let why = info.info.and_then(|i| i.labels.get(l::NOT_LAZY_REASON).cloned()).unwrap_or_default();
        assert!(!why.is_empty(), "no reason recorded for a fallback");
        let r = c
            .prepare(prepare(
                "odd-manifest",
                &[
                    (l::TARGET_SNAPSHOT_REF, "t6"),
                    (l::CRI_IMAGE_REF, &reference),
                    (l::CRI_LAYER_DIGEST, &layer),
                    (l::CRI_MANIFEST_DIGEST, "md5:xyz"),
                ],
            ))
            .await?
            .into_inner();
        assert!(!is_fuse_layer(&r.mounts), "{:?}", r.mounts);
        // No labels but the target, in a namespace, and containerd unreachable for the lookup:
        // an ordinary snapshot, at once.
        let mut req =
            containerd_snapshots::tonic::Request::new(prepare("unlabelled", &[(l::TARGET_SNAPSHOT_REF, "t7")]));
        req.metadata_mut().insert("containerd-namespace", "t".parse()?);
        let started = std::time::Instant::now();
        let r = c.prepare(req).await?.into_inner();
        assert!(!is_fuse_layer(&r.mounts), "{:?}", r.mounts);
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());

        // Unknown labels are kept.
        c.prepare(prepare("unknown", &[("example.com/whatever", "x")])).await?;
        let info =
            c.stat(api::StatSnapshotRequest { snapshotter: "clip".into(), key: "unknown".into() }).await?.into_inner();
        assert_eq!(info.info.map(|i| i.labels.get("example.com/whatever").cloned()), Some(Some("x".to_string())));

        // A corrupt index in the local store is replaced from the registry; the layer is lazy.
        let err = c
            .prepare(prepare(
                "lazy-first",
                &[(l::TARGET_SNAPSHOT_REF, "t3a"), (l::CRI_IMAGE_REF, &reference), (l::CRI_LAYER_DIGEST, &layer)],
            ))
            .await
            .expect_err("served lazily: the target exists");
        assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
        // Stored by layer and index blob.
        let prefix = format!("{}.sha256-", layer.replace(':', "-"));
        let index_path = std::fs::read_dir(snap.root().join("indexes"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "clip")
                    && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .context("the stored index")?;
        std::fs::write(&index_path, b"not an index at all")?;
        let err = c
            .prepare(prepare(
                "lazy",
                &[(l::TARGET_SNAPSHOT_REF, "t3"), (l::CRI_IMAGE_REF, &reference), (l::CRI_LAYER_DIGEST, &layer)],
            ))
            .await
            .expect_err("served lazily: the target exists");
        assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
        assert!(std::fs::read(&index_path)?.len() > 100, "the corrupt index was not replaced");
        anyhow::Ok(())
    })?;
    let log = snap.log();
    assert!(log.contains("malformed lazy-serving labels"), "{log}");
    assert!(log.contains("looking the layer of an unlabelled Prepare up failed"), "{log}");
    assert!(log.contains("serving the layer as an ordinary snapshot"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("Sentinel-Value"));
    // Still serving.
    rt.block_on(async {
        let mut c = snapshots_client(snap.socket()).await?;
        c.stat(api::StatSnapshotRequest { snapshotter: "clip".into(), key: "lazy".into() }).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// A layer without an index that inflates without bound — here 1 GiB of zeros in about 1 MB of
/// gzip, with the snapshotter told to leave all but 256 MiB of the disk free — stops being
/// unpacked once that room is used: the pull fails with the reason (not handed to containerd,
/// whose unpack would fill the disk), the partial tree is removed, and the daemon serves on.
#[test]
fn a_layer_that_inflates_without_bound_stops_before_the_disk_is_full() -> Result<()> {
    require_root();
    let td = TestDir::new("tar-bomb")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let work = td.sub("bomb")?;
    let script = "truncate -s 1G zeros && tar --owner=0 --group=0 -cf - zeros | tee >(sha256sum | cut -d' ' -f1 > diff_id) | gzip -1 > layer.gz && rm zeros";
    let out = Command::new("bash").arg("-c").arg(script).current_dir(&work).output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gz = std::fs::read(work.join("layer.gz"))?;
    // tee's process substitution may finish after the pipeline: wait for the digest.
    let diff_id = (0..100)
        .find_map(|_| {
            let d = std::fs::read_to_string(work.join("diff_id")).unwrap_or_default().trim().to_string();
            if d.len() == 64 {
                return Some(d);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            None
        })
        .context("the layer's diff ID")?;
    assert!(gz.len() < 8 << 20, "{} bytes of gzip", gz.len());
    let layout = clip_integration::images::derive_layout_with_gzip_layer(
        &TestImage::Busybox.layout()?,
        "busybox",
        &td.path().join("bomb-layout"),
        &gz,
        &format!("sha256:{diff_id}"),
    )?;
    let reference = reg.push_layout(&layout, "busybox", "testbed/bomb", "latest")?;
    let st = nix::sys::statvfs::statvfs(td.path())?;
    let available_mb = (st.blocks_available() as u64 * st.fragment_size() as u64) >> 20;
    let mut config = clip_config::SnapshotterConfig::default();
    config.lazy.unpack_min_free_mb = available_mb.saturating_sub(256);
    let (snap, ctrd) = clip_integration::bed::hosts_stack(&td, &reg, config)?;
    let out = ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", "clip", &reference]).output()?;
    let (stderr, log) = (String::from_utf8_lossy(&out.stderr), snap.log());
    assert!(!out.status.success(), "the bomb was pulled\n{log}");
    assert!(stderr.contains("the unpack must leave"), "{stderr}\n{log}");
    assert!(log.contains("the disk is too full for it"), "{log}");
    assert!(!log.contains("containerd unpacks it"), "{log}");
    // The base layer is committed; nothing of the bomb's partial tree is left.
    let used = run(Command::new("du").args(["-sm"]).arg(snap.root().join("snapshots")))?;
    let used_mb: u64 = String::from_utf8_lossy(&used.stdout).split_whitespace().next().unwrap_or("").parse()?;
    assert!(used_mb < 64, "{used_mb} MB left under the snapshots");
    // The daemon still serves.
    assert!(ctrd.reaches("t", "clip", std::time::Duration::from_secs(10)));
    ctrd.purge()?;
    Ok(())
}
