//! The HTTP machinery: one reqwest client per TLS configuration (connection reuse, HTTP/2
//! when offered), and per repository the request loop — endpoints (mirrors first), retries
//! with backoff on 5xx/429/resets/timeouts, auth challenges answered by the session's
//! [`Auth`](crate::auth) (per endpoint host, along the credential chain), and redirects to
//! object stores followed *without* `Authorization`, their final URL cached per blob.

pub(crate) use crate::answer::backoff;
use crate::answer::{check_status, host_port, is_unreachable};
use crate::auth::{Auth, Walk};
use crate::challenge;
use crate::credentials::CredentialChain;
pub use crate::error::error_text;
use crate::error::{RegistryError, Result};
use crate::hosts::{Endpoint, HostsConfig};
pub(crate) use crate::op::FromMirror;
pub use crate::op::Op;
use crate::reference::Reference;
use crate::secret::Secret;
use reqwest::header::{AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Retries of one request on transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// First backoff; doubled each time, with jitter, capped at 5 s.
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { retries: 4, base_delay: Duration::from_millis(100) }
    }
}

/// Timeouts of one request.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Whole request including the body (a whole blob read as a stream: [`crate::op::Op::long_body`]),
    /// and the longest wait for any piece of a body.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(10), request: Duration::from_secs(60) }
    }
}

