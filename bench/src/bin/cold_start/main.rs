//! Cold-start benchmark: time from "pull" to the workload's exit, and the bytes and requests the
//! registry served by then, for containerd's overlayfs (full pull), clip (`clip-snapshotter
//! pull` + `ctr run`; first start ever, no access profile in the registry), clip with the access
//! profile a first node recorded and published (`clip-profile`: the first node's run is not
//! timed, every timed run is a cold node that finds the profile in the registry), clip through
//! CRI (PullImage + pod + container, no profile), the SOCI snapshotter on SOCI-converted images
//! (defaults and tuned; built by `integration/install-deps.sh`) and the stargz snapshotter on
//! eStargz images when `containerd-stargz-grpc` is installed; images without an index (on request:
//! `clip-noindex` through `clip-snapshotter pull`, `clip-noindex-ctr` through `ctr images pull
//! --snapshotter clip`) and containerd's parallel layer fetch (`overlayfs-parallel`); on loopback and on a 100 Mbit/s,
//! 20 ms link (`slow`: a network namespace with `tc tbf` plus a delaying proxy; `proxy`: the same
//! link emulated by a userspace proxy alone, on loopback). Every run starts cold:
//! all namespaces purged, the snapshotter's state wiped, page cache dropped, daemons restarted.
//! Also: warm read throughput, a metadata walk, and the snapshotter's memory.
//!
//! Run (release build, root): `cargo run --release -p clip-bench --bin cold-start -- [--reps N]
//! [--links loopback,slow,proxy] [--images busybox,python,scipy,torch] [--workloads print,numpy,torch,infer,fullread]
//! [--modes overlayfs,clip,clip-profile,clip-cri,overlayfs-parallel,clip-noindex,clip-noindex-ctr]
//! [--containerd 2|1.6] [--skip warm,memory,stargz,soci] [--settle-s N] [--out docs/benchmarks]`. containerd 2.x
//! by default (SOCI runs only there). Writes `cold-start.csv`, `cold-start.md` and, with
//! python3-matplotlib, `cold-start.png` into the output directory.

use anyhow::{Context, Result, bail};
use clip_bench::{median, spread};
use clip_integration::containerd::{Containerd, ContainerdOptions, Flavor};
use clip_integration::cri::CriClient;
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::netns::{DelayProxy, SlowLink};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, run};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod peers;
use peers::{Peer, Usage};

const NS: &str = "bench";

/// `overlayfs-parallel`: containerd's transfer service fetches each layer in ranged requests of
/// this size, `max_concurrent_downloads` (3) at a time (`concurrent_layer_fetch_buffer`).
const LAYER_FETCH_CHUNK: u64 = 8 << 20;

/// SOCI's modes and their `convert` settings: its defaults (4 MiB spans, no zTOC for layers under
/// 10 MiB), and tuned for these small images (every layer indexed, 1 MiB spans: its docs' two
/// knobs, smaller spans trading index size for less data per random read).
const SOCI_MODES: [(&str, &[&str]); 2] =
    [("soci", &[]), ("soci-tuned", &["-min-layer-size", "0", "-span-size", "1048576"])];

