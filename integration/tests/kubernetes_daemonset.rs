//! The DaemonSet as users install it (issue 28): clip's image built here from the Debian package
//! with the shipped `packaging/kubernetes/Containerfile` (buildah), loaded into the node's
//! containerd, the shipped `packaging/kubernetes/daemonset.yaml` applied with `kubectl` (only
//! the image name and host paths substituted). clip in its pod serves the node's containerd: a
//! pod of the python image starts lazily. Rolling the DaemonSet to a new image while that pod
//! reads files it never read before keeps its reads working (the fd keeper's own DaemonSet holds
//! the FUSE connections while clip's pod is replaced).

use anyhow::{Context, Result, bail};
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions, Flavor};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::kube::{ControlPlane, kubectl_stdout, tail};
use clip_integration::kubelet::{Kubelet, pod_tolerations};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::workspace_binary;
use clip_integration::{TestDir, require_root, run, run_stdout, wait_until};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SHIPPED_IMAGE: &str = "registry.example.com/clip/clip-snapshotter:0.1.0";
const IMAGE: &str = "localhost/clip-test/clip-snapshotter";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// clip's image `IMAGE:tag`: built once with the shipped Containerfile from the packages of
/// this build, on `base` (a Debian 12 image); each tag a distinct image of it (its own label).
/// Returns a docker archive for `ctr images import`.
fn build_clip_image(td: &TestDir, base: &str, tag: &str) -> Result<PathBuf> {
    let context = td.path().join("image-context");
    let debs = context.join("target/debian");
    if !debs.exists() {
        std::fs::create_dir_all(&debs)?;
        run(Command::new("bash")
            .arg(repo_root().join("packaging/build-debs.sh"))
            .args(["--profile", "dev", "--fast", "--no-build", "--out"])
            .arg(&debs))?;
        for deb in std::fs::read_dir(&debs)?.flatten() {
            if !deb.file_name().to_string_lossy().starts_with("clip-snapshotter_") {
                std::fs::remove_file(deb.path())?;
            }
        }
    }
    let storage = td.path().join("buildah");
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    };
    let name = format!("{IMAGE}:{tag}");
    let first = format!("{IMAGE}:built");
    if !storage.exists() {
        run(buildah(&["bud", "--network", "host", "--build-arg", &format!("BASE={base}")])
            .arg("-f")
            .arg(repo_root().join("packaging/kubernetes/Containerfile"))
            .args(["-t", &first])
            .arg(&context))?;
    }
    // Each tag a distinct image of the same build (its own config): what a release upgrade is.
    let container = run_stdout(&mut buildah(&["from", &first]))?;
    run(&mut buildah(&["config", "--label", &format!("clip-test={tag}"), container.trim()]))?;
    run(&mut buildah(&["commit", "--rm", container.trim(), &name]))?;
    let archive = td.path().join(format!("clip-image-{tag}.tar"));
    run(buildah(&["push", &name]).arg(format!("docker-archive:{}:{name}", archive.display())))?;
    Ok(archive)
}

/// The shipped DaemonSet with `image` and host paths of the test.
fn manifest(image: &str, run_dir: &Path, state: &Path, certs: &Path) -> Result<String> {
    let shipped = std::fs::read_to_string(repo_root().join("packaging/kubernetes/daemonset.yaml"))?;
    for needle in [SHIPPED_IMAGE, "/run/clip-snapshotter", "/var/lib/clip-snapshotter", "/etc/containerd/certs.d"] {
        if !shipped.contains(needle) {
            bail!("the shipped daemonset.yaml no longer names {needle}");
        }
    }
    Ok(shipped
        .replace(SHIPPED_IMAGE, image)
        .replace("/run/clip-snapshotter", &run_dir.to_string_lossy())
        .replace("/var/lib/clip-snapshotter", &state.to_string_lossy())
        .replace("/etc/containerd/certs.d", &certs.to_string_lossy()))
}

/// The pod's program: imports numpy, then every 2 s reads the next of 120 batches of files it
/// never read (numpy's and the standard library's), printing `batch N ok BYTES` or
/// `batch N error WHAT`.
const READER: &str = r"
import os, time, numpy
print('numpy', numpy.__version__, flush=True)
files = sorted(os.path.join(d, f) for root in ('/usr/lib/python3/dist-packages/numpy', '/usr/lib/python3.11')
               for d, _, fs in os.walk(root) for f in fs if not os.path.islink(os.path.join(d, f)))