/// Shared by every repository: HTTP clients and host configuration.
#[derive(Debug)]
pub struct RegistryClient {
    pub hosts: HostsConfig,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
    clients: parking_lot::Mutex<HashMap<(Vec<PathBuf>, bool), reqwest::Client>>,
    /// Registries reached over plain HTTP where no `hosts.toml` says otherwise: hosts of
    /// [`Endpoint::http_fallback`] endpoints that answered plain HTTP, not TLS, and those a
    /// client asked for with `--plain-http` ([`Self::use_plain_http`]).
    plain_hosts: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl RegistryClient {
    pub fn new(hosts: HostsConfig) -> Arc<Self> {
        Self::with_policy(hosts, RetryPolicy::default(), Timeouts::default())
    }

    pub fn with_policy(hosts: HostsConfig, retry: RetryPolicy, timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            hosts,
            retry,
            timeouts,
            clients: parking_lot::Mutex::new(HashMap::new()),
            plain_hosts: parking_lot::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// A session on one repository with the credential chain of its image.
    pub fn repository(self: &Arc<Self>, image: &Reference, chain: CredentialChain) -> Result<Repository> {
        let endpoints = self.hosts.endpoints(&image.registry)?;
        Ok(Repository {
            client: self.clone(),
            image: image.clone(),
            endpoints,
            auth: Auth::new(image.clone(), chain),
            redirects: parking_lot::Mutex::new(HashMap::new()),
            warming: parking_lot::Mutex::new(HashMap::new()),
            set_aside: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// Reaches `registry` (`host[:port]`) over plain HTTP from now on, unless a `hosts.toml`
    /// configures it (`clip-snapshotter pull --plain-http`).
    pub fn use_plain_http(&self, registry: &str) {
        self.plain_hosts.lock().insert(registry.to_string());
    }

    /// The API base of `endpoint` as it answers: plain HTTP once a fallback endpoint did, or
    /// for an unconfigured registry a client asked plain HTTP for.
    fn api_base(&self, endpoint: &Endpoint) -> String {
        // Fallback endpoints are unconfigured ones (the loopback default), so this covers both.
        if endpoint.unconfigured
            && self.is_plain(&endpoint.host)
            && let Some(rest) = endpoint.api_base.strip_prefix("https://")
        {
            return format!("http://{rest}");
        }
        endpoint.api_base.clone()
    }

    fn is_plain(&self, host: &str) -> bool {
        self.plain_hosts.lock().contains(host)
    }

    /// After a failed TLS connection to a fallback endpoint: whether to try plain HTTP (once
    /// per host; every later request goes there directly).
    fn fall_back_to_http(&self, endpoint: &Endpoint, e: &reqwest::Error) -> bool {
        // As containerd's httpFallback: a TLS failure, not a registry that is down.
        if !endpoint.http_fallback || !e.is_connect() || is_unreachable(e) {
            return false;
        }
        let first = self.plain_hosts.lock().insert(endpoint.host.clone());
        if first {
            tracing::info!(registry = %endpoint.host, "loopback registry does not speak TLS; using plain HTTP");
        }
        first
    }

    fn http(&self, endpoint: &Endpoint) -> Result<reqwest::Client> {
        let key = endpoint.tls_key();
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let err = |message: String| RegistryError::Transport {
            registry: endpoint.host.clone(),
            context: "building the HTTP client".into(),
            message,
        };
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.timeouts.connect)
            .timeout(self.timeouts.request)
            .read_timeout(self.timeouts.request)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("clip/", env!("CARGO_PKG_VERSION")));
        let mut certs = Vec::new();
        for ca in &endpoint.ca_files {
            let pem = std::fs::read(ca).map_err(|e| err(format!("reading CA {}: {e}", ca.display())))?;
            certs.extend(crate::tls::parse_pem_bundle(&pem).map_err(|e| err(format!("CA {}: {e}", ca.display())))?);
        }
        if endpoint.skip_verify {
            b = b.tls_danger_accept_invalid_certs(true);
        } else if !certs.is_empty() {
            b = b.tls_backend_preconfigured(crate::tls::client_config(certs).map_err(|e| err(e.to_string()))?);
        }
        let c = b.build().map_err(|e| err(e.to_string()))?;
        clients.insert(key, c.clone());
        Ok(c)
    }
}

/// One repository of one registry, with its credential chain and auth state.
pub struct Repository {
    client: Arc<RegistryClient>,
    pub image: Reference,
    endpoints: Vec<Endpoint>,
    auth: Auth,
    redirects: parking_lot::Mutex<HashMap<String, (String, Instant)>>,
    /// Blobs a pull-through mirror is still fetching from upstream (it answered a range with
    /// the whole blob): their ranges go to the registry itself until the instant, then the
    /// mirror is asked again, and the wait doubles (up to a minute).
    pub(crate) warming: parking_lot::Mutex<HashMap<String, (Instant, Duration)>>,
    /// Mirrors that refused or failed (401/403 with no credentials of their own, 5xx,
    /// unreachable), by host: skipped until the instant; the wait doubles while they keep
    /// failing.
    set_aside: parking_lot::Mutex<HashMap<String, (Instant, Duration)>>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({})", self.image)
    }
}

/// How long a mirror that failed is first left alone, and the longest (the wait doubles).
const MIRROR_SET_ASIDE: Duration = Duration::from_secs(30);
const MIRROR_SET_ASIDE_MAX: Duration = Duration::from_secs(600);

/// How long a cached redirect URL (often a pre-signed object store URL) is reused.
const REDIRECT_TTL: Duration = Duration::from_secs(300);

impl Repository {
    /// The sources of the credentials this session may send, in the order it tries them.
    pub fn credential_sources(&self) -> Vec<crate::credentials::Source> {
        self.auth.chain().candidates.iter().map(crate::credentials::Candidate::source).collect()
    }

    /// Request push access in token scopes (for publishing).
    pub fn for_push(mut self) -> Self {
        self.auth.push = true;
        self
    }

    fn registry(&self) -> &str {
        &self.image.registry
    }

    pub(crate) fn client_retry(&self) -> RetryPolicy {
        self.client.retry
    }

    /// Sends `op`, trying endpoints in order (mirrors first). Returns the final response with
    /// a success or 404/416 status; every other status is an error.
    pub async fn send(&self, op: &Op) -> Result<reqwest::Response> {
        let usable: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| {
                if op.push || self.auth.push && op.method != Method::GET && op.method != Method::HEAD {
                    e.capabilities.push
                } else {
                    e.capabilities.pull || e.capabilities.resolve
                }
            })
            .collect();
        let Some((last, mirrors)) = usable.split_last() else {
            return Err(RegistryError::HostsConfig {
                path: self.registry().to_string(),
                message: "no endpoint has the needed capability".into(),
            });
        };
        let mut mirror_error = None;
        let mirrors = if op.skip_mirrors { &[] } else { mirrors };
        for mirror in mirrors {
            if self.is_set_aside(&mirror.host) {
                continue;
            }
            match Box::pin(self.send_with_retries(mirror, op)).await {
                Ok(mut r) if r.status() != StatusCode::NOT_FOUND => {
                    self.set_aside.lock().remove(&mirror.host);
                    r.extensions_mut().insert(FromMirror);
                    return Ok(r);
                }
                Ok(_) => tracing::debug!(mirror = %mirror.host, path = %op.path, "mirror has no such content"),
                Err(e) => {
                    let wait = self.set_mirror_aside(&mirror.host);
                    tracing::warn!(mirror = %mirror.host, error = %e, wait_s = wait.as_secs(), "mirror failed; left alone for a while, trying the next endpoint");
                    if !e.is_transient() && mirror_error.is_none() {
                        mirror_error = Some(e);
                    }
                }
            }
        }
        // Boxed: keeps the futures of callers shallow (rustc's layout depth limit).
        match Box::pin(self.send_with_retries(last, op)).await {
            // The upstream is unreachable: a mirror's definite answer says more.
            Err(e) if e.is_transient() => Err(mirror_error.unwrap_or(e)),
            other => other,
        }
    }

    fn is_set_aside(&self, host: &str) -> bool {
        self.set_aside.lock().get(host).is_some_and(|(until, _)| Instant::now() < *until)
    }

    /// Leaves a failing mirror alone for a while (doubling each time it fails again).
    fn set_mirror_aside(&self, host: &str) -> Duration {
        let mut aside = self.set_aside.lock();
        let wait = aside.get(host).map_or(MIRROR_SET_ASIDE, |(_, w)| (*w * 2).min(MIRROR_SET_ASIDE_MAX));
        aside.insert(host.to_string(), (Instant::now() + wait, wait));
        wait
    }

    async fn send_with_retries(&self, endpoint: &Endpoint, op: &Op) -> Result<reqwest::Response> {
        let policy = self.client.retry;
        let mut attempt = 0;
        loop {
            match Box::pin(self.send_authenticated(endpoint, op)).await {
                Err(e) if e.is_transient() && attempt < policy.retries => {
                    let delay = backoff(policy.base_delay, attempt);
                    tracing::debug!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "transient registry error; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn url(&self, endpoint: &Endpoint, op: &Op) -> String {
        if let Some(u) = &op.absolute_url {
            return u.clone();
        }
        let url = format!("{}/{}/{}", self.client.api_base(endpoint), self.image.repository, op.path);
        // As containerd: a mirror is told which registry the request is for.
        if endpoint.mirror { format!("{url}?ns={}", self.registry()) } else { url }
    }

    /// Sends with the current credential; on 401/403 tells the session's auth (which
    /// authenticates, refreshes or moves along the chain) and sends again.
    async fn send_authenticated(&self, endpoint: &Endpoint, op: &Op) -> Result<reqwest::Response> {
        let http = self.client.http(endpoint)?;
        let mut walk = Walk::default();
        loop {
            let sent = self.auth.current(&http, endpoint).await?;
            let resp = self.send_once(&http, endpoint, op, sent.authorization.as_ref()).await?;
            let status = resp.status();
            if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
                return check_status(resp, self.registry(), op).await;
            }
            let challenge =
                resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(challenge::parse);
            self.auth.refused(&http, endpoint, &sent, status.as_u16(), challenge, &mut walk).await?;
        }
    }

    /// One HTTP exchange with `http` (`endpoint`'s client), following redirects without
    /// credentials.
    async fn send_once(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        op: &Op,
        auth: Option<&Secret>,
    ) -> Result<reqwest::Response> {
        let transport = |context: &str, e: &reqwest::Error| RegistryError::Transport {
            registry: self.registry().to_string(),
            context: context.to_string(),
            message: error_text(e),
        };
        if let Some(key) = &op.redirect_key {
            let cached =
                self.redirects.lock().get(key).filter(|(_, at)| at.elapsed() < REDIRECT_TTL).map(|(u, _)| u.clone());
            if let Some(url) = cached {
                let resp = op.request(http, &url).send().await;
                match resp {
                    Ok(r) if r.status().is_success() => return Ok(r),
                    _ => {
                        self.redirects.lock().remove(key);
                    }
                }
            }
        }
        let url = self.url(endpoint, op);
        let mut req = op.request(http, &url);
        for (k, v) in &endpoint.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        // An absolute URL (an upload `Location`) on another host gets no credentials.
        let same_host =
            url::Url::parse(&url).ok().as_ref().and_then(host_port).as_deref() == Some(endpoint.host.as_str());
        if let Some(a) = auth.filter(|_| same_host || op.absolute_url.is_none()) {
            req = req.header(AUTHORIZATION, a.expose());
        }
        if let Some(body) = &op.body {
            req = req.body(body.clone());
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) if self.client.fall_back_to_http(endpoint, &e) => {
                return Box::pin(self.send_once(http, endpoint, op, auth)).await;
            }
            Err(e) => return Err(transport("request", &e)),
        };
        let mut current = url;
        for _ in 0..5 {
            if !resp.status().is_redirection()
                || op.method == Method::PUT
                || op.method == Method::POST
                || op.method == Method::PATCH
            {
                return Ok(resp);
            }
            let Some(location) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) else {
                return Ok(resp);
            };
            let next = url::Url::parse(&current)
                .and_then(|base| base.join(location))
                .map_err(|e| RegistryError::BadResponse {
                    registry: self.registry().to_string(),
                    what: "redirect".into(),
                    message: e.to_string(),
                })?
                .to_string();
            // Never forward Authorization to another host (object stores, CDNs).
            resp = op.request(http, &next).send().await.map_err(|e| transport("redirected request", &e))?;
            if resp.status().is_success()
                && let Some(key) = &op.redirect_key
            {
                self.redirects.lock().insert(key.clone(), (next.clone(), Instant::now()));
            }
            current = next;
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_used_for_unconfigured_registries_a_client_asked_it_for() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().join("configured.example:5000");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("hosts.toml"), "server = \"https://configured.example:5000\"\n").expect("write");
        let client = RegistryClient::new(HostsConfig { dir: Some(dir.path().to_path_buf()), plain_http: false });
        let base = |r: &str| client.api_base(&client.hosts.endpoints(r).expect("endpoints")[0]);
        assert_eq!(base("registry.example:5000"), "https://registry.example:5000/v2");
        client.use_plain_http("registry.example:5000");
        client.use_plain_http("configured.example:5000");
        assert_eq!(base("registry.example:5000"), "http://registry.example:5000/v2");
        assert_eq!(base("other.example:5000"), "https://other.example:5000/v2");
        // A hosts.toml decides for its registry.
        assert_eq!(base("configured.example:5000"), "https://configured.example:5000/v2");
    }

    #[test]
    fn a_loopback_registry_that_is_down_is_not_taken_for_a_plain_http_one() {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        let registry = format!("127.0.0.1:{port}");
        let policy = RetryPolicy { retries: 0, base_delay: Duration::from_millis(1) };
        let client = RegistryClient::with_policy(HostsConfig::default(), policy, Timeouts::default());
        let image = crate::Reference::parse(&format!("{registry}/x/y:1")).expect("reference");
        let repo = client.repository(&image, crate::CredentialChain::anonymous()).expect("repository");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        assert!(rt.block_on(repo.get_manifest("1")).is_err(), "nothing listens there");
        assert!(!client.is_plain(&registry), "a refused connection is no TLS failure");
    }
}
