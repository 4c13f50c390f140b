//! The mounts of this process, parsed from `/proc/self/mountinfo` (proc(5)): the one parser
//! clip has, for unmounting what a previous daemon left and for recognising FUSE layers.

use std::path::{Path, PathBuf};

/// One line of mountinfo (the fields clip uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Field 5: where it is mounted, unescaped.
    pub mount_point: PathBuf,
    /// The first field after ` - `: `fuse`, `fuse.clip`, `overlay`, ...
    pub fs_type: String,
    /// The second field after ` - ` (`clip:sha256:...` for clip's layers), unescaped.
    pub source: String,
}

/// The mounts now (empty when mountinfo cannot be read).
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse(&t)).unwrap_or_default()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut rest = after.split(' ');
            let fs_type = rest.next()?.to_string();
            let source = unescape(rest.next().unwrap_or_default());
            Some(Mount { mount_point: PathBuf::from(unescape(mount_point)), fs_type, source })
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
pub fn mount_points_below(dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mounts().into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// Whether `dir` is a FUSE mount point (never touches the mount, which may have nobody serving it).
pub fn is_fuse_mount(dir: &Path) -> bool {
    mounts().iter().any(|m| m.mount_point == dir && m.fs_type.starts_with("fuse"))
}

/// Undoes the kernel's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or below `dir`, deepest first (stale FUSE layers of a previous daemon,
/// before a directory is reused or deleted); a mount that cannot be detached is logged.
pub fn unmount_below(dir: &Path) {
    for p in mount_points_below(dir) {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "cannot unmount");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt\\040with\\011tab\\134 rw,noatime master:1 - fuse.clip clip:sha256:ab rw\n\
                    garbage\n\
                    37 35 0:5 / /var/lib/x rw shared:2 opt:3 - overlay overlay rw,lowerdir=/a\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt with\ttab\\"));
        assert_eq!((m[0].fs_type.as_str(), m[0].source.as_str()), ("fuse.clip", "clip:sha256:ab"));
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/x"));
        assert_eq!(m[1].fs_type, "overlay");
    }

    #[test]
    fn this_process_sees_its_root() {
        assert!(mounts().iter().any(|m| m.mount_point == Path::new("/")));
        assert!(!is_fuse_mount(Path::new("/")));
    }
}
