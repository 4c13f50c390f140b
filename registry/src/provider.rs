//! kubelet credential provider plugins, called by clip itself: the `CredentialProviderConfig`
//! file as kubelet reads it (`--image-credential-provider-config`, YAML or JSON) and the exec
//! protocol (`credentialprovider.kubelet.k8s.io/v1`: a `CredentialProviderRequest` on the
//! plugin's stdin, a `CredentialProviderResponse` on its stdout), with kubelet's image matching
//! and cache durations. A lazily served layer reads for as long as its container runs, so a
//! plugin's short-lived token must be renewed by the snapshotter, not only at kubelet's pull.
//!
//! Plugins are trusted node configuration, but their answers are bounded: 1 MiB of output,
//! 30 s per call; their stderr is never logged (it may hold a token), only its length.

use crate::credential::Credential;
use crate::error::{RegistryError, Result};
use crate::reference::Reference;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const API_VERSIONS: &[&str] = &["credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v1beta1"];
const MAX_OUTPUT: usize = 1 << 20;
const CALL_LIMIT: Duration = Duration::from_secs(30);
const MAX_CONFIG: u64 = 1 << 20;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    providers: Vec<ProviderConfig>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderConfig {
    name: String,
    match_images: Vec<String>,
    #[serde(default)]
    default_cache_duration: Option<String>,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    api_version: String,
    kind: String,
    #[serde(default)]
    cache_key_type: Option<String>,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// What a plugin answered, kept for its cache duration.
struct Cached {
    auth: Vec<(String, Credential)>,
    until: Instant,
}

/// The configured plugins and their answers' cache.
pub struct CredentialProviders {
    bin_dir: PathBuf,
    providers: Vec<ProviderConfig>,
    /// By provider index and cache key (`image:<ref>`, `registry:<host>`, `global`).
    cache: parking_lot::Mutex<HashMap<(usize, String), Cached>>,
}

impl std::fmt::Debug for CredentialProviders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
        write!(f, "CredentialProviders({names:?} in {})", self.bin_dir.display())
    }
}

fn config_error(path: &Path, message: impl std::fmt::Display) -> RegistryError {
    RegistryError::Credentials {
        source_name: crate::source::Source::CredentialProvider.name(),
        message: format!("{}: {message}", path.display()),
    }
}

