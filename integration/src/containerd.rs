//! A private containerd with its own root, state, sockets and `hosts.toml` dir: Debian's 1.6
//! (config version 2) or the 2.x that `integration/install-deps.sh` builds (config version 3,
//! with the snippet `packaging/containerd/config-2.x.toml` loaded as shipped).

use crate::process::Daemon;
use crate::{TestDir, run, wait_until};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Which containerd. Both load the snippet `packaging/containerd/` ships for them as it is
/// (only the snapshotter's socket is the test's), so CRI's snapshotter is `clip`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Flavor {
    /// Debian 12's containerd 1.6 (`/usr/bin`), config version 2, `config-1.6.toml`.
    V1_6,
    /// containerd 2.x built by `install-deps.sh`, config version 3, `config-2.x.toml`.
    #[default]
    V2,
}

/// How to configure a [`Containerd`].
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    pub flavor: Flavor,
    /// 2.x: CRI pulls client-side (`disable_snapshot_annotations = false`, which makes CRI
    /// leave the transfer service) instead of through the transfer service.
    pub cri_local_pull: bool,
    /// The clip snapshotter's socket for `[proxy_plugins.clip]` (the entry is always written; with
    /// `None` it points at a socket nobody serves).
    pub clip_socket: Option<PathBuf>,
    /// 2.x: the clip snapshotter's root, exported in place of the shipped
    /// `/var/lib/clip-snapshotter` (CRI reports it as the image file system kubelet watches).
    pub clip_root: Option<PathBuf>,
    /// CRI sandbox image, e.g. `127.0.0.1:PORT/testbed/pause:latest`.
    pub sandbox_image: Option<String>,
    /// The stargz snapshotter's socket for `[proxy_plugins.stargz]` (benchmarks), if any.
    pub stargz_socket: Option<PathBuf>,
    /// The SOCI snapshotter's socket for `[proxy_plugins.soci]` (benchmarks), if any.
    pub soci_socket: Option<PathBuf>,
    /// 2.x: what user-namespaced pods need — runc from the Go tools (idmapped mounts) and a pod
    /// network (they cannot use the host's): CNI `bridge`/`host-local` on a bridge of this
    /// containerd's own, removed on drop.
    pub pod_network: bool,
    /// 2.x: the transfer service's `concurrent_layer_fetch_buffer` (bytes per ranged request
    /// when it fetches a layer in parallel pieces; `None`: containerd's default, one request).
    pub layer_fetch_chunk: Option<u64>,
}

/// A running containerd. On drop: every task killed, every container and image removed in every
/// namespace, containerd stopped, its shims killed and its mounts undone.
#[derive(Debug)]
pub struct Containerd {
    daemon: Option<Daemon>,
    flavor: Flavor,
    /// Where `containerd`, its shim and `ctr` are; `None`: `PATH` (Debian's).
    bin_dir: Option<PathBuf>,
    dir: PathBuf,
    socket: PathBuf,
    hosts_dir: PathBuf,
    config: PathBuf,
    /// The CNI bridge of [`ContainerdOptions::pod_network`].
    bridge: Option<String>,
    /// What the config was rendered from, for [`Containerd::reconfigure`].
    opts: ContainerdOptions,
}

impl Containerd {
    /// Where [`Containerd::start`] puts the socket of a containerd of `td` (known before it
    /// starts, for daemons its config names that talk back to it).
    pub fn socket_in(td: &TestDir) -> PathBuf {
        td.path().join("containerd").join("containerd.sock")
    }

    pub fn start(td: &TestDir, opts: &ContainerdOptions) -> Result<Self> {
        let dir = td.sub("containerd")?;
        for d in ["root", "state", "opt", "certs.d", "cni"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let socket = Self::socket_in(td);
        let hosts_dir = dir.join("certs.d");
        let clip_socket = opts.clip_socket.clone().unwrap_or_else(|| dir.join("clip-unused.sock"));
        let config = dir.join("config.toml");
        let bin_dir = match opts.flavor {
            Flavor::V1_6 => None,
            Flavor::V2 => Some(crate::gotools::containerd2_bin_dir()?),
        };
        let bridge = opts.pod_network.then(|| write_pod_network(&dir.join("cni"))).transpose()?;
        let opts = ContainerdOptions { clip_socket: Some(clip_socket), ..opts.clone() };
        let mut c = Self { daemon: None, flavor: opts.flavor, bin_dir, dir, socket, hosts_dir, config, bridge, opts };
        c.write_config()?;
        c.launch()?;
        Ok(c)
    }

    fn write_config(&self) -> Result<()> {
        let clip_socket = self.opts.clip_socket.clone().unwrap_or_default();
        let (dir, socket, hosts_dir) = (&self.dir, &self.socket, &self.hosts_dir);
        let text = match self.flavor {
            Flavor::V1_6 => render_config(dir, socket, hosts_dir, &clip_socket, &self.opts)?,
            Flavor::V2 => render_config_v3(dir, socket, hosts_dir, &clip_socket, &self.opts)?,
        };
        Ok(std::fs::write(&self.config, text)?)
    }

    /// Changes the options this containerd's config is rendered from (its flavor, sockets and
    /// pod network stay); the next [`Containerd::restart`] applies them.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut ContainerdOptions)) -> Result<()> {
        change(&mut self.opts);
        self.write_config()
    }

