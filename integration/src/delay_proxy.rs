//! A loopback TCP proxy that delays every byte by a fixed one-way latency in each direction,
//! pipelined: chunks are released `delay` after they arrived, so the delay alone does not cap
//! throughput. Optionally it also *is* the link ([`DelayProxy::shaped`]): each direction is one
//! wire of a fixed rate that every connection shares, so a chunk waits for the chunks queued
//! before it, crosses in size/rate, and arrives one-way delay later — the whole link in user
//! space, with no `tc` and no network namespace (the emulation the issue-29 figures from outside
//! our harness used).

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A shaped wire's longest queue: a reader stops taking bytes off its socket while the wire is
/// busy for longer than this ahead (TCP's flow control then holds the sender back), like the
/// 100 ms `latency` of the `tc tbf` link, which drops instead.
const MAX_QUEUE: Duration = Duration::from_millis(100);

/// A running proxy on `127.0.0.1:<port>`. Stops accepting on drop; open connections end when
/// either side closes.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

/// One direction of a shaped link: every connection's chunks cross it one after the other.
#[derive(Debug)]
struct Wire {
    bytes_per_s: f64,
    /// When the chunks queued so far will have crossed.
    free_at: Mutex<Instant>,
}

impl Wire {
    fn new(rate_mbit: u32) -> Arc<Self> {
        Arc::new(Self { bytes_per_s: f64::from(rate_mbit) * 1e6 / 8.0, free_at: Mutex::new(Instant::now()) })
    }

    /// Queues `n` bytes read now; returns when they will have crossed.
    fn send(&self, n: usize) -> Instant {
        let now = Instant::now();
        let mut free_at = self.free_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let crossed = (*free_at).max(now) + Duration::from_secs_f64(n as f64 / self.bytes_per_s);
        *free_at = crossed;
        crossed
    }

    /// How long the wire is busy from now on.
    fn backlog(&self) -> Duration {
        let free_at = *self.free_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        free_at.saturating_duration_since(Instant::now())
    }
}

/// The two wires of a shaped link (client to server, server to client).
#[derive(Debug, Clone)]
struct Wires {
    up: Arc<Wire>,
    down: Arc<Wire>,
}

impl DelayProxy {
    /// A proxy to `target` that adds `one_way` in each direction and nothing else.
    pub fn start(target: SocketAddr, one_way: Duration) -> Result<Self> {
        Self::listen(target, one_way, None)
    }

    /// A proxy to `target` that is a link of `rate_mbit` Mbit/s each way, shared by all its
    /// connections, with `one_way` latency in each direction.
    pub fn shaped(target: SocketAddr, one_way: Duration, rate_mbit: u32) -> Result<Self> {
        Self::listen(target, one_way, Some(Wires { up: Wire::new(rate_mbit), down: Wire::new(rate_mbit) }))
    }

    fn listen(target: SocketAddr, one_way: Duration, wires: Option<Wires>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind proxy")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let wires = wires.clone();
                        std::thread::spawn(move || {
                            if let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                                splice(client, server, one_way, wires);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, stop })
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn splice(client: TcpStream, server: TcpStream, delay: Duration, wires: Option<Wires>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
    let (up, down) = match wires {
        Some(w) => (Some(w.up), Some(w.down)),
        None => (None, None),
    };
    let upstream = std::thread::spawn(move || pump(client, s2, delay, up.as_deref()));
    pump(server, c2, delay, down.as_deref());
    let _ = upstream.join();
}

/// Copies `from` to `to`, each chunk released `delay` after it arrived — or, on a shaped link,
/// after it crossed `wire`.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, wire: Option<&Wire>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let Ok(mut to2) = to.try_clone() else { return };
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to2.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to2.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(over) = wire.and_then(|w| w.backlog().checked_sub(MAX_QUEUE)) {
            std::thread::sleep(over);
        }
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let crossed = wire.map_or_else(Instant::now, |w| w.send(n));
                if tx.send((crossed + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every connection with `len` bytes of a pattern, after reading one byte.
    fn pattern_server(len: usize) -> Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut one = [0u8; 1];
                    if stream.read_exact(&mut one).is_ok() {
                        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                        let _ = stream.write_all(&data);
                    }
                });
            }
        });
        Ok(addr)
    }

    fn fetch(proxy: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(proxy)?;
        s.write_all(b"?")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_shaped_link_carries_every_byte_at_its_rate_shared_by_all_its_connections() -> Result<()> {
        const LEN: usize = 1_000_000;
        let proxy = DelayProxy::shaped(pattern_server(LEN)?, Duration::from_millis(10), 8)?;
        let addr = proxy.addr();
        let started = Instant::now();
        let readers: Vec<_> = (0..2).map(|_| std::thread::spawn(move || fetch(addr))).collect();
        for r in readers {
            let got = r.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
            assert_eq!(got.len(), LEN);
            assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        }
        // 2 MB over one 1 MB/s wire: never less than 2 s (had each connection its own wire, or
        // none, it would take half that or less).
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(2), "{took:?}");
        Ok(())
    }

    #[test]
    fn every_answer_arrives_a_round_trip_after_its_question() -> Result<()> {
        let proxy = DelayProxy::start(pattern_server(10)?, Duration::from_millis(50))?;
        let started = Instant::now();
        assert_eq!(fetch(proxy.addr())?.len(), 10);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        Ok(())
    }
}
