//! Remote layers: for a Prepare that names an image layer, find the layer's CLIP index (local
//! index store, then the registry: the `clip.index-digest` label, else the referrers of the
//! image manifest), and serve the layer read-only over FUSE with the image's credential chain.
//! The snapshot service commits such a layer at once, so containerd neither downloads nor
//! unpacks it. Failures are returned as reasons; the caller falls back to an ordinary snapshot.

mod blob;
mod creds_store;
mod discover;
mod error;
mod mount;
mod profiles;

pub use blob::RegistryBlob;
pub use creds_store::CredentialStore;
pub use error::RemoteError;

use crate::labels::RemoteRequest;
use clip_config::SnapshotterConfig;
use clip_config::labels as l;
use clip_index::Index;
use clip_registry::credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain, Source};
use clip_registry::{HostsConfig, Reference, RegistryClient, RegistryError, Repository, TokenMinter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use mount::Mounted;

/// Registries a client asked to reach over plain HTTP, a host a line, under the root.
const PLAIN_HTTP_FILE: &str = "plain-http-registries";

/// The lazy-layer manager of a daemon.
pub struct RemoteLayers {
    root: PathBuf,
    client: Arc<RegistryClient>,
    /// Docker's `config.json` to read credentials from (`[registry] docker_config`).
    docker_config: Option<PathBuf>,
    runtime: tokio::runtime::Handle,
    build_registry: Option<BuildRegistryScope>,
    minter: Option<Arc<TokenMinter>>,
    /// Credentials from labels, per image reference (also in the root-only store).
    label_creds: Mutex<HashMap<String, ChainInputs>>,
    /// Pull secrets kubelet passed through the CRI image service proxy, per `registry/repository`
    /// (also in the root-only store).
    pull_secrets: Mutex<HashMap<String, Credential>>,
    creds_store: CredentialStore,
    /// One registry session per image (auth tokens and redirect targets are shared).
    repos: Mutex<HashMap<String, Arc<Repository>>>,
    mounts: Mutex<HashMap<u64, Mounted>>,
    /// Index fetches started ahead of their layers' Prepare, by layer digest.
    index_fetches: Mutex<HashMap<String, Arc<discover::IndexFetch>>>,
    /// Artifact manifests already read, by digest.
    artifacts: Mutex<HashMap<String, clip_index::artifact::IndexArtifact>>,
    /// Read-ahead: missing spans fetched together with a requested one.
    pub readahead_spans: u32,
    /// Whether large local files are served with FUSE passthrough.
    passthrough: bool,
    /// Speculative fetching after misses (`None`: off).
    prefetcher: Option<Arc<clip_readpath::Prefetcher>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Background completion of mounted layers (`None`: off).
    pub(super) completer: Option<clip_readpath::Completer>,
    /// Container reads waiting for a fetch, across layers (background completion yields).
    foreground: Arc<std::sync::atomic::AtomicU32>,
    /// Holds every mount's FUSE connection across restarts (`None`: restarts lose mounts).
    keeper: mount::KeeperHandle,
    /// Bound on one span fetch with its retries.
    fetch_timeout: std::time::Duration,
    /// The disk budget of all span caches.
    pub(crate) budget: Arc<clip_readpath::CacheBudget>,
    /// Layers a restart could not serve (their index and registry were away), by snapshot id:
    /// image reference and layer digest. Served again when a snapshot above them is used.
    unservable: Mutex<HashMap<u64, (String, String)>>,
    /// Connections the keeper handed back at start, by snapshot id, until reattached.
    kept: Mutex<HashMap<u64, clip_layerfs::keeper::Kept>>,
    /// Access profiles: recorded, kept, published, replayed (`None`: off).
    profiles: Option<Arc<profiles::ProfileBook>>,
}

impl std::fmt::Debug for RemoteLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteLayers({})", self.root.display())
    }
}

/// A layer ready to mount.
#[derive(Debug)]
pub struct OpenedLayer {
    index: Arc<Index>,
    source: RegistryBlob,
    /// The windows blob of an index without windows.
    windows: Option<RegistryBlob>,
    layer_digest: String,
}

/// The background completion `[lazy]` asks for.
fn completer(cfg: &SnapshotterConfig) -> Option<clip_readpath::Completer> {
    if !cfg.lazy.background_fetch {
        tracing::info!("background completion is off");
        return None;
    }
    clip_readpath::Completer::start(clip_readpath::CompletionPolicy {
        streams: cfg.lazy.stream_layers,
        request_bytes: cfg.lazy.stream_request_bytes.max(1),
        start_delay: std::time::Duration::from_millis(cfg.lazy.background_start_delay_ms),
    })
}

