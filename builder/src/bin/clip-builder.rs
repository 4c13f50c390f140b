//! `clip-builder`: the builder binary. Argument parsing and wiring only.

use anyhow::Context;
use anyhow::Result;
use clap::{Parser, Subcommand};
use clip_builder::local;
use clip_config::ConfigFile as _;
use std::io::Write;
use std::path::PathBuf;

/// Builds images, pushes them to the build registry, and creates and publishes their CLIP indexes.
#[derive(Debug, Parser)]
#[command(name = "clip-builder", version, about, arg_required_else_help = true)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Index an image in a registry and publish its index artifact (`index REF`), or index a
    /// layer blob on local disk (`index --layer BLOB --output FILE`).
    Index {
        /// Image reference (registry/repository:tag or @digest) to index and publish.
        #[arg(required_unless_present = "layer", conflicts_with = "layer")]
        reference: Option<String>,
        /// Local mode: the layer blob (gzip, zstd or plain tar).
        #[arg(long, value_name = "BLOB", requires = "output")]
        layer: Option<PathBuf>,
        /// Local mode: where to write the index.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Uncompressed bytes between seek points. Default: 256 KiB for published indexes
        /// (their windows are fetched per span), 4 MiB for local ones.
        #[arg(long, value_name = "BYTES")]
        span_size: Option<u64>,
        /// Local mode: expected layer digest (sha256:...), verified against the blob.
        #[arg(long)]
        digest: Option<String>,
        /// Local mode: media type to record.
        #[arg(long, default_value = "")]
        media_type: String,
        /// Local mode: write the packed form (zstd), as published to registries.
        #[arg(long)]
        packed: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Builder config (TOML): build registry and its long-term credentials, hosts_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A file holding `username:password` for the image's registry.
        #[arg(long, value_name = "FILE", env = "CLIP_CREDS_FILE")]
        creds_file: Option<PathBuf>,
        /// Talk plain HTTP to registries without hosts.toml configuration.
        #[arg(long)]
        plain_http: bool,
        /// containerd-style hosts directory (mirrors, CA, plain HTTP); overrides the config's.
        #[arg(long, value_name = "DIR")]
        hosts_dir: Option<PathBuf>,
        /// Platform to pick from a multi-platform image (os/arch[/variant]).
        #[arg(long, value_name = "PLATFORM")]
        platform: Option<String>,
        /// Sign the index artifact with this key (PEM, or cosign's encrypted `cosign.key`,
        /// whose password comes from --sign-key-password-file or COSIGN_PASSWORD).
        #[arg(long, value_name = "FILE")]
        sign_key: Option<PathBuf>,
        /// A file holding the password of an encrypted --sign-key.
        #[arg(long, value_name = "FILE")]
        sign_key_password_file: Option<PathBuf>,
    },
    /// Build an image with buildah, push it to the build registry with the build registry
    /// token (through a temporary authfile), index it and publish the index.
    Build {
        /// Builder config (TOML): build registry, buildah storage, state directory.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The image to build and push (in the build registry).
        #[arg(short = 't', long = "tag", value_name = "REF")]
        tag: String,
        /// The Containerfile (default: CONTEXT/Containerfile, else CONTEXT/Dockerfile).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
        #[arg(long = "build-arg", value_name = "K=V")]
        build_args: Vec<String>,
        #[arg(long)]
        platform: Option<String>,
        /// A file holding the BuildRegistryCreds (`user:password`); else the
        /// CLIP_BUILD_REGISTRY_CREDS environment variable; else minted from the config.
        #[arg(long, value_name = "FILE")]
        build_registry_creds_file: Option<PathBuf>,
        /// A file holding `user:password` for the registry of a FROM image (`-`: standard
        /// input), written for `--source-image-registry` only.
        #[arg(long, value_name = "FILE", requires = "source_image_registry")]
        source_image_creds_file: Option<PathBuf>,
        /// The registry (`host[:port]`) the source image credentials are for.
        #[arg(long, value_name = "HOST", requires = "source_image_creds_file")]
        source_image_registry: Option<String>,
        #[arg(long, value_name = "BYTES", default_value_t = clip_builder::publish::PUBLISH_SPAN_SIZE)]
        span_size: u64,
        #[arg(long)]
        json: bool,
        /// After indexing, record the image's access profile by running this command in it
        /// (`/bin/sh -c`, see `profile`) and publish it.
        #[arg(long, value_name = "CMD")]
        profile_cmd: Option<String>,
        /// Sign the index artifact with this key (PEM, or cosign's encrypted `cosign.key`,
        /// whose password comes from --sign-key-password-file or COSIGN_PASSWORD).
        #[arg(long, value_name = "FILE")]
        sign_key: Option<PathBuf>,
        /// A file holding the password of an encrypted --sign-key.
        #[arg(long, value_name = "FILE")]
        sign_key_password_file: Option<PathBuf>,
        context: PathBuf,
    },
    /// Record an image's access profile by running a command in it, served lazily over its
    /// published CLIP index as a node serves it (layers downloaded once into a temporary
    /// directory), and publish the profile as an artifact referring to the image manifest.
    Profile {
        #[command(flatten)]
        registry: RegistryArgs,
        /// The command (`/bin/sh -c`), run as root in the image's environment and working
        /// directory, in its own PID and mount namespaces.
        #[arg(long, value_name = "CMD")]
        cmd: String,
        /// Seconds after which the command is killed (the profile holds what it read by then).
        #[arg(long, default_value_t = 30)]
        limit_s: u64,
        #[arg(long)]
        json: bool,
        reference: String,
    },
    /// Download an image's index artifact and its blobs into a directory (to copy it to another
    /// registry or an air-gapped site).
    FetchIndex {
        #[command(flatten)]
        registry: RegistryArgs,
        /// Directory to write (`artifact.json`, `blobs/sha256/...`).
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
        reference: String,
    },
    /// Publish an index artifact stored by `fetch-index` for the same image in a registry.
    PushIndex {
        #[command(flatten)]
        registry: RegistryArgs,
        /// Directory written by `fetch-index`.
        #[arg(long = "from", value_name = "DIR")]
        from: PathBuf,
        reference: String,
    },
    /// Describe an index: sizes, digests, seek points, entries.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Mint the short-lived build registry token (BuildRegistryCreds) from the config's
    /// long-term credentials. Prints `username:password` on stdout (the only place clip
    /// prints a secret) and its expiry on stderr; `--json` prints both as JSON on stdout.
    Token {
        /// Builder config (TOML). Default: /etc/clip/builder.toml.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print one file's bytes, read through the index by random access to the blob.
    Cat {
        #[arg(long, value_name = "FILE")]
        index: PathBuf,
        #[arg(long, value_name = "BLOB")]
        layer: PathBuf,
        /// Path inside the layer.
        path: String,
    },
}

