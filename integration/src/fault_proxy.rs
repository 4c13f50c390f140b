//! A loopback HTTP proxy in front of a registry that injects faults. Each connection carries
//! one request (both sides are told `Connection: close`), so faults hit single requests:
//! - [`Fault::Cycle`]: connection `n` gets, by `n % 4`: passed through, `503`, reset before
//!   any answer, or the answer cut off halfway — never more than three faults in a row;
//! - [`Fault::FlipByte`]: responses of blob GETs pass with one body byte inverted;
//! - [`Fault::Down`]: every connection is closed at once (a registry that disappeared);
//! - [`Fault::Random`]: a given share of connections get one of those faults or a delay;
//! - [`Fault::IgnoreRange`]: requests lose their `Range` header (a registry that ignores it);
//! - [`Fault::EndlessBody`]: every request is answered with the given status and an endless
//!   chunked body (a hostile registry), [`FaultProxy::hostile_bytes`] counting what was sent;
//! - [`Fault::CutWholeBlobs`]: answers to blob GETs without `Range` over 1 MiB are cut off halfway;
//! - [`Fault::None`]: pass through.

use anyhow::Result;
use parking_lot::Mutex;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Cycle,
    FlipByte,
    Down,
    /// About this percentage of connections get a fault, chosen pseudo-randomly (seeded by the
    /// connection number): `503`, reset, answer cut off, one body byte of a blob flipped, or
    /// an answer delayed 2 s.
    Random(u8),
    IgnoreRange,
    EndlessBody(u16),
    /// Answers' bodies go out in 64 KiB pieces, this many milliseconds apart (a slow link).
    Trickle(u64),
    /// The answer's head, then nothing: a registry that stalls.
    Stall,
    /// A whole blob's answer (a blob GET without `Range`) of more than 1 MiB is cut off halfway;
    /// ranged ones pass: a connection that breaks during a layer's download.
    CutWholeBlobs,
}

#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    mode: Arc<Mutex<Fault>>,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    hostile_bytes: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Proxies `127.0.0.1:<port>` to `upstream` (`host:port`).
    pub fn start(upstream: &str, mode: Fault) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let mode = Arc::new(Mutex::new(mode));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(AtomicU64::new(0));
        let hostile_bytes = Arc::new(AtomicU64::new(0));
        let (mode2, stop2, conns, faults2, up, sent) = (
            mode.clone(),
            stop.clone(),
            connections.clone(),
            faults.clone(),
            upstream.to_string(),
            hostile_bytes.clone(),
        );
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let n = conns.fetch_add(1, Ordering::SeqCst);
                        let mode = *mode2.lock();
                        let (up, f, sent) = (up.clone(), faults2.clone(), sent.clone());
                        std::thread::spawn(move || {
                            if let Fault::EndlessBody(status) = mode {
                                let _ = endless(conn, status, &sent);
                            } else {
                                let _ = handle(conn, &up, mode, n, &f);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        });
        Ok(Self { port, mode, stop, connections, faults, hostile_bytes })
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set_mode(&self, mode: Fault) {
        *self.mode.lock() = mode;
    }

    pub fn faults_injected(&self) -> u64 {
        self.faults.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Body bytes sent in [`Fault::EndlessBody`] mode, over all connections.
    pub fn hostile_bytes(&self) -> u64 {
        self.hostile_bytes.load(Ordering::SeqCst)
    }
}

/// Answers with `status` and an endless chunked body of zeros until the client hangs up (or
/// 8 GiB, a bound for the test itself).
fn endless(mut client: TcpStream, status: u16, sent: &AtomicU64) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    client.set_write_timeout(Some(std::time::Duration::from_secs(30)))?;
    let _ = read_head(&mut client)?;
    let head = format!(
        "HTTP/1.1 {status} Hostile\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    client.write_all(head.as_bytes())?;
    let piece = [b' '; 64 << 10];
    let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
    chunk.extend_from_slice(&piece);
    chunk.extend_from_slice(b"\r\n");
    for _ in 0..(8u64 << 30) / piece.len() as u64 {
        client.write_all(&chunk)?;
        sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    client.shutdown(Shutdown::Both)
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn splitmix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reads an HTTP head (up to the blank line); returns it and any bytes read past it.
fn read_head(conn: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((buf, rest));
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

/// Replaces any `Connection` header with `Connection: close`.
fn force_close(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// The head without the header named `lower_name` (lower case, with its colon).
fn drop_header(head: &[u8], lower_name: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let kept: Vec<&str> = text.split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with(lower_name)).collect();
    kept.join("\r\n").into_bytes()
}

fn handle(mut client: TcpStream, upstream: &str, mode: Fault, n: u64, faults: &AtomicU64) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    if mode == Fault::Down {
        faults.fetch_add(1, Ordering::SeqCst);
        return client.shutdown(Shutdown::Both);
    }
    let (head, body_start) = read_head(&mut client)?;
    let head_text = String::from_utf8_lossy(&head);
    let is_blob_get = head.starts_with(b"GET ") && head_text.contains("/blobs/sha256:");
    let ranged = head_text.to_ascii_lowercase().contains("\r\nrange:");
    // 1: 503, 2: reset, 3: cut off, 4: flipped byte, 5: delay.
    let cycle = match mode {
        Fault::Cycle => n % 4,
        Fault::Random(percent) => {
            let h = splitmix(n);
            if h % 100 < u64::from(percent) { 1 + (h / 100) % 5 } else { 0 }
        }
        _ => 0,
    };
    match cycle {
        1 => {
            faults.fetch_add(1, Ordering::SeqCst);
            client.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            return client.shutdown(Shutdown::Both);
        }
        2 => {
            faults.fetch_add(1, Ordering::SeqCst);
            return client.shutdown(Shutdown::Both);
        }
        _ => {}
    }
    let head = if mode == Fault::IgnoreRange { drop_header(&head, "range:") } else { head };
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&force_close(&head))?;
    up.write_all(&body_start)?;
    // Request bodies (uploads) are copied in a thread while the answer comes back.
    let mut client_reader = client.try_clone()?;
    let mut up_writer = up.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_reader, &mut up_writer);
    });
    let (resp_head, mut resp_rest) = read_head(&mut up)?;
    let mut body = Vec::new();
    up.read_to_end(&mut body)?;
    resp_rest.extend_from_slice(&body);
    client.write_all(&force_close(&resp_head))?;
    let cut_whole = mode == Fault::CutWholeBlobs && is_blob_get && !ranged && resp_rest.len() > 1 << 20;
    if (cycle == 3 || cut_whole) && !resp_rest.is_empty() {
        faults.fetch_add(1, Ordering::SeqCst);
        client.write_all(&resp_rest[..resp_rest.len() / 2])?;
        return client.shutdown(Shutdown::Both);
    }
    if cycle == 5 {
        faults.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    if (mode == Fault::FlipByte || cycle == 4) && is_blob_get && !resp_rest.is_empty() {
        faults.fetch_add(1, Ordering::SeqCst);
        let i = resp_rest.len() / 2;
        resp_rest[i] ^= 0xff;
    }
    match mode {
        Fault::Trickle(ms) => {
            for piece in resp_rest.chunks(64 << 10) {
                client.write_all(piece)?;
                client.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            return client.shutdown(Shutdown::Both);
        }
        Fault::Stall => {
            faults.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_secs(30));
            return client.shutdown(Shutdown::Both);
        }
        _ => {}
    }
    client.write_all(&resp_rest)?;
    client.shutdown(Shutdown::Both)
}
