//! The clip-snapshotter daemon as containerd uses it (no laziness yet): crash safety of its
//! metadata, the socket contract, metrics, and `ctr` pulling and running images on it.

use anyhow::{Context, Result, bail};
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::images::TestImage;
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, snapshots_client, workspace_binary};
use clip_integration::tree::diff_trees;
use clip_integration::{TestDir, require_root, run, run_stdout};
use containerd_snapshots::api::snapshots::v1 as api;
use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::tonic::{Code, transport::Channel};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Small deterministic PRNG (xorshift64*), so a failing storm can be replayed from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the storm knows for sure: operations the daemon acknowledged, per key.
#[derive(Default)]
struct Ledger {
    /// Keys whose creation (prepare/view/commit) was acknowledged and not touched since.
    must_exist: HashSet<String>,
    /// Keys whose removal was acknowledged and not touched since.
    must_not_exist: HashSet<String>,
    acknowledged: u64,
}

impl Ledger {
    fn touch(&mut self, key: &str) {
        self.must_exist.remove(key);
        self.must_not_exist.remove(key);
    }
}

async fn storm_worker(
    socket: std::path::PathBuf,
    worker: u64,
    round: u64,
    seed: u64,
    ledger: Arc<Mutex<Ledger>>,
    committed: Arc<Mutex<Vec<String>>>,
) {
    let Ok(mut client) = snapshots_client(&socket).await else { return };
    let mut rng = Rng(seed | 1);
    for n in 0.. {
        let key = format!("r{round}-w{worker}-a{n}");
        let parent = {
            let c = committed.lock().expect("lock");
            if c.is_empty() || rng.below(3) == 0 {
                String::new()
            } else {
                c[rng.below(c.len() as u64) as usize].clone()
            }
        };
        let labels = HashMap::from([("containerd.io/gc.root".to_string(), format!("{n}"))]);
        ledger.lock().expect("lock").touch(&key);
        let view = rng.below(5) == 0;
        let created = if view {
            client
                .view(api::ViewSnapshotRequest { snapshotter: "clip".into(), key: key.clone(), parent, labels })
                .await
                .map(|_| ())
        } else {
            client
                .prepare(api::PrepareSnapshotRequest { snapshotter: "clip".into(), key: key.clone(), parent, labels })
                .await
                .map(|_| ())
        };
        match created {
            Ok(()) => {
                let mut l = ledger.lock().expect("lock");
                l.must_exist.insert(key.clone());
                l.acknowledged += 1;
            }
            Err(s) if s.code() == Code::NotFound => continue, // parent removed meanwhile
            Err(_) => return,                                 // daemon killed
        }
        let action = rng.below(3);
        if action == 0 && !view {
            let name = format!("r{round}-w{worker}-c{n}");
            {
                let mut l = ledger.lock().expect("lock");
                l.touch(&key);
                l.touch(&name);
            }
            let r = client
                .commit(api::CommitSnapshotRequest {
                    snapshotter: "clip".into(),
                    name: name.clone(),
                    key: key.clone(),
                    labels: HashMap::new(),
                })
                .await;
            if r.is_err() {
                return;
            }
            let mut l = ledger.lock().expect("lock");
            l.must_exist.insert(name.clone());
            l.must_not_exist.insert(key);
            l.acknowledged += 1;
            committed.lock().expect("lock").push(name);
        } else if action == 1 {
            ledger.lock().expect("lock").touch(&key);
            if client.remove(api::RemoveSnapshotRequest { snapshotter: "clip".into(), key: key.clone() }).await.is_err()
            {
                return;
            }
            let mut l = ledger.lock().expect("lock");
            l.must_not_exist.insert(key);
            l.acknowledged += 1;
        }
        // Now and then remove a committed snapshot (refused while it has children).
        if rng.below(4) == 0 {
            let victim = {
                let c = committed.lock().expect("lock");
                if c.is_empty() {
                    continue;
                }
                c[rng.below(c.len() as u64) as usize].clone()
            };
            ledger.lock().expect("lock").touch(&victim);
            match client.remove(api::RemoveSnapshotRequest { snapshotter: "clip".into(), key: victim.clone() }).await {
                Ok(_) => {
                    committed.lock().expect("lock").retain(|c| c != &victim);
                    let mut l = ledger.lock().expect("lock");
                    l.must_not_exist.insert(victim);
                    l.acknowledged += 1;
                }
                Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                    // Still there (has children) or already gone: unknown to the ledger now.
                }
                Err(_) => return,
            }
        }
    }
}

