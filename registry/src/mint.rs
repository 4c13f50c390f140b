//! Minting short-lived registry tokens from long-term credentials (the `[build_registry]`
//! section): ECR `GetAuthorizationToken` (`AWS:<password>`, ~12 h), a GCP service account's
//! OAuth access token (`oauth2accesstoken:<token>`, ~1 h), or basic `username:password`.
//! Tokens are cached and re-minted once 80 % of their lifetime has passed, so a reader running
//! for days never presents an expired token. No default cloud chain is consulted unless the
//! config opts in (`use_default_chain`).

use crate::credential::Credential;
use crate::error::{RegistryError, Result};
use clip_config::LongTermCredentials;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Mutex;

/// OAuth scope of GCP registry access.
pub const GCP_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// A minted credential and its lifetime.
#[derive(Debug, Clone)]
pub struct MintedToken {
    pub credential: Credential,
    pub minted_at: SystemTime,
    /// `None`: does not expire (basic credentials).
    pub expires_at: Option<SystemTime>,
}

impl MintedToken {
    /// The end of its freshness: 80 % of its lifetime; `None`: it does not expire.
    fn fresh_until(&self) -> Option<SystemTime> {
        let exp = self.expires_at?;
        let lifetime = exp.duration_since(self.minted_at).unwrap_or_default();
        Some(self.minted_at + lifetime.mul_f64(0.8))
    }

    /// Fresh while less than 80 % of the lifetime has passed.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.fresh_until().is_none_or(|until| now < until)
    }

    /// When a request should stop using it and ask for a fresh one (the end of its
    /// freshness); `None`: never.
    pub fn renew_at(&self) -> Option<std::time::Instant> {
        let left = self.fresh_until()?.duration_since(SystemTime::now()).unwrap_or_default();
        Some(std::time::Instant::now() + left)
    }
}

enum Kind {
    Basic(Credential),
    Ecr(aws_sdk_ecr::Client),
    Gcp(std::path::PathBuf),
}

/// Mints and caches tokens for one set of long-term credentials.
pub struct TokenMinter {
    kind: Kind,
    cache: Mutex<Option<MintedToken>>,
}

impl std::fmt::Debug for TokenMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Basic(_) => "TokenMinter(basic)",
            Kind::Ecr(_) => "TokenMinter(ecr)",
            Kind::Gcp(_) => "TokenMinter(gcp)",
        })
    }
}

impl TokenMinter {
    pub async fn from_config(creds: &LongTermCredentials) -> Result<Self> {
        let kind = match creds {
            LongTermCredentials::Basic { username, password, password_file } => {
                let password = match (password, password_file) {
                    (Some(p), _) => p.clone(),
                    (None, Some(f)) => std::fs::read_to_string(f)
                        .map_err(|e| RegistryError::Mint {
                            kind: "basic",
                            message: format!("reading password_file {}: {e}", f.display()),
                        })?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                    (None, None) => {
                        return Err(RegistryError::Mint {
                            kind: "basic",
                            message: "no password or password_file".into(),
                        });
                    }
                };
                Kind::Basic(Credential::new(username.clone(), password))
            }
            LongTermCredentials::Ecr { region, access_key_id, secret_access_key, use_default_chain, endpoint_url } => {
                let region = aws_sdk_ecr::config::Region::new(region.clone());
                let conf = match (access_key_id, secret_access_key) {
                    (Some(id), Some(secret)) => {
                        let creds = aws_credential_types::Credentials::new(
                            id.clone(),
                            secret.clone(),
                            None,
                            None,
                            "clip-config",
                        );
                        let mut b = aws_sdk_ecr::Config::builder()
                            .behavior_version(aws_sdk_ecr::config::BehaviorVersion::latest())
                            .region(region)
                            .credentials_provider(creds);
                        if let Some(url) = endpoint_url {
                            b = b.endpoint_url(url.clone());
                        }
                        b.build()
                    }
                    _ if *use_default_chain => {
                        let shared =
                            aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region).load().await;
                        let mut b = aws_sdk_ecr::config::Builder::from(&shared);
                        if let Some(url) = endpoint_url {
                            b = b.endpoint_url(url.clone());
                        }
                        b.build()
                    }
                    _ => {
                        return Err(RegistryError::Mint {
                            kind: "ecr",
                            message: "no access keys and use_default_chain is off".into(),
                        });
                    }
                };
                Kind::Ecr(aws_sdk_ecr::Client::from_conf(conf))
            }
            LongTermCredentials::Gcp { service_account_key_file } => Kind::Gcp(service_account_key_file.clone()),
        };
        Ok(Self { kind, cache: Mutex::new(None) })
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Basic(_) => "basic",
            Kind::Ecr(_) => "ecr",
            Kind::Gcp(_) => "gcp",
        }
    }

    /// The cached token while fresh, else a newly minted one; `force` always mints.
    pub async fn current(&self, force: bool) -> Result<MintedToken> {
        let mut cache = self.cache.lock().await;
        if !force
            && let Some(t) = cache.as_ref()
            && t.is_fresh(SystemTime::now())
        {
            return Ok(t.clone());
        }
        let t = self.mint().await?;
        tracing::info!(
            kind = self.kind_name(),
            expires_in_s = t.expires_at.and_then(|e| e.duration_since(SystemTime::now()).ok()).map(|d| d.as_secs()),
            "minted a build registry token"
        );
        *cache = Some(t.clone());
        Ok(t)
    }

    pub async fn credential(&self, force: bool) -> Result<Credential> {
        Ok(self.current(force).await?.credential)
    }

    /// Mints a new token, ignoring the cache.
    pub async fn mint(&self) -> Result<MintedToken> {
        let minted_at = SystemTime::now();
        match &self.kind {
            Kind::Basic(c) => Ok(MintedToken { credential: c.clone(), minted_at, expires_at: None }),
            Kind::Ecr(client) => mint_ecr(client, minted_at).await,
            Kind::Gcp(key_file) => mint_gcp(key_file, minted_at).await,
        }
    }
}

