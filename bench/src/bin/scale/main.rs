//! Scale benchmark: a layer of many small files on top of busybox — generated (1,000,000 and
//! 100,000 by default, in directories of 1,000) or real (a `node_modules` of ~111,000 entries
//! installed from the npm registry, [`trees`]) — served by clip and by containerd's overlayfs on
//! containerd 2.x:
//! - indexing as users run it: `clip-builder index REF` end to end (process start, download,
//!   inflate, tar walk, span digests, packing, pushing the artifact) next to `pigz -dc` of the same
//!   blob, for the generated layer and for the python image's layers; the index's size; the
//!   builder's peak RSS;
//! - Prepare-to-mounted: `clip-snapshotter pull` (manifest, index fetch, Prepare and FUSE mount of
//!   every layer), and the snapshotter's RSS after each (`CLIP_BENCH_SMAPS_DIR=DIR` keeps its
//!   mappings, `/proc/PID/smaps`, there);
//! - a cold walk (`find /scale -size +10000k`: an lstat of every entry) in a container through
//!   clip and through overlayfs, page cache, dentries and inodes dropped before each, plus a warm
//!   one; the FUSE requests per entry the cold walk cost clip (its metrics); the snapshotter's
//!   peak RSS after the walks.
//!
//! Run (release or dist build, root): `cargo run --release -p clip-bench --bin scale -- [--trees
//! 100000,1000000,node_modules] [--reps 3] [--index-only] [--out docs/benchmarks]`. Writes `scale.md` and
//! `scale.csv`. `--index-only` measures the indexing and stops (no snapshotter, no containerd).

use anyhow::{Context, Result, bail};
use clip_bench::{median, spread};
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::images::{TestImage, blob_path, layout_layers};
use clip_integration::process::{ProcStat, proc_stat};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, drop_caches, run};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod trees;

use trees::{Layout, Tree};

const NS: &str = "scale";

struct Opts {
    trees: Vec<Tree>,
    reps: usize,
    /// `--index-only`: no serving section.
    index_only: bool,
    out: PathBuf,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        trees: vec![Tree::Generated(100_000), Tree::Generated(1_000_000)],
        reps: 3,
        index_only: false,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--trees" | "--files" => {
                o.trees = args
                    .next()
                    .context("--trees N,node_modules")?
                    .split(',')
                    .map(Tree::parse)
                    .collect::<Result<_>>()?;
            }
            "--reps" => o.reps = args.next().context("--reps N")?.parse()?,
            "--index-only" => o.index_only = true,
            "--out" => o.out = PathBuf::from(args.next().context("--out DIR")?),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    run(cmd)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Resident memory of `pid`, in bytes. Ordered by `total` first (the field order).
#[derive(Default, Clone, Copy, PartialEq, PartialOrd)]
struct Rss {
    /// `VmRSS`: all of it, mapped file pages (a mapped index's) included.
    total: u64,
    /// `RssAnon`: heap and stacks, the part the kernel cannot drop under pressure.
    anon: u64,
    /// `VmHWM`: the peak of `total`.
    peak: u64,
}

fn rss(pid: u32) -> Rss {
    use clip_integration::process::status_bytes;
    Rss { total: status_bytes(pid, "VmRSS"), anon: status_bytes(pid, "RssAnon"), peak: status_bytes(pid, "VmHWM") }
}

/// Largest RSS of any child this process has waited for, in bytes.
fn children_max_rss() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_or(0, |u| u.max_rss() as u64 * 1024)
}

/// One layer indexed by `clip-builder index`, next to `pigz -dc` of its blob.
struct Indexed {
    image: String,
    layer: String,
    layer_bytes: u64,
    entries: u64,
    index_bytes: u64,
    windows_bytes: u64,
    /// The builder's own time for this layer (download, index, pack), median over reps.
    layer_seconds: Vec<f64>,
    pigz_seconds: Vec<f64>,
}

