//! The containerd namespace of the request being served. containerd sends it to proxy plugins
//! in the `containerd-namespace` gRPC header; the snapshots API wrapper of
//! `containerd-snapshots` drops headers, so a tower layer keeps it in a task-local for the
//! duration of the call.

use std::task::{Context, Poll};

tokio::task_local! {
    static NAMESPACE: Option<String>;
}

/// The header containerd sets on every namespaced call.
pub const HEADER: &str = "containerd-namespace";

/// The namespace of the gRPC call running on this task, if containerd sent one.
pub fn current() -> Option<String> {
    NAMESPACE.try_with(Clone::clone).ok().flatten()
}

/// Wraps a gRPC service so that [`current`] answers inside its calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct NamespaceLayer;

impl<S> tower_04::Layer<S> for NamespaceLayer {
    type Service = WithNamespace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithNamespace { inner }
    }
}

/// See [`NamespaceLayer`].
#[derive(Debug, Clone)]
pub struct WithNamespace<S> {
    inner: S,
}

impl<S, B> tower_04::Service<http_02::Request<B>> for WithNamespace<S>
where
    S: tower_04::Service<http_02::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tokio::task::futures::TaskLocalFuture<Option<String>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http_02::Request<B>) -> Self::Future {
        let namespace =
            req.headers().get(HEADER).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()).map(str::to_string);
        NAMESPACE.scope(namespace, self.inner.call(req))
    }
}