    /// `name` from this containerd's binaries.
    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.as_ref().map_or_else(|| PathBuf::from(name), |d| d.join(name))
    }

    /// `PATH` for this containerd's processes: its own binaries (shim, ctr) first.
    pub fn path_env(&self) -> std::ffi::OsString {
        let path = std::env::var_os("PATH").unwrap_or_default();
        match &self.bin_dir {
            Some(d) => {
                std::env::join_paths(std::iter::once(d.clone()).chain(std::env::split_paths(&path))).unwrap_or(path)
            }
            None => path,
        }
    }

    /// Waits up to `timeout` until a snapshots call through the proxy plugin `snapshotter`
    /// succeeds (containerd's proxy client reconnects with backoff after either side restarts).
    pub fn reaches(&self, ns: &str, snapshotter: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.ctr(ns)
                .args(["snapshots", "--snapshotter", snapshotter, "ls"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    /// The daemon's pid (0 while stopped).
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, Daemon::pid)
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(self.bin("containerd"));
        cmd.arg("--config").arg(&self.config).env("PATH", self.path_env());
        self.daemon = Some(Daemon::spawn("containerd", cmd, &self.dir.join("containerd.log"))?);
        let ok = wait_until(Duration::from_secs(30), || {
            Command::new(self.bin("ctr"))
                .arg("-a")
                .arg(&self.socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
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
        let mut c = Command::new(self.bin("ctr"));
        c.arg("-a").arg(&self.socket).arg("-n").arg(ns).stdin(Stdio::null()).env("PATH", self.path_env());
        c
    }

    /// A `nerdctl` command (the one `install-deps.sh` builds) against this containerd in
    /// namespace `ns`, with its state in `data_root`, this containerd's `hosts.toml` dir, and
    /// docker's `config.json` in `docker_config` (what `nerdctl login` writes).
    pub fn nerdctl(&self, ns: &str, data_root: &Path, docker_config: &Path) -> Result<Command> {
        let mut c = Command::new(crate::gotools::nerdctl()?);
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(ns)
            .arg("--data-root")
            .arg(data_root)
            .arg("--hosts-dir")
            .arg(&self.hosts_dir)
            .env("DOCKER_CONFIG", docker_config)
            .env("PATH", self.path_env())
            .stdin(Stdio::null());
        Ok(c)
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
        // A new target each time: containerd 2.x's mount manager remembers a target's name.
        static MOUNTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MOUNTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let target = td.sub(&format!("mnt-{snapshotter}-{n}"))?;
        run(self.ctr("t").args(["images", "mount", "--snapshotter", snapshotter, image]).arg(&target))?;
        let tree = crate::tree::describe_tree(&target);
        let _ = run(self.ctr("t").args(["images", "unmount", "--rm"]).arg(&target));
        tree
    }

    /// Every namespace that exists.
    pub fn namespaces(&self) -> Vec<String> {
        let out = Command::new(self.bin("ctr")).arg("-a").arg(&self.socket).args(["namespaces", "ls", "-q"]).output();
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
        if let Some(bridge) = &self.bridge {
            let _ = Command::new("ip").args(["link", "delete", bridge]).output();
        }
    }
}

/// A CNI network in `conf_dir` for pods that cannot use the host's: a bridge named after this
/// process (no address on the host side, no masquerading) with addresses from a private range.
fn write_pod_network(conf_dir: &Path) -> Result<String> {
    let bridge = format!("clipbr{}", std::process::id() % 100_000);
    std::fs::write(
        conf_dir.join("10-clip-test.conflist"),
        format!(
            r#"{{"cniVersion": "1.0.0", "name": "clip-test", "plugins": [{{"type": "bridge", "bridge": "{bridge}",
  "isGateway": false, "ipMasq": false, "ipam": {{"type": "host-local", "dataDir": "{data}",
  "ranges": [[{{"subnet": "10.217.0.0/24"}}]]}}}}]}}"#,
            data = conf_dir.join("ipam").display()
        ),
    )?;
    Ok(bridge)
}

/// The packaged snippet for containerd 1.6/1.7, as users copy it.
pub const SHIPPED_CONFIG_V2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/containerd/config-1.6.toml");