/// Spans in one speculative request (about 1-2 MB compressed for the builder's 256 KiB spans).
const PREFETCH_GROUP_SPANS: u32 = 8;

/// Pull secrets live in the credential store under `cri-pull-secret:<registry>/<repository>`.
const PULL_SECRET_PREFIX: &str = "cri-pull-secret:";
const PULL_SECRET_KEY: &str = "auth";

/// The key pull secrets are kept under: the image's `registry/repository`.
fn pull_secret_key(image: &Reference) -> String {
    format!("{}/{}", image.registry, image.repository)
}

/// The chain inputs the `clip.*` credential labels give.
fn inputs_from_labels(secrets: &std::collections::BTreeMap<String, String>) -> Result<ChainInputs, RemoteError> {
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

impl RemoteLayers {
    /// Builds the manager from the daemon config; mints nothing yet.
    pub async fn new(
        cfg: &SnapshotterConfig,
        runtime: tokio::runtime::Handle,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let hosts = HostsConfig { dir: cfg.registry.hosts_dir.clone(), plain_http: false };
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
        let creds_store = CredentialStore::open(&cfg.root, cfg.lazy.credential_ttl_s)?;
        let mut label_creds = HashMap::new();
        let mut pull_secrets = HashMap::new();
        for (image_ref, labels) in creds_store.load() {
            if let Some(repo) = image_ref.strip_prefix(PULL_SECRET_PREFIX) {
                if let Some(c) =
                    labels.get(PULL_SECRET_KEY).and_then(|v| Credential::parse(v, Source::CriPullSecret).ok())
                {
                    pull_secrets.insert(repo.to_string(), c);
                }
                continue;
            }
            match inputs_from_labels(&labels) {
                Ok(inputs) => {
                    label_creds.insert(image_ref, inputs);
                }
                Err(e) => tracing::warn!(image = %image_ref, error = %e, "ignoring stored credentials"),
            }
        }
        if !label_creds.is_empty() {
            tracing::info!(images = label_creds.len(), "restored label credentials from the credential store");
        }
        let (keeper, kept) = mount::KeeperHandle::new(cfg);
        let budget = clip_readpath::CacheBudget::new(cfg.lazy.cache_max_bytes)
            .with_metrics(metrics.cache_bytes.clone(), metrics.cache_evictions.clone());
        metrics.cache_limit_bytes.set(i64::try_from(cfg.lazy.cache_max_bytes).unwrap_or(i64::MAX));
        budget.scan(&cfg.root.join("spans"), &cfg.root.join("files"));
        tracing::info!(bytes = budget.used(), limit = cfg.lazy.cache_max_bytes, "span caches counted");
        let profiles = profiles::ProfileBook::start(cfg, runtime.clone(), metrics.clone());
        let client = RegistryClient::new(hosts);
        for registry in std::fs::read_to_string(cfg.root.join(PLAIN_HTTP_FILE)).unwrap_or_default().lines() {
            client.use_plain_http(registry);
        }
        Ok(Self {
            root: cfg.root.clone(),
            client,
            docker_config: cfg.registry.docker_config.clone(),
            runtime,
            build_registry,
            minter,
            label_creds: Mutex::new(label_creds),
            pull_secrets: Mutex::new(pull_secrets),
            creds_store,
            repos: Mutex::new(HashMap::new()),
            mounts: Mutex::new(HashMap::new()),
            artifacts: Mutex::new(HashMap::new()),
            index_fetches: Mutex::new(HashMap::new()),
            readahead_spans: cfg.lazy.readahead_spans,
            passthrough: cfg.lazy.passthrough,
            prefetcher: clip_readpath::Prefetcher::start(clip_readpath::PrefetchPolicy {
                threads: cfg.lazy.prefetch_threads,
                neighbour_spans: cfg.lazy.prefetch_neighbour_spans,
                file_spans: cfg.lazy.prefetch_file_spans,
                group_spans: PREFETCH_GROUP_SPANS,
            }),
            metrics,
            foreground: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            keeper,
            fetch_timeout: std::time::Duration::from_secs(cfg.lazy.fetch_timeout_s.max(1)),
            budget: Arc::new(budget),
            completer: completer(cfg),
            profiles,
            kept: Mutex::new(kept),
            unservable: Mutex::new(HashMap::new()),
        })
    }

    fn index_path(&self, layer_digest: &str) -> PathBuf {
        self.root.join("indexes").join(format!("{}.clip", layer_digest.replace(':', "-")))
    }

    fn span_dir(&self, layer_digest: &str) -> PathBuf {
        self.root.join("spans").join(layer_digest.replace(':', "-"))
    }

    fn files_dir(&self, layer_digest: &str) -> PathBuf {
        self.root.join("files").join(layer_digest.replace(':', "-"))
    }

    /// Deletes everything kept for a layer no snapshot uses any more: its span cache,
    /// passthrough copies and index.
    pub fn delete_layer_caches(&self, layer_digest: &str) {
        let spans = self.span_dir(layer_digest);
        let files = self.files_dir(layer_digest);
        let index = self.index_path(layer_digest);
        for dir in [&spans, &files] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a layer cache");
            }
        }
        let _ = std::fs::remove_file(&index);
        let _ = std::fs::remove_file(index.with_extension("windows"));
        self.budget.forget_layer(&spans, &files);
        if let Some(p) = &self.profiles {
            p.layer_gone(layer_digest);
        }
        tracing::info!(layer = %layer_digest, "layer caches deleted");
    }

    /// Remembers the credential labels of a request for its image (never logged), in memory
    /// and in the root-only store.
    fn remember_creds(&self, req: &RemoteRequest) -> Result<(), RemoteError> {
        if req.secrets.is_empty() {
            return Ok(());
        }
        let inputs = inputs_from_labels(&req.secrets)?;
        if let Err(e) = self.creds_store.save(&req.image_ref, &req.secrets) {
            tracing::warn!(image = %req.image_ref, error = %e, "cannot persist label credentials; they will not survive a restart");
        }
        let mut map = self.label_creds.lock();
        map.insert(req.image_ref.clone(), inputs);
        // New credentials: a new session picks them up.
        self.repos.lock().remove(&req.image_ref);
        Ok(())
    }

    /// Reaches the registry of `image_ref` over plain HTTP from now on (unless a `hosts.toml`
    /// configures it), and after restarts: `<root>/plain-http-registries`, a host a line.
    fn remember_plain_http(&self, image_ref: &str) -> Result<(), RemoteError> {
        let registry = Reference::parse(image_ref)?.registry;
        self.client.use_plain_http(&registry);
        let path = self.root.join(PLAIN_HTTP_FILE);
        let mut hosts: std::collections::BTreeSet<String> =
            std::fs::read_to_string(&path).unwrap_or_default().lines().map(str::to_string).collect();
        if hosts.insert(registry.clone()) {
            let text: String = hosts.iter().flat_map(|h| [h.as_str(), "\n"]).collect();
            clip_fsutil::atomic_write(&path, text.as_bytes(), 0o600, clip_fsutil::Durability::Durable)
                .map_err(RemoteError::io(format!("recording plain HTTP for {registry} in {}", path.display())))?;
            tracing::info!(%registry, "reaching this registry over plain HTTP, as its client asked");
        }
        Ok(())
    }

    /// The registry session of an image, with its credential chain.
    fn repository(&self, image_ref: &str) -> Result<Arc<Repository>, RemoteError> {
        let mut repos = self.repos.lock();
        if let Some(r) = repos.get(image_ref) {
            return Ok(r.clone());
        }
        let image = Reference::parse(image_ref)?;
        let mut inputs = self.label_creds.lock().get(image_ref).cloned().unwrap_or_default();
        inputs.cri_pull_secret = self.pull_secrets.lock().get(&pull_secret_key(&image)).cloned();
        inputs.build_registry.clone_from(&self.build_registry);
        inputs.minter.clone_from(&self.minter);
        inputs.docker_config = true;
        inputs.docker_config_path.clone_from(&self.docker_config);
        let chain = CredentialChain::for_image(&image, &inputs);
        let repo = Arc::new(self.client.repository(&image, chain)?);
        repos.insert(image_ref.to_string(), repo.clone());
        Ok(repo)
    }

    /// Finds and opens the index of the requested layer. Blocking (call from a blocking
    /// thread, never from async code).
    pub fn open(&self, req: &RemoteRequest) -> Result<OpenedLayer, RemoteError> {
        self.remember_creds(req)?;
        if req.plain_http {
            self.remember_plain_http(&req.image_ref)?;
        }
        let repo = self.repository(&req.image_ref)?;
        let (index, windows) = self.find_index(&repo, req)?;
        if let Some(p) = &self.profiles {
            p.image_opened(&repo, req);
        }
        Ok(self.opened(repo, index, windows, &req.layer_digest))
    }

    fn opened(
        &self,
        repo: Arc<Repository>,
        index: Arc<Index>,
        windows: Option<String>,
        layer_digest: &str,
    ) -> OpenedLayer {
        OpenedLayer {
            index,
            windows: windows.map(|digest| RegistryBlob {
                repo: repo.clone(),
                digest,
                runtime: self.runtime.clone(),
                timeout: self.fetch_timeout,
            }),
            source: RegistryBlob {
                repo,
                digest: layer_digest.to_string(),
                runtime: self.runtime.clone(),
                timeout: self.fetch_timeout,
            },
            layer_digest: layer_digest.to_string(),
        }
    }

    /// Opens a layer again (restarts): from the local index store, else (when `fetch`) from
    /// the registry (the index was lost), resolving the image reference again.
    pub fn reopen(&self, image_ref: &str, layer_digest: &str, fetch: bool) -> Result<OpenedLayer, RemoteError> {
        let path = self.index_path(layer_digest);
        let repo = self.repository(image_ref)?;
        let (index, windows) = match discover::open_local(&path, layer_digest)? {
            Some(found) => found,
            None if !fetch => return Err(RemoteError::IndexGone { path: path.display().to_string() }),
            None => {
                tracing::warn!(layer = %layer_digest, image = %image_ref, "index {} is gone; fetching it again", path.display());
                let req = RemoteRequest {
                    target: String::new(),
                    image_ref: image_ref.to_string(),
                    layer_digest: layer_digest.to_string(),
                    manifest_digest: None,
                    index_digest: None,
                    plain_http: false,
                    secrets: std::collections::BTreeMap::new(),
                };
                self.find_index(&repo, &req)?
            }
        };
        Ok(self.opened(repo, index, windows, layer_digest))
    }
}

