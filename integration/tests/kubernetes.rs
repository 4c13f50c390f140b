//! A real one-node Kubernetes cluster (issue 28): etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kubelet built from the Go module proxy (`integration/kube`), kubelet on
//! containerd 2.x whose CRI uses clip. Each test makes its own cluster (one at a time: kubelet's
//! cgroups are the machine's), creates its objects with `kubectl`, and ends with a clean teardown
//! (no pod, no FUSE mount left).
//!
//! - a Deployment starts its pod lazily: the image's layers are FUSE mounts, a fraction of the
//!   image is fetched, the pod's log is its output; CRI's `ImageFsInfo` and kubelet's stats
//!   summary count what the lazy layers hold; kubelet's image GC (forced by an image file system
//!   threshold) removes the image, and its FUSE mounts and span caches go with it;
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
use clip_registry::credentials::Source;
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

/// The node's `hosts.toml` directory (containerd's and clip's).
fn hosts_dir(td: &TestDir) -> Result<std::path::PathBuf> {
    let dir = td.path().join("containerd").join("certs.d");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The shipped RBAC for the secret keychain, applied; a kubeconfig with a token of its service
/// account (what the DaemonSet's pod has in-cluster).
fn keychain_kubeconfig(td: &TestDir, plane: &ControlPlane) -> Result<std::path::PathBuf> {
    let rbac = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/kubernetes/secret-keychain-rbac.yaml");
    kubectl_stdout(&mut plane.kubectl(&["apply", "-f", rbac]))?;
    let token = kubectl_stdout(&mut plane.kubectl(&["create", "token", "clip-snapshotter", "-n", "kube-system"]))?;
    let kubeconfig = td.path().join("keychain.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\n\
             users:\n- name: clip\n  user: {{token: \"{}\"}}\ncontexts:\n- name: clip\n  context: {{cluster: test, user: clip}}\n\
             current-context: clip\n",
            plane.server(),
            plane.ca().display(),
            token.trim()
        ),
    )?;
    Ok(kubeconfig)
}

/// What a test's node has besides clip and containerd.
#[derive(Default)]
struct NodeOptions {
    /// A pod network (user-namespaced pods cannot use the host's).
    pod_network: bool,
    /// kubelet pulls through clip's CRI image-service proxy, so pull credentials reach lazy
    /// reads. (Private registries' `hosts.toml` go to [`hosts_dir`] before the node starts.)
    cri_proxy: bool,
    /// clip's secret keychain, as the shipped RBAC lets its service account read secrets.
    secret_keychain: bool,
    /// More kubelet flags.
    kubelet_args: Vec<std::ffi::OsString>,
}

