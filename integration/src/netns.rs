//! A slow link: a network namespace of the test's own, reached from the host through a veth pair
//! whose both ends are rate-limited by the kernel (`tc` token bucket filter), plus a delaying TCP
//! proxy on loopback ([`DelayProxy`]) that adds half the round trip in each direction.
//!
//! Why not `netem`: this machine's kernel is built without `sch_netem` (only `tbf`, `htb` and
//! `ingress` are there), so the delay is added in user space, pipelined (every chunk is released
//! one-way-delay after it arrived, so throughput is not capped by the delay).
//!
//! Addresses are a /30 in 10.251.0.0/16 on the veth pair only; nothing is routed anywhere else.

use crate::run;
use anyhow::{Context, Result};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use crate::delay_proxy::DelayProxy;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a shaped veth link to the host. Deleted on drop (stop what runs in it
/// first).
#[derive(Debug)]
pub struct SlowLink {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
    rtt: Duration,
}

impl SlowLink {
    /// A link of `rate_mbit` Mbit/s with `rtt_ms` ms round trip.
    pub fn new(rate_mbit: u32, rtt_ms: u32) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 10_000) * 16 + n % 16;
        let name = format!("clip-{id}");
        let host_if = format!("cl{id}h");
        let ns_if = format!("cl{id}n");
        let (a, b) = ((id / 64) % 256, (id % 64) * 4);
        let host_ip = format!("10.251.{a}.{}", b + 1);
        let ns_ip = format!("10.251.{a}.{}", b + 2);
        let link = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
            rtt: Duration::from_millis(u64::from(rtt_ms)),
        };
        let rate = format!("{rate_mbit}mbit");
        let tbf = ["root", "tbf", "rate", &rate, "burst", "64kb", "latency", "100ms"];
        let ip = |args: &[&str]| run(Command::new("ip").args(args)).map(|_| ());
        ip(&["netns", "add", &name])?;
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let nsx = |args: &[&str]| run(Command::new("ip").args(["netns", "exec", &name]).args(args)).map(|_| ());
        nsx(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        nsx(&["ip", "link", "set", &ns_if, "up"])?;
        nsx(&["ip", "link", "set", "lo", "up"])?;
        run(Command::new("tc").args(["qdisc", "add", "dev", &host_if]).args(tbf)).context("tc on the host end")?;
        nsx(&[&["tc", "qdisc", "add", "dev", &ns_if][..], &tbf[..]].concat()).context("tc on the namespace end")?;
        Ok(link)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end's address.
    pub fn host_ip(&self) -> &str {
        &self.host_ip
    }

    /// The address of the namespace end, where servers inside it listen.
    pub fn ns_ip(&self) -> &str {
        &self.ns_ip
    }

    /// The prefix that runs a command inside the namespace.
    pub fn wrap(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// A loopback TCP proxy to `port` on the namespace's address that adds the link's round trip.
    pub fn proxy_to(&self, port: u16) -> Result<DelayProxy> {
        DelayProxy::start(format!("{}:{port}", self.ns_ip).parse()?, self.rtt / 2)
    }

    /// The qdiscs of the host end, as `tc` shows them.
    pub fn host_qdisc(&self) -> Result<String> {
        crate::run_stdout(Command::new("tc").args(["qdisc", "show", "dev", &self.host_if]))
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
    }
}
