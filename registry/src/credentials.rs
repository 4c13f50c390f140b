//! Credentials and their priority chain (docs/architecture.md, "Credentials"):
//! 1. `clip.image-creds`, 2. `clip.source-image-creds` (both for the image's own registry),
//! 3. `clip.build-registry-creds` — only when the image's registry *is* the configured build
//!    registry (normalised `host[:port]` equality) and its repository is under the configured
//!    prefix, 4. a token minted from the configured long-term credentials (same rule),
//! 5. kubelet credential provider plugins (`provider.rs`),
//! 6. a secret keychain: the node's pull secrets from the Kubernetes API ([`Keychain`]),
//! 7. docker `config.json` with credential helpers, 8. anonymous.
//!
//! The chain is built per image; the client walks it on 401/403.

pub use crate::credential::Credential;
use crate::error::{RegistryError, Result};
use crate::mint::TokenMinter;
use crate::provider::CredentialProviders;
use crate::reference::{Reference, normalize_registry};
pub use crate::source::Source;
use std::sync::Arc;

/// The configured build registry: which images build registry credentials apply to.
#[derive(Debug, Clone)]
pub struct BuildRegistryScope {
    /// Normalised `host[:port]`.
    pub registry: String,
    /// Repository prefix (`userimages` matches `userimages` and `userimages/...`); empty = all.
    pub repository_prefix: String,
}

impl BuildRegistryScope {
    pub fn new(registry: &str, repository_prefix: &str) -> Self {
        Self {
            registry: normalize_registry(registry),
            repository_prefix: repository_prefix.trim_matches('/').to_string(),
        }
    }

    /// Exact registry equality plus a path-component prefix match — never a substring test.
    pub fn covers(&self, image: &Reference) -> bool {
        if image.registry != self.registry {
            return false;
        }
        let p = &self.repository_prefix;
        p.is_empty()
            || image.repository == *p
            || image.repository.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('/'))
    }
}

/// Credentials kept elsewhere by registry host, asked at each use (a Kubernetes secret
/// keychain: `clip-kube-keychain`).
pub trait Keychain: Send + Sync + std::fmt::Debug {
    /// The credential for `registry` (normalised `host[:port]`), if one is known now.
    fn credential(&self, registry: &str) -> Option<Credential>;
}

/// One entry of a chain.
#[derive(Debug, Clone)]
pub enum Candidate {
    Static(Source, Credential),
    Minted(Arc<TokenMinter>),
    /// kubelet credential provider plugins.
    Provider(Arc<CredentialProviders>),
    /// Pull secrets from the Kubernetes API.
    Keychain(Arc<dyn Keychain>),
    /// Docker's `config.json`: the given file, or `$DOCKER_CONFIG`/`~/.docker`.
    DockerConfig(Option<std::path::PathBuf>),
    Anonymous,
}

impl Candidate {
    pub fn source(&self) -> Source {
        match self {
            Self::Static(s, _) => *s,
            Self::Minted(_) => Source::MintedBuildRegistryToken,
            Self::Provider(_) => Source::CredentialProvider,
            Self::Keychain(_) => Source::KubernetesSecret,
            Self::DockerConfig(_) => Source::DockerConfig,
            Self::Anonymous => Source::Anonymous,
        }
    }

    /// The credential to send to a mirror `host` of the image's registry: only one configured
    /// for that host itself (docker `config.json`); the image registry's own credentials — labels,
    /// pull secrets, build registry tokens — are never a mirror's.
    pub async fn resolve_for_mirror(&self, host: &str) -> Result<Option<Credential>> {
        match self {
            Self::DockerConfig(path) => docker_config_credential(host, path.clone()).await,
            Self::Static(..) | Self::Minted(_) | Self::Provider(_) | Self::Keychain(_) | Self::Anonymous => Ok(None),
        }
    }