#[derive(Debug, Clone)]
struct Opts {
    reps: usize,
    links: Vec<String>,
    images: Vec<String>,
    modes: Vec<String>,
    workloads: Vec<String>,
    /// Parts left out: `warm`, `memory`, `stargz`, `soci` (quick runs while tuning).
    skip: Vec<String>,
    out: PathBuf,
    /// containerd 2.x (default) or Debian's 1.6 (`--containerd 1.6`).
    flavor: Flavor,
    /// Seconds to wait after each reset (`--settle-s`): ext4 without a journal skips inodes
    /// freed in the last minute when it allocates, so a run right after the previous run's
    /// tree was deleted pays for that deletion.
    settle: Duration,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        reps: 3,
        links: vec!["loopback".into(), "slow".into()],
        images: vec!["busybox".into(), "python".into()],
        modes: vec!["overlayfs".into(), "clip".into(), "clip-profile".into(), "clip-cri".into()],
        workloads: vec!["print".into(), "numpy".into(), "fullread".into()],
        skip: Vec::new(),
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks"),
        flavor: Flavor::V2,
        settle: Duration::ZERO,
    };
    let list = |v: String| v.split(',').map(str::to_string).collect::<Vec<_>>();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => o.reps = args.next().context("--reps N")?.parse()?,
            "--links" => o.links = list(args.next().context("--links")?),
            "--images" => o.images = list(args.next().context("--images")?),
            "--modes" => o.modes = list(args.next().context("--modes")?),
            "--workloads" => o.workloads = list(args.next().context("--workloads")?),
            "--skip" => o.skip = list(args.next().context("--skip warm,memory,stargz,soci")?),
            "--containerd" => {
                o.flavor = match args.next().context("--containerd 2|1.6")?.as_str() {
                    "2" | "2.x" => Flavor::V2,
                    "1.6" => Flavor::V1_6,
                    other => bail!("--containerd {other}: 2 or 1.6"),
                }
            }
            "--out" => o.out = PathBuf::from(args.next().context("--out DIR")?),
            "--settle-s" => o.settle = Duration::from_secs(args.next().context("--settle-s N")?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

/// One measured run.
#[derive(Debug, Clone)]
struct Sample {
    link: String,
    image: String,
    workload: String,
    mode: String,
    rep: usize,
    seconds: f64,
    /// Seconds to the workload's first output (the torch workloads print when done; see
    /// [`workload`]).
    output: Option<f64>,
    bytes: u64,
    requests: usize,
    /// clip modes: compressed bytes the snapshotter fetched by cause (foreground, prefetch,
    /// profile, stream), from its metrics.
    causes: [u64; 4],
    /// The snapshotter daemon's peak RSS and CPU during the run (overlayfs: containerd's).
    usage: Usage,
}

const CAUSES: [&str; 4] = ["foreground", "prefetch", "profile", "stream"];

/// A registry as the benchmark reaches it (directly, or through the slow link's proxy).
struct Site {
    registry: Registry,
    /// `host:port` clients use.
    host: String,
    _proxy: Option<DelayProxy>,
}

impl Site {
    fn reference(&self, image: &str) -> String {
        format!("{}/bench/{image}:latest", self.host)
    }

    fn served(&self) -> (u64, usize) {
        let log = self.registry.access_log();
        (log.iter().filter(|e| e.path.contains("/blobs/")).map(|e| e.bytes).sum(), log.len())
    }

    /// A registry session for `image` (plain HTTP, anonymous), with push access.
    fn repository(&self, image: &str) -> Result<clip_registry::Repository> {
        use clip_registry::{HostsConfig, Reference, RegistryClient, credentials::CredentialChain};
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        Ok(client.repository(&Reference::parse(&self.reference(image))?, CredentialChain::anonymous())?.for_push())
    }

    /// The access profiles published for `image`'s manifest.
    async fn profiles(&self, image: &str) -> Result<(clip_registry::Repository, String, usize)> {
        let repo = self.repository(image)?;
        let (manifest, _) = repo.get_image_manifest("latest", &clip_registry::Platform::default()).await?;
        let listed = repo.referrers(&manifest.digest, Some(clip_index::profile::PROFILE_ARTIFACT_TYPE)).await?;
        Ok((repo, manifest.digest, listed.len()))
    }

    /// Takes `image`'s access profiles off the registry's referrers: the next start is a
    /// first start ever.
    fn unlist_profiles(&self, rt: &tokio::runtime::Runtime, image: &str) -> Result<()> {
        rt.block_on(async {
            let (repo, digest, _) = self.profiles(image).await?;
            repo.unlist_referrers(&digest, clip_index::profile::PROFILE_ARTIFACT_TYPE).await?;
            anyhow::Ok(())
        })
    }

    /// Waits until a profile of `image` is published.
    fn wait_for_profile(&self, rt: &tokio::runtime::Runtime, image: &str) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if rt.block_on(self.profiles(image))?.2 > 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("no access profile of {image} was published within 60 s")
    }
}

fn workload(image: &str, name: &str) -> Option<Vec<&'static str>> {
    match (image, name) {
        ("busybox", "print") => Some(vec!["echo", "1"]),
        ("python" | "scipy" | "torch", "print") => Some(vec!["python3", "-c", "print(1)"]),
        ("python" | "scipy", "numpy") => Some(vec!["python3", "-c", "import numpy; print(1)"]),
        // Unbuffered: the print is the moment the import (the inference) is done, before the exit.
        ("torch", "torch") => Some(vec!["python3", "-u", "-c", "import torch; print(torch.__version__)"]),
        ("torch", "infer") => Some(vec!["python3", "-u", "/app/infer.py"]),
        (_, "fullread") => Some(vec!["sh", "-c", "find / -xdev -type f -print0 | xargs -0 cat > /dev/null"]),
        (_, "walk") => Some(vec!["sh", "-c", "find / -xdev -exec stat {} + > /dev/null"]),
        _ => None,
    }
}

struct Bench {
    /// The peers that are installed and not skipped (stargz, soci).
    peers: Vec<Peer>,
    /// Registry hosts the peers trust over plain HTTP.
    peer_hosts: Vec<String>,
    td: TestDir,
    snap: ClipSnapshotter,
    ctrd: Containerd,
    hosts: PathBuf,
    rt: tokio::runtime::Runtime,
    pause: String,
    /// The snapshotter's metrics endpoint.
    metrics_port: u16,
    /// [`Opts::settle`].
    settle: Duration,
}

impl Bench {
    /// Every namespace purged, the snapshotter wiped, the deletions written back (a run never
    /// pays for the previous one's writeback), containerd restarted, page cache dropped.
    fn cold(&mut self) -> Result<()> {
        self.ctrd.purge()?;
        self.snap.wipe_and_restart()?;
        run(&mut std::process::Command::new("sync"))?;
        std::thread::sleep(self.settle);
        for p in &mut self.peers {
            p.stop();
            p.start(&self.peer_hosts)?;
        }
        self.ctrd.restart()?;
        clip_integration::drop_caches();
        // containerd's proxy client reconnects lazily: wait until clip answers through it.
        if !self.ctrd.reaches(NS, "clip", Duration::from_secs(30)) {
            bail!("containerd does not reach clip after a restart");
        }
        Ok(())
    }

