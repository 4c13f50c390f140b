//! FUSE passthrough for fully local files: a file of at least [`PASSTHROUGH_MIN_BYTES`] whose
//! spans are all local is copied once into the layer's files directory, span by span and
//! outside every lock, and the kernel reads that copy directly. Backing ids are managed like
//! fuser's `BackingCache` example: one per inode while it has passthrough opens, closed in the
//! kernel at the last close. The count of opens per inode and mode is what keeps an id alive
//! (not one handle per open as in the example), because those counts survive a daemon restart in
//! the session state ([`crate::session_state`]) and handles do not.

use crate::session_state::{OpenModes, SessionState};
use clip_index::{Entry, EntryKind};
use clip_readpath::SpanCache;
use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Smallest file opened with passthrough. A small file costs one FUSE read and then lives in
/// the page cache; a copy for passthrough would double its disk use and cost a write at open.
pub const PASSTHROUGH_MIN_BYTES: u64 = 1 << 20;

/// File handle values: which mode an open file is in.
pub(crate) const FH_CACHED: u64 = 0;
pub(crate) const FH_PASSTHROUGH: u64 = 1;

/// Open handles and backing ids of one mount, under one lock.
#[derive(Default)]
struct Opens {
    /// Open file handles by inode: (cached mode, passthrough mode). The kernel refuses to mix
    /// the two modes on one inode, so a new open follows the mode of the open handles.
    modes: HashMap<u64, OpenModes>,
    /// Backing ids registered with the kernel, by inode, while passthrough opens use them.
    backing: HashMap<u64, BackingId>,
}

/// The passthrough side of one mount (and the open-mode bookkeeping every open goes through).
pub(crate) struct Passthrough {
    /// Where fully local files are copied (`None`: passthrough is off).
    dir: Option<PathBuf>,
    /// Whether the kernel granted passthrough at `init`.
    granted: Arc<AtomicBool>,
    opens: Mutex<Opens>,
    /// Inodes being copied right now (another open of one is served by reads meanwhile).
    copying: Mutex<HashSet<u64>>,
    state: Option<SessionState>,
}

impl Passthrough {
    pub(crate) fn new() -> Self {
        Self {
            dir: None,
            granted: Arc::new(AtomicBool::new(false)),
            opens: Mutex::new(Opens::default()),
            copying: Mutex::new(HashSet::new()),
            state: None,
        }
    }

    pub(crate) fn with_dir(&mut self, dir: PathBuf) {
        self.dir = Some(dir);
    }

    /// Keeps backing ids and open modes in `state`, starting from the open handles it inherited.
    pub(crate) fn with_state(&mut self, state: SessionState) {
        self.opens.get_mut().modes = state.take_inherited_modes();
        self.state = Some(state);
    }

    pub(crate) fn wanted(&self) -> bool {
        self.dir.is_some()
    }

    pub(crate) fn granted(&self) -> &Arc<AtomicBool> {
        &self.granted
    }

    fn on(&self) -> bool {
        self.dir.is_some() && self.granted.load(Ordering::Relaxed)
    }

    /// Updates the open handles of `key`, in memory and in the session state.
    fn set_modes(&self, opens: &mut Opens, key: u64, value: OpenModes) {
        if value == (0, 0) {
            opens.modes.remove(&key);
        } else {
            opens.modes.insert(key, value);
        }
        if let Some(state) = &self.state {
            state.store_modes(key, value);
        }
    }