async fn walk_all(client: &mut SnapshotsClient<Channel>) -> Result<Vec<api::Info>> {
    let mut stream =
        client.list(api::ListSnapshotsRequest { snapshotter: "clip".into(), filters: vec![] }).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend(msg.info);
    }
    Ok(out)
}

#[test]
fn sigkill_during_a_storm_of_calls_leaves_consistent_metadata_and_no_orphans() -> Result<()> {
    require_root();
    let td = TestDir::new("storm")?;
    let mut daemon = ClipSnapshotter::start(&td, "clip", &[])?;
    let rt = tokio::runtime::Runtime::new()?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let committed = Arc::new(Mutex::new(Vec::<String>::new()));
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    eprintln!("storm seed {seed}");
    let mut rng = Rng(seed | 1);
    let mut orphans_seen = 0usize;
    const ROUNDS: u64 = 12;
    for round in 0..ROUNDS {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                rt.spawn(storm_worker(
                    daemon.socket().to_path_buf(),
                    w,
                    round,
                    rng.next(),
                    ledger.clone(),
                    committed.clone(),
                ))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150 + rng.below(350)));
        daemon.kill();
        for w in workers {
            rt.block_on(w)?;
        }

        // The database opens and is consistent, with the daemon dead.
        let root = daemon.root().to_path_buf();
        let store = clip_snapshotter::metadata::MetaStore::open(&root.join("metadata.redb"))
            .context("database must open after SIGKILL")?;
        let problems = store.check_consistency()?;
        assert!(problems.is_empty(), "round {round}: inconsistent after SIGKILL: {problems:?}");
        let live: HashSet<u64> = store.list()?.iter().map(|(_, r)| r.id).collect();
        let on_disk = snapshot_dir_entries(&root)?;
        orphans_seen += on_disk.iter().filter(|e| !e.parse().is_ok_and(|id| live.contains(&id))).count();
        for id in &live {
            assert!(root.join(format!("snapshots/{id}/fs")).is_dir(), "round {round}: snapshot {id} has no directory");
        }
        drop(store);

        daemon.restart()?;
        rt.block_on(async {
            let mut client = snapshots_client(daemon.socket()).await?;
            let infos = walk_all(&mut client).await?;
            let names: HashSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
            let (must_exist, must_not_exist) = {
                let l = ledger.lock().expect("lock");
                (l.must_exist.clone(), l.must_not_exist.clone())
            };
            for k in &must_exist {
                assert!(names.contains(k.as_str()), "round {round}: acknowledged {k} lost");
            }
            for k in &must_not_exist {
                assert!(!names.contains(k.as_str()), "round {round}: removed {k} is back");
            }
            for info in &infos {
                if info.kind != 3 {
                    let m = client
                        .mounts(api::MountsRequest { snapshotter: "clip".into(), key: info.name.clone() })
                        .await?
                        .into_inner();
                    assert!(!m.mounts.is_empty());
                }
            }
            client.cleanup(api::CleanupRequest { snapshotter: "clip".into() }).await?;
            anyhow::Ok(())
        })?;
        // Committed snapshots the storm still knows about.
        let names: HashSet<String> = rt
            .block_on(async { walk_all(&mut snapshots_client(daemon.socket()).await?).await })?
            .into_iter()
            .map(|i| i.name)
            .collect();
        committed.lock().expect("lock").retain(|c| names.contains(c));
    }
    daemon.stop()?;
    let root = daemon.root().to_path_buf();
    let store = clip_snapshotter::metadata::MetaStore::open(&root.join("metadata.redb"))?;
    assert!(store.check_consistency()?.is_empty());
    let live: HashSet<String> = store.list()?.iter().map(|(_, r)| r.id.to_string()).collect();
    let on_disk: HashSet<String> = snapshot_dir_entries(&root)?.into_iter().collect();
    assert_eq!(on_disk, live, "after Cleanup the snapshot dirs are exactly the recorded ones");
    let l = ledger.lock().expect("lock");
    eprintln!(
        "{ROUNDS} SIGKILLs, {} acknowledged operations, {} snapshots at the end, {orphans_seen} orphaned directories found after kills",
        l.acknowledged,
        live.len()
    );
    assert!(l.acknowledged > ROUNDS * 10, "the storm did too little to mean anything");
    Ok(())
}

