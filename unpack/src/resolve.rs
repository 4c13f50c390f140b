//! A path inside a layer directory with its symlinks resolved as if the directory were `/`:
//! absolute targets start again at the directory and `..` stops at it, so no entry of a hostile
//! layer reaches outside (containerd's `fs.RootPath` does the same). Nothing else writes into the
//! directory while a layer is unpacked, so a checked path stays what it was checked to be.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Most symlinks followed for one path (the kernel's own limit is 40 per lookup).
const MAX_LINKS: usize = 255;

/// `rel` (components separated by `/`) under `root`, every existing symlink along it resolved
/// within `root`; components that do not exist are taken as they are.
pub fn in_root(root: &Path, rel: &[u8]) -> io::Result<PathBuf> {
    let mut todo: VecDeque<Vec<u8>> = rel.split(|b| *b == b'/').map(<[u8]>::to_vec).collect();
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        match part.as_slice() {
            b"" | b"." => continue,
            b".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let candidate = join(root, &done).join(OsStr::from_bytes(&part));
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&candidate)?;
                let target = target.as_os_str().as_bytes();
                if target.starts_with(b"/") {
                    done.clear();
                }
                for comp in target.split(|b| *b == b'/').rev() {
                    todo.push_front(comp.to_vec());
                }
            }
            Ok(_) => done.push(part),
            Err(e) if e.kind() == io::ErrorKind::NotFound => done.push(part),
            Err(e) => return Err(e),
        }
    }
    Ok(join(root, &done))
}

fn join(root: &Path, parts: &[Vec<u8>]) -> PathBuf {
    let mut p = root.to_path_buf();
    for part in parts {
        p.push(OsStr::from_bytes(part));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_resolve_inside_the_root_whatever_they_point_at() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
        symlink("usr/lib", root.join("lib")).expect("link");
        symlink("/etc", root.join("abs")).expect("link");
        symlink("../../../../..", root.join("up")).expect("link");
        symlink("loop", root.join("loop")).expect("link");
        assert_eq!(in_root(root, b"lib/x").expect("lib"), root.join("usr/lib/x"));
        assert_eq!(in_root(root, b"abs/passwd").expect("abs"), root.join("etc/passwd"));
        assert_eq!(in_root(root, b"up/etc").expect("up"), root.join("etc"));
        assert_eq!(in_root(root, b"usr/../../x").expect("dots"), root.join("x"));
        assert_eq!(in_root(root, b"").expect("root"), root.to_path_buf());
        let err = in_root(root, b"loop/x").expect_err("loop");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }
}
