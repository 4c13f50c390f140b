//! The real `crictl` (cri-tools, built by `install-deps.sh`) against containerd 2.x's CRI
//! plugin with the shipped config (`snapshotter = "clip"`), on both of CRI's pull paths: the
//! transfer service (2.x's default; labels from the proxy plugin's export) and the client-side
//! pull (`disable_snapshot_annotations = false`; CRI attaches the labels). A pod runs from the
//! plain registry lazily; the pause image, which has no index, falls back to an ordinary
//! snapshot; a private image pulled with `crictl pull --creds` through clip's CRI image service
//! proxy is lazy and its never-read files are read later; `crictl rm`, `rmp` and `rmi` leave no
//! snapshot, FUSE mount, cache or idle fd keeper behind.

use anyhow::{Context, Result, bail};
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions, Flavor};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run, run_stdout, wait_until};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PRIVATE_PASS: &str = "Crictl-Secret-4d2a";

/// `crictl` against containerd's CRI for the runtime and `image_endpoint` for images.
struct Crictl {
    bin: PathBuf,
    runtime: String,
    images: String,
}

impl Crictl {
    fn new(containerd: &Path, image_endpoint: &Path) -> Result<Self> {
        Ok(Self {
            bin: clip_integration::gotools::crictl()?,
            runtime: format!("unix://{}", containerd.display()),
            images: format!("unix://{}", image_endpoint.display()),
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args([
            "--config",
            "/dev/null",
            "--timeout",
            "120s",
            "--runtime-endpoint",
            &self.runtime,
            "--image-endpoint",
            &self.images,
        ])
        .args(args)
        .stdin(std::process::Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        Ok(run_stdout(&mut self.cmd(args))?.trim().to_string())
    }

    /// `crictl runp` + `create` + `start` of `command` in `image`; waits for it to exit and
    /// returns (pod id, container id, its log).
    fn run_to_exit(&self, dir: &Path, name: &str, image: &str, command: &[&str]) -> Result<(String, String, String)> {
        let logs = dir.join(format!("logs-{name}"));
        std::fs::create_dir_all(&logs)?;
        let pod = serde_json::json!({
            "metadata": {"name": name, "namespace": "clip-test", "uid": format!("uid-{name}"), "attempt": 0},
            "log_directory": logs,
            // Host network (NODE): no CNI needed.
            "linux": {"security_context": {"namespace_options": {"network": 2}}},
        });
        let container = serde_json::json!({
            "metadata": {"name": "main"},
            "image": {"image": image},
            "command": command,
            "log_path": "main.log",
            "linux": {},
        });
        let pod_json = dir.join(format!("{name}-pod.json"));
        let ctr_json = dir.join(format!("{name}-ctr.json"));
        std::fs::write(&pod_json, pod.to_string())?;
        std::fs::write(&ctr_json, container.to_string())?;
        let pod_id = self.run(&["runp", &pod_json.to_string_lossy()])?;
        let id = self.run(&["create", &pod_id, &ctr_json.to_string_lossy(), &pod_json.to_string_lossy()])?;
        self.run(&["start", &id])?;
        let exited = wait_until(Duration::from_secs(120), || {
            self.run(&["inspect", "-o", "json", &id])
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v["status"]["state"] == "CONTAINER_EXITED")
        });
        if !exited {
            bail!("container {id} did not exit: {}", self.run(&["inspect", &id]).unwrap_or_default());
        }
        let log = String::from_utf8_lossy(&self.cmd(&["logs", &id]).output()?.stdout).trim().to_string();
        Ok((pod_id, id, log))
    }

    /// `crictl rm`, `stopp`, `rmp` of what [`Self::run_to_exit`] made.
    fn remove(&self, pod: &str, container: &str) -> Result<()> {
        self.run(&["rm", container])?;
        self.run(&["stopp", pod])?;
        self.run(&["rmp", pod])?;
        Ok(())
    }
}

/// What a test bed of this file holds.
struct Bed {
    td: TestDir,
    plain: Registry,
    private: Registry,
    python_ref: String,
    private_ref: String,
    image_bytes: u64,
    snap: ClipSnapshotter,
    ctrd: Containerd,
    cri_proxy: PathBuf,
}

fn bed(name: &str, cri_local_pull: bool) -> Result<Bed> {
    let td = TestDir::new(name)?;
    let plain = Registry::start_plain(&td, "plain")?;
    let private = Registry::start_tls_auth_with(&td, "private", "reader", PRIVATE_PASS)?;
    let busybox = TestImage::Busybox.layout()?;
    let python = TestImage::Python.layout()?;
    // The pause image: busybox, never indexed.
    plain.push_layout(&busybox, "pause", "testbed/pause", "latest")?;
    let python_ref = plain.push_layout(&python, "pyapp", "testbed/python", "latest")?;
    let private_ref = private.push_layout(&python, "pyapp", "team/python", "v1")?;
    let image_bytes: u64 = layout_layers(&python, "pyapp")?.iter().map(|(_, _, s)| s).sum();
    let ctrd_dir = td.path().join("containerd");
    let hosts = ctrd_dir.join("certs.d");
    std::fs::create_dir_all(&hosts)?;
    private.write_hosts_toml(&hosts)?;
    run(Command::new(workspace_binary("clip-builder")?).args(["index", "--plain-http", &python_ref]))?;
    let creds = td.path().join("creds");
    std::fs::write(&creds, format!("reader:{PRIVATE_PASS}"))?;
    run(Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--hosts-dir"])
        .arg(&hosts)
        .arg("--creds-file")
        .arg(&creds)
        .arg(&private_ref))?;

    let cri_proxy = td.path().join("cri.sock");
    let mut config = lazy_config(false);
    config.containerd_address = ctrd_dir.join("containerd.sock");
    config.registry.hosts_dir = Some(hosts.clone());
    config.cri.image_service_address = Some(cri_proxy.clone());
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions {
            flavor: Flavor::V2,
            cri_local_pull,
            clip_socket: Some(snap.socket().to_path_buf()),
            sandbox_image: Some(format!("{}/testbed/pause:latest", plain.host())),
            ..Default::default()
        },
    )?;
    Ok(Bed { td, plain, private, python_ref, private_ref, image_bytes, snap, ctrd, cri_proxy })
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The whole scenario on one of CRI's pull paths.
fn pods_start_lazily_and_leave_nothing_behind(name: &str, cri_local_pull: bool) -> Result<()> {
    require_root();
    let mut b = bed(name, cri_local_pull)?;
    let crictl = Crictl::new(b.ctrd.socket(), b.ctrd.socket())?;
    let containerd_log_mentions_fallback = || b.ctrd.log().contains("Falling back to local image pull mode");
    let version = crictl.run(&["version"])?;
    assert!(version.contains("containerd") && version.contains("v2."), "{version}");

    // crictl pull: the layers are mounted lazily.
    let before = b.plain.blob_bytes_served();
    crictl.run(&["pull", &b.python_ref]).with_context(|| b.snap.log())?;
    assert_eq!(containerd_log_mentions_fallback(), cri_local_pull, "CRI's pull path:\n{}", b.ctrd.log());
    assert_eq!(b.td.lazy_layers(), 4, "{}", b.snap.log());
    let (pod, id, log) = crictl.run_to_exit(
        b.td.path(),
        "plain",
        &b.python_ref,
        &["python3", "-c", "import numpy; print('numpy', numpy.__version__)"],
    )?;
    assert!(log.starts_with("numpy "), "{log}");
    let fetched = b.plain.blob_bytes_served() - before;
    eprintln!(
        "{name}: crictl pull + runp/create/start, import numpy: {fetched} of {} compressed bytes ({:.1}%), pause and python from the plain registry",
        b.image_bytes,
        fetched as f64 * 100.0 / b.image_bytes as f64
    );
    let slog = b.snap.log();
    // The pause image has no index: the snapshotter downloads and unpacks its layers itself.
    assert!(slog.contains("layer downloaded and unpacked here"), "{slog}");
    assert_eq!(count(&slog, "layer mounted lazily"), 4, "{slog}");
    // Both paths hand the cri.* labels over (the export, or CRI itself).
    assert_eq!(count(&slog, "unlabelled Prepare found"), 0, "{slog}");
    assert!(fetched < b.image_bytes / 2, "{fetched}");
    crictl.remove(&pod, &id)?;
    // The private image has the same layers: remove this one so that they are served anew.
    crictl.run(&["rmi", &b.python_ref])?;
    assert!(
        wait_until(Duration::from_secs(60), || b.td.lazy_layers() == 0),
        "layers left after rmi:\n{}",
        b.snap.log()
    );

    // A private image: crictl hands the credentials to clip's CRI image service proxy.
    let proxied = Crictl::new(b.ctrd.socket(), &b.cri_proxy)?;
    let wrong = proxied.cmd(&["pull", "--creds", "reader:wrong", &b.private_ref]).output()?;
    assert!(!wrong.status.success(), "pulled with wrong credentials");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("401") || err.contains("unauthorized") || err.contains("authorization failed"), "{err}");
    assert_eq!(b.td.lazy_layers(), 0, "a refused pull left layers mounted");
    let before = b.private.blob_bytes_served();
    proxied
        .run(&["pull", "--creds", &format!("reader:{PRIVATE_PASS}"), &b.private_ref])
        .with_context(|| b.snap.log())?;
    assert_eq!(b.td.lazy_layers(), 4, "{}", b.snap.log());
    // Another pod pulls the same image with a wrong secret: containerd refuses it, and it never
    // replaces the secret the mounted layers read with (seen before: it did, at once and in the
    // store, and the reads below failed).
    let wrong = proxied.cmd(&["pull", "--creds", "intruder:wrong", &b.private_ref]).output()?;
    assert!(!wrong.status.success(), "pulled with wrong credentials");
    let read_files = |b: &Bed, dir: &str| -> Result<(String, String, u64)> {
        let (pod, id, log) = crictl.run_to_exit(
            b.td.path(),
            "private",
            &b.private_ref,
            &["sh", "-c", &format!("find {dir} -type f -exec cat {{}} + | wc -c")],
        )?;
        let read = log.trim().parse().with_context(|| format!("wc -c said {log:?}\n{}", b.snap.log()))?;
        Ok((pod, id, read))
    };
    let (pod, id, read) = read_files(&b, "/usr/share")?;
    crictl.remove(&pod, &id)?;
    // And after a restart, with the secrets the daemon kept.
    b.snap.restart()?;
    // containerd's connection to the proxy plugin may still be in its reconnect backoff.
    assert!(b.ctrd.reaches("k8s.io", "clip", Duration::from_secs(30)), "containerd did not reach clip again");
    let (pod, id, read_after) = read_files(&b, "/usr/lib/python3")?;
    let read = read + read_after;
    let fetched = b.private.blob_bytes_served() - before;
    eprintln!(
        "{name}: private image via the CRI proxy: {read} bytes of never-read files read, {fetched} compressed bytes fetched"
    );
    assert!(read > 20 << 20 && read_after > 10 << 20 && fetched > 4 << 20, "read {read}, fetched {fetched}");
    let slog = b.snap.log();
    assert!(slog.contains("using the pull secret kubelet passed to PullImage"), "{slog}");
    assert!(slog.contains("pull secret kept: containerd's pull with it succeeded"), "{slog}");
    assert!(slog.contains("containerd refused the pull made with this pull secret; it is not kept"), "{slog}");
    assert!(!slog.contains(PRIVATE_PASS) && !b.ctrd.log().contains(PRIVATE_PASS), "a secret in a log");
    crictl.remove(&pod, &id)?;

    // rmi of every image: nothing of clip's is left.
    for image in [b.private_ref.as_str(), &format!("{}/testbed/pause:latest", b.plain.host())] {
        crictl.run(&["rmi", image])?;
    }
    let snapshots =
        || run_stdout(b.ctrd.ctr("k8s.io").args(["snapshots", "--snapshotter", "clip", "ls"])).unwrap_or_default();
    let spans = b.snap.root().join("spans");
    let cache_entries = || std::fs::read_dir(&spans).map_or(0, std::iter::Iterator::count);
    let clean = wait_until(Duration::from_secs(60), || {
        snapshots().lines().count() <= 1 && b.td.lazy_layers() == 0 && cache_entries() == 0 && !b.snap.keeper_alive()
    });
    assert!(
        clean,
        "left behind: snapshots {:?}, {} FUSE mounts, {} span caches, keeper alive {}\n{}",
        snapshots(),
        b.td.lazy_layers(),
        cache_entries(),
        b.snap.keeper_alive(),
        b.snap.log()
    );
    Ok(())
}

#[test]
fn crictl_pods_start_lazily_through_the_transfer_service_and_leave_nothing_behind() -> Result<()> {
    pods_start_lazily_and_leave_nothing_behind("crictl-transfer", false)
}

#[test]
fn crictl_pods_start_lazily_through_the_local_pull_and_leave_nothing_behind() -> Result<()> {
    pods_start_lazily_and_leave_nothing_behind("crictl-local", true)
}