    /// The credential to send for `image`, if any, and when to ask again before using it
    /// further (a minted token at 80 % of its lifetime, a plugin's answer at the end of its
    /// cache duration). `refresh` forces a minted token to be re-minted.
    pub async fn resolve(&self, image: &Reference, refresh: bool) -> Result<Option<Resolved>> {
        let lasting = |c: Option<Credential>| c.map(|credential| Resolved { credential, renew_at: None });
        match self {
            Self::Static(_, c) => Ok(lasting(Some(c.clone()))),
            Self::Minted(m) => {
                let t = m.current(refresh).await?;
                Ok(Some(Resolved { renew_at: t.renew_at(), credential: t.credential }))
            }
            Self::Provider(p) => {
                Ok(p.credential(image, refresh).await?.map(|(credential, renew_at)| Resolved { credential, renew_at }))
            }
            Self::Keychain(k) => Ok(lasting(k.credential(&image.registry))),
            Self::DockerConfig(path) => Ok(lasting(docker_config_credential(&image.registry, path.clone()).await?)),
            Self::Anonymous => Ok(None),
        }
    }
}

/// A credential to send, and when to ask for it again.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub credential: Credential,
    pub renew_at: Option<std::time::Instant>,
}

/// What a caller knows about an image's credentials.
#[derive(Debug, Clone, Default)]
pub struct ChainInputs {
    pub image_creds: Option<Credential>,
    /// Pull secrets kubelet passed for this image's repository (CRI image service proxy): the
    /// one containerd accepted first, then any offered for pulls still running.
    pub cri_pull_secrets: Vec<Credential>,
    pub source_image_creds: Option<Credential>,
    pub build_registry_creds: Option<Credential>,
    pub build_registry: Option<BuildRegistryScope>,
    pub minter: Option<Arc<TokenMinter>>,
    /// kubelet credential provider plugins the node configured.
    pub providers: Option<Arc<CredentialProviders>>,
    /// The node's secret keychain (`[kubernetes] secret_keychain`).
    pub keychain: Option<Arc<dyn Keychain>>,
    /// Consult docker `config.json` and its credential helpers.
    pub docker_config: bool,
    /// That `config.json` instead of `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config_path: Option<std::path::PathBuf>,
}

/// The ordered candidates for one image.
#[derive(Debug, Clone)]
pub struct CredentialChain {
    pub candidates: Vec<Candidate>,
}

impl CredentialChain {
    /// Only anonymous access.
    pub fn anonymous() -> Self {
        Self { candidates: vec![Candidate::Anonymous] }
    }

    pub fn for_image(image: &Reference, inputs: &ChainInputs) -> Self {
        let mut candidates = Vec::new();
        if let Some(c) = &inputs.image_creds {
            candidates.push(Candidate::Static(Source::ImageCreds, c.clone()));
        }
        for c in &inputs.cri_pull_secrets {
            candidates.push(Candidate::Static(Source::CriPullSecret, c.clone()));
        }
        if let Some(c) = &inputs.source_image_creds {
            candidates.push(Candidate::Static(Source::SourceImageCreds, c.clone()));
        }
        let in_build_registry = inputs.build_registry.as_ref().is_some_and(|b| b.covers(image));
        if in_build_registry {
            if let Some(c) = &inputs.build_registry_creds {
                candidates.push(Candidate::Static(Source::BuildRegistryCreds, c.clone()));
            }
            if let Some(m) = &inputs.minter {
                candidates.push(Candidate::Minted(m.clone()));
            }
        }
        if let Some(p) = &inputs.providers {
            candidates.push(Candidate::Provider(p.clone()));
        }
        if let Some(k) = &inputs.keychain {
            candidates.push(Candidate::Keychain(k.clone()));
        }
        if inputs.docker_config {
            candidates.push(Candidate::DockerConfig(inputs.docker_config_path.clone()));
        }
        candidates.push(Candidate::Anonymous);
        Self { candidates }
    }
}