impl CredentialProviders {
    /// Reads kubelet's `CredentialProviderConfig` at `config`; plugins are executables in
    /// `bin_dir` named as the providers.
    pub fn load(config: &Path, bin_dir: &Path) -> Result<Self> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(config)
            .and_then(|f| f.take(MAX_CONFIG).read_to_string(&mut text))
            .map_err(|e| config_error(config, e))?;
        // YAML is a superset of JSON: one parser reads both forms kubelet accepts. Its error
        // names the place, not the text.
        let parsed: ConfigFile = yaml_serde::from_str(&text).map_err(|e| {
            config_error(config, e.location().map_or("invalid".into(), |l| format!("invalid at line {}", l.line())))
        })?;
        for p in &parsed.providers {
            if p.name.is_empty() || p.name.contains('/') || p.name.starts_with('.') {
                return Err(config_error(config, format!("provider name {:?} is not a file name", p.name)));
            }
            if !API_VERSIONS.contains(&p.api_version.as_str()) {
                return Err(config_error(config, format!("provider {}: unknown apiVersion", p.name)));
            }
            if p.match_images.is_empty() {
                return Err(config_error(config, format!("provider {}: no matchImages", p.name)));
            }
            if let Some(d) = &p.default_cache_duration {
                parse_go_duration(d)
                    .ok_or_else(|| config_error(config, format!("provider {}: bad duration", p.name)))?;
            }
        }
        Ok(Self { bin_dir: bin_dir.to_path_buf(), providers: parsed.providers, cache: parking_lot::Mutex::default() })
    }

    /// The credential the first matching plugin gives for `image`, and until when it may be
    /// used (its cache duration). Cached answers are reused unless `refresh` (the registry
    /// refused the cached one); a plugin that fails is logged and the next one asked.
    pub async fn credential(&self, image: &Reference, refresh: bool) -> Result<Option<(Credential, Option<Instant>)>> {
        let full = format!("{}/{}", image.registry, image.repository);
        for (n, p) in self.providers.iter().enumerate() {
            if !p.match_images.iter().any(|g| image_matches(g, &full)) {
                continue;
            }
            let keys = [format!("image:{image}"), format!("registry:{}", image.registry), "global".to_string()];
            let cached = {
                let mut cache = self.cache.lock();
                if refresh {
                    for k in &keys {
                        cache.remove(&(n, k.clone()));
                    }
                }
                keys.iter()
                    .filter_map(|k| cache.get(&(n, k.clone())))
                    .find(|c| c.until > Instant::now())
                    .map(|c| (best(&c.auth, &full), c.until))
            };
            let (credential, until) = match cached {
                Some(hit) => hit,
                None => match self.call(p, image).await {
                    Ok(Some((auth, key, until))) => {
                        let credential = best(&auth, &full);
                        if let Some(until) = until {
                            self.cache.lock().insert((n, key), Cached { auth, until });
                        }
                        (credential, until.unwrap_or_else(Instant::now))
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(provider = %p.name, error = %e, "credential provider plugin failed");
                        continue;
                    }
                },
            };
            if let Some(c) = credential {
                return Ok(Some((c, Some(until))));
            }
        }
        Ok(None)
    }

    /// Runs plugin `p` for `image`: its answer, cache key and cache expiry (`None`: not cached).
    async fn call(
        &self,
        p: &ProviderConfig,
        image: &Reference,
    ) -> Result<Option<(Vec<(String, Credential)>, String, Option<Instant>)>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let fail = |message: String| RegistryError::Credentials {
            source_name: crate::source::Source::CredentialProvider.name(),
            message: format!("plugin {}: {message}", p.name),
        };
        let request = serde_json::json!({
            "apiVersion": p.api_version, "kind": "CredentialProviderRequest", "image": image.to_string()
        });
        let mut cmd = tokio::process::Command::new(self.bin_dir.join(&p.name));
        cmd.args(&p.args)
            .env_clear()
            // kubelet passes its environment on; clip's own secrets stay here.
            .envs(std::env::vars_os().filter(|(k, _)| {
                let k = k.to_string_lossy();
                !k.starts_with("CLIP_") && k != "COSIGN_PASSWORD"
            }))
            .envs(p.env.iter().map(|e| (e.name.clone(), e.value.clone())))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| fail(format!("cannot run it: {e}")))?;
        let run = async {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(request.to_string().as_bytes()).await.map_err(|e| fail(e.to_string()))?;
            }
            let stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
            let stderr = child.stderr.take().ok_or_else(|| fail("no stderr".into()))?;
            // stderr is counted, never kept: it ends when the plugin does.
            let err_len = tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                tokio::io::copy(&mut stderr.take(MAX_OUTPUT as u64), &mut sink).await.unwrap_or(0)
            });
            let mut out = Vec::new();
            stdout.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut out).await.map_err(|e| fail(e.to_string()))?;
            if out.len() > MAX_OUTPUT {
                let _ = child.kill().await;
                return Err(fail("answered more than 1 MiB".into()));
            }
            let status = child.wait().await.map_err(|e| fail(e.to_string()))?;
            Ok::<_, RegistryError>((status, out, err_len.await.unwrap_or(0)))
        };
        let (status, out, err_len) =
            tokio::time::timeout(CALL_LIMIT, run).await.map_err(|_| fail("no answer within 30 s".into()))??;
        if !status.success() {
            return Err(fail(format!("exited with {status} ({err_len} bytes on stderr, not logged)")));
        }
        let response: Response = serde_json::from_slice(&out)
            .map_err(|e| fail(format!("not a CredentialProviderResponse ({:?})", e.classify())))?;
        if response.kind != "CredentialProviderResponse" || response.api_version != p.api_version {
            return Err(fail("answered another kind or apiVersion".into()));
        }
        let duration = match response.cache_duration.as_deref().or(p.default_cache_duration.as_deref()) {
            Some(d) => parse_go_duration(d).ok_or_else(|| fail("bad cacheDuration".into()))?,
            None => Duration::ZERO,
        };
        let key = match response.cache_key_type.as_deref() {
            Some("Image") => format!("image:{image}"),
            Some("Global") => "global".to_string(),
            Some("Registry") | None => format!("registry:{}", image.registry),
            Some(_) => return Err(fail("unknown cacheKeyType".into())),
        };
        let auth: Vec<(String, Credential)> = response
            .auth
            .into_iter()
            .filter(|(_, a)| !a.username.is_empty() || !a.password.is_empty())
            .map(|(k, a)| (k, Credential::new(a.username, a.password)))
            .collect();
        tracing::info!(provider = %p.name, entries = auth.len(), cache_s = duration.as_secs(), "credential provider plugin answered");
        let until = (!duration.is_zero()).then(|| Instant::now() + duration);
        Ok(Some((auth, key, until)))
    }
}

/// The credential of the most specific `auth` key matching `image` (`registry/repository`).
fn best(auth: &[(String, Credential)], image: &str) -> Option<Credential> {
    auth.iter().filter(|(k, _)| image_matches(k, image)).max_by_key(|(k, _)| k.len()).map(|(_, c)| c.clone())
}

/// kubelet's `URLsMatchStr`: `glob` (`[scheme://]host[:port][/path]`, `*` within a host label)
/// matches `image` (`host[:port]/repository`) when the hosts have as many labels, each label
/// matches, the ports are equal and the glob's path is a prefix of the image's path.
pub fn image_matches(glob: &str, image: &str) -> bool {
    let glob = glob.split_once("://").map_or(glob, |(_, rest)| rest);
    let split = |s: &str| -> (String, String) {
        match s.split_once('/') {
            Some((h, p)) => (h.to_ascii_lowercase(), p.to_string()),
            None => (s.to_ascii_lowercase(), String::new()),
        }
    };
    let ((ghost, gpath), (ihost, ipath)) = (split(glob), split(image));
    let (gname, gport) = crate::hosts::split_host_port(&ghost);
    let (iname, iport) = crate::hosts::split_host_port(&ihost);
    if gport != iport {
        return false;
    }
    let (glabels, ilabels): (Vec<&str>, Vec<&str>) = (gname.split('.').collect(), iname.split('.').collect());
    glabels.len() == ilabels.len()
        && glabels.iter().zip(&ilabels).all(|(g, i)| label_matches(g, i))
        && ipath.starts_with(gpath.trim_end_matches('/'))
}

