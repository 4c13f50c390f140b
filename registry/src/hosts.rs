//! Registry host configuration in containerd's `hosts.toml` format
//! (`<hosts_dir>/<host[:port]>/hosts.toml`, else `<hosts_dir>/_default/hosts.toml`):
//!
//! ```toml
//! server = "https://registry.example.com"     # the upstream; default https://<host>
//! [host."http://mirror.local:5000"]           # mirrors, tried first, in file order
//!   capabilities = ["pull", "resolve"]
//!   ca = "/etc/certs/mirror-ca.pem"           # or a list
//!   skip_verify = false
//!   override_path = false                     # true: the URL already ends in the API path
//!   [host."http://mirror.local:5000".header]
//!     x-custom = "value"
//! ```

use crate::error::{RegistryError, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What an endpoint may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
}

impl Capabilities {
    pub const ALL: Self = Self { pull: true, resolve: true, push: true };
}

/// One place to send requests for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base of the API, e.g. `https://host:5000/v2` (no trailing slash).
    pub api_base: String,
    /// `host[:port]` of the endpoint (for logs, auth caches and errors).
    pub host: String,
    pub capabilities: Capabilities,
    pub ca_files: Vec<PathBuf>,
    pub skip_verify: bool,
    pub headers: BTreeMap<String, String>,
    /// An `https` endpoint that is retried over plain HTTP when TLS fails (containerd's
    /// default for loopback registries on a port other than 443 and 80).
    pub http_fallback: bool,
    /// The registry's own endpoint by default (no `hosts.toml` configures it): the one a
    /// client's `--plain-http` for this registry changes to plain HTTP.
    pub unconfigured: bool,
    /// A `[host]` of `hosts.toml`, tried before the registry: as containerd does, it is sent
    /// only credentials configured for its own host, and requests name the registry (`ns=`).
    pub mirror: bool,
}

impl Endpoint {
    /// TLS settings that select an HTTP client.
    pub fn tls_key(&self) -> (Vec<PathBuf>, bool) {
        (self.ca_files.clone(), self.skip_verify)
    }
}

/// Where host configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct HostsConfig {
    /// containerd's `certs.d`-style directory, if any.
    pub dir: Option<PathBuf>,
    /// Use plain HTTP for registries without configuration (`--plain-http`).
    pub plain_http: bool,
}

/// How containerd reaches a loopback registry (`localhost`, 127.0.0.0/8, `::1`) that no
/// `hosts.toml` configures (`remotes/docker/config.ConfigureHosts`): HTTPS without verification,
/// falling back to plain HTTP when TLS fails, except on port 443 or no port (HTTPS only) and on
/// port 80 (HTTP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopbackDefault {
    Https,
    Http,
    HttpsThenHttp,
}

/// Whether `registry` (`host[:port]`) is on this machine: `localhost`, 127.0.0.0/8 or `::1`.
pub fn is_loopback(registry: &str) -> bool {
    let (host, _) = split_host_port(registry);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl LoopbackDefault {
    fn of(registry: &str) -> Option<Self> {
        if !is_loopback(registry) {
            return None;
        }
        let (_, port) = split_host_port(registry);
        Some(match port {
            None | Some("443") => Self::Https,
            Some("80") => Self::Http,
            Some(_) => Self::HttpsThenHttp,
        })
    }
}

/// `host[:port]`, `[v6]:port` or a bare IPv6 address, split.
pub fn split_host_port(registry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = registry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':')),
            None => (registry, None),
        };
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (registry, None),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    header: BTreeMap<String, HeaderValue>,
    #[serde(default)]
    override_path: Option<bool>,
    /// `[host."URL"]` tables, in file order (mirrors are tried in that order).
    #[serde(default)]
    host: toml::Table,
    // containerd keys we accept and do not use.
    #[serde(default)]
    #[serde(rename = "client")]
    _client: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    header: BTreeMap<String, HeaderValue>,
    #[serde(default)]
    override_path: Option<bool>,
    #[serde(default)]
    #[serde(rename = "client")]
    _client: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HeaderValue {
    One(String),
    Many(Vec<String>),
}

