//! Restart survival: a container reading files that were never fetched keeps succeeding while
//! the snapshotter is SIGKILLed and started again (its FUSE connections are held by the fd
//! keeper and served again by the new daemon); a graceful stop does the same; and when the
//! keeper is gone too (a reboot-like loss of every connection) the daemon mounts the layers
//! anew for new containers. A layer without an index that the snapshotter unpacks: a daemon
//! killed mid-unpack leaves nothing behind after its restart, and a download that breaks off is
//! resumed where it broke.

use anyhow::{Context, Result};
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::fault_proxy::{Fault, FaultProxy};
use clip_integration::images::{TestImage, file_digests_under};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run, wait_until};
use std::process::{Command, Stdio};
use std::time::Duration;

const NUMPY: &str = "usr/lib/python3/dist-packages/numpy/";

fn output_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn a_reading_container_survives_sigkill_and_restart_of_the_snapshotter() -> Result<()> {
    require_root();
    let td = TestDir::new("restart")?;
    let reg = Registry::start_plain(&td, "plain")?;
    // The registry is reached through a proxy that can play dead.
    let proxy = FaultProxy::start(reg.host(), Fault::None)?;
    let layout = TestImage::Python.layout()?;
    reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let reference = format!("{}/testbed/python:latest", proxy.host());
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;
    let expected = file_digests_under(&layout, "pyapp", NUMPY, &td.sub("expected")?)?;
    assert!(expected.len() > 1000, "numpy has {} files", expected.len());

    let hosts_dir = td.sub("certs.d")?;
    let d = hosts_dir.join(proxy.host());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", proxy.host()))?;
    // No background fetch: every file the container reads after the kill is fetched then.
    let mut config = lazy_config(true);
    config.registry.hosts_dir = Some(hosts_dir.clone());
    config.lazy.passthrough = true;
    let mut snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let pulled = run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--plain-http", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .arg(&reference))?;
    eprintln!("repull: {}", String::from_utf8_lossy(&pulled.stdout).trim());
    let keeper = snap.keeper_pid().context("the daemon started no fd keeper")?;

    // The container hashes every numpy file, one at a time, with a timestamp per file.
    let out_path = td.path().join("reader.out");
    let script = format!(
        "find /{NUMPY} -type f | sort | while read f; do s=$(sha256sum \"$f\" 2>&1) || {{ echo \"FAIL $f $s\"; continue; }}; echo \"$(date +%s%N) $s\"; done"
    );
    let mut reader = ctrd
        .ctr("t")
        .args(["run", "--rm", "--snapshotter", "clip", &reference, "reader", "sh", "-c", &script])
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(Stdio::piped())
        .spawn()?;
    assert!(
        wait_until(Duration::from_secs(60), || output_lines(&out_path).len() >= 50),
        "the reader did not start:\n{}",
        snap.log()
    );

    // SIGKILL mid-read; the reader blocks in a FUSE read until the new daemon answers it.
    snap.kill();
    let at_kill = output_lines(&out_path).len();
    std::thread::sleep(Duration::from_secs(2));
    let during = output_lines(&out_path).len();
    snap.restart()?;
    let log = snap.log();
    assert_eq!(snap.keeper_pid(), Some(keeper), "the keeper was replaced");
    let reattached = |log: &str| log.matches("how=\"reattached\"").count() + log.matches("how=reattached").count();
    assert_eq!(reattached(&log), 4, "{log}");

    // Midway, a graceful stop and start: the same.
    assert!(
        wait_until(Duration::from_secs(120), || output_lines(&out_path).len() >= at_kill + 300),
        "no progress after the restart:\n{}",
        snap.log()
    );
    snap.stop()?;
    std::thread::sleep(Duration::from_secs(1));
    snap.restart()?;
    let log = snap.log();
    assert!(reattached(&log) >= 4, "{log}");

    let status = wait_until(Duration::from_secs(600), || reader.try_wait().is_ok_and(|s| s.is_some()));
    assert!(status, "the reader never finished:\n{}", snap.log());
    let exit = reader.wait()?;
    let mut stderr = String::new();
    if let Some(mut e) = reader.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    assert!(exit.success(), "reader failed: {exit:?} {stderr}\n{}", snap.log());

    let lines = output_lines(&out_path);
    let fails: Vec<&String> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        fails.is_empty(),
        "{} reads failed across the restart (first at line {:?} of {}, killed at {at_kill}): {:?}\n{}",
        fails.len(),
        lines.iter().position(|l| l.starts_with("FAIL")),
        lines.len(),
        &fails[..fails.len().min(3)],
        snap.log()
    );
    let mut times = Vec::new();
    let mut seen = 0;
    for l in &lines {
        let mut it = l.split_whitespace();
        let (Some(t), Some(sum), Some(path)) = (it.next(), it.next(), it.next()) else { continue };
        times.push(t.parse::<u128>()?);
        assert_eq!(expected.get(path).map(String::as_str), Some(sum), "{path}");
        seen += 1;
    }
    assert_eq!(seen, expected.len(), "files hashed");
    let gap = times.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    eprintln!(
        "{seen} files hashed, all right; {at_kill} before the SIGKILL, {} while no daemon ran; longest pause seen by the container {:.2} s",
        during - at_kill,
        gap as f64 / 1e9
    );
    assert!(during - at_kill <= 1, "reads completed with no daemon: {}", during - at_kill);

    // A reboot-like loss: daemon and keeper gone, the dead mounts replaced by new ones.
    snap.kill();
    snap.kill_keeper();
    snap.restart()?;
    let log = snap.log();
    assert!(log.matches("how=\"mounted\"").count() + log.matches("how=mounted").count() >= 4, "{log}");
    let reconnected = ctrd.reaches("t", "clip", Duration::from_secs(30));
    assert!(reconnected);
    let out = ctrd.ctr_run(
        "t",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &reference,
            "after-reboot",
            "python3",
            "-c",
            "import numpy; print(42)",
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    // Lost indexes are fetched again at the next start.
    snap.kill();
    snap.kill_keeper();
    std::fs::remove_dir_all(snap.root().join("indexes"))?;
    snap.restart()?;
    let log = snap.log();
    assert!(log.contains("fetching it again"), "{log}");
    assert!(log.matches("how=\"mounted\"").count() + log.matches("how=mounted").count() >= 4, "{log}");

    // Lost indexes and no registry: the layers cannot be served. Their snapshots stay (containerd
    // keeps its records of them and would answer a Prepare from those) without their directories
    // (never an empty layer under a container); the next container that needs them has them
    // served again.
    snap.kill();
    snap.kill_keeper();
    std::fs::remove_dir_all(snap.root().join("indexes"))?;
    proxy.set_mode(Fault::Down);
    snap.restart()?;
    let log = snap.log();
    let handled = log.matches("is left in place without its directory").count();
    assert_eq!(handled, 4, "{log}");
    for id in 1..=4 {
        let fs = snap.root().join(format!("snapshots/{id}/fs"));
        assert!(!fs.exists(), "{} is an empty layer", fs.display());
    }
    proxy.set_mode(Fault::None);
    let reconnected = ctrd.reaches("t", "clip", Duration::from_secs(30));
    assert!(reconnected);
    run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--plain-http", "-n", "t", "--containerd-address"])
        .arg(ctrd.socket())
        .arg(&reference))?;
    let out = ctrd
        .ctr_run(
            "t",
            &[
                "run",
                "--rm",
                "--snapshotter",
                "clip",
                &reference,
                "after-repull",
                "python3",
                "-c",
                "import numpy; print(43)",
            ],
        )
        .with_context(|| format!("after the repull:\n{}", snap.log()))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "43");
    let log = snap.log();
    let back = log.matches("an unservable layer is served again").count() + log.matches("layer mounted lazily").count();
    assert!(back >= 4, "{log}");
    ctrd.purge()?;
    Ok(())
}

