//! [`Inflating`]: a layer's uncompressed stream inflated on a thread of its own, so that a
//! layer is inflated (and its blob and spans hashed) while the tar stream before it is parsed
//! and its tree built, and its diff ID (when there is one to check) hashed on a third thread:
//! on two cores, indexing takes about its longest stage, not the sum of all three. Which stage
//! is longest depends on the layer: inflating for large files (a 3.3 GB pip layer), the tar
//! walk and tree for many small ones (a million files).
//!
//! Chunks go round a ring of bounded channels — inflated, read by the tar parser, hashed, back
//! to be filled again — so at most a few [`CHUNK_LEN`] buffers exist however fast a stage runs.
//! The inflating thread stops at the end of the blob, at the first error (which the reader then
//! reports where the stream would have), or when the reader is gone.

use super::stream::{Finished, LayerStream};
use crate::IndexError;
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

/// Uncompressed bytes per chunk.
const CHUNK_LEN: usize = 1 << 20;
/// Chunks waiting between two stages at most.
const CHUNKS_IN_FLIGHT: usize = 3;

/// The threads inflating a layer and hashing its diff ID: [`Self::finish`] waits for them.
pub struct Inflating<'scope> {
    inflater: ScopedJoinHandle<'scope, Result<Finished, IndexError>>,
    hasher: Option<ScopedJoinHandle<'scope, String>>,
}

/// The uncompressed stream as the inflating thread hands it over.
pub struct InflatedChunks {
    chunks: Receiver<io::Result<Vec<u8>>>,
    /// Where a chunk goes once read: to the hasher (which must see every one), or back to be
    /// filled again (if there is room).
    consumed: SyncSender<Vec<u8>>,
    hashing: bool,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl std::fmt::Debug for InflatedChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflatedChunks").field("ended", &self.ended).finish_non_exhaustive()
    }
}

impl<'scope> Inflating<'scope> {
    /// Starts inflating `stream` on a thread of `scope`; `diff_id`: hash what it inflates, on
    /// another.
    pub fn spawn<'env, R: Read + Send + 'scope>(
        scope: &'scope Scope<'scope, 'env>,
        mut stream: LayerStream<R>,
        diff_id: bool,
    ) -> (Self, InflatedChunks) {
        let (to_reader, chunks) = sync_channel::<io::Result<Vec<u8>>>(CHUNKS_IN_FLIGHT);
        let (to_fill, emptied) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let (consumed, hasher) = if diff_id {
            let (to_hasher, read) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
            let refill = to_fill;
            let hasher = scope.spawn(move || {
                let mut hash = Sha256::new();
                // Every chunk the reader read, in order, until the reader is gone.
                for chunk in read {
                    hash.update(&chunk);
                    // The inflater may be done; a full ring only means it has enough buffers.
                    let _ = refill.try_send(chunk);
                }
                format!("sha256:{}", hex::encode(hash.finalize()))
            });
            (to_hasher, Some(hasher))
        } else {
            (to_fill, None)
        };
        let inflater = scope.spawn(move || {
            loop {
                let mut chunk = emptied.try_recv().unwrap_or_default();
                chunk.resize(CHUNK_LEN, 0);
                let filled = fill(&mut stream, &mut chunk);
                let end = matches!(filled, Ok(0) | Err(_));
                let failed = match filled {
                    Ok(n) => {
                        chunk.truncate(n);
                        to_reader.send(Ok(chunk)).is_err()
                    }
                    Err(e) => to_reader.send(Err(e)).is_err(),
                };
                if failed {
                    return Err(IndexError::Compressed("the indexer stopped reading the layer".into()));
                }
                if end {
                    break;
                }
            }
            stream.finish()
        });
        let hashing = hasher.is_some();
        let reader = InflatedChunks { chunks, consumed, hashing, current: Vec::new(), pos: 0, ended: false };
        (Self { inflater, hasher }, reader)
    }

    /// Waits for the threads (the reader must have read to the end and be gone) and returns the
    /// diff ID (`sha256:<hex>` of the uncompressed stream, when asked for) and what the stream
    /// learned.
    pub fn finish(self) -> Result<(Option<String>, Result<Finished, IndexError>), IndexError> {
        let panicked = |_| IndexError::Invalid("an indexing thread panicked".into());
        let diff_id = self.hasher.map(|h| h.join().map_err(panicked)).transpose()?;
        Ok((diff_id, self.inflater.join().map_err(panicked)?))
    }
}

/// Reads `stream` until `buf` is full or the stream ends: the bytes read.
fn fill<R: Read>(stream: &mut LayerStream<R>, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match stream.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

impl Read for InflatedChunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.ended {
                return Ok(0);
            }
            let next = match self.chunks.recv() {
                Ok(next) => next?,
                // The thread ended without saying why: it failed to send, so it reports why.
                Err(_) => return Err(io::Error::other("the inflating thread stopped")),
            };
            self.ended = next.is_empty();
            let read = std::mem::replace(&mut self.current, next);
            if self.hashing && !read.is_empty() {
                // The hasher never waits on anything but this channel: a blocking send is safe.
                if self.consumed.send(read).is_err() {
                    return Err(io::Error::other("the hashing thread stopped"));
                }
            } else {
                // The inflater may be done; a full ring only means it has enough buffers.
                let _ = self.consumed.try_send(read);
            }
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
