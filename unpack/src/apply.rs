//! One tar entry applied to a layer directory, as containerd's overlay applier applies it: the
//! entry's parent resolved inside the directory ([`crate::resolve`]) and created if missing,
//! whiteouts converted, whatever is at the path replaced (a directory over a directory merges),
//! then owner, extended attributes, mode and times. Directory times are set by
//! [`Applier::finish`], after everything inside them was written.

use crate::UnpackError;
use crate::resolve::in_root;
use clip_index::EntryKind;
use clip_index::build::whiteout::{OPAQUE_MARKER, OPAQUE_XATTR, PREFIX as WHITEOUT_PREFIX};
use clip_index::build::{TarFields, normalize, split_last, tar_fields};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const COPY_BUF: usize = 1 << 20;

/// File data written between two checks of the disk's free space ([`crate::Limits::min_free`]).
pub const FREE_CHECK_BYTES: u64 = 16 << 20;

/// Applies entries to one layer directory.
#[derive(Debug)]
pub struct Applier<'a> {
    root: &'a Path,
    parents: &'a [PathBuf],
    /// Directories written, with their times, for [`Self::finish`].
    dirs: Vec<(Vec<u8>, i64, u32)>,
    buf: Vec<u8>,
    /// The last parent resolved and what it resolved to: entries come directory by directory.
    /// Forgotten whenever an entry removes something or makes a symlink (either may change
    /// what a path resolves to).
    last_parent: Option<(Vec<u8>, PathBuf)>,
    limits: crate::Limits,
    /// File data written, and at what total the disk's free space is checked next.
    written: u64,
    next_check: u64,
}

impl<'a> Applier<'a> {
    pub fn new(root: &'a Path, parents: &'a [PathBuf], limits: crate::Limits) -> Self {
        Self { root, parents, dirs: Vec::new(), buf: Vec::new(), last_parent: None, limits, written: 0, next_check: 0 }
    }

