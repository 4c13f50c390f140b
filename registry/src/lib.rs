//! `clip-registry`: the only crate that speaks HTTP to registries.
//!
//! - [`reference`]: image references and registry name normalisation;
//! - [`image`]: chain ids from an image config's diff ids;
//! - [`hosts`]: containerd `hosts.toml` (mirrors, CA, skip_verify, plain HTTP);
//! - [`client`]: HTTP clients, the per-repository request loop (endpoints, retries, auth
//!   challenges, redirects without `Authorization`); `auth.rs`: challenges answered per
//!   endpoint host along the credential chain, tokens fetched and renewed;
//! - [`api`]: manifests, blobs, **Range** reads, uploads, referrers (a whole blob streamed and
//!   checked as it arrives and resumed by Range where it broke off: `blob_stream.rs`);
//! - [`credentials`]: the priority chain of credentials (docs/architecture.md, "Credentials"),
//!   over a [`Credential`] and its [`Source`] (leaf modules every other one may name);
//! - [`mint`]: short-lived tokens minted from long-term credentials (ECR, GCP, basic);
//! - [`provider`]: kubelet credential provider plugins (the exec protocol);
//! - [`challenge`]: `WWW-Authenticate` parsing; [`Secret`]: a string that never prints.

mod answer;
pub mod api;
mod auth;
mod blob_stream;
mod body;
pub mod challenge;
pub mod client;
mod content;
mod credential;
pub mod credentials;
pub mod error;
pub mod hosts;
pub mod image;
pub mod mint;
mod op;
pub mod provider;
pub mod reference;
mod secret;
mod source;
pub mod tls;
mod token;

pub use api::{FetchedManifest, Platform};
pub use blob_stream::BLOB_RESUMES;
pub use client::{RegistryClient, Repository, RetryPolicy, Timeouts};
pub use credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain, Source};
pub use error::RegistryError;
pub use hosts::HostsConfig;
pub use mint::{MintedToken, TokenMinter};
pub use reference::Reference;
pub use secret::Secret;
