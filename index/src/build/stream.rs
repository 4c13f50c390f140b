//! [`LayerStream`]: a `Read` of the uncompressed tar stream of a layer blob that, as a side
//! effect, hashes the blob and each span and records the seek points.

use crate::IndexError;
use crate::format::{CheckpointKind, CheckpointRecord, Compression};
use crate::inflate::{GZIP, Inflater};
use sha2::{Digest, Sha256};
use std::io::{self, Read};

const IN_BUF: usize = 256 * 1024;
const OUT_BUF: usize = 256 * 1024;
/// Reads of at least this many bytes are inflated straight into the reader's buffer.
const DIRECT_READ_LEN: usize = 16 * 1024;

/// Sniffs the compression of a blob from its first bytes.
pub fn sniff(head: &[u8]) -> Compression {
    match head {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        _ => Compression::None,
    }
}

/// A decoding failure carried through `io::Error` (the tar crate only passes those on).
#[derive(Debug)]
pub struct StreamError(pub String);

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for StreamError {}

fn stream_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(StreamError(msg.into()))
}

impl From<IndexError> for io::Error {
    fn from(e: IndexError) -> Self {
        stream_err(e.to_string())
    }
}

enum Decoder {
    Gzip(Inflater),
    Zstd(zstd::stream::raw::Decoder<'static>),
    None,
}

/// What the stream learned by the end.
#[derive(Debug)]
pub struct Finished {
    pub blob_digest: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub checkpoints: Vec<CheckpointRecord>,
    /// The checkpoints' packed windows, back to back.
    pub windows: Vec<u8>,
}

pub struct LayerStream<R> {
    src: R,
    decoder: Decoder,
    compression: Compression,
    span_size: u64,
    /// Compressed bytes read from `src`, not all consumed yet.
    input: InBuf,
    /// Uncompressed bytes produced, not all handed out yet.
    output: OutBuf,
    /// Compressed bytes consumed by the decoder so far, and uncompressed bytes produced.
    pos: Offsets,
    digests: Digests,
    checkpoints: Vec<CheckpointRecord>,
    /// Where the decoder is in the blob's gzip members or zstd frames.
    unit: UnitState,
    done: bool,
    /// The checkpoints' packed windows (the packer made at the first).
    windows: Windows,
}

/// The checkpoints' windows, packed as they are taken.
#[derive(Default)]
struct Windows {
    /// Every packed window so far, back to back ([`CheckpointRecord::window_len`]).
    packed: Vec<u8>,
    /// Where zstd packs one (it writes at a buffer's start).
    scratch: Vec<u8>,
    packer: Option<zstd::bulk::Compressor<'static>>,
}

/// The input buffer: `buf[pos..len]` is read and not consumed.
struct InBuf {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// The source has ended.
    eof: bool,
}

/// The output buffer: `buf[pos..len]` is produced and not handed out.
struct OutBuf {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

#[derive(Default)]
struct Offsets {
    comp: u64,
    uncomp: u64,
}

/// The digests kept while streaming: of the whole blob, and of the current span's compressed
/// bytes.
struct Digests {
    /// Off for a stream that only inflates ([`LayerStream::inflate_only`]).
    hashing: bool,
    blob: Sha256,
    blob_len: u64,
    span: Sha256,
    /// The last compressed byte consumed (a gzip span boundary may fall inside a byte).
    last_byte: u8,
}

#[derive(Default)]
struct UnitState {
    /// A gzip member or zstd frame ended; the next one (if any) starts at `pos.comp`.
    at_start: bool,
    /// zstd: inside a frame (input ending now is truncation).
    zstd_mid_frame: bool,
}

impl<R> std::fmt::Debug for LayerStream<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStream").field("compression", &self.compression).finish_non_exhaustive()
    }
}

