//! A real one-node Kubernetes cluster (issue 28): etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kubelet built from the Go module proxy (`integration/kube`), kubelet on
//! containerd 2.x whose CRI uses clip. Each test makes its own cluster (one at a time: kubelet's
//! cgroups are the machine's), creates its objects with `kubectl`, and ends with a clean teardown
//! (no pod, no FUSE mount left).
//!
//! - a Deployment starts its pod lazily: the image's layers are FUSE mounts, a fraction of the
//!   image is fetched, the pod's log is its output; CRI's `ImageFsInfo` (what kubelet's image
//!   GC reads) counts what the lazy layers hold; removing the image through CRI (what kubelet's
//!   image GC calls) takes its FUSE mounts and span caches with it;
//! - a user-namespaced pod (`hostUsers: false`) starts lazily too: containerd idmaps clip's FUSE
//!   layers (no chowned copy of the root file system), the pod sees its files owned by its own
//!   root, and what it writes is owned by the pod's host ids on the node.

use anyhow::{Context, Result};
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions, Flavor};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::kube::{ControlPlane, kubectl_stdout, tail};
use clip_integration::kubelet::{Kubelet, NODE, pod_tolerations};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run, wait_until};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// One cluster at a time in this process.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// The python test image, indexed, in a plain registry with a pause image.
struct Images {
    registry: Registry,
    python: String,
    python_bytes: u64,
}

fn images(td: &TestDir) -> Result<Images> {
    let registry = Registry::start_plain(td, "plain")?;
    registry.push_layout(&TestImage::Busybox.layout()?, "pause", "testbed/pause", "latest")?;
    let layout = TestImage::Python.layout()?;
    let python = registry.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let python_bytes = layout_layers(&layout, "pyapp")?.iter().map(|(_, _, s)| s).sum();
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &python]))?;
    Ok(Images { registry, python, python_bytes })
}

/// The control plane and the node: clip, containerd 2.x with CRI on clip, kubelet. Dropped in
/// field order: kubelet first.
struct Node {
    kubelet: Option<Kubelet>,
    ctrd: Containerd,
    snap: ClipSnapshotter,
    plane: ControlPlane,
    _one: MutexGuard<'static, ()>,
}

impl Node {
    fn start(td: &TestDir, images: &Images, pod_network: bool) -> Result<Self> {
        let one = ONE_CLUSTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let plane = ControlPlane::start(td)?;
        let mut config = lazy_config(false);
        config.containerd_address = Containerd::socket_in(td);
        let snap = ClipSnapshotter::start_configured(td, "clip", &config, &[])?;
        let ctrd = Containerd::start(
            td,
            &ContainerdOptions {
                flavor: Flavor::V2,
                clip_socket: Some(snap.socket().to_path_buf()),
                clip_root: Some(snap.root().to_path_buf()),
                sandbox_image: Some(format!("{}/testbed/pause:latest", images.registry.host())),
                pod_network,
                ..Default::default()
            },
        )?;
        let kubelet = Kubelet::start(td, &plane, ctrd.socket(), None)?;
        let nodes = kubectl_stdout(&mut plane.kubectl(&["get", "nodes", "-o", "name"]))?;
        assert_eq!(nodes.trim(), format!("node/{NODE}"));
        // Pods are admitted once the controller manager made the namespace's service account.
        let accounts = wait_until(Duration::from_secs(60), || {
            plane.kubectl(&["get", "serviceaccount", "default"]).output().is_ok_and(|o| o.status.success())
        });
        assert!(accounts, "no default service account:\n{}", plane.logs());
        Ok(Self { kubelet: Some(kubelet), ctrd, snap, plane, _one: one })
    }

    fn apply(&self, td: &TestDir, name: &str, yaml: &str) -> Result<()> {
        let manifest = td.path().join(format!("{name}.yaml"));
        std::fs::write(&manifest, yaml)?;
        kubectl_stdout(self.plane.kubectl(&["apply", "-f"]).arg(&manifest)).map(drop)
    }

