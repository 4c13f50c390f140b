//! What to make of an answer: a final status as the response or an error (with a bounded
//! piece of its body), the backoff before a retry, whether a connection failure means the host
//! is unreachable, and the `host[:port]` a URL names.

use crate::error::{RegistryError, Result};
use crate::op::Op;
use reqwest::StatusCode;
use std::time::Duration;

/// `host[:port]` of a URL (the port only when it is given), as endpoints name hosts.
pub(crate) fn host_port(u: &url::Url) -> Option<String> {
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
}

/// Maps a final status to the response or an error; 404 and 416 pass through for callers.
pub(crate) async fn check_status(resp: reqwest::Response, registry: &str, op: &Op) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() || status == StatusCode::NOT_FOUND || status == StatusCode::RANGE_NOT_SATISFIABLE {
        return Ok(resp);
    }
    let body = crate::body::read_prefix(resp, crate::body::MAX_ERROR_BODY).await;
    let body: String = body.chars().take(300).collect();
    Err(RegistryError::Status {
        registry: registry.to_string(),
        method: op.method.to_string(),
        path: op.path.clone(),
        status: status.as_u16(),
        body,
    })
}

pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1 << attempt.min(10));
    let capped = exp.min(Duration::from_secs(5));
    // Jitter of up to 25 % from the clock's sub-second noise (no RNG needed).
    let noise = u64::from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos(),
    ) % 250;
    capped + capped.mul_f64(noise as f64 / 1000.0)
}

/// Whether a connection failed before any TLS was spoken (refused, unreachable, timed out).
pub(crate) fn is_unreachable(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{
                AddrNotAvailable, ConnectionRefused, HostUnreachable, NetworkUnreachable, TimedOut,
            };
            if matches!(
                io.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable | TimedOut | AddrNotAvailable
            ) {
                return true;
            }
        }
        source = err.source();
    }
    false
}
