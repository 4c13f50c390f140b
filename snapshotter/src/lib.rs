//! `clip-snapshotter`: the containerd proxy snapshotter.
//!
//! The only crate that talks to containerd and FUSE. It will own the snapshots gRPC service,
//! metadata (redb), overlay mounts, FUSE layers, the span cache, background fetch, metrics and
//! the `pull` client (issues 5 and 6). Today it holds the daemon's logging set-up.

pub mod logging;
