//! `clip-snapshotter`: the containerd proxy snapshotter.
//!
//! The only crate that talks to containerd and FUSE. Map:
//! - [`daemon`]: socket, gRPC server, readiness, signals;
//! - [`service`]: the snapshots API (Prepare, View, Mounts, Commit, Remove, Stat, Update,
//!   Usage, Walk, Cleanup) with containerd's semantics and error codes;
//! - [`metadata`]: snapshot records in redb, one transaction per operation;
//! - [`dirs`]: the snapshot directories `snapshots/<id>/{fs,work}` and their disk usage;
//! - [`mounts`]: the bind and overlay mounts handed to containerd;
//! - [`labels`]: where snapshot labels are validated and secret labels split off;
//! - [`layerfs`]: lazy layers over FUSE and the span cache (where a span is fetched);
//! - [`remote`]: remote Prepare — finding a layer's index and mounting it lazily;
//! - [`content_lookup`]: which image layer a Prepare without layer labels is, from
//!   containerd's content store; [`request_namespace`]: the namespace of the call;
//! - [`keeper`]: the process that keeps FUSE connections alive across daemon restarts;
//! - [`cri_proxy`]: the CRI image service proxy that hands kubelet's pull secrets to lazy layers;
//! - [`pull`]: the `pull` client that prepares an image's layers through containerd;
//! - [`filter`]: containerd's filter syntax for Walk;
//! - [`metrics`]: Prometheus counters and latencies; [`logging`]: tracing set-up.
//!

pub mod content_lookup;
pub mod cri_proxy;
pub mod daemon;
pub mod dirs;
pub mod error;
pub mod filter;
pub mod keeper;
pub mod labels;
pub mod layerfs;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod mounts;
pub mod pull;
pub mod remote;
pub mod request_namespace;
pub mod service;

pub use error::SnapshotError;
