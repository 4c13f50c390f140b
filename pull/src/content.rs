//! containerd's content store as clip's pull writes it: small blobs (manifests, configs) from
//! memory, layer blobs streamed from the registry as they arrive — checked against their
//! descriptor's size and digest on the way, held a few MiB at a time, never whole.

use crate::Ctx;
use anyhow::{Context, Result, bail};
use clip_registry::Repository;
use containerd_client::services::v1::{
    AbortRequest, InfoRequest, WriteAction, WriteContentRequest, content_client::ContentClient,
};
use containerd_client::tonic::{Code, transport::Channel};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The size of each write to containerd (its gRPC messages are capped at 16 MiB).
const MESSAGE: usize = 1 << 20;
/// Writes queued between the registry's body and containerd: the memory a layer takes.
const QUEUE: usize = 2;

/// Downloads ahead: layer blobs going into the content store before their turn, at most
/// [`AHEAD`] at a time (containerd's pull downloads 3 layers at once), so that containerd's
/// differ applies one layer while the next ones download. Started only when the image has no
/// index (every layer falls back): a layer served lazily must not be downloaded. Dropping it
/// stops what is still downloading.
pub(crate) struct Ahead {
    downloads: HashMap<String, tokio::task::JoinHandle<Result<()>>>,
    slots: Arc<tokio::sync::Semaphore>,
}

/// Layer blobs downloading ahead at once.
const AHEAD: usize = 3;

impl Ahead {
    pub(crate) fn new() -> Self {
        Self { downloads: HashMap::new(), slots: Arc::new(tokio::sync::Semaphore::new(AHEAD)) }
    }

    /// Whether any download was started.
    pub(crate) fn started(&self) -> bool {
        !self.downloads.is_empty()
    }

    /// Starts downloading `layer` into the content store.
    pub(crate) fn start(
        &mut self,
        repo: Arc<Repository>,
        channel: Channel,
        ctx: Ctx,
        layer: oci_spec::image::Descriptor,
    ) {
        let slots = self.slots.clone();
        let digest = layer.digest().to_string();
        self.downloads.entry(digest).or_insert_with(|| {
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await?;
                store_layer_blob(&repo, &mut ContentClient::new(channel), &ctx, &layer).await
            })
        });
    }

    /// Waits for `digest`'s download, if one was started.
    pub(crate) async fn wait(&mut self, digest: &str) -> Option<Result<()>> {
        let handle = self.downloads.remove(digest)?;
        Some(handle.await.map_err(anyhow::Error::from).and_then(|r| r))
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        for handle in self.downloads.values() {
            handle.abort();
        }
    }
}

/// The ingest (containerd's name for an unfinished write) of clip's pull for `digest`.
fn ingest_ref(digest: &str) -> String {
    format!("clip-pull-{digest}")
}

/// One message of a content write of blob `digest` (`total` bytes) at `offset`.
fn write_request(
    digest: &str,
    total: u64,
    action: WriteAction,
    offset: u64,
    data: Vec<u8>,
    labels: HashMap<String, String>,
) -> WriteContentRequest {
    WriteContentRequest {
        action: action as i32,
        r#ref: ingest_ref(digest),
        total: total as i64,
        expected: digest.to_string(),
        offset: offset as i64,
        data,
        labels,
    }
}

