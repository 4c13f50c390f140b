//! `clip-builder fetch-index` / `push-index`: copy an image's index artifact between registries
//! (mirrors, air-gapped sites) through a local directory:
//!
//! ```text
//! DIR/artifact.json            the artifact manifest (its subject names the image manifest)
//! DIR/blobs/sha256/<hex>       every blob it refers to (config, indexes, windows)
//! ```

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clip_index::artifact::{ARTIFACT_TYPE, IndexArtifact};
use clip_registry::api::sha256_digest;
use clip_registry::{Platform, Repository};
use std::path::Path;

fn blob_path(dir: &Path, digest: &str) -> Result<std::path::PathBuf> {
    let (alg, hex) = digest.split_once(':').with_context(|| format!("bad digest {digest}"))?;
    clip_config::digest::validate(digest)?;
    Ok(dir.join("blobs").join(alg).join(hex))
}

/// Downloads the newest index artifact of `reference` (and its blobs) into `dir`.
pub async fn fetch(repo: &Repository, reference: &str, dir: &Path) -> Result<String> {
    let (manifest, _) = repo.get_image_manifest(reference, &Platform::default()).await?;
    let found = repo.referrers(&manifest.digest, Some(ARTIFACT_TYPE)).await?;
    let desc = found.last().with_context(|| format!("no CLIP index is published for {}", repo.image))?;
    let digest = desc.digest().to_string();
    let artifact = repo.get_manifest(&digest).await?;
    let parsed = IndexArtifact::parse(&artifact.bytes).with_context(|| format!("index artifact {digest}"))?;
    for b in parsed.referenced_blobs() {
        let path = blob_path(dir, &b)?;
        if path.exists() {
            continue;
        }
        let bytes = repo.get_blob(&b, 1 << 30).await.with_context(|| format!("fetching {b}"))?;
        std::fs::create_dir_all(path.parent().context("blob dir")?)?;
        std::fs::write(&path, &bytes)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("artifact.json"), &artifact.bytes)?;
    Ok(digest)
}

/// Publishes the artifact stored in `dir` for the image `reference` of `repo`, which must be
/// the image the artifact was made for (same manifest digest).
pub async fn push(repo: &Repository, reference: &str, dir: &Path) -> Result<String> {
    let bytes =
        std::fs::read(dir.join("artifact.json")).with_context(|| format!("reading {}/artifact.json", dir.display()))?;
    let artifact = IndexArtifact::parse(&bytes).with_context(|| format!("{}/artifact.json", dir.display()))?;
    let subject = artifact.subject_digest().context("artifact has no subject")?;
    let (manifest, _) = repo.get_image_manifest(reference, &Platform::default()).await?;
    if manifest.digest != subject {
        bail!("the index is for {subject}, but {} is {}", repo.image, manifest.digest);
    }
    for b in artifact.referenced_blobs() {
        let data = std::fs::read(blob_path(dir, &b)?)
            .with_context(|| format!("blob {b} is missing from {}", dir.display()))?;
        if sha256_digest(&data) != b {
            bail!("blob {b} in {} is corrupt", dir.display());
        }
        repo.push_blob(Bytes::from(data)).await?;
    }
    Ok(repo.push_referrer(&subject, ARTIFACT_TYPE, Bytes::from(bytes)).await?)
}
