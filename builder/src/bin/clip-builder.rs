//! `clip-builder`: the builder binary. Argument parsing and wiring only.

use anyhow::Result;
use clap::{Parser, Subcommand};
use clip_builder::local;
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
    /// Index a layer blob (gzip, zstd or plain tar) on local disk.
    Index {
        /// The layer blob.
        #[arg(long, value_name = "BLOB")]
        layer: PathBuf,
        /// Where to write the index.
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
        /// Uncompressed bytes between seek points.
        #[arg(long, value_name = "BYTES", default_value_t = clip_index::build::DEFAULT_SPAN_SIZE)]
        span_size: u64,
        /// Expected layer digest (sha256:...), verified against the blob.
        #[arg(long)]
        digest: Option<String>,
        /// Media type to record.
        #[arg(long, default_value = "")]
        media_type: String,
        /// Write the packed form (zstd), as published to registries.
        #[arg(long)]
        packed: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
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

fn main() -> Result<()> {
    let args = Args::parse();
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
        Command::Index { layer, output, span_size, digest, media_type, packed, json } => {
            let opts = clip_index::BuildOptions { span_size, expected_digest: digest, media_type };
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
