//! `clip-cri-proxy`: the CRI image service proxy (as stargz and SOCI offer): serves the CRI `ImageService` on its
//! own socket for kubelet (`--image-service-endpoint`), forwards every call to containerd, and
//! hands the `AuthConfig` of each `PullImage` — the pod's pull secret — to the lazy layers of
//! that image's repository before containerd prepares them. The secret is *offered* for the
//! length of containerd's pull and *kept* (in memory and in the root-only credential store,
//! until it expires) only when that pull succeeded; a secret given for another registry
//! (`server_address`) is not used for lazy reads. Secrets are never logged. A pull without a
//! secret of an image in the configured build registry gets a token the snapshotter mints only
//! when `[cri] mint_for_pulls_without_secret` is on. What is done with a secret is the daemon's
//! ([`PullSecrets`], implemented by the snapshotter's remote layers); see `docs/architecture.md`.

use clip_registry::RegistryError;
use clip_registry::credentials::{Credential, Source};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse, ListImagesRequest,
    ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest, RemoveImageResponse,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic_14::{Request, Response, Status};
use tracing::Instrument;

/// The credential an `AuthConfig` carries: `username`/`password`, else `auth`
/// (base64 `username:password`). Token-only configs are not supported (`None`).
pub fn credential_of(auth: &AuthConfig) -> Option<Credential> {
    if !auth.username.is_empty() && !auth.password.is_empty() {
        return Some(Credential::new(auth.username.clone(), auth.password.clone()));
    }
    if !auth.auth.is_empty() {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(auth.auth.trim()).ok()?;
        return Credential::parse(std::str::from_utf8(&decoded).ok()?, Source::CriPullSecret).ok();
    }
    None
}

/// Whether an `AuthConfig` was given for `image_ref`'s registry: its `server_address` (kubelet
/// sets the docker config key the secret matched: `host[:port]`, a URL, or Docker Hub's
/// `https://index.docker.io/v1/`) names that registry, or is empty.
pub fn given_for(auth: &AuthConfig, image_ref: &str) -> bool {
    let server = auth.server_address.trim();
    if server.is_empty() {
        return true;
    }
    let Ok(image) = clip_registry::Reference::parse(image_ref) else {
        return false;
    };
    let host = server.split_once("://").map_or(server, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or_default();
    clip_registry::reference::normalize_registry(host) == image.registry
}

/// Where the proxy hands what a `PullImage` carries: the daemon's lazy layers.
pub trait PullSecrets: Send + Sync + 'static {
    /// Offers `credential` to the lazy layers of `image_ref`'s repository while containerd
    /// pulls with it; returns the offer to settle.
    fn offer_pull_secret(&self, image_ref: &str, credential: Credential) -> Result<u64, RegistryError>;
    /// Settles an offer when containerd's pull is over: kept if `accepted`, else forgotten
    /// (blocking when accepted: it writes the credential store).
    fn settle_pull_secret(&self, offer: u64, accepted: bool);
    /// A credential for `image_ref` when it is in the build registry, where the daemon mints
    /// its own tokens.
    fn build_registry_credential(
        &self,
        image_ref: &str,
    ) -> impl std::future::Future<Output = Option<Credential>> + Send;
}

/// An offered pull secret, refused unless settled otherwise (a cancelled pull included).
struct Offer<S: PullSecrets> {
    remote: Arc<S>,
    offer: Option<u64>,
}

impl<S: PullSecrets> Offer<S> {
    async fn settle(mut self, accepted: bool) {
        if let Some(offer) = self.offer.take() {
            let remote = self.remote.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || remote.settle_pull_secret(offer, accepted)).await {
                tracing::warn!(error = %e, "settling a pull secret failed");
            }
        }
    }
}

impl<S: PullSecrets> Drop for Offer<S> {
    fn drop(&mut self) {
        if let Some(offer) = self.offer.take() {
            self.remote.settle_pull_secret(offer, false);
        }
    }
}

/// The proxy: containerd's image service, with pull secrets handed to lazy layers.
#[derive(Debug)]
pub struct CriImageProxy<S> {
    containerd: PathBuf,
    remote: Arc<S>,
}

impl<S: PullSecrets> CriImageProxy<S> {
    pub fn new(containerd: &Path, remote: Arc<S>) -> Self {
        Self { containerd: containerd.to_path_buf(), remote }
    }

    async fn upstream(&self) -> Result<ImageServiceClient<tonic_14::transport::Channel>, Status> {
        let channel = containerd_client::connect(&self.containerd)
            .await
            .map_err(|e| Status::unavailable(format!("containerd at {}: {e}", self.containerd.display())))?;
        Ok(ImageServiceClient::new(channel))
    }
}

