//! Load: 20 containers from 4 images (two base images and a variant of each with its own top
//! layer) pulled and started at once on one snapshotter. Every container must finish with the
//! right output; the daemon's peak memory, threads and open files are sampled and reported.

use anyhow::{Context, Result};
use clip_integration::bed::hosts_stack;
use clip_integration::images::{TestImage, derive_layout};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::workspace_binary;
use clip_integration::{TestDir, require_root, run};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn count_dir(path: String) -> u64 {
    std::fs::read_dir(path).map_or(0, |d| d.count() as u64)
}

#[test]
fn twenty_containers_from_four_images_start_at_once() -> Result<()> {
    require_root();
    let td = TestDir::new("load")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let busybox = TestImage::Busybox.layout()?;
    let python = TestImage::Python.layout()?;
    let images = [
        (busybox.clone(), "busybox", "load/busybox", "sh -c 'echo ok-busybox'", "ok-busybox"),
        (python.clone(), "pyapp", "load/python", "python3 -c 'print(\"ok-python\")'", "ok-python"),
        (
            derive_layout(&busybox, "busybox", &td.path().join("bb-variant"), "busybox variant\n")?,
            "busybox",
            "load/busybox-variant",
            "cat /variant.txt",
            "busybox variant",
        ),
        (
            derive_layout(&python, "pyapp", &td.path().join("py-variant"), "python variant\n")?,
            "pyapp",
            "load/python-variant",
            "sh -c 'cat /variant.txt; python3 -c \"import json\"'",
            "python variant",
        ),
    ];
    let mut refs = Vec::new();
    for (layout, tag, repo, _, _) in &images {
        let r = reg.push_layout(layout, tag, repo, "latest")?;
        run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &r]))?;
        refs.push(r);
    }
    let (snap, ctrd) = hosts_stack(&td, &reg, clip_config::SnapshotterConfig::default())?;
    let pid = snap.pid();
    let rss_before = proc_status_kb(pid, "VmRSS:");

    let (peak_threads, peak_fds, done) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let sampler = {
        let (t, f, d) = (peak_threads.clone(), peak_fds.clone(), done.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                t.fetch_max(count_dir(format!("/proc/{pid}/task")), Ordering::Relaxed);
                f.fetch_max(count_dir(format!("/proc/{pid}/fd")), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started = Instant::now();
    // Four pulls at once, then twenty containers at once.
    let handles: Vec<_> = refs
        .iter()
        .cloned()
        .map(|r| {
            let sock = ctrd.socket().to_path_buf();
            std::thread::spawn(move || -> Result<std::process::Output> {
                Ok(Command::new(workspace_binary("clip-snapshotter")?)
                    .args(["pull", "--plain-http", "-n", "t", "--containerd-address"])
                    .arg(&sock)
                    .arg(&r)
                    .output()?)
            })
        })
        .collect();
    for h in handles {
        let out = h.join().map_err(|_| anyhow::anyhow!("pull thread panicked"))??;
        assert!(out.status.success(), "pull: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pulled = started.elapsed();
    let mut runs = Vec::new();
    for n in 0..20 {
        let (_, _, _, cmd, want) = &images[n % 4];
        let mut c = ctrd.ctr("t");
        c.args(["run", "--rm", "--snapshotter", "clip", &refs[n % 4], &format!("load-{n}"), "sh", "-c", cmd]);
        let want = want.to_string();
        runs.push(std::thread::spawn(move || -> Result<(String, String, Duration)> {
            let t = Instant::now();
            let out = c.output()?;
            anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            Ok((String::from_utf8_lossy(&out.stdout).trim().to_string(), want, t.elapsed()))
        }));
    }
    let mut slowest = Duration::ZERO;
    for r in runs {
        let (got, want, took) = r.join().map_err(|_| anyhow::anyhow!("run thread panicked"))?.context("container")?;
        assert!(got.contains(&want), "{got:?} lacks {want:?}");
        slowest = slowest.max(took);
    }
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let peak_rss = proc_status_kb(pid, "VmHWM:");
    let threads = peak_threads.load(Ordering::Relaxed);
    let fds = peak_fds.load(Ordering::Relaxed);
    let mounts = td.lazy_layers();
    eprintln!(
        "4 images pulled at once in {:.2} s; 20 containers ran at once, slowest {:.2} s, all {:.2} s; \
         {mounts} lazy layers mounted; daemon peak RSS {} MiB (idle {} MiB), peak threads {threads}, peak open fds {fds}",
        pulled.as_secs_f64(),
        slowest.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        peak_rss / 1024,
        rss_before / 1024
    );
    assert!(snap.log().lines().all(|l| !l.contains("panicked")));
    // Bounded: a few FUSE threads per mounted layer plus the runtime's pools.
    assert!(threads < 64 + 8 * mounts as u64, "{threads} threads for {mounts} mounts");
    assert!(fds < 1024, "{fds} open files");
    // Distinct layer chains: busybox 1 + its variant's top 1 + python 4 + its variant's top 1.
    // Concurrent pulls of images sharing layers must not mount a layer twice.
    assert_eq!(mounts, 7, "lazy layers mounted");
    assert!(peak_rss < 200 * 1024, "peak RSS {} MiB", peak_rss / 1024);
    ctrd.purge()?;
    Ok(())
}