    /// The pods, kubelet's and the control plane's logs, for a failure message.
    fn describe(&self) -> String {
        let pods = self
            .plane
            .kubectl(&["describe", "pods"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let kubelet = self.kubelet.as_ref().map(|k| tail(&k.log(), 40)).unwrap_or_default();
        format!("{pods}\n{kubelet}\n{}", self.plane.logs())
    }

    /// Waits until pod `pod` logged a line starting with `prefix`; returns the log.
    fn log_of(&self, pod: &str, prefix: &str) -> String {
        let mut log = String::new();
        let printed = wait_until(Duration::from_secs(240), || {
            log = self
                .plane
                .kubectl(&["logs", pod])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            log.starts_with(prefix)
        });
        assert!(printed, "pod {pod} printed {log:?}:\n{}", self.describe());
        log
    }

    /// Deletes every pod-making object, then kubelet, then containerd's images: no FUSE layer
    /// may be left.
    fn teardown(mut self, td: &TestDir, objects: &[&str]) -> Result<()> {
        for object in objects {
            kubectl_stdout(&mut self.plane.kubectl(&["delete", object, "--wait=true"]))?;
        }
        let gone = wait_until(Duration::from_secs(120), || {
            self.plane
                .kubectl(&["get", "pods", "-o", "name"])
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.is_empty())
        });
        assert!(gone, "pods left:\n{}", self.describe());
        drop(self.kubelet.take());
        self.ctrd.purge().context("containerd purge")?;
        let unmounted = wait_until(Duration::from_secs(60), || td.lazy_layers() == 0);
        assert!(unmounted, "{} FUSE layers left after the pods and their images went", td.lazy_layers());
        Ok(())
    }
}

#[test]
fn a_deployment_created_with_kubectl_starts_lazily_through_clip() -> Result<()> {
    require_root();
    let td = TestDir::new("kubernetes")?;
    let images = images(&td)?;
    let node = Node::start(&td, &images, false)?;
    let before = images.registry.blob_bytes_served();
    node.apply(
        &td,
        "deployment",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: pyapp, namespace: default}}\nspec:\n  replicas: 1\n\
             \x20 selector: {{matchLabels: {{app: pyapp}}}}\n  template:\n    metadata: {{labels: {{app: pyapp}}}}\n    spec:\n\
             \x20     hostNetwork: true\n      automountServiceAccountToken: false\n      {tolerations}\n\
             \x20     containers:\n      - name: app\n        image: {image}\n\
             \x20       command: [python3, -c, \"import numpy, time; print('numpy', numpy.__version__, flush=True); time.sleep(3600)\"]\n",
            tolerations = pod_tolerations(),
            image = images.python,
        ),
    )?;
    let available = wait_until(Duration::from_secs(240), || {
        node.plane
            .kubectl(&["get", "deployment", "pyapp", "-o", "jsonpath={.status.availableReplicas}"])
            .output()
            .is_ok_and(|o| o.stdout == b"1")
    });
    assert!(available, "the deployment did not become available:\n{}", node.describe());
    let pod = kubectl_stdout(&mut node.plane.kubectl(&[
        "get",
        "pods",
        "-l",
        "app=pyapp",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]))?;
    node.log_of(&pod, "numpy ");
    let fetched = images.registry.blob_bytes_served() - before;
    eprintln!(
        "kubectl apply -> pod running `import numpy`: {fetched} of {} compressed bytes fetched ({:.1}%), {} FUSE layers",
        images.python_bytes,
        fetched as f64 * 100.0 / images.python_bytes as f64,
        td.lazy_layers()
    );
    assert_eq!(td.lazy_layers(), 4, "the python image's four layers are served lazily\n{}", node.snap.log());
    assert!(fetched < images.python_bytes / 2, "{fetched} of {}", images.python_bytes);

    // What kubelet's image GC and eviction manager read: the image file system CRI reports
    // (clip's root) counts the bytes the lazy layers hold.
    let spans = node.snap.root().join("spans");
    let held = bytes_below(&spans);
    assert!(held > fetched, "the span cache holds the inflated spans: {held} bytes");
    let mut reported = 0;
    let counted = wait_until(Duration::from_secs(90), || {
        reported = image_fs_used(&node, node.snap.root()).unwrap_or(0);
        reported >= held
    });
    eprintln!("image fs: span cache {held} bytes; CRI ImageFsInfo {reported} bytes");
    assert!(counted, "ImageFsInfo counts the {held} cached bytes: {reported}\n{}", node.describe());

    // Removing the unused image through CRI, as kubelet's image GC does, takes its FUSE mounts
    // and span caches with it.
    kubectl_stdout(&mut node.plane.kubectl(&["delete", "deployment/pyapp", "--wait=true"]))?;
    let no_pods = wait_until(Duration::from_secs(120), || {
        node.plane
            .kubectl(&["get", "pods", "-o", "name"])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.is_empty())
    });
    assert!(no_pods, "{}", node.describe());
    let unused = wait_until(Duration::from_secs(60), || {
        crictl(&node, &["rmi", &images.python]).is_ok_and(|o| o.status.success())
    });
    assert!(unused, "the image could not be removed:\n{}", node.describe());
    let collected = wait_until(Duration::from_secs(120), || td.lazy_layers() == 0 && bytes_below(&spans) == 0);
    assert!(collected, "after the image went: {} FUSE layers, {} cached bytes", td.lazy_layers(), bytes_below(&spans));
    node.teardown(&td, &[])
}

/// Bytes of the files below `dir`.
fn bytes_below(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// crictl against the node's containerd.
fn crictl(node: &Node, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(clip_integration::gotools::crictl()?)
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", node.ctrd.socket().display()))
        .args(args)
        .output()?)
}

/// `usedBytes` of the image file system at `mountpoint` in containerd's CRI `ImageFsInfo`.
fn image_fs_used(node: &Node, mountpoint: &std::path::Path) -> Result<u64> {
    let out = crictl(node, &["imagefsinfo", "-o", "json"])?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let filesystems = info["status"]["imageFilesystems"].as_array().context("imageFilesystems")?;
    let fs = filesystems
        .iter()
        .find(|f| f["fsId"]["mountpoint"].as_str() == mountpoint.to_str())
        .with_context(|| format!("no image file system at {}: {info}", mountpoint.display()))?;
    fs["usedBytes"]["value"].as_str().context("usedBytes")?.parse().context("usedBytes")
}
