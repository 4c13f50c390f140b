//! Large memory-mapped files: what clip fetches of the huge shared libraries a start maps,
//! against the pages the start touched. The torch image's `import torch` maps libtorch and the
//! CUDA libraries (hundreds of MB to over a GB each) and touches a few percent of them.
//!
//! A cold node (fresh snapshotter and containerd, page cache dropped) pulls the torch image
//! lazily and runs a probe in a container: it imports torch, then reports, for every mapped file
//! of at least `--min-mb`, the bytes its mappings have resident (`Rss` in `/proc/self/smaps`:
//! pages the loader touched, with the kernel's fault-around) and the file's pages in the page
//! cache (`mincore`: what was read through FUSE, the kernel's readahead included). After the
//! container exits the snapshotter's span cache says which spans of each file were fetched
//! (compressed bytes from the registry, and what they inflate to). Background completion is off
//! (it would fetch everything); the prefetcher runs as configured: `prefetch` (defaults) and
//! `demand` (prefetcher off: only what reads missed).
//!
//! Run by hand (needs the torch image, built into the test bed cache on first use):
//! `cargo build --release --workspace && target/release/large-files --out docs/benchmarks/large-files`

use anyhow::{Context, Result, bail};
use clip_index::{EntryKind, Index};
use clip_integration::bed::{IndexedImage, containerd_for, lazy_config};
use clip_integration::containerd::Flavor;
use clip_integration::images::TestImage;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, drop_caches, run};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const NS: &str = "bench";

/// Imports torch, then reports the large files its mappings came from (JSON on stdout).
const PROBE: &str = r"
import ctypes, json, os, re, sys, time
t = time.time()
import torch
took = time.time() - t
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
head = re.compile(r'^[0-9a-f]+-[0-9a-f]+ ')
maps, cur = {}, None
for line in open('/proc/self/smaps'):
    if head.match(line):
        f = line.split(None, 5)
        cur = f[5].strip() if len(f) > 5 and f[5].startswith('/') else None
        if cur:
            maps.setdefault(cur, 0)
    elif cur and line.startswith('Rss:'):
        maps[cur] += int(line.split()[1])
page = os.sysconf('SC_PAGE_SIZE')
files = []
for path, rss_kb in sorted(maps.items()):
    size = os.path.getsize(path)
    if size < int(sys.argv[1]):
        continue
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, 1, 1, fd, 0)
    n = (size + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    if libc.mincore(addr, size, vec) != 0:
        raise OSError(ctypes.get_errno(), 'mincore ' + path)
    cached = sum(b & 1 for b in vec)
    libc.munmap(addr, size)
    os.close(fd)
    files.append({'path': path, 'size': size, 'rss': rss_kb * 1024,
                  'cached': cached * page})
print(json.dumps({'import_s': took, 'files': files}))
";

struct Opts {
    out: PathBuf,
    min_mb: u64,
}

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts { out: PathBuf::from("docs/benchmarks/large-files"), min_mb: 64 };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => opts.out = PathBuf::from(value()?),
            "--min-mb" => opts.min_mb = value()?.parse()?,
            other => bail!("unknown argument {other} (--out DIR, --min-mb N)"),
        }
    }
    Ok(opts)
}

/// One mapped file: what the start touched and what clip fetched of it.
struct FileReport {
    path: String,
    size: u64,
    /// Bytes of the file the process's mappings have resident (touched, with fault-around).
    rss: u64,
    /// Bytes of the file in the page cache (read through FUSE, readahead included).
    cached: u64,
    /// Compressed bytes of the file's spans that were fetched, and of all its spans.
    fetched: u64,
    all_compressed: u64,
    /// Uncompressed bytes of the file inside the fetched spans.
    fetched_uncompressed: u64,
}