/// A shipped snippet with the test's snapshotter socket in place of the packaged one.
fn shipped_snippet(path: &str, clip_socket: &Path) -> Result<String> {
    let shipped = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let default_socket = "\"/run/clip-snapshotter/clip-snapshotter.sock\"";
    if !shipped.contains(default_socket) {
        bail!("{path} no longer names {default_socket}");
    }
    Ok(shipped.replace(default_socket, &format!("\"{}\"", clip_socket.display())))
}

/// The sockets, debug and opt sections both config versions have.
fn common_sections(dir: &Path, socket: &Path) -> String {
    format!(
        r#"[grpc]
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
"#,
        socket = socket.display(),
        d = dir.display()
    )
}

/// `[proxy_plugins.stargz]` and `[proxy_plugins.soci]`, for the peers the benchmarks run.
fn peers_section(opts: &ContainerdOptions) -> String {
    [("stargz", &opts.stargz_socket), ("soci", &opts.soci_socket)]
        .into_iter()
        .filter_map(|(name, socket)| {
            let s = socket.as_ref()?;
            Some(format!("[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n", s.display()))
        })
        .collect()
}

/// containerd 1.6's config (version 2): the test's own paths and this machine's CRI needs,
/// with `packaging/containerd/config-1.6.toml` as shipped.
fn render_config(
    dir: &Path,
    socket: &Path,
    hosts_dir: &Path,
    clip_socket: &Path,
    opts: &ContainerdOptions,
) -> Result<String> {
    let shipped = shipped_snippet(SHIPPED_CONFIG_V2, clip_socket)?;
    let d = dir.display();
    let sandbox = opts.sandbox_image.as_deref().unwrap_or("127.0.0.1:5000/testbed/pause:latest");
    let peers = peers_section(opts);
    let common = common_sections(dir, socket);
    Ok(format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
oom_score = 0

# ---- packaging/containerd/config-1.6.toml as shipped ----
{shipped}
# ---- the test's own paths and this machine's needs ----
{common}
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # root lacks CAP_SYS_RESOURCE here: the sandbox's oom_score_adj of -998 would fail in runc.
  restrict_oom_score_adj = true
  sandbox_image = "{sandbox}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"
{peers}"#,
        hosts = hosts_dir.display(),
    ))
}

/// The packaged snippet for containerd 2.x, as users copy it.
pub const SHIPPED_CONFIG_V3: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/containerd/config-2.x.toml");

/// containerd 2.x's config: the test's own paths and this machine's CRI needs, with
/// `packaging/containerd/config-2.x.toml` as shipped (only the snapshotter's socket is the
/// test's).
fn render_config_v3(
    dir: &Path,
    socket: &Path,
    hosts_dir: &Path,
    clip_socket: &Path,
    opts: &ContainerdOptions,
) -> Result<String> {
    let mut shipped = shipped_snippet(SHIPPED_CONFIG_V3, clip_socket)?;
    if let Some(root) = &opts.clip_root {
        let exported = "root = \"/var/lib/clip-snapshotter\"";
        if !shipped.contains(exported) {
            bail!("{SHIPPED_CONFIG_V3} no longer exports {exported}");
        }
        shipped = shipped.replace(exported, &format!("root = \"{}\"", root.display()));
    }
    if opts.cri_local_pull {
        let header = "[plugins.\"io.containerd.cri.v1.images\"]\n";
        if !shipped.contains(header) {
            bail!("{SHIPPED_CONFIG_V3} has no {header}");
        }
        shipped = shipped.replace(header, &format!("{header}  disable_snapshot_annotations = false\n"));
    }
    let d = dir.display();
    let sandbox = opts.sandbox_image.as_deref().unwrap_or("127.0.0.1:5000/testbed/pause:latest");
    let peers = peers_section(opts);
    let common = common_sections(dir, socket);
    let (runc, cni_bin) = if opts.pod_network {
        let runc = crate::gotools::runc()?;
        (format!("\n        BinaryName = \"{}\"", runc.display()), crate::gotools::cni_plugins_dir()?)
    } else {
        (String::new(), PathBuf::from("/usr/lib/cni"))
    };
    Ok(format!(
        r#"root = "{d}/root"
state = "{d}/state"
oom_score = 0

# ---- packaging/containerd/config-2.x.toml as shipped ----
{shipped}
# ---- the test's own paths and this machine's needs ----
{common}[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # root lacks CAP_SYS_RESOURCE here: the sandbox's oom_score_adj of -998 would fail in runc.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false{runc}
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{d}/cni"
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{sandbox}"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "{hosts}"
[plugins."io.containerd.transfer.v1.local"]
  config_path = "{hosts}"{fetch_chunk}
# NRI's socket is machine-wide by default: one of its own, so containerds can run side by side.
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "{d}/nri.sock"
{peers}"#,
        hosts = hosts_dir.display(),
        cni_bin = cni_bin.display(),
        fetch_chunk =
            opts.layer_fetch_chunk.map(|c| format!("\n  concurrent_layer_fetch_buffer = {c}")).unwrap_or_default(),
    ))
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
