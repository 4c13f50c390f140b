//! A Docker token service (the protocol of `docker-registry`'s `auth.token`): it checks basic
//! credentials and issues RS256 JWTs with an `x5c` header and a short lifetime, which the real
//! registry verifies against the service's certificate (`rootcertbundle`).

use crate::http_stub::{HttpStub, StubRequest, StubResponse};
use crate::{TestDir, run};
use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub const SERVICE: &str = "clip-test-registry";
pub const ISSUER: &str = "clip-test-issuer";

/// `docker-registry` accepts a token until 60 s after its `exp` (its `Leeway`); the service
/// shifts `exp` back by that much, so a token really stops working after its lifetime.
const REGISTRY_LEEWAY_S: u64 = 60;

#[derive(Debug)]
pub struct TokenService {
    stub: HttpStub,
    pub cert: PathBuf,
    issued: Arc<AtomicU64>,
}

impl TokenService {
    /// Starts a service accepting `user`/`password` and issuing tokens valid `ttl_s` seconds.
    pub fn start(td: &TestDir, user: &str, password: &str, ttl_s: u64) -> Result<Self> {
        let (user, password) = (user.to_string(), password.to_string());
        Self::start_checking(td, Arc::new(move |u, p| u == user && p == password), ttl_s)
    }

    /// Starts a service accepting the basic credentials `check` accepts.
    pub fn start_checking(
        td: &TestDir,
        check: Arc<dyn Fn(&str, &str) -> bool + Send + Sync>,
        ttl_s: u64,
    ) -> Result<Self> {
        let dir = td.sub("token-service")?;
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=clip-test-token-issuer",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert))?;
        let der = run(Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert))?.stdout;
        let x5c = STANDARD.encode(der);
        let issued = Arc::new(AtomicU64::new(0));
        let issued2 = issued.clone();
        let key2 = key.clone();
        let stub = HttpStub::start(move |req| handle(req, check.as_ref(), ttl_s, &key2, &x5c, &issued2))?;
        Ok(Self { stub, cert, issued })
    }

    /// The realm URL for the registry config.
    pub fn realm(&self) -> String {
        format!("{}/token", self.stub.url())
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }
}

type Check = dyn Fn(&str, &str) -> bool + Send + Sync;

fn basic_user(req: &StubRequest) -> Option<(String, String)> {
    let raw = req.headers.get("authorization")?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(raw.trim()).ok()?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn handle(req: &StubRequest, check: &Check, ttl_s: u64, key: &Path, x5c: &str, issued: &AtomicU64) -> StubResponse {
    if req.path() != "/token" {
        return StubResponse::status(404);
    }
    let user = match basic_user(req) {
        Some((u, p)) if check(&u, &p) => u,
        _ => String::new(),
    };
    if user.is_empty() {
        return StubResponse::json(401, &serde_json::json!({"errors": [{"code": "UNAUTHORIZED"}]}));
    }
    let mut access = Vec::new();
    for (k, v) in req.query() {
        if k == "scope" {
            // repository:<name>:<actions>
            let mut parts = v.splitn(3, ':');
            if let (Some("repository"), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) {
                access.push(serde_json::json!({"type": "repository", "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
            }
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let n = issued.fetch_add(1, Ordering::SeqCst);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": user.as_str(), "aud": SERVICE,
        "exp": now + ttl_s - REGISTRY_LEEWAY_S.min(now), "nbf": now - 5, "iat": now,
        "jti": format!("clip-test-{n}-{now}"), "access": access,
    });
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let Ok(sig) = sign(key, signing_input.as_bytes()) else { return StubResponse::status(500) };
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));
    StubResponse::json(200, &serde_json::json!({"token": token, "access_token": token, "expires_in": ttl_s}))
}

fn sign(key: &Path, data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?.write_all(data)?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "openssl dgst failed");
    Ok(out.stdout)
}
