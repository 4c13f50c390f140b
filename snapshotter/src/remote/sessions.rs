//! Where credentials are chosen: one registry session per image, made from that image's
//! credential inputs — the `clip.*` labels its Prepares carried, the pull secret kubelet passed
//! for its repository (CRI image-service proxy), the build registry's minter, and docker's
//! `config.json` ([`CredentialChain::for_image`] orders them). Label credentials and pull
//! secrets are also kept in the root-only [`CredentialStore`] so lazy layers keep reading after
//! a restart. A changed input replaces the image's session; mounted layers read through a
//! [`Session::Image`] handle, so their next fetch uses the new one.
//!
//! One lock guards the inputs and the sessions together and is never held across I/O (the
//! store's writes, reading `hosts.toml`) nor while another part's lock is taken.

use super::creds_store::CredentialStore;
use super::error::RemoteError;
use super::layout::CacheLayout;
use clip_config::SnapshotterConfig;
use clip_config::labels as l;
use clip_registry::credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain, Source};
use clip_registry::{HostsConfig, Reference, RegistryClient, RegistryError, Repository, TokenMinter};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

/// Pull secrets live in the credential store under `cri-pull-secret:<registry>/<repository>`.
const PULL_SECRET_PREFIX: &str = "cri-pull-secret:";
const PULL_SECRET_KEY: &str = "auth";

/// The key pull secrets are kept under: the image's `registry/repository`.
fn pull_secret_key(image: &Reference) -> String {
    format!("{}/{}", image.registry, image.repository)
}

/// The chain inputs the `clip.*` credential labels give.
pub(crate) fn inputs_from_labels(secrets: &BTreeMap<String, String>) -> Result<ChainInputs, RemoteError> {
    let parse = |label: &'static str, source: Source| -> Result<Option<Credential>, RemoteError> {
        secrets
            .get(label)
            .map(|v| {
                Credential::parse(v, source)
                    .map_err(|source| RemoteError::CredentialLabel { label, source: Box::new(source) })
            })
            .transpose()
    };
    Ok(ChainInputs {
        image_creds: parse(l::IMAGE_CREDS, Source::ImageCreds)?,
        source_image_creds: parse(l::SOURCE_IMAGE_CREDS, Source::SourceImageCreds)?,
        build_registry_creds: parse(l::BUILD_REGISTRY_CREDS, Source::BuildRegistryCreds)?,
        ..Default::default()
    })
}

/// Label credentials of one image: as the labels said them (to tell a change) and parsed.
struct LabelCreds {
    labels: BTreeMap<String, String>,
    inputs: ChainInputs,
}

/// What the one lock guards.
#[derive(Default)]
struct Table {
    labels: HashMap<String, LabelCreds>,
    pull_secrets: HashMap<String, Credential>,
    sessions: HashMap<String, Arc<Repository>>,
    /// Bumped by every change of an input: a session made from older inputs is used once but
    /// not kept.
    generation: u64,
}

/// The credential inputs every image shares (from the daemon's config).
#[derive(Debug)]
struct NodeInputs {
    docker_config: Option<PathBuf>,
    build_registry: Option<BuildRegistryScope>,
    minter: Option<Arc<TokenMinter>>,
}

/// The registry sessions of the images served lazily, with their credential inputs.
pub struct Sessions {
    client: Arc<RegistryClient>,
    node: NodeInputs,
    store: CredentialStore,
    plain_http_file: PathBuf,
    table: Mutex<Table>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("store", &self.store).finish_non_exhaustive()
    }
}

/// Where a blob reader gets its registry session.
#[derive(Debug, Clone)]
pub enum Session {
    /// The image's current session (a mounted layer: new credentials reach it).
    Image { sessions: Arc<Sessions>, image_ref: String },
    /// One fixed session (tools and tests).
    Fixed(Arc<Repository>),
}

impl Session {
    /// The session to send the next request with.
    pub fn repository(&self) -> Result<Arc<Repository>, RemoteError> {
        match self {
            Self::Image { sessions, image_ref } => sessions.repository(image_ref),
            Self::Fixed(r) => Ok(r.clone()),
        }
    }
}