/// Docker's `config.json` (`$DOCKER_CONFIG` or `~/.docker`), with credential helpers.
async fn docker_config_credential(registry: &str, path: Option<std::path::PathBuf>) -> Result<Option<Credential>> {
    let server = if registry == crate::reference::DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    };
    let result = tokio::task::spawn_blocking(move || match path {
        Some(p) => std::fs::File::open(&p)
            .map_err(|_| docker_credential::CredentialRetrievalError::ConfigReadError)
            .and_then(|f| docker_credential::get_credential_from_reader(std::io::BufReader::new(f), &server)),
        None => docker_credential::get_credential(&server),
    })
    .await
    .map_err(|e| RegistryError::Credentials { source_name: Source::DockerConfig.name(), message: e.to_string() })?;
    match result {
        Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => Ok(Some(Credential::new(u, p))),
        Ok(docker_credential::DockerCredential::IdentityToken(token)) => Ok(Some(Credential::identity_token(token))),
        // No config, no entry for this registry: nothing to offer.
        Err(e) => {
            tracing::debug!(registry, error = %e, "no docker config.json credential");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).expect("reference")
    }

    #[test]
    fn build_registry_scope_is_exact() {
        let b = BuildRegistryScope::new("Registry.Example:5000", "userimages");
        assert!(b.covers(&r("registry.example:5000/userimages/app:1")));
        assert!(b.covers(&r("registry.example:5000/userimages")));
        assert!(!b.covers(&r("registry.example:5000/userimagesx/app")));
        assert!(!b.covers(&r("registry.example:5001/userimages/app")));
        assert!(!b.covers(&r("evil-registry.example:5000/userimages/app")));
        assert!(!b.covers(&r("registry.example.evil.io:5000/userimages/app")));
        let hub = BuildRegistryScope::new("index.docker.io", "");
        assert!(hub.covers(&r("busybox")));
    }

    /// A keychain that knows one registry.
    #[derive(Debug)]
    struct OneRegistry;

    impl Keychain for OneRegistry {
        fn credential(&self, registry: &str) -> Option<Credential> {
            (registry == "reg.io").then(|| Credential::new("kc", "p"))
        }
    }

    #[test]
    fn chain_order_follows_the_design() {
        let inputs = ChainInputs {
            image_creds: Some(Credential::new("i", "p")),
            cri_pull_secrets: vec![Credential::new("k", "p")],
            source_image_creds: Some(Credential::new("s", "p")),
            build_registry_creds: Some(Credential::new("b", "p")),
            build_registry: Some(BuildRegistryScope::new("reg.io", "team")),
            minter: None,
            providers: None,
            keychain: Some(Arc::new(OneRegistry)),
            docker_config: true,
            docker_config_path: None,
        };
        let sources = |img: &str| -> Vec<Source> {
            CredentialChain::for_image(&r(img), &inputs).candidates.iter().map(Candidate::source).collect()
        };
        assert_eq!(
            sources("reg.io/team/app"),
            vec![
                Source::ImageCreds,
                Source::CriPullSecret,
                Source::SourceImageCreds,
                Source::BuildRegistryCreds,
                Source::KubernetesSecret,
                Source::DockerConfig,
                Source::Anonymous
            ]
        );
        assert_eq!(
            sources("other.io/team/app"),
            vec![
                Source::ImageCreds,
                Source::CriPullSecret,
                Source::SourceImageCreds,
                Source::KubernetesSecret,
                Source::DockerConfig,
                Source::Anonymous
            ]
        );
    }

    #[tokio::test]
    async fn a_keychain_answers_at_each_use_for_the_images_registry_only() {
        let k = Candidate::Keychain(Arc::new(OneRegistry));
        let got = k.resolve(&r("reg.io/team/app"), false).await.expect("resolve").expect("a credential");
        assert_eq!(got.credential.username, "kc");
        assert!(k.resolve(&r("other.io/team/app"), false).await.expect("resolve").is_none());
        assert!(k.resolve_for_mirror("reg.io").await.expect("mirror").is_none());
    }

    #[tokio::test]
    async fn docker_config_identity_tokens_are_kept_for_the_token_exchange() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"reg.example":{"identitytoken":"IDENTITY-SENTINEL"}}}"#).expect("write");
        let resolved = Candidate::DockerConfig(Some(path))
            .resolve(&r("reg.example/team/app:1"), false)
            .await
            .expect("resolve")
            .expect("an identity token");
        assert!(resolved.credential.is_identity_token());
        assert_eq!(resolved.credential.password.expose(), "IDENTITY-SENTINEL");
    }

    #[test]
    fn parse_never_echoes() {
        let e = Credential::parse("no-colon-SENTINEL", Source::ImageCreds).expect_err("bad");
        assert!(!e.to_string().contains("SENTINEL"));
        let c = Credential::parse("AWS:pa:ss", Source::ImageCreds).expect("ok");
        assert_eq!((c.username.as_str(), c.password.expose()), ("AWS", "pa:ss"));
        assert!(!format!("{c:?}").contains("pa:ss"));
    }
}
