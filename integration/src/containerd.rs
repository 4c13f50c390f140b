//! A private containerd 1.6 (Debian's) with its own root, state, sockets and `hosts.toml` dir.

use crate::process::Daemon;
use crate::{TestDir, run, wait_until};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// How to configure a [`Containerd`].
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// The clip snapshotter's socket for `[proxy_plugins.clip]` (the entry is always written; with
    /// `None` it points at a socket nobody serves).
    pub clip_socket: Option<PathBuf>,
    /// The CRI plugin's snapshotter; `overlayfs` when `None`.
    pub cri_snapshotter: Option<String>,
    /// CRI sandbox image, e.g. `127.0.0.1:PORT/testbed/pause:latest`.
    pub sandbox_image: Option<String>,
    /// The stargz snapshotter's socket for `[proxy_plugins.stargz]` (benchmarks), if any.
    pub stargz_socket: Option<PathBuf>,
}

/// A running containerd. On drop: every task killed, every container and image removed in every
/// namespace, containerd stopped, its shims killed and its mounts undone.
#[derive(Debug)]
pub struct Containerd {
    daemon: Option<Daemon>,
    dir: PathBuf,
    socket: PathBuf,
    hosts_dir: PathBuf,
    config: PathBuf,
}

impl Containerd {
    pub fn start(td: &TestDir, opts: &ContainerdOptions) -> Result<Self> {
        let dir = td.sub("containerd")?;
        for d in ["root", "state", "opt", "certs.d", "cni"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let socket = dir.join("containerd.sock");
        let hosts_dir = dir.join("certs.d");
        let clip_socket = opts.clip_socket.clone().unwrap_or_else(|| dir.join("clip-unused.sock"));
        let config = dir.join("config.toml");
        std::fs::write(&config, render_config(&dir, &socket, &hosts_dir, &clip_socket, opts))?;
        let mut c = Self { daemon: None, dir, socket, hosts_dir, config };
        c.launch()?;
        Ok(c)
    }

    fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&self.config);
        self.daemon = Some(Daemon::spawn("containerd", cmd, &self.dir.join("containerd.log"))?);
        let ok = wait_until(Duration::from_secs(30), || {
            Command::new("ctr").arg("-a").arg(&self.socket).arg("version").output().is_ok_and(|o| o.status.success())
        });
        if !ok {
            bail!("containerd did not start:\n{}", self.log());
        }
        Ok(())
    }

    /// Restarts the daemon (same config and state).
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        self.launch()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd `hosts.toml` directory (`certs.d`) used by the CRI plugin and `ctr --hosts-dir`.
    pub fn hosts_dir(&self) -> &Path {
        &self.hosts_dir
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// A `ctr` command against this containerd in namespace `ns`.
    pub fn ctr(&self, ns: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.socket).arg("-n").arg(ns).stdin(Stdio::null());
        c
    }

    /// Runs `ctr -n ns ARGS...`, failing with its output when it fails.
    pub fn ctr_run(&self, ns: &str, args: &[&str]) -> Result<Output> {
        run(self.ctr(ns).args(args))
    }

    /// The root file system of `image` as `snapshotter` presents it (`ctr images mount` in
    /// namespace `t`), described entry by entry.
    pub fn image_tree(
        &self,
        td: &TestDir,
        image: &str,
        snapshotter: &str,
    ) -> Result<std::collections::BTreeMap<PathBuf, crate::tree::EntryDesc>> {
        let target = td.sub(&format!("mnt-{snapshotter}"))?;
        run(self.ctr("t").args(["images", "mount", "--snapshotter", snapshotter, image]).arg(&target))?;
        let tree = crate::tree::describe_tree(&target);
        let _ = run(self.ctr("t").args(["images", "unmount", "--rm"]).arg(&target));
        tree
    }

    /// Every namespace that exists.
    pub fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ctr").arg("-a").arg(&self.socket).args(["namespaces", "ls", "-q"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()).unwrap_or_default()
    }

    /// Removes every task, container, image and lease in every namespace, with synchronous GC.
    pub fn purge(&self) -> Result<()> {
        for ns in self.namespaces() {
            let ids = String::from_utf8_lossy(&self.ctr(&ns).args(["containers", "ls", "-q"]).output()?.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>();
            for id in ids {
                let _ = self.ctr(&ns).args(["tasks", "kill", "-s", "KILL", &id]).output();
                let _ = wait_until(Duration::from_secs(5), || {
                    self.ctr(&ns).args(["tasks", "rm", "-f", &id]).output().is_ok_and(|o| o.status.success())
                });
                let _ = self.ctr(&ns).args(["containers", "rm", &id]).output();
            }
            let images = String::from_utf8_lossy(&self.ctr(&ns).args(["images", "ls", "-q"]).output()?.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>();
            if !images.is_empty() {
                let _ = self.ctr(&ns).args(["images", "rm", "--sync"]).args(&images).output();
            }
            let leases = String::from_utf8_lossy(&self.ctr(&ns).args(["leases", "ls", "-q"]).output()?.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>();
            for l in leases {
                let _ = self.ctr(&ns).args(["leases", "rm", "--sync", &l]).output();
            }
        }
        Ok(())
    }

    fn kill_shims(&self) {
        // Shims outlive containerd; find ours by the address on their command line.
        let needle = self.socket.to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let _ = self.purge();
        }
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        self.kill_shims();
        crate::unmount_below(&self.dir);
    }
}

fn render_config(dir: &Path, socket: &Path, hosts_dir: &Path, clip_socket: &Path, opts: &ContainerdOptions) -> String {
    let d = dir.display();
    let cri_snapshotter = opts.cri_snapshotter.as_deref().unwrap_or("overlayfs");
    let sandbox = opts.sandbox_image.as_deref().unwrap_or("127.0.0.1:5000/testbed/pause:latest");
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
oom_score = 0

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # root lacks CAP_SYS_RESOURCE here: the sandbox's oom_score_adj of -998 would fail in runc.
  restrict_oom_score_adj = true
  sandbox_image = "{sandbox}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{cri_snapshotter}"
    # containerd 1.6 defaults to true; remote snapshotters need the cri.* labels.
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"

[proxy_plugins]
  [proxy_plugins.clip]
    type = "snapshot"
    address = "{clip}"
"#,
        socket = socket.display(),
        hosts = hosts_dir.display(),
        clip = clip_socket.display(),
    ) + &opts
        .stargz_socket
        .as_ref()
        .map(|s| format!("  [proxy_plugins.stargz]\n    type = \"snapshot\"\n    address = \"{}\"\n", s.display()))
        .unwrap_or_default()
}

/// Checks that `ctr` output mentions `needle`, with context on failure.
pub fn expect_contains(out: &Output, needle: &str) -> Result<()> {
    let s = String::from_utf8_lossy(&out.stdout);
    if s.contains(needle) {
        Ok(())
    } else {
        Err(anyhow::anyhow!("expected {needle:?} in output:\n{s}\nstderr: {}", String::from_utf8_lossy(&out.stderr)))
            .context("ctr output")
    }
}
