//! The builder's registry session for an image: hosts configuration and the credential chain
//! (a creds file for the image's registry, the build registry token minted from the config,
//! docker `config.json`, anonymous).

use anyhow::Result;
use clip_config::BuilderConfig;
use clip_registry::credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain, Source};
use clip_registry::{HostsConfig, Reference, RegistryClient, Repository, TokenMinter};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub async fn repository(
    cfg: &BuilderConfig,
    reference: &str,
    creds_file: Option<&Path>,
    plain_http: bool,
    hosts_dir: Option<PathBuf>,
) -> Result<Repository> {
    let image = Reference::parse(reference)?;
    let image_creds = creds_file.map(|f| Credential::read_file(f, Source::ImageCreds)).transpose()?;
    let mut inputs = ChainInputs { image_creds, docker_config: true, ..Default::default() };
    let mut insecure = plain_http;
    if let Some(br) = &cfg.build_registry {
        let scope = BuildRegistryScope::new(&br.registry, &br.repository);
        if scope.covers(&image) {
            insecure |= br.insecure;
        }
        inputs.build_registry = Some(scope);
        if let Some(creds) = &br.credentials {
            inputs.minter = Some(Arc::new(TokenMinter::from_config(creds).await?));
        }
    }
    let hosts = HostsConfig { dir: hosts_dir.or_else(|| cfg.registry.hosts_dir.clone()), plain_http: insecure };
    let client = RegistryClient::new(hosts);
    let chain = CredentialChain::for_image(&image, &inputs);
    Ok(client.repository(&image, chain)?.for_push())
}
