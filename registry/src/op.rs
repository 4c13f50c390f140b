//! [`Op`]: what one registry request needs — method, path, headers, body, and how it is routed
//! (push access, mirrors or not, an absolute upload URL, a redirect cache key).

use reqwest::Method;
use reqwest::header::HeaderName;

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
}

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
        }
    }

    pub fn header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}