    fn ctr_run(&self, snapshotter: &str, reference: &str, cmd: &[&str]) -> Result<()> {
        self.ctr_run_timed(snapshotter, reference, cmd, Instant::now()).map(|_| ())
    }

    /// [`Self::ctr_run`], returning when the container's first output came, in seconds after
    /// `since` (`None`: it printed nothing). A workload that prints once its work is done (and
    /// unbuffered) is ready then; what follows is its exit.
    fn ctr_run_timed(&self, snapshotter: &str, reference: &str, cmd: &[&str], since: Instant) -> Result<Option<f64>> {
        use std::io::Read;
        let id = format!("bench-{}", std::process::id());
        let mut c = self.ctrd.ctr(NS);
        c.args(["run", "--rm", "--snapshotter", snapshotter, reference, &id]).args(cmd);
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().context("cannot start ctr")?;
        let mut stderr = child.stderr.take().context("stderr")?;
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let mut stdout = child.stdout.take().context("stdout")?;
        let (mut first, mut out, mut buf) = (None, Vec::new(), [0u8; 4096]);
        loop {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(|| since.elapsed().as_secs_f64());
            out.extend_from_slice(&buf[..n]);
        }
        let status = child.wait()?;
        let errors = errors.join().unwrap_or_default();
        if !status.success() {
            bail!(
                "ctr run {reference} {cmd:?} failed ({status}):\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out).trim(),
                errors.trim()
            );
        }
        Ok(first)
    }

    fn pull(&self, mode: &str, reference: &str) -> Result<()> {
        match mode {
            "overlayfs" | "overlayfs-parallel" | "clip-noindex-ctr" => {
                let snapshotter = if mode == "clip-noindex-ctr" { "clip" } else { "overlayfs" };
                run(self
                    .ctrd
                    .ctr(NS)
                    .args(["images", "pull", "--plain-http", "--hosts-dir"])
                    .arg(&self.hosts)
                    .args(["--snapshotter", snapshotter, reference]))?;
            }
            "clip" | "clip-profile" | "clip-noindex" => {
                let out = run(Command::new(workspace_binary("clip-snapshotter")?)
                    .args(["pull", "--plain-http", "-n", NS, "--containerd-address"])
                    .env("RUST_LOG", "info,clip_pull=debug")
                    .arg(self.ctrd.socket())
                    .arg(reference))?;
                // Layers without an index: how long each took to download and to apply.
                for line in String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter(|l| l.contains("applied") || l.contains("blob streamed"))
                {
                    eprintln!("    {line}");
                }
            }
            "soci" | "soci-tuned" => {
                let nerdctl = self.td.path().join("nerdctl");
                run(self.ctrd.nerdctl(NS, &nerdctl, &nerdctl.join("docker"))?.args([
                    "--snapshotter",
                    "soci",
                    "pull",
                    "--insecure-registry",
                    reference,
                ]))?;
            }
            "estargz" | "estargz-opt" => {
                run(Command::new("ctr-remote").arg("-a").arg(self.ctrd.socket()).args([
                    "-n",
                    NS,
                    "images",
                    "rpull",
                    "--plain-http",
                    reference,
                ]))?;
            }
            other => bail!("no pull for {other}"),
        }
        Ok(())
    }

    /// PullImage + RunPodSandbox + CreateContainer + StartContainer + wait, through CRI.
    fn cri_run(&self, reference: &str, cmd: &[&str]) -> Result<()> {
        let logs = self.td.path().join("cri-logs");
        self.rt.block_on(async {
            let mut c = CriClient::connect(self.ctrd.socket(), self.ctrd.socket(), &logs).await?;
            c.pull(reference, None).await?;
            let pod = c.run_pod("bench").await?;
            let id = c.start(&pod, "bench", "main", reference, cmd).await?;
            let done = c.wait(&id, "bench", "main", Duration::from_secs(600)).await?;
            c.teardown(&pod).await?;
            anyhow::ensure!(done.exit_code == 0, "exit {}: {}", done.exit_code, done.log);
            anyhow::Ok(())
        })
    }

    /// The sandbox image, pulled before the clock starts (kubelet nodes have it).
    fn prepull_pause(&self) -> Result<()> {
        let logs = self.td.path().join("cri-logs");
        self.rt.block_on(async {
            let mut c = CriClient::connect(self.ctrd.socket(), self.ctrd.socket(), &logs).await?;
            c.pull(&self.pause, None).await?;
            anyhow::Ok(())
        })
    }

    /// The snapshotter's fetched bytes by cause since it started (it restarts for every run).
    fn causes(&self) -> [u64; 4] {
        let m = clip_integration::metrics::scrape(self.metrics_port);
        CAUSES.map(|c| {
            clip_integration::metrics::sum(
                &m,
                "clip_snapshotter_fetched_bytes_by_cause_total{",
                &[&format!("cause=\"{c}\"")],
            )
        })
    }

