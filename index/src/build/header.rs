//! What a layer's tar header says: [`tar_fields`] reads one header and its PAX records, the one
//! place a layer's tar header is interpreted (for indexing and for unpacking), and
//! [`normalize`] turns its path into the components the index names entries by.

use crate::IndexError;
use crate::format::{EntryKind, validate_name};
use std::io::Read;

/// Longest path accepted.
pub const MAX_PATH: usize = 64 << 10;

/// What one tar header says about its entry (the path aside), PAX records applied.
#[derive(Debug, Clone)]
pub struct TarFields {
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Data bytes (files only).
    pub size: u64,
    pub data_offset: u64,
    /// A symlink's target as written; a hardlink's target path, normalised ([`normalize`]).
    pub link: Vec<u8>,
    /// Major and minor of a device.
    pub dev: (u32, u32),
    /// `SCHILY.xattr.*` records: names without the prefix, sorted, the last of a name kept.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Splits a tar path into components: leading `/` and `./` dropped, `.` and empty components
/// skipped, `..` rejected.
pub fn normalize(path: &[u8]) -> Result<Vec<u8>, IndexError> {
    if path.len() > MAX_PATH {
        return Err(IndexError::Tar(format!("path of {} bytes is too long", path.len())));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in path.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                return Err(IndexError::Tar(format!(
                    "path {:?} escapes the layer root (..)",
                    String::from_utf8_lossy(path)
                )));
            }
            c => {
                validate_name(c).map_err(|e| IndexError::Tar(e.to_string()))?;
                parts.push(c);
            }
        }
    }
    Ok(parts.join(&b'/'))
}

/// A normalised path's parent and last component (the root's parent is itself).
pub fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    if sec < 0 && nsec > 0 {
        // -1.5 means 1.5 s before the epoch.
        return Some((sec - 1, 1_000_000_000 - nsec));
    }
    Some((sec, nsec))
}

/// Reads one tar header (and its PAX records): the one place a layer's tar header is
/// interpreted, for indexing and for unpacking.
pub fn tar_fields<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<TarFields, IndexError> {
    let terr = |e: std::io::Error| IndexError::Tar(e.to_string());
    let header = entry.header();
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Link => EntryKind::Hardlink,
        tar::EntryType::Char => EntryKind::CharDevice,
        tar::EntryType::Block => EntryKind::BlockDevice,
        tar::EntryType::Fifo => EntryKind::Fifo,
        tar::EntryType::GNUSparse => {
            return Err(IndexError::Tar("GNU sparse files are not supported in layers".into()));
        }
        other => return Err(IndexError::Tar(format!("unsupported tar entry type {:?}", other.as_byte() as char))),
    };
    let mode = header.mode().map_err(terr)? & 0o7777;
    let mut uid = u32::try_from(header.uid().map_err(terr)?).unwrap_or(u32::MAX);
    let mut gid = u32::try_from(header.gid().map_err(terr)?).unwrap_or(u32::MAX);
    let mut mtime_sec = i64::try_from(header.mtime().map_err(terr)?).unwrap_or(i64::MAX);
    let mut mtime_nsec = 0;
    let dev = match kind {
        EntryKind::CharDevice | EntryKind::BlockDevice => {
            (header.device_major().map_err(terr)?.unwrap_or(0), header.device_minor().map_err(terr)?.unwrap_or(0))
        }
        _ => (0, 0),
    };
    let link = entry.link_name_bytes().map(std::borrow::Cow::into_owned).unwrap_or_default();
    let size = if kind == EntryKind::File { entry.size() } else { 0 };
    let data_offset = if kind == EntryKind::File { entry.raw_file_position() } else { 0 };
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(terr)? {
        for ext in pax {
            let ext = ext.map_err(terr)?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"mtime" {
                if let Some((s, ns)) = parse_pax_time(value) {
                    mtime_sec = s;
                    mtime_nsec = ns;
                }
            } else if key == b"uid" {
                uid = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(uid);
            } else if key == b"gid" {
                gid = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(gid);
            }
        }
    }
    xattrs.sort();
    xattrs.dedup_by(|a, b| a.0 == b.0);
    let link = match kind {
        EntryKind::Hardlink => normalize(&link)?,
        EntryKind::Symlink => link,
        _ => Vec::new(),
    };
    Ok(TarFields { kind, mode, uid, gid, mtime_sec, mtime_nsec, size, data_offset, link, dev, xattrs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_rejects_traversal() {
        assert_eq!(normalize(b"./a//b/").unwrap_or_default(), b"a/b");
        assert_eq!(normalize(b"/etc/passwd").unwrap_or_default(), b"etc/passwd");
        assert!(normalize(b"a/../../etc").is_err());
        assert!(normalize(b"..").is_err());
        assert_eq!(normalize(b"./").unwrap_or_default(), b"");
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000.123456789"), Some((1_700_000_000, 123_456_789)));
        assert_eq!(parse_pax_time(b"5.5"), Some((5, 500_000_000)));
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