impl HostsConfig {
    /// The endpoints for `registry` (normalised `host[:port]`), mirrors first, the server last.
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>> {
        let default_host = if registry == crate::reference::DOCKER_HUB { "registry-1.docker.io" } else { registry };
        let loopback = LoopbackDefault::of(registry);
        let scheme = match loopback {
            _ if self.plain_http => "http",
            Some(LoopbackDefault::Http) => "http",
            _ => "https",
        };
        let default = Endpoint {
            api_base: format!("{scheme}://{default_host}/v2"),
            host: default_host.to_string(),
            capabilities: Capabilities::ALL,
            ca_files: Vec::new(),
            skip_verify: loopback.is_some() && scheme == "https",
            headers: BTreeMap::new(),
            http_fallback: loopback == Some(LoopbackDefault::HttpsThenHttp) && !self.plain_http,
            unconfigured: true,
            mirror: false,
        };
        let Some(file) = self.find_file(registry) else {
            return Ok(vec![default]);
        };
        let text = std::fs::read_to_string(&file)
            .map_err(|e| RegistryError::HostsConfig { path: file.display().to_string(), message: e.to_string() })?;
        parse_hosts(&text, &file, default)
    }

    fn find_file(&self, registry: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        [registry, "_default"].iter().map(|d| dir.join(d).join("hosts.toml")).find(|p| p.is_file())
    }
}

