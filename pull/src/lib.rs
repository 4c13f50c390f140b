//! `clip-pull`: the client behind `clip-snapshotter pull`, what `ctr-remote rpull` does, in Rust. Resolve the image with the
//! given credentials, store its manifest and config in containerd's content store, create the
//! image record, and prepare every layer's snapshot *through containerd* with the `cri.*` and
//! `clip.*` labels, so that the clip snapshotter mounts each layer lazily and containerd records
//! it as unpacked. A layer that cannot be served lazily (the snapshotter falls back) is
//! downloaded into the content store and applied by containerd's differ here. Afterwards
//! `ctr run --snapshotter clip REF` starts the image as already unpacked.

use anyhow::{Context, Result, bail};
use clip_config::labels as l;
pub use clip_registry::credentials::BuildRegistryScope;
use clip_registry::credentials::{ChainInputs, Credential, CredentialChain};
use clip_registry::image::chain_ids;
use clip_registry::{HostsConfig, Platform, Reference, RegistryClient, Repository};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, Image, UpdateImageRequest, content_client::ContentClient,
    diff_client::DiffClient, images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::tonic::{Code, Request, transport::Channel};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

mod content;

/// What to pull and how.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub containerd_address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    pub hosts_dir: Option<PathBuf>,
    pub plain_http: bool,
    pub creds: Option<Credential>,
    /// The BuildRegistryCreds: offered only to images of `build_registry`.
    pub build_registry_creds: Option<Credential>,
    pub source_image_creds: Option<Credential>,
    /// The configured build registry (the snapshotter config's `[build_registry]`).
    pub build_registry: Option<BuildRegistryScope>,
    /// The node's kubelet credential provider plugins (the snapshotter config's `[registry]`).
    pub providers: Option<std::sync::Arc<clip_registry::provider::CredentialProviders>>,
    pub platform: Platform,
}

/// What happened, per layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    pub image: String,
    pub manifest_digest: String,
    /// Layers the snapshotter serves lazily.
    pub lazy_layers: usize,
    /// Layers downloaded and unpacked here (the snapshotter fell back).
    pub unpacked_layers: usize,
    /// Layers no index serves that the snapshotter downloaded and unpacked itself
    /// (`[lazy] unpack_without_index`).
    pub snapshotter_unpacked_layers: usize,
    /// Layers whose snapshot already existed.
    pub existing_layers: usize,
    /// Why each layer unpacked here or by the snapshotter was not served lazily, as the
    /// snapshotter said.
    pub not_lazy: Vec<NotLazy>,
    pub seconds: f64,
}

/// A layer the snapshotter did not serve lazily.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NotLazy {
    pub layer: String,
    pub reason: String,
}

/// Metadata headers containerd reads from every request.
#[derive(Clone)]
struct Ctx {
    namespace: String,
    lease: Option<String>,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> Result<Request<T>> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert("containerd-namespace", self.namespace.parse().context("namespace")?);
        if let Some(lease) = &self.lease {
            r.metadata_mut().insert("containerd-lease", lease.parse().context("lease")?);
        }
        Ok(r)
    }
}

/// The registry chain of the pull client itself: the credentials the user gave, in the
/// design's order — the build registry's only for an image of the configured build registry, as
/// the daemon has it ([`CredentialChain::for_image`]) — then docker `config.json`, then anonymous.
fn chain(opts: &PullOptions, image: &Reference) -> CredentialChain {
    let inputs = ChainInputs {
        image_creds: opts.creds.clone(),
        source_image_creds: opts.source_image_creds.clone(),
        build_registry_creds: opts.build_registry_creds.clone(),
        build_registry: opts.build_registry.clone(),
        providers: opts.providers.clone(),
        docker_config: true,
        ..ChainInputs::default()
    };
    CredentialChain::for_image(image, &inputs)
}

/// Whether the build registry credentials may go with `image` (its registry and repository
/// are the configured build registry's).
fn offers_build_creds(opts: &PullOptions, image: &Reference) -> bool {
    opts.build_registry.as_ref().is_some_and(|b| b.covers(image))
}

