//! [`Index::validate`]: every record checked once, when an index first arrives.

use super::codes::EntryKind;
use super::view::{Index, SpanInfo};
use crate::IndexError;
use crate::error::format_err;

impl Index {
    /// Checks every record once: names, tree links, hardlinks, xattrs, data ranges, spans. A
    /// mapped index's pages that this pass touched are released again (see
    /// [`Index::release_resident`]).
    pub fn validate(&self) -> Result<(), IndexError> {
        let checked = self.check_records();
        self.release_resident();
        checked
    }

    fn check_records(&self) -> Result<(), IndexError> {
        for id in 0..self.entry_count {
            let e = self.entry(id)?;
            if id != 0 {
                if e.parent >= id {
                    return Err(format_err(format!("entry {id}: parent {} does not precede it", e.parent)));
                }
                let p = self.entry(e.parent)?;
                let r = self.children(&p)?;
                if !r.contains(&id) {
                    return Err(format_err(format!("entry {id}: not among its parent's children")));
                }
                validate_name(e.name).map_err(|m| format_err(format!("entry {id}: {m}")))?;
                if id > r.start && self.entry(id - 1)?.name >= e.name {
                    return Err(format_err(format!("entry {id}: siblings not sorted or duplicated")));
                }
            }
            if e.kind == EntryKind::Dir {
                for c in self.children(&e)? {
                    if self.entry(c)?.parent != id {
                        return Err(format_err(format!("entry {id}: child {c} names another parent")));
                    }
                }
            }
            if e.kind == EntryKind::Hardlink {
                self.resolve_hardlink(e.clone())?;
            }
            if e.kind == EntryKind::File {
                let end = e.data_offset.checked_add(e.size);
                if end.is_none_or(|end| end > self.uncompressed_size()) {
                    return Err(format_err(format!("entry {id}: data lies outside the layer")));
                }
            }
            self.xattrs(&e)?;
        }
        let mut prev: Option<SpanInfo> = None;
        for i in 0..self.checkpoint_count {
            let s = self.span(i)?;
            if let Some(p) = &prev {
                if s.uncomp_start < p.uncomp_start || s.comp_start < p.comp_start {
                    return Err(format_err(format!("span {i}: checkpoints out of order")));
                }
            } else if s.uncomp_start != 0 || s.comp_start != 0 {
                return Err(format_err("span 0 does not start at 0"));
            }
            if self.external_windows.is_none() {
                self.window(&s)?;
            }
            prev = Some(s);
        }
        self.media_type()?;
        Ok(())
    }
}
/// A name that is not one path component.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid name {0:?}")]
    Reserved(String),
    #[error("name {0:?} contains '/' or NUL")]
    Separator(String),
}

/// A name is one path component: not empty, not `.` or `..`, no `/`, no NUL.
pub fn validate_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(NameError::Reserved(String::from_utf8_lossy(name).into_owned()));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(NameError::Separator(String::from_utf8_lossy(name).into_owned()));
    }
    Ok(())
}