/// The fetched spans of `path` (in the layer whose index has it), from the daemon's caches.
fn fetched_of(root: &Path, path: &str, size: u64) -> Result<Option<(u64, u64, u64)>> {
    for entry in std::fs::read_dir(root.join("indexes"))? {
        let index_path = entry?.path();
        if index_path.extension().is_none_or(|e| e != "clip") {
            continue;
        }
        let index = Index::open_file(&index_path)?;
        let Some(id) = index.lookup(path)? else { continue };
        let file = index.resolve_hardlink(index.entry(id)?)?;
        if file.kind != EntryKind::File || file.size != size {
            continue;
        }
        let stem = index_path.file_stem().context("index name")?.to_string_lossy().into_owned();
        let spans_dir = root.join("spans").join(stem);
        let (mut fetched, mut all, mut inflated) = (0, 0, 0);
        for i in index.spans_for(file.data_offset, file.size)? {
            let s = index.span(i)?;
            let compressed = s.comp_end - s.comp_start;
            all += compressed;
            if spans_dir.join(format!("{i:08}")).exists() {
                fetched += compressed;
                let (start, end) = (s.uncomp_start.max(file.data_offset), s.uncomp_end.min(file.data_offset + size));
                inflated += end.saturating_sub(start);
            }
        }
        return Ok(Some((fetched, all, inflated)));
    }
    Ok(None)
}

struct RunReport {
    config: &'static str,
    seconds: f64,
    import_s: f64,
    served: u64,
    /// Blob requests the registry answered (spans, windows, indexes).
    requests: usize,
    files: Vec<FileReport>,
}

