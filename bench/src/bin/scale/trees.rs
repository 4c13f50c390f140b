//! The trees the scale benchmark serves, each one layer on busybox under `/scale`, kept as an OCI
//! layout in the test bed cache: generated ones (N files of ~40 bytes in directories of
//! [`FILES_PER_DIR`]) and a real one, the `node_modules` that `npm ci` installs from
//! `bench/node-modules/package-lock.json` (a React app with MUI, the AWS SDKs and Firebase:
//! ~111,000 entries in ~10,000 directories, most of them a few levels deep).

use anyhow::{Context, Result};
use clip_integration::images::{TestImage, cache_dir, derive_layout_with_gzip_layer};
use sha2::Digest as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

pub const FILES_PER_DIR: usize = 1000;
/// Bump when the generated tree changes (the cached layouts are keyed by it).
const GENERATOR: u32 = 1;

/// One tree of the benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tree {
    /// `n` generated files.
    Generated(usize),
    /// The real `node_modules`.
    NodeModules,
}

impl Tree {
    /// `node_modules`, or a number of generated files.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "node_modules" => Ok(Self::NodeModules),
            n => Ok(Self::Generated(n.parse().with_context(|| format!("tree {n}: a number or node_modules"))?)),
        }
    }

    /// The repository the image is pushed to (`bench/<repo>`), and the image's name in tables.
    pub fn repo(&self) -> String {
        match self {
            Self::Generated(n) => format!("scale{n}"),
            Self::NodeModules => "node_modules".into(),
        }
    }
}

/// A tree's image, and the entries of its layer below `/scale` (`/scale` included).
pub struct Layout {
    pub tree: Tree,
    pub path: PathBuf,
    pub entries: usize,
}

impl Layout {
    /// How the tree is named in tables.
    pub fn label(&self) -> String {
        match self.tree {
            Tree::Generated(n) => format!("{n} files"),
            Tree::NodeModules => format!("node_modules ({} entries)", self.entries),
        }
    }
}

/// A writer that hashes what passes through it (the layer's diff id).
struct Hashing<W: std::io::Write> {
    inner: W,
    hash: sha2::Sha256,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type LayerTar = tar::Builder<Hashing<std::io::BufWriter<std::process::ChildStdin>>>;

/// The OCI layout (tag `scale`) of `tree`, made once into the test bed cache.
pub fn layout(tree: &Tree) -> Result<Layout> {
    let key = match tree {
        Tree::Generated(n) => format!("scale-{n}-g{GENERATOR}"),
        Tree::NodeModules => node_modules_key()?,
    };
    let dest = cache_dir().join(&key);
    let count_file = cache_dir().join(format!("{key}.entries"));
    if dest.join("index.json").exists() {
        let entries = match tree {
            Tree::Generated(n) => generated_entries(*n),
            Tree::NodeModules => std::fs::read_to_string(&count_file)?.trim().parse()?,
        };
        return Ok(Layout { tree: tree.clone(), path: dest, entries });
    }
    let t = Instant::now();
    let entries = match tree {
        Tree::Generated(n) => write_layer(&dest, |tar| generate(tar, *n))?,
        Tree::NodeModules => {
            let src = install_node_modules(&key)?;
            write_layer(&dest, |tar| {
                let mut count = 0;
                append_sorted(tar, &src.join("node_modules"), "scale/node_modules", &mut count)?;
                Ok(count + 1)
            })?
        }
    };
    std::fs::write(&count_file, entries.to_string())?;
    eprintln!("made {}: {entries} entries in {:.1} s", tree.repo(), t.elapsed().as_secs_f64());
    Ok(Layout { tree: tree.clone(), path: dest, entries })
}

/// Entries of a generated layer: the files, their directories and `/scale`.
fn generated_entries(files: usize) -> usize {
    files + files.div_ceil(FILES_PER_DIR) + 1
}

/// Writes the layer `fill` makes (gzip by pigz) into a layout derived from busybox's at `dest`;
/// returns the entries `fill` counted.
fn write_layer(dest: &Path, fill: impl FnOnce(&mut LayerTar) -> Result<usize>) -> Result<usize> {
    let gz_path = dest.with_extension("tar.gz");
    let mut pigz = Command::new("pigz")
        .args(["-6", "-c"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&gz_path)?)
        .spawn()
        .context("pigz")?;
    let stdin = pigz.stdin.take().context("pigz stdin")?;
    let mut tar = tar::Builder::new(Hashing {
        inner: std::io::BufWriter::with_capacity(1 << 20, stdin),
        hash: sha2::Sha256::new(),
    });
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let entries = fill(&mut tar)?;
    let mut w = tar.into_inner()?;
    w.flush()?;
    let diff_id = format!("sha256:{}", hex::encode(w.hash.finalize()));
    drop(w.inner);
    anyhow::ensure!(pigz.wait()?.success(), "pigz failed");
    let gz = std::fs::read(&gz_path)?;
    let _ = std::fs::remove_file(&gz_path);
    let base = TestImage::Busybox.layout()?;
    let work = dest.with_extension("work");
    derive_layout_with_gzip_layer(&base, "busybox", &work, &gz, &diff_id)?;
    // The layout's tag is still busybox's: retag it `scale` in index.json.
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(work.join("index.json"))?)?;
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "scale".into();
    std::fs::write(work.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::rename(&work, dest)?;
    eprintln!("layer: {:.1} MB gzip", gz.len() as f64 / 1e6);
    Ok(entries)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// `files` files of ~40 bytes in directories of [`FILES_PER_DIR`] under `scale/`.
fn generate(tar: &mut LayerTar, files: usize) -> Result<usize> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, "scale/", std::io::empty())?;
    for i in 0..files {
        if i % FILES_PER_DIR == 0 {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut h, format!("scale/d{:04}/", i / FILES_PER_DIR), std::io::empty())?;
        }
        let body = format!("file {i:07} of the clip scale benchmark\n");
        let mut h = header(tar::EntryType::Regular, 0o644, body.len() as u64);
        tar.append_data(&mut h, format!("scale/d{:04}/f{:04}", i / FILES_PER_DIR, i % FILES_PER_DIR), body.as_bytes())?;
    }
    Ok(generated_entries(files))
}

