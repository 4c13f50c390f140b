//! `clip-snapshotter`: the daemon binary. Argument parsing and wiring only.

use clap::Parser;
use std::path::PathBuf;

/// containerd remote snapshotter serving image layers lazily from CLIP indexes.
#[derive(Debug, Parser)]
#[command(name = "clip-snapshotter", version, about)]
struct Args {
    /// Config file (TOML). Default: /etc/clip/snapshotter.toml when it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory; overrides the config's `root`.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// gRPC unix socket; overrides the config's `address`.
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// Log level or tracing filter directive; overrides the config's `log_level`.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cwd = std::env::current_dir()?;
    let mut cfg = clip_config::SnapshotterConfig::load_or_default(args.config.as_deref())?;
    if let Some(root) = args.root {
        cfg.root = cwd.join(root);
    }
    if let Some(address) = args.address {
        cfg.address = cwd.join(address);
    }
    if let Some(level) = args.log_level {
        cfg.log_level = level;
    }
    clip_snapshotter::logging::init(&cfg.log_level, cfg.log_format)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("clip-snapshotter")
        .build()?
        .block_on(clip_snapshotter::daemon::run(cfg))
}
