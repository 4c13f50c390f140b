//! `clip-builder build`: the build-time path of the seed system. `buildah bud` with the build
//! registry token in a temporary authfile (0600 in a 0700 directory, removed afterwards, never
//! on a command line), `buildah push` to the build registry (digest recorded), then the
//! image's CLIP index built from the pushed image with the same token and published, and the
//! image-to-location mapping recorded in the state directory.

use crate::publish::{self, ImageIndexed};
use anyhow::{Context, Result, bail};
use clip_config::BuilderConfig;
use clip_registry::credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain, Source};
use clip_registry::{HostsConfig, Platform, Reference, RegistryClient, TokenMinter};
use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// How long `--profile-cmd` may run.
const PROFILE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub reference: String,
    pub containerfile: Option<PathBuf>,
    pub build_args: Vec<String>,
    pub platform: Option<String>,
    pub context: PathBuf,
    /// The BuildRegistryCreds; minted from the config when absent.
    pub build_registry_creds: Option<Credential>,
    /// Credentials of a `FROM` image's registry, written for that registry only.
    pub source_image_creds: Option<SourceImageCreds>,
    pub span_size: u64,
    /// Record and publish the access profile of this command's run in the built image.
    pub profile_cmd: Option<String>,
    /// Sign the index artifact with this key.
    pub sign_key: Option<std::sync::Arc<clip_trust::SignKey>>,
}

/// Credentials for the registry of a custom base image (the `FROM` image).
#[derive(Debug, Clone)]
pub struct SourceImageCreds {
    /// The registry (`host[:port]`) they were given for; no other registry receives them.
    pub registry: String,
    pub credential: Credential,
}

/// What `clip-builder build` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub image: String,
    pub manifest_digest: String,
    pub index_digest: String,
    pub build_seconds: f64,
    pub push_seconds: f64,
    pub index_seconds: f64,
    pub index: ImageIndexed,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The access profile recorded with `--profile-cmd`.
    pub profile: Option<crate::profile::ProfileReport>,
}

/// Registries named by the `FROM` lines of a Containerfile (for source image credentials).
pub fn from_registries(containerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in containerfile.lines() {
        let mut words = line.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            continue;
        }
        let image = words.find(|w| !w.starts_with("--"));
        if let Some(r) = image.and_then(|i| Reference::parse(i).ok())
            && !out.contains(&r.registry)
        {
            out.push(r.registry);
        }
    }
    out
}

/// Replaces every occurrence of the secrets in `text` (buildah's output may echo them).
fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "<redacted>");
    }
    out
}

/// What buildah may inherit of the builder's environment. Nothing else passes: the builder's
/// own secrets (`CLIP_BUILD_REGISTRY_CREDS`, `COSIGN_PASSWORD`, a caller's tokens) stay here.
const BUILDAH_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_",
    "TERM",
    "XDG_",
    "CONTAINERS_",
    "BUILDAH_",
    "STORAGE_",
    "TZ",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

fn buildah(cfg: &BuilderConfig) -> Command {
    let mut c = Command::new("buildah");
    c.env_clear();
    for (k, v) in std::env::vars_os() {
        let name = k.to_string_lossy();
        let passes = BUILDAH_ENV.iter().any(|p| if p.ends_with('_') { name.starts_with(p) } else { name == *p });
        if passes {
            c.env(&k, v);
        }
    }
    if let Some(root) = &cfg.storage_root {
        c.arg("--root").arg(root);
    }
    if let Some(run) = &cfg.runroot {
        c.arg("--runroot").arg(run);
    }
    if let Some(d) = &cfg.storage_driver {
        c.arg("--storage-driver").arg(d);
    }
    c
}

/// Runs buildah, passing its output on to stderr line by line with the secrets redacted (its
/// own progress lines: pulled and pushed blobs), and keeping the tail for an error message.
fn run_buildah(mut cmd: Command, what: &str, secrets: &[&str]) -> Result<()> {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run buildah ({e}); is it installed (apt install buildah)?"))?;
    let owned: Vec<String> = secrets.iter().map(ToString::to_string).collect();
    let tail = std::sync::Arc::new(parking_lot::Mutex::new(std::collections::VecDeque::<String>::new()));
    let pump = |stream: Box<dyn std::io::Read + Send>| {
        let (owned, tail) = (owned.clone(), tail.clone());
        std::thread::spawn(move || {
            let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
            for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                let line = redact(&line, &refs);
                eprintln!("buildah: {line}");
                let mut t = tail.lock();
                t.push_back(line);
                if t.len() > 40 {
                    t.pop_front();
                }
            }
        })
    };
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(pump(Box::new(out)));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(pump(Box::new(err)));
    }
    let status = child.wait()?;
    for p in pumps {
        let _ = p.join();
    }
    if !status.success() {
        let t = tail.lock();
        let text: Vec<&str> = t.iter().map(String::as_str).collect();
        bail!("buildah {what} failed ({status}):\n{}", text.join("\n"));
    }
    Ok(())
}

