//! `clip-fsutil`: the two file-system helpers every clip crate needs, in one copy each — see
//! `docs/architecture.md` for where they are used.
//! - [`atomic_write`]: replace a file so that a reader (or a restart after a crash) sees the old
//!   content or the new, never a part;
//! - [`mountinfo`]: the mounts of this process, from `/proc/self/mountinfo`, with the kernel's
//!   octal escapes undone.

pub mod mountinfo;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What [`atomic_write`] promises after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The file and its directory entry are on disk when the call returns (fsync of the file,
    /// then of the directory): records the daemon must find again.
    Durable,
    /// Readers never see a partial file while the system runs; after a crash the file may be
    /// missing or empty (never other bytes of the right length on ext4/xfs). For caches whose
    /// readers check the length and refetch.
    Cache,
}

/// Replaces `path` with `bytes`: written to a temporary name unique to this process and call in
/// the same directory, then renamed over `path`. `mode` applies to the new file (e.g. `0o600`
/// for secrets). The temporary file is removed when a step fails.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32, durability: Durability) -> std::io::Result<()> {
    let tmp = temp_name(path);
    let written = (|| {
        let create = || std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp);
        let mut f = match create() {
            // Left by an earlier process with this pid (a daemon restarted in a container often
            // gets the same one) that died mid-write: nobody else in this process has the name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp)?;
                create()?
            }
            other => other?,
        };
        f.write_all(bytes)?;
        if durability == Durability::Durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    if durability == Durability::Durable
        && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Temporary names taken so far by this process.
static TEMP_NAMES: AtomicU64 = AtomicU64::new(0);

/// `<dir>/.<name>.tmp-<pid>-<n>`: hidden, and never shared by two writers of this process.
fn temp_name(path: &Path) -> PathBuf {
    temp_name_for(path, TEMP_NAMES.fetch_add(1, Ordering::Relaxed))
}

fn temp_name_for(path: &Path, n: u64) -> PathBuf {
    let name = path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("record");
        atomic_write(&path, b"first", 0o600, Durability::Durable).expect("write");
        atomic_write(&path, b"second, longer", 0o644, Durability::Cache).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second, longer");
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o644);
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("record")]);
    }

    #[test]
    fn a_temporary_left_by_a_dead_process_with_this_pid_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("span");
        // The next names this process will take, as a crashed predecessor with the same pid
        // may have left them (a few ahead: the other tests of this binary take names too).
        let next = TEMP_NAMES.load(Ordering::Relaxed);
        for n in next..next + 16 {
            std::fs::write(temp_name_for(&path, n), b"torn").expect("stale");
        }
        atomic_write(&path, b"whole", 0o644, Durability::Cache).expect("write over a stale temporary");
        assert_eq!(std::fs::read(&path).expect("read"), b"whole");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("record");
        atomic_write(&path, b"kept", 0o600, Durability::Durable).expect("write");
        // A directory where the file should go makes the rename fail.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).expect("mkdir");
        std::fs::write(blocked.join("x"), b"").expect("fill");
        assert!(atomic_write(&blocked, b"new", 0o600, Durability::Durable).is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"kept");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 2, "no temporary left");
    }
}
