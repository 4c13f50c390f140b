//! Snapshot metadata in `redb`, one write transaction per operation.
//!
//! Tables: `snapshots` (key or name -> JSON [`Record`]), `children` (parent name -> child keys,
//! for the "has children" check) and `counters` (the next snapshot id). Directory creation runs
//! *inside* the write transaction that inserts the record, so a crash leaves either both or an
//! orphaned directory that [`crate::dirs::SnapshotDirs::remove_orphans`] deletes; a crash never
//! leaves a record without its directory.

mod record;

pub use record::{DiskUsage, Kind, Record, RemoteLayer, Timestamp};

use crate::error::{Result, SnapshotError};
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable, TableDefinition,
};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// The metadata database. All methods block; call them from `spawn_blocking`.
#[derive(Debug)]
pub struct MetaStore {
    db: Database,
}

/// A record together with its key and the ids of its parents, nearest first.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub key: String,
    pub record: Record,
    pub parent_ids: Vec<u64>,
    /// Whether a parent is a lazily served (FUSE) layer: the overlay then spans several
    /// file systems.
    pub lazy_parents: bool,
}

/// How `update` changes labels (containerd's field paths).
#[derive(Debug)]
pub enum LabelUpdate {
    /// Replace all labels (no field paths, or the path `labels`).
    ReplaceAll(BTreeMap<String, String>),
    /// Set or (with an empty or absent value) delete single labels: paths `labels.<key>`.
    Keys(Vec<(String, Option<String>)>),
}

impl MetaStore {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_multimap_table(CHILDREN)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Looks a snapshot up and resolves its parent chain, in one read transaction.
    pub fn resolve(&self, key: &str) -> Result<Resolved> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let record = get(&table, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        let (parent_ids, lazy_parents) = parent_ids(&table, &record.parent)?;
        Ok(Resolved { key: key.to_string(), record, parent_ids, lazy_parents })
    }

