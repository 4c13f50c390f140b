//! Where a Prepare that carries no layer labels learns which image layer it is.
//!
//! containerd's unpacker attaches the `cri.*` labels only when its client asks for them (CRI
//! with `disable_snapshot_annotations = false`, the transfer service with the proxy plugin's
//! `enable_remote_snapshot_annotations` export); nerdctl's client-side pull with a snapshotter
//! it does not know, `ctr images pull --local` and containerd 1.6's `ctr images pull` attach
//! none. Such a Prepare still names the chain id it wants (`containerd.io/snapshot.ref`), and by
//! then containerd has stored the image's manifest and config in its content store, the
//! manifest labelled with its config (`containerd.io/gc.ref.content.config`) and with the
//! registry and repository it came from (`containerd.io/distribution.source.<host>`). This
//! module finds the manifest whose config's chain holds that chain id and returns the same
//! facts the `cri.*` labels would have given.
//!
//! containerd's source label drops the registry's port (`url.Hostname()`), so the port comes
//! from the registries known for that host name: the namespace's image records, the
//! `hosts.toml` directory, docker's `config.json` and the build registry, in that order; a
//! host name known nowhere with a port is taken as it is (port 443).

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{InfoRequest, ListContentRequest, ListImagesRequest, ReadContentRequest};
use containerd_client::tonic::{Request, transport::Channel};
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The manifest label that names its config (set by containerd's pull before unpacking).
const CONFIG_REF_LABEL: &str = "containerd.io/gc.ref.content.config";
/// Prefix of the labels that name where a blob was pulled from: `<prefix><host>` = repos.
const SOURCE_LABEL_PREFIX: &str = "containerd.io/distribution.source.";
/// Largest manifest or config read (containerd's own limit for manifests is 4 MiB).
const MAX_BLOB: usize = 8 << 20;
/// Configs read per lookup at most (each is read once, then its chain ids are cached).
const MAX_CONFIG_READS: usize = 64;

/// Why a lookup failed (the Prepare then falls back to an ordinary snapshot).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot reach containerd at {address}: {source}")]
    Connect { address: String, source: containerd_client::tonic::transport::Error },
    #[error("containerd refused {what}: {status}")]
    Api { what: String, status: Box<containerd_client::tonic::Status> },
    #[error("{0}")]
    Malformed(String),
}

/// The image layer a Prepare is for, as the `cri.*` labels would have named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundLayer {
    /// `host/repository@manifest-digest`.
    pub image_ref: String,
    pub manifest_digest: String,
    /// Every layer of the manifest, in order.
    pub layer_digests: Vec<String>,
    /// Which of them the Prepare is for.
    pub index: usize,
}

/// Whether the blob of a Prepare's layer is in containerd's content store
/// ([`ContentLookup::has_blob`]), asked only when an unpack here would otherwise download it:
/// a lazily served layer never costs the call. Blocking (call from the Prepare's thread).
#[derive(Debug)]
pub struct BlobCheck(Option<BlobCheckArgs>);

#[derive(Debug)]
struct BlobCheckArgs {
    lookup: Arc<ContentLookup>,
    namespace: String,
    digest: String,
    runtime: tokio::runtime::Handle,
}

impl BlobCheck {
    /// No check possible (no containerd to ask, no layer label): never local.
    pub fn none() -> Self {
        Self(None)
    }

    pub fn is_local(&self) -> bool {
        self.0.as_ref().is_some_and(|a| a.runtime.block_on(a.lookup.has_blob(&a.namespace, &a.digest)))
    }
}

/// Where registries with their ports are configured, for a source label that has no port.
#[derive(Debug, Clone, Default)]
pub struct KnownRegistries {
    /// containerd's `hosts.toml` directory: `<dir>/<host[:port]>/hosts.toml`.
    pub hosts_dir: Option<PathBuf>,
    /// Docker's `config.json` (else `$DOCKER_CONFIG` or `~/.docker`): its `auths` keys.
    pub docker_config: Option<PathBuf>,
    /// `[build_registry] registry`.
    pub build_registry: Option<String>,
}

impl KnownRegistries {
    /// Every `host[:port]` configured, in the order above.
    fn list(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(entries) = self.hosts_dir.as_ref().and_then(|d| std::fs::read_dir(d).ok()) {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "_default")
                .collect();
            names.sort();
            out.extend(names);
        }
        let config = self.docker_config.clone().or_else(|| {
            std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .map(|d| d.join("config.json"))
        });
        if let Some(v) = config
            .and_then(|c| std::fs::read(c).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            && let Some(auths) = v["auths"].as_object()
        {
            for key in auths.keys() {
                let host = key.trim_start_matches("https://").trim_start_matches("http://");
                out.push(host.split('/').next().unwrap_or(host).to_string());
            }
        }
        out.extend(self.build_registry.clone());
        out
    }
}

