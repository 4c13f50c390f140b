//! The daemon's link to its fd keeper ([`clip_layerfs::keeper`]): every new mount's `/dev/fuse`
//! descriptor is handed to it, so a restarted daemon finds its mounts alive and serves them
//! again instead of breaking the containers that use them.

use super::error::RemoteError;
use clip_config::SnapshotterConfig;
use clip_layerfs::keeper::{KeeperClient, Kept};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The daemon's link to its fd keeper: connected at start when one runs (to take back what
/// it holds), started with the first lazy mount otherwise.
#[derive(Debug)]
pub(crate) struct KeeperHandle {
    root: PathBuf,
    orphan_timeout: std::time::Duration,
    enabled: bool,
    /// `[lazy] external_fd_keeper`: connect, never start or stop.
    external: bool,
    client: parking_lot::Mutex<Option<Arc<KeeperClient>>>,
    start_failed: std::sync::atomic::AtomicBool,
}

impl KeeperHandle {
    /// Connects to a running keeper and takes back what it holds, by snapshot id.
    pub(crate) fn new(cfg: &SnapshotterConfig) -> (Self, HashMap<u64, Kept>) {
        let handle = Self {
            root: cfg.root.clone(),
            orphan_timeout: std::time::Duration::from_secs(cfg.lazy.orphan_timeout_s),
            enabled: cfg.lazy.survive_restarts,
            external: cfg.lazy.external_fd_keeper,
            client: parking_lot::Mutex::new(None),
            start_failed: std::sync::atomic::AtomicBool::new(false),
        };
        if !handle.enabled {
            tracing::info!("survive_restarts is off: lazy mounts end with the daemon");
            return (handle, HashMap::new());
        }
        let Ok(client) = KeeperClient::connect_existing(&cfg.root) else {
            return (handle, HashMap::new());
        };
        let mut kept = HashMap::new();
        match client.list() {
            Ok(list) => {
                for k in list {
                    match k.key.parse::<u64>() {
                        Ok(id) => {
                            kept.insert(id, k);
                        }
                        Err(_) => {
                            let _ = client.drop_key(&k.key);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list the fd keeper's connections"),
        }
        tracing::info!(pid = client.pid, kept = kept.len(), "fd keeper connected");
        *handle.client.lock() = Some(Arc::new(client));
        (handle, kept)
    }

    /// The keeper, if one is connected.
    pub(crate) fn connected(&self) -> Option<Arc<KeeperClient>> {
        self.client.lock().clone()
    }

    /// Hands a new mount's FUSE connection to the keeper, started if needed. Under the
    /// handle's lock, so that [`Self::stop_if_idle`] cannot stop the keeper in between.
    pub(crate) fn keep(
        &self,
        key: &str,
        fd: std::os::fd::BorrowedFd<'_>,
        meta: &serde_json::Value,
    ) -> Result<(), RemoteError> {
        let mut guard = self.client.lock();
        if guard.is_none() && self.enabled && self.external {
            // Its own DaemonSet: it may have come up after this daemon, or been restarted.
            match KeeperClient::connect_existing(&self.root) {
                Ok(c) => {
                    tracing::info!(pid = c.pid, "fd keeper connected");
                    *guard = Some(Arc::new(c));
                }
                Err(e) => {
                    tracing::error!(error = %e, "the external fd keeper is not running; this mount will not survive a restart");
                }
            }
        } else if guard.is_none() && self.enabled && !self.start_failed.load(Ordering::Relaxed) {
            let started = std::env::current_exe()
                .map_err(RemoteError::io("finding this program"))
                .and_then(|exe| Ok(KeeperClient::connect_or_spawn(&self.root, &exe, self.orphan_timeout)?));
            match started {
                Ok(c) => {
                    tracing::info!(pid = c.pid, "fd keeper started");
                    *guard = Some(Arc::new(c));
                }
                Err(e) => {
                    self.start_failed.store(true, Ordering::Relaxed);
                    tracing::error!(error = %e, "no fd keeper; lazy mounts will not survive restarts");
                }
            }
        }
        let Some(keeper) = guard.as_ref() else { return Ok(()) };
        let put = keeper.put(key, fd, meta);
        if put.is_err() {
            // Gone (an external keeper restarted): connect again at the next mount.
            *guard = None;
        }
        Ok(put?)
    }

    /// Stops the keeper once it holds no connection (the last lazy layer went), so no idle
    /// process stays behind; the next lazy mount starts one again.
    pub(crate) fn stop_if_idle(&self) {
        if self.external {
            return;
        }
        let mut guard = self.client.lock();
        let Some(keeper) = guard.as_ref() else { return };
        match keeper.list() {
            Ok(kept) if kept.is_empty() => {
                let pid = keeper.pid;
                match keeper.exit() {
                    Ok(()) => tracing::info!(pid, "fd keeper stopped: no lazy layer left"),
                    Err(e) => tracing::warn!(pid, error = %e, "the idle fd keeper did not stop"),
                }
                *guard = None;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot list the fd keeper's connections"),
        }
    }
}
