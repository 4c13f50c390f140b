//! `clip-registry`: the only crate that speaks HTTP to registries.
//!
//! It will own the OCI distribution client (manifests, blobs, Range reads, auth challenges,
//! redirects, retries), image reference normalisation, the credential providers and their
//! priority chain, and token minting and refresh (ECR, GCP, basic). See issue 4.
//!
//! Today it holds only the secret type every other crate must use for credentials.

mod secret;

pub use secret::Secret;
