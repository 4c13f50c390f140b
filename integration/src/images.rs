//! Test images built without internet (only Debian's archive for the python image), cached
//! between runs as OCI layouts under `$CLIP_TESTBED_CACHE` (default `/var/tmp/clip-testbed-cache`).
//!
//! The cache key is the build script's hash, so editing a recipe rebuilds its image. Builds are
//! serialised by a file lock, so tests running side by side build each image once.

use crate::run;
use anyhow::{Context, Result};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An image of the test bed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestImage {
    /// FROM-scratch busybox-static with relative applet links: one gzip layer, ~1 MiB.
    Busybox,
    /// busybox plus an empty config layer whose command sleeps forever: a CRI sandbox image.
    Pause,
    /// Debian bookworm minbase + python3 + python3-numpy + `/app/hello.py`: four gzip layers,
    /// ~83 MiB compressed.
    Python,
    /// Debian bookworm minbase + python3 with python3-scipy + gcc with libc6-dev + `/app/solve.py`:
    /// four gzip layers, a few hundred MB (the benchmark's large image).
    Scipy,
    /// Debian bookworm minbase + python3 and pip + torch 2.7.1 with its CUDA library wheels (one pip
    /// layer of several GB) + `/app/infer.py`: the ML benchmark image, built by hand-run benchmarks
    /// only (it fetches ~2.9 GB of wheels from PyPI).
    Torch,
}

struct Recipe {
    name: &'static str,
    script: &'static str,
}

const BUSYBOX: Recipe = Recipe { name: "busybox", script: include_str!("../images/busybox.sh") };
const PYTHON: Recipe = Recipe { name: "python", script: include_str!("../images/python.sh") };
const SCIPY: Recipe = Recipe { name: "scipy", script: include_str!("../images/scipy.sh") };
const TORCH: Recipe = Recipe { name: "torch", script: include_str!("../images/torch.sh") };

impl TestImage {
    fn recipe(self) -> &'static Recipe {
        match self {
            Self::Busybox | Self::Pause => &BUSYBOX,
            Self::Python => &PYTHON,
            Self::Scipy => &SCIPY,
            Self::Torch => &TORCH,
        }
    }

    /// The tag of the image inside its OCI layout.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Busybox => "busybox",
            Self::Pause => "pause",
            Self::Python => "pyapp",
            Self::Scipy => "scipy",
            Self::Torch => "torch",
        }
    }

    /// Repository name used when pushing to a test registry.
    pub fn repository(self) -> &'static str {
        match self {
            Self::Busybox => "testbed/busybox",
            Self::Pause => "testbed/pause",
            Self::Python => "testbed/pyapp",
            Self::Scipy => "testbed/scipy",
            Self::Torch => "testbed/torch",
        }
    }

    /// The OCI layout holding this image, built first if the cache lacks it.
    pub fn layout(self) -> Result<PathBuf> {
        ensure_built(self.recipe())
    }
}

/// Cache root.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CLIP_TESTBED_CACHE").map_or_else(|| PathBuf::from("/var/tmp/clip-testbed-cache"), PathBuf::from)
}

fn ensure_built(recipe: &Recipe) -> Result<PathBuf> {
    let key = hex::encode(&sha2::Sha256::digest(recipe.script.as_bytes())[..6]);
    let root = cache_dir();
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let layout = root.join(format!("{}-{key}", recipe.name));
    let lock_path = root.join(format!("{}.lock", recipe.name));
    let lock = std::fs::File::create(&lock_path)?;
    lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
    if layout.join("index.json").exists() {
        return Ok(layout);
    }
    let work = root.join(format!("{}-work", recipe.name));
    let tmp = root.join(format!("{}-{key}.tmp", recipe.name));
    let _ = std::fs::remove_dir_all(&tmp);
    let script = root.join(format!("{}-{key}.sh", recipe.name));
    std::fs::write(&script, recipe.script)?;
    eprintln!("building test image {} into {} (cached afterwards)", recipe.name, layout.display());
    let result = run(Command::new("bash").arg(&script).arg(&tmp).arg(&work));
    // The buildah storage is only needed during the build; the debootstrap rootfs is kept.
    remove_buildah_storage(&work);
    result.with_context(|| format!("building test image {}", recipe.name))?;
    std::fs::rename(&tmp, &layout)?;
    Ok(layout)
}

fn remove_buildah_storage(work: &Path) {
    for d in ["root", "runroot"] {
        let p = work.join(d);
        crate::unmount_below(&p);
        let _ = std::fs::remove_dir_all(&p);
    }
}

/// The manifest of `tag` in an OCI layout, as JSON.
pub fn layout_manifest(layout: &Path, tag: &str) -> Result<serde_json::Value> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let desc = index["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|d| d["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag)))
        .with_context(|| format!("tag {tag} not in {}", layout.display()))?;
    let digest = desc["digest"].as_str().context("manifest digest")?;
    Ok(serde_json::from_slice(&std::fs::read(blob_path(layout, digest)?)?)?)
}

/// Path of a blob in an OCI layout.
pub fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest.split_once(':').with_context(|| format!("bad digest {digest}"))?;
    Ok(layout.join("blobs").join(alg).join(hex))
}

/// `(digest, media type, size)` of each layer of `tag`, base first.
pub fn layout_layers(layout: &Path, tag: &str) -> Result<Vec<(String, String, u64)>> {
    let m = layout_manifest(layout, tag)?;
    m["layers"]
        .as_array()
        .context("manifest has no layers")?
        .iter()
        .map(|l| {
            Ok((
                l["digest"].as_str().context("digest")?.to_string(),
                l["mediaType"].as_str().context("mediaType")?.to_string(),
                l["size"].as_u64().context("size")?,
            ))
        })
        .collect()
}

