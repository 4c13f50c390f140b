//! `clip-builder`: the builder binary. Argument parsing and wiring only.

use clap::{Parser, Subcommand};

/// Builds images, pushes them to the build registry, and creates and publishes their CLIP indexes.
#[derive(Debug, Parser)]
#[command(name = "clip-builder", version, about, arg_required_else_help = true)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {}
}
