//! Reading a snapshotter's Prometheus endpoint (`metrics_address`) in tests.

use std::process::Command;

/// The metrics text served on `127.0.0.1:port` (empty when it does not answer).
pub fn scrape(port: u16) -> String {
    crate::run_stdout(Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]))
        .unwrap_or_default()
}

/// The sum of the samples of `family` (a name followed by `{`, e.g.
/// `clip_snapshotter_profiles_total{`) whose labels contain every one of `with`.
pub fn sum(text: &str, family: &str, with: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(family) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