/// Streams layer blob `layer` from the registry into the content store, [`MESSAGE`] bytes per
/// write with at most [`QUEUE`] writes waiting. The registry's bytes are checked against the
/// descriptor's size and digest as they pass ([`Repository::blob_stream`]); the commit is sent
/// only after the last of them passed, and on any failure the partial ingest is aborted, so
/// the store never holds a blob that is not the descriptor's. A blob already in the store is
/// not downloaded again.
pub(crate) async fn store_layer_blob(
    repo: &Repository,
    content: &mut ContentClient<Channel>,
    ctx: &Ctx,
    layer: &oci_spec::image::Descriptor,
) -> Result<()> {
    let digest = layer.digest().to_string();
    if content.info(ctx.req(InfoRequest { digest: digest.clone() })?).await.is_ok() {
        return Ok(());
    }
    let size = layer.size();
    let chunks = repo
        .blob_stream(&digest, size, clip_registry::Timeouts::default().request)
        .await
        .with_context(|| format!("downloading {digest}"))?;
    let (mut tx, rx) = futures::channel::mpsc::channel::<WriteContentRequest>(QUEUE);
    let produce = async move {
        let mut chunks = std::pin::pin!(chunks);
        let mut buf = Vec::with_capacity(MESSAGE);
        let mut offset = 0u64;
        let mut done = false;
        let (mut waited_registry, mut waited_containerd) = (Duration::ZERO, Duration::ZERO);
        // Each message is filled to exactly MESSAGE bytes (never grown past it: its capacity is
        // what a queued write holds), the last one with what is left.
        while !done {
            let t = Instant::now();
            let next = chunks.next().await;
            waited_registry += t.elapsed();
            let chunk = match next {
                Some(chunk) => chunk.with_context(|| format!("downloading {digest}"))?,
                None => {
                    done = true;
                    bytes::Bytes::new()
                }
            };
            let mut rest = &chunk[..];
            while !rest.is_empty() || (done && !buf.is_empty()) {
                let take = (MESSAGE - buf.len()).min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buf.len() == MESSAGE || (done && rest.is_empty()) {
                    let data = std::mem::replace(&mut buf, Vec::with_capacity(MESSAGE));
                    let n = data.len() as u64;
                    let write = write_request(&digest, size, WriteAction::Write, offset, data, HashMap::new());
                    // A send fails only when containerd ended the write: its answer says why.
                    let t = Instant::now();
                    if tx.send(write).await.is_err() {
                        return Ok(());
                    }
                    waited_containerd += t.elapsed();
                    offset += n;
                }
            }
        }
        tracing::debug!(
            layer = %digest,
            registry_s = waited_registry.as_secs_f64(),
            containerd_s = waited_containerd.as_secs_f64(),
            "layer blob streamed: time spent waiting for the registry's bytes and for containerd to take them"
        );
        let _ = tx.send(write_request(&digest, size, WriteAction::Commit, offset, Vec::new(), HashMap::new())).await;
        anyhow::Ok(())
    };
    let consume = async {
        let mut answers = content.write(ctx.req(rx)?).await?.into_inner();
        while let Some(answer) = answers.next().await {
            answer?;
        }
        anyhow::Ok(())
    };
    let (produced, consumed) = futures::join!(produce, consume);
    let failed = match (produced, consumed) {
        (Err(e), _) => e,
        (Ok(()), Ok(())) => return Ok(()),
        (Ok(()), Err(e)) => match e.downcast_ref::<containerd_client::tonic::Status>() {
            // Another pull committed the same blob meanwhile.
            Some(s) if s.code() == Code::AlreadyExists => return Ok(()),
            Some(s) => anyhow::anyhow!("writing {} to the content store: {}", layer.digest(), s.message()),
            None => e,
        },
    };
    if let Err(s) = content.abort(ctx.req(AbortRequest { r#ref: ingest_ref(layer.digest().as_ref()) })?).await
        && s.code() != Code::NotFound
    {
        tracing::warn!(layer = %layer.digest(), error = %s.message(), "could not abort the partial download in containerd's content store");
    }
    Err(failed)
}

/// Writes a small blob held in memory (a manifest, a config) into the content store, then
/// commits it; existing content only gets its labels.
pub(crate) async fn write_content(
    content: &mut ContentClient<Channel>,
    ctx: &Ctx,
    digest: &str,
    data: Vec<u8>,
    labels: HashMap<String, String>,
) -> Result<()> {
    let total = data.len() as u64;
    let mut msgs: Vec<WriteContentRequest> = data
        .chunks(MESSAGE)
        .zip((0..).step_by(MESSAGE))
        .map(|(piece, offset)| write_request(digest, total, WriteAction::Write, offset, piece.to_vec(), HashMap::new()))
        .collect();
    msgs.push(write_request(digest, total, WriteAction::Commit, total, Vec::new(), labels.clone()));
    match content.write(ctx.req(futures::stream::iter(msgs))?).await {
        Ok(resp) => {
            let mut stream = resp.into_inner();
            while let Some(m) = stream.next().await {
                match m {
                    Ok(_) => {}
                    Err(s) if s.code() == Code::AlreadyExists => {
                        return set_content_labels(content, ctx, digest, labels).await;
                    }
                    Err(s) => bail!("writing {digest} to the content store: {}", s.message()),
                }
            }
            Ok(())
        }
        Err(s) if s.code() == Code::AlreadyExists => set_content_labels(content, ctx, digest, labels).await,
        Err(s) => bail!("writing {digest} to the content store: {}", s.message()),
    }
}

async fn set_content_labels(
    content: &mut ContentClient<Channel>,
    ctx: &Ctx,
    digest: &str,
    labels: HashMap<String, String>,
) -> Result<()> {
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    content
        .update(ctx.req(containerd_client::services::v1::UpdateRequest {
            info: Some(containerd_client::services::v1::Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types_14::FieldMask { paths }),
        })?)
        .await
        .with_context(|| format!("labelling {digest}"))?;
    Ok(())
}