pub async fn pull(opts: &PullOptions, reference: &str) -> Result<PullReport> {
    let started = Instant::now();
    let image = Reference::parse(reference)?;
    let client = RegistryClient::new(HostsConfig { dir: opts.hosts_dir.clone(), plain_http: opts.plain_http });
    if opts.build_registry_creds.is_some() && !offers_build_creds(opts, &image) {
        tracing::warn!(image = %image, "the build registry credentials are offered only to the configured [build_registry]; not to this image");
    }
    let repo = std::sync::Arc::new(client.repository(&image, chain(opts, &image))?);
    let (manifest, parsed) = repo
        .get_image_manifest(image.manifest_reference(), &opts.platform)
        .await
        .with_context(|| format!("resolving {image}"))?;
    let config_desc = parsed.config();
    let config_digest = config_desc.digest().to_string();
    let config = repo.get_blob(&config_digest, 16 << 20).await.context("fetching the image config")?;
    let layers = parsed.layers();
    let diff_ids = clip_registry::image::diff_ids(&config, layers.len())?;
    let chain_ids = chain_ids(&diff_ids);
    let top = chain_ids.last().cloned().unwrap_or_default();

    let channel = containerd_client::connect(&opts.containerd_address)
        .await
        .with_context(|| format!("connecting to containerd at {}", opts.containerd_address.display()))?;
    let mut ctx = Ctx { namespace: opts.namespace.clone(), lease: None };
    let lease_id = format!("clip-pull-{}", std::process::id());
    let mut leases = LeasesClient::new(channel.clone());
    let expire = (std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    leases
        .create(ctx.req(containerd_client::services::v1::CreateRequest {
            id: lease_id.clone(),
            labels: [("containerd.io/gc.expire".to_string(), format_rfc3339(expire))].into(),
        })?)
        .await
        .context("creating a lease")?;
    ctx.lease = Some(lease_id.clone());

    let result = async {
        let mut content = ContentClient::new(channel.clone());
        let mut manifest_labels =
            HashMap::from([("containerd.io/gc.ref.content.config".to_string(), config_digest.clone())]);
        for (i, layer) in layers.iter().enumerate() {
            manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), layer.digest().to_string());
        }
        let config_labels =
            HashMap::from([(format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter), top.clone())]);
        content::write_content(&mut content, &ctx, &config_digest, config.to_vec(), config_labels).await?;
        content::write_content(&mut content, &ctx, &manifest.digest, manifest.bytes.to_vec(), manifest_labels).await?;

        let mut snapshots = SnapshotsClient::new(channel.clone());
        let layer_digests: Vec<String> = layers.iter().map(|d| d.digest().to_string()).collect();
        let mut report = PullReport {
            image: image.to_string(),
            manifest_digest: manifest.digest.clone(),
            lazy_layers: 0,
            unpacked_layers: 0,
            snapshotter_unpacked_layers: 0,
            existing_layers: 0,
            not_lazy: Vec::new(),
            seconds: 0.0,
        };
        let mut ahead = content::Ahead::new();
        for (i, layer) in layers.iter().enumerate() {
            let chain_id = &chain_ids[i];
            let parent = if i == 0 { String::new() } else { chain_ids[i - 1].clone() };
            let exists = snapshots
                .stat(ctx.req(StatSnapshotRequest { snapshotter: opts.snapshotter.clone(), key: chain_id.clone() })?)
                .await;
            if exists.is_ok() {
                report.existing_layers += 1;
                continue;
            }
            let labels = layer_labels(opts, &image, &manifest.digest, &layer_digests, i, chain_id);
            let key = format!("extract-{}-{i} {chain_id}", std::process::id());
            let prepared = snapshots
                .prepare(ctx.req(PrepareSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels,
                })?)
                .await;
            match prepared {
                Err(s) if s.code() == Code::AlreadyExists => {
                    // Served lazily, or (no index serves it) downloaded and unpacked by the
                    // snapshotter itself, which then says why in the snapshot's labels.
                    let info = snapshots
                        .stat(ctx.req(StatSnapshotRequest {
                            snapshotter: opts.snapshotter.clone(),
                            key: chain_id.clone(),
                        })?)
                        .await
                        .ok()
                        .and_then(|r| r.into_inner().info);
                    match info.filter(|i| i.labels.contains_key(l::UNPACKED_BY_CLIP)) {
                        Some(i) => {
                            report.snapshotter_unpacked_layers += 1;
                            let why = i.labels.get(l::NOT_LAZY_REASON).cloned().unwrap_or_default();
                            report.not_lazy.push(NotLazy {
                                layer: layer.digest().to_string(),
                                reason: format!("unpacked by the snapshotter: {why}"),
                            });
                        }
                        None => report.lazy_layers += 1,
                    }
                    strip_secret_labels(&mut snapshots, &ctx, &opts.snapshotter, chain_id).await;
                }
                Err(s) => bail!("preparing layer {} ({chain_id}): {}", layer.digest(), s.message()),
                Ok(resp) => {
                    // The snapshotter could not serve it lazily: download and unpack here.
                    let mounts = resp.into_inner().mounts;
                    let said = snapshots
                        .stat(ctx.req(StatSnapshotRequest { snapshotter: opts.snapshotter.clone(), key: key.clone() })?)
                        .await
                        .ok()
                        .and_then(|r| r.into_inner().info)
                        .and_then(|info| info.labels.get(l::NOT_LAZY_REASON).cloned());
                    if !ahead.started() && said.as_deref().is_some_and(|r| r.starts_with(l::NOT_LAZY_NO_INDEX)) {
                        // No layer of this image will be lazy: the next ones download meanwhile.
                        for (j, next) in layers.iter().enumerate().skip(i + 1) {
                            let key = chain_ids[j].clone();
                            let req = StatSnapshotRequest { snapshotter: opts.snapshotter.clone(), key };
                            if snapshots.stat(ctx.req(req)?).await.is_err() {
                                ahead.start(repo.clone(), channel.clone(), ctx.clone(), next.clone());
                            }
                        }
                    }
                    report.not_lazy.push(NotLazy {
                        layer: layer.digest().to_string(),
                        reason: said
                            .unwrap_or_else(|| "the snapshotter did not say (not clip, or lazy serving is off)".into()),
                    });
                    let unpacked =
                        unpack_layer(&repo, &channel, &ctx, &mut content, layer, &diff_ids[i], mounts, &mut ahead)
                            .await;
                    if let Err(e) = unpacked {
                        let _ = snapshots
                            .remove(ctx.req(RemoveSnapshotRequest {
                                snapshotter: opts.snapshotter.clone(),
                                key: key.clone(),
                            })?)
                            .await;
                        return Err(e.context(format!("unpacking layer {}", layer.digest())));
                    }
                    let committed = snapshots
                        .commit(ctx.req(CommitSnapshotRequest {
                            snapshotter: opts.snapshotter.clone(),
                            name: chain_id.clone(),
                            key: key.clone(),
                            labels: HashMap::new(),
                        })?)
                        .await;
                    match committed {
                        Ok(_) => report.unpacked_layers += 1,
                        // Another pull of an image sharing this layer committed it first (as containerd's
                        // unpacker does, the first commit wins and ours is dropped).
                        Err(s) if s.code() == Code::AlreadyExists => {
                            let _ = snapshots
                                .remove(ctx.req(RemoveSnapshotRequest {
                                    snapshotter: opts.snapshotter.clone(),
                                    key: key.clone(),
                                })?)
                                .await;
                            report.existing_layers += 1;
                        }
                        Err(s) => bail!("committing layer {} ({chain_id}): {}", layer.digest(), s.message()),
                    }
                }
            }
        }

        let mut images = ImagesClient::new(channel.clone());
        let record = Image {
            name: reference.to_string(),
            labels: HashMap::new(),
            target: Some(containerd_client::types::Descriptor {
                media_type: manifest.media_type.clone(),
                digest: manifest.digest.clone(),
                size: manifest.bytes.len() as i64,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        match images.create(ctx.req(CreateImageRequest { image: Some(record.clone()), source_date_epoch: None })?).await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(ctx.req(UpdateImageRequest {
                        image: Some(record),
                        update_mask: None,
                        source_date_epoch: None,
                    })?)
                    .await
                    .context("updating the image record")?;
            }
            Err(s) => bail!("creating the image record: {}", s.message()),
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
    .await;
    let mut release = Ctx { namespace: opts.namespace.clone(), lease: None };
    release.lease = None;
    let _ =
        leases.delete(release.req(containerd_client::services::v1::DeleteRequest { id: lease_id, sync: false })?).await;
    result
}

/// The labels containerd's CRI plugin sets, plus clip's credential labels.
fn layer_labels(
    opts: &PullOptions,
    image: &Reference,
    manifest_digest: &str,
    layer_digests: &[String],
    i: usize,
    chain_id: &str,
) -> HashMap<String, String> {
    let mut labels = l::cri_layer_labels(chain_id, &image.to_string(), manifest_digest, layer_digests, i);
    if opts.plain_http {
        labels.insert(l::PLAIN_HTTP.to_string(), "true".to_string());
    }
    let build = if offers_build_creds(opts, image) { &opts.build_registry_creds } else { &None };
    for (label, cred) in [
        (l::IMAGE_CREDS, &opts.creds),
        (l::SOURCE_IMAGE_CREDS, &opts.source_image_creds),
        (l::BUILD_REGISTRY_CREDS, build),
    ] {
        if let Some(c) = cred {
            labels.insert(label.to_string(), format!("{}:{}", c.username, c.password.expose()));
        }
    }
    labels
}

/// containerd keeps the labels of a Prepare in its own metadata; remove the secret ones.
async fn strip_secret_labels(snapshots: &mut SnapshotsClient<Channel>, ctx: &Ctx, snapshotter: &str, chain_id: &str) {
    let paths: Vec<String> = l::SECRET_LABELS.iter().map(|k| format!("labels.{k}")).collect();
    let Ok(req) = ctx.req(UpdateSnapshotRequest {
        snapshotter: snapshotter.to_string(),
        info: Some(containerd_client::services::v1::snapshots::Info {
            name: chain_id.to_string(),
            ..Default::default()
        }),
        update_mask: Some(prost_types_14::FieldMask { paths }),
    }) else {
        return;
    };
    if let Err(s) = snapshots.update(req).await {
        tracing::warn!(chain_id, error = %s.message(), "could not remove credential labels from containerd's snapshot record");
    }
}

/// The fallback: layer blob into the content store, then containerd's differ applies it; what
/// it applied must be the layer's `diff_id` (else the snapshot would be committed under a chain
/// ID that is not its content's, for every later image of that chain to reuse). A download
/// of the blob started ahead is waited for, else it is downloaded now.
#[allow(clippy::too_many_arguments)]
async fn unpack_layer(
    repo: &Repository,
    channel: &Channel,
    ctx: &Ctx,
    content: &mut ContentClient<Channel>,
    layer: &oci_spec::image::Descriptor,
    diff_id: &str,
    mounts: Vec<containerd_client::types::Mount>,
    ahead: &mut content::Ahead,
) -> Result<()> {
    let digest = layer.digest().to_string();
    let started = Instant::now();
    match ahead.wait(&digest).await {
        Some(downloaded) => downloaded?,
        None => content::store_layer_blob(repo, content, ctx, layer).await?,
    }
    let downloaded_in = started.elapsed();
    let mut diff = DiffClient::new(channel.clone());
    let applied = diff
        .apply(ctx.req(ApplyRequest {
            diff: Some(containerd_client::types::Descriptor {
                media_type: layer.media_type().to_string(),
                digest: digest.clone(),
                size: layer.size() as i64,
                annotations: HashMap::new(),
            }),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        })?)
        .await
        .context("containerd's differ")?
        .into_inner()
        .applied
        .map(|d| d.digest)
        .unwrap_or_default();
    if applied != diff_id {
        bail!("layer {digest} unpacks to {applied}, but the image config names {diff_id} as its diff ID");
    }
    tracing::info!(
        layer = %digest,
        mb = layer.size() >> 20,
        download_wait_s = downloaded_in.as_secs_f64(),
        apply_s = started.elapsed().saturating_sub(downloaded_in).as_secs_f64(),
        "layer downloaded into containerd's content store and applied"
    );
    Ok(())
}

/// RFC 3339 UTC from seconds since the epoch (for `containerd.io/gc.expire`).
fn format_rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_845_595), "2026-11-28T05:59:55Z");
    }

    #[test]
    fn build_registry_credentials_go_only_to_the_build_registry() {
        let opts = PullOptions {
            containerd_address: PathBuf::new(),
            namespace: "t".into(),
            snapshotter: "clip".into(),
            hosts_dir: None,
            plain_http: false,
            creds: None,
            build_registry_creds: Some(Credential::new("builder", "Build-Token-Sentinel")),
            source_image_creds: None,
            build_registry: Some(BuildRegistryScope::new("build.example:5000", "userimages")),
            providers: None,
            platform: Platform::default(),
        };
        use clip_registry::credentials::Source;
        let sources = |r: &str| -> Vec<Source> {
            let image = Reference::parse(r).expect("reference");
            chain(&opts, &image).candidates.iter().map(clip_registry::credentials::Candidate::source).collect()
        };
        assert!(sources("build.example:5000/userimages/app:1").contains(&Source::BuildRegistryCreds));
        // Seen before: offered to any registry the reference named.
        assert!(!sources("evil.example/userimages/app:1").contains(&Source::BuildRegistryCreds));
        assert!(!sources("build.example:5000/other/app:1").contains(&Source::BuildRegistryCreds));
        let layers = vec![format!("sha256:{}", "0".repeat(64))];
        let labels = |r: &str| {
            let image = Reference::parse(r).expect("reference");
            layer_labels(&opts, &image, "sha256:00", &layers, 0, "sha256:11")
        };
        assert!(labels("build.example:5000/userimages/app:1").contains_key(l::BUILD_REGISTRY_CREDS));
        assert!(!labels("evil.example/userimages/app:1").contains_key(l::BUILD_REGISTRY_CREDS));
    }
}