async fn mint_ecr(client: &aws_sdk_ecr::Client, minted_at: SystemTime) -> Result<MintedToken> {
    let err = |message: String| RegistryError::Mint { kind: "ecr", message };
    let out = client
        .get_authorization_token()
        .send()
        .await
        .map_err(|e| err(format!("GetAuthorizationToken: {}", crate::error::error_text(&e))))?;
    let data = out
        .authorization_data()
        .first()
        .ok_or_else(|| err("GetAuthorizationToken returned no authorizationData".into()))?;
    let token = data.authorization_token().ok_or_else(|| err("authorizationData has no authorizationToken".into()))?;
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| err("authorizationToken is not base64".into()))?;
    let decoded = String::from_utf8(decoded).map_err(|_| err("authorizationToken is not UTF-8".into()))?;
    let credential = Credential::parse(&decoded, crate::source::Source::MintedBuildRegistryToken)
        .map_err(|_| err("authorizationToken is not user:password".into()))?;
    let expires_at = data
        .expires_at()
        .and_then(|t| SystemTime::try_from(*t).ok())
        .or_else(|| Some(minted_at + Duration::from_secs(12 * 3600)));
    Ok(MintedToken { credential, minted_at, expires_at })
}

async fn mint_gcp(key_file: &std::path::Path, minted_at: SystemTime) -> Result<MintedToken> {
    use gcp_auth::TokenProvider;
    let err = |message: String| RegistryError::Mint { kind: "gcp", message };
    // A fresh provider per mint: gcp_auth caches internally and offers no forced refresh.
    let sa = gcp_auth::CustomServiceAccount::from_file(key_file)
        .map_err(|e| err(format!("service account key {}: {e}", key_file.display())))?;
    let sa = Arc::new(sa);
    let token = sa.token(&[GCP_SCOPE]).await.map_err(|e| err(format!("token request: {e}")))?;
    Ok(MintedToken {
        credential: Credential::new("oauth2accesstoken", token.as_str()),
        minted_at,
        expires_at: Some(SystemTime::from(token.expires_at())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_is_eighty_percent_of_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t = MintedToken {
            credential: Credential::new("u", "p"),
            minted_at: t0,
            expires_at: Some(t0 + Duration::from_secs(100)),
        };
        assert!(t.is_fresh(t0 + Duration::from_secs(79)));
        assert!(!t.is_fresh(t0 + Duration::from_secs(81)));
    }

    #[tokio::test]
    async fn basic_reads_password_file_and_never_expires() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").expect("write");
        let m = TokenMinter::from_config(&LongTermCredentials::Basic {
            username: "builder".into(),
            password: None,
            password_file: Some(f),
        })
        .await
        .expect("minter");
        let t = m.current(false).await.expect("token");
        assert_eq!(t.credential.password.expose(), "s3cret");
        assert!(t.expires_at.is_none());
    }
}
