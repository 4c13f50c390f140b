//! `clip-bench`: clip's benchmarks as binaries over the test bed (`clip-integration`), run by
//! hand as root with a release build — `cold-start` (pull to exit against overlayfs, SOCI and
//! eStargz, on loopback and a slow link), `scale` (many small files) and `index-bench` (the
//! indexer on the numpy layer). `docs/benchmarks.md` gives the commands and the results. This
//! library holds what they share: the statistics of repeated runs.

/// The median of `v` (the upper one for an even count); `T::default()` for none.
pub fn median<T: Copy + PartialOrd + Default>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Largest minus smallest of `v` (0 for none).
pub fn spread(v: &[f64]) -> f64 {
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    if v.is_empty() { 0.0 } else { max - min }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert!((median(&[3.0_f64, 1.0, 2.0]) - 2.0).abs() < f64::EPSILON);
        assert_eq!(median(&[std::time::Duration::from_secs(4), std::time::Duration::from_secs(1)]).as_secs(), 4);
        assert!((median::<f64>(&[])).abs() < f64::EPSILON);
        assert!((spread(&[1.0, 4.0, 2.0]) - 3.0).abs() < f64::EPSILON);
        assert!(spread(&[]).abs() < f64::EPSILON);
    }
}