impl<R: Read> LayerStream<R> {
    /// A stream that only inflates: no seek points, nothing hashed (the caller checks the
    /// blob's digest itself); [`Self::finish`] then reports zero digests and sizes only.
    pub fn inflate_only(src: R) -> Result<Self, IndexError> {
        let mut stream = Self::new(src, u64::MAX)?;
        stream.digests.hashing = false;
        Ok(stream)
    }

    pub fn new(mut src: R, span_size: u64) -> Result<Self, IndexError> {
        let mut inbuf = vec![0u8; IN_BUF];
        let mut in_len = 0;
        let mut src_eof = false;
        while in_len < 4 {
            let n = src.read(&mut inbuf[in_len..])?;
            if n == 0 {
                src_eof = true;
                break;
            }
            in_len += n;
        }
        let compression = sniff(&inbuf[..in_len]);
        let decoder = match compression {
            Compression::Gzip => Decoder::Gzip(Inflater::new(GZIP)?),
            Compression::Zstd => Decoder::Zstd(zstd::stream::raw::Decoder::new()?),
            Compression::None => Decoder::None,
        };
        let mut blob_hash = Sha256::new();
        blob_hash.update(&inbuf[..in_len]);
        let first = CheckpointRecord {
            kind: CheckpointKind::Start,
            uncompressed: 0,
            comp_start: 0,
            bits: 0,
            window_len: 0,
            digest: [0; 32],
        };
        Ok(Self {
            src,
            decoder,
            compression,
            span_size,
            input: InBuf { buf: inbuf, pos: 0, len: in_len, eof: src_eof },
            output: OutBuf { buf: vec![0u8; OUT_BUF], pos: 0, len: 0 },
            pos: Offsets::default(),
            digests: Digests {
                hashing: true,
                blob: blob_hash,
                blob_len: in_len as u64,
                span: Sha256::new(),
                last_byte: 0,
            },
            checkpoints: vec![first],
            unit: UnitState::default(),
            done: false,
            windows: Windows::default(),
        })
    }

