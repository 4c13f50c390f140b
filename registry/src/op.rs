//! [`Op`]: what one registry request needs — method, path, headers, body, and how it is routed
//! (push access, mirrors or not, an absolute upload URL, a redirect cache key).

use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// What one request needs.
#[derive(Debug, Clone)]
pub struct Op {
    pub method: Method,
    /// Path below `/v2/<repository>/`, e.g. `blobs/sha256:...`.
    pub path: String,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Option<bytes::Bytes>,
    pub query: Vec<(String, String)>,
    /// Needs push access (scope `pull,push`, endpoints with `push`).
    pub push: bool,
    /// Cache redirect targets under this key (a blob digest).
    pub redirect_key: Option<String>,
    /// An absolute URL to use instead of the path (upload locations).
    pub absolute_url: Option<String>,
    /// Go to the registry itself, not its mirrors.
    pub skip_mirrors: bool,
    /// A whole blob read as a stream: its body may take longer than the client's whole-request
    /// timeout (a multi-GB layer on a slow link), so it is bounded by [`LONG_BODY_LIMIT`]
    /// instead, and by the client's read timeout between any two pieces.
    pub long_body: bool,
}

/// The bound on a request whose body is a whole blob read as a stream ([`Op::long_body`]).
pub const LONG_BODY_LIMIT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Marks a response a mirror gave (in its extensions).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FromMirror;

impl Op {
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
            query: Vec::new(),
            push: false,
            redirect_key: None,
            absolute_url: None,
            skip_mirrors: false,
            long_body: false,
        }
    }

    /// The request on `url`, without credentials: its query, its headers (a value that is not a
    /// valid header is left out) and, for a [`Op::long_body`], the longer bound.
    pub(crate) fn request(&self, http: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let mut req = http.request(self.method.clone(), url);
        if self.long_body {
            req = req.timeout(LONG_BODY_LIMIT);
        }
        if !self.query.is_empty() {
            req = req.query(&self.query);
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append(k.clone(), v);
            }
        }
        req.headers(headers)
    }

    pub fn header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}