fn parse_hosts(text: &str, file: &Path, default: Endpoint) -> Result<Vec<Endpoint>> {
    let err = |message: String| RegistryError::HostsConfig { path: file.display().to_string(), message };
    let parsed: HostsFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    let base_dir = file.parent().unwrap_or(Path::new("/"));
    let resolve_ca = |ca: Option<OneOrMany>| -> Vec<PathBuf> {
        let list = match ca {
            None => Vec::new(),
            Some(OneOrMany::One(p)) => vec![p],
            Some(OneOrMany::Many(v)) => v,
        };
        list.into_iter().map(|p| if p.is_absolute() { p } else { base_dir.join(p) }).collect()
    };
    let caps = |c: Option<Vec<String>>| -> Result<Capabilities> {
        let Some(list) = c else {
            return Ok(Capabilities::ALL);
        };
        let mut out = Capabilities::default();
        for cap in list {
            match cap.as_str() {
                "pull" => out.pull = true,
                "resolve" => out.resolve = true,
                "push" => out.push = true,
                other => return Err(err(format!("unknown capability {other:?}"))),
            }
        }
        Ok(out)
    };
    let headers = |h: BTreeMap<String, HeaderValue>| -> BTreeMap<String, String> {
        h.into_iter()
            .map(|(k, v)| {
                let v = match v {
                    HeaderValue::One(s) => s,
                    HeaderValue::Many(v) => v.join(", "),
                };
                (k, v)
            })
            .collect()
    };
    let endpoint = |url: &str, override_path: bool| -> Result<(String, String)> {
        let u = url::Url::parse(url).map_err(|e| err(format!("bad URL {url:?}: {e}")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(err(format!("URL {url:?} must be http or https")));
        }
        let host = match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => return Err(err(format!("URL {url:?} has no host"))),
        };
        let base = url.trim_end_matches('/');
        let api = if override_path || base.ends_with("/v2") { base.to_string() } else { format!("{base}/v2") };
        Ok((api, host))
    };
    let registry_host = default.host.clone();
    let mut out = Vec::new();
    for (url, h) in parsed.host {
        let h: HostEntry = h.try_into().map_err(|e: toml::de::Error| err(format!("[host.\"{url}\"]: {e}")))?;
        let (api_base, host) = endpoint(&url, h.override_path.unwrap_or(false))?;
        out.push(Endpoint {
            api_base,
            host,
            capabilities: caps(h.capabilities)?,
            ca_files: resolve_ca(h.ca),
            skip_verify: h.skip_verify.unwrap_or(false),
            headers: headers(h.header),
            http_fallback: false,
            unconfigured: false,
            mirror: true,
        });
    }
    let server = match parsed.server {
        Some(s) => {
            let (api_base, host) = endpoint(&s, parsed.override_path.unwrap_or(false))?;
            Endpoint { api_base, host, ..default }
        }
        None => default,
    };
    let server = Endpoint {
        capabilities: caps(parsed.capabilities)?,
        ca_files: resolve_ca(parsed.ca),
        skip_verify: parsed.skip_verify.unwrap_or(false),
        headers: headers(parsed.header),
        http_fallback: false,
        unconfigured: false,
        ..server
    };
    // A `[host]` on the registry's or the server's own host is no mirror: credentials go by
    // host, as containerd's resolver chooses them.
    for e in &mut out {
        e.mirror = e.host != registry_host && e.host != server.host;
    }
    // A `[host]` entry for the server's own URL configures the server; do not try it twice.
    if !out.iter().any(|e| e.api_base == server.api_base) {
        out.push(server);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_first_then_server_with_tls_settings() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().join("reg.example:5000");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join("hosts.toml"),
            r#"
server = "https://reg.example:5000"
ca = "ca.pem"
[host."http://127.0.0.1:6000"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."http://127.0.0.1:6000".header]
    x-mirror = "yes"
"#,
        )
        .expect("write");
        let cfg = HostsConfig { dir: Some(dir.path().to_path_buf()), plain_http: false };
        let eps = cfg.endpoints("reg.example:5000").expect("parse");
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].api_base, "http://127.0.0.1:6000/v2");
        assert!(eps[0].capabilities.pull && !eps[0].capabilities.push);
        assert_eq!(eps[0].headers.get("x-mirror").map(String::as_str), Some("yes"));
        assert_eq!(eps[1].api_base, "https://reg.example:5000/v2");
        assert_eq!(eps[1].ca_files, vec![d.join("ca.pem")]);
        // The mirror is one (credentials by host); the server is not.
        assert!(eps[0].mirror && !eps[1].mirror);
        // No file: https by default, http with plain_http.
        let eps = cfg.endpoints("other.example").expect("default");
        assert_eq!(eps[0].api_base, "https://other.example/v2");
        let plain = HostsConfig { dir: None, plain_http: true };
        assert_eq!(plain.endpoints("docker.io").expect("hub")[0].api_base, "http://registry-1.docker.io/v2");
    }

    #[test]
    fn loopback_registries_default_as_in_containerd() {
        let cfg = HostsConfig::default();
        let ep = |r: &str| cfg.endpoints(r).expect("default").remove(0);
        for r in ["127.0.0.1:5000", "localhost:5000", "127.9.9.9:1234", "[::1]:5000"] {
            let e = ep(r);
            assert_eq!(e.api_base, format!("https://{r}/v2"), "{r}");
            assert!(e.http_fallback && e.skip_verify, "{r}");
        }
        let e = ep("localhost");
        assert!(e.api_base.starts_with("https://") && !e.http_fallback && e.skip_verify);
        assert!(ep("127.0.0.1:443").api_base.starts_with("https://"));
        let e = ep("127.0.0.1:80");
        assert!(e.api_base.starts_with("http://") && !e.http_fallback);
        for r in ["registry.example:5000", "10.0.0.1:5000", "localhost.example:5000"] {
            let e = ep(r);
            assert!(e.api_base.starts_with("https://") && !e.http_fallback && !e.skip_verify, "{r}");
        }
        let plain = HostsConfig { dir: None, plain_http: true };
        let e = plain.endpoints("127.0.0.1:5000").expect("plain").remove(0);
        assert!(e.api_base.starts_with("http://") && !e.http_fallback);
    }

    #[test]
    fn mirrors_keep_file_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().join("_default");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join("hosts.toml"),
            "[host.\"http://zz-first:1\"]\n[host.\"http://aa-second:2\"]\n[host.\"http://mm-third:3\"]\n",
        )
        .expect("write");
        let cfg = HostsConfig { dir: Some(dir.path().to_path_buf()), plain_http: false };
        let eps = cfg.endpoints("x.example").expect("parse");
        let hosts: Vec<&str> = eps.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, ["zz-first:1", "aa-second:2", "mm-third:3", "x.example"]);
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().join("_default");
        std::fs::create_dir_all(&d).expect("mkdir");
        for bad in ["server = 5", "[host.\"ftp://x\"]", "[host.\"http://x\"]\ncapabilities=[\"fly\"]", "bogus = 1"] {
            std::fs::write(d.join("hosts.toml"), bad).expect("write");
            let cfg = HostsConfig { dir: Some(dir.path().to_path_buf()), plain_http: false };
            let e = cfg.endpoints("any.example").expect_err(bad);
            assert!(e.to_string().contains("hosts.toml"), "{e}");
        }
    }
}
