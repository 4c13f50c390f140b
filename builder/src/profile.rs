//! `clip-builder profile REF --cmd CMD` (and `build --profile-cmd CMD`): records an image's
//! access profile at build time and publishes it, so that even the first node to start the
//! image fetches what its start reads first (see `clip_index::profile`). The image is served
//! the way a node serves it: every layer a read-only `clip-layerfs` mount over its published
//! CLIP index, under an overlay; the layer blobs are downloaded once into a private temporary
//! directory (reads are then local). `CMD` runs with `/bin/sh -c` in that root as an
//! unprivileged container ([`crate::sandbox`]: runc, a user namespace, no network, a private
//! `/dev`; the image's environment and working directory) until it exits or the time limit kills
//! it; every span it read is in the profile, in order.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clip_index::Index;
use clip_index::artifact::{BlobKind, IndexArtifact};
use clip_index::profile::{AccessProfile, PROFILE_ARTIFACT_TYPE, PROFILE_MEDIA_TYPE};
use clip_readpath::{FileFetcher, ReadObserver, Recorder, SpanCache, SpanCacheOptions};
use clip_registry::api::Subject;
use clip_registry::{Platform, Repository};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest index or config blob read.
const MAX_METADATA_BLOB: usize = 256 << 20;

/// What `clip-builder profile` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProfileReport {
    pub image: String,
    pub manifest_digest: String,
    pub profile_digest: String,
    pub reads: usize,
    pub layers: usize,
    /// The command's exit status (`None`: killed at the time limit).
    pub exit_code: Option<i32>,
    pub seconds: f64,
}

/// Records the profile of `reference` (in `repo`) by running `cmd` in it, and publishes it.
pub async fn record_and_publish(
    repo: Arc<Repository>,
    reference: &str,
    platform: &Platform,
    cmd: &str,
    limit: Duration,
) -> Result<ProfileReport> {
    let started = Instant::now();
    let (manifest, image) = repo
        .get_image_manifest(reference, platform)
        .await
        .with_context(|| format!("reading the manifest of {}", repo.image))?;
    let config: oci_spec::image::ImageConfiguration = {
        let bytes = repo.get_blob(image.config().digest().as_ref(), MAX_METADATA_BLOB).await?;
        serde_json::from_slice(&bytes).context("the image config")?
    };
    let artifact = {
        let digest = crate::publish::published_index(&repo, &manifest.digest, &image).await.with_context(|| {
            format!("{} has no CLIP index of every layer (run `clip-builder index` first)", repo.image)
        })?;
        IndexArtifact::parse(&repo.get_manifest(&digest).await?.bytes)?
    };
    let tmp = tempfile::Builder::new().prefix("clip-profile-").tempdir().context("temporary directory")?;
    let mut layers = Vec::new();
    for (n, layer) in image.layers().iter().enumerate() {
        let digest = layer.digest().to_string();
        let dir = tmp.path().join(format!("layer-{n}"));
        std::fs::create_dir_all(&dir)?;
        let index_blob = artifact
            .blob_for(&digest, BlobKind::Index)
            .with_context(|| format!("the CLIP index of {} has no entry for layer {digest}", repo.image))?;
        let index = Index::open_any(repo.get_blob(&index_blob, MAX_METADATA_BLOB).await?.to_vec())?;
        index.validate()?;
        if index.layer_digest() != digest {
            bail!("index {index_blob} is for layer {}, not {digest}", index.layer_digest());
        }
        let windows = match artifact.blob_for(&digest, BlobKind::Windows) {
            Some(w) => {
                let path = dir.join("windows");
                std::fs::write(&path, repo.get_blob(&w, MAX_METADATA_BLOB).await?)?;
                Some(path)
            }
            None => None,
        };
        let blob = dir.join("blob");
        download(&repo, &digest, &blob).await?;
        layers.push(LocalLayer { digest, index: Arc::new(index), blob, windows, dir });
    }
    let env = config.config().as_ref().and_then(|c| c.env().clone()).unwrap_or_default();
    let workdir = config.config().as_ref().and_then(|c| c.working_dir().clone()).unwrap_or_else(|| "/".into());
    let (cmd, root) = (cmd.to_string(), tmp.path().to_path_buf());
    let (recorder, exit_code) =
        tokio::task::spawn_blocking(move || run_in_image(&root, &layers, &env, &workdir, &cmd, limit)).await??;
    let (reads, took) = recorder.reads();
    if reads.is_empty() {
        bail!("the command read nothing from the image");
    }
    let profile =
        AccessProfile::from_reads(&manifest.digest, reads.iter().map(|(l, s)| (&**l, *s)), took.as_millis() as u64);
    let profile_digest = repo
        .push_artifact(
            &Subject::from(&manifest),
            PROFILE_ARTIFACT_TYPE,
            PROFILE_MEDIA_TYPE,
            Bytes::from(profile.to_json()),
        )
        .await
        .context("publishing the access profile")?;
    drop(tmp);
    Ok(ProfileReport {
        image: repo.image.with_digest(&manifest.digest).to_string(),
        manifest_digest: manifest.digest,
        profile_digest,
        reads: profile.reads.len(),
        layers: profile.layers.len(),
        exit_code,
        seconds: started.elapsed().as_secs_f64(),
    })
}