/// `prefetch`: the prefetcher runs; `tables`: it fetches shared libraries' loader tables.
fn measure(
    image: &IndexedImage,
    config_name: &'static str,
    prefetch: bool,
    tables: bool,
    min_mb: u64,
) -> Result<RunReport> {
    let node = TestDir::new(&format!("large-files-{config_name}"))?;
    let mut config = lazy_config(prefetch);
    config.lazy.prefetch.library_tables = tables;
    let snap = ClipSnapshotter::start_configured(&node, "clip", &config, &[])?;
    let ctrd = containerd_for(&node, &snap, Flavor::V2)?;
    drop_caches();
    let served0 = image.registry.blob_bytes_served();
    let blob_requests = || image.registry.access_log().iter().filter(|e| e.path.contains("/blobs/")).count();
    let requests0 = blob_requests();
    let t = Instant::now();
    run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--plain-http", "-n", NS, "--containerd-address"])
        .arg(ctrd.socket())
        .arg(&image.reference))?;
    let min = (min_mb << 20).to_string();
    let out = ctrd.ctr_run(
        NS,
        &["run", "--rm", "--snapshotter", "clip", &image.reference, "probe", "python3", "-c", PROBE, &min],
    )?;
    let seconds = t.elapsed().as_secs_f64();
    let served = image.registry.blob_bytes_served() - served0;
    let requests = blob_requests() - requests0;
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).context("the probe's report")?;
    let mut files = Vec::new();
    for f in probe["files"].as_array().context("files")? {
        let path = f["path"].as_str().context("path")?.to_string();
        let num = |k: &str| f[k].as_u64().with_context(|| format!("{k} of a file"));
        let size = num("size")?;
        let Some((fetched, all_compressed, fetched_uncompressed)) = fetched_of(snap.root(), &path, size)? else {
            eprintln!("{path}: in no lazy layer's index");
            continue;
        };
        files.push(FileReport {
            path,
            size,
            rss: num("rss")?,
            cached: num("cached")?,
            fetched,
            all_compressed,
            fetched_uncompressed,
        });
    }
    let import_s = probe["import_s"].as_f64().unwrap_or_default();
    eprintln!(
        "{config_name}: {seconds:.2} s, import {import_s:.2} s, {:.1} MB served in {requests} requests",
        served as f64 / 1e6
    );
    ctrd.purge()?;
    Ok(RunReport { config: config_name, seconds, import_s, served, requests, files })
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn write_report(opts: &Opts, runs: &[RunReport]) -> Result<()> {
    let mut md = String::new();
    writeln!(md, "# Large memory-mapped files: bytes fetched against pages touched\n")?;
    writeln!(
        md,
        "Produced by `target/release/large-files --out {}` (`cargo build --release --workspace` first) on a 2-core VM (Debian 12, kernel 6.18), containerd v2.4.2, loopback registry. A cold node pulls the torch image lazily and runs `import torch` in a container, which then reports every mapped file of at least {} MiB: *touched* is what its mappings have resident (`Rss` in `/proc/self/smaps`: the pages the loader touched, with the kernel's fault-around), *page cache* the file's pages the kernel holds (`mincore`: what was read through FUSE, readahead included). *Fetched* is the compressed bytes of the file's spans in the snapshotter's span cache after the run (what the registry sent for this file), *inflated* what those spans hold of the file. Background completion is off; `prefetch` runs the default prefetcher, `no-tables` the same without fetching shared libraries' loader tables at their first miss (`[lazy.prefetch] library_tables = false`, the prefetcher before 2026-12-06), `demand` none.\n",
        opts.out.display(),
        opts.min_mb
    )?;
    for r in runs {
        writeln!(
            md,
            "## {}: start {:.2} s (import {:.2} s), {:.1} MB served by the registry in {} blob requests\n",
            r.config,
            r.seconds,
            r.import_s,
            mb(r.served),
            r.requests
        )?;
        writeln!(
            md,
            "| file | size MB | touched MB | page cache MB | fetched MB (of its compressed) | inflated MB | fetched / touched | inflated / page cache |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        let (mut size, mut rss, mut cached, mut fetched, mut all, mut inflated) = (0, 0, 0, 0, 0, 0);
        for f in &r.files {
            let name = f.path.rsplit('/').next().unwrap_or(&f.path);
            writeln!(
                md,
                "| {name} | {:.1} | {:.1} | {:.1} | {:.1} ({:.1}) | {:.1} | {:.2} | {:.2} |",
                mb(f.size),
                mb(f.rss),
                mb(f.cached),
                mb(f.fetched),
                mb(f.all_compressed),
                mb(f.fetched_uncompressed),
                f.fetched as f64 / f.rss.max(1) as f64,
                f.fetched_uncompressed as f64 / f.cached.max(1) as f64,
            )?;
            size += f.size;
            rss += f.rss;
            cached += f.cached;
            fetched += f.fetched;
            all += f.all_compressed;
            inflated += f.fetched_uncompressed;
        }
        writeln!(
            md,
            "| **all {}** | {:.1} | {:.1} | {:.1} | {:.1} ({:.1}) | {:.1} | {:.2} | {:.2} |\n",
            r.files.len(),
            mb(size),
            mb(rss),
            mb(cached),
            mb(fetched),
            mb(all),
            mb(inflated),
            fetched as f64 / rss.max(1) as f64,
            inflated as f64 / cached.max(1) as f64,
        )?;
    }
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(opts.out.join("large-files.md"), md)?;
    let json: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "config": r.config, "seconds": r.seconds, "import_s": r.import_s, "served": r.served, "requests": r.requests,
                "files": r.files.iter().map(|f| serde_json::json!({
                    "path": f.path, "size": f.size, "touched": f.rss, "page_cache": f.cached,
                    "fetched": f.fetched, "compressed": f.all_compressed, "inflated": f.fetched_uncompressed,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    std::fs::write(opts.out.join("large-files.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

fn main() -> Result<()> {
    let opts = parse_opts()?;
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "run as root");
    let td = TestDir::new("large-files")?;
    let image = IndexedImage::plain(&td, TestImage::Torch, "bench/torch")?;
    let mut runs = Vec::new();
    for (name, prefetch, tables) in [("prefetch", true, true), ("no-tables", true, false), ("demand", false, false)] {
        runs.push(measure(&image, name, prefetch, tables, opts.min_mb)?);
    }
    write_report(&opts, &runs)?;
    eprintln!("written to {}", opts.out.join("large-files.md").display());
    Ok(())
}
