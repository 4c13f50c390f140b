//! Where credentials are chosen: one registry session per image, made from that image's
//! credential inputs — the `clip.*` labels its Prepares carried, the pull secret kubelet passed
//! for its repository (CRI image-service proxy), the build registry's minter, and docker's
//! `config.json` ([`CredentialChain::for_image`] orders them). Label credentials and pull
//! secrets are also kept in the root-only [`CredentialStore`] so lazy layers keep reading after
//! a restart, each until `[lazy] credential_ttl_s` has passed — while running too: a session
//! made with one is replaced when it expires. A changed input replaces the image's session;
//! mounted layers read through a [`Session::Image`] handle, so their next fetch uses the new one.
//!
//! A pull secret is *offered* while containerd pulls with it (the layers it prepares read with
//! it, after any secret already kept for the repository) and *kept* only once containerd's pull
//! succeeded: a secret containerd refused never replaces one that works, nor reaches the store.
//!
//! One lock guards the inputs and the sessions together and is never held across I/O (the
//! store's writes, reading `hosts.toml`) nor while another part's lock is taken.

use super::creds_store::{CredentialStore, now};
use super::error::RemoteError;
use super::layout::CacheLayout;
use clip_config::SnapshotterConfig;
use clip_config::labels as l;
use clip_registry::credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain, Keychain, Source};
use clip_registry::provider::CredentialProviders;
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
    /// Unix seconds after which they are not used.
    expires_at: u64,
}

/// A pull secret containerd accepted for a repository.
struct KeptSecret {
    credential: Credential,
    expires_at: u64,
}

/// A pull secret offered while containerd pulls with it.
struct OfferedSecret {
    repository: String,
    credential: Credential,
}

/// An image's session and when the credentials it was made with expire.
struct CachedSession {
    repository: Arc<Repository>,
    expires_at: Option<u64>,
}

/// What the one lock guards.
#[derive(Default)]
struct Table {
    labels: HashMap<String, LabelCreds>,
    pull_secrets: HashMap<String, KeptSecret>,
    offered: HashMap<u64, OfferedSecret>,
    next_offer: u64,
    sessions: HashMap<String, CachedSession>,
    /// Bumped by every change of an input: a session made from older inputs is used once but
    /// not kept.
    generation: u64,
}

impl Table {
    /// Drops the sessions of images of `repository` (`registry/repository`): their next
    /// request is made with the repository's current secrets.
    fn forget_sessions_of(&mut self, repository: &str) {
        self.sessions.retain(|r, _| Reference::parse(r).map_or(true, |i| pull_secret_key(&i) != repository));
        self.generation += 1;
    }
}

/// The credential inputs every image shares (from the daemon's config).
#[derive(Debug)]
struct NodeInputs {
    docker_config: Option<PathBuf>,
    build_registry: Option<BuildRegistryScope>,
    minter: Option<Arc<TokenMinter>>,
    /// `[cri] mint_for_pulls_without_secret`.
    mint_for_pulls_without_secret: bool,
    /// kubelet credential provider plugins (`[registry] credential_provider_config`).
    providers: Option<Arc<CredentialProviders>>,
    /// The cluster's pull secrets (`[kubernetes] secret_keychain`).
    keychain: Option<Arc<dyn Keychain>>,
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
        let providers = credential_providers(cfg)?;
        let keychain: Option<Arc<dyn Keychain>> = if cfg.kubernetes.secret_keychain {
            Some(clip_kube_keychain::SecretKeychain::start(&cfg.kubernetes).await?)
        } else {
            None
        };
        let store = CredentialStore::open(&cfg.root, cfg.lazy.credential_ttl_s)?;
        let mut table = Table::default();
        for kept in store.load() {
            let (key, labels, expires_at) = (kept.key, kept.labels, kept.expires_at);
            if let Some(repo) = key.strip_prefix(PULL_SECRET_PREFIX) {
                if let Some(credential) =
                    labels.get(PULL_SECRET_KEY).and_then(|v| Credential::parse(v, Source::CriPullSecret).ok())
                {
                    table.pull_secrets.insert(repo.to_string(), KeptSecret { credential, expires_at });
                }
                continue;
            }
            match inputs_from_labels(&labels) {
                Ok(inputs) => {
                    table.labels.insert(key, LabelCreds { labels, inputs, expires_at });
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
            node: NodeInputs {
                docker_config: cfg.registry.docker_config.clone(),
                build_registry,
                minter,
                mint_for_pulls_without_secret: cfg.cri.mint_for_pulls_without_secret,
                providers,
                keychain,
            },
            store,
            plain_http_file,
            table: Mutex::new(table),
        })
    }