    /// The pids of the snapshotter daemon `mode` runs on (overlayfs: containerd itself).
    fn daemon_pids(&self, mode: &str) -> Vec<u32> {
        let peer = |name: &str| self.peers.iter().find(|p| p.name == name).map_or(0, Peer::pid);
        match mode {
            m if m.starts_with("clip") => {
                vec![self.snap.pid(), self.snap.keeper_pid().map_or(0, |p| p as u32)]
            }
            m if m.starts_with("soci") => vec![peer("soci")],
            m if m.starts_with("estargz") => vec![peer("stargz")],
            _ => vec![self.ctrd.pid()],
        }
    }

    /// Seconds to the workload's exit, bytes and requests served, and seconds to its first
    /// output (not through CRI).
    fn measure(
        &mut self,
        site: &Site,
        mode: &str,
        image: &str,
        cmd: &[&str],
    ) -> Result<(f64, u64, usize, Option<f64>)> {
        let chunk = (mode == "overlayfs-parallel").then_some(LAYER_FETCH_CHUNK);
        self.ctrd.reconfigure(|o| o.layer_fetch_chunk = chunk)?;
        self.cold()?;
        if mode == "clip-cri" {
            self.prepull_pause()?;
        }
        let reference = match mode {
            "estargz" => site.reference(image).replace(":latest", ":esgz"),
            "estargz-opt" => site.reference(image).replace(":latest", ":esgz-opt"),
            "soci" | "soci-tuned" => site.reference(image).replace(":latest", &format!(":{mode}")),
            "clip-noindex" | "clip-noindex-ctr" => site.reference(&format!("{image}-noindex")),
            _ => site.reference(image),
        };
        let (b0, r0) = site.served();
        let t = Instant::now();
        let mut output = None;
        match mode {
            "clip-cri" => self.cri_run(&reference, cmd)?,
            m => {
                self.pull(m, &reference)?;
                let (b, _) = site.served();
                eprintln!(
                    "    pulled after {:.2} s, {:.1} MB served by then",
                    t.elapsed().as_secs_f64(),
                    (b - b0) as f64 / 1e6
                );
                let snapshotter = match m {
                    "clip" | "clip-profile" | "clip-noindex" | "clip-noindex-ctr" => "clip",
                    "estargz" | "estargz-opt" => "stargz",
                    "soci" | "soci-tuned" => "soci",
                    _ => "overlayfs",
                };
                output = self.ctr_run_timed(snapshotter, &reference, cmd, t)?;
            }
        }
        let seconds = t.elapsed().as_secs_f64();
        let (b1, r1) = site.served();
        Ok((seconds, b1 - b0, r1 - r0, output))
    }

    /// Warm: the image fully local (read once), then the workload timed on a second container.
    fn warm(&mut self, site: &Site, mode: &str, image: &str, name: &str) -> Result<f64> {
        self.cold()?;
        let reference = site.reference(image);
        self.pull(mode, &reference)?;
        let snapshotter = if mode == "clip" { "clip" } else { "overlayfs" };
        let full = workload(image, "fullread").context("fullread")?;
        self.ctr_run(snapshotter, &reference, &full)?;
        let cmd = workload(image, name).context("workload")?;
        let t = Instant::now();
        self.ctr_run(snapshotter, &reference, &cmd)?;
        Ok(t.elapsed().as_secs_f64())
    }
}

