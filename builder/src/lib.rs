//! `clip-builder`: the only crate that runs buildah.
//!
//! It owns the build-time path: buildah build and push with the build registry token, index
//! creation from the pushed image, publication of the index artifact, and the local index tools
//! ([`local`]) used by tests, benchmarks and users debugging an image.

pub mod build;
pub mod local;
pub mod profile;
pub mod progress;
pub mod publish;
pub mod remote;
pub mod sandbox;
pub mod signing;
mod stream;
pub mod token;
pub mod transfer;