/// The sha256 of every regular file under `prefix` (no leading `/`; empty: all) in the image
/// `tag` of an OCI layout, as the unpacked image has them: layers extracted in order with
/// `tar`, whiteouts applied after each (opaque directories are refused: no test image has one).
pub fn file_digests_under(
    layout: &Path,
    tag: &str,
    prefix: &str,
    scratch: &Path,
) -> Result<std::collections::BTreeMap<String, String>> {
    std::fs::create_dir_all(scratch)?;
    for (digest, _, _) in layout_layers(layout, tag)? {
        let blob = blob_path(layout, &digest)?;
        let mut tar = std::process::Command::new("tar");
        tar.arg("-xzf").arg(&blob).arg("-C").arg(scratch).stderr(std::process::Stdio::null());
        if !prefix.is_empty() {
            // Layers without the prefix make tar fail; that is fine.
            tar.arg(prefix.trim_end_matches('/'));
        }
        let _ = tar.status()?;
        apply_whiteouts(scratch)?;
    }
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![scratch.join(prefix)];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e.path().strip_prefix(scratch)?.display().to_string();
                out.insert(format!("/{rel}"), crate::sha256_file(&e.path())?);
            }
        }
    }
    Ok(out)
}

fn apply_whiteouts(root: &Path) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == ".wh..wh..opq" {
                anyhow::bail!("opaque directory {} not supported here", dir.display());
            }
            if let Some(target) = name.strip_prefix(".wh.") {
                std::fs::remove_file(e.path())?;
                let t = dir.join(target);
                if t.is_dir() && !t.is_symlink() {
                    std::fs::remove_dir_all(&t)?;
                } else {
                    let _ = std::fs::remove_file(&t);
                }
            } else if e.file_type()?.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// A new OCI layout at `dest` (tag `tag`): the image `tag` of `base` plus one layer holding
/// `/variant.txt` with `content`, so images share base layers but differ on top.
pub fn derive_layout(base: &Path, tag: &str, dest: &Path, content: &str) -> Result<PathBuf> {
    let work = dest.with_extension("work");
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("variant.txt"), content)?;
    let tar_path = work.with_extension("tar");
    let status = std::process::Command::new("tar")
        .args(["--owner=0", "--group=0", "-cf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(&work)
        .arg("variant.txt")
        .status()?;
    anyhow::ensure!(status.success(), "tar");
    let tar = std::fs::read(&tar_path)?;
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_file(&tar_path);
    derive_layout_with_layer(base, tag, dest, &tar)
}

/// [`derive_layout`] with a layer of the given uncompressed tar (gzipped here).
pub fn derive_layout_with_layer(base: &Path, tag: &str, dest: &Path, tar: &[u8]) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dest);
    let status = std::process::Command::new("cp").arg("-a").arg(base).arg(dest).status()?;
    anyhow::ensure!(status.success(), "copying {}", base.display());
    let tar_path = dest.with_extension("layer.tar");
    std::fs::write(&tar_path, tar)?;
    let out = std::process::Command::new("gzip").arg("-c").arg(&tar_path).output()?;
    let _ = std::fs::remove_file(&tar_path);
    anyhow::ensure!(out.status.success(), "gzip");
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(tar)));
    add_gzip_layer(dest, tag, &out.stdout, &diff_id)
}

/// A new OCI layout at `dest` (tag `tag`): the image `tag` of `base` plus the gzip layer `gz`
/// whose uncompressed digest is `diff_id`.
pub fn derive_layout_with_gzip_layer(base: &Path, tag: &str, dest: &Path, gz: &[u8], diff_id: &str) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dest);
    let status = std::process::Command::new("cp").arg("-a").arg(base).arg(dest).status()?;
    anyhow::ensure!(status.success(), "copying {}", base.display());
    add_gzip_layer(dest, tag, gz, diff_id)
}

/// Adds the gzip layer `gz` (uncompressed digest `diff_id`) on top of the image `tag` of the
/// layout `dest`, in place.
fn add_gzip_layer(dest: &Path, tag: &str, gz: &[u8], diff_id: &str) -> Result<PathBuf> {
    let put = |bytes: &[u8]| -> Result<(String, u64)> {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        std::fs::write(blob_path(dest, &digest)?, bytes)?;
        Ok((digest, bytes.len() as u64))
    };
    let (layer_digest, layer_size) = put(gz)?;
    let mut manifest = layout_manifest(dest, tag)?;
    let config_digest = manifest["config"]["digest"].as_str().context("config digest")?.to_string();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(blob_path(dest, &config_digest)?)?)?;
    config["rootfs"]["diff_ids"].as_array_mut().context("diff_ids")?.push(diff_id.into());
    if let Some(h) = config["history"].as_array_mut() {
        h.push(serde_json::json!({"created_by": "clip test: variant layer"}));
    }
    let (config_digest, config_size) = put(&serde_json::to_vec(&config)?)?;
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    manifest["layers"].as_array_mut().context("layers")?.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": layer_digest,
        "size": layer_size,
    }));
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let (manifest_digest, manifest_size) = put(&manifest_bytes)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": manifest["mediaType"].as_str().unwrap_or("application/vnd.oci.image.manifest.v1+json"),
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dest.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(dest.to_path_buf())
}
