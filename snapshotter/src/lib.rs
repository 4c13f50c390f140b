//! `clip-snapshotter`: the containerd proxy snapshotter service — the snapshots API over gRPC,
//! its metadata, and remote Prepare (finding a layer's index and mounting it lazily). The read
//! path (`clip-readpath`), the FUSE layer and its restart machinery (`clip-layerfs`), the CRI
//! image-service proxy (`clip-cri-proxy`) and the pull client (`clip-pull`) are crates of their
//! own; `docs/architecture.md` draws the graph and the flows. Map:
//! - [`daemon`]: socket, gRPC server, readiness, signals;
//! - [`service`]: the snapshots API (Prepare, View, Mounts, Commit, Remove, Stat, Update,
//!   Usage, Walk, Cleanup) with containerd's semantics and error codes;
//! - [`metadata`]: snapshot records in redb, one transaction per operation;
//! - [`dirs`]: the snapshot directories `snapshots/<id>/{fs,work}` and their disk usage;
//! - [`mounts`]: the bind and overlay mounts handed to containerd;
//! - [`labels`]: where snapshot labels are validated and secret labels split off;
//! - [`unpacked`]: the Prepare of a layer no index serves, unpacked here instead of by
//!   containerd (where a layer is unpacked: `clip-unpack`);
//! - [`remote`]: the lazy-layer engine, in parts — where credentials are chosen
//!   ([`remote::sessions`]), index discovery, the cache layout, the layer table (mounts, and a
//!   gate per layer that orders its Prepares and Removes), the read settings, and where a
//!   mount is made (`remote/mount.rs`);
//! - [`content_lookup`]: which image layer a Prepare without layer labels is, from
//!   containerd's content store; [`request_namespace`]: the namespace of the call;
//! - [`filter`]: containerd's filter syntax for Walk;
//! - [`metrics`]: Prometheus counters and latencies; [`logging`]: tracing set-up.
//!

pub mod content_lookup;
pub mod daemon;
pub mod dirs;
pub mod error;
pub mod filter;
pub mod labels;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod mounts;
pub mod remote;
pub mod request_namespace;
pub mod service;
pub mod unpacked;

pub use error::SnapshotError;
