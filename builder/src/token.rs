//! `clip-builder token`: mint the BuildRegistryCreds (a short-lived `username:password` for the
//! build registry) from the config's long-term credentials, for a scheduler to hand on.

use anyhow::{Context, Result};
use clip_config::BuilderConfig;
use clip_registry::TokenMinter;
use std::time::{SystemTime, UNIX_EPOCH};

/// What `clip-builder token --json` prints. The only output of clip that holds a secret.
#[derive(Debug, serde::Serialize)]
pub struct TokenOutput {
    pub registry: String,
    pub repository: String,
    pub kind: &'static str,
    pub username: String,
    /// `username:password`, ready for the `clip.build-registry-creds` label.
    pub build_registry_creds: String,
    /// Seconds since the epoch; absent for credentials that do not expire.
    pub expires_at: Option<u64>,
    pub expires_in_seconds: Option<u64>,
}

pub async fn mint(cfg: &BuilderConfig) -> Result<TokenOutput> {
    let br = cfg.build_registry.as_ref().context("the config has no [build_registry] section")?;
    let creds = br.credentials.as_ref().context("the config has no [build_registry.credentials]")?;
    let minter = TokenMinter::from_config(creds).await?;
    let token = minter.mint().await.with_context(|| format!("minting a token for build registry {}", br.registry))?;
    let expires_at = token.expires_at.and_then(|e| e.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs());
    let expires_in_seconds =
        token.expires_at.and_then(|e| e.duration_since(SystemTime::now()).ok()).map(|d| d.as_secs());
    Ok(TokenOutput {
        registry: clip_registry::reference::normalize_registry(&br.registry),
        repository: br.repository.clone(),
        kind: minter.kind_name(),
        username: token.credential.username.clone(),
        build_registry_creds: format!("{}:{}", token.credential.username, token.credential.password.expose()),
        expires_at,
        expires_in_seconds,
    })
}