    /// Applies one entry.
    pub fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let fail = |message: String| UnpackError::Entry { path: String::from_utf8_lossy(&raw).into_owned(), message };
        if entry.header().entry_type().is_pax_global_extensions() {
            return Ok(());
        }
        let rel = normalize(&raw).map_err(|e| fail(e.to_string()))?;
        let fields = tar_fields(&mut entry).map_err(|e| fail(e.to_string()))?;
        if rel.is_empty() {
            // The root itself: containerd leaves it as it is.
            return Ok(());
        }
        let (parent_rel, base) = split_last(&rel);
        let ppath = match &self.last_parent {
            Some((rel, resolved)) if rel.as_slice() == parent_rel => resolved.clone(),
            _ => {
                let ppath =
                    in_root(self.root, parent_rel).map_err(|e| fail(format!("resolving its directory: {e}")))?;
                if ppath != self.root {
                    self.make_parents(&ppath).map_err(|e| fail(format!("creating its directory: {e}")))?;
                }
                self.last_parent = Some((parent_rel.to_vec(), ppath.clone()));
                ppath
            }
        };
        if let Some(name) = base.strip_prefix(WHITEOUT_PREFIX) {
            return whiteout(&ppath, base, name, &fields).map_err(fail);
        }
        let path = ppath.join(OsStr::from_bytes(base));
        self.create(&path, &mut entry, &fields).map_err(|e| match e.downcast::<crate::UnpackError>() {
            Ok(reserve) => reserve,
            Err(e) => fail(e.to_string()),
        })?;
        set_attributes(&path, &fields).map_err(fail)?;
        if fields.kind == EntryKind::Dir {
            self.dirs.push((rel, fields.mtime_sec, fields.mtime_nsec));
        }
        Ok(())
    }

    /// Fails (with [`crate::UnpackError::DiskReserve`] inside) when the disk has less than
    /// the limit left.
    fn check_free(&self) -> std::io::Result<()> {
        if self.limits.min_free == 0 {
            return Ok(());
        }
        let st = nix::sys::statvfs::statvfs(self.root)?;
        let available = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        if available < self.limits.min_free {
            return Err(std::io::Error::other(crate::UnpackError::DiskReserve {
                written: self.written,
                available,
                min_free: self.limits.min_free,
            }));
        }
        Ok(())
    }

    /// Sets the times of the directories written (creating their contents changed them).
    pub fn finish(self) -> Result<(), UnpackError> {
        for (rel, sec, nsec) in &self.dirs {
            let path = in_root(self.root, rel).map_err(UnpackError::io("resolving a directory"))?;
            set_times(&path, *sec, *nsec)
                .map_err(UnpackError::io(format!("setting the times of {}", path.display())))?;
        }
        Ok(())
    }

    /// Creates the entry at `path`, replacing what is there (a directory over a directory
    /// merges).
    fn create<R: Read>(&mut self, path: &Path, entry: &mut R, fields: &TarFields) -> std::io::Result<()> {
        if fields.kind == EntryKind::Symlink {
            self.last_parent = None;
        }
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.is_dir() && fields.kind == EntryKind::Dir {
                return Ok(());
            }
            self.last_parent = None;
            if m.is_dir() {
                std::fs::remove_dir_all(path)?;
            } else {
                std::fs::remove_file(path)?;
            }
        }
        match fields.kind {
            EntryKind::Dir => std::fs::create_dir(path),
            EntryKind::File => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)?;
                self.buf.resize(COPY_BUF, 0);
                loop {
                    let n = entry.read(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&self.buf[..n])?;
                    self.written += n as u64;
                    if self.written >= self.next_check {
                        self.next_check = self.written + FREE_CHECK_BYTES;
                        self.check_free()?;
                    }
                }
                Ok(())
            }
            EntryKind::Symlink => std::os::unix::fs::symlink(OsStr::from_bytes(&fields.link), path),
            EntryKind::Hardlink => {
                let (dir, base) = split_last(&fields.link);
                if base.is_empty() {
                    return Err(std::io::Error::other("a hard link to the layer's root"));
                }
                let target = in_root(self.root, dir)?.join(OsStr::from_bytes(base));
                // link(2) links a symlink itself, never what it points at.
                std::fs::hard_link(target, path)
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Fifo => {
                let kind = match fields.kind {
                    EntryKind::CharDevice => libc::S_IFCHR,
                    EntryKind::BlockDevice => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                mknod(path, kind, fields.mode & 0o7777, libc::makedev(fields.dev.0, fields.dev.1))
            }
        }
    }

    /// Creates the missing directories of `dir` (inside the root, resolved), top down, each
    /// with the owner, mode and times of the same directory in the nearest layer below that
    /// has it (0755 root-owned if none does), as containerd does.
    fn make_parents(&self, dir: &Path) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut at = dir;
        loop {
            match std::fs::symlink_metadata(at) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(at.to_path_buf()),
                Err(e) => return Err(e),
            }
            match at.parent() {
                Some(p) if p.starts_with(self.root) && at != self.root => at = p,
                _ => break,
            }
        }
        for path in missing.iter().rev() {
            std::fs::create_dir(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
            let rel = path.strip_prefix(self.root).map_err(std::io::Error::other)?;
            for parent in self.parents {
                match std::fs::symlink_metadata(parent.join(rel)) {
                    Ok(m) if m.is_dir() => {
                        lchown(path, m.uid(), m.gid())?;
                        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
                        set_times(path, m.mtime(), u32::try_from(m.mtime_nsec()).unwrap_or(0))?;
                        break;
                    }
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// A whiteout entry `base` (`.wh.<name>`) in `dir`: the overlayfs form of it.
fn whiteout(dir: &Path, base: &[u8], name: &[u8], fields: &TarFields) -> Result<(), String> {
    if base == OPAQUE_MARKER {
        return set_xattr(dir, OPAQUE_XATTR, b"y").map_err(|e| format!("marking its directory opaque: {e}"));
    }
    if matches!(name, b"" | b"." | b"..") {
        return Err("a whiteout of no name".into());
    }
    let path = dir.join(OsStr::from_bytes(name));
    mknod(&path, libc::S_IFCHR, 0, 0).map_err(|e| format!("creating its whiteout: {e}"))?;
    lchown(&path, fields.uid, fields.gid).map_err(|e| format!("owning its whiteout: {e}"))
}

/// Owner, extended attributes, mode (after the owner: chown clears setuid) and times.
fn set_attributes(path: &Path, fields: &TarFields) -> Result<(), String> {
    lchown(path, fields.uid, fields.gid).map_err(|e| format!("chown {}:{}: {e}", fields.uid, fields.gid))?;
    for (name, value) in &fields.xattrs {
        if let Err(e) = set_xattr(path, name, value) {
            let shown = String::from_utf8_lossy(name);
            let user_on_special = e.raw_os_error() == Some(libc::EPERM)
                && name.starts_with(b"user.")
                && !matches!(fields.kind, EntryKind::File | EntryKind::Dir);
            if e.raw_os_error() == Some(libc::ENOTSUP) || user_on_special {
                tracing::warn!(xattr = %shown, error = %e, "extended attribute of a layer entry ignored");
                continue;
            }
            return Err(format!("setting extended attribute {shown}: {e}"));
        }
    }
    let is_link = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?.file_type().is_symlink();
    if !is_link {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(fields.mode & 0o7777))
            .map_err(|e| format!("chmod {:o}: {e}", fields.mode))?;
    }
    set_times(path, fields.mtime_sec, fields.mtime_nsec).map_err(|e| format!("setting its times: {e}"))
}

fn lchown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid};
    nix::unistd::fchownat(
        None,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(std::io::Error::from)
}

fn mknod(path: &Path, kind: libc::mode_t, perm: u32, dev: libc::dev_t) -> std::io::Result<()> {
    use nix::sys::stat::{Mode, SFlag};
    nix::sys::stat::mknod(path, SFlag::from_bits_truncate(kind), Mode::from_bits_truncate(perm), dev)
        .map_err(std::io::Error::from)
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    xattr::set(path, OsStr::from_bytes(name), value)
}

/// Access and modification time both `sec.nsec` (times before 1970 become 1970, as in
/// containerd), without following a symlink.
fn set_times(path: &Path, sec: i64, nsec: u32) -> std::io::Result<()> {
    use nix::sys::stat::UtimensatFlags;
    use nix::sys::time::TimeSpec;
    let (sec, nsec) = if sec < 0 { (0, 0) } else { (sec, i64::from(nsec.min(999_999_999))) };
    let t = TimeSpec::new(sec, nsec);
    nix::sys::stat::utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(std::io::Error::from)
}
