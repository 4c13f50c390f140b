//! The test bed itself: registries, containerd with its own overlayfs snapshotter, the slow link.

use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::netns::SlowLink;
use clip_integration::registry::Registry;
use clip_integration::{TestDir, require_root, run, run_stdout};
use std::process::Command;

#[test]
fn plain_registry_serves_pushed_blobs_and_logs_bytes() -> anyhow::Result<()> {
    require_root();
    let td = TestDir::new("plainreg")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    let (digest, _, size) = layout_layers(&layout, "busybox")?.remove(0);
    let url = format!("{}/v2/testbed/busybox/blobs/{digest}", reg.base_url());
    let body = run(Command::new("curl").args(["-sfL", &url]))?.stdout;
    assert_eq!(body.len() as u64, size);
    // A Range read is answered with exactly the range.
    let part = run(Command::new("curl").args(["-sfL", "-r", "100-199", &url]))?.stdout;
    assert_eq!(part, body[100..200]);
    let log = reg.access_log();
    let gets: Vec<_> = log.iter().filter(|e| e.method == "GET" && e.path.ends_with(&digest)).collect();
    assert!(gets.iter().any(|e| e.bytes == size && e.status == 200), "{gets:?}");
    assert!(gets.iter().any(|e| e.bytes == 100 && e.status == 206), "{gets:?}");
    Ok(())
}

#[test]
fn tls_registry_requires_basic_auth() -> anyhow::Result<()> {
    require_root();
    let td = TestDir::new("tlsreg")?;
    let reg = Registry::start_tls_auth(&td, "auth")?;
    let tls = reg.tls().expect("tls registry").clone();
    let status = |creds: Option<&str>| -> anyhow::Result<String> {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"]).arg(&tls.ca_cert);
        if let Some(u) = creds {
            c.args(["-u", u]);
        }
        c.arg(format!("{}/v2/", reg.base_url()));
        run_stdout(&mut c)
    };
    assert_eq!(status(None)?, "401");
    assert_eq!(status(Some("testuser:wrong"))?, "401");
    assert_eq!(status(Some(&format!("{}:{}", tls.username, tls.password)))?, "200");
    // skopeo with an authfile and the CA pushes.
    let layout = TestImage::Busybox.layout()?;
    let r = reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    assert!(r.starts_with("127.0.0.1:"));
    assert!(reg.access_log().iter().any(|e| e.method == "PUT" && e.path.contains("/manifests/latest")));
    Ok(())
}

#[test]
fn containerd_pulls_and_runs_busybox_with_overlayfs() -> anyhow::Result<()> {
    require_root();
    let td = TestDir::new("ctrd")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let image = reg.push_layout(&TestImage::Busybox.layout()?, "busybox", "testbed/busybox", "latest")?;
    let ctrd = Containerd::start(&td, &ContainerdOptions::default())?;
    reg.write_hosts_toml(ctrd.hosts_dir())?;
    let hosts = ctrd.hosts_dir().to_string_lossy().into_owned();
    ctrd.ctr_run("t1", &["images", "pull", "--hosts-dir", &hosts, &image])?;
    let out = run_stdout(ctrd.ctr("t1").args(["run", "--rm", "--snapshotter", "overlayfs", &image, "bb1"]).args([
        "sh",
        "-c",
        "echo hello-from-busybox; ls /bin/sh; id -u",
    ]))?;
    assert!(out.contains("hello-from-busybox"), "{out}");
    assert!(out.contains("/bin/sh"), "{out}");
    assert!(out.lines().any(|l| l.trim() == "0"), "{out}");
    // The whole layer was downloaded (this is the baseline clip must beat).
    let (_, _, size) = layout_layers(&TestImage::Busybox.layout()?, "busybox")?.remove(0);
    assert!(reg.blob_bytes_served() >= size);
    let snaps = run_stdout(ctrd.ctr("t1").args(["snapshots", "--snapshotter", "overlayfs", "ls"]))?;
    assert!(snaps.lines().count() >= 2, "{snaps}");
    Ok(())
}

#[test]
fn slow_link_shapes_traffic_to_a_registry_in_its_namespace() -> anyhow::Result<()> {
    require_root();
    let td = TestDir::new("slow")?;
    let link = SlowLink::new(100, 20)?;
    let qdisc = link.host_qdisc()?;
    assert!(qdisc.contains("tbf") && qdisc.contains("rate 100Mbit"), "{qdisc}");
    let reg = Registry::start_wrapped(&td, "slow", None, link.ns_ip(), &link.wrap())?;
    assert!(reg.host().starts_with(link.ns_ip()));
    reg.push_layout(&TestImage::Busybox.layout()?, "busybox", "testbed/busybox", "latest")?;
    let port: u16 = reg.host().rsplit(':').next().unwrap_or_default().parse()?;
    let proxy = link.proxy_to(port)?;
    // Through the delaying proxy, the registry answers, and the bytes arrive intact.
    let image = format!("{}/testbed/busybox:latest", proxy.addr());
    let out = run_stdout(Command::new("skopeo").args(["inspect", "--tls-verify=false", &format!("docker://{image}")]))?;
    assert!(out.contains("\"Layers\""), "{out}");
    let (digest, _, size) = layout_layers(&TestImage::Busybox.layout()?, "busybox")?.remove(0);
    let url = format!("http://{}/v2/testbed/busybox/blobs/{digest}", proxy.addr());
    let body = run(Command::new("curl").args(["-sfL", &url]))?.stdout;
    assert_eq!(body.len() as u64, size);
    drop(proxy);
    drop(reg);
    Ok(())
}

#[test]
fn python_image_has_four_gzip_layers() -> anyhow::Result<()> {
    require_root();
    let layers = layout_layers(&TestImage::Python.layout()?, "pyapp")?;
    assert_eq!(layers.len(), 4, "{layers:?}");
    assert!(layers.iter().all(|(_, mt, _)| mt.ends_with("tar+gzip")), "{layers:?}");
    let total: u64 = layers.iter().map(|l| l.2).sum();
    assert!(total > 40 << 20, "python image unexpectedly small: {total} bytes");
    Ok(())
}
