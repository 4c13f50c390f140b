//! A real one-node Kubernetes cluster (issue 28, first part): etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kubelet built from the Go module proxy
//! (`integration/kube`), kubelet on containerd 2.x whose CRI uses clip. A Deployment created with
//! `kubectl` starts its pod lazily: the image's layers are FUSE mounts, a fraction of the image is
//! fetched, the pod's log is its output; deleting the Deployment leaves no mount behind.

use anyhow::{Context, Result};
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions, Flavor};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::kube::{ControlPlane, kubectl_stdout};
use clip_integration::kubelet::{Kubelet, NODE, pod_tolerations};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run, wait_until};
use std::process::Command;
use std::time::Duration;

#[test]
fn a_deployment_created_with_kubectl_starts_lazily_through_clip() -> Result<()> {
    require_root();
    let td = TestDir::new("kubernetes")?;
    let plain = Registry::start_plain(&td, "plain")?;
    plain.push_layout(&TestImage::Busybox.layout()?, "pause", "testbed/pause", "latest")?;
    let python = TestImage::Python.layout()?;
    let reference = plain.push_layout(&python, "pyapp", "testbed/python", "latest")?;
    let image_bytes: u64 = layout_layers(&python, "pyapp")?.iter().map(|(_, _, s)| s).sum();
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &reference]))?;

    let plane = ControlPlane::start(&td)?;
    let mut config = lazy_config(false);
    config.containerd_address = Containerd::socket_in(&td);
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions {
            flavor: Flavor::V2,
            clip_socket: Some(snap.socket().to_path_buf()),
            sandbox_image: Some(format!("{}/testbed/pause:latest", plain.host())),
            ..Default::default()
        },
    )?;
    let kubelet = Kubelet::start(&td, &plane, ctrd.socket(), None)?;
    let nodes = kubectl_stdout(&mut plane.kubectl(&["get", "nodes", "-o", "name"]))?;
    assert_eq!(nodes.trim(), format!("node/{NODE}"));

    let before = plain.blob_bytes_served();
    let manifest = td.path().join("deployment.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: pyapp, namespace: default}}\nspec:\n  replicas: 1\n\
             \x20 selector: {{matchLabels: {{app: pyapp}}}}\n  template:\n    metadata: {{labels: {{app: pyapp}}}}\n    spec:\n\
             \x20     hostNetwork: true\n      automountServiceAccountToken: false\n      {tolerations}\n\
             \x20     containers:\n      - name: app\n        image: {reference}\n\
             \x20       command: [python3, -c, \"import numpy, time; print('numpy', numpy.__version__, flush=True); time.sleep(3600)\"]\n",
            tolerations = pod_tolerations()
        ),
    )?;
    kubectl_stdout(plane.kubectl(&["apply", "-f"]).arg(&manifest))?;
    let available = wait_until(Duration::from_secs(240), || {
        plane
            .kubectl(&["get", "deployment", "pyapp", "-o", "jsonpath={.status.availableReplicas}"])
            .output()
            .is_ok_and(|o| o.stdout == b"1")
    });
    let describe = || {
        let pods =
            plane.kubectl(&["describe", "pods"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        format!("{}\n{}\n{}", pods.unwrap_or_default(), clip_integration::kube::tail(&kubelet.log(), 40), plane.logs())
    };
    assert!(available, "the deployment did not become available:\n{}", describe());
    let pod = kubectl_stdout(&mut plane.kubectl(&[
        "get",
        "pods",
        "-l",
        "app=pyapp",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]))?;
    let mut log = String::new();
    let printed = wait_until(Duration::from_secs(120), || {
        log = plane
            .kubectl(&["logs", &pod])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        log.starts_with("numpy ")
    });
    assert!(printed, "the pod printed {log:?}:\n{}", describe());
    let fetched = plain.blob_bytes_served() - before;
    eprintln!(
        "kubectl apply -> pod running `import numpy`: {fetched} of {image_bytes} compressed bytes fetched ({:.1}%), {} FUSE layers",
        fetched as f64 * 100.0 / image_bytes as f64,
        td.lazy_layers()
    );
    assert_eq!(td.lazy_layers(), 4, "the python image's four layers are served lazily\n{}", snap.log());
    assert!(fetched < image_bytes / 2, "{fetched} of {image_bytes}");

    kubectl_stdout(&mut plane.kubectl(&["delete", "deployment", "pyapp", "--wait=true"]))?;
    let gone = wait_until(Duration::from_secs(120), || {
        plane.kubectl(&["get", "pods", "-o", "name"]).output().is_ok_and(|o| o.status.success() && o.stdout.is_empty())
    });
    assert!(gone, "pods left:\n{}", describe());
    drop(kubelet);
    ctrd.purge().context("containerd purge")?;
    let unmounted = wait_until(Duration::from_secs(60), || td.lazy_layers() == 0);
    assert!(unmounted, "{} FUSE layers left after the pod and its images went", td.lazy_layers());
    Ok(())
}
