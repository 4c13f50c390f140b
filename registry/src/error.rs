//! The registry client's typed errors. None of them ever carries a credential: messages name
//! the registry and the credential *source*, never a value.

use crate::source::Source;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("registry {registry}: access denied ({status}) for {repository}; credentials tried: {tried}")]
    Unauthorized { registry: String, repository: String, status: u16, tried: SourceList },
    #[error("registry {registry}: {what} not found")]
    NotFound { registry: String, what: String },
    #[error("registry {registry}: {method} {path} answered {status}: {body}")]
    Status { registry: String, method: String, path: String, status: u16, body: String },
    #[error("registry {registry}: {context}: {message}")]
    Transport { registry: String, context: String, message: String },
    #[error("registry {registry}: range {start}-{end} of {digest} not satisfiable (blob is shorter)")]
    RangeNotSatisfiable { registry: String, digest: String, start: u64, end: u64 },
    #[error("registry {registry}: {what}: {message}")]
    BadResponse { registry: String, what: String, message: String },
    #[error("content of {digest} does not match its digest (got {actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("hosts configuration {path}: {message}")]
    HostsConfig { path: String, message: String },
    #[error("credentials ({source_name}): {message}")]
    Credentials { source_name: &'static str, message: String },
    #[error("token minting ({kind}): {message}")]
    Mint { kind: &'static str, message: String },
}

impl RegistryError {
    /// Whether retrying the same request later may succeed (5xx, resets, timeouts).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

/// The credential sources tried, for error messages.
#[derive(Debug, Default, Clone)]
pub struct SourceList(pub Vec<Source>);

impl std::fmt::Display for SourceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.0.iter().map(|s| s.name()).collect();
        f.write_str(&names.join(", "))
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// An error with its causes (reqwest's: connection refused, reset, timeout...; the AWS SDK's,
/// whose own text is a terse "service error"), joined by `: `.
pub fn error_text<E: std::error::Error>(e: &E) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    without_url_queries(&parts.join(": "))
}

/// `text` with the query of every URL in it replaced by `?<redacted>`: a redirect's target is
/// often a pre-signed object store URL whose query *is* a credential (`X-Amz-Signature`, a SAS
/// token), and reqwest's errors quote the URL they failed on.
pub fn without_url_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at);
        out.push_str(head);
        let end = tail.find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>')).unwrap_or(tail.len());
        let url = &tail[..end];
        match url.find(['?', '#']) {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?<redacted>");
            }
            None => out.push_str(url),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_queries_never_reach_an_error_text() {
        let text = "error sending request for url (https://bucket.s3.example/blob?X-Amz-Signature=SENTINEL&a=b): \
                    connection refused; then http://h/p#SENTINEL2 and https://plain/path";
        let clean = without_url_queries(text);
        assert!(!clean.contains("SENTINEL"), "{clean}");
        assert!(clean.contains("https://bucket.s3.example/blob?<redacted>)"), "{clean}");
        assert!(clean.contains("https://plain/path") && clean.ends_with("path"), "{clean}");
    }

    #[tokio::test]
    async fn a_failed_request_to_a_presigned_url_does_not_quote_its_signature() {
        // A port nobody listens on: reqwest's error names the URL.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}/blob?X-Amz-Signature=SENTINEL-SIG");
        let e = reqwest::Client::new().get(&url).send().await.expect_err("nothing listens");
        assert!(e.to_string().contains("SENTINEL-SIG"), "reqwest quotes the URL: {e}");
        let text = error_text(&e);
        assert!(!text.contains("SENTINEL-SIG") && text.contains("/blob?<redacted>"), "{text}");
    }
}
