//! A `clip-snapshotter` daemon started by a test, with its own root and socket in the test dir.

use crate::process::Daemon;
use crate::{TestDir, wait_until};
use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Path of a binary of this workspace, built by `cargo build --workspace` next to the running
/// test (`target/<profile>/deps/<test>`) or benchmark (`target/<profile>/<bench>`):
/// `target/<profile>/<name>`.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the running program has no directory")?;
    let profile_dir = if dir.ends_with("deps") { dir.parent().context("no target dir")? } else { dir };
    let bin = profile_dir.join(name);
    if !bin.exists() {
        bail!("{} not found: run `cargo build --workspace` (integration/test-all.sh does) first", bin.display());
    }
    Ok(bin)
}

/// A client of the snapshots API a snapshotter serves on `socket` (what containerd's proxy
/// plugin speaks), for tests that call it directly.
pub async fn snapshots_client(
    socket: &Path,
) -> Result<
    containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient<
        containerd_snapshots::tonic::transport::Channel,
    >,
> {
    let path = socket.to_path_buf();
    let channel = containerd_snapshots::tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await }
        }))
        .await?;
    Ok(containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient::new(channel))
}

/// A running `clip-snapshotter`.
#[derive(Debug)]
pub struct ClipSnapshotter {
    daemon: Option<Daemon>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
}

impl ClipSnapshotter {
    /// Starts a daemon with root `<td>/<name>-root` and socket `<td>/<name>.sock`, and waits
    /// until it accepts connections.
    pub fn start(td: &TestDir, name: &str, extra_args: &[&str]) -> Result<Self> {
        let mut s = Self {
            daemon: None,
            root: td.path().join(format!("{name}-root")),
            socket: td.path().join(format!("{name}.sock")),
            log: td.path().join(format!("{name}.log")),
            extra_args: extra_args.iter().map(ToString::to_string).collect(),
        };
        s.launch()?;
        Ok(s)
    }

    /// [`Self::start`] with `config` (a value, written to `<td>/<name>.toml`; its root and
    /// address are the test's).
    pub fn start_configured(
        td: &TestDir,
        name: &str,
        config: &clip_config::SnapshotterConfig,
        extra_args: &[&str],
    ) -> Result<Self> {
        let mut config = config.clone();
        config.root = td.path().join(format!("{name}-root"));
        config.address = td.path().join(format!("{name}.sock"));
        let path = td.path().join(format!("{name}.toml"));
        std::fs::write(&path, config.to_toml()?)?;
        let path = path.display().to_string();
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(extra_args);
        Self::start(td, name, &args)
    }

    fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(workspace_binary("clip-snapshotter")?);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .args(if self.extra_args.iter().any(|a| a == "--log-level") {
                &[][..]
            } else {
                &["--log-level", "debug"][..]
            })
            .args(&self.extra_args)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        let mut daemon = Daemon::spawn("clip-snapshotter", cmd, &self.log)?;
        let socket = self.socket.clone();
        let up = wait_until(Duration::from_secs(20), || std::os::unix::net::UnixStream::connect(&socket).is_ok());
        if !up || !daemon.is_running() {
            let log = daemon.log();
            daemon.stop();
            bail!("clip-snapshotter did not come up on {}:\n{log}", self.socket.display());
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop_with(Signal::SIGKILL, Duration::from_secs(10));
        }
    }

    /// SIGTERM; fails unless the daemon exits on its own within 10 s.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.signal(Signal::SIGTERM)?;
            let exited = wait_until(Duration::from_secs(10), || !d.is_running());
            d.stop();
            if !exited {
                bail!("clip-snapshotter did not exit on SIGTERM");
            }
        }
        Ok(())
    }

    /// The daemon's pid (0 when not running).
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, Daemon::pid)
    }

    /// The pid of the daemon's fd keeper (which outlives the daemon by design).
    pub fn keeper_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root.join("fd-keeper.pid")).ok()?.trim().parse().ok()
    }

    /// Whether an fd keeper process of this daemon is running.
    pub fn keeper_alive(&self) -> bool {
        self.keeper_pid()
            .is_some_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && !is_zombie(pid))
    }

    /// SIGKILLs the fd keeper (a reboot-like loss of every kept FUSE connection).
    pub fn kill_keeper(&self) {
        if let Some(pid) = self.keeper_pid() {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            wait_until(Duration::from_secs(10), || {
                nix::sys::signal::kill(pid, None).is_err() || is_zombie(pid.as_raw())
            });
            let _ = std::fs::remove_file(self.root.join("fd-keeper.pid"));
        }
    }

    /// Stops the daemon and its keeper, deletes its whole state (caches, metadata) and starts
    /// it again: a cold snapshotter.
    pub fn wipe_and_restart(&mut self) -> Result<()> {
        self.kill();
        self.kill_keeper();
        crate::unmount_below(&self.root);
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root).with_context(|| format!("wiping {}", self.root.display()))?;
        }
        self.launch()
    }

    /// Starts the daemon again on the same root and socket.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}

impl Drop for ClipSnapshotter {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        self.kill_keeper();
        crate::unmount_below(&self.root);
    }
}
