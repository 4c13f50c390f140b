//! The root-only credential store: the `clip.*` credential labels of each image, kept on disk
//! (directory 0700, files 0600) so that lazily served layers keep reading after a restart,
//! and deleted once their lifetime (`[lazy] credential_ttl_s`) has passed. Values are never
//! logged; file names are hashes of the image reference.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    image_ref: String,
    expires_at: u64,
    labels: BTreeMap<String, String>,
}

/// The store under `<root>/credentials`.
#[derive(Debug)]
pub struct CredentialStore {
    dir: PathBuf,
    ttl_s: u64,
}

/// One unexpired entry of the store.
#[derive(Debug, PartialEq, Eq)]
pub struct KeptEntry {
    pub key: String,
    pub labels: BTreeMap<String, String>,
    /// Unix seconds after which it is not used.
    pub expires_at: u64,
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl CredentialStore {
    pub fn open(root: &std::path::Path, ttl_s: u64) -> std::io::Result<Self> {
        let dir = root.join("credentials");
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        Ok(Self { dir, ttl_s })
    }

    fn path(&self, image_ref: &str) -> PathBuf {
        self.dir.join(format!("{}.json", hex::encode(Sha256::digest(image_ref.as_bytes()))))
    }

    /// When an entry saved now expires (unix seconds).
    pub fn expiry_from_now(&self) -> u64 {
        now().saturating_add(self.ttl_s)
    }

    /// Saves the credential labels of an image (replacing earlier ones) until `expires_at`.
    pub fn save(&self, image_ref: &str, labels: &BTreeMap<String, String>, expires_at: u64) -> std::io::Result<()> {
        let stored = Stored { image_ref: image_ref.to_string(), expires_at, labels: labels.clone() };
        let bytes = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
        let path = self.path(image_ref);
        clip_fsutil::atomic_write(&path, &bytes, 0o600, clip_fsutil::Durability::Durable)
    }

    /// Every unexpired entry; expired and unreadable ones are deleted.
    pub fn load(&self) -> Vec<KeptEntry> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let parsed = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Stored>(&b).ok());
            match parsed {
                Some(s) if s.expires_at > now() => {
                    out.push(KeptEntry { key: s.image_ref, labels: s.labels, expires_at: s.expires_at });
                }
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_only_and_expiring() {
        let root = tempfile::tempdir().expect("tmp");
        let store = CredentialStore::open(root.path(), 3600).expect("open");
        let labels = BTreeMap::from([("k".to_string(), "u:p".to_string())]);
        let until = store.expiry_from_now();
        store.save("reg/app:1", &labels, until).expect("save");
        let md = fs::metadata(store.path("reg/app:1")).expect("stat");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&store.dir).expect("dir").permissions().mode() & 0o777, 0o700);
        assert_eq!(
            store.load(),
            vec![KeptEntry { key: "reg/app:1".to_string(), labels: labels.clone(), expires_at: until }]
        );
        let expired = CredentialStore::open(root.path(), 0).expect("open");
        expired.save("reg/app:1", &labels, expired.expiry_from_now()).expect("save");
        assert!(expired.load().is_empty());
        assert!(!store.path("reg/app:1").exists(), "expired entries are deleted");
    }
}