    /// Answers an open of the file `entry` (its inode `key`): with passthrough when its copy is
    /// local (made now, outside the lock, if the file's spans are all local), else cached.
    pub(crate) fn open(&self, spans: &SpanCache, entry: &Entry<'_>, key: u64, reply: ReplyOpen) {
        // A copy is wanted only where a new backing id could be made: no handle open yet, and
        // none registered (an open of an inode with a backing id reuses it).
        let wants_copy = {
            let opens = self.opens.lock();
            opens.modes.get(&key).is_none_or(|m| *m == (0, 0)) && !opens.backing.contains_key(&key)
        };
        let copy = if wants_copy && self.on() { self.local_copy(spans, entry, key) } else { None };
        let mut opens = self.opens.lock();
        let (cached, passthrough) = opens.modes.get(&key).copied().unwrap_or((0, 0));
        if cached == 0 {
            if !opens.backing.contains_key(&key)
                && let Some(raw) = self.state.as_ref().and_then(|s| s.take_adopted(key))
            {
                // SAFETY: an earlier daemon registered `raw` on this very connection (logged
                // before it answered) and nothing closed it; it is wrapped once and kept.
                #[allow(unsafe_code)]
                let id = unsafe { reply.wrap_backing(raw) };
                tracing::debug!(
                    ino = key,
                    backing_id = raw,
                    "passthrough: reusing a backing id of the previous daemon"
                );
                opens.backing.insert(key, id);
            }
            if !opens.backing.contains_key(&key)
                && passthrough == 0
                && let Some(file) = &copy
            {
                match reply.open_backing(file) {
                    Ok(id) => {
                        let id = match &self.state {
                            Some(state) => {
                                let raw = id.into_raw();
                                tracing::debug!(ino = key, backing_id = raw, "passthrough: new backing id");
                                state.record_backing(key, raw);
                                // SAFETY: `raw` was just registered on this connection.
                                #[allow(unsafe_code)]
                                let id = unsafe { reply.wrap_backing(raw) };
                                id
                            }
                            None => id,
                        };
                        opens.backing.insert(key, id);
                    }
                    Err(e) => tracing::debug!(error = %e, "passthrough unavailable; serving reads"),
                }
            }
            if opens.backing.contains_key(&key) {
                spans.metrics().passthrough_opens.inc();
                self.set_modes(&mut opens, key, (cached, passthrough + 1));
                if let Some(id) = opens.backing.get(&key) {
                    return reply.opened_passthrough(FileHandle(FH_PASSTHROUGH), FopenFlags::empty(), id);
                }
            }
        }
        self.set_modes(&mut opens, key, (cached + 1, passthrough));
        drop(opens);
        reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE);
    }

    /// A handle of inode `key` in the mode `fh` says was closed; the inode's backing id is
    /// closed in the kernel with its last passthrough handle.
    pub(crate) fn release(&self, key: u64, fh: FileHandle) {
        let mut opens = self.opens.lock();
        let Some(&(cached, passthrough)) = opens.modes.get(&key) else { return };
        let value = if fh.0 == FH_PASSTHROUGH {
            (cached, passthrough.saturating_sub(1))
        } else {
            (cached.saturating_sub(1), passthrough)
        };
        self.set_modes(&mut opens, key, value);
        let closed = if value.1 == 0 { opens.backing.remove(&key) } else { None };
        drop(opens);
        if let Some(id) = closed {
            if let Some(state) = &self.state {
                state.record_backing_closed(key);
            }
            drop(id);
            tracing::debug!(ino = key, "passthrough: backing id closed at the last close");
        }
    }

    /// The local copy of a fully local file, made on first use; `None` when some of its data is
    /// not local yet, it is too small, another open is copying it, or the disk budget has no
    /// room.
    fn local_copy(&self, spans: &SpanCache, e: &Entry<'_>, key: u64) -> Option<std::fs::File> {
        let dir = self.dir.as_ref()?;
        if e.kind != EntryKind::File {
            return None;
        }
        let path = dir.join(format!("{}", e.id));
        if !path.exists() {
            if e.size < PASSTHROUGH_MIN_BYTES {
                return None;
            }
            let all_local = e.size == 0
                || spans.index().spans_for(e.data_offset, e.size).ok()?.into_iter().all(|i| spans.is_cached(i));
            if !all_local || !self.copying.lock().insert(key) {
                return None;
            }
            let copied = copy_file(spans, e, dir, &path);
            self.copying.lock().remove(&key);
            if let Err(err) = copied {
                tracing::debug!(file = e.id, error = %err, "no passthrough copy; serving reads");
                return None;
            }
        }
        // A copy a crash left short is made again.
        let file = std::fs::File::open(&path).ok()?;
        if file.metadata().ok()?.len() != e.size {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(file)
    }
}

/// Bytes of a file copied per read from the span cache.
const COPY_PIECE: u64 = 4 << 20;

/// Copies file `e` from the span cache to `path` (through a temporary name), within the disk
/// budget: its bytes are pinned first and given back when the copy fails.
fn copy_file(spans: &SpanCache, e: &Entry<'_>, dir: &Path, path: &Path) -> std::io::Result<()> {
    let budget = spans.budget();
    if let Some(b) = budget
        && !b.try_pin(dir, e.size)
    {
        return Err(std::io::Error::other("the disk budget has no room for the copy"));
    }
    let tmp = dir.join(format!(".{}.{}.copy", e.id, std::process::id()));
    let result = (|| {
        std::fs::create_dir_all(dir)?;
        let mut out = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        let mut at = e.data_offset;
        let end = e.data_offset + e.size;
        while at < end {
            let to = (at + COPY_PIECE).min(end);
            let bytes = spans.read(at, to).map_err(std::io::Error::other)?;
            out.write_all(&bytes)?;
            at = to;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        if let Some(b) = budget {
            b.unpin(dir, e.size);
        }
    }
    result
}
