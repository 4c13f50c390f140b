//! Restart survival: a container reading files that were never fetched keeps succeeding while
//! the snapshotter is SIGKILLed and started again (its FUSE connections are held by the fd
//! keeper and served again by the new daemon); a graceful stop does the same; and when the
//! keeper is gone too (a reboot-like loss of every connection) the daemon mounts the layers
//! anew for new containers.

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