fn main() -> Result<()> {
    let opts = parse_opts()?;
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "run as root");
    std::fs::create_dir_all(&opts.out)?;
    let td = TestDir::new("bench")?;
    let busybox = TestImage::Busybox.layout()?;
    // The images asked for, by their name in the benchmark (the large ones take a while to build).
    let mut images: BTreeMap<String, (TestImage, PathBuf)> = BTreeMap::new();
    for name in &opts.images {
        let image = match name.as_str() {
            "busybox" => TestImage::Busybox,
            "python" => TestImage::Python,
            "scipy" => TestImage::Scipy,
            "torch" => TestImage::Torch,
            other => bail!("unknown image {other}: busybox, python, scipy or torch"),
        };
        images.insert(name.clone(), (image, image.layout()?));
    }
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for (name, (image, layout)) in &images {
        sizes.insert(name.clone(), layout_layers(layout, image.tag())?.iter().map(|l| l.2).sum());
    }

    // Registries: one on loopback, one behind the slow link.
    let mut sites: BTreeMap<String, Site> = BTreeMap::new();
    let hosts = td.sub("certs.d")?;
    let builder_cfg = td.path().join("builder.toml");
    std::fs::write(&builder_cfg, format!("state_dir = \"{}/builder-state\"\n", td.path().display()))?;
    let mut _link = None;
    for link in &opts.links {
        let site = match link.as_str() {
            "loopback" => {
                let registry = Registry::start_plain(&td, "loopback")?;
                let host = registry.host().to_string();
                Site { registry, host, _proxy: None }
            }
            "slow" => {
                let l = SlowLink::new(100, 20)?;
                let registry = Registry::start_wrapped(&td, "slow", None, l.ns_ip(), &l.wrap())?;
                let port: u16 = registry.host().rsplit(':').next().unwrap_or_default().parse()?;
                let proxy = l.proxy_to(port)?;
                let host = proxy.addr().to_string();
                _link = Some(l);
                Site { registry, host, _proxy: Some(proxy) }
            }
            "proxy" => {
                // The same link emulated in user space only: a registry on loopback behind a
                // proxy that is the 100 Mbit/s wire and adds 10 ms each way (no tc, no namespace).
                let registry = Registry::start_plain(&td, "proxy")?;
                let proxy = DelayProxy::shaped(registry.host().parse()?, Duration::from_millis(10), 100)?;
                let host = proxy.addr().to_string();
                Site { registry, host, _proxy: Some(proxy) }
            }
            other => bail!("unknown link {other}"),
        };
        site.registry.push_layout(&busybox, "pause", "bench/pause", "latest")?;
        for (name, (image, layout)) in &images {
            site.registry.push_layout(layout, image.tag(), &format!("bench/{name}"), "latest")?;
            if opts.modes.iter().any(|m| m.starts_with("clip-noindex")) {
                // The same image where no index is published (its own repository: no referrers).
                site.registry.push_layout(layout, image.tag(), &format!("bench/{name}-noindex"), "latest")?;
            }
        }
        // Indexed beside the registry (not across the slow link: set-up is not measured).
        for image in images.keys() {
            run(site
                .registry
                .beside(&workspace_binary("clip-builder")?.display().to_string())
                .args(["index", "--plain-http", "--config"])
                .arg(&builder_cfg)
                .arg(format!("{}/bench/{image}:latest", site.registry.host())))?;
        }
        let d = hosts.join(&site.host);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", site.host))?;
        sites.insert(link.clone(), site);
    }
    let first = sites.values().next().context("no link")?;
    let pause = format!("{}/bench/pause:latest", first.host);

    let skipped = |name: &str| opts.skip.iter().any(|s| s == name);
    let peer_hosts: Vec<String> = sites.values().map(|s| s.host.clone()).collect();
    let mut peers = Vec::new();
    match Peer::stargz(td.path().join("stargz")).filter(|_| !skipped("stargz")) {
        Some(p) => peers.push(p),
        None => {
            eprintln!("containerd-stargz-grpc not found (../shared/testbed/00-install.sh builds it): no eStargz modes");
        }
    }
    match Peer::soci(td.path().join("soci")).filter(|_| !skipped("soci")) {
        Some(p) => peers.push(p),
        None => eprintln!("the SOCI snapshotter is not built (integration/install-deps.sh builds it): no SOCI modes"),
    }
    if opts.flavor == Flavor::V1_6 {
        // SOCI needs containerd 2.x's client libraries and is documented for 2.x.
        peers.retain(|p| p.name != "soci");
    }
    // The peers start first (containerd's config names their sockets); SOCI talks back to it.
    let containerd_socket = Containerd::socket_in(&td);
    for p in &mut peers {
        p.containerd.clone_from(&containerd_socket);
        std::fs::create_dir_all(&p.dir)?;
        p.start(&peer_hosts)?;
        eprintln!("{} snapshotter: {}", p.name, p.bin().display());
    }
    let has_peer = |peers: &[Peer], name: &str| peers.iter().any(|p| p.name == name);
    let config = td.path().join("snapshotter.toml");
    // CLIP_BENCH_LAZY: extra `[lazy]` settings, e.g. "prefetch = { threads = 0 }" (tuning runs).
    let lazy = std::env::var("CLIP_BENCH_LAZY").unwrap_or_default().replace(';', "\n");
    let metrics_port = clip_integration::free_port()?;
    std::fs::write(
        &config,
        format!(
            "metrics_address = \"127.0.0.1:{metrics_port}\"\n[registry]\nhosts_dir = \"{}\"\n[lazy]\n{lazy}\n",
            hosts.display()
        ),
    )?;
    let config = config.display().to_string();
    let level = std::env::var("CLIP_BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let snap = ClipSnapshotter::start(&td, "clip", &["--config", &config, "--log-level", &level])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions {
            clip_socket: Some(snap.socket().to_path_buf()),
            sandbox_image: Some(pause.clone()),
            stargz_socket: peers.iter().find(|p| p.name == "stargz").map(Peer::socket),
            soci_socket: peers.iter().find(|p| p.name == "soci").map(Peer::socket),
            flavor: opts.flavor,
            ..Default::default()
        },
    )?;
    for site in sites.values() {
        let d = ctrd.hosts_dir().join(&site.host);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", site.host))?;
    }
    // eStargz images, converted and optimized (for `import numpy`) with ctr-remote, per site.
    let mut modes = opts.modes.clone();
    if has_peer(&peers, "stargz") {
        for site in sites.values() {
            for image in &opts.images {
                let src = site.reference(image);
                let ctr = || {
                    let mut c = Command::new("ctr-remote");
                    c.arg("-a").arg(ctrd.socket()).args(["-n", "convert"]);
                    c
                };
                run(ctr().args(["images", "pull", "--plain-http", &src]))?;
                let esgz = src.replace(":latest", ":esgz");
                let opt = src.replace(":latest", ":esgz-opt");
                run(ctr().args(["images", "convert", "--estargz", "--oci", &src, &esgz]))?;
                let (entry, args) = match image.as_str() {
                    "busybox" => ("[\"echo\"]", "[\"1\"]"),
                    "torch" => ("[\"python3\"]", "[\"-c\",\"import torch; print(1)\"]"),
                    _ => ("[\"python3\"]", "[\"-c\",\"import numpy; print(1)\"]"),
                };
                run(ctr().args([
                    "images",
                    "optimize",
                    "--oci",
                    "--entrypoint",
                    entry,
                    "--args",
                    args,
                    "--period",
                    "5",
                    &src,
                    &opt,
                ]))?;
                for r in [&esgz, &opt] {
                    run(ctr().args(["images", "push", "--plain-http", r, r]))?;
                }
            }
        }
        ctrd.purge()?;
        for m in ["estargz", "estargz-opt"] {
            if !modes.iter().any(|x| x == m) {
                modes.push(m.to_string());
            }
        }
    }
    // SOCI: each image converted the way SOCI's docs recommend for this release (`soci convert`:
    // zTOCs plus a SOCI index manifest v2 in a new image index), with SOCI's defaults (`soci`) and
    // tuned for these images (`soci-tuned`), per site.
    if let Some(soci) = peers.iter().find(|p| p.name == "soci") {
        for site in sites.values() {
            for image in &opts.images {
                let src = site.reference(image);
                let ctr = || {
                    let mut c = ctrd.ctr("convert");
                    c.env("PATH", ctrd.path_env());
                    c
                };
                run(ctr().args(["images", "pull", "--plain-http", "--hosts-dir"]).arg(ctrd.hosts_dir()).arg(&src))?;
                for (mode, args) in SOCI_MODES {
                    let dst = src.replace(":latest", &format!(":{mode}"));
                    let converted = Command::new(soci.bin())
                        .arg("convert")
                        .arg("-address")
                        .arg(ctrd.socket())
                        .args(["-namespace", "convert"])
                        .args(args.iter())
                        .args([&src, &dst])
                        .output()?;
                    if !converted.status.success() {
                        // SOCI indexes no layer under its minimum size, and refuses an image
                        // with none: such an image is pulled whole, as SOCI users get it.
                        let err = String::from_utf8_lossy(&converted.stderr);
                        eprintln!("soci convert {src} ({mode}) refused: {}; pushing it unconverted", err.trim());
                        run(ctr().args(["images", "tag", "--force", &src, &dst]))?;
                    }
                    run(ctr()
                        .args(["images", "push", "--plain-http", "--hosts-dir"])
                        .arg(ctrd.hosts_dir())
                        .args([&dst, &dst]))?;
                }
            }
        }
        ctrd.purge()?;
        for (m, _) in SOCI_MODES {
            if !modes.iter().any(|x| x == m) {
                modes.push(m.to_string());
            }
        }
    }
    let opts = Opts { modes, ..opts };
    let rt = tokio::runtime::Runtime::new()?;
    let mut bench = Bench { peers, peer_hosts, td, snap, ctrd, hosts, rt, pause, metrics_port, settle: opts.settle };

    let mut samples = Vec::new();
    for (link, site) in &sites {
        for image in &opts.images {
            for name in &opts.workloads {
                let name = name.as_str();
                let Some(cmd) = workload(image, name) else { continue };
                for mode in &opts.modes {
                    if mode == "clip-profile" {
                        // The first node: a start without a profile records one and publishes it.
                        site.unlist_profiles(&bench.rt, image)?;
                        let (s, b, r, _) = bench.measure(site, "clip", image, &cmd)?;
                        site.wait_for_profile(&bench.rt, image)?;
                        eprintln!(
                            "{link:8} {image:7} {name:8} first node records the profile: {s:6.2} s {:7.1} MB {r:4} requests",
                            b as f64 / 1e6
                        );
                    }
                    for rep in 0..opts.reps {
                        if mode == "clip" || mode == "clip-cri" {
                            site.unlist_profiles(&bench.rt, image)?;
                        }
                        let (seconds, bytes, requests, output) = bench
                            .measure(site, mode, image, &cmd)
                            .with_context(|| format!("{link} {image} {name} {mode} #{rep}"))?;
                        let causes = if mode.starts_with("clip") { bench.causes() } else { [0; 4] };
                        let usage = Usage::of(&bench.daemon_pids(mode));
                        let mb = |b: u64| b as f64 / 1e6;
                        eprintln!(
                            "{link:8} {image:7} {name:8} {mode:12} #{rep}: {seconds:6.2} s (output after {}) {:7.1} MB {requests:4} requests (by cause MB: fg {:.1} pf {:.1} profile {:.1} stream {:.1}); daemon peak RSS {:.0} MB, CPU {:.2} s",
                            output.map_or("-".into(), |o| format!("{o:.2} s")),
                            mb(bytes),
                            mb(causes[0]),
                            mb(causes[1]),
                            mb(causes[2]),
                            mb(causes[3]),
                            mb(usage.peak_rss_bytes),
                            usage.cpu_seconds
                        );
                        samples.push(Sample {
                            link: link.clone(),
                            image: image.clone(),
                            workload: name.into(),
                            mode: mode.clone(),
                            rep,
                            seconds,
                            output,
                            bytes,
                            requests,
                            causes,
                            usage,
                        });
                    }
                }
            }
        }
    }

    // Warm read and metadata walk (python image, loopback-first site), overlayfs vs clip.
    let mut warm: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    if opts.images.iter().any(|i| i == "python") && !opts.skip.iter().any(|s| s == "warm") {
        let site = sites.values().next().context("site")?;
        for name in ["fullread", "walk"] {
            for mode in ["overlayfs", "clip"] {
                for _ in 0..opts.reps {
                    let s = bench.warm(site, mode, "python", name)?;
                    eprintln!("warm {name:8} {mode:10}: {s:.2} s");
                    warm.entry((name.to_string(), mode.to_string())).or_default().push(s);
                }
            }
        }
    }

    // Memory: both images mounted lazily on one snapshotter.
    let mut memory = String::new();
    if !opts.skip.iter().any(|s| s == "memory") {
        bench.cold()?;
        let site = sites.values().next().context("site")?;
        for image in ["busybox", "python"] {
            anyhow::ensure!(
                images.contains_key(image),
                "the memory figure needs --images busybox,python (or --skip memory)"
            );
            bench.pull("clip", &site.reference(image))?;
            bench.ctr_run("clip", &site.reference(image), &workload(image, "print").context("print")?)?;
        }
        let pid = bench.snap.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field =
            |f: &str| status.lines().find_map(|l| l.strip_prefix(f)).map(|v| v.trim().to_string()).unwrap_or_default();
        memory = format!(
            "VmRSS {} (peak VmHWM {}), {} threads, with busybox and python mounted (5 lazy layers)",
            field("VmRSS:"),
            field("VmHWM:"),
            field("Threads:")
        );
    }
    bench.ctrd.purge()?;

    write_results(&opts, &samples, &warm, &memory, &sizes)?;
    Ok(())
}