/// A layer no index serves is downloaded and unpacked by the snapshotter in Prepare. A daemon
/// SIGKILLed in the middle of that leaves, after its restart, no partial snapshot or tree (no
/// Prepare outlives the daemon, and containerd never learned the snapshot's key); the pull then
/// succeeds. A download whose connection breaks off is resumed from where it broke with a ranged
/// request instead of being given to containerd to download again.
#[test]
fn an_unpack_killed_mid_download_leaves_nothing_behind_and_a_broken_download_resumes() -> Result<()> {
    require_root();
    let td = TestDir::new("unpack-restart")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Python.layout()?;
    reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let layers = clip_integration::images::layout_layers(&layout, "pyapp")?;
    let largest = layers.iter().max_by_key(|l| l.2).map(|l| l.0.clone()).context("layers")?;
    let below = layers.iter().position(|l| l.0 == largest).context("position")?;
    // A slow link: the largest layer (about 50 MB) takes some 15 s.
    let proxy = FaultProxy::start(reg.host(), Fault::Trickle(20))?;
    let reference = format!("{}/testbed/python:latest", proxy.host());
    let hosts_dir = td.sub("certs.d")?;
    let d = hosts_dir.join(proxy.host());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", proxy.host()))?;
    let mut config = clip_config::SnapshotterConfig::default();
    config.registry.hosts_dir = Some(hosts_dir);
    let mut snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let unpacked_here = |snap: &ClipSnapshotter| snap.log().matches("layer downloaded and unpacked here").count();
    let snapshot_dirs = |snap: &ClipSnapshotter| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(snap.root().join("snapshots"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let has_files = |dir: &std::path::Path| std::fs::read_dir(dir.join("fs")).is_ok_and(|mut d| d.next().is_some());

    let mut pull = ctrd
        .ctr("t")
        .args(["images", "pull", "--plain-http", "--snapshotter", "clip", &reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Killed once the largest layer's tree is growing: the layers below it committed, and one
    // more directory with files in it.
    let mid_unpack = wait_until(Duration::from_secs(120), || {
        unpacked_here(&snap) == below && snapshot_dirs(&snap).iter().filter(|d| has_files(d)).count() > below
    });
    assert!(mid_unpack, "the largest layer's unpack was not seen under way:\n{}", snap.log());
    // The directory being unpacked into: the newest one (ids only grow).
    let id_of = |d: &std::path::Path| d.file_name().and_then(|n| n.to_str()?.parse::<u64>().ok()).unwrap_or(0);
    let partial = snapshot_dirs(&snap).into_iter().max_by_key(|d| id_of(d)).context("no snapshot directory")?;
    snap.kill();
    let _ = pull.wait();
    assert!(has_files(&partial), "{} holds no tree", partial.display());
    snap.restart()?;
    let log = snap.log();
    assert_eq!(log.matches("removed the snapshot of an unpack the daemon did not finish").count(), 1, "{log}");
    assert!(!partial.exists(), "the partial tree {} is still there\n{log}", partial.display());
    assert!(ctrd.reaches("t", "clip", Duration::from_secs(30)), "containerd did not reconnect");

    // Every whole-blob download over 1 MiB now breaks off halfway: each is resumed from there
    // (the layers below the largest may be unpacked again: containerd may have removed them
    // with the failed pull's lease).
    proxy.set_mode(Fault::CutWholeBlobs);
    let before = snap.log().len();
    run(ctrd.ctr("t").args(["images", "pull", "--plain-http", "--snapshotter", "clip", &reference]))?;
    let log = snap.log();
    let new_log = log.get(before..).unwrap_or(&log);
    let unpacked: Vec<&str> = new_log.lines().filter(|l| l.contains("layer downloaded and unpacked here")).collect();
    assert!(unpacked.len() >= layers.len() - below, "{log}");
    assert!(unpacked.iter().any(|l| l.contains(&largest)), "{log}");
    assert!(!new_log.contains("unpacking a layer here failed"), "{log}");
    let resumed = new_log.lines().filter(|l| l.contains("a blob's download broke off; resuming it from there")).count();
    let cut = proxy.faults_injected();
    assert!(cut >= 1 && resumed as u64 == cut, "{cut} downloads cut off, {resumed} resumed\n{log}");
    let out = ctrd.ctr_run(
        "t",
        &["run", "--rm", "--snapshotter", "clip", &reference, "r1", "python3", "-c", "import numpy; print(9)"],
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "9", "{}", snap.log());
    ctrd.purge()?;
    Ok(())
}
