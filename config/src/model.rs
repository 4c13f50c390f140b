//! The configuration structures and their validation.

use crate::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `/etc/clip/snapshotter.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// State directory (metadata DB, snapshot dirs, caches).
    pub root: PathBuf,
    /// gRPC unix socket containerd dials.
    pub address: PathBuf,
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter directive.
    pub log_level: String,
    pub log_format: LogFormat,
    /// `host:port` of the Prometheus endpoint; off when empty.
    pub metrics_address: String,
    pub registry: RegistryHosts,
    pub build_registry: Option<BuildRegistry>,
    /// How lazy layers are fetched.
    pub lazy: LazyConfig,
    /// The CRI image service proxy (kubelet's `--image-service-endpoint`).
    pub cri: CriProxyConfig,
    /// Which indexes are served lazily: any an image's own publisher made, or only signed ones.
    pub trust: TrustConfig,
    /// Pull secrets read from the Kubernetes API (a secret keychain).
    pub kubernetes: KubernetesConfig,
    /// containerd's API socket: where a Prepare without layer labels looks its layer up, and
    /// what the CRI proxy forwards to unless `[cri] containerd_address` says otherwise.
    pub containerd_address: PathBuf,
}

/// `[kubernetes]`: a secret keychain — the node's pull secrets (Secrets of type
/// `kubernetes.io/dockerconfigjson`) watched through the Kubernetes API and used for lazy reads
/// of images of the registries they name. Off by default: on a cluster shared by tenants, one
/// namespace's secret then serves lazy reads of another namespace's pulls from the same
/// registry (pulls themselves still need the pod's own secret); `namespaces` narrows it.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub secret_keychain: bool,
    /// A kubeconfig to reach the API server with; unset: the pod's service account (in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces whose secrets count; empty: all (cluster-wide list/watch of Secrets).
    pub namespaces: Vec<String>,
}

/// `[cri]`: the CRI image service proxy. It serves the CRI `ImageService` on its own socket,
/// forwards every call to containerd, and keeps the `AuthConfig` of each `PullImage` for the
/// lazy reads of that image.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CriProxyConfig {
    /// Unix socket to serve on; off when unset (e.g. `/run/clip-snapshotter/cri.sock`).
    pub image_service_address: Option<PathBuf>,
    /// containerd's CRI socket (default: the top-level `containerd_address`).
    pub containerd_address: Option<PathBuf>,
    /// Pass containerd a token minted from `[build_registry.credentials]` when kubelet pulls an
    /// image of the build registry *without* a pull secret. Off by default: it lets any pod of
    /// the node pull any image of the build registry. Lazy reads of layers mounted for a pull
    /// made with a secret never depend on it.
    pub mint_for_pulls_without_secret: bool,
}

/// `[trust]`: the trust mode (docs/trust.md). With no keys (the default), an image is served
/// lazily with the index its own publisher attached to it. With keys, only an index artifact
/// signed (in cosign's format) by one of them is served lazily; every other image is unpacked
/// the ordinary way, with the reason in the `clip.not-lazy` label.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// PEM public keys (ECDSA P-256, as `cosign generate-key-pair` writes `cosign.pub`).
    pub keys: Vec<PathBuf>,
}

/// `[lazy]`: the read path of lazily served layers. The nested sections feed the read path's
/// policies: `[lazy.prefetch]` its prefetcher, `[lazy.completion]` background completion,
/// `[lazy.profiles]` access profiles.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LazyConfig {
    /// Missing spans fetched together with a requested one (sequential read-ahead).
    pub readahead_spans: u32,
    /// Serve large fully local files with FUSE passthrough (kernel 6.9+): the kernel reads a
    /// local copy directly. Costs a copy on disk and a FUSE round trip per open; off, the
    /// kernel opens files without asking the daemon and keeps their page cache.
    pub passthrough: bool,
    /// How long credentials received in `clip.*` labels are kept in the root-only store for
    /// restarts (seconds).
    pub credential_ttl_s: u64,
    /// Keep lazy mounts alive across daemon restarts: a small keeper process holds their FUSE
    /// connections and the next daemon serves them again (running containers only pause).
    pub survive_restarts: bool,
    /// How long the keeper holds connections with no daemon attached before it closes them
    /// (their pending reads then fail instead of waiting forever), seconds.
    pub orphan_timeout_s: u64,
    /// The fd keeper runs on its own (the DaemonSet's `clip-fd-keeper`): connect to it, and
    /// again at the next mount while it is away; never start one (a keeper started by the
    /// daemon would live and die with the daemon's container) and never stop it.
    pub external_fd_keeper: bool,
    /// Disk limit of the span caches and passthrough copies of all layers, bytes (0:
    /// unlimited). Least recently used spans are evicted beyond it; they are fetched again
    /// when read.
    pub cache_max_bytes: u64,
    /// Bound on one span fetch with all its retries, seconds (at least 1): a container's read
    /// fails with an I/O error after it instead of waiting for a registry that does not answer.
    pub fetch_timeout_s: u64,
    /// Serve lazily also the Prepares that carry no layer labels (nerdctl, `ctr images pull`
    /// on the client-side path): their layer is looked up in containerd's content store.
    pub serve_unlabelled_pulls: bool,
    /// A layer of an image that publishes no usable CLIP index is downloaded and unpacked by the
    /// snapshotter in Prepare, inflating and untarring as it arrives (no copy in containerd's
    /// content store, no second pass), instead of by containerd; off, containerd pulls it.
    pub unpack_without_index: bool,
    /// Space left free on the file system of the snapshots while a layer is unpacked here,
    /// MiB: an unpack that would leave less stops and fails the Prepare (a layer that inflates
    /// without bound — a tar bomb — never fills the node's disk; containerd's own unpack would,
    /// so it is not handed the layer). 0: no check.
    pub unpack_min_free_mb: u64,
    pub prefetch: PrefetchConfig,
    pub completion: CompletionConfig,
    pub profiles: ProfilesConfig,
}

/// `[lazy.prefetch]`: speculative fetching of what a miss suggests is read next.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// Threads fetching speculatively (the rest of the file, its neighbours in the layer); 0
    /// turns this off.
    pub threads: usize,
    /// Spans around a miss in a small file fetched speculatively (after it; half as many
    /// before it), once the layer has missed `neighbours_after_misses` times.
    pub neighbour_spans: u32,
    /// Misses a layer makes before a small file's neighbours are fetched: a short start is
    /// bound by the link's bandwidth and pays for every guessed byte; a start that keeps
    /// missing, file after file (a chain of Python imports), is bound by round trips.
    pub neighbours_after_misses: u32,
    /// A file read is fetched whole speculatively when it has at most this many spans.
    pub file_spans: u32,
    /// At the first miss in a shared library of 8 MiB or more, the tables its dynamic loader
    /// reads whole (relocations, symbols and their names, RELRO) are fetched at once, then the
    /// pages its relocations write outside RELRO.
    pub library_tables: bool,
}

/// `[lazy.completion]`: background completion of mounted layers — their missing remainder
/// streams in as large sequential range requests in the link's idle time: it follows the
/// containers' demand (reads that miss, the prefetcher, profile replays) rather than a delay.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompletionConfig {
    pub enabled: bool,
    /// Least time after a layer is mounted before its completion may start (ms). Not 0 by
    /// default: at 0 the origin behind a pull-through mirror once served 1.97x the image in CI
    /// (tests/mirror.rs; docs/containerd.md).
    pub start_delay_ms: u64,
    /// How long the link must have been free of demand before completion streams (ms); a
    /// request it makes stops at the next span when demand begins.
    pub quiet_ms: u64,
    /// Compressed bytes per range request (at least 1; independent of the span size).
    pub request_bytes: u64,
    /// Layers completed at once.
    pub layers: usize,
}

/// `[lazy.profiles]`: access profiles. Record which spans each image's first lazy start reads
/// (until reads go quiet for `quiet_ms`, at most `limit_s`), keep the profile under the root,
/// and on a start of an image with a profile (kept, or published in its registry) fetch the
/// profile's spans first, in requests of up to `request_bytes` on `threads` threads.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilesConfig {
    pub enabled: bool,
    /// Publish recorded profiles to the image's registry (an artifact referring to the image
    /// manifest) with the credentials the image is pulled with, where they may push.
    pub publish: bool,
    pub quiet_ms: u64,
    /// A recording ends this long after its first read at the latest. A multi-GB start on a slow
    /// link reads for well over 30 s (`import torch` over 100 Mbit/s: 33 s, and 3 s of exit); a
    /// profile cut short leaves the rest of the start to round trips (25.8 s against 17.8 s).
    pub limit_s: u64,
    pub threads: usize,
    pub request_bytes: u64,
}

impl Default for LazyConfig {
    fn default() -> Self {
        Self {
            readahead_spans: 0,
            passthrough: false,
            credential_ttl_s: 12 * 3600,
            survive_restarts: true,
            orphan_timeout_s: 600,
            external_fd_keeper: false,
            cache_max_bytes: 20 << 30,
            fetch_timeout_s: 30,
            serve_unlabelled_pulls: true,
            unpack_without_index: true,
            unpack_min_free_mb: 1024,
            prefetch: PrefetchConfig::default(),
            completion: CompletionConfig::default(),
            profiles: ProfilesConfig::default(),
        }
    }
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self { threads: 4, neighbour_spans: 2, neighbours_after_misses: 8, file_spans: 32, library_tables: true }
    }
}

impl Default for CompletionConfig {
    fn default() -> Self {
        Self { enabled: true, start_delay_ms: 5000, quiet_ms: 500, request_bytes: 8 << 20, layers: 2 }
    }
}

impl Default for ProfilesConfig {
    fn default() -> Self {
        Self { enabled: true, publish: true, quiet_ms: 2000, limit_s: 120, threads: 4, request_bytes: 4 << 20 }
    }
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from(crate::DEFAULT_ROOT),
            address: PathBuf::from(crate::DEFAULT_ADDRESS),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            metrics_address: String::new(),
            registry: RegistryHosts::default(),
            build_registry: None,
            lazy: LazyConfig::default(),
            cri: CriProxyConfig::default(),
            trust: TrustConfig::default(),
            kubernetes: KubernetesConfig::default(),
            containerd_address: PathBuf::from(crate::DEFAULT_CONTAINERD_ADDRESS),
        }
    }
}

impl SnapshotterConfig {
    pub(crate) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key, message: &str| ConfigError::Invalid { path: path.to_path_buf(), key, message: message.to_string() };
        if !self.root.is_absolute() {
            return Err(invalid("root", "must be an absolute path"));
        }
        if !self.address.is_absolute() {
            return Err(invalid("address", "must be an absolute path"));
        }
        if !self.metrics_address.is_empty() && self.metrics_address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("metrics_address", "must be ip:port, e.g. 127.0.0.1:9102"));
        }
        if !self.containerd_address.is_absolute() {
            return Err(invalid("containerd_address", "must be an absolute path"));
        }
        if self.trust.keys.iter().any(|k| !k.is_absolute()) {
            return Err(invalid("trust.keys", "must be absolute paths"));
        }
        if self.cri.image_service_address.as_ref().is_some_and(|a| !a.is_absolute()) {
            return Err(invalid("cri.image_service_address", "must be an absolute path"));
        }
        let r = &self.registry;
        if r.credential_provider_config.is_some() != r.credential_provider_bin_dir.is_some() {
            return Err(invalid(
                "registry.credential_provider_config",
                "needs registry.credential_provider_bin_dir, and the other way round",
            ));
        }
        let lazy = &self.lazy;
        for (key, value) in [
            ("lazy.fetch_timeout_s", lazy.fetch_timeout_s),
            ("lazy.completion.request_bytes", lazy.completion.request_bytes),
            ("lazy.profiles.quiet_ms", lazy.profiles.quiet_ms),
            ("lazy.profiles.limit_s", lazy.profiles.limit_s),
            ("lazy.profiles.request_bytes", lazy.profiles.request_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if let Some(b) = &self.build_registry {
            b.validate(path)?;
        }
        Ok(())
    }
}

/// `/etc/clip/builder.toml`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BuilderConfig {
    /// buildah storage root; buildah's default when unset.
    pub storage_root: Option<PathBuf>,
    /// buildah run root (with `storage_root`); buildah's default when unset.
    pub runroot: Option<PathBuf>,
    /// buildah storage driver (`overlay`, `vfs`); buildah's default when unset.
    pub storage_driver: Option<String>,
    /// Directory of the builder's persistent state (image reference cache, local indexes).
    pub state_dir: Option<PathBuf>,
    pub registry: RegistryHosts,
    pub build_registry: Option<BuildRegistry>,
}

impl BuilderConfig {
    pub(crate) fn check(&self, path: &Path) -> Result<(), ConfigError> {
        if let Some(b) = &self.build_registry {
            b.validate(path)?;
        }
        Ok(())
    }
}

/// `[registry]`: how registries are reached.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryHosts {
    /// containerd `hosts.toml` layout: mirrors, CA, plain HTTP.
    pub hosts_dir: Option<PathBuf>,
    /// Docker's `config.json` (what `nerdctl login` and `docker login` write) instead of
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// kubelet's `CredentialProviderConfig` (its `--image-credential-provider-config`): the
    /// snapshotter calls the same plugins, so lazy reads renew their credentials as kubelet's
    /// pulls do.
    pub credential_provider_config: Option<PathBuf>,
    /// Where the plugins are (kubelet's `--image-credential-provider-bin-dir`).
    pub credential_provider_bin_dir: Option<PathBuf>,
}

/// `[build_registry]`: the registry images are built into.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRegistry {
    /// `host[:port]`.
    pub registry: String,
    /// Repository prefix of built images (may be empty: the whole registry).
    #[serde(default)]
    pub repository: String,
    /// Plain HTTP / no TLS verification.
    #[serde(default)]
    pub insecure: bool,
    /// Extra trust anchor (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Long-term credentials from which short-lived tokens are minted.
    #[serde(default)]
    pub credentials: Option<LongTermCredentials>,
}

impl BuildRegistry {
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid { path: path.to_path_buf(), key, message };
        let r = self.registry.trim();
        if r.is_empty() || r.contains('/') || r.contains("://") || r.chars().any(char::is_whitespace) {
            return Err(invalid(
                "build_registry.registry",
                format!("must be host[:port] without scheme or path, got {:?}", self.registry),
            ));
        }
        if self.repository.starts_with('/') || self.repository.contains("//") {
            return Err(invalid(
                "build_registry.repository",
                "must be a relative repository prefix such as \"userimages\"".into(),
            ));
        }
        if let Some(c) = &self.credentials {
            c.validate(path)?;
        }
        Ok(())
    }
}

/// `[build_registry.credentials]`: long-term credentials.
#[derive(Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum LongTermCredentials {
    Basic {
        username: String,
        #[serde(default)]
        password: Option<String>,
        #[serde(default)]
        password_file: Option<PathBuf>,
    },
    Ecr {
        region: String,
        #[serde(default)]
        access_key_id: Option<String>,
        #[serde(default)]
        secret_access_key: Option<String>,
        /// Use the ambient AWS chain when no keys are given (opt-in).
        #[serde(default)]
        use_default_chain: bool,
        #[serde(default)]
        endpoint_url: Option<String>,
    },
    Gcp {
        service_account_key_file: PathBuf,
    },
}

impl std::fmt::Debug for LongTermCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log through Debug.
        match self {
            Self::Basic { username, .. } => write!(f, "Basic {{ username: {username:?}, password: <redacted> }}"),
            Self::Ecr { region, endpoint_url, .. } => {
                write!(f, "Ecr {{ region: {region:?}, endpoint_url: {endpoint_url:?}, keys: <redacted> }}")
            }
            Self::Gcp { service_account_key_file } => {
                write!(f, "Gcp {{ service_account_key_file: {service_account_key_file:?} }}")
            }
        }
    }
}

impl LongTermCredentials {
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: "build_registry.credentials",
            message: message.to_string(),
        };
        match self {
            Self::Basic { password, password_file, .. } => match (password, password_file) {
                (Some(_), Some(_)) => Err(invalid("give password or password_file, not both")),
                (None, None) => Err(invalid("basic credentials need password or password_file")),
                _ => Ok(()),
            },
            Self::Ecr { access_key_id, secret_access_key, use_default_chain, region, .. } => {
                if region.is_empty() {
                    return Err(invalid("ecr credentials need a region"));
                }
                match (access_key_id, secret_access_key, use_default_chain) {
                    (Some(_), Some(_), _) | (None, None, true) => Ok(()),
                    (None, None, false) => Err(invalid(
                        "ecr credentials need access_key_id and secret_access_key, or use_default_chain = true",
                    )),
                    _ => Err(invalid("give both access_key_id and secret_access_key")),
                }
            }
            Self::Gcp { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfigFile as _;

    fn parse(text: &str) -> Result<SnapshotterConfig, ConfigError> {
        SnapshotterConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn zero_bounds_and_request_sizes_are_refused_at_load() {
        for (section, key) in [
            ("lazy", "fetch_timeout_s"),
            ("lazy.completion", "request_bytes"),
            ("lazy.profiles", "quiet_ms"),
            ("lazy.profiles", "limit_s"),
            ("lazy.profiles", "request_bytes"),
        ] {
            let err = parse(&format!("[{section}]\n{key} = 0\n")).expect_err(key);
            assert!(err.to_string().contains(&format!("{section}.{key}")), "{err}");
        }
    }

    #[test]
    fn a_config_value_round_trips_through_its_toml() {
        let mut c = SnapshotterConfig::default();
        c.containerd_address = PathBuf::from("/run/x/containerd.sock");
        c.registry.hosts_dir = Some(PathBuf::from("/etc/x/certs.d"));
        c.lazy.completion.enabled = false;
        c.lazy.prefetch.threads = 0;
        c.cri.image_service_address = Some(PathBuf::from("/run/x/cri.sock"));
        c.build_registry = Some(BuildRegistry {
            registry: "127.0.0.1:5000".into(),
            repository: "userimages".into(),
            insecure: true,
            ca_file: None,
            credentials: Some(LongTermCredentials::Basic {
                username: "u".into(),
                password: Some("p".into()),
                password_file: None,
            }),
        });
        let text = c.to_toml().expect("serialize");
        let back = parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(back.containerd_address, c.containerd_address);
        assert_eq!(back.registry.hosts_dir, c.registry.hosts_dir);
        assert!(!back.lazy.completion.enabled);
        assert_eq!(back.lazy.prefetch.threads, 0);
        assert_eq!(back.lazy.cache_max_bytes, c.lazy.cache_max_bytes);
        assert_eq!(back.cri.image_service_address, c.cri.image_service_address);
        let br = back.build_registry.expect("build registry");
        assert_eq!((br.registry.as_str(), br.repository.as_str(), br.insecure), ("127.0.0.1:5000", "userimages", true));
        assert!(matches!(br.credentials, Some(LongTermCredentials::Basic { password: Some(p), .. }) if p == "p"));
    }

    #[test]
    fn defaults_when_empty() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c.root, PathBuf::from(crate::DEFAULT_ROOT));
        assert_eq!(c.address, PathBuf::from(crate::DEFAULT_ADDRESS));
        assert!(c.build_registry.is_none());
    }

    #[test]
    fn fixed_keys_parse() {
        let c = parse(
            r#"
            [build_registry]
            registry = "registry.example.com:5000"
            repository = "userimages"
            insecure = false
            ca_file = "/etc/clip/registry-ca.pem"
            [build_registry.credentials]
            type = "basic"
            username = "u"
            password_file = "/etc/clip/registry-password"
            [registry]
            hosts_dir = "/etc/containerd/certs.d"
            "#,
        )
        .expect("valid");
        let b = c.build_registry.expect("build registry");
        assert_eq!(b.registry, "registry.example.com:5000");
        assert_eq!(b.repository, "userimages");
        assert!(matches!(b.credentials, Some(LongTermCredentials::Basic { .. })));
        assert_eq!(c.registry.hosts_dir, Some(PathBuf::from("/etc/containerd/certs.d")));
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = parse("rooot = \"/x\"").expect_err("unknown key");
        assert!(e.to_string().contains("rooot"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse("root = \"relative\"").is_err());
        assert!(parse("metrics_address = \"nope\"").is_err());
        assert!(parse("[build_registry]\nregistry = \"https://x/y\"").is_err());
        let e = parse(
            "[build_registry]\nregistry = \"r:5000\"\n[build_registry.credentials]\ntype = \"basic\"\nusername = \"u\"",
        )
        .expect_err("no password");
        assert!(e.to_string().contains("password"), "{e}");
        let e = parse(
            "[build_registry]\nregistry = \"r\"\n[build_registry.credentials]\ntype = \"ecr\"\nregion = \"us-east-1\"",
        )
        .expect_err("no keys");
        assert!(e.to_string().contains("use_default_chain"), "{e}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = parse(
            "[build_registry]\nregistry = \"r\"\n[build_registry.credentials]\ntype = \"basic\"\nusername = \"u\"\npassword = \"SENTINEL-PW\"",
        )
        .expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("SENTINEL-PW"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }
}
