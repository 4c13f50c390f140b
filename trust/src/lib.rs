//! Signed CLIP indexes: the trust a shared node can place in an index that someone else made.
//!
//! An index decides what a lazily served layer shows (names, owners, modes, data offsets), so a
//! node shared by tenants should serve only indexes made by a builder it trusts. This crate
//! signs an image's index artifact in cosign's format — a simple-signing payload naming the
//! artifact's digest, signed with an ECDSA P-256 key, stored in the artifact's repository under
//! the tag `sha256-<hex>.sig` — so that `cosign verify --key` accepts it, and checks such a
//! signature (made by `clip-builder` or by `cosign sign`) against a node's trusted public keys.
//!
//! - [`keys`]: the trusted public keys, and the signing key (PEM, or cosign's encrypted
//!   `cosign.key`);
//! - [`payload`]: the simple-signing payload and its claims;
//! - [`cosign`]: signatures in a registry — publishing one, finding a trusted one.

pub mod cosign;
mod error;
pub mod keys;
pub mod payload;

pub use error::TrustError;
pub use keys::{SignKey, TrustedKeys};