/// How to reach an image's registry.
#[derive(Debug, clap::Args)]
struct RegistryArgs {
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A file holding `username:password` for the registry.
    #[arg(long, value_name = "FILE", env = "CLIP_CREDS_FILE")]
    creds_file: Option<PathBuf>,
    #[arg(long)]
    plain_http: bool,
    #[arg(long, value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
}

impl RegistryArgs {
    async fn repository(&self, reference: &str) -> Result<clip_registry::Repository> {
        let cfg = clip_config::BuilderConfig::load_or_default(self.config.as_deref())?;
        clip_builder::remote::repository(
            &cfg,
            reference,
            self.creds_file.as_deref(),
            self.plain_http,
            self.hosts_dir.clone(),
        )
        .await
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match run(args) {
        // `clip-builder inspect x | head` is not an error.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => {
            Ok(())
        }
        other => other,
    }
}

fn run(args: Args) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.command {
        Command::Index {
            reference: None,
            layer: Some(layer),
            output: Some(output),
            span_size,
            digest,
            media_type,
            packed,
            json,
            ..
        } => {
            let span_size = span_size.unwrap_or(clip_index::build::DEFAULT_SPAN_SIZE);
            let opts =
                clip_index::BuildOptions { span_size, expected_digest: digest, media_type, expected_diff_id: None };
            let (index, packed_size) = local::index_file(&layer, &output, &opts, packed)?;
            if json {
                writeln!(out, "{}", local::describe(&index, packed_size, false)?)?;
            } else {
                writeln!(
                    out,
                    "indexed {} -> {}: {} entries, {} spans, index {} bytes, packed {} bytes ({:.3}% of {} compressed bytes)",
                    layer.display(),
                    output.display(),
                    index.entry_count(),
                    index.span_count(),
                    index.bytes().len(),
                    packed_size,
                    packed_size as f64 * 100.0 / index.compressed_size().max(1) as f64,
                    index.compressed_size()
                )?;
            }
        }
        Command::Index {
            reference: Some(reference),
            span_size,
            json,
            config,
            creds_file,
            plain_http,
            hosts_dir,
            platform,
            sign_key,
            sign_key_password_file,
            ..
        } => {
            let sign_key = clip_builder::signing::load(sign_key.as_deref(), sign_key_password_file.as_deref())?;
            let cfg = clip_config::BuilderConfig::load_or_default(config.as_deref())?;
            let platform = match platform {
                Some(p) => clip_registry::Platform::parse(&p).with_context(|| format!("bad --platform {p:?}"))?,
                None => clip_registry::Platform::default(),
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let result = rt.block_on(async {
                let repo =
                    clip_builder::remote::repository(&cfg, &reference, creds_file.as_deref(), plain_http, hosts_dir)
                        .await?;
                let image = repo.image.clone();
                let span_size = span_size.unwrap_or(clip_builder::publish::PUBLISH_SPAN_SIZE);
                let opts = clip_builder::publish::IndexOptions {
                    span_size,
                    cache_dir: cfg.state_dir.as_ref().map(|d| d.join("indexes")),
                    sign_key,
                    ..Default::default()
                };
                clip_builder::publish::index_image(
                    std::sync::Arc::new(repo),
                    image.manifest_reference(),
                    &platform,
                    &opts,
                )
                .await
            })?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?;
            } else {
                for l in &result.layers {
                    writeln!(
                        out,
                        "layer {}: {} bytes, {} entries, {} spans, index {} bytes, {:.2} s",
                        l.layer_digest, l.layer_size, l.entries, l.spans, l.index_size, l.seconds
                    )?;
                }
                writeln!(out, "image {}\nindex {} ({:.2} s)", result.image, result.index_digest, result.seconds)?;
                if let Some(s) = &result.signature {
                    writeln!(out, "signature {s}")?;
                }
                for (k, v) in &result.labels {
                    writeln!(out, "label {k}={v}")?;
                }
            }
        }
        Command::Index { .. } => anyhow::bail!("give an image reference, or --layer with --output"),
        Command::Build {
            config,
            tag,
            file,
            build_args,
            platform,
            build_registry_creds_file,
            source_image_creds_file,
            source_image_registry,
            span_size,
            json,
            profile_cmd,
            sign_key,
            sign_key_password_file,
            context,
        } => {
            use clip_registry::credentials::{Credential, Source};
            let sign_key = clip_builder::signing::load(sign_key.as_deref(), sign_key_password_file.as_deref())?;
            let cfg = clip_config::BuilderConfig::load_or_default(config.as_deref())?;
            let build_registry_creds = match (build_registry_creds_file, std::env::var("CLIP_BUILD_REGISTRY_CREDS")) {
                (Some(f), _) => Some(Credential::read_file(&f, Source::BuildRegistryCreds)?),
                (None, Ok(v)) if !v.is_empty() => Some(Credential::parse(v.trim(), Source::BuildRegistryCreds)?),
                _ => None,
            };
            let source_image_creds = match (source_image_creds_file, source_image_registry) {
                (Some(f), Some(registry)) => Some(clip_builder::build::SourceImageCreds {
                    registry,
                    credential: Credential::read_file(&f, Source::SourceImageCreds)?,
                }),
                _ => None,
            };
            let request = clip_builder::build::BuildRequest {
                reference: tag,
                containerfile: file,
                build_args,
                platform,
                context,
                build_registry_creds,
                source_image_creds,
                span_size,
                profile_cmd,
                sign_key,
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(clip_builder::build::build(&cfg, &request))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                writeln!(
                    out,
                    "built {}\nindex {}\nbuild {:.1} s, push {:.1} s, index {:.1} s",
                    report.image, report.index_digest, report.build_seconds, report.push_seconds, report.index_seconds
                )?;
                for (k, v) in &report.labels {
                    writeln!(out, "label {k}={v}")?;
                }
                if let Some(p) = &report.profile {
                    writeln!(out, "profile {} ({} reads)", p.profile_digest, p.reads)?;
                }
            }
        }
        Command::Profile { registry, cmd, limit_s, json, reference } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(async {
                let repo = std::sync::Arc::new(registry.repository(&reference).await?);
                let r = repo.image.manifest_reference().to_string();
                let limit = std::time::Duration::from_secs(limit_s);
                clip_builder::profile::record_and_publish(repo, &r, &clip_registry::Platform::default(), &cmd, limit)
                    .await
            })?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                writeln!(
                    out,
                    "profile {} of {}: {} reads in {} layers, command exit {:?}, {:.1} s",
                    report.profile_digest, report.image, report.reads, report.layers, report.exit_code, report.seconds
                )?;
            }
        }
        Command::FetchIndex { registry, output, reference } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let digest = rt.block_on(async {
                let repo = registry.repository(&reference).await?;
                let r = repo.image.manifest_reference().to_string();
                clip_builder::transfer::fetch(&repo, &r, &output).await
            })?;
            writeln!(out, "index {digest} of {reference} stored in {}", output.display())?;
        }
        Command::PushIndex { registry, from, reference } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let digest = rt.block_on(async {
                let repo = registry.repository(&reference).await?;
                let r = repo.image.manifest_reference().to_string();
                clip_builder::transfer::push(&repo, &r, &from).await
            })?;
            writeln!(out, "index {digest} published for {reference}")?;
        }
        Command::Inspect { file, json } => {
            let index = local::open_index(&file)?;
            if json {
                let packed_size = index.pack()?.len();
                writeln!(out, "{}", serde_json::to_string_pretty(&local::describe(&index, packed_size, true)?)?)?;
            } else {
                local::print_human(&index, &mut out)?;
            }
        }
        Command::Token { config, json } => {
            let cfg = clip_config::BuilderConfig::load_or_default(config.as_deref())?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let token = rt.block_on(clip_builder::token::mint(&cfg))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&token)?)?;
            } else {
                writeln!(out, "{}", token.build_registry_creds)?;
                match token.expires_in_seconds {
                    Some(s) => eprintln!(
                        "build registry {} ({}): token for {} expires in {s} s (at {} s since the epoch)",
                        token.registry,
                        token.kind,
                        token.username,
                        token.expires_at.unwrap_or_default()
                    ),
                    None => eprintln!("build registry {} ({}): credentials do not expire", token.registry, token.kind),
                }
            }
        }
        Command::Cat { index, layer, path } => {
            let index = local::open_index(&index)?;
            local::cat(&index, &layer, &path, &mut out)?;
        }
    }
    Ok(())
}