    /// Takes the credential labels of a Prepare for its image (never logged): kept in memory
    /// and in the root-only store, the image's session replaced. Labels the image already has
    /// change nothing (no store write, the session and its tokens stay) until half their
    /// lifetime has passed; then they are kept for another lifetime.
    pub fn remember_labels(&self, image_ref: &str, secrets: &BTreeMap<String, String>) -> Result<(), RemoteError> {
        let expires_at = self.store.expiry_from_now();
        let fresh = |c: &LabelCreds| c.expires_at.saturating_sub(now()) > expires_at.saturating_sub(now()) / 2;
        if secrets.is_empty()
            || self.table.lock().labels.get(image_ref).is_some_and(|c| &c.labels == secrets && fresh(c))
        {
            return Ok(());
        }
        let inputs = inputs_from_labels(secrets)?;
        if let Err(e) = self.store.save(image_ref, secrets, expires_at) {
            tracing::warn!(image = %image_ref, error = %e, "cannot persist label credentials; they will not survive a restart");
        }
        let mut table = self.table.lock();
        table.labels.insert(image_ref.to_string(), LabelCreds { labels: secrets.clone(), inputs, expires_at });
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

    /// The registry session of an image, with its credential chain. A session made with
    /// credentials that have since expired is replaced by one made without them.
    pub fn repository(&self, image_ref: &str) -> Result<Arc<Repository>, RemoteError> {
        let now = now();
        {
            // The hot path (every fetch of a mounted layer): one lookup, nothing parsed.
            let mut table = self.table.lock();
            match table.sessions.get(image_ref) {
                Some(c) if c.expires_at.is_none_or(|at| at > now) => return Ok(c.repository.clone()),
                Some(_) => {
                    tracing::info!(image = %image_ref, "credentials of the image's session expired; dropping them");
                    table.sessions.remove(image_ref);
                }
                None => {}
            }
        }
        let image = Reference::parse(image_ref)?;
        let key = pull_secret_key(&image);
        let (mut inputs, expires_at, generation) = {
            let mut table = self.table.lock();
            table.labels.retain(|_, c| c.expires_at > now);
            table.pull_secrets.retain(|_, k| k.expires_at > now);
            let labels = table.labels.get(image_ref);
            let mut inputs = labels.map(|c| c.inputs.clone()).unwrap_or_default();
            let kept = table.pull_secrets.get(&key);
            let expires_at = [labels.map(|c| c.expires_at), kept.map(|k| k.expires_at)].into_iter().flatten().min();
            inputs.cri_pull_secrets = kept.map(|k| k.credential.clone()).into_iter().collect();
            inputs
                .cri_pull_secrets
                .extend(table.offered.values().filter(|o| o.repository == key).map(|o| o.credential.clone()));
            (inputs, expires_at, table.generation)
        };
        inputs.build_registry.clone_from(&self.node.build_registry);
        inputs.minter.clone_from(&self.node.minter);
        inputs.providers.clone_from(&self.node.providers);
        inputs.keychain.clone_from(&self.node.keychain);
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
        Ok(table
            .sessions
            .entry(image_ref.to_string())
            .or_insert(CachedSession { repository: made, expires_at })
            .repository
            .clone())
    }
}

/// The kubelet credential provider plugins `cfg` names, if any.
pub fn credential_providers(cfg: &SnapshotterConfig) -> Result<Option<Arc<CredentialProviders>>, RegistryError> {
    match (&cfg.registry.credential_provider_config, &cfg.registry.credential_provider_bin_dir) {
        (Some(config), Some(bin_dir)) => Ok(Some(Arc::new(CredentialProviders::load(config, bin_dir)?))),
        _ => Ok(None),
    }
}

/// What the CRI image-service proxy hands over: pull secrets, and minted build registry tokens.
impl clip_cri_proxy::PullSecrets for Sessions {
    /// For an image of the configured build registry, when `[cri] mint_for_pulls_without_secret`
    /// allows it: a token minted from the configured long-term credentials.
    async fn build_registry_credential(&self, image_ref: &str) -> Option<Credential> {
        if !self.node.mint_for_pulls_without_secret {
            return None;
        }
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

    /// Offers the pull secret kubelet passed for `image_ref` to the layers of its repository
    /// while containerd pulls with it (after the secret already kept, if any). Never logged.
    fn offer_pull_secret(&self, image_ref: &str, credential: Credential) -> Result<u64, RegistryError> {
        let repository = pull_secret_key(&Reference::parse(image_ref)?);
        let mut table = self.table.lock();
        table.next_offer += 1;
        let offer = table.next_offer;
        table.offered.insert(offer, OfferedSecret { repository: repository.clone(), credential });
        table.forget_sessions_of(&repository);
        Ok(offer)
    }

    /// Settles an offer once containerd's pull is over: a secret it accepted is kept for the
    /// repository (in memory and in the root-only store, until it expires), replacing the one
    /// kept before; a refused one is forgotten and changes nothing.
    fn settle_pull_secret(&self, offer: u64, accepted: bool) {
        let Some(offered) = self.table.lock().offered.remove(&offer) else {
            return;
        };
        let repository = offered.repository;
        if !accepted {
            self.table.lock().forget_sessions_of(&repository);
            tracing::info!(%repository, "containerd refused the pull made with this pull secret; it is not kept");
            return;
        }
        let expires_at = self.store.expiry_from_now();
        let stored = BTreeMap::from([(
            PULL_SECRET_KEY.to_string(),
            format!("{}:{}", offered.credential.username, offered.credential.password.expose()),
        )]);
        if let Err(e) = self.store.save(&format!("{PULL_SECRET_PREFIX}{repository}"), &stored, expires_at) {
            tracing::warn!(%repository, error = %e, "cannot persist a pull secret; it will not survive a restart");
        }
        let mut table = self.table.lock();
        table.pull_secrets.insert(repository.clone(), KeptSecret { credential: offered.credential, expires_at });
        table.forget_sessions_of(&repository);
        drop(table);
        tracing::info!(%repository, "pull secret kept: containerd's pull with it succeeded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn sessions(root: &std::path::Path) -> (tokio::runtime::Runtime, Arc<Sessions>) {
        sessions_with(root, |_| {})
    }

    fn sessions_with(
        root: &std::path::Path,
        change: impl FnOnce(&mut SnapshotterConfig),
    ) -> (tokio::runtime::Runtime, Arc<Sessions>) {
        let mut cfg = SnapshotterConfig::default();
        cfg.root = root.to_path_buf();
        change(&mut cfg);
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let s = rt.block_on(Sessions::new(&cfg, &CacheLayout::new(root))).expect("sessions");
        (rt, Arc::new(s))
    }

    /// The pull secrets an image's session would send, in order.
    fn secrets_sent(sessions: &Sessions, image: &str) -> usize {
        let repo = sessions.repository(image).expect("session");
        repo.credential_sources().iter().filter(|s| **s == Source::CriPullSecret).count()
    }

    /// Seen before: a pull secret was kept (and stored) before containerd had tried it, keyed by
    /// repository, so one pod's wrong secret replaced another's working one, also after a restart.
    #[test]
    fn a_refused_pull_secret_never_replaces_the_kept_one_before_or_after_a_restart() {
        use clip_cri_proxy::PullSecrets;
        let root = tempfile::tempdir().expect("tmp");
        let image = "registry.test/team/app:1";
        let (_rt, sessions) = sessions(root.path());
        let good = sessions.offer_pull_secret(image, Credential::new("pod-a", "good")).expect("offer");
        assert_eq!(secrets_sent(&sessions, image), 1, "offered while containerd pulls");
        sessions.settle_pull_secret(good, true);
        let wrong = sessions.offer_pull_secret(image, Credential::new("pod-b", "wrong")).expect("offer");
        assert_eq!(secrets_sent(&sessions, image), 2, "the kept secret first, then the offered one");
        sessions.settle_pull_secret(wrong, false);
        assert_eq!(secrets_sent(&sessions, image), 1);
        let kept =
            |s: &Sessions| s.table.lock().pull_secrets.get("registry.test/team/app").map(|k| k.credential.clone());
        assert_eq!(kept(&sessions), Some(Credential::new("pod-a", "good")));
        // A cancelled pull (the offer dropped unsettled by the proxy) is a refusal too: see
        // clip_cri_proxy's Offer. A refused secret is not in the store either:
        drop(sessions);
        let (_rt2, restarted) = self::sessions(root.path());
        assert_eq!(kept(&restarted), Some(Credential::new("pod-a", "good")));
        let store = std::fs::read_dir(root.path().join("credentials")).expect("store").count();
        assert_eq!(store, 1, "only the accepted secret was written");
    }

    /// Seen before: the lifetime was applied only when the store was read at start-up.
    #[test]
    fn a_kept_pull_secret_expires_while_the_daemon_runs() {
        use clip_cri_proxy::PullSecrets;
        let root = tempfile::tempdir().expect("tmp");
        let image = "registry.test/team/app:1";
        let (_rt, sessions) = sessions_with(root.path(), |c| c.lazy.credential_ttl_s = 1);
        let offer = sessions.offer_pull_secret(image, Credential::new("pod-a", "good")).expect("offer");
        sessions.settle_pull_secret(offer, true);
        assert_eq!(secrets_sent(&sessions, image), 1);
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(secrets_sent(&sessions, image), 0, "an expired secret is no longer sent");
    }

    /// Minting for pulls without a secret lets any pod pull any build registry image: off unless
    /// configured.
    #[test]
    fn secretless_pulls_get_a_minted_token_only_when_configured() {
        use clip_cri_proxy::PullSecrets;
        let root = tempfile::tempdir().expect("tmp");
        let build = |on: bool| {
            move |c: &mut SnapshotterConfig| {
                c.build_registry = Some(clip_config::BuildRegistry {
                    registry: "build.test".into(),
                    repository: "userimages".into(),
                    insecure: false,
                    ca_file: None,
                    credentials: Some(clip_config::LongTermCredentials::Basic {
                        username: "builder".into(),
                        password: Some("long-term".into()),
                        password_file: None,
                    }),
                });
                c.cri.mint_for_pulls_without_secret = on;
            }
        };
        let image = "build.test/userimages/app:1";
        let (rt, off) = sessions_with(root.path(), build(false));
        assert!(rt.block_on(off.build_registry_credential(image)).is_none());
        let (rt, on) = sessions_with(root.path(), build(true));
        assert!(rt.block_on(on.build_registry_credential(image)).is_some());
        assert!(rt.block_on(on.build_registry_credential("other.test/userimages/app:1")).is_none());
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