impl Node {
    fn start(td: &TestDir, images: &Images, opts: &NodeOptions) -> Result<Self> {
        let one = ONE_CLUSTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let plane = ControlPlane::start(td)?;
        let mut config = lazy_config(false);
        config.containerd_address = Containerd::socket_in(td);
        config.registry.hosts_dir = Some(hosts_dir(td)?);
        let cri_proxy = td.path().join("cri.sock");
        if opts.cri_proxy {
            config.cri.image_service_address = Some(cri_proxy.clone());
        }
        if opts.secret_keychain {
            config.kubernetes.secret_keychain = true;
            config.kubernetes.kubeconfig = Some(keychain_kubeconfig(td, &plane)?);
        }
        let snap = ClipSnapshotter::start_configured(td, "clip", &config, &[])?;
        let ctrd = Containerd::start(
            td,
            &ContainerdOptions {
                flavor: Flavor::V2,
                clip_socket: Some(snap.socket().to_path_buf()),
                clip_root: Some(snap.root().to_path_buf()),
                sandbox_image: Some(format!("{}/testbed/pause:latest", images.registry.host())),
                pod_network: opts.pod_network,
                ..Default::default()
            },
        )?;
        let image_service = opts.cri_proxy.then_some(cri_proxy.as_path());
        let kubelet = Kubelet::start(td, &plane, ctrd.socket(), image_service, &opts.kubelet_args)?;
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
        assert!(self.plane.pods_gone(false, Duration::from_secs(120)), "pods left:\n{}", self.describe());
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
    let node = Node::start(&td, &images, &NodeOptions::default())?;
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
    // (clip's root) counts the bytes the lazy layers hold, and so does kubelet's stats summary.
    let spans = node.snap.root().join("spans");
    let held = bytes_below(&spans);
    assert!(held > fetched, "the span cache holds the inflated spans: {held} bytes");
    let mut reported = (0, 0);
    let counted = wait_until(Duration::from_secs(90), || {
        reported = (image_fs_used(&node, node.snap.root()).unwrap_or(0), summary_image_fs_used(&node).unwrap_or(0));
        reported.0 >= held && reported.1 >= held
    });
    eprintln!(
        "image fs: span cache {held} bytes; CRI ImageFsInfo {} bytes; kubelet stats summary {} bytes",
        reported.0, reported.1
    );
    assert!(
        counted,
        "ImageFsInfo and the stats summary count the {held} cached bytes: {reported:?}\n{}",
        node.describe()
    );

    // kubelet's image GC, forced by an image file system threshold the node is over, removes
    // the unused lazy image; its FUSE mounts and span caches go with it.
    kubectl_stdout(&mut node.plane.kubectl(&["delete", "deployment/pyapp", "--wait=true"]))?;
    assert!(node.plane.pods_gone(false, Duration::from_secs(120)), "{}", node.describe());
    let mut node = node;
    let plane = &node.plane;
    node.kubelet.as_mut().context("kubelet")?.restart_with(
        plane,
        "imagefs.available: \"1%\"",
        "imagefs.available: \"99%\"",
    )?;
    let collected = wait_until(Duration::from_secs(180), || td.lazy_layers() == 0 && bytes_below(&spans) == 0);
    assert!(
        collected,
        "after kubelet's image GC: {} FUSE layers, {} cached bytes\n{}",
        td.lazy_layers(),
        bytes_below(&spans),
        node.describe()
    );
    let left = crictl(&node, &["images"])?;
    let left = String::from_utf8_lossy(&left.stdout);
    let kubelet_log = node.kubelet.as_ref().map(Kubelet::log).unwrap_or_default();
    assert!(!left.contains("testbed/python"), "kubelet's GC left the image:\n{left}\n{}", tail(&kubelet_log, 40));
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

/// `node.runtime.imageFs.usedBytes` of kubelet's stats summary, through the API server.
fn summary_image_fs_used(node: &Node) -> Result<u64> {
    let raw = kubectl_stdout(&mut node.plane.kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/nodes/{NODE}/proxy/stats/summary"),
    ]))?;
    let summary: serde_json::Value = serde_json::from_str(&raw)?;
    summary["node"]["runtime"]["imageFs"]["usedBytes"].as_u64().context("imageFs.usedBytes")
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

const SECRET_PASS: &str = "Pull-Secret-7c1e";
const PROVIDER_PASS: &str = "Provider-Token-93ab";

/// A registry with basic auth (`user`, `password`) holding the python image, indexed with the
/// same credentials; its `hosts.toml` in the node's hosts dir.
fn private_python(td: &TestDir, name: &str, user: &str, password: &str) -> Result<(Registry, String)> {
    let registry = Registry::start_tls_auth_with(td, name, user, password)?;
    let reference = registry.push_layout(&TestImage::Python.layout()?, "pyapp", "team/python", "v1")?;
    let hosts = hosts_dir(td)?;
    registry.write_hosts_toml(&hosts)?;
    let creds = td.path().join(format!("{name}-creds"));
    std::fs::write(&creds, format!("{user}:{password}"))?;
    run(Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--hosts-dir"])
        .arg(&hosts)
        .arg("--creds-file")
        .arg(&creds)
        .arg(&reference))?;
    std::fs::remove_file(&creds)?;
    Ok((registry, reference))
}

/// The pull secret `regcred` in `default` for `user`/`password` at `registry`, made from a file
/// (never on an argv). Returns its `auth` (base64 of `user:password`).
fn create_pull_secret(td: &TestDir, node: &Node, registry: &Registry, user: &str, password: &str) -> Result<String> {
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{password}"));
    let docker_config = td.path().join("dockerconfig.json");
    std::fs::write(&docker_config, format!("{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}", registry.host()))?;
    kubectl_stdout(
        node.plane
            .kubectl(&["create", "secret", "generic", "regcred", "--type=kubernetes.io/dockerconfigjson"])
            .arg(format!("--from-file=.dockerconfigjson={}", docker_config.display())),
    )?;
    std::fs::remove_file(&docker_config)?;
    Ok(auth)
}

/// A pod of `image` that imports numpy and sleeps, on the host network.
fn python_pod(name: &str, image: &str, pull_secret: Option<&str>) -> String {
    let secrets = pull_secret.map_or(String::new(), |s| format!("  imagePullSecrets: [{{name: {s}}}]\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n\
         \x20 hostNetwork: true\n  automountServiceAccountToken: false\n  restartPolicy: Never\n  {tolerations}\n{secrets}\
         \x20 containers:\n  - name: app\n    image: {image}\n\
         \x20   command: [python3, -c, \"import numpy, time; print('numpy', numpy.__version__, flush=True); time.sleep(3600)\"]\n",
        tolerations = pod_tolerations(),
    )
}

#[test]
fn private_images_start_lazily_with_pull_secrets_and_kubelets_credential_provider() -> Result<()> {
    require_root();
    let td = TestDir::new("kubernetes-private")?;
    let images = images(&td)?;
    let (secret_reg, secret_image) = private_python(&td, "secret", "puller", SECRET_PASS)?;
    let (provider_reg, provider_image) = private_python(&td, "provided", "plugin", PROVIDER_PASS)?;

    // kubelet's credential provider plugin for the second registry, configured as users do.
    let bin = td.sub("provider-bin")?;
    let plugin = bin.join("clip-test-provider");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\ncat >/dev/null\nprintf '{{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\"kind\":\"CredentialProviderResponse\",\
             \"cacheKeyType\":\"Registry\",\"cacheDuration\":\"10m\",\"auth\":{{\"{host}\":{{\"username\":\"plugin\",\"password\":\"{PROVIDER_PASS}\"}}}}}}'\n",
            host = provider_reg.host()
        ),
    )?;
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let provider_config = td.path().join("credential-providers.yaml");
    std::fs::write(
        &provider_config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n\
             - name: clip-test-provider\n  matchImages: [\"{}\"]\n  defaultCacheDuration: 10m\n\
             \x20 apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
            provider_reg.host()
        ),
    )?;
    let node = Node::start(
        &td,
        &images,
        &NodeOptions {
            cri_proxy: true,
            kubelet_args: vec![
                "--image-credential-provider-config".into(),
                provider_config.into(),
                "--image-credential-provider-bin-dir".into(),
                bin.into(),
            ],
            ..Default::default()
        },
    )?;