fn write_results(
    opts: &Opts,
    samples: &[Sample],
    warm: &BTreeMap<(String, String), Vec<f64>>,
    memory: &str,
    sizes: &BTreeMap<String, u64>,
) -> Result<()> {
    let mut csv = String::from(
        "link,image,workload,mode,rep,seconds,bytes,requests,foreground_bytes,prefetch_bytes,profile_bytes,stream_bytes,daemon_peak_rss_bytes,daemon_cpu_seconds,output_seconds\n",
    );
    for s in samples {
        let [fg, pf, pr, st] = s.causes;
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{:.3},{},{},{fg},{pf},{pr},{st},{},{:.3},{}",
            s.link,
            s.image,
            s.workload,
            s.mode,
            s.rep,
            s.seconds,
            s.bytes,
            s.requests,
            s.usage.peak_rss_bytes,
            s.usage.cpu_seconds,
            s.output.map_or(String::new(), |o| format!("{o:.3}"))
        );
    }
    std::fs::write(opts.out.join("cold-start.csv"), &csv)?;

    let mut groups: BTreeMap<(String, String, String, String), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups.entry((s.link.clone(), s.image.clone(), s.workload.clone(), s.mode.clone())).or_default().push(s);
    }
    let mut md = String::new();
    let _ = writeln!(md, "# Cold start: clip vs overlayfs, SOCI and eStargz\n");
    let command: Vec<String> = std::env::args().skip(1).collect();
    let sizes_text: Vec<String> = sizes.iter().map(|(k, v)| format!("{k} {:.1} MB", *v as f64 / 1e6)).collect();
    let _ = writeln!(
        md,
        "Produced by `cargo run --release -p clip-bench --bin cold-start -- {}` on a 2-core VM (Debian 12, kernel 6.18), \
         containerd {}. \
         Every run is cold (namespaces purged, snapshotter state wiped, page cache dropped, daemons restarted); time is from \
         the pull to the workload's exit (*output after*: to its first output; the torch workloads print, unbuffered, when \
         the import or the inference is done, so what follows is the process's exit); bytes and requests are what the \
         registry served by then. `slow` is 100 Mbit/s with \
         a 20 ms round trip (`tc tbf` on a veth pair to a network namespace, plus a delaying proxy); `proxy` is the \
         same link emulated in user space alone (a loopback proxy that is the 100 Mbit/s wire, shared by every \
         connection, and adds 10 ms each way). Image sizes (compressed): {}.\n",
        command.join(" "),
        match opts.flavor {
            Flavor::V2 => clip_integration::gotools::containerd2_version(),
            Flavor::V1_6 => "1.6 (Debian 12)".to_string(),
        },
        sizes_text.join(", ")
    );
    let _ = writeln!(
        md,
        "| link | image | workload | mode | median s | spread s (max-min) | output after s (median) | MB served | requests | vs overlayfs | daemon peak RSS MB | daemon CPU s | clip MB by cause: container / prefetch / profile / stream |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut medians: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    for (k, v) in &groups {
        let t: Vec<f64> = v.iter().map(|s| s.seconds).collect();
        medians.insert(k.clone(), median(&t));
    }
    for (k, v) in &groups {
        let t: Vec<f64> = v.iter().map(|s| s.seconds).collect();
        let m = median(&t);
        let spread = spread(&t);
        let b: Vec<f64> = v.iter().map(|s| s.bytes as f64 / 1e6).collect();
        let r: Vec<f64> = v.iter().map(|s| s.requests as f64).collect();
        let base = medians.get(&(k.0.clone(), k.1.clone(), k.2.clone(), "overlayfs".into())).copied();
        let ratio = base.map_or_else(|| "-".into(), |b| format!("{:.2}x", m / b));
        let causes = if k.3.starts_with("clip") {
            (0..4)
                .map(|cause| {
                    let by_cause: Vec<f64> = v.iter().map(|s| s.causes[cause] as f64 / 1e6).collect();
                    format!("{:.1}", median(&by_cause))
                })
                .collect::<Vec<_>>()
                .join(" / ")
        } else {
            "-".into()
        };
        let rss: Vec<f64> = v.iter().map(|s| s.usage.peak_rss_bytes as f64 / 1e6).collect();
        let cpu: Vec<f64> = v.iter().map(|s| s.usage.cpu_seconds).collect();
        let outputs: Vec<f64> = v.iter().filter_map(|s| s.output).collect();
        let output = if outputs.len() == v.len() { format!("{:.2}", median(&outputs)) } else { "-".into() };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {m:.2} | {spread:.2} | {output} | {:.1} | {:.0} | {ratio} | {:.0} | {:.2} | {causes} |",
            k.0,
            k.1,
            k.2,
            k.3,
            median(&b),
            median(&r),
            median(&rss),
            median(&cpu)
        );
    }
    if !warm.is_empty() {
        let _ = writeln!(md, "\n## Warm reads and metadata walk (python image, all data local)\n");
        let _ = writeln!(md, "| workload | overlayfs median s | clip median s | clip / overlayfs |");
        let _ = writeln!(md, "|---|---|---|---|");
        for name in ["fullread", "walk"] {
            let o = warm.get(&(name.to_string(), "overlayfs".to_string())).cloned().map(|v| median(&v));
            let c = warm.get(&(name.to_string(), "clip".to_string())).cloned().map(|v| median(&v));
            if let (Some(o), Some(c)) = (o, c) {
                let _ = writeln!(md, "| {name} | {o:.2} | {c:.2} | {:.2}x |", c / o);
            }
        }
    }
    let _ = writeln!(
        md,
        "\nNotes: `clip-cri` times PullImage + RunPodSandbox + CreateContainer + StartContainer until exit, with the sandbox \
         image pulled before the clock starts; the test bed's pause image is busybox plus a layer, so busybox through CRI \
         finds its layer already served (0 MB). eStargz modes run when `containerd-stargz-grpc` is installed \
         (`../shared/testbed/00-install.sh`); `estargz-opt` is optimized for `import numpy`. `clip` is a first start ever \
         (no access profile in the registry); `clip-profile` a cold node of an image whose profile a first node recorded \
         for the same workload and published (the first node's run is not timed). The by-cause bytes are the \
         snapshotter's (`clip_snapshotter_fetched_bytes_by_cause_total`), when the workload exited. SOCI modes \
         (`integration/soci`: SOCI v0.16.1's library) pull with `nerdctl --snapshotter soci pull` and run with `ctr run`; \
         `soci` is `soci convert` with SOCI's defaults (4 MiB spans, layers under 10 MiB not indexed: such layers, and \
         images with no layer that large, are pulled whole), `soci-tuned` indexes every layer with 1 MiB spans. Daemon \
         peak RSS and CPU are those of the snapshotter's processes during the run (clip: daemon plus fd keeper; \
         overlayfs: containerd itself, which unpacks), each restarted for every run.\n"
    );
    let _ = writeln!(md, "\n## Snapshotter memory\n\n{memory}\n");
    std::fs::write(opts.out.join("cold-start.md"), &md)?;
    eprintln!("{md}");

    // The chart, when matplotlib is there.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("plot_cold_start.py");
    // Debian's python3 (python3-matplotlib), not whatever python3 comes first in PATH.
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let plotted = Command::new(python)
        .arg(&script)
        .arg(opts.out.join("cold-start.csv"))
        .arg(opts.out.join("cold-start.png"))
        .status();
    if !plotted.is_ok_and(|s| s.success()) {
        eprintln!("no chart: install python3-matplotlib and run python3 {} CSV PNG", script.display());
    }
    Ok(())
}