    /// Packs a checkpoint's window as the index stores it (zstd at `ZSTD_LEVEL`) onto the end of
    /// the windows buffer, as it is taken, and returns its packed length. Raw 32 KiB windows held
    /// to the end were 128 MB for a gigabyte of 256 KiB spans; one buffer per packed window, each
    /// of zstd's 32 KiB bound, were 128 MB of allocations on a million-file layer; one buffer for
    /// all of them is what the index's windows section (or blob) becomes, without a copy.
    fn pack_window(&mut self, window: &[u8]) -> io::Result<u32> {
        if window.is_empty() {
            return Ok(0);
        }
        let w = &mut self.windows;
        let packer = match &mut w.packer {
            Some(p) => p,
            none => none.insert(zstd::bulk::Compressor::new(crate::format::ZSTD_LEVEL)?),
        };
        w.scratch.clear();
        w.scratch.reserve(zstd::zstd_safe::compress_bound(window.len()));
        let packed = packer.compress_to_buffer(window, &mut w.scratch)?;
        w.packed.extend_from_slice(&w.scratch[..packed]);
        u32::try_from(packed).map_err(|_| io::Error::other("a packed window over 4 GiB"))
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Makes sure unconsumed input is buffered; false at the end of the blob.
    fn ensure_input(&mut self) -> io::Result<bool> {
        if self.input.pos < self.input.len {
            return Ok(true);
        }
        if self.input.eof {
            return Ok(false);
        }
        self.input.pos = 0;
        self.input.len = 0;
        loop {
            match self.src.read(&mut self.input.buf) {
                Ok(0) => {
                    self.input.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.input.len = n;
                    if self.digests.hashing {
                        self.digests.blob.update(&self.input.buf[..n]);
                    }
                    self.digests.blob_len += n as u64;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Marks `n` buffered input bytes as consumed by the decoder.
    fn consume(&mut self, n: usize) {
        if n > 0 {
            let bytes = &self.input.buf[self.input.pos..self.input.pos + n];
            if self.digests.hashing {
                self.digests.span.update(bytes);
            }
            self.digests.last_byte = bytes[n - 1];
            self.input.pos += n;
            self.pos.comp += n as u64;
        }
    }

    fn due(&self) -> bool {
        let last = self.checkpoints.last().map_or(0, |c| c.uncompressed);
        self.pos.uncomp - last >= self.span_size
    }

    /// Closes the current span and opens one at the current position.
    fn checkpoint(&mut self, kind: CheckpointKind, bits: u8, window_len: u32) {
        let digest: [u8; 32] = std::mem::take(&mut self.digests.span).finalize().into();
        if let Some(prev) = self.checkpoints.last_mut() {
            prev.digest = digest;
        }
        if bits > 0 {
            // The partly consumed byte starts the new span too (spans overlap by that byte).
            self.digests.span.update([self.digests.last_byte]);
        }
        self.checkpoints.push(CheckpointRecord {
            kind,
            uncompressed: self.pos.uncomp,
            comp_start: self.pos.comp - u64::from(bits > 0),
            bits,
            window_len,
            digest: [0; 32],
        });
    }

    /// Produces more uncompressed bytes into the stream's own output buffer; 0 at the end.
    fn fill(&mut self) -> io::Result<usize> {
        let mut out = std::mem::take(&mut self.output.buf);
        let produced = self.fill_into(&mut out);
        self.output.buf = out;
        let produced = produced?;
        (self.output.pos, self.output.len) = (0, produced);
        Ok(produced)
    }

    /// Produces more uncompressed bytes into `out` (at most its length); 0 at the end.
    fn fill_into(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done {
                return Ok(0);
            }
            let has_input = self.ensure_input()?;
            if self.unit.at_start && has_input {
                self.unit.at_start = false;
                self.start_next_unit()?;
                if self.done {
                    return Ok(0);
                }
            }
            let produced = match &mut self.decoder {
                Decoder::None => {
                    if !has_input {
                        self.done = true;
                        return Ok(0);
                    }
                    let last = self.checkpoints.last().map_or(0, |c| c.uncompressed);
                    let to_boundary =
                        usize::try_from(last.saturating_add(self.span_size) - self.pos.uncomp).unwrap_or(usize::MAX);
                    let n = (self.input.len - self.input.pos).min(out.len()).min(to_boundary);
                    out[..n].copy_from_slice(&self.input.buf[self.input.pos..self.input.pos + n]);
                    self.consume(n);
                    self.pos.uncomp += n as u64;
                    if self.due() && self.ensure_input()? {
                        self.checkpoint(CheckpointKind::Plain, 0, 0);
                    }
                    n
                }
                Decoder::Gzip(inf) => {
                    if !has_input {
                        if self.unit.at_start {
                            self.done = true;
                            return Ok(0);
                        }
                        return Err(stream_err("gzip stream is truncated"));
                    }
                    let step =
                        inf.inflate(&self.input.buf[self.input.pos..self.input.len], out, libz_rs_sys::Z_BLOCK)?;
                    let dt = inf.data_type();
                    self.consume(step.consumed);
                    self.pos.uncomp += step.produced as u64;
                    if step.stream_end {
                        self.unit.at_start = true;
                    } else if dt & 128 != 0 && dt & 64 == 0 && self.due() {
                        let window = match &self.decoder {
                            Decoder::Gzip(inf) => inf.dictionary()?,
                            _ => Vec::new(),
                        };
                        let window = self.pack_window(&window)?;
                        self.checkpoint(CheckpointKind::Block, (dt & 7) as u8, window);
                    }
                    if step.consumed == 0 && step.produced == 0 && !step.stream_end {
                        return Err(stream_err("gzip stream makes no progress (corrupt data)"));
                    }
                    step.produced
                }
                Decoder::Zstd(dec) => {
                    use zstd::stream::raw::Operation;
                    if !has_input {
                        if self.unit.zstd_mid_frame {
                            return Err(stream_err("zstd stream is truncated"));
                        }
                        self.done = true;
                        return Ok(0);
                    }
                    let st = dec
                        .run_on_buffers(&self.input.buf[self.input.pos..self.input.len], out)
                        .map_err(|e| stream_err(format!("corrupt zstd data: {e}")))?;
                    self.consume(st.bytes_read);
                    self.pos.uncomp += st.bytes_written as u64;
                    if st.remaining == 0 {
                        self.unit.at_start = true;
                        self.unit.zstd_mid_frame = false;
                    } else if st.bytes_read == 0 && st.bytes_written == 0 {
                        return Err(stream_err("zstd stream makes no progress (corrupt data)"));
                    } else {
                        self.unit.zstd_mid_frame = true;
                    }
                    st.bytes_written
                }
            };
            if produced > 0 {
                return Ok(produced);
            }
            if !self.ensure_input()? && self.unit.at_start {
                self.done = true;
                return Ok(0);
            }
        }
    }

    /// A gzip member or zstd frame ended and more input follows.
    fn start_next_unit(&mut self) -> io::Result<()> {
        match &mut self.decoder {
            Decoder::Gzip(inf) => {
                let rest = &self.input.buf[self.input.pos..self.input.len];
                if rest.first() != Some(&0x1f) {
                    // Trailing bytes after the last member (e.g. zero padding): part of the blob,
                    // not of the stream.
                    self.drain_trailing()?;
                    return Ok(());
                }
                inf.reset(GZIP)?;
                if self.due() {
                    self.checkpoint(CheckpointKind::Member, 0, 0);
                }
            }
            Decoder::Zstd(_) => {
                self.unit.zstd_mid_frame = false;
                if self.due() {
                    self.checkpoint(CheckpointKind::Frame, 0, 0);
                }
            }
            Decoder::None => {}
        }
        Ok(())
    }

    fn drain_trailing(&mut self) -> io::Result<()> {
        while self.ensure_input()? {
            let n = self.input.len - self.input.pos;
            self.consume(n);
        }
        self.done = true;
        Ok(())
    }

    /// Ends the pass: closes the last span and returns what was learned.
    pub fn finish(mut self) -> Result<Finished, IndexError> {
        if !self.done {
            let mut sink = [0u8; 8192];
            while Read::read(&mut self, &mut sink)? > 0 {}
        }
        if self.compression == Compression::Gzip && !self.unit.at_start && self.pos.comp > 0 {
            return Err(IndexError::Compressed("gzip stream is truncated".into()));
        }
        if self.compression == Compression::Zstd && self.unit.zstd_mid_frame {
            return Err(IndexError::Compressed("zstd stream is truncated".into()));
        }
        if self.pos.comp != self.digests.blob_len {
            return Err(IndexError::Compressed(format!(
                "decoder consumed {} of {} blob bytes",
                self.pos.comp, self.digests.blob_len
            )));
        }
        let digest: [u8; 32] = std::mem::take(&mut self.digests.span).finalize().into();
        if let Some(last) = self.checkpoints.last_mut() {
            last.digest = digest;
        }
        Ok(Finished {
            blob_digest: self.digests.blob.finalize().into(),
            compressed_size: self.digests.blob_len,
            uncompressed_size: self.pos.uncomp,
            checkpoints: self.checkpoints,
            windows: self.windows.packed,
        })
    }
}

impl<R: Read> Read for LayerStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.output.pos == self.output.len {
            // A large read takes the bytes straight from the decoder: no copy through our buffer.
            if buf.len() >= DIRECT_READ_LEN {
                return self.fill_into(buf);
            }
            if self.fill()? == 0 {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.output.len - self.output.pos);
        buf[..n].copy_from_slice(&self.output.buf[self.output.pos..self.output.pos + n]);
        self.output.pos += n;
        Ok(n)
    }
}
