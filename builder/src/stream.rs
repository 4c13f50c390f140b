//! Layer blobs as they arrive from the registry: streamed to a file ([`download`]) or straight
//! into a blocking consumer such as the indexer ([`ChunkReader`]), so that fetching, inflating
//! and walking the tar overlap instead of running one after another.

use anyhow::{Context, Result};
use bytes::{Buf, Bytes};
use clip_registry::Repository;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// The bytes of layer `digest` as they arrive from the registry, each error naming the layer.
pub(crate) async fn layer_chunks(
    repo: &Repository,
    digest: &str,
) -> Result<impl futures::Stream<Item = Result<Bytes>> + use<>> {
    let resp = repo.blob_response(digest).await.with_context(|| format!("fetching layer {digest}"))?;
    let digest = digest.to_string();
    Ok(resp.bytes_stream().map(move |chunk| chunk.with_context(|| format!("reading layer {digest}"))))
}

/// Streams layer `digest` into the file `path`, showing each chunk to `seen` first; returns its
/// size.
pub(crate) async fn download(
    repo: &Repository,
    digest: &str,
    path: &std::path::Path,
    mut seen: impl FnMut(&[u8]),
) -> Result<u64> {
    let mut chunks = std::pin::pin!(layer_chunks(repo, digest).await?);
    let mut file = tokio::fs::File::create(path).await?;
    let mut size = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        seen(&chunk);
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(size)
}

/// A blocking [`std::io::Read`] over chunks sent from async code: end of data when every sender
/// is gone. Read it on a blocking thread (`spawn_blocking`), never on the runtime's workers.
pub(crate) struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChunkReader {
    /// A reader and the sender that feeds it, buffering up to `chunks` chunks.
    pub(crate) fn channel(chunks: usize) -> (tokio::sync::mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(chunks);
        (tx, Self { rx, current: Bytes::new() })
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkReader;
    use std::io::Read;

    #[test]
    fn a_chunk_reader_yields_every_byte_in_order_then_ends() {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let (tx, mut reader) = ChunkReader::channel(2);
        let sender = std::thread::spawn(move || {
            rt.block_on(async {
                for i in 0..50u8 {
                    let chunk = bytes::Bytes::from(vec![i; usize::from(i) * 7 + 1]);
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
            });
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).expect("read");
        sender.join().expect("sender");
        let want: Vec<u8> = (0..50u8).flat_map(|i| vec![i; usize::from(i) * 7 + 1]).collect();
        assert_eq!(got, want);
    }
}
