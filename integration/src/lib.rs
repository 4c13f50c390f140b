//! `clip-integration`: the project's own test bed, shared by the integration tests and benchmarks.
//!
//! Everything a test starts lives in a private temp dir ([`TestDir`]) with its own sockets and
//! ports, and is stopped by PID and unmounted when its guard drops, also when the test panics:
//! - [`registry::Registry`]: a Distribution registry (`docker-registry`) on a free loopback port,
//!   plain HTTP or TLS (self-signed CA) with htpasswd basic auth, with its access log parsed for
//!   bytes and requests per path;
//! - [`containerd::Containerd`]: a private containerd (Debian's 1.6, or 2.x from
//!   [`gotools`] with the shipped config snippet) with its own root, state, sockets and
//!   `hosts.toml` dir, a `[proxy_plugins.clip]` entry and the CRI settings this machine needs;
//! - [`images`]: test images built without internet (busybox from scratch; Debian minbase +
//!   python3 + numpy in four layers), cached between runs as OCI layouts;
//! - [`snapshotter::ClipSnapshotter`]: a `clip-snapshotter` daemon with its own root and socket;
//! - [`tree`]: a file tree as a comparable value (types, modes, owners, sizes, xattrs, contents);
//! - [`netns::SlowLink`]: a network namespace reached through a veth pair shaped with `tc`
//!   (100 Mbit/s, 20 ms round trip) for benchmarks.
//!
//! Tests that need root, containerd or buildah call [`require_root`] first; the suite runs as root
//! in CI.

pub mod bed;
pub mod containerd;
pub mod cri;
pub mod delay_proxy;
pub mod ecr_stub;
pub mod fault_proxy;
pub mod gotools;
pub mod http_stub;
pub mod images;
pub mod kube;
pub mod kubelet;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod registry;
pub mod snapshotter;
mod testdir;
pub mod token_service;
pub mod tree;

pub use testdir::TestDir;

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command, Output};

/// Panics with a clear message unless running as root (the suite's tests mount and run containers).
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root (mounts, containerd, runc); run the suite as root");
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("cannot start {}", cmd.get_program().display()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}):\nstdout: {}\nstderr: {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs a command and returns its stdout as a string.
pub fn run_stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

/// A TCP port on 127.0.0.1 that nothing holds now and that the kernel will not hand out on its own.
///
/// A port the kernel chose for `bind(0)` lies in its ephemeral range, where every outgoing
/// connection (etcd's, a registry client's, another test's) also takes its local port: between
/// this call and the daemon's own `bind`, often seconds later, one of them can take it (CI saw
/// kube-apiserver fail with "address already in use" that way). So ports come from below the
/// ephemeral range, in an order that differs per process and never repeats within one, and each
/// is checked free by binding it.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = private_port_range();
    let span = u32::from(high - low);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + ((start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {low}..{high}")
}

/// The ports tests hand out: up to 12,000 just below the kernel's ephemeral range (ports above
/// 10,000 only, out of the way of well-known services).
fn private_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.max(11_000);
    (high.saturating_sub(12_000).max(10_000), high)
}

/// Waits until `check` returns true, polling every 50 ms, for at most `timeout`.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    check()
}

/// Drops the page cache, dentries and inodes (benchmarks' cold runs).
pub fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

pub use clip_fsutil::mountinfo::unmount_below;

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// sha256 of bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_kernels_ephemeral_range() {
        let (_, high) = private_port_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a free port")).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice: {ports:?}");
        for &port in &ports {
            assert!(port < high, "{port} is in the ephemeral range (from {high})");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("a handed-out port is free");
        }
    }
}