for n in range(120):
    time.sleep(2)
    try:
        size = sum(len(open(p, 'rb').read()) for p in files[n::120])
        print('batch', n, 'ok', size, flush=True)
    except OSError as e:
        print('batch', n, 'error', e, flush=True)
time.sleep(3600)
";

/// Directories bind-mounted on themselves as shared mounts; unmounted on drop.
struct SharedMounts(Vec<PathBuf>);

impl SharedMounts {
    fn make(dirs: &[&Path]) -> Result<Self> {
        let mut made = Self(Vec::new());
        for dir in dirs {
            run(Command::new("mount").arg("--bind").arg(dir).arg(dir))?;
            made.0.push(dir.to_path_buf());
            run(Command::new("mount").arg("--make-shared").arg(dir))?;
        }
        Ok(made)
    }
}

impl Drop for SharedMounts {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            clip_integration::unmount_below(dir);
            let _ = Command::new("umount").arg("-l").arg(dir).output();
        }
    }
}

fn ok_batches(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("batch ") && l.contains(" ok ")).count()
}

#[test]
fn the_shipped_daemonset_serves_the_node_and_survives_a_rolling_update() -> Result<()> {
    require_root();
    let td = TestDir::new("kubernetes-daemonset")?;
    let registry = Registry::start_plain(&td, "plain")?;
    let pause = registry.push_layout(&TestImage::Busybox.layout()?, "pause", "testbed/pause", "latest")?;
    let python_layout = TestImage::Python.layout()?;
    let python = registry.push_layout(&python_layout, "pyapp", "testbed/python", "latest")?;
    let python_bytes: u64 = layout_layers(&python_layout, "pyapp")?.iter().map(|(_, _, s)| s).sum();
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &python]))?;
    // clip's image on a Debian 12 base (the test's python image, built here), twice: the second
    // is the rolling update's.
    let base = format!("oci:{}:pyapp", python_layout.display());
    let v1 = build_clip_image(&td, &base, "v1")?;
    let v2 = build_clip_image(&td, &base, "v2")?;

    let run_dir = td.sub("host-run-clip")?;
    let state = td.sub("host-state-clip")?;
    // clip's pod mounts these with Bidirectional propagation, which needs shared mounts (on a
    // systemd host `/` is one; here it is private, so each is made a shared mount of its own).
    let _shared = SharedMounts::make(&[&run_dir, &state])?;
    let plane = ControlPlane::start(&td)?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions {
            flavor: Flavor::V2,
            clip_socket: Some(run_dir.join("clip-snapshotter.sock")),
            clip_root: Some(state.clone()),
            sandbox_image: Some(pause.clone()),
            ..Default::default()
        },
    )?;
    let certs = td.path().join("containerd/certs.d");
    // Loaded into the node's containerd before clip serves (docs/kubernetes.md): clip's images
    // and the sandbox image, on overlayfs.
    for archive in [&v1, &v2] {
        run(ctrd.ctr("k8s.io").args(["images", "import", "--snapshotter", "overlayfs"]).arg(archive))?;
    }
    run(ctrd.ctr("k8s.io").args(["images", "pull", "--plain-http", "--snapshotter", "overlayfs", &pause]))?;
    let kubelet = Kubelet::start(&td, &plane, ctrd.socket(), None, &[])?;

    // The config map from a snapshotter.toml whose root and socket are the host paths.
    let mut config = lazy_config(false);
    config.root.clone_from(&state);
    config.address = run_dir.join("clip-snapshotter.sock");
    config.registry.hosts_dir = Some(certs.clone());
    config.lazy.external_fd_keeper = true;
    let toml_file = td.path().join("snapshotter.toml");
    std::fs::write(&toml_file, config.to_toml()?)?;
    kubectl_stdout(
        plane
            .kubectl(&["-n", "kube-system", "create", "configmap", "clip-snapshotter-config"])
            .arg(format!("--from-file=snapshotter.toml={}", toml_file.display())),
    )?;
    let daemonset = td.path().join("daemonset.yaml");
    std::fs::write(&daemonset, manifest(&format!("{IMAGE}:v1"), &run_dir, &state, &certs)?)?;
    kubectl_stdout(plane.kubectl(&["apply", "-f"]).arg(&daemonset))?;
    let describe = || {
        let pods = plane
            .kubectl(&["describe", "pods", "-A"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let clip_logs = plane
            .kubectl(&["-n", "kube-system", "logs", "-l", "app=clip-snapshotter", "--tail", "40"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("{}\n{clip_logs}\n{}", tail(&pods, 120), tail(&kubelet.log(), 40))
    };
    let serving = wait_until(Duration::from_secs(180), || {
        run_dir.join("clip-snapshotter.sock").exists() && state.join("fd-keeper.sock").exists()
    }) && ctrd.reaches("k8s.io", "clip", Duration::from_secs(60));
    assert!(serving, "clip's pod does not serve containerd:\n{}", describe());

    // A pod of the python image starts lazily through clip in its pod.
    let before = registry.blob_bytes_served();
    let pod_yaml = td.path().join("reader.yaml");
    std::fs::write(
        &pod_yaml,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: reader, namespace: default}}\nspec:\n\
             \x20 hostNetwork: true\n  automountServiceAccountToken: false\n  restartPolicy: Never\n  {}\n\
             \x20 containers:\n  - name: app\n    image: {python}\n    command: [python3, -c, {READER:?}]\n",
            pod_tolerations()
        ),
    )?;
    kubectl_stdout(plane.kubectl(&["apply", "-f"]).arg(&pod_yaml))?;
    let log = || {
        plane
            .kubectl(&["logs", "reader"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let started = wait_until(Duration::from_secs(240), || ok_batches(&log()) >= 1);
    assert!(started, "the reader did not start: {:?}\n{}", log(), describe());
    let fetched = registry.blob_bytes_served() - before;
    eprintln!(
        "clip in its DaemonSet pod: reader started with {fetched} of {python_bytes} compressed bytes fetched ({:.1}%), {} FUSE layers",
        fetched as f64 * 100.0 / python_bytes as f64,
        td.lazy_layers()
    );
    assert_eq!(td.lazy_layers(), 4, "the python image's layers are served lazily by clip's pod\n{}", describe());

    // Roll clip to the second image while the reader reads.
    let before_roll = ok_batches(&log());
    for container in ["clip-snapshotter", "private-dirs"] {
        kubectl_stdout(&mut plane.kubectl(&[
            "-n",
            "kube-system",
            "set",
            "image",
            "daemonset/clip-snapshotter",
            &format!("{container}={IMAGE}:v2"),
        ]))?;
    }
    kubectl_stdout(&mut plane.kubectl(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/clip-snapshotter",
        "--timeout=180s",
    ]))
    .with_context(describe)?;
    let images = kubectl_stdout(&mut plane.kubectl(&[
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "app=clip-snapshotter",
        "-o",
        "jsonpath={.items[*].spec.containers[0].image}",
    ]))?;
    assert_eq!(images.trim(), format!("{IMAGE}:v2"));
    let after_roll = wait_until(Duration::from_secs(120), || ok_batches(&log()) >= before_roll + 5);
    let text = log();
    eprintln!(
        "rolling update: {before_roll} batches read before, {} after; errors: {}",
        ok_batches(&text) - before_roll,
        text.lines().filter(|l| l.contains(" error ")).count()
    );
    assert!(
        after_roll && !text.contains(" error "),
        "the reader's reads after the rolling update:\n{text}\n{}",
        describe()
    );

    // Teardown: the pod and its image (clip unmounts its layers), then clip's DaemonSets.
    kubectl_stdout(&mut plane.kubectl(&["delete", "pod", "reader", "--wait=true"]))?;
    let crictl = clip_integration::gotools::crictl()?;
    let removed = wait_until(Duration::from_secs(60), || {
        Command::new(&crictl)
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", ctrd.socket().display()))
            .args(["rmi", &python])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(removed && wait_until(Duration::from_secs(60), || td.lazy_layers() == 0), "layers left\n{}", describe());
    kubectl_stdout(plane.kubectl(&["delete", "-f"]).arg(&daemonset).arg("--wait=true"))?;
    assert!(plane.pods_gone(true, Duration::from_secs(120)), "pods left:\n{}", describe());
    drop(kubelet);
    Ok(())
}