/// Looks layers up in containerd's content store.
#[derive(Debug)]
pub struct ContentLookup {
    address: PathBuf,
    known: KnownRegistries,
    channel: tokio::sync::OnceCell<Channel>,
    /// Chain ids of the configs read so far, by config digest.
    chains: Mutex<HashMap<String, Vec<String>>>,
}

impl ContentLookup {
    /// A lookup against containerd's API socket `address` (connected at first use).
    pub fn new(address: PathBuf, known: KnownRegistries) -> Self {
        Self { address, known, channel: tokio::sync::OnceCell::new(), chains: Mutex::new(HashMap::new()) }
    }

    async fn channel(&self) -> Result<Channel, LookupError> {
        let channel = self
            .channel
            .get_or_try_init(|| async {
                containerd_client::connect(&self.address)
                    .await
                    .map_err(|source| LookupError::Connect { address: self.address.display().to_string(), source })
            })
            .await?;
        Ok(channel.clone())
    }

    /// An unpack's Prepare that names its target chain id but not its image layer gets the
    /// labels CRI would have given it, from containerd's content store ([`Self::find`]).
    /// Partial labels are left as they are (they fall back).
    pub async fn label_unlabelled(&self, parent: &str, mut labels: HashMap<String, String>) -> HashMap<String, String> {
        use clip_config::labels as l;
        let Some(target) = labels.get(l::TARGET_SNAPSHOT_REF).cloned() else { return labels };
        if [l::CRI_IMAGE_REF, l::CRI_LAYER_DIGEST, l::CRI_MANIFEST_DIGEST].iter().any(|k| labels.contains_key(*k)) {
            return labels;
        }
        let Some(namespace) = crate::request_namespace::current() else {
            tracing::debug!("a Prepare without layer labels nor containerd namespace: an ordinary snapshot");
            return labels;
        };
        match self.find(&namespace, &target, parent).await {
            Ok(Some(found)) => {
                tracing::info!(image = %found.image_ref, layer = found.index, "layer of an unlabelled Prepare found in containerd's content store");
                labels.extend(l::cri_layer_labels(
                    &target,
                    &found.image_ref,
                    &found.manifest_digest,
                    &found.layer_digests,
                    found.index,
                ));
            }
            Ok(None) => tracing::debug!(
                namespace,
                "no manifest in containerd's content store has this layer: an ordinary snapshot"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "looking the layer of an unlabelled Prepare up failed: an ordinary snapshot");
            }
        }
        labels
    }

    /// The check whether the blob of the layer a labelled Prepare names is in the content store
    /// of the call's namespace, made now (the namespace is the call's) and asked only if needed.
    pub fn blob_check(self: &Arc<Self>, labels: &HashMap<String, String>) -> BlobCheck {
        let digest = labels.get(clip_config::labels::CRI_LAYER_DIGEST);
        let asked = match (digest, crate::request_namespace::current(), tokio::runtime::Handle::try_current()) {
            (Some(digest), Some(namespace), Ok(runtime)) => {
                Some(BlobCheckArgs { lookup: self.clone(), namespace, digest: digest.clone(), runtime })
            }
            _ => None,
        };
        BlobCheck(asked)
    }

    /// Whether blob `digest` is in namespace `namespace`'s content store (containerd 1.6's
    /// `ctr images pull` downloads every layer before unpacking, and an image pulled before
    /// into another snapshotter left its layers there): then containerd unpacks it from there
    /// rather than the snapshotter downloading it again. False when containerd cannot say.
    pub async fn has_blob(&self, namespace: &str, digest: &str) -> bool {
        let asked = async {
            let request = namespaced(namespace, InfoRequest { digest: digest.to_string() })?;
            ContentClient::new(self.channel().await?).info(request).await.map_err(|s| api("content info", s))
        };
        match asked.await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(namespace, digest, error = %e, "the blob is not in containerd's content store");
                false
            }
        }
    }

    /// The layer whose chain id is `target` (and whose lower layers' chain id is `parent`,
    /// when given) in namespace `namespace`: `Ok(None)` when no manifest there has it or when
    /// its manifest does not say where it came from.
    pub async fn find(&self, namespace: &str, target: &str, parent: &str) -> Result<Option<FoundLayer>, LookupError> {
        let channel = self.channel().await?;
        let mut client = ContentClient::new(channel.clone());
        let request = ListContentRequest { filters: vec![format!("labels.\"{CONFIG_REF_LABEL}\"")] };
        let mut stream =
            client.list(namespaced(namespace, request)?).await.map_err(|s| api("listing content", s))?.into_inner();
        let mut manifests = Vec::new();
        while let Some(page) = stream.next().await {
            manifests.extend(page.map_err(|s| api("listing content", s))?.info);
        }
        // The image being pulled was stored moments ago: newest first.
        manifests.sort_by_key(|i| std::cmp::Reverse(i.updated_at.map(|t| (t.seconds, t.nanos))));
        let mut reads = 0;
        for manifest in manifests {
            let Some(config) = manifest.labels.get(CONFIG_REF_LABEL) else { continue };
            let cached = self.cached_chain(config);
            let chain = match cached {
                Some(chain) => chain,
                None if reads < MAX_CONFIG_READS => {
                    reads += 1;
                    let Ok(chain) = self.read_chain(&mut client, namespace, config).await else { continue };
                    chain
                }
                None => continue,
            };
            let Some(index) = chain.iter().position(|c| c == target) else { continue };
            // containerd hands its own key of the parent, `<namespace>/<id>/<name>`, whose name
            // ends in the chain id (`sha256:...` or an unpack key `extract-<unique> sha256:...`).
            let parent_chain = parent.rsplit(['/', ' ']).next().unwrap_or(parent);
            if !parent.is_empty() && (index == 0 || chain[index - 1] != parent_chain) {
                continue;
            }
            let Some((hostname, repository)) = source_label(&manifest.labels) else {
                tracing::debug!(manifest = %manifest.digest, "a manifest with the layer has no distribution source label");
                continue;
            };
            let images = image_names(&channel, namespace).await?;
            let registry = registry_with_port(&hostname, &repository, &images, &self.known.list());
            let image_ref = format!("{registry}/{repository}@{}", manifest.digest);
            let bytes = read_blob(&mut client, namespace, &manifest.digest).await?;
            let layer_digests = manifest_layers(&bytes)?;
            if layer_digests.len() != chain.len() {
                return Err(LookupError::Malformed(format!(
                    "manifest {} lists {} layers, its config {} diff ids",
                    manifest.digest,
                    layer_digests.len(),
                    chain.len()
                )));
            }
            return Ok(Some(FoundLayer { image_ref, manifest_digest: manifest.digest, layer_digests, index }));
        }
        Ok(None)
    }

    fn cached_chain(&self, config: &str) -> Option<Vec<String>> {
        self.chains.lock().get(config).cloned()
    }

    async fn read_chain(
        &self,
        client: &mut ContentClient<Channel>,
        namespace: &str,
        config: &str,
    ) -> Result<Vec<String>, LookupError> {
        let bytes = read_blob(client, namespace, config).await?;
        let diff_ids =
            config_diff_ids(&bytes).map_err(|e| LookupError::Malformed(format!("image config {config}: {e}")))?;
        let chain = clip_registry::image::chain_ids(&diff_ids);
        self.chains.lock().insert(config.to_string(), chain.clone());
        Ok(chain)
    }
}

