//! A real one-node Kubernetes cluster (issue 28): etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kubelet built from the Go module proxy (`integration/kube`), kubelet on
//! containerd 2.x whose CRI uses clip. Each test makes its own cluster (one at a time: kubelet's
//! cgroups are the machine's), creates its objects with `kubectl`, and ends with a clean teardown
//! (no pod, no FUSE mount left).
//!
//! - a Deployment starts its pod lazily: the image's layers are FUSE mounts, a fraction of the
//!   image is fetched, the pod's log is its output;
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
    node.teardown(&td, &["deployment/pyapp"])
}

#[test]
fn a_user_namespaced_pod_starts_lazily_on_idmapped_layers() -> Result<()> {
    require_root();
    let td = TestDir::new("kubernetes-userns")?;
    let images = images(&td)?;
    let node = Node::start(&td, &images, true)?;
    let before = images.registry.blob_bytes_served();
    // The pod prints the owners it sees (the top of its root file system, files of two layers,
    // a file it made) and its uid map.
    let script = "import os, numpy, time\n\
                  own = lambda p: '%d:%d' % (os.lstat(p).st_uid, os.lstat(p).st_gid)\n\
                  open('/made-in-pod', 'w').write('x')\n\
                  print('owners', own('/'), own('/etc/passwd'), own('/usr/bin/python3'), own('/app/hello.py'), own('/var/mail'), \
                  own('/made-in-pod'), \
                  'uid_map', ' '.join(open('/proc/self/uid_map').read().split()), 'numpy', numpy.__version__, flush=True)\n\
                  time.sleep(3600)\n";
    node.apply(
        &td,
        "pod",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: userns, namespace: default}}\nspec:\n\
             \x20 hostUsers: false\n  automountServiceAccountToken: false\n  restartPolicy: Never\n  {tolerations}\n\
             \x20 containers:\n  - name: app\n    image: {image}\n    command: [python3, -c, {script:?}]\n",
            tolerations = pod_tolerations(),
            image = images.python,
        ),
    )?;
    let log = node.log_of("userns", "owners ");
    let fetched = images.registry.blob_bytes_served() - before;
    eprintln!(
        "user-namespaced pod: {log:?}; {fetched} of {} compressed bytes fetched ({:.1}%), {} FUSE layers",
        images.python_bytes,
        fetched as f64 * 100.0 / images.python_bytes as f64,
        td.lazy_layers()
    );
    let fields: Vec<&str> = log.split_whitespace().collect();
    // owners <6 uid:gid>, uid_map <inside> <outside> <count>, numpy <version>; /var/mail is
    // root:mail (gid 8) in Debian's base.
    assert_eq!(&fields[1..7], ["0:0", "0:0", "0:0", "0:0", "0:8", "0:0"], "owners as on overlayfs: {log}");
    assert_eq!((fields[7], fields[8]), ("uid_map", "0"), "{log}");
    let host_root: u32 = fields[9].parse().context("uid_map")?;
    assert!(host_root >= 65536, "the pod runs in a user namespace: {log}");
    assert_eq!(td.lazy_layers(), 4, "the python image's four layers are served lazily\n{}", node.snap.log());
    assert!(fetched < images.python_bytes / 2, "no chowned copy of the image: {fetched} of {}", images.python_bytes);
    // containerd made no remapped copy of the image's snapshots (its fallback without remap-ids).
    let snapshots = node.ctrd.ctr("k8s.io").args(["snapshots", "--snapshotter", "clip", "ls"]).output()?;
    assert!(!String::from_utf8_lossy(&snapshots.stdout).contains("remap"), "{snapshots:?}");
    // On the node, what the pod wrote is owned by the pod's host ids.
    let made = std::fs::read_dir(node.snap.root().join("snapshots"))?
        .flatten()
        .map(|d| d.path().join("fs/made-in-pod"))
        .find(|p| p.exists())
        .context("the pod's upper dir")?;
    let meta = std::fs::metadata(&made)?;
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), host_root, "{}", made.display());
    node.teardown(&td, &["pod/userns"])
}