/// `path.Match` on one host label, with `*` the only wildcard clip accepts.
fn label_matches(glob: &str, label: &str) -> bool {
    match glob.split_once('*') {
        None => glob == label,
        Some((prefix, rest)) => {
            let Some(tail) = label.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| label_matches(rest, &tail[i..]))
        }
    }
}

/// A Go duration (`12h`, `1h30m`, `45s`, `500ms`, `0`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * seconds).ok()?;
    }
    (total > Duration::ZERO).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_match_as_kubelet_matches_them() {
        assert!(image_matches("*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.eu-west-1.amazonaws.com/app"));
        assert!(!image_matches("*.dkr.ecr.*.amazonaws.com", "dkr.ecr.eu-west-1.amazonaws.com/app"));
        assert!(image_matches("registry.io", "registry.io/team/app"));
        assert!(image_matches("https://registry.io/team", "registry.io/team/app"));
        assert!(!image_matches("registry.io/other", "registry.io/team/app"));
        assert!(!image_matches("registry.io", "registry.io:5000/team/app"));
        assert!(image_matches("127.0.0.1:5000", "127.0.0.1:5000/team/app"));
        assert!(!image_matches("*.io", "evil.registry.io/app"));
        assert!(image_matches("gcr*.io", "gcr.io/x"));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("12h"), Some(Duration::from_secs(43200)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration("h"), None);
    }

    fn providers(dir: &Path, script: &str, config: &str) -> CredentialProviders {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        let plugin = bin.join("test-provider");
        std::fs::write(&plugin, script).expect("plugin");
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.join("providers.yaml");
        std::fs::write(&path, config).expect("config");
        CredentialProviders::load(&path, &bin).expect("load")
    }

    const CONFIG: &str = "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: test-provider\n    matchImages: [\"*.example\"]\n    defaultCacheDuration: 10m\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n    env:\n      - {name: WHO, value: plugin}\n";

    #[tokio::test]
    async fn a_plugin_is_called_once_per_cache_duration_and_hostile_answers_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let calls = dir.path().join("calls");
        let script = format!(
            "#!/bin/sh\nread -r request\necho \"$request\" >> {}\nprintf '{{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Registry\",\"auth\":{{\"reg.example\":{{\"username\":\"%s\",\"password\":\"SENTINEL\"}}}}}}' \"$WHO\"\n",
            calls.display()
        );
        let p = providers(dir.path(), &script, CONFIG);
        let image = Reference::parse("reg.example/team/app:1").expect("ref");
        let (c, until) = p.credential(&image, false).await.expect("call").expect("credential");
        assert_eq!((c.username.as_str(), c.password.expose()), ("plugin", "SENTINEL"));
        assert!(until.is_some_and(|u| u > Instant::now() + Duration::from_secs(500)), "default cache duration");
        p.credential(&image, false).await.expect("cached").expect("credential");
        let requests = std::fs::read_to_string(&calls).expect("calls");
        assert_eq!(requests.lines().count(), 1, "cached for the default duration: {requests}");
        p.credential(&image, true).await.expect("refreshed").expect("credential");
        let requests = std::fs::read_to_string(&calls).expect("calls");
        assert_eq!(requests.lines().count(), 2, "a refused answer is asked for again: {requests}");
        assert!(requests.contains("CredentialProviderRequest") && requests.contains("reg.example/team/app:1"));
        assert!(p.credential(&Reference::parse("other.io/x").expect("ref"), false).await.expect("no match").is_none());

        // Hostile plugins: endless output, a wrong kind, a failure — refused, never a panic.
        for (script, what) in [
            ("#!/bin/sh\nyes SENTINEL\n", "endless"),
            ("#!/bin/sh\necho '{\"apiVersion\":\"x\",\"kind\":\"Other\"}'\n", "kind"),
            ("#!/bin/sh\necho SENTINEL >&2\nexit 3\n", "failure"),
        ] {
            let d = tempfile::tempdir().expect("tmp");
            let p = providers(d.path(), script, CONFIG);
            let got = p.credential(&image, false).await.expect("no error: next provider");
            assert!(got.is_none(), "{what}");
        }
    }

    #[test]
    fn a_bad_config_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("p.yaml");
        for text in [
            "providers:\n  - name: ../../bin/sh\n    matchImages: [x]\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
            "providers: [ {SENTINEL",
        ] {
            std::fs::write(&path, text).expect("write");
            let e = CredentialProviders::load(&path, dir.path()).expect_err("refused");
            assert!(!e.to_string().contains("SENTINEL"), "{e}");
        }
    }
}
