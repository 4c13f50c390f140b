//! A stand-in for ECR's token endpoint (AWS JSON 1.1, `GetAuthorizationToken`): it checks the
//! SigV4 credential scope and the target, and issues `AWS:ecr-password-<n>` tokens that expire
//! after `ttl_s`; [`FakeEcr::is_valid`] tells a registry's token service which still hold.

use crate::http_stub::{HttpStub, StubResponse};
use anyhow::Result;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct FakeEcr {
    stub: HttpStub,
    /// Issued passwords and when they expire (seconds since the epoch).
    issued: Arc<Mutex<Vec<(String, f64)>>>,
    pub calls: Arc<AtomicU64>,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

impl FakeEcr {
    /// Accepts access key `AKIATESTKEY` in region `eu-west-1`.
    pub fn start(ttl_s: u64) -> Result<Self> {
        let issued: Arc<Mutex<Vec<(String, f64)>>> = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let (i, c) = (issued.clone(), calls.clone());
        let stub = HttpStub::start(move |req| {
            let target = req.headers.get("x-amz-target").cloned().unwrap_or_default();
            let auth = req.headers.get("authorization").cloned().unwrap_or_default();
            if target != "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
                || !auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIATESTKEY/")
                || !auth.contains("/eu-west-1/ecr/aws4_request")
            {
                return StubResponse::json(
                    400,
                    &serde_json::json!({"__type": "UnrecognizedClientException", "message": "bad request"}),
                );
            }
            let n = c.fetch_add(1, Ordering::SeqCst);
            let password = format!("ecr-password-{n}");
            let expires = now() + ttl_s as f64;
            i.lock().push((password.clone(), expires));
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
            let mut r = StubResponse::json(
                200,
                &serde_json::json!({"authorizationData": [{"authorizationToken": token, "expiresAt": expires, "proxyEndpoint": "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com"}]}),
            );
            r.headers = vec![("Content-Type".into(), "application/x-amz-json-1.1".into())];
            r
        })?;
        Ok(Self { stub, issued, calls })
    }

    pub fn url(&self) -> String {
        self.stub.url()
    }

    /// A checker for [`crate::token_service::TokenService::start_checking`]: user `AWS` with a
    /// password this stand-in issued and that has not expired.
    pub fn checker(&self) -> Arc<dyn Fn(&str, &str) -> bool + Send + Sync> {
        let issued = self.issued.clone();
        Arc::new(move |user, password| {
            user == "AWS" && issued.lock().iter().any(|(p, exp)| p == password && *exp > now())
        })
    }
}
