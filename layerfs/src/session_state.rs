//! The state of a FUSE connection that must outlive the daemon serving it, so that a restarted
//! daemon ([`super::reattach`]) answers opens the way the kernel expects:
//! - the passthrough backing id of each inode: the kernel refuses a second, different backing
//!   file for an inode still open through the first, and a running container keeps its
//!   binaries and libraries open; so an inode's old id is wrapped again, never a new one made.
//!   An id is logged (`backing`, `<inode> <id>` lines) before the open using it is answered,
//!   and its closing at the inode's last passthrough close too (`<inode> -`);
//! - the open handles of each inode by mode (cached, passthrough): the kernel refuses to mix
//!   the modes on one inode (the open fails with EIO), so a new open follows the open handles.
//!   Kept in `modes`, a table of two u32 per inode written in place on every change.
//!
//! Both live in `<root>/sessions/<snapshot id>/`, written without fsync: they only matter
//! while the kernel connection lives, which a machine crash ends anyway.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Open handles of an inode: (cached mode, passthrough mode).
pub type OpenModes = (u32, u32);

#[derive(Debug)]
pub struct SessionState {
    dir: PathBuf,
    backing: Mutex<std::fs::File>,
    modes: std::fs::File,
    /// Backing ids an earlier daemon registered on this connection, not yet wrapped again.
    adopted: Mutex<HashMap<u64, u32>>,
    /// Open handles an earlier daemon left, by inode.
    inherited_modes: Mutex<HashMap<u64, OpenModes>>,
}

impl SessionState {
    /// A new connection: empty state in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let backing = std::fs::File::create(dir.join("backing"))?;
        let modes =
            std::fs::File::options().read(true).write(true).create(true).truncate(true).open(dir.join("modes"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            backing: Mutex::new(backing),
            modes,
            adopted: Mutex::new(HashMap::new()),
            inherited_modes: Mutex::new(HashMap::new()),
        })
    }

    /// A kept connection served again: adopts the state in `dir` (malformed backing lines are
    /// skipped: a missing id only costs a fresh registration).
    pub fn adopt(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let text = std::fs::read_to_string(dir.join("backing")).unwrap_or_default();
        let adopted: HashMap<u64, u32> = text
            .lines()
            .filter_map(|l| {
                let (ino, id) = l.split_once(' ')?;
                let id = if id == "-" { None } else { Some(id.parse::<u32>().ok()?) };
                Some((ino.parse::<u64>().ok()?, id))
            })
            // A later line of an inode wins; `<inode> -` says its id was closed.
            .fold(HashMap::new(), |mut ids, (ino, id)| {
                match id {
                    Some(id) => ids.insert(ino, id),
                    None => ids.remove(&ino),
                };
                ids
            });
        let table = std::fs::read(dir.join("modes")).unwrap_or_default();
        let inherited: HashMap<u64, OpenModes> = table
            .chunks_exact(8)
            .enumerate()
            .filter_map(|(ino, c)| {
                let cached = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                let passthrough = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
                ((cached, passthrough) != (0, 0)).then_some((ino as u64, (cached, passthrough)))
            })
            .collect();
        let backing = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("backing"))?;
        let modes =
            std::fs::File::options().read(true).write(true).create(true).truncate(false).open(dir.join("modes"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            backing: Mutex::new(backing),
            modes,
            adopted: Mutex::new(adopted),
            inherited_modes: Mutex::new(inherited),
        })
    }

    /// The id an earlier daemon registered for `ino`, taken (it is logged already).
    pub fn take_adopted(&self, ino: u64) -> Option<u32> {
        self.adopted.lock().remove(&ino)
    }

    /// The open handles an earlier daemon left (taken once, to seed the in-memory table).
    pub fn take_inherited_modes(&self) -> HashMap<u64, OpenModes> {
        std::mem::take(&mut *self.inherited_modes.lock())
    }

    /// Logs a new backing id registration.
    pub fn record_backing(&self, ino: u64, id: u32) {
        let mut f = self.backing.lock();
        if let Err(e) = writeln!(f, "{ino} {id}") {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot log a backing id; after a restart this file's opens may fail");
        }
    }

    /// Logs that the backing id of `ino` was closed (its last passthrough handle went).
    pub fn record_backing_closed(&self, ino: u64) {
        let mut f = self.backing.lock();
        if let Err(e) = writeln!(f, "{ino} -") {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot log a closed backing id");
        }
    }

    /// Records the open handles of `ino`.
    pub fn store_modes(&self, ino: u64, modes: OpenModes) {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&modes.0.to_ne_bytes());
        bytes[4..].copy_from_slice(&modes.1.to_ne_bytes());
        if let Err(e) = self.modes.write_all_at(&bytes, ino.saturating_mul(8)) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot record open modes; after a restart this file's opens may fail");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_for_the_next_daemon() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sessions/1");
        let s = SessionState::create(&path).expect("create");
        s.record_backing(5, 1);
        s.record_backing(9, 2);
        s.record_backing(7, 3);
        s.record_backing_closed(7);
        s.store_modes(3, (2, 0));
        s.store_modes(9, (0, 1));
        s.store_modes(4, (1, 0));
        s.store_modes(4, (0, 0));
        drop(s);
        let backing = path.join("backing");
        std::fs::write(&backing, std::fs::read_to_string(&backing).expect("read") + "garbage\n").expect("append");
        let s = SessionState::adopt(&path).expect("adopt");
        assert_eq!(s.take_adopted(9), Some(2));
        assert_eq!(s.take_adopted(9), None);
        assert_eq!(s.take_adopted(5), Some(1));
        assert_eq!(s.take_adopted(7), None, "a closed id is not adopted");
        let modes = s.take_inherited_modes();
        assert_eq!(modes.len(), 2, "{modes:?}");
        assert_eq!(modes[&3], (2, 0));
        assert_eq!(modes[&9], (0, 1));
        drop(s);
        let s = SessionState::create(&path).expect("recreate");
        assert!(s.take_adopted(5).is_none());
        assert!(SessionState::adopt(&path).expect("adopt").take_inherited_modes().is_empty());
    }
}
