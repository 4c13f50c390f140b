//! The builder's signing key: `--sign-key FILE`, with the password of cosign's encrypted
//! format from `--sign-key-password-file` or, as cosign reads it, `COSIGN_PASSWORD` (which
//! buildah is started without).

use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;

/// Loads the signing key, if one is given.
pub fn load(key: Option<&Path>, password_file: Option<&Path>) -> Result<Option<Arc<clip_trust::SignKey>>> {
    let password = match password_file {
        Some(f) => {
            Some(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?.trim_ascii_end().to_vec())
        }
        None => std::env::var("COSIGN_PASSWORD").ok().map(String::into_bytes),
    };
    let Some(path) = key else { return Ok(None) };
    Ok(Some(Arc::new(clip_trust::SignKey::load(path, password.as_deref())?)))
}