/// `clip-builder index` of `reference` `reps` times (the published index taken off the
/// referrers and a fresh state dir each time, so nothing is reused), and `pigz -dc` of each layer.
fn index_image(
    td: &TestDir,
    image: &str,
    reference: &str,
    layout: &Path,
    tag: &str,
    reps: usize,
) -> Result<(Vec<Indexed>, Vec<f64>, u64)> {
    let rt = tokio::runtime::Runtime::new()?;
    let repo = {
        use clip_registry::{HostsConfig, Reference, RegistryClient, credentials::CredentialChain};
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        client.repository(&Reference::parse(reference)?, CredentialChain::anonymous())?.for_push()
    };
    let manifest = rt.block_on(repo.get_image_manifest("latest", &clip_registry::Platform::default()))?.0.digest;
    let mut layers: Vec<Indexed> = Vec::new();
    let mut wall = Vec::new();
    let mut peak = 0;
    for rep in 0..reps {
        rt.block_on(repo.unlist_referrers(&manifest, clip_index::artifact::ARTIFACT_TYPE))?;
        let cfg = td.path().join(format!("builder-{image}-{rep}.toml"));
        std::fs::write(&cfg, format!("state_dir = \"{}/builder-{image}-{rep}\"\n", td.path().display()))?;
        let before = children_max_rss();
        let t = Instant::now();
        let out = run(Command::new(workspace_binary("clip-builder")?)
            .args(["index", "--json", "--plain-http", "--config"])
            .arg(&cfg)
            .arg(reference))?;
        wall.push(t.elapsed().as_secs_f64());
        let after = children_max_rss();
        if after > before {
            peak = peak.max(after);
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        for l in v["layers"].as_array().context("layers")? {
            let digest = l["layer_digest"].as_str().context("layer_digest")?.to_string();
            let entry = match layers.iter_mut().find(|x| x.layer == digest) {
                Some(e) => e,
                None => {
                    layers.push(Indexed {
                        image: image.to_string(),
                        layer: digest.clone(),
                        layer_bytes: l["layer_size"].as_u64().unwrap_or_default(),
                        entries: l["entries"].as_u64().unwrap_or_default(),
                        index_bytes: l["index_size"].as_u64().unwrap_or_default(),
                        windows_bytes: l["windows_size"].as_u64().unwrap_or_default(),
                        layer_seconds: Vec::new(),
                        pigz_seconds: Vec::new(),
                    });
                    layers.last_mut().context("pushed")?
                }
            };
            entry.layer_seconds.push(l["seconds"].as_f64().unwrap_or_default());
        }
    }
    anyhow::ensure!(!layers.is_empty(), "clip-builder indexed no layer of {reference}");
    let known: Vec<String> = layout_layers(layout, tag)?.into_iter().map(|l| l.0).collect();
    for l in &mut layers {
        anyhow::ensure!(known.contains(&l.layer), "{} is not a layer of {tag}", l.layer);
        let blob = blob_path(layout, &l.layer)?;
        for _ in 0..reps {
            let t = Instant::now();
            let st = Command::new("pigz").arg("-dc").arg(&blob).stdout(Stdio::null()).status()?;
            anyhow::ensure!(st.success(), "pigz -dc {}", blob.display());
            l.pigz_seconds.push(t.elapsed().as_secs_f64());
        }
    }
    Ok((layers, wall, peak))
}

/// One tree size served by clip and overlayfs.
struct Served {
    /// The tree's name in tables.
    label: String,
    repo: String,
    entries: usize,
    pull_seconds: Vec<f64>,
    /// After each rep's pull (a fresh daemon each time).
    rss_after_mount: Vec<Rss>,
    cold_walk: Vec<f64>,
    warm_walk: Vec<f64>,
    overlay_pull_seconds: f64,
    overlay_cold_walk: Vec<f64>,
    overlay_warm_walk: Vec<f64>,
    container_start: Vec<f64>,
    /// FUSE requests of one cold walk through clip, by operation.
    requests: Vec<(&'static str, u64)>,
    /// Seconds from the last container start until background completion had completed and
    /// checked both layers (the walks begin then).
    completed_after: Option<f64>,
    /// The snapshotter's CPU and major page faults (index pages read from disk) in that walk.
    walk_daemon: clip_integration::process::ProcStat,
    rss_after_walks: Rss,
}

struct Rig {
    snap: ClipSnapshotter,
    ctrd: Containerd,
    metrics_port: u16,
}

impl Rig {
    fn cold(&mut self) -> Result<()> {
        self.ctrd.purge()?;
        self.snap.wipe_and_restart()?;
        self.ctrd.restart()?;
        drop_caches();
        if !self.ctrd.reaches(NS, "clip", Duration::from_secs(30)) {
            bail!("containerd does not reach clip after a restart");
        }
        Ok(())
    }

    fn walk(&self, snapshotter: &str, reference: &str, cmd: &str) -> Result<f64> {
        timed(self.ctrd.ctr(NS).args([
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            reference,
            "scale-walk",
            "sh",
            "-c",
            cmd,
        ]))
    }

    /// Waits until `layers` layers were completed and checked; how long that took (`None`:
    /// not within `limit`, the walks then overlap it).
    fn wait_verified(&self, layers: u64, limit: Duration) -> Option<f64> {
        let t = Instant::now();
        while t.elapsed() < limit {
            let m = clip_integration::metrics::scrape(self.metrics_port);
            if clip_integration::metrics::sum(&m, "clip_snapshotter_layers_verified_total{", &[]) >= layers {
                return Some(t.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("the layers were not completed within {limit:?}: the walks overlap completion");
        None
    }

    fn fuse_requests(&self) -> Vec<(&'static str, u64)> {
        let m = clip_integration::metrics::scrape(self.metrics_port);
        clip_readpath::FuseOp::NAMES
            .iter()
            .map(|op| {
                (
                    *op,
                    clip_integration::metrics::sum(
                        &m,
                        "clip_snapshotter_fuse_requests_total{",
                        &[&format!("op=\"{op}\"")],
                    ),
                )
            })
            .collect()
    }

    fn serve(&mut self, reg_host: &str, layout: &Layout, reps: usize) -> Result<Served> {
        let reference = format!("{reg_host}/bench/{}:latest", layout.tree.repo());
        let walk = "find /scale -size +10000k";
        let mut s = Served {
            label: layout.label(),
            repo: layout.tree.repo(),
            entries: layout.entries,
            pull_seconds: Vec::new(),
            rss_after_mount: Vec::new(),
            cold_walk: Vec::new(),
            warm_walk: Vec::new(),
            overlay_pull_seconds: 0.0,
            overlay_cold_walk: Vec::new(),
            overlay_warm_walk: Vec::new(),
            container_start: Vec::new(),
            requests: Vec::new(),
            walk_daemon: ProcStat::default(),
            completed_after: None,
            rss_after_walks: Rss::default(),
        };
        let pull = |rig: &Rig| -> Result<f64> {
            timed(
                Command::new(workspace_binary("clip-snapshotter")?)
                    .args(["pull", "--plain-http", "-n", NS, "--containerd-address"])
                    .arg(rig.ctrd.socket())
                    .arg(&reference),
            )
        };
        let mut after_mount = Vec::new();
        for rep in 0..reps {
            self.cold()?;
            s.pull_seconds.push(pull(self)?);
            after_mount.push(rss(self.snap.pid()));
            // The daemon's mappings one by one (which of its binary's segments, the index's
            // map, the heap), for explaining the figure.
            if let Some(dir) = std::env::var_os("CLIP_BENCH_SMAPS_DIR") {
                let to = Path::new(&dir).join(format!("smaps-after-mount-{}-{rep}", layout.tree.repo()));
                std::fs::copy(format!("/proc/{}/smaps", self.snap.pid()), to)?;
            }
        }
        s.rss_after_mount = after_mount;
        for _ in 0..reps {
            s.container_start.push(self.walk("clip", &reference, "true")?);
        }
        // The walks measure the metadata path alone, as overlayfs's do after its unpack: not
        // while background completion inflates the layer and checks it on the same two cores.
        s.completed_after = self.wait_verified(2, Duration::from_secs(300));
        for rep in 0..reps {
            drop_caches();
            let before = self.fuse_requests();
            let daemon_before = proc_stat(self.snap.pid());
            s.cold_walk.push(self.walk("clip", &reference, walk)?);
            if rep == 0 {
                let daemon_after = proc_stat(self.snap.pid());
                s.walk_daemon = ProcStat {
                    cpu_seconds: daemon_after.cpu_seconds - daemon_before.cpu_seconds,
                    major_faults: daemon_after.major_faults - daemon_before.major_faults,
                };
                let after = self.fuse_requests();
                s.requests = after.iter().zip(&before).map(|((op, a), (_, b))| (*op, a - b)).collect();
            }
            s.warm_walk.push(self.walk("clip", &reference, walk)?);
        }
        s.rss_after_walks = rss(self.snap.pid());
        self.cold()?;
        s.overlay_pull_seconds = timed(
            self.ctrd
                .ctr(NS)
                .args(["images", "pull", "--plain-http", "--hosts-dir"])
                .arg(self.ctrd.hosts_dir())
                .args(["--snapshotter", "overlayfs", &reference]),
        )?;
        for _ in 0..reps {
            drop_caches();
            s.overlay_cold_walk.push(self.walk("overlayfs", &reference, walk)?);
            s.overlay_warm_walk.push(self.walk("overlayfs", &reference, walk)?);
        }
        self.ctrd.purge()?;
        Ok(s)
    }
}

fn main() -> Result<()> {
    let opts = parse_opts()?;
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "run as root");
    std::fs::create_dir_all(&opts.out)?;
    let td = TestDir::new("scale")?;
    let reg = Registry::start_plain(&td, "scale")?;
    let python = TestImage::Python.layout()?;
    let python_ref = reg.push_layout(&python, "pyapp", "bench/python", "latest")?;
    let mut layouts = Vec::new();
    for tree in &opts.trees {
        let layout = trees::layout(tree)?;
        reg.push_layout(&layout.path, "scale", &format!("bench/{}", tree.repo()), "latest")?;
        layouts.push(layout);
    }

    // Indexing, end to end.
    let mut indexed = Vec::new();
    let mut walls = Vec::new();
    let (layers, wall, peak) = index_image(&td, "python", &python_ref, &python, "pyapp", opts.reps)?;
    eprintln!("python: clip-builder index {:.2} s (median)", median(&wall));
    walls.push(("python".to_string(), wall, peak));
    indexed.extend(layers);
    for layout in &layouts {
        let name = layout.tree.repo();
        let reference = format!("{}/bench/{name}:latest", reg.host());
        let (layers, wall, peak) = index_image(&td, &name, &reference, &layout.path, "scale", opts.reps)?;
        eprintln!("{name}: clip-builder index {:.2} s (median)", median(&wall));
        walls.push((name, wall, peak));
        indexed.extend(layers);
    }
    if opts.index_only {
        return write_results(&opts, &indexed, &walls, &[]);
    }

    // Serving.
    let hosts = td.sub("certs.d")?;
    let d = hosts.join(reg.host());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", reg.host()))?;
    let metrics_port = clip_integration::free_port()?;
    let config = td.path().join("snapshotter.toml");
    std::fs::write(
        &config,
        format!("metrics_address = \"127.0.0.1:{metrics_port}\"\n[registry]\nhosts_dir = \"{}\"\n", hosts.display()),
    )?;
    let config = config.display().to_string();
    let snap = ClipSnapshotter::start(&td, "clip", &["--config", &config, "--log-level", "info"])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let d = ctrd.hosts_dir().join(reg.host());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", reg.host()))?;
    let mut rig = Rig { snap, ctrd, metrics_port };
    let mut served = Vec::new();
    for layout in &layouts {
        let s = rig.serve(reg.host(), layout, opts.reps)?;
        eprintln!(
            "{}: pull {:.2} s, cold walk clip {:.2} s vs overlayfs {:.2} s",
            s.label,
            median(&s.pull_seconds),
            median(&s.cold_walk),
            median(&s.overlay_cold_walk)
        );
        served.push(s);
    }
    write_results(&opts, &indexed, &walls, &served)
}

/// The cargo profile this benchmark (and the daemon beside it) was built with: the name of the
/// directory it runs from (`target/release`, `target/dist`).
fn build_profile() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "release".to_string())
}

fn write_results(opts: &Opts, indexed: &[Indexed], walls: &[(String, Vec<f64>, u64)], served: &[Served]) -> Result<()> {
    let mb = |b: u64| b as f64 / 1e6;
    let mut md = String::from("# Scale: many small files, and indexing end to end\n\n");
    let command: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(
        md,
        "Produced by `cargo run --profile {} -p clip-bench --bin scale -- {}` on a 2-core VM (Debian 12, kernel 6.18), \
         containerd {}, registry on loopback; medians of {} runs, spread (max-min) in brackets. The generated layers hold \
         N files of ~40 bytes in directories of {} under `/scale`, on busybox; `node_modules` is a real tree, `npm ci` of \
         `bench/node-modules/package-lock.json` (React, MUI, the AWS SDKs, Firebase) under `/scale/node_modules`.\n",
        build_profile(),
        command.join(" "),
        clip_integration::gotools::containerd2_version(),
        opts.reps,
        trees::FILES_PER_DIR
    );
    let _ = writeln!(md, "## Indexing as users run it\n");
    let _ = writeln!(
        md,
        "`clip-builder index REF` end to end (process start, manifest, download streamed into the indexer, inflate, tar \
         walk, span digests, packing, pushing blobs and the artifact), the published index taken off the referrers and a \
         fresh state dir before each run; `pigz -dc BLOB > /dev/null` of each layer's local blob. The builder indexes up \
         to two layers at once.\n"
    );
    let _ = writeln!(md, "| image | clip-builder index s | Σ pigz -dc s | ratio | builder peak RSS MB |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    let mut csv = String::from("kind,image,layer,measure,rep,value\n");
    for (image, wall, peak) in walls {
        let pigz: f64 = indexed.iter().filter(|l| &l.image == image).map(|l| median(&l.pigz_seconds)).sum();
        let _ = writeln!(
            md,
            "| {image} | {:.2} ({:.2}) | {pigz:.2} | {:.2}x | {:.0} |",
            median(wall),
            spread(wall),
            median(wall) / pigz.max(1e-9),
            mb(*peak)
        );
        for (i, w) in wall.iter().enumerate() {
            let _ = writeln!(csv, "index,{image},,wall_seconds,{i},{w:.3}");
        }
    }
    let _ = writeln!(
        md,
        "\n| image | layer | MB | entries | builder's time for the layer s | pigz -dc s | ratio | index MB (packed) | windows MB | index / layer |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for l in indexed {
        let (b, p) = (median(&l.layer_seconds), median(&l.pigz_seconds));
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {} | {b:.2} | {p:.2} | {:.2}x | {:.2} | {:.2} | {:.2}% |",
            l.image,
            &l.layer[7..19.min(l.layer.len())],
            mb(l.layer_bytes),
            l.entries,
            b / p.max(1e-9),
            mb(l.index_bytes),
            mb(l.windows_bytes),
            (l.index_bytes + l.windows_bytes) as f64 * 100.0 / l.layer_bytes.max(1) as f64
        );
        for (i, v) in l.layer_seconds.iter().enumerate() {
            let _ = writeln!(csv, "index,{},{},layer_seconds,{i},{v:.3}", l.image, l.layer);
        }
        for (i, v) in l.pigz_seconds.iter().enumerate() {
            let _ = writeln!(csv, "index,{},{},pigz_seconds,{i},{v:.3}", l.image, l.layer);
        }
    }
    if served.is_empty() {
        return write_files(opts, &md, &csv);
    }
    let _ = writeln!(md, "\n## Serving\n");
    let _ = writeln!(
        md,
        "Prepare-to-mounted is `clip-snapshotter pull` (manifest, the index artifact and each layer's index fetched, \
         Prepare and FUSE mount of both layers), each on a cold snapshotter and containerd. The walk is `ctr run` of \
         `find /scale -size +10000k` (an lstat of every entry; the container's start is in the time, and given alone); \
         cold: `drop_caches=3` (page cache, dentries, inodes) before it; overlayfs's image was pulled and unpacked first \
         (its pull time is given), and clip's walks begin once background completion has completed and checked both \
         layers (the time that took after the containers' starts is given), so neither walk shares the cores with an \
         unpack; the daemon's log level is `info`, its default.\n"
    );
    let _ = writeln!(
        md,
        "| tree | clip pull (mounted) s | clip RSS after mount MB (anon; median of the reps) | container start s | cold walk clip s | cold walk overlayfs s | cold ratio | warm walk clip s | warm walk overlayfs s | warm ratio | overlayfs pull + unpack s | clip completed and checked after s | clip RSS after walks MB (anon; peak) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in served {
        let after_mount = median(&s.rss_after_mount);
        let (cc, oc, cw, ow) =
            (median(&s.cold_walk), median(&s.overlay_cold_walk), median(&s.warm_walk), median(&s.overlay_warm_walk));
        let _ = writeln!(
            md,
            "| {} | {:.2} ({:.2}) | {:.0} ({:.0}) | {:.2} | {cc:.2} ({:.2}) | {oc:.2} ({:.2}) | {:.2}x | {cw:.2} | {ow:.2} | {:.2}x | {:.1} | {} | {:.0} ({:.0}; {:.0}) |",
            s.label,
            median(&s.pull_seconds),
            spread(&s.pull_seconds),
            mb(after_mount.total),
            mb(after_mount.anon),
            median(&s.container_start),
            spread(&s.cold_walk),
            spread(&s.overlay_cold_walk),
            cc / oc.max(1e-9),
            cw / ow.max(1e-9),
            s.overlay_pull_seconds,
            s.completed_after.map_or_else(|| "not within 300 s".to_string(), |t| format!("{t:.1}")),
            mb(s.rss_after_walks.total),
            mb(s.rss_after_walks.anon),
            mb(s.rss_after_walks.peak)
        );
        let series: [(&str, &Vec<f64>); 6] = [
            ("clip_pull_seconds", &s.pull_seconds),
            ("container_start_seconds", &s.container_start),
            ("clip_cold_walk_seconds", &s.cold_walk),
            ("clip_warm_walk_seconds", &s.warm_walk),
            ("overlayfs_cold_walk_seconds", &s.overlay_cold_walk),
            ("overlayfs_warm_walk_seconds", &s.overlay_warm_walk),
        ];
        for (name, v) in series {
            for (i, x) in v.iter().enumerate() {
                let _ = writeln!(csv, "serve,{},,{name},{i},{x:.3}", s.repo);
            }
        }
        for (i, r) in s.rss_after_mount.iter().enumerate() {
            let _ = writeln!(csv, "serve,{},,clip_rss_after_mount_bytes,{i},{}", s.repo, r.total);
            let _ = writeln!(csv, "serve,{},,clip_rss_anon_after_mount_bytes,{i},{}", s.repo, r.anon);
        }
    }
    let _ =
        writeln!(md, "\nFUSE requests of one cold walk through clip, per entry of the tree (files + directories):\n");
    let _ = writeln!(
        md,
        "| tree | {} | total per entry | snapshotter CPU s | index pages read from disk (major faults) |",
        clip_readpath::FuseOp::NAMES.join(" | ")
    );
    let _ = writeln!(md, "|---|{}---|---|---|", "---|".repeat(clip_readpath::FuseOp::COUNT));
    for s in served {
        let entries = s.entries as f64;
        let cells: Vec<String> = s.requests.iter().map(|(_, n)| format!("{:.3}", *n as f64 / entries)).collect();
        let total: u64 = s.requests.iter().map(|(_, n)| n).sum();
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.2} | {} |",
            s.label,
            cells.join(" | "),
            total as f64 / entries,
            s.walk_daemon.cpu_seconds,
            s.walk_daemon.major_faults
        );
        for (op, n) in &s.requests {
            let _ = writeln!(csv, "serve,{},,fuse_{op},0,{n}", s.repo);
        }
    }
    write_files(opts, &md, &csv)
}

fn write_files(opts: &Opts, md: &str, csv: &str) -> Result<()> {
    std::fs::write(opts.out.join("scale.md"), md)?;
    std::fs::write(opts.out.join("scale.csv"), csv)?;
    eprintln!("{md}");
    Ok(())
}