    let auth = create_pull_secret(&td, &node, &secret_reg, "puller", SECRET_PASS)?;

    let mut fetched = Vec::new();
    for (pod, registry, image, secret) in [
        ("with-secret", &secret_reg, &secret_image, Some("regcred")),
        ("with-provider", &provider_reg, &provider_image, None),
    ] {
        let before = registry.blob_bytes_served();
        node.apply(&td, pod, &python_pod(pod, image, secret))?;
        node.log_of(pod, "numpy ");
        let bytes = registry.blob_bytes_served() - before;
        eprintln!(
            "{pod}: {bytes} of {} compressed bytes fetched ({:.1}%), {} FUSE layers",
            images.python_bytes,
            bytes as f64 * 100.0 / images.python_bytes as f64,
            td.lazy_layers()
        );
        assert_eq!(td.lazy_layers(), 4, "{pod}: the image's four layers are served lazily\n{}", node.snap.log());
        assert!(bytes > 0 && bytes < images.python_bytes / 2, "{pod}: {bytes} of {}", images.python_bytes);
        fetched.push(bytes);
        // The next image shares the layers' chain: remove this one, and its lazy layers go.
        kubectl_stdout(&mut node.plane.kubectl(&["delete", "pod", pod, "--wait=true"]))?;
        let removed = wait_until(Duration::from_secs(60), || {
            crictl(&node, &["rmi", image]).is_ok_and(|o| o.status.success()) || !image_listed(&node, image)
        });
        assert!(removed && wait_until(Duration::from_secs(60), || td.lazy_layers() == 0), "{pod}: image left");
    }
    // No secret in any log: kubelet's, containerd's, clip's, the control plane's.
    let logs = [
        node.kubelet.as_ref().map(Kubelet::log).unwrap_or_default(),
        node.ctrd.log(),
        node.snap.log(),
        node.plane.logs(),
    ]
    .join("\n");
    for secret in [SECRET_PASS.to_string(), PROVIDER_PASS.to_string(), auth] {
        assert!(!logs.contains(&secret), "a secret is in a log");
    }
    node.teardown(&td, &[])
}

