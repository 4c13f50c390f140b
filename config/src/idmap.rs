//! The user-namespace mapping labels containerd 2.x puts on the Prepare of a user-namespaced
//! container's root file system (`containerd.io/snapshot/uidmapping` and `gidmapping`, set when
//! the snapshotter has the `remap-ids` capability): `container:host:size` entries separated by
//! commas, as in `/proc/<pid>/uid_map`.
//!
//! A label may be hostile: entries are bounded (the kernel's 340), numbers are decimal `u32`,
//! ranges must not wrap, and both maps must map the container's root (containerd's own rule), so
//! the snapshotter can give the upper dir to that root and hand containerd a mapping it accepts.

use crate::labels::LabelError;
use std::collections::BTreeMap;
use std::fmt;

/// Label of the uid mapping.
pub const UID_MAPPING: &str = "containerd.io/snapshot/uidmapping";
/// Label of the gid mapping.
pub const GID_MAPPING: &str = "containerd.io/snapshot/gidmapping";
/// The kernel's limit on lines of a `uid_map`.
const MAX_ENTRIES: usize = 340;

/// One `container:host:size` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

/// The uid and gid mapping of a user-namespaced container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
}

impl IdMap {
    /// The mapping the labels carry: `None` without either label; an error when only one is
    /// given or either is malformed (the error names the label, never quotes the value).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<Self>, LabelError> {
        match (labels.get(UID_MAPPING), labels.get(GID_MAPPING)) {
            (None, None) => Ok(None),
            (Some(u), Some(g)) => Ok(Some(Self {
                uids: parse(u).map_err(|e| named(UID_MAPPING, e))?,
                gids: parse(g).map_err(|e| named(GID_MAPPING, e))?,
            })),
            _ => Err(LabelError(format!("{UID_MAPPING} and {GID_MAPPING} must be given together"))),
        }
    }

    /// The host uid and gid of the container's root.
    pub fn root(&self) -> (u32, u32) {
        (host_of_root(&self.uids).unwrap_or(0), host_of_root(&self.gids).unwrap_or(0))
    }

    /// The mount options containerd's mount code turns into idmapped mounts.
    pub fn mount_options(&self) -> [String; 2] {
        [format!("uidmap={}", Ranges(&self.uids)), format!("gidmap={}", Ranges(&self.gids))]
    }
}

struct Ranges<'a>(&'a [IdRange]);

impl fmt::Display for Ranges<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}:{}", r.container, r.host, r.size)?;
        }
        Ok(())
    }
}

fn named(label: &str, why: &str) -> LabelError {
    LabelError(format!("label {label}: {why}"))
}

fn host_of_root(ranges: &[IdRange]) -> Option<u32> {
    ranges.iter().find(|r| r.container == 0).map(|r| r.host)
}

fn parse(value: &str) -> Result<Vec<IdRange>, &'static str> {
    let mut ranges = Vec::new();
    for entry in value.split(',') {
        if ranges.len() == MAX_ENTRIES {
            return Err("more than 340 ranges");
        }
        let mut fields = entry.split(':').map(|f| {
            if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
                return Err("each range must be container:host:size in decimal");
            }
            f.parse::<u32>().map_err(|_| "an id or size beyond 32 bits")
        });
        let (Some(container), Some(host), Some(size), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err("each range must be container:host:size in decimal");
        };
        let r = IdRange { container: container?, host: host?, size: size? };
        if r.size == 0 {
            return Err("a range of size 0");
        }
        if r.container.checked_add(r.size - 1).is_none() || r.host.checked_add(r.size - 1).is_none() {
            return Err("a range that wraps past 2^32");
        }
        ranges.push(r);
    }
    if host_of_root(&ranges).is_none() {
        return Err("the container's root (id 0) is not mapped");
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(u: Option<&str>, g: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        if let Some(u) = u {
            l.insert(UID_MAPPING.to_string(), u.to_string());
        }
        if let Some(g) = g {
            l.insert(GID_MAPPING.to_string(), g.to_string());
        }
        l
    }

    #[test]
    fn the_mapping_containerd_gives_is_read_and_written_back() {
        let m = IdMap::from_labels(&labels(Some("0:1048576:65536"), Some("0:1048576:65536,65536:42:1")))
            .expect("valid")
            .expect("present");
        assert_eq!(m.root(), (1_048_576, 1_048_576));
        assert_eq!(
            m.mount_options(),
            ["uidmap=0:1048576:65536".to_string(), "gidmap=0:1048576:65536,65536:42:1".into()]
        );
        assert_eq!(IdMap::from_labels(&labels(None, None)).expect("valid"), None);
    }

    #[test]
    fn hostile_mappings_are_refused_without_quoting_them() {
        let many = vec!["0:1:1"; 341].join(",");
        for (u, g) in [
            (Some("0:1000:65536"), None),
            (Some("0:1000"), Some("0:1000:1")),
            (Some("0:1000:1:4"), Some("0:1000:1")),
            (Some("0:-1:1"), Some("0:1000:1")),
            (Some("0:+1:1"), Some("0:1000:1")),
            (Some("0:4294967296:1"), Some("0:1000:1")),
            (Some("0:4294967295:2"), Some("0:1000:1")),
            (Some("0:1000:0"), Some("0:1000:1")),
            (Some("1:1000:10"), Some("0:1000:1")),
            (Some(""), Some("0:1000:1")),
            (Some("0:1000:1,"), Some("0:1000:1")),
            (Some(many.as_str()), Some("0:1000:1")),
        ] {
            let err = IdMap::from_labels(&labels(u, g)).expect_err(&format!("{u:?} {g:?}"));
            assert!(!err.0.contains("1000:"), "{}", err.0);
        }
    }
}