    /// Creates an active or view snapshot. `make_dir(id)` creates its directory inside the
    /// transaction; if it fails nothing is recorded.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        make_dir: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Resolved> {
        self.insert(kind, key, parent, labels, None, make_dir)
    }

    /// Creates a committed remote layer `name` in one transaction; `make_dir(id)` creates and
    /// mounts its directory (and must undo that itself when it fails).
    pub fn create_remote(
        &self,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
        make_dir: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Resolved> {
        self.insert(Kind::Committed, name, parent, labels, Some(remote), make_dir)
    }

    fn insert(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: Option<RemoteLayer>,
        make_dir: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Resolved> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("snapshot key must not be empty".into()));
        }
        let txn = self.db.begin_write()?;
        let resolved = {
            let mut table = txn.open_table(SNAPSHOTS)?;
            if get(&table, key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {key}")));
            }
            let (parent_ids, lazy_parents) = if parent.is_empty() {
                (Vec::new(), false)
            } else {
                let p =
                    get(&table, parent)?.ok_or_else(|| SnapshotError::NotFound(format!("parent snapshot {parent}")))?;
                if p.kind != Kind::Committed {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )));
                }
                let (ids, lazy) = parent_ids(&table, &p.parent)?;
                (std::iter::once(p.id).chain(ids).collect(), lazy || p.remote.is_some())
            };
            let id = {
                let mut counters = txn.open_table(COUNTERS)?;
                let id = counters.get(NEXT_ID)?.map_or(1, |v| v.value());
                counters.insert(NEXT_ID, id + 1)?;
                id
            };
            let now = Timestamp::now();
            let record = Record {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                usage: remote.as_ref().map(|_| DiskUsage::default()),
                remote,
            };
            make_dir(id)?;
            table.insert(key, serde_json::to_vec(&record)?.as_slice())?;
            if !parent.is_empty() {
                txn.open_multimap_table(CHILDREN)?.insert(parent, key)?;
            }
            Resolved { key: key.to_string(), record, parent_ids, lazy_parents }
        };
        txn.commit()?;
        Ok(resolved)
    }

    /// Turns the active snapshot `key` into the committed snapshot `name` (same id and
    /// directory), with `labels` replacing the active snapshot's labels.
    pub fn commit(&self, key: &str, name: &str, labels: BTreeMap<String, String>, usage: DiskUsage) -> Result<Record> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument("snapshot name must not be empty".into()));
        }
        let txn = self.db.begin_write()?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS)?;
            if get(&table, name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("committed snapshot {name}")));
            }
            let mut record =
                get(&table, key)?.ok_or_else(|| SnapshotError::NotFound(format!("active snapshot {key}")))?;
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is {}, not active",
                    record.kind.as_str()
                )));
            }
            record.kind = Kind::Committed;
            record.created = Timestamp::now();
            record.updated = record.created;
            record.labels = labels;
            record.usage = Some(usage);
            table.remove(key)?;
            table.insert(name, serde_json::to_vec(&record)?.as_slice())?;
            if !record.parent.is_empty() {
                let mut children = txn.open_multimap_table(CHILDREN)?;
                children.remove(record.parent.as_str(), key)?;
                children.insert(record.parent.as_str(), name)?;
            }
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Removes a snapshot that has no children; returns what it was (its id names the
    /// directory the caller deletes after this commit).
    pub fn remove(&self, key: &str) -> Result<Record> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS)?;
            let record = get(&table, key)?.ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            let mut children = txn.open_multimap_table(CHILDREN)?;
            if children.get(key)?.next().is_some() {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has children"
                )));
            }
            table.remove(key)?;
            if !record.parent.is_empty() {
                children.remove(record.parent.as_str(), key)?;
            }
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// The committed snapshots over `parent` labelled with chain `target`
    /// ([`clip_config::labels::TARGET_SNAPSHOT_REF`]): those containerd's Walk may hand out
    /// for the chain.
    pub fn for_target(&self, parent: &str, target: &str) -> Result<Vec<(String, Record)>> {
        use clip_config::labels::TARGET_SNAPSHOT_REF;
        Ok(self
            .list()?
            .into_iter()
            .filter(|(_, r)| {
                r.kind == Kind::Committed
                    && r.parent == parent
                    && r.labels.get(TARGET_SNAPSHOT_REF).map(String::as_str) == Some(target)
            })
            .collect())
    }

    /// Makes `name` the only committed snapshot over `parent` labelled with chain `target`:
    /// containerd takes the first one its Walk finds for the chain, so any other stops
    /// answering for it (its users keep it by its name) — another image's lazy layer, or a
    /// layer unpacked for another namespace.
    pub fn claim_target(&self, name: &str, parent: &str, target: &str) -> Result<()> {
        use clip_config::labels::TARGET_SNAPSHOT_REF;
        for (other, _) in self.for_target(parent, target)? {
            if other != name {
                tracing::warn!(snapshot = %other, target, "another snapshot of this chain no longer answers for it");
                self.update_labels(&other, LabelUpdate::Keys(vec![(TARGET_SNAPSHOT_REF.to_string(), None)]))?;
            }
        }
        Ok(())
    }

    /// Changes the labels of a snapshot and bumps its update time.
    pub fn update_labels(&self, key: &str, update: LabelUpdate) -> Result<Record> {
        self.update_labels_checked(key, update, |_, _| Ok(()))
    }

    /// [`Self::update_labels`], refused (nothing written) when `check(before, after)` fails:
    /// one transaction, so no reader ever sees labels the check refuses.
    pub fn update_labels_checked(
        &self,
        key: &str,
        update: LabelUpdate,
        check: impl FnOnce(&BTreeMap<String, String>, &BTreeMap<String, String>) -> Result<()>,
    ) -> Result<Record> {
        let txn = self.db.begin_write()?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS)?;
            let mut record = get(&table, key)?.ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            let before = record.labels.clone();
            match update {
                LabelUpdate::ReplaceAll(labels) => record.labels = labels,
                LabelUpdate::Keys(keys) => {
                    for (k, v) in keys {
                        match v {
                            Some(v) if !v.is_empty() => record.labels.insert(k, v),
                            _ => record.labels.remove(&k),
                        };
                    }
                }
            }
            check(&before, &record.labels)?;
            record.updated = Timestamp::now();
            table.insert(key, serde_json::to_vec(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Every snapshot, in key order.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Runs `f` with the set of ids in use while holding the write lock, so that no snapshot
    /// is created meanwhile (used by cleanup to delete orphaned directories safely).
    pub fn with_ids_locked<T>(&self, f: impl FnOnce(&HashSet<u64>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write()?;
        let ids = {
            let table = txn.open_table(SNAPSHOTS)?;
            let mut ids = HashSet::new();
            for row in table.iter()? {
                let (k, v) = row?;
                ids.insert(decode(k.value(), v.value())?.id);
            }
            ids
        };
        let out = f(&ids)?;
        txn.abort()?;
        Ok(out)
    }

    /// Checks the invariants a crash must not break: every parent exists and is committed,
    /// every child link points at a snapshot whose parent it names, ids are unique and below
    /// the id counter. Returns the problems found (empty when consistent).
    pub fn check_consistency(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let children = txn.open_multimap_table(CHILDREN)?;
        let next_id = txn.open_table(COUNTERS)?.get(NEXT_ID)?.map_or(1, |v| v.value());
        let mut problems = Vec::new();
        let mut ids = HashSet::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let key = k.value().to_string();
            let r = decode(&key, v.value())?;
            if !ids.insert(r.id) {
                problems.push(format!("{key}: id {} used twice", r.id));
            }
            if r.id >= next_id {
                problems.push(format!("{key}: id {} not below the counter {next_id}", r.id));
            }
            if !r.parent.is_empty() {
                match get(&table, &r.parent)? {
                    None => problems.push(format!("{key}: parent {} missing", r.parent)),
                    Some(p) if p.kind != Kind::Committed => {
                        problems.push(format!("{key}: parent {} not committed", r.parent));
                    }
                    Some(_) => {}
                }
                let linked = children.get(r.parent.as_str())?.any(|c| c.is_ok_and(|c| c.value() == key));
                if !linked {
                    problems.push(format!("{key}: no child link from {}", r.parent));
                }
            }
        }
        for row in children.iter()? {
            let (parent, kids) = row?;
            for kid in kids {
                let kid = kid?;
                match get(&table, kid.value())? {
                    Some(r) if r.parent == parent.value() => {}
                    _ => problems.push(format!("stale child link {} -> {}", parent.value(), kid.value())),
                }
            }
        }
        Ok(problems)
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes)
        .map_err(|e| SnapshotError::Database(format!("record of snapshot {key:?} is corrupt: {e}").into()))
}

fn get(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Record>> {
    match table.get(key)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

/// Ids of `parent` and its ancestors, nearest first, and whether one is a remote layer.
fn parent_ids(table: &impl ReadableTable<&'static str, &'static [u8]>, parent: &str) -> Result<(Vec<u64>, bool)> {
    let mut ids = Vec::new();
    let mut lazy = false;
    let mut next = parent.to_string();
    while !next.is_empty() {
        let r = get(table, &next)?
            .ok_or_else(|| SnapshotError::Database(format!("parent snapshot {next:?} missing").into()))?;
        ids.push(r.id);
        lazy |= r.remote.is_some();
        if ids.len() > 10_000 {
            return Err(SnapshotError::Database("parent chain loops".into()));
        }
        next = r.parent;
    }
    Ok((ids, lazy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("meta.redb")).expect("open");
        (dir, store)
    }

    #[test]
    fn lifecycle_and_errors() {
        let (_d, s) = store();
        let ok = |_| Ok(());
        let a = s.create(Kind::Active, "a", "", BTreeMap::new(), ok).expect("create");
        assert!(matches!(s.create(Kind::Active, "a", "", BTreeMap::new(), ok), Err(SnapshotError::AlreadyExists(_))));
        assert!(matches!(
            s.create(Kind::Active, "b", "a", BTreeMap::new(), ok),
            Err(SnapshotError::InvalidArgument(_))
        ));
        assert!(matches!(s.create(Kind::Active, "b", "nope", BTreeMap::new(), ok), Err(SnapshotError::NotFound(_))));
        let c = s.commit("a", "c", BTreeMap::new(), DiskUsage::default()).expect("commit");
        assert_eq!(c.id, a.record.id);
        let v = s.create(Kind::View, "v", "c", BTreeMap::new(), ok).expect("view");
        assert_eq!(v.parent_ids, vec![c.id]);
        assert!(matches!(
            s.commit("v", "x", BTreeMap::new(), DiskUsage::default()),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        assert!(matches!(s.remove("c"), Err(SnapshotError::FailedPrecondition(_))));
        s.remove("v").expect("remove view");
        s.remove("c").expect("remove parent");
        assert!(matches!(s.remove("c"), Err(SnapshotError::NotFound(_))));
        assert!(s.check_consistency().expect("check").is_empty());
    }

    #[test]
    fn failed_directory_creation_records_nothing() {
        let (_d, s) = store();
        let err = s.create(Kind::Active, "a", "", BTreeMap::new(), |_| {
            Err(SnapshotError::io("mkdir", std::io::Error::other("disk full")))
        });
        assert!(err.is_err());
        assert!(matches!(s.resolve("a"), Err(SnapshotError::NotFound(_))));
        assert!(s.list().expect("list").is_empty());
    }

    #[test]
    fn label_updates_follow_containerd() {
        let (_d, s) = store();
        let labels = BTreeMap::from([("l1".to_string(), "v1".to_string()), ("l2".into(), "v2".into())]);
        s.create(Kind::Active, "a", "", labels, |_| Ok(())).expect("create");
        let r = s
            .update_labels("a", LabelUpdate::Keys(vec![("l1".into(), Some("new".into())), ("l2".into(), None)]))
            .expect("update");
        assert_eq!(r.labels, BTreeMap::from([("l1".to_string(), "new".to_string())]));
        let refused = s.update_labels_checked("a", LabelUpdate::ReplaceAll(BTreeMap::new()), |before, after| {
            assert_eq!((before.len(), after.len()), (1, 0));
            Err(SnapshotError::InvalidArgument("no".into()))
        });
        assert!(refused.is_err());
        assert_eq!(s.resolve("a").expect("a").record.labels, BTreeMap::from([("l1".to_string(), "new".to_string())]));
    }
}