impl Sessions {
    /// The sessions of a daemon: its registry client (hosts, plain-HTTP registries recorded
    /// under the root), the build registry's minter, and the credentials the store kept.
    pub async fn new(cfg: &SnapshotterConfig, layout: &CacheLayout) -> anyhow::Result<Self> {
        let (build_registry, minter) = match &cfg.build_registry {
            Some(br) => {
                let minter = match &br.credentials {
                    Some(c) => Some(Arc::new(TokenMinter::from_config(c).await?)),
                    None => None,
                };
                (Some(BuildRegistryScope::new(&br.registry, &br.repository)), minter)
            }
            None => (None, None),
        };
        let store = CredentialStore::open(&cfg.root, cfg.lazy.credential_ttl_s)?;
        let mut table = Table::default();
        for (key, labels) in store.load() {
            if let Some(repo) = key.strip_prefix(PULL_SECRET_PREFIX) {
                if let Some(c) =
                    labels.get(PULL_SECRET_KEY).and_then(|v| Credential::parse(v, Source::CriPullSecret).ok())
                {
                    table.pull_secrets.insert(repo.to_string(), c);
                }
                continue;
            }
            match inputs_from_labels(&labels) {
                Ok(inputs) => {
                    table.labels.insert(key, LabelCreds { labels, inputs });
                }
                Err(e) => tracing::warn!(image = %key, error = %e, "ignoring stored credentials"),
            }
        }
        if !table.labels.is_empty() {
            tracing::info!(images = table.labels.len(), "restored label credentials from the credential store");
        }
        let client = RegistryClient::new(HostsConfig { dir: cfg.registry.hosts_dir.clone(), plain_http: false });
        let plain_http_file = layout.plain_http_file();
        // Earlier versions recorded any registry a label named; only loopback ones count now.
        for registry in std::fs::read_to_string(&plain_http_file).unwrap_or_default().lines() {
            if !clip_registry::hosts::is_loopback(registry) {
                tracing::warn!(%registry, "a recorded plain-HTTP registry that is not loopback is ignored (configure a hosts.toml)");
                continue;
            }
            client.use_plain_http(registry);
        }
        Ok(Self {
            client,
            node: NodeInputs { docker_config: cfg.registry.docker_config.clone(), build_registry, minter },
            store,
            plain_http_file,
            table: Mutex::new(table),
        })
    }

    /// Takes the credential labels of a Prepare for its image (never logged): kept in memory
    /// and in the root-only store, the image's session replaced. Labels the image already has
    /// change nothing (no store write, the session and its tokens stay).
    pub fn remember_labels(&self, image_ref: &str, secrets: &BTreeMap<String, String>) -> Result<(), RemoteError> {
        if secrets.is_empty() || self.table.lock().labels.get(image_ref).is_some_and(|c| &c.labels == secrets) {
            return Ok(());
        }
        let inputs = inputs_from_labels(secrets)?;
        if let Err(e) = self.store.save(image_ref, secrets) {
            tracing::warn!(image = %image_ref, error = %e, "cannot persist label credentials; they will not survive a restart");
        }
        let mut table = self.table.lock();
        table.labels.insert(image_ref.to_string(), LabelCreds { labels: secrets.clone(), inputs });
        table.sessions.remove(image_ref);
        table.generation += 1;
        Ok(())
    }

    /// Reaches the registry of `image_ref` over plain HTTP from now on (unless a `hosts.toml`
    /// configures it), and after restarts: `<root>/plain-http-registries`, a host a line.
    pub fn remember_plain_http(&self, image_ref: &str) -> Result<(), RemoteError> {
        let registry = Reference::parse(image_ref)?.registry;
        // A label is any client's word, and what it changes holds for every image of the node:
        // only a registry on this machine may be downgraded so (others need a hosts.toml).
        if !clip_registry::hosts::is_loopback(&registry) {
            return Err(RemoteError::PlainHttpRefused { registry });
        }
        self.client.use_plain_http(&registry);
        let path = &self.plain_http_file;
        let mut hosts: std::collections::BTreeSet<String> =
            std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect();
        if hosts.insert(registry.clone()) {
            let text: String = hosts.iter().flat_map(|h| [h.as_str(), "\n"]).collect();
            clip_fsutil::atomic_write(path, text.as_bytes(), 0o600, clip_fsutil::Durability::Durable)
                .map_err(RemoteError::io(format!("recording plain HTTP for {registry} in {}", path.display())))?;
            tracing::info!(%registry, "reaching this registry over plain HTTP, as its client asked");
        }
        Ok(())
    }

    /// The registry session of an image, with its credential chain.
    pub fn repository(&self, image_ref: &str) -> Result<Arc<Repository>, RemoteError> {
        if let Some(r) = self.table.lock().sessions.get(image_ref) {
            return Ok(r.clone());
        }
        let image = Reference::parse(image_ref)?;
        let (mut inputs, generation) = {
            let table = self.table.lock();
            let mut inputs = table.labels.get(image_ref).map(|c| c.inputs.clone()).unwrap_or_default();
            inputs.cri_pull_secret = table.pull_secrets.get(&pull_secret_key(&image)).cloned();
            (inputs, table.generation)
        };
        inputs.build_registry.clone_from(&self.node.build_registry);
        inputs.minter.clone_from(&self.node.minter);
        inputs.docker_config = true;
        inputs.docker_config_path.clone_from(&self.node.docker_config);
        let chain = CredentialChain::for_image(&image, &inputs);
        // Reads the registry's hosts.toml: outside the lock.
        let made = Arc::new(self.client.repository(&image, chain)?);
        let mut table = self.table.lock();
        if table.generation != generation {
            // Inputs changed meanwhile: this session serves this call only.
            return Ok(made);
        }
        Ok(table.sessions.entry(image_ref.to_string()).or_insert(made).clone())
    }
}