/// What the CRI image-service proxy hands over: pull secrets, and minted build registry tokens.
impl clip_cri_proxy::PullSecrets for RemoteLayers {
    /// For an image of the configured build registry: a token minted from the configured
    /// long-term credentials (the CRI proxy passes it to containerd when kubelet gave none).
    async fn build_registry_credential(&self, image_ref: &str) -> Option<Credential> {
        let image = Reference::parse(image_ref).ok()?;
        if !self.build_registry.as_ref().is_some_and(|b| b.covers(&image)) {
            return None;
        }
        match self.minter.as_ref()?.credential(false).await {
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
        let stored = std::collections::BTreeMap::from([(
            PULL_SECRET_KEY.to_string(),
            format!("{}:{}", credential.username, credential.password.expose()),
        )]);
        if let Err(e) = self.creds_store.save(&format!("{PULL_SECRET_PREFIX}{key}"), &stored) {
            tracing::warn!(repository = %key, error = %e, "cannot persist a pull secret; it will not survive a restart");
        }
        self.pull_secrets.lock().insert(key.clone(), credential);
        // Sessions of that repository pick the secret up.
        self.repos.lock().retain(|r, _| Reference::parse(r).map_or(true, |i| pull_secret_key(&i) != key));
        tracing::info!(repository = %key, "pull secret received through the CRI image service proxy");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A Prepare carrying credential labels and another looking up the same image's session,
    /// at once and again and again: both must go on (a lock-order inversion would hang them).
    #[test]
    fn credentials_arriving_while_sessions_are_looked_up_never_deadlock() {
        let root = tempfile::tempdir().expect("tmp");
        let mut cfg = SnapshotterConfig::default();
        cfg.root = root.path().to_path_buf();
        cfg.lazy.profiles = false;
        cfg.lazy.background_fetch = false;
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let layers = Arc::new(rt.block_on(RemoteLayers::new(&cfg, rt.handle().clone(), metrics)).expect("layers"));
        let image = "registry.test/team/app:1";
        let (done, finished) = mpsc::channel();
        let with_labels = {
            let (layers, done) = (layers.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..300 {
                    let req = RemoteRequest {
                        target: "t".into(),
                        image_ref: image.into(),
                        layer_digest: format!("sha256:{}", "a".repeat(64)),
                        manifest_digest: None,
                        index_digest: None,
                        plain_http: false,
                        secrets: std::collections::BTreeMap::from([(
                            l::IMAGE_CREDS.to_string(),
                            format!("user:pass-{i}"),
                        )]),
                    };
                    layers.remember_creds(&req).expect("remember");
                }
                let _ = done.send("labels");
            })
        };
        let lookups = {
            let layers = layers.clone();
            std::thread::spawn(move || {
                for _ in 0..3000 {
                    layers.repository(image).expect("session");
                }
                let _ = done.send("lookups");
            })
        };
        for _ in 0..2 {
            let who = finished.recv_timeout(Duration::from_secs(60));
            assert!(who.is_ok(), "credential labels and session lookups hung each other (deadlock)");
        }
        with_labels.join().expect("labels thread");
        lookups.join().expect("lookups thread");
    }
}
