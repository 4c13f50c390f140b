//! Image-spec computations on an image's config.

use sha2::{Digest, Sha256};

/// The chain ids of an image's layers (as containerd names their snapshots) from the config's diff ids.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{prev} {d}")))),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_ids_follow_containerd() {
        let ids = super::chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        use sha2::Digest;
        assert_eq!(ids[1], format!("sha256:{}", hex::encode(sha2::Sha256::digest("sha256:a sha256:b"))));
    }
}