struct LocalLayer {
    digest: String,
    index: Arc<Index>,
    blob: PathBuf,
    windows: Option<PathBuf>,
    dir: PathBuf,
}

/// Downloads layer `digest` to `path` and checks its digest.
async fn download(repo: &Repository, digest: &str, path: &Path) -> Result<()> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    crate::stream::download(repo, digest, path, |chunk| hash.update(chunk)).await?;
    let got = format!("sha256:{}", hex::encode(hash.finalize()));
    if got != digest {
        bail!("layer {digest} downloaded as {got}");
    }
    Ok(())
}

/// Mounts that are taken down in reverse order however the run ends.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn mount(args: &[&str], target: &Path, mounts: &mut Mounts) -> Result<()> {
    let status = Command::new("mount").args(args).arg(target).status().context("running mount")?;
    if !status.success() {
        bail!("mount {} {} failed ({status})", args.join(" "), target.display());
    }
    mounts.0.push(target.to_path_buf());
    Ok(())
}

/// Serves `layers` lazily under an overlay at `<root>/rootfs`, runs `cmd` there, and returns
/// what it read and its exit code.
fn run_in_image(
    root: &Path,
    layers: &[LocalLayer],
    env: &[String],
    workdir: &str,
    cmd: &str,
    limit: Duration,
) -> Result<(Arc<Recorder>, Option<i32>)> {
    let recorder = Arc::new(Recorder::default());
    let mut sessions = Vec::new();
    let mut lower = Vec::new();
    for l in layers {
        let options = SpanCacheOptions {
            windows: match &l.windows {
                Some(w) => Some(Arc::new(FileFetcher(std::fs::File::open(w)?)) as Arc<dyn clip_readpath::RangeFetcher>),
                None => None,
            },
            reads: Some(recorder.clone() as Arc<dyn ReadObserver>),
            ..Default::default()
        };
        let source = Arc::new(FileFetcher(std::fs::File::open(&l.blob)?));
        let spans = Arc::new(SpanCache::with_options(l.index.clone(), l.dir.join("spans"), source, options)?);
        let mountpoint = l.dir.join("fs");
        std::fs::create_dir_all(&mountpoint)?;
        // Owners shifted into the container's user namespace; no setuid files, no devices.
        let fs = clip_layerfs::LayerFs::new(spans).with_id_shift(crate::sandbox::ID_SHIFT);
        let (session, _fd) = clip_layerfs::mount_for_untrusted_code(fs, &mountpoint, &l.digest)
            .with_context(|| format!("FUSE mount of layer {}", l.digest))?;
        sessions.push(session);
        lower.push(mountpoint);
    }
    let bundle = crate::sandbox::Bundle::new()?;
    let mut mounts = Mounts::default();
    let (rw, rootfs) = (root.join("rw"), bundle.rootfs());
    std::fs::create_dir_all(&rw)?;
    mount(&["-t", "tmpfs", "-o", "nosuid,nodev", "tmpfs"], &rw, &mut mounts)?;
    std::fs::create_dir_all(rw.join("upper"))?;
    std::fs::create_dir_all(rw.join("work"))?;
    // The root directory of the container's root file system is its root's.
    let shift = Some(crate::sandbox::ID_SHIFT);
    std::os::unix::fs::chown(rw.join("upper"), shift, shift)?;
    // overlayfs lists the top layer first.
    let lowerdir: Vec<String> = lower.iter().rev().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        rw.join("upper").display(),
        rw.join("work").display()
    );
    mount(&["-t", "overlay", "overlay", "-o", &format!("nosuid,nodev,{options}")], &rootfs, &mut mounts)?;
    // Nothing below `rootfs` is looked at from here: an image's symlink (`/bin -> /usr/bin`)
    // would resolve on the host. runc resolves paths inside the root.
    let script = format!("cd '{}' 2>/dev/null || cd /; {cmd}", workdir.replace('\'', ""));
    let exit_code = crate::sandbox::run(&bundle, env, &script, limit);
    drop(mounts);
    drop(bundle);
    drop(sessions);
    Ok((recorder, exit_code?))
}