/// `dir` as `name` and everything below it, in name order (symlinks as symlinks), counting
/// the entries.
fn append_sorted(tar: &mut LayerTar, dir: &Path, name: &str, count: &mut usize) -> Result<()> {
    tar.append_path_with_name(dir, name).with_context(|| format!("adding {}", dir.display()))?;
    *count += 1;
    let mut children: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    children.sort_by_key(std::fs::DirEntry::file_name);
    for child in children {
        let file_name = child.file_name();
        let child_name = format!("{name}/{}", file_name.to_str().context("a name that is not UTF-8")?);
        if child.file_type()?.is_dir() {
            append_sorted(tar, &child.path(), &child_name, count)?;
        } else {
            tar.append_path_with_name(child.path(), &child_name)
                .with_context(|| format!("adding {}", child.path().display()))?;
            *count += 1;
        }
    }
    Ok(())
}

/// Where the committed `package.json` and lock file are.
fn node_modules_manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("node-modules")
}

/// The cache key of the `node_modules` tree: a hash of its manifests.
fn node_modules_key() -> Result<String> {
    let manifests = node_modules_manifests();
    let mut hash = sha2::Sha256::new();
    for f in ["package.json", "package-lock.json"] {
        hash.update(std::fs::read(manifests.join(f)).with_context(|| format!("{}/{f}", manifests.display()))?);
    }
    Ok(format!("node-modules-{}", &hex::encode(hash.finalize())[..12]))
}

/// The directory holding the installed `node_modules` of `key` (`npm ci` of the committed lock
/// file, once, in the cache; only when its layer is not cached yet).
fn install_node_modules(key: &str) -> Result<PathBuf> {
    let manifests = node_modules_manifests();
    let dir = cache_dir().join(format!("{key}.src"));
    let done = dir.join("node_modules/.package-lock.json");
    if !done.exists() {
        std::fs::create_dir_all(&dir)?;
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(manifests.join(f), dir.join(f))?;
        }
        let t = Instant::now();
        // No install scripts: the tree is data here, nothing of it runs.
        let st = Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .context("npm (the node_modules tree needs npm and the npm registry)")?;
        anyhow::ensure!(st.success(), "npm ci in {}", dir.display());
        eprintln!("npm ci: {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(dir)
}
