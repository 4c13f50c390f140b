//! `clip-builder index REF`: index an image that is in a registry and publish its index
//! artifact (see `clip_index::artifact`): read the manifest with the credential chain, stream
//! every layer once (two at a time) into the indexer, push each packed index, push the
//! artifact manifest with the image manifest as `subject`, and add it to the tag-schema
//! fallback index for registries without the referrers API.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clip_index::artifact::{ARTIFACT_TYPE, ArtifactBlob, BlobKind, EMPTY_CONFIG, IndexArtifact};
use clip_registry::api::sha256_digest;
use clip_registry::{Platform, Repository};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

/// Span size of published indexes: small spans make lazy reads fetch little, and cost little
/// since their zran windows travel in a separate blob that readers fetch per span.
pub const PUBLISH_SPAN_SIZE: u64 = 256 << 10;

/// One layer's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerIndexed {
    pub layer_digest: String,
    pub layer_size: u64,
    pub index_digest: String,
    pub index_size: usize,
    pub entries: u32,
    pub spans: u32,
    /// The separate windows blob (gzip layers), fetched span by span by readers.
    pub windows_digest: Option<String>,
    pub windows_size: usize,
    pub seconds: f64,
}

impl LayerIndexed {
    /// The result for `index` of layer `digest` (`layer_size` compressed bytes), packed as
    /// `packed`, with its windows blob if any.
    fn from_index(
        digest: &str,
        layer_size: u64,
        index: &clip_index::Index,
        packed: &[u8],
        windows: Option<&[u8]>,
        seconds: f64,
    ) -> Self {
        Self {
            layer_digest: digest.to_string(),
            layer_size,
            index_digest: sha256_digest(packed),
            index_size: packed.len(),
            entries: index.entry_count(),
            spans: index.span_count(),
            windows_digest: windows.map(sha256_digest),
            windows_size: windows.map_or(0, <[u8]>::len),
            seconds,
        }
    }
}

/// What `clip-builder index REF` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageIndexed {
    pub image: String,
    pub manifest_digest: String,
    pub index_digest: String,
    pub layers: Vec<LayerIndexed>,
    pub seconds: f64,
    /// An index covering every layer was already published for this manifest: no layer work.
    pub reused: bool,
    /// Labels for `clip-snapshotter pull` / containerd that skip index discovery.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The digest of the signature manifest (`sha256-<hex>.sig`), when signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Indexes and publishes the image `reference` (a tag or digest) of `repo`.
/// How layers are indexed: span size, a local cache of indexes by layer digest (content
/// addressed: a layer indexed once is not downloaded again), and progress output.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    pub span_size: u64,
    pub cache_dir: Option<std::path::PathBuf>,
    pub progress: Arc<crate::progress::Progress>,
    /// Sign the index artifact with this key (cosign's format; `[trust]` nodes need it).
    pub sign_key: Option<Arc<clip_trust::SignKey>>,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            span_size: PUBLISH_SPAN_SIZE,
            cache_dir: None,
            progress: Arc::new(crate::progress::Progress::new()),
            sign_key: None,
        }
    }
}

/// Signs the artifact `digest` with the options' key, if any; the signature manifest's digest.
async fn sign_artifact(repo: &Repository, digest: &str, opts: &IndexOptions) -> Result<Option<String>> {
    let Some(key) = &opts.sign_key else { return Ok(None) };
    let signature = clip_trust::cosign::sign(repo, digest, key)
        .await
        .with_context(|| format!("signing the index artifact {digest}"))?;
    Ok(Some(signature))
}