/// What the CRI image-service proxy hands over: pull secrets, and minted build registry tokens.
impl clip_cri_proxy::PullSecrets for Sessions {
    /// For an image of the configured build registry: a token minted from the configured
    /// long-term credentials (the CRI proxy passes it to containerd when kubelet gave none).
    async fn build_registry_credential(&self, image_ref: &str) -> Option<Credential> {
        let image = Reference::parse(image_ref).ok()?;
        if !self.node.build_registry.as_ref().is_some_and(|b| b.covers(&image)) {
            return None;
        }
        match self.node.minter.as_ref()?.credential(false).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(image = %image_ref, error = %e, "cannot mint a build registry token");
                None
            }
        }
    }

    /// Remembers the pull secret kubelet passed for `image_ref` (CRI image service proxy), for
    /// that image's repository: in memory and in the root-only store until it expires. Never
    /// logged.
    fn remember_pull_secret(&self, image_ref: &str, credential: Credential) -> Result<(), RegistryError> {
        let image = Reference::parse(image_ref)?;
        let key = pull_secret_key(&image);
        let stored = BTreeMap::from([(
            PULL_SECRET_KEY.to_string(),
            format!("{}:{}", credential.username, credential.password.expose()),
        )]);
        if let Err(e) = self.store.save(&format!("{PULL_SECRET_PREFIX}{key}"), &stored) {
            tracing::warn!(repository = %key, error = %e, "cannot persist a pull secret; it will not survive a restart");
        }
        let mut table = self.table.lock();
        table.pull_secrets.insert(key.clone(), credential);
        // Sessions of that repository pick the secret up.
        table.sessions.retain(|r, _| Reference::parse(r).map_or(true, |i| pull_secret_key(&i) != key));
        table.generation += 1;
        drop(table);
        tracing::info!(repository = %key, "pull secret received through the CRI image service proxy");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn sessions(root: &std::path::Path) -> (tokio::runtime::Runtime, Arc<Sessions>) {
        let mut cfg = SnapshotterConfig::default();
        cfg.root = root.to_path_buf();
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let s = rt.block_on(Sessions::new(&cfg, &CacheLayout::new(root))).expect("sessions");
        (rt, Arc::new(s))
    }

    fn creds(i: usize) -> BTreeMap<String, String> {
        BTreeMap::from([(l::IMAGE_CREDS.to_string(), format!("user:pass-{i}"))])
    }

    /// A Prepare carrying credential labels and another looking up the same image's session,
    /// at once and again and again: both must go on (a lock-order inversion would hang them).
    #[test]
    fn credentials_arriving_while_sessions_are_looked_up_never_deadlock() {
        let root = tempfile::tempdir().expect("tmp");
        let (_rt, sessions) = sessions(root.path());
        let image = "registry.test/team/app:1";
        let (done, finished) = mpsc::channel();
        let mut threads = Vec::new();
        for t in 0..4 {
            let (with_labels, sender) = (sessions.clone(), done.clone());
            threads.push(std::thread::spawn(move || {
                for i in 0..200 {
                    with_labels.remember_labels(image, &creds(t * 1000 + i)).expect("remember");
                }
                let _ = sender.send("labels");
            }));
            let (lookups, sender) = (sessions.clone(), done.clone());
            threads.push(std::thread::spawn(move || {
                for _ in 0..20_000 {
                    lookups.repository(image).expect("session");
                }
                let _ = sender.send("lookups");
            }));
        }
        for _ in 0..threads.len() {
            let who = finished.recv_timeout(Duration::from_secs(60));
            assert!(who.is_ok(), "credential labels and session lookups hung each other (deadlock)");
        }
        for t in threads {
            t.join().expect("thread");
        }
    }

    /// New label credentials replace the image's session (a mounted layer's handle gets the new
    /// one); the same labels again keep it (its tokens stay).
    #[test]
    fn a_handle_follows_new_credentials_and_same_labels_keep_the_session() {
        let root = tempfile::tempdir().expect("tmp");
        let (_rt, sessions) = sessions(root.path());
        let image = "registry.test/team/app:1";
        sessions.remember_labels(image, &creds(1)).expect("remember");
        let handle = Session::Image { sessions: sessions.clone(), image_ref: image.into() };
        let first = handle.repository().expect("session");
        sessions.remember_labels(image, &creds(1)).expect("same again");
        assert!(Arc::ptr_eq(&first, &handle.repository().expect("session")), "same labels keep the session");
        sessions.remember_labels(image, &creds(2)).expect("new");
        assert!(!Arc::ptr_eq(&first, &handle.repository().expect("session")), "new labels replace it");
    }
}