fn api(what: &str, status: containerd_client::tonic::Status) -> LookupError {
    LookupError::Api { what: what.to_string(), status: Box::new(status) }
}

fn namespaced<T>(namespace: &str, msg: T) -> Result<Request<T>, LookupError> {
    let mut r = Request::new(msg);
    let value = namespace
        .parse()
        .map_err(|_| LookupError::Malformed(format!("namespace {namespace:?} is not a header value")))?;
    r.metadata_mut().insert(crate::request_namespace::HEADER, value);
    Ok(r)
}

async fn read_blob(client: &mut ContentClient<Channel>, namespace: &str, digest: &str) -> Result<Vec<u8>, LookupError> {
    let what = || format!("reading {digest}");
    let request = ReadContentRequest { digest: digest.to_string(), offset: 0, size: 0 };
    let mut stream = client.read(namespaced(namespace, request)?).await.map_err(|s| api(&what(), s))?.into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(|s| api(&what(), s))?.data);
        if out.len() > MAX_BLOB {
            return Err(LookupError::Malformed(format!("{digest} is larger than {MAX_BLOB} bytes")));
        }
    }
    Ok(out)
}

/// `(host name, repository)` from a manifest's `containerd.io/distribution.source.<host>` label
/// (its value lists repositories, comma-separated; the first is taken).
fn source_label(labels: &HashMap<String, String>) -> Option<(String, String)> {
    let mut sources: Vec<(&String, &String)> =
        labels.iter().filter(|(k, _)| k.starts_with(SOURCE_LABEL_PREFIX)).collect();
    sources.sort();
    let (key, repos) = sources.first()?;
    let host = key.strip_prefix(SOURCE_LABEL_PREFIX)?;
    let repo = repos.split(',').map(str::trim).find(|r| !r.is_empty())?;
    Some((host.to_string(), repo.to_string()))
}

