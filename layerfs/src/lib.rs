//! `clip-layerfs`: where a lazy layer is mounted. A layer's CLIP index presented read-only over
//! FUSE as the unpacked layer ([`fs::LayerFs`]; bytes from `clip-readpath`'s span cache, fully
//! local files handed to the kernel by FUSE passthrough), with the machinery that lets running
//! containers survive a daemon restart: the fd keeper process that holds each `/dev/fuse`
//! connection ([`keeper`]), the per-session state the next daemon needs ([`session_state`]) and
//! serving a kept connection again ([`reattach`]), all asking the kernel for one set of
//! [`capabilities`]. See `docs/architecture.md`.

pub mod capabilities;
pub mod fs;
pub mod keeper;
mod passthrough;
pub mod reattach;
pub mod session_state;

pub use fs::{LayerFs, mount, mount_for_untrusted_code};
pub use reattach::reattach;