/// Whether containerd's CRI lists `image`.
fn image_listed(node: &Node, image: &str) -> bool {
    crictl(node, &["images", "-q", image]).is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

#[test]
fn a_user_namespaced_pod_starts_lazily_on_idmapped_layers() -> Result<()> {
    require_root();
    let td = TestDir::new("kubernetes-userns")?;
    let images = images(&td)?;
    let node = Node::start(&td, &images, &NodeOptions { pod_network: true, ..Default::default() })?;
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

const KEYCHAIN_PASS: &str = "Keychain-Secret-51d0";

#[test]
fn a_pull_secret_read_from_the_api_serves_lazy_reads_through_the_secret_keychain() -> Result<()> {
    require_root();
    let td = TestDir::new("kubernetes-keychain")?;
    let images = images(&td)?;
    let (registry, image) = private_python(&td, "keychain", "puller", KEYCHAIN_PASS)?;
    // kubelet talks to containerd directly: the pull secret reaches clip only from the API.
    let node = Node::start(&td, &images, &NodeOptions { secret_keychain: true, ..Default::default() })?;
    let auth = create_pull_secret(&td, &node, &registry, "puller", KEYCHAIN_PASS)?;
    let before = registry.blob_bytes_served();
    node.apply(&td, "keychain-pod", &python_pod("keychain", &image, Some("regcred")))?;
    node.log_of("keychain", "numpy ");
    let bytes = registry.blob_bytes_served() - before;
    eprintln!(
        "secret keychain: {bytes} of {} compressed bytes fetched ({:.1}%), {} FUSE layers",
        images.python_bytes,
        bytes as f64 * 100.0 / images.python_bytes as f64,
        td.lazy_layers()
    );
    let slog = node.snap.log();
    assert_eq!(td.lazy_layers(), 4, "the image's four layers are served lazily\n{slog}");
    assert!(bytes > 0 && bytes < images.python_bytes / 2, "{bytes} of {}", images.python_bytes);
    assert!(slog.contains(Source::KubernetesSecret.decision()), "{slog}");
    let logs = [node.kubelet.as_ref().map(Kubelet::log).unwrap_or_default(), node.ctrd.log(), slog, node.plane.logs()];
    assert!(!logs.iter().any(|l| l.contains(KEYCHAIN_PASS) || l.contains(&auth)), "a secret is in a log");
    node.teardown(&td, &["pod/keychain"])
}