/// The names of the images of `namespace`.
async fn image_names(channel: &Channel, namespace: &str) -> Result<Vec<String>, LookupError> {
    let mut images = ImagesClient::new(channel.clone());
    let listed = images
        .list(namespaced(namespace, ListImagesRequest { filters: Vec::new() })?)
        .await
        .map_err(|s| api("listing images", s))?;
    Ok(listed.into_inner().images.into_iter().map(|i| i.name).collect())
}

/// The `host[:port]` of the registry a source label's host name stands for: an image of the
/// same repository in the namespace, else a configured registry of that host name, else the
/// host name alone.
fn registry_with_port(hostname: &str, repository: &str, images: &[String], known: &[String]) -> String {
    let host_of = |r: &str| clip_registry::hosts::split_host_port(r).0.to_string();
    let from_images = images.iter().find_map(|name| {
        let (registry, rest) = name.split_once('/')?;
        let repo = rest.split(['@', ':']).next()?;
        (host_of(registry) == hostname && repo == repository).then(|| registry.to_string())
    });
    from_images
        .or_else(|| known.iter().find(|r| host_of(r) == hostname).cloned())
        .unwrap_or_else(|| hostname.to_string())
}

/// The diff ids of an image config (typed, as oci-spec reads it).
fn config_diff_ids(bytes: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    Ok(serde_json::from_slice::<Config>(bytes)?.rootfs.diff_ids)
}

fn manifest_layers(bytes: &[u8]) -> Result<Vec<String>, LookupError> {
    let malformed = |e: String| LookupError::Malformed(format!("image manifest: {e}"));
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let layers = v["layers"].as_array().ok_or_else(|| malformed("no layers".into()))?;
    layers
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .filter(|d| clip_config::digest::is_digest(d))
                .map(str::to_string)
                .ok_or_else(|| malformed("a layer without a valid digest".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_labels_give_host_name_and_first_repository() {
        let labels = HashMap::from([
            ("containerd.io/gc.ref.content.config".to_string(), "x".to_string()),
            ("containerd.io/distribution.source.127.0.0.1".to_string(), "testbed/python,other".to_string()),
        ]);
        assert_eq!(source_label(&labels), Some(("127.0.0.1".into(), "testbed/python".into())));
        assert_eq!(source_label(&HashMap::new()), None);
    }

    #[test]
    fn the_port_comes_from_images_then_configured_registries() {
        let images = vec!["127.0.0.1:5000/testbed/python:latest".to_string(), "127.0.0.1:6000/other:1".to_string()];
        let known = vec!["registry.example:8443".to_string(), "127.0.0.1:7000".to_string()];
        assert_eq!(registry_with_port("127.0.0.1", "testbed/python", &images, &known), "127.0.0.1:5000");
        assert_eq!(registry_with_port("127.0.0.1", "team/app", &images, &known), "127.0.0.1:7000");
        assert_eq!(registry_with_port("registry.example", "x", &[], &known), "registry.example:8443");
        assert_eq!(registry_with_port("ghcr.io", "x", &images, &known), "ghcr.io");
    }

    #[test]
    fn manifests_and_configs_are_checked() {
        let d = format!("sha256:{}", "c".repeat(64));
        let m = format!(r#"{{"layers":[{{"digest":"{d}"}},{{"digest":"{d}"}}]}}"#);
        assert_eq!(manifest_layers(m.as_bytes()).expect("valid"), vec![d.clone(), d.clone()]);
        assert!(manifest_layers(br#"{"layers":[{"digest":"sha256:../x"}]}"#).is_err());
        assert!(manifest_layers(b"not json").is_err());
        assert_eq!(
            config_diff_ids(format!(r#"{{"rootfs":{{"diff_ids":["{d}"]}}}}"#).as_bytes()).expect("valid"),
            vec![d]
        );
        assert!(config_diff_ids(br#"{"rootfs":{}}"#).is_err());
    }
}