pub async fn index_image(
    repo: Arc<Repository>,
    reference: &str,
    platform: &Platform,
    opts: &IndexOptions,
) -> Result<ImageIndexed> {
    let span_size = opts.span_size;
    let started = Instant::now();
    let (manifest, image) = repo
        .get_image_manifest(reference, platform)
        .await
        .with_context(|| format!("reading the manifest of {}", repo.image))?;
    // An artifact already published is reused, but never signed unseen: a signing builder
    // vouches only for indexes it made.
    let reusable = if opts.sign_key.is_none() { published_index(&repo, &manifest.digest, &image).await } else { None };
    if let Some(existing) = reusable {
        let labels = [(clip_config::labels::INDEX_DIGEST.to_string(), existing.clone())].into();
        let signature = sign_artifact(&repo, &existing, opts).await?;
        return Ok(ImageIndexed {
            signature,
            image: repo.image.with_digest(&manifest.digest).to_string(),
            manifest_digest: manifest.digest,
            index_digest: existing,
            layers: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
            reused: true,
            labels,
        });
    }
    // Each layer is checked against its own diff ID while it is indexed, so a signed index
    // never vouches for a layer that claims another layer's chain.
    let diff_ids = repo.image_diff_ids(&image).await?;
    let limit = Arc::new(tokio::sync::Semaphore::new(2));
    let mut tasks = Vec::new();
    for (layer, diff_id) in image.layers().iter().zip(diff_ids) {
        let (repo, limit) = (repo.clone(), limit.clone());
        let digest = layer.digest().to_string();
        let media_type = layer.media_type().to_string();
        let (cache, progress) = (opts.cache_dir.clone(), opts.progress.clone());
        let size = layer.size();
        tasks.push(tokio::spawn(async move {
            if let Some(hit) = cache.as_deref().and_then(|c| cached_layer(c, &digest, &diff_id)) {
                return Ok(hit);
            }
            let _permit = limit.acquire_owned().await?;
            let task = progress.task(&format!("layer {}", &digest[7..19.min(digest.len())]), size);
            let result = index_layer(&repo, &digest, &diff_id, &media_type, span_size, &task).await;
            if let (Ok(r), Some(c)) = (&result, cache.as_deref())
                && let Err(e) = store_layer(c, &digest, &diff_id, &r.1, r.2.as_deref())
            {
                tracing::warn!(error = %e, "cannot cache the index of {digest}");
            }
            match &result {
                Ok((l, _, _)) => task.finish(&format!("indexed: {} entries, {} spans", l.entries, l.spans)),
                Err(e) => task.finish(&format!("failed: {e}")),
            }
            result
        }));
    }
    let mut layers = Vec::new();
    let mut artifact_layers = Vec::new();
    for task in tasks {
        let (indexed, packed, windows) = task.await.context("indexing task")??;
        let pushed = repo
            .push_blob(Bytes::from(packed))
            .await
            .with_context(|| format!("pushing the index of layer {}", indexed.layer_digest))?;
        debug_assert_eq!(pushed, indexed.index_digest);
        artifact_layers.push(ArtifactBlob {
            kind: BlobKind::Index,
            digest: indexed.index_digest.clone(),
            size: indexed.index_size as u64,
            layer_digest: indexed.layer_digest.clone(),
        });
        if let Some(windows) = windows {
            let size = windows.len();
            let digest = repo
                .push_blob(Bytes::from(windows))
                .await
                .with_context(|| format!("pushing the windows of layer {}", indexed.layer_digest))?;
            artifact_layers.push(ArtifactBlob {
                kind: BlobKind::Windows,
                digest,
                size: size as u64,
                layer_digest: indexed.layer_digest.clone(),
            });
        }
        layers.push(indexed);
    }
    let config_digest = repo.push_blob(Bytes::from_static(EMPTY_CONFIG)).await?;
    let subject = oci_spec::image::Descriptor::new(
        manifest.media_type.as_str().into(),
        manifest.bytes.len() as u64,
        manifest.digest.parse::<oci_spec::image::Digest>().context("the image manifest's digest")?,
    );
    let bytes = IndexArtifact::new(subject, &config_digest, &artifact_layers)?.to_bytes()?;
    let artifact_digest = repo
        .push_referrer(&manifest.digest, ARTIFACT_TYPE, Bytes::from(bytes))
        .await
        .context("pushing the index artifact and adding it to the referrers fallback tag")?;
    let labels = [(clip_config::labels::INDEX_DIGEST.to_string(), artifact_digest.clone())].into();
    let signature = sign_artifact(&repo, &artifact_digest, opts).await?;
    Ok(ImageIndexed {
        signature,
        image: repo.image.with_digest(&manifest.digest).to_string(),
        manifest_digest: manifest.digest,
        index_digest: artifact_digest,
        layers,
        seconds: started.elapsed().as_secs_f64(),
        reused: false,
        labels,
    })
}

/// The digest of an index artifact already published for `manifest_digest` that covers every
/// layer of `image`, if any (indexes are content addressed: no need to redo them).
pub(crate) async fn published_index(
    repo: &Repository,
    manifest_digest: &str,
    image: &oci_spec::image::ImageManifest,
) -> Option<String> {
    let found = repo.referrers(manifest_digest, Some(ARTIFACT_TYPE)).await.ok()?;
    for d in found.iter().rev() {
        let digest = d.digest().to_string();
        let Ok(fetched) = repo.get_manifest(&digest).await else { continue };
        let Ok(artifact) = IndexArtifact::parse(&fetched.bytes) else { continue };
        let indexed = artifact.indexed_layers();
        if image.layers().iter().all(|l| indexed.contains(&l.digest().to_string())) {
            return Some(digest);
        }
    }
    None
}

fn cache_paths(dir: &std::path::Path, digest: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let name = digest.replace(':', "-");
    (dir.join(format!("{name}.clip")), dir.join(format!("{name}.windows")))
}

/// The diff ID a cached layer was checked against.
fn diff_id_path(dir: &std::path::Path, digest: &str) -> std::path::PathBuf {
    dir.join(format!("{}.diffid", digest.replace(':', "-")))
}