#[tonic_14::async_trait]
impl<S: PullSecrets> ImageService for CriImageProxy<S> {
    async fn list_images(&self, request: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        self.upstream().await?.list_images(request.into_inner()).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.upstream().await?.image_status(request.into_inner()).await
    }

    async fn pull_image(&self, request: Request<PullImageRequest>) -> Result<Response<PullImageResponse>, Status> {
        let req = request.into_inner();
        let image = req.image.as_ref().map(|i| i.image.clone()).unwrap_or_default();
        let span = tracing::info_span!("cri_pull_image", image = %image);
        async {
            let mut offer = Offer { remote: self.remote.clone(), offer: None };
            match req.auth.as_ref().map(|a| (a, credential_of(a))) {
                Some((a, Some(_))) if !given_for(a, &image) => {
                    tracing::warn!(server_address = %a.server_address, "the pull secret was given for another registry; lazy reads do not use it");
                }
                Some((_, Some(credential))) => match self.remote.offer_pull_secret(&image, credential) {
                    Ok(o) => offer.offer = Some(o),
                    Err(e) => tracing::warn!(error = %e, "pull secret not offered to lazy layers"),
                },
                Some((a, None)) if !a.identity_token.is_empty() || !a.registry_token.is_empty() => {
                    tracing::warn!("token-only pull secrets are not used for lazy layers; their reads use the other credential sources");
                }
                _ => {}
            }
            let mut req = req;
            if req.auth.as_ref().and_then(credential_of).is_none() {
                // No pull secret: containerd needs one for the build registry, where the
                // snapshotter mints its own tokens. Lazy reads mint their own as well.
                if let Some(c) = self.remote.build_registry_credential(&image).await {
                    tracing::info!(source = Source::MintedBuildRegistryToken.name(), "passing containerd a build registry token for the pull");
                    req.auth = Some(AuthConfig {
                        username: c.username.clone(),
                        password: c.password.expose().to_string(),
                        ..Default::default()
                    });
                }
            }
            let started = std::time::Instant::now();
            let result = self.upstream().await?.pull_image(req).await;
            offer.settle(result.is_ok()).await;
            match &result {
                Ok(r) => tracing::info!(image_ref = %r.get_ref().image_ref, seconds = started.elapsed().as_secs_f64(), "pulled through containerd"),
                Err(s) => tracing::warn!(code = ?s.code(), message = %s.message(), "containerd refused the pull"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.upstream().await?.remove_image(request.into_inner()).await
    }

    async fn image_fs_info(
        &self,
        request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.upstream().await?.image_fs_info(request.into_inner()).await
    }
}

/// Serves the proxy on `address` until `shutdown` resolves.
pub async fn serve<S: PullSecrets>(
    address: &Path,
    proxy: CriImageProxy<S>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(address);
    let listener = tokio::net::UnixListener::bind(address).with_context(|| format!("binding {}", address.display()))?;
    std::fs::set_permissions(address, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    tracing::info!(address = %address.display(), containerd = %proxy.containerd.display(), "serving the CRI image service proxy");
    tonic_14::transport::Server::builder()
        .add_service(ImageServiceServer::new(proxy))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .context("CRI image service proxy")?;
    let _ = std::fs::remove_file(address);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_configs_become_credentials() {
        let a = AuthConfig { username: "u".into(), password: "p:w".into(), ..Default::default() };
        let c = credential_of(&a).expect("basic");
        assert_eq!((c.username.as_str(), c.password.expose()), ("u", "p:w"));
        use base64::Engine;
        let a = AuthConfig { auth: base64::engine::general_purpose::STANDARD.encode("v:secret"), ..Default::default() };
        let c = credential_of(&a).expect("auth");
        assert_eq!((c.username.as_str(), c.password.expose()), ("v", "secret"));
        assert!(credential_of(&AuthConfig { registry_token: "t".into(), ..Default::default() }).is_none());
        assert!(credential_of(&AuthConfig { auth: "%%%".into(), ..Default::default() }).is_none());
    }

    #[test]
    fn a_secret_is_for_the_registry_its_server_address_names() {
        let auth = |server: &str| AuthConfig { server_address: server.into(), ..Default::default() };
        let image = "registry.example:5000/team/app:1";
        assert!(given_for(&auth(""), image));
        assert!(given_for(&auth("registry.example:5000"), image));
        assert!(given_for(&auth("https://registry.example:5000/v2/"), image));
        assert!(!given_for(&auth("registry.example:5001"), image));
        assert!(!given_for(&auth("other.example"), image));
        assert!(given_for(&auth("https://index.docker.io/v1/"), "busybox"));
        assert!(!given_for(&auth("https://index.docker.io/v1/"), image));
    }
}
