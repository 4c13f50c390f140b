//! Layer blobs as they arrive from the registry: streamed to a file ([`download`]) or straight
//! into a blocking consumer such as the indexer ([`ChunkReader`]), so that fetching, inflating
//! and walking the tar overlap instead of running one after another.

use anyhow::{Context, Result};
use bytes::{Buf, Bytes};
use clip_registry::Repository;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// Streams layer `digest` chunk by chunk into `each`, in order; returns its size.
pub(crate) async fn stream_layer<F, Fut>(repo: &Repository, digest: &str, mut each: F) -> Result<u64>
where
    F: FnMut(Bytes) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let resp = repo.blob_response(digest).await.with_context(|| format!("fetching layer {digest}"))?;
    let mut stream = resp.bytes_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("reading layer {digest}"))?;
        size += chunk.len() as u64;
        each(chunk).await?;
    }
    Ok(size)
}

/// Streams layer `digest` into the file `path`, showing each chunk to `seen` first; returns its
/// size.
pub(crate) async fn download(
    repo: &Repository,
    digest: &str,
    path: &std::path::Path,
    mut seen: impl FnMut(&[u8]),
) -> Result<u64> {
    let file = tokio::sync::Mutex::new(tokio::fs::File::create(path).await?);
    let size = stream_layer(repo, digest, |chunk| {
        seen(&chunk);
        let file = &file;
        async move { Ok(file.lock().await.write_all(&chunk).await?) }
    })
    .await?;
    file.lock().await.flush().await?;
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