/// A layer indexed before, from the local cache (checked: it must open, name the layer, and
/// have been checked against the same diff ID).
fn cached_layer(
    dir: &std::path::Path,
    digest: &str,
    diff_id: &str,
) -> Option<(LayerIndexed, Vec<u8>, Option<Vec<u8>>)> {
    if std::fs::read_to_string(diff_id_path(dir, digest)).ok()?.trim() != diff_id {
        return None;
    }
    let (index_path, windows_path) = cache_paths(dir, digest);
    let packed = std::fs::read(&index_path).ok()?;
    let index = clip_index::Index::open_any(packed.clone()).ok()?;
    if index.layer_digest() != digest || index.validate().is_err() {
        return None;
    }
    let windows = if index.has_external_windows() { Some(std::fs::read(&windows_path).ok()?) } else { None };
    let layer = LayerIndexed::from_index(digest, index.compressed_size(), &index, &packed, windows.as_deref(), 0.0);
    Some((layer, packed, windows))
}

fn store_layer(
    dir: &std::path::Path,
    digest: &str,
    diff_id: &str,
    packed: &[u8],
    windows: Option<&[u8]>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (index_path, windows_path) = cache_paths(dir, digest);
    use clip_fsutil::{Durability, atomic_write};
    if let Some(w) = windows {
        atomic_write(&windows_path, w, 0o644, Durability::Durable)?;
    }
    atomic_write(&index_path, packed, 0o644, Durability::Durable)?;
    atomic_write(&diff_id_path(dir, digest), diff_id.as_bytes(), 0o644, Durability::Durable)
}

/// Chunks in flight between the download and the indexer (HTTP chunks are ~16 KiB each).
const STREAM_CHUNKS: usize = 256;

/// The indexer stopped reading a layer before its end (it failed; its error tells why).
#[derive(Debug)]
struct IndexerStopped;

impl std::fmt::Display for IndexerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the indexer stopped reading the layer")
    }
}

impl std::error::Error for IndexerStopped {}

/// Indexes one layer as it downloads (the blob streams into the indexer on a blocking thread:
/// fetching, inflating and walking the tar overlap), and returns the packed index (without
/// windows) and the windows blob, if any.
async fn index_layer(
    repo: &Repository,
    digest: &str,
    diff_id: &str,
    media_type: &str,
    span_size: u64,
    task: &crate::progress::Task,
) -> Result<(LayerIndexed, Vec<u8>, Option<Vec<u8>>)> {
    let started = Instant::now();
    let (tx, reader) = crate::stream::ChunkReader::channel(STREAM_CHUNKS);
    let (digest_owned, media_type, diff_id) = (digest.to_string(), media_type.to_string(), diff_id.to_string());
    let build = tokio::task::spawn_blocking(move || -> Result<_> {
        let opts = clip_index::BuildOptions {
            span_size,
            expected_digest: Some(digest_owned.clone()),
            media_type,
            expected_diff_id: Some(diff_id),
        };
        let f = std::io::BufReader::with_capacity(1 << 20, reader);
        // The windows split off as the index is encoded: for a layer of large files they are
        // most of it (320 MB of a 3.3 GB layer's 325 MB), not to be held twice.
        let (index, windows) =
            clip_index::build_index_split(f, &opts).with_context(|| format!("indexing layer {digest_owned}"))?;
        let packed = index.pack()?;
        Ok((index, packed, windows))
    });
    // The download: each chunk to the indexer as it arrives; the sender goes with the block, so
    // the indexer sees the end of the data however the download ends.
    let fetched = async move {
        let mut chunks = std::pin::pin!(crate::stream::layer_chunks(repo, digest).await?);
        let mut size = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            task.advance(chunk.len() as u64);
            // A send fails only when the indexer stopped early: its own error says why.
            tx.send(chunk).await.map_err(|_| anyhow::Error::new(IndexerStopped))?;
        }
        anyhow::Ok(size)
    }
    .await;
    let built = build.await.context("indexing task")?;
    let (size, index) = match (fetched, built) {
        (Ok(size), Ok(index)) => (size, index),
        // A failed download fails the index too (truncated data): the download's error, unless
        // the download stopped because the indexer refused the data (bad gzip, wrong digest,
        // bad tar): then, as when only the indexer failed, the indexer's error.
        (Err(e), _) if !e.is::<IndexerStopped>() => return Err(e),
        (_, Err(e)) | (Err(e), Ok(_)) => return Err(e),
    };
    let (index, packed, windows) = (index.0, index.1, index.2);
    if index.layer_digest() != digest {
        bail!("index of {digest} names layer {}", index.layer_digest());
    }
    let layer =
        LayerIndexed::from_index(digest, size, &index, &packed, windows.as_deref(), started.elapsed().as_secs_f64());
    Ok((layer, packed, windows))
}