fn snapshot_dir_entries(root: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(root.join("snapshots"))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

#[test]
fn socket_contract_signals_and_metrics() -> Result<()> {
    require_root();
    let td = TestDir::new("sockets")?;
    // A stale socket file is replaced.
    let stale = std::os::unix::net::UnixListener::bind(td.path().join("clip.sock"))?;
    drop(stale);
    let port = clip_integration::free_port()?;
    let mut config = clip_config::SnapshotterConfig::default();
    config.metrics_address = format!("127.0.0.1:{port}");
    config.log_format = clip_config::LogFormat::Json;
    let mut daemon = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let mode = std::fs::metadata(daemon.socket())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // A second daemon on the same socket refuses to steal it.
    let second = Command::new(workspace_binary("clip-snapshotter")?)
        .arg("--root")
        .arg(td.path().join("other-root"))
        .arg("--address")
        .arg(daemon.socket())
        .output()?;
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"), "{second:?}");

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut c = snapshots_client(daemon.socket()).await?;
        c.prepare(api::PrepareSnapshotRequest {
            snapshotter: "clip".into(),
            key: "k".into(),
            parent: String::new(),
            labels: HashMap::new(),
        })
        .await?;
        let err = c
            .stat(api::StatSnapshotRequest { snapshotter: "clip".into(), key: "missing".into() })
            .await
            .expect_err("missing key");
        assert_eq!(err.code(), Code::NotFound);
        anyhow::Ok(())
    })?;
    let metrics = run_stdout(Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]))?;
    assert!(metrics.contains(r#"clip_snapshotter_grpc_calls_total{method="prepare",code="OK"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"clip_snapshotter_grpc_calls_total{method="stat",code="NotFound"} 1"#));
    assert!(metrics.contains("clip_snapshotter_grpc_call_seconds_bucket"));
    // JSON logs, one object per line.
    let log = daemon.log();
    let first = log.lines().next().context("no log")?;
    serde_json::from_str::<serde_json::Value>(first).with_context(|| format!("not JSON: {first}"))?;
    daemon.stop()?;
    assert!(!daemon.socket().exists(), "socket removed on exit");

    // Bad config (as a user writes it): a clear error naming the key, and a non-zero exit.
    let bad = td.path().join("bad.toml");
    std::fs::write(&bad, "metrics_address = \"nonsense\"\n")?;
    let out = Command::new(workspace_binary("clip-snapshotter")?)
        .arg("--config")
        .arg(&bad)
        .arg("--root")
        .arg(td.path().join("r2"))
        .arg("--address")
        .arg(td.path().join("r2.sock"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics_address"), "{err}");
    Ok(())
}

#[test]
fn ctr_pulls_and_runs_images_on_clip_with_the_same_rootfs_as_overlayfs() -> Result<()> {
    require_root();
    let td = TestDir::new("ctrclip")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let snap = ClipSnapshotter::start(&td, "clip", &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    for (image, repo, tag, cmd) in [
        (TestImage::Busybox, "testbed/busybox", "busybox", vec!["sh", "-c", "echo hello from clip"]),
        (
            TestImage::Python,
            "testbed/python",
            "pyapp",
            vec!["python3", "-c", "import numpy; print('hello from clip', numpy.__version__)"],
        ),
    ] {
        let layout = image.layout()?;
        reg.push_layout(&layout, tag, repo, "latest")?;
        let reference = format!("{}/{repo}:latest", reg.host());
        for snapshotter in ["overlayfs", "clip"] {
            run(ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", snapshotter, &reference]))?;
        }
        let mut args = vec!["run", "--rm", "--snapshotter", "clip", reference.as_str(), "c1"];
        args.extend(cmd.iter().copied());
        let out = ctrd.ctr_run("t", &args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("hello from clip"), "{stdout}");

        let overlay = ctrd.image_tree(&td, &reference, "overlayfs")?;
        let clip = ctrd.image_tree(&td, &reference, "clip")?;
        let diffs = diff_trees(&overlay, &clip, 20);
        assert!(diffs.is_empty(), "{reference}: rootfs differs:\n{}", diffs.join("\n"));
        eprintln!("{reference}: {} entries identical on overlayfs and clip", clip.len());
        assert!(clip.len() > 100);
    }
    // The snapshots are clip's: containerd sees them in its walk of the clip snapshotter.
    let listed = run_stdout(ctrd.ctr("t").args(["snapshots", "--snapshotter", "clip", "ls"]))?;
    if listed.lines().count() < 5 {
        bail!("expected the images' layers in clip's snapshots:\n{listed}");
    }
    ctrd.purge()?;
    Ok(())
}