/// Writes the authfile: `{"auths": {host: {"auth": base64(user:pass)}}}`, mode 0600.
fn write_authfile(path: &Path, entries: &[(String, &Credential)]) -> Result<()> {
    use base64::Engine;
    let mut auths = serde_json::Map::new();
    for (host, c) in entries {
        let raw = format!("{}:{}", c.username, c.password.expose());
        auths
            .insert(host.clone(), serde_json::json!({ "auth": base64::engine::general_purpose::STANDARD.encode(raw) }));
    }
    let mut f = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(path)?;
    f.write_all(serde_json::to_string(&serde_json::json!({ "auths": auths }))?.as_bytes())?;
    Ok(())
}

pub async fn build(cfg: &BuilderConfig, req: &BuildRequest) -> Result<BuildReport> {
    let br = cfg.build_registry.as_ref().context("the config has no [build_registry] section")?;
    let image = Reference::parse(&req.reference)?;
    let scope = BuildRegistryScope::new(&br.registry, &br.repository);
    if !scope.covers(&image) {
        bail!("{image} is not in the build registry {}/{}", scope.registry, scope.repository_prefix);
    }
    let token = match &req.build_registry_creds {
        Some(c) => {
            tracing::info!(
                source = Source::BuildRegistryCreds.name(),
                "pushing and indexing with the given build registry token"
            );
            c.clone()
        }
        None => {
            let creds = br
                .credentials
                .as_ref()
                .context("no build registry token given and no [build_registry.credentials] to mint one")?;
            tracing::info!(
                source = Source::MintedBuildRegistryToken.name(),
                "pushing and indexing with a token minted from the config"
            );
            TokenMinter::from_config(creds).await?.credential(false).await?
        }
    };
    let secrets: Vec<&str> =
        [Some(token.password.expose()), req.source_image_creds.as_ref().map(|c| c.credential.password.expose())]
            .into_iter()
            .flatten()
            .collect();

    // The private working directory: authfile, CA, digest file. Removed on every path out.
    let work = tempfile::Builder::new().prefix("clip-build-").tempdir().context("temporary directory")?;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o700))?;
    let authfile = work.path().join("auth.json");
    let containerfile = req.containerfile.clone().unwrap_or_else(|| req.context.join("Containerfile"));
    let containerfile = if containerfile.exists() { containerfile } else { req.context.join("Dockerfile") };
    let text =
        std::fs::read_to_string(&containerfile).with_context(|| format!("reading {}", containerfile.display()))?;
    let mut auth_entries = vec![(image.registry.clone(), &token)];
    if let Some(src) = &req.source_image_creds {
        let registry = clip_registry::reference::normalize_registry(&src.registry);
        if registry == image.registry {
            bail!("the source image credentials are for {registry}, the build registry, which gets the build token");
        }
        // `from_registries` gives normalised hosts (`Reference::parse`).
        if !from_registries(&text).contains(&registry) {
            tracing::warn!(registry, "no FROM line of the Containerfile names the source image credentials' registry");
        }
        auth_entries.push((registry, &src.credential));
    }
    write_authfile(&authfile, &auth_entries)?;
    let cert_dir = match &br.ca_file {
        Some(ca) => {
            let d = work.path().join("certs");
            std::fs::create_dir(&d)?;
            std::fs::copy(ca, d.join("ca.crt")).with_context(|| format!("reading CA {}", ca.display()))?;
            Some(d)
        }
        None => None,
    };
    let tls = |c: &mut Command| {
        c.arg("--authfile").arg(&authfile);
        if let Some(d) = &cert_dir {
            c.arg("--cert-dir").arg(d);
        }
        if br.insecure {
            c.arg("--tls-verify=false");
        }
    };

    let started = Instant::now();
    let mut bud = buildah(cfg);
    bud.args(["bud", "--layers", "--format", "oci"]);
    tls(&mut bud);
    bud.arg("-f").arg(&containerfile).arg("-t").arg(image.to_string());
    for a in &req.build_args {
        bud.arg("--build-arg").arg(a);
    }
    if let Some(p) = &req.platform {
        bud.arg("--platform").arg(p);
    }
    bud.arg(&req.context);
    tracing::info!(image = %image, "buildah bud");
    run_buildah(bud, "bud", &secrets)?;
    let build_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let digestfile = work.path().join("digest");
    let mut push = buildah(cfg);
    push.arg("push");
    tls(&mut push);
    push.arg("--digestfile").arg(&digestfile).arg(image.to_string()).arg(format!("docker://{image}"));
    tracing::info!(image = %image, "buildah push");
    run_buildah(push, "push", &secrets)?;
    let digest = std::fs::read_to_string(&digestfile).context("buildah wrote no digest")?.trim().to_string();
    let push_seconds = started.elapsed().as_secs_f64();

    // Index the pushed image with the same token.
    let started = Instant::now();
    let hosts = match (&cfg.registry.hosts_dir, &br.ca_file) {
        (Some(d), _) => HostsConfig { dir: Some(d.clone()), plain_http: br.insecure },
        (None, ca) => {
            let d = work.path().join("certs.d");
            let host_dir = d.join(&image.registry);
            std::fs::create_dir_all(&host_dir)?;
            let scheme = if br.insecure { "http" } else { "https" };
            let mut toml = format!("server = \"{scheme}://{}\"\n", image.registry);
            if let Some(ca) = ca {
                let _ = writeln!(toml, "ca = \"{}\"", ca.display());
            }
            std::fs::write(host_dir.join("hosts.toml"), toml)?;
            HostsConfig { dir: Some(d), plain_http: br.insecure }
        }
    };
    let client = RegistryClient::new(hosts);
    let chain =
        CredentialChain::for_image(&image, &ChainInputs { image_creds: Some(token.clone()), ..Default::default() });
    let repo = Arc::new(client.repository(&image, chain)?.for_push());
    let platform = match &req.platform {
        Some(p) => Platform::parse(p).with_context(|| format!("bad --platform {p:?}"))?,
        None => Platform::default(),
    };
    let opts = publish::IndexOptions {
        span_size: req.span_size,
        cache_dir: cfg.state_dir.as_ref().map(|d| d.join("indexes")),
        sign_key: req.sign_key.clone(),
        ..Default::default()
    };
    let indexed = publish::index_image(repo.clone(), &digest, &platform, &opts).await?;
    let index_seconds = started.elapsed().as_secs_f64();
    let profile = match &req.profile_cmd {
        Some(cmd) => Some(
            crate::profile::record_and_publish(repo, &digest, &platform, cmd, PROFILE_LIMIT)
                .await
                .context("recording the access profile")?,
        ),
        None => None,
    };
    drop(work); // the authfile goes with it

    if let Some(state) = &cfg.state_dir {
        record(state, &image, &indexed).with_context(|| format!("recording the image in {}", state.display()))?;
    }
    Ok(BuildReport {
        image: image.with_digest(&digest).to_string(),
        manifest_digest: digest,
        index_digest: indexed.index_digest.clone(),
        build_seconds,
        push_seconds,
        index_seconds,
        labels: indexed.labels.clone(),
        index: indexed,
        profile,
    })
}

/// The image reference cache: `images.json` in the state directory, reference -> location.
fn record(state: &Path, image: &Reference, indexed: &ImageIndexed) -> Result<()> {
    std::fs::create_dir_all(state)?;
    let path = state.join("images.json");
    let mut all: serde_json::Map<String, serde_json::Value> = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(_) => serde_json::Map::new(),
    };
    all.insert(
        image.to_string(),
        serde_json::json!({
            "image": indexed.image,
            "manifest_digest": indexed.manifest_digest,
            "index_digest": indexed.index_digest,
            "recorded_at": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }),
    );
    clip_fsutil::atomic_write(&path, &serde_json::to_vec_pretty(&all)?, 0o644, clip_fsutil::Durability::Durable)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_lines_and_redaction() {
        let cf = "FROM --platform=linux/amd64 reg.example:5000/base/app:1 AS b\nRUN x\nfrom docker.io/library/busybox\nFROM b\n";
        assert_eq!(from_registries(cf), vec!["reg.example:5000".to_string(), "docker.io".to_string()]);
        assert_eq!(redact("auth Secret-xyz failed", &["Secret-xyz"]), "auth <redacted> failed");
    }
}
