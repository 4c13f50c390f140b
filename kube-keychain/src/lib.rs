//! `clip-kube-keychain`: a Kubernetes secret keychain. It owns one thing: which registry
//! credentials the cluster's pull secrets hold right now.
//!
//! [`SecretKeychain::start`] reaches the API server (a kubeconfig, or the pod's service account)
//! and watches Secrets of type `kubernetes.io/dockerconfigjson` — cluster-wide, or in the
//! configured namespaces — keeping what each one's `.dockerconfigjson` holds
//! ([`dockerconfig`]). The snapshotter asks it, through [`clip_registry::credentials::Keychain`],
//! for the credential of an image's registry when earlier sources gave none that worked (the
//! chain of `clip_registry::credentials`). The most recently changed secret naming a registry
//! answers for it. Secrets are never logged: only their namespace and name.
//!
//! What it needs: `get`, `list` and `watch` on `secrets` (a ClusterRole, or a Role per
//! namespace). What it allows on a shared cluster is in docs/kubernetes.md.

pub mod dockerconfig;

use clip_config::KubernetesConfig;
use clip_registry::credentials::{Credential, Keychain};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The Secret type and key of docker config pull secrets.
const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

#[derive(Debug, thiserror::Error)]
pub enum KeychainError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("the in-cluster service account: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("a Kubernetes API client: {0}")]
    Client(#[source] kube::Error),
}

/// A secret by namespace and name.
type SecretKey = (String, String);

/// What one secret holds, and when it was last seen changing.
#[derive(Debug)]
struct Held {
    changed: u64,
    credentials: Vec<(String, Credential)>,
}

/// The pull secrets of the cluster, as last seen.
#[derive(Debug, Default)]
pub struct SecretKeychain {
    secrets: Mutex<HashMap<SecretKey, Held>>,
    changes: AtomicU64,
}

impl SecretKeychain {
    /// Connects to the API server as `cfg` says and starts watching (on the current tokio
    /// runtime; the watches retry with backoff while the API server is unreachable).
    pub async fn start(cfg: &KubernetesConfig) -> Result<Arc<Self>, KeychainError> {
        let config = match &cfg.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .map_err(|source| KeychainError::Kubeconfig { path: path.display().to_string(), source })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|source| KeychainError::Kubeconfig { path: path.display().to_string(), source })?
            }
            None => kube::Config::incluster().map_err(KeychainError::InCluster)?,
        };
        // kube's TLS asks rustls for the process's crypto provider: ring, unless the daemon
        // chose one already (the workspace builds both ring and aws-lc-rs, so none is implied).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(config).map_err(KeychainError::Client)?;
        let keychain = Arc::new(Self::default());
        let scopes: Vec<Option<String>> =
            if cfg.namespaces.is_empty() { vec![None] } else { cfg.namespaces.iter().cloned().map(Some).collect() };
        for namespace in scopes {
            let api: Api<Secret> = match &namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            tokio::spawn(keychain.clone().watch(api, namespace));
        }
        Ok(keychain)
    }

    /// Follows the secrets of `api` (all namespaces when `namespace` is `None`) for good.
    async fn watch(self: Arc<Self>, api: Api<Secret>, namespace: Option<String>) {
        let config = watcher::Config::default().fields(&format!("type={DOCKER_CONFIG_JSON}"));
        let mut events = watcher(api, config).default_backoff().boxed();
        // The secrets seen during a (re)list: the others are gone when it ends.
        let mut listing: Option<HashSet<SecretKey>> = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => listing = Some(HashSet::new()),
                Ok(Event::InitApply(secret)) => {
                    if let Some(seen) = &mut listing {
                        seen.insert(key_of(&secret));
                    }
                    self.apply(&secret);
                }
                Ok(Event::InitDone) => {
                    let seen = listing.take().unwrap_or_default();
                    let in_scope = |ns: &str| namespace.as_deref().is_none_or(|n| n == ns);
                    self.secrets.lock().retain(|k, _| !in_scope(&k.0) || seen.contains(k));
                    tracing::info!(secrets = self.secrets.lock().len(), "pull secrets listed from the Kubernetes API");
                }
                Ok(Event::Apply(secret)) => self.apply(&secret),
                Ok(Event::Delete(secret)) => {
                    self.secrets.lock().remove(&key_of(&secret));
                }
                Err(e) => tracing::warn!(error = %e, "watching pull secrets in the Kubernetes API; retrying"),
            }
        }
    }

    /// Takes what `secret` holds now (or forgets it, when it holds nothing usable).
    fn apply(&self, secret: &Secret) {
        let key = key_of(secret);
        let bytes = secret.data.as_ref().and_then(|d| d.get(DOCKER_CONFIG_KEY)).map(|b| b.0.as_slice());
        let credentials = match bytes.map(dockerconfig::credentials) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                tracing::warn!(namespace = %key.0, secret = %key.1, error = %e, "ignoring a pull secret");
                Vec::new()
            }
            None => Vec::new(),
        };
        let mut secrets = self.secrets.lock();
        if credentials.is_empty() {
            secrets.remove(&key);
        } else {
            let changed = self.changes.fetch_add(1, Ordering::Relaxed);
            secrets.insert(key, Held { changed, credentials });
        }
    }

    /// How many secrets hold credentials now.
    pub fn len(&self) -> usize {
        self.secrets.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Keychain for SecretKeychain {
    fn credential(&self, registry: &str) -> Option<Credential> {
        let secrets = self.secrets.lock();
        secrets
            .values()
            .filter_map(|held| held.credentials.iter().find(|(r, _)| r == registry).map(|(_, c)| (held.changed, c)))
            .max_by_key(|(changed, _)| *changed)
            .map(|(_, c)| c.clone())
    }
}

fn key_of(secret: &Secret) -> SecretKey {
    (secret.namespace().unwrap_or_default(), secret.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(ns: &str, name: &str, config: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.type_ = Some(DOCKER_CONFIG_JSON.into());
        s.data = Some(BTreeMap::from([(DOCKER_CONFIG_KEY.to_string(), ByteString(config.as_bytes().to_vec()))]));
        s
    }

    fn password(k: &SecretKeychain, registry: &str) -> Option<String> {
        k.credential(registry).map(|c| c.password.expose().to_string())
    }

    #[test]
    fn the_most_recently_changed_secret_answers_and_a_deleted_or_broken_one_does_not() {
        let k = SecretKeychain::default();
        let a = secret("team-a", "pull", r#"{"auths":{"r.example:5000":{"username":"a","password":"pa"}}}"#);
        let b =
            secret("team-b", "pull", r#"{"auths":{"https://r.example:5000/v2/":{"username":"b","password":"pb"}}}"#);
        k.apply(&a);
        assert_eq!(password(&k, "r.example:5000").as_deref(), Some("pa"));
        k.apply(&b);
        assert_eq!(password(&k, "r.example:5000").as_deref(), Some("pb"));
        assert_eq!(password(&k, "other.example"), None);
        // b is replaced by a config that is not one: a answers again.
        k.apply(&secret("team-b", "pull", "Sentinel-not-json"));
        assert_eq!(password(&k, "r.example:5000").as_deref(), Some("pa"));
        k.secrets.lock().remove(&key_of(&a));
        assert_eq!(password(&k, "r.example:5000"), None);
        assert!(k.is_empty());
    }
}
