//! The peers clip is measured against, each started by the benchmark on a fresh root for every
//! cold run: the stargz snapshotter (eStargz images; `containerd-stargz-grpc`, when installed) and
//! the SOCI snapshotter (unmodified images plus a SOCI index; `clip-bench-soci`, built by
//! `integration/install-deps.sh`). Also: what a daemon cost during a run (peak RSS, CPU seconds).

use anyhow::{Result, bail};
use clip_integration::process::Daemon;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A snapshotter daemon run by the benchmark: which program, with which arguments.
pub struct Peer {
    pub name: &'static str,
    bin: PathBuf,
    pub dir: PathBuf,
    daemon: Option<Daemon>,
    /// containerd's socket: SOCI reads image manifests and content from it.
    pub containerd: PathBuf,
}

impl Peer {
    /// The stargz snapshotter, when `containerd-stargz-grpc` is installed.
    pub fn stargz(dir: PathBuf) -> Option<Self> {
        let bin = std::env::var_os("CLIP_BENCH_STARGZ")
            .map(PathBuf::from)
            .into_iter()
            .chain([
                PathBuf::from("/tmp/testbed/bin/containerd-stargz-grpc"),
                PathBuf::from("/usr/local/bin/containerd-stargz-grpc"),
            ])
            .find(|p| p.exists())?;
        Some(Self { name: "stargz", bin, dir, daemon: None, containerd: PathBuf::new() })
    }

    /// The SOCI snapshotter, when `integration/install-deps.sh` built it.
    pub fn soci(dir: PathBuf) -> Option<Self> {
        let bin = clip_integration::gotools::soci().ok()?;
        Some(Self { name: "soci", bin, dir, daemon: None, containerd: PathBuf::new() })
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.name))
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map_or(0, Daemon::pid)
    }

    /// Starts on a fresh root, trusting `hosts` over plain HTTP (both read the same
    /// `[resolver.host."HOST".mirrors]` table; SOCI wants each mirror as a URL).
    pub fn start(&mut self, hosts: &[String]) -> Result<()> {
        let root = self.root();
        clip_integration::unmount_below(&root);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let mut cfg = String::new();
        for h in hosts {
            let mirror = if self.name == "soci" { format!("http://{h}") } else { h.clone() };
            let _ = writeln!(cfg, "[[resolver.host.\"{h}\".mirrors]]\n  host = \"{mirror}\"\n  insecure = true");
        }
        if self.name == "soci" {
            let _ = writeln!(cfg, "[content_store]\n  containerd_address = \"{}\"", self.containerd.display());
        }
        let config = self.dir.join("config.toml");
        std::fs::write(&config, cfg)?;
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = Command::new(&self.bin);
        match self.name {
            "soci" => {
                cmd.arg("serve").arg("-address").arg(self.socket()).arg("-root").arg(&root);
                cmd.arg("-config").arg(&config).args(["-log-level", "info"]);
            }
            _ => {
                cmd.arg("-address").arg(self.socket()).arg("-root").arg(&root).arg("-config").arg(&config);
                cmd.args(["-log-level", "info"]);
            }
        }
        cmd.env("DOCKER_CONFIG", self.dir.join("docker"));
        let log = self.dir.join(format!("{}.log", self.name));
        self.daemon = Some(Daemon::spawn(self.name, cmd, &log)?);
        let sock = self.socket();
        if !clip_integration::wait_until(Duration::from_secs(20), || sock.exists()) {
            bail!("{} did not start; its log: {}", self.name, std::fs::read_to_string(&log).unwrap_or_default());
        }
        Ok(())
    }

    /// SIGINT: both unmount their FUSE layers on it.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop_with(nix::sys::signal::Signal::SIGINT, Duration::from_secs(10));
        }
        clip_integration::unmount_below(&self.root());
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the processes of a daemon cost since they started: peak RSS (sum of `VmHWM`) and CPU
/// seconds (user + system, their waited-for children included).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub peak_rss_bytes: u64,
    pub cpu_seconds: f64,
}

impl Usage {
    pub fn of(pids: &[u32]) -> Self {
        let mut u = Self::default();
        for pid in pids.iter().filter(|p| **p > 0) {
            u.peak_rss_bytes += clip_integration::process::status_bytes(*pid, "VmHWM");
            u.cpu_seconds += clip_integration::process::proc_stat(*pid).cpu_seconds;
        }
        u
    }
}
