//! The CRI path as kubelet and crictl use it, with a CRI client standing in for crictl:
//! containerd's CRI plugin with `snapshotter = "clip"` serves images lazily (a) from a plain
//! registry with only the standard `cri.*` labels; (b) from a TLS registry with basic auth,
//! the pull secret given to clip's CRI image service proxy; (c) from the build registry with no
//! credentials in the request at all: the proxy and the snapshotter mint from the config.

use anyhow::{Context, Result};
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::cri::CriClient;
use clip_integration::images::{TestImage, derive_layout};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run};
use std::process::Command;
use std::time::Duration;

const OTHER_PASS: &str = "Pull-Secret-7c41e";
const BUILD_PASS: &str = "Build-LongTerm-93b2";

#[test]
fn kubelet_style_pods_start_lazily_with_every_credential_path() -> Result<()> {
    require_root();
    let td = TestDir::new("cri")?;
    let plain = Registry::start_plain(&td, "plain")?;
    let other = Registry::start_tls_auth_with(&td, "other", "reader", OTHER_PASS)?;
    let build = Registry::start_tls_auth_with(&td, "build", "builder", BUILD_PASS)?;
    let busybox = TestImage::Busybox.layout()?;
    let python = TestImage::Python.layout()?;
    plain.push_layout(&busybox, "pause", "testbed/pause", "latest")?;
    let python_ref = plain.push_layout(&python, "pyapp", "testbed/python", "latest")?;
    // Distinct top layers, so each scenario mounts layers of its own.
    let other_layout = derive_layout(&python, "pyapp", &td.path().join("other-layout"), "from the other registry\n")?;
    let other_ref = other.push_layout(&other_layout, "pyapp", "team/app", "v1")?;
    let build_layout = derive_layout(&python, "pyapp", &td.path().join("build-layout"), "from the build registry\n")?;
    let build_ref = build.push_layout(&build_layout, "pyapp", "userimages/app", "v1")?;

    // Snapshotter and containerd trust and reach all three registries.
    let snap_hosts = td.sub("snap-certs.d")?;
    let creds_dir = td.sub("secrets")?;
    let password_file = creds_dir.join("build-password");
    std::fs::write(&password_file, BUILD_PASS)?;
    for (reg, user, pass, reference) in [
        (&plain, "", "", &python_ref),
        (&other, "reader", OTHER_PASS, &other_ref),
        (&build, "builder", BUILD_PASS, &build_ref),
    ] {
        reg.write_hosts_toml(&snap_hosts)?;
        let mut index = Command::new(workspace_binary("clip-builder")?);
        index.args(["index", "--hosts-dir"]).arg(&snap_hosts);
        if !user.is_empty() {
            let f = creds_dir.join(format!("{user}.creds"));
            std::fs::write(&f, format!("{user}:{pass}"))?;
            index.arg("--creds-file").arg(&f);
        }
        run(index.arg(reference))?;
    }
    let build_ca = build.tls().context("tls")?.ca_cert.clone();
    let cri_socket = td.path().join("cri.sock");
    let ctrd_dir = td.path().join("containerd");
    let mut config = lazy_config(true);
    config.registry.hosts_dir = Some(snap_hosts.clone());
    config.cri.image_service_address = Some(cri_socket.clone());
    config.cri.containerd_address = Some(ctrd_dir.join("containerd.sock"));
    // Pods without a pull secret may pull build registry images (off by default: docs/kubernetes.md).
    config.cri.mint_for_pulls_without_secret = true;
    config.build_registry = Some(clip_config::BuildRegistry {
        registry: build.host().to_string(),
        repository: "userimages".into(),
        insecure: false,
        ca_file: Some(build_ca.clone()),
        credentials: Some(clip_config::LongTermCredentials::Basic {
            username: "builder".into(),
            password: None,
            password_file: Some(password_file.clone()),
        }),
    });
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions {
            clip_socket: Some(snap.socket().to_path_buf()),
            sandbox_image: Some(format!("{}/testbed/pause:latest", plain.host())),
            ..Default::default()
        },
    )?;
    for reg in [&plain, &other, &build] {
        reg.write_hosts_toml(ctrd.hosts_dir())?;
    }
    let logs = td.sub("pod-logs")?;
    let rt = tokio::runtime::Runtime::new()?;
    let scenarios: [(&str, &str, &std::path::Path, Option<(&str, &str)>, &str); 3] = [
        ("plain", &python_ref, ctrd.socket(), None, "import numpy; print('numpy', numpy.__version__)"),
        (
            "pull-secret",
            &other_ref,
            &cri_socket,
            Some(("reader", OTHER_PASS)),
            "print(open('/variant.txt').read().strip())",
        ),
        ("build-registry", &build_ref, &cri_socket, None, "print(open('/variant.txt').read().strip())"),
    ];
    for (name, image, image_service, auth, script) in scenarios {
        let before = td.lazy_layers();
        let (log, exec) = rt.block_on(async {
            let mut c = CriClient::connect(ctrd.socket(), image_service, &logs).await?;
            let image_ref = c.pull(image, auth).await.with_context(|| format!("{name}: pull {image}"))?;
            assert!(image_ref.starts_with("sha256:"), "{image_ref}");
            let pod = c.run_pod(name).await?;
            let id = c.start(&pod, name, "main", image, &["python3", "-c", script]).await?;
            let done = c.wait(&id, name, "main", Duration::from_secs(120)).await?;
            assert_eq!(done.exit_code, 0, "{name}: {}", done.log);
            // A second container stays up for ExecSync.
            let sleeper = c.start(&pod, name, "sleeper", image, &["sleep", "600"]).await?;
            let exec = c.exec(&sleeper, &["python3", "-c", "import json; print('exec ok')"]).await?;
            c.teardown(&pod).await?;
            anyhow::Ok((done.log, exec))
        })?;
        let mounted = td.lazy_layers() - before.min(td.lazy_layers());
        eprintln!("{name}: container log {log:?}; exec {exec:?}; {mounted} new lazy layers");
        match name {
            "plain" => assert!(log.starts_with("numpy "), "{log}"),
            "pull-secret" => assert_eq!(log, "from the other registry"),
            _ => assert_eq!(log, "from the build registry"),
        }
        assert_eq!(exec, (0, "exec ok\n".to_string()));
        assert!(mounted >= 1, "{name}: no layer was served lazily\n{}", snap.log());
        // Images go (and, through containerd's GC, their snapshots), so the next scenario
        // mounts its layers afresh with its own credentials.
        ctrd.purge()?;
    }
    let log = snap.log();
    assert!(log.contains("using the pull secret kubelet passed to PullImage"), "{log}");
    assert!(log.contains("passing containerd a build registry token for the pull"), "{log}");
    assert!(log.contains("using a build registry token minted from the configured long-term credentials"), "{log}");
    for secret in [OTHER_PASS, BUILD_PASS] {
        assert!(!log.contains(secret), "a secret in the snapshotter log");
        assert!(!ctrd.log().contains(secret), "a secret in containerd's log");
    }
    Ok(())
}
