//! `clip-snapshotter`: the daemon binary, and the `pull` client. Argument parsing and wiring.

use anyhow::Context;
use clap::{Parser, Subcommand};
use clip_config::ConfigFile as _;
use clip_registry::credentials::{Credential, Source};
use std::path::PathBuf;

/// containerd remote snapshotter serving image layers lazily from CLIP indexes.
#[derive(Debug, Parser)]
#[command(name = "clip-snapshotter", version, about)]
struct Args {
    /// Config file (TOML). Default: /etc/clip/snapshotter.toml when it exists.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// State directory; overrides the config's `root`.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// gRPC unix socket; overrides the config's `address`.
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// Log level or tracing filter directive; overrides the config's `log_level`.
    #[arg(long, value_name = "LEVEL", global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// The fd keeper (started by the daemon): holds lazy layers' FUSE connections across
    /// daemon restarts.
    #[command(hide = true)]
    KeepFds {
        #[arg(long, value_name = "SOCKET")]
        socket: PathBuf,
        #[arg(long, default_value_t = 600)]
        orphan_timeout_s: u64,
    },
    /// Pull an image into containerd with its layers served lazily by clip (like
    /// `ctr-remote rpull`); then `ctr run --snapshotter clip REF` starts it.
    Pull {
        #[arg(long, value_name = "SOCK", default_value = "/run/containerd/containerd.sock")]
        containerd_address: PathBuf,
        #[arg(long, short = 'n', value_name = "NS", default_value = "default", env = "CONTAINERD_NAMESPACE")]
        namespace: String,
        #[arg(long, default_value = "clip")]
        snapshotter: String,
        /// containerd-style hosts directory (mirrors, CA, plain HTTP).
        #[arg(long, value_name = "DIR")]
        hosts_dir: Option<PathBuf>,
        /// Plain HTTP for registries without hosts.toml configuration.
        #[arg(long)]
        plain_http: bool,
        /// A file holding `user:password` for the image's registry (`-`: standard input, like
        /// `docker login --password-stdin`); else the `CLIP_CREDS` environment variable. Never
        /// on the command line, where every user of the host reads it.
        #[arg(long, value_name = "FILE")]
        creds_file: Option<PathBuf>,
        /// A file holding the build registry token (BuildRegistryCreds) as `user:password`
        /// (`-`: standard input); else `CLIP_BUILD_REGISTRY_CREDS`. Offered only to images of
        /// the `[build_registry]` of `--config`.
        #[arg(long, value_name = "FILE")]
        build_registry_creds_file: Option<PathBuf>,
        /// A file holding `user:password` of a custom base image's registry (`-`: standard
        /// input); else `CLIP_SOURCE_IMAGE_CREDS`.
        #[arg(long, value_name = "FILE")]
        source_image_creds_file: Option<PathBuf>,
        /// Platform of a multi-platform image (os/arch[/variant]).
        #[arg(long)]
        platform: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        reference: String,
    },
}

/// Fixes glibc's mmap threshold at 128 KiB. By default it rises to the size of the largest
/// freed block, so the multi-MiB buffers of span fetches end up in malloc arenas and stay
/// there: the load test measured a 216-372 MiB peak RSS with the default and 31 MiB with this.
#[allow(unsafe_code)]
fn tame_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> anyhow::Result<()> {
    tame_malloc();
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
    if let Some(Command::KeepFds { socket, orphan_timeout_s }) = &args.command {
        // No runtime: a blocking loop with a handful of descriptors.
        return clip_layerfs::keeper::serve(socket, std::time::Duration::from_secs(*orphan_timeout_s));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("clip-snapshotter").build()?;
    match args.command {
        None => runtime.block_on(clip_snapshotter::daemon::run(cfg)),
        Some(Command::KeepFds { .. }) => Ok(()),
        Some(Command::Pull {
            containerd_address,
            namespace,
            snapshotter,
            hosts_dir,
            plain_http,
            creds_file,
            build_registry_creds_file,
            source_image_creds_file,
            platform,
            json,
            reference,
        }) => {
            let stdin_users = [&creds_file, &build_registry_creds_file, &source_image_creds_file]
                .iter()
                .filter(|f| f.as_deref().is_some_and(|f| f.as_os_str() == "-"))
                .count();
            if stdin_users > 1 {
                anyhow::bail!("only one credential can be read from standard input");
            }
            let read = |file: Option<PathBuf>, env: &str, s: Source| -> anyhow::Result<Option<Credential>> {
                match (file, std::env::var(env)) {
                    (Some(f), _) => Ok(Some(Credential::read_file(&f, s)?)),
                    (None, Ok(v)) if !v.trim().is_empty() => Ok(Some(Credential::parse(v.trim(), s)?)),
                    _ => Ok(None),
                }
            };
            let opts = clip_pull::PullOptions {
                containerd_address,
                namespace,
                snapshotter,
                hosts_dir: hosts_dir.or(cfg.registry.hosts_dir.clone()),
                plain_http,
                creds: read(creds_file, "CLIP_CREDS", Source::ImageCreds)?,
                build_registry_creds: read(
                    build_registry_creds_file,
                    "CLIP_BUILD_REGISTRY_CREDS",
                    Source::BuildRegistryCreds,
                )?,
                source_image_creds: read(source_image_creds_file, "CLIP_SOURCE_IMAGE_CREDS", Source::SourceImageCreds)?,
                build_registry: cfg
                    .build_registry
                    .as_ref()
                    .map(|b| clip_pull::BuildRegistryScope::new(&b.registry, &b.repository)),
                providers: clip_snapshotter::remote::sessions::credential_providers(&cfg)?,
                platform: match platform {
                    Some(p) => clip_registry::Platform::parse(&p).with_context(|| format!("bad --platform {p:?}"))?,
                    None => clip_registry::Platform::default(),
                },
            };
            let report = runtime.block_on(clip_pull::pull(&opts, &reference))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} ({}): {} layers lazy, {} unpacked, {} unpacked by the snapshotter, {} already present, {:.2} s",
                    report.image,
                    report.manifest_digest,
                    report.lazy_layers,
                    report.unpacked_layers,
                    report.snapshotter_unpacked_layers,
                    report.existing_layers,
                    report.seconds
                );
                for n in &report.not_lazy {
                    println!("  layer {} not served lazily: {}", n.layer, n.reason);
                }
            }
            Ok(())
        }
    }
}
