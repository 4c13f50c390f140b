//! The FUSE file system of one layer: the index's tree presented exactly as containerd's
//! overlayfs applier would unpack it — whiteouts `.wh.<name>` as 0:0 character devices
//! `<name>`, opaque markers `.wh..wh..opq` hidden and turned into `trusted.overlay.opaque=y`
//! on their directory, hardlinks sharing one inode (the target's) with its link count.
//! Inode numbers are entry ids + 1 (the root is entry 0, FUSE's inode 1). Everything is
//! immutable, so the kernel may cache attributes, entries and pages for long.

pub use crate::passthrough::PASSTHROUGH_MIN_BYTES;
use crate::passthrough::Passthrough;
use clip_index::{Entry, EntryId, EntryKind, Index};
use clip_readpath::{FuseOp, SpanCache};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(24 * 3600);
use clip_index::build::whiteout::{OPAQUE_MARKER, OPAQUE_XATTR, PREFIX as WHITEOUT_PREFIX};

/// One layer served over FUSE.
pub struct LayerFs {
    spans: Arc<SpanCache>,
    /// Open modes of files, and passthrough for fully local ones.
    passthrough: Passthrough,
    /// Where the last read of each inode ended, to spot sequential readers.
    last_read_end: parking_lot::Mutex<std::collections::HashMap<u64, u64>>,
    /// The kernel opens files and directories without asking (no passthrough wanted): no
    /// OPEN/RELEASE round trip per open, page cache kept, directory listings cached.
    no_open: bool,
    no_opendir: bool,
    /// Whether any entry has extended attributes or is an opaque directory (computed at the
    /// first getxattr). A layer without any answers ENOSYS, and the kernel stops asking
    /// (overlayfs asks for its `trusted.overlay.*` names at nearly every lookup and open).
    has_xattrs: std::sync::OnceLock<bool>,
    /// Added to every owner (uid and gid): the layer as a user namespace starting there sees it.
    id_shift: u32,
}

/// Spans fetched ahead for a sequential reader.
const SEQUENTIAL_READAHEAD_SPANS: u32 = 2;

impl std::fmt::Debug for LayerFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerFs({:?})", self.spans)
    }
}

impl LayerFs {
    pub fn new(spans: Arc<SpanCache>) -> Self {
        Self {
            spans,
            passthrough: Passthrough::new(),
            last_read_end: parking_lot::Mutex::new(std::collections::HashMap::new()),
            no_open: false,
            no_opendir: false,
            has_xattrs: std::sync::OnceLock::new(),
            id_shift: 0,
        }
    }

    /// Presents every owner `shift` higher (saturating), as a container whose user namespace
    /// maps its 0 to `shift` sees its own files owned by its own ids.
    pub fn with_id_shift(mut self, shift: u32) -> Self {
        self.id_shift = shift;
        self
    }

    /// Opens files whose data is all local with FUSE passthrough (kernel 6.9+): a file of at
    /// least [`PASSTHROUGH_MIN_BYTES`] is copied once under `dir` and the kernel reads it
    /// directly.
    pub fn with_passthrough(mut self, dir: std::path::PathBuf) -> Self {
        self.passthrough.with_dir(dir);
        self
    }

    /// Keeps backing ids and open modes in `state` (and starts from what it adopted).
    pub fn with_session_state(mut self, state: crate::session_state::SessionState) -> Self {
        self.passthrough.with_state(state);
        self
    }

    /// Set by the kernel's `init` when it grants passthrough (read it after mounting).
    pub fn passthrough_granted(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.passthrough.granted().clone()
    }

    fn index(&self) -> &Index {
        self.spans.index()
    }

    /// Counts a FUSE request in the layer's metrics.
    fn count(&self, op: FuseOp) {
        self.spans.metrics().fuse_request(op);
    }

    fn entry(&self, ino: INodeNo) -> Result<Entry<'_>, Errno> {
        // A poisoned layer (its bytes or tree differ from its index) answers nothing more.
        if self.spans.is_poisoned() {
            return Err(Errno::EIO);
        }
        let id = ino.0.checked_sub(1).ok_or(Errno::ENOENT)?;
        let id = EntryId::try_from(id).map_err(|_| Errno::ENOENT)?;
        self.index().entry(id).map_err(|_| Errno::ENOENT)
    }

    /// Attributes as the unpacked layer has them. `whiteout`: present as a 0:0 char device.
    fn attr(&self, e: &Entry<'_>, whiteout: bool) -> Result<FileAttr, Errno> {
        let e = if e.kind == EntryKind::Hardlink {
            self.index().resolve_hardlink(e.clone()).map_err(|_| Errno::EIO)?
        } else {
            e.clone()
        };
        let mtime =
            if e.mtime_sec >= 0 { UNIX_EPOCH + Duration::new(e.mtime_sec as u64, e.mtime_nsec) } else { UNIX_EPOCH };
        let (kind, size, perm, rdev) = if whiteout {
            (FileType::CharDevice, 0, 0, 0)
        } else {
            let kind = match e.kind {
                EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
                EntryKind::Dir => FileType::Directory,
                EntryKind::Symlink => FileType::Symlink,
                EntryKind::CharDevice => FileType::CharDevice,
                EntryKind::BlockDevice => FileType::BlockDevice,
                EntryKind::Fifo => FileType::NamedPipe,
            };
            let size = match e.kind {
                EntryKind::Symlink => e.link.len() as u64,
                EntryKind::Dir => 4096,
                _ => e.size,
            };
            let rdev = ((e.dev_major & 0xfff) << 8) | (e.dev_minor & 0xff) | ((e.dev_minor & !0xff) << 12);
            (kind, size, (e.mode & 0o7777) as u16, rdev)
        };
        Ok(FileAttr {
            ino: INodeNo(u64::from(e.id) + 1),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { e.nlink.max(1) },
            uid: e.uid.saturating_add(self.id_shift),
            gid: e.gid.saturating_add(self.id_shift),
            rdev,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Looks `name` up in directory `dir`: the entry itself, or its whiteout.
    fn find(&self, dir: &Entry<'_>, name: &[u8]) -> Result<(Entry<'_>, bool), Errno> {
        if name.starts_with(WHITEOUT_PREFIX) {
            return Err(Errno::ENOENT); // markers are not names in the unpacked layer
        }
        let index = self.index();
        if let Some(id) = index.child(dir, name).map_err(|_| Errno::EIO)? {
            return Ok((index.entry(id).map_err(|_| Errno::EIO)?, false));
        }
        let mut wh = WHITEOUT_PREFIX.to_vec();
        wh.extend_from_slice(name);
        match index.child(dir, &wh).map_err(|_| Errno::EIO)? {
            Some(id) => Ok((index.entry(id).map_err(|_| Errno::EIO)?, true)),
            None => Err(Errno::ENOENT),
        }
    }

    fn is_whiteout_entry(e: &Entry<'_>) -> bool {
        e.name.starts_with(WHITEOUT_PREFIX) && e.name != OPAQUE_MARKER
    }

    fn has_xattrs(&self) -> bool {
        *self.has_xattrs.get_or_init(|| {
            let index = self.index();
            index.xattr_total() > 0 || index.has_entry_named(OPAQUE_MARKER)
        })
    }

    fn is_opaque(&self, dir: &Entry<'_>) -> bool {
        dir.kind == EntryKind::Dir && self.index().child(dir, OPAQUE_MARKER).ok().flatten().is_some()
    }

    fn xattrs(&self, e: &Entry<'_>) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Errno> {
        let e = if e.kind == EntryKind::Hardlink {
            self.index().resolve_hardlink(e.clone()).map_err(|_| Errno::EIO)?
        } else {
            e.clone()
        };
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = self
            .index()
            .xattrs(&e)
            .map_err(|_| Errno::EIO)?
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        if self.is_opaque(&e) {
            out.push((OPAQUE_XATTR.to_vec(), b"y".to_vec()));
        }
        Ok(out)
    }
}

impl LayerFs {
    /// Directory `ino`'s entries as the unpacked layer shows them (`.`, `..`, then the children
    /// with whiteouts presented and opaque markers hidden) from position `offset` on, each given
    /// to `add` with its attributes and the offset of the entry after it, until `add` says the
    /// reply is full. Only the entries answered are decoded: a directory of a million entries is
    /// read in thousands of requests, and building its whole listing for each (as this did) was
    /// quadratic — a hostile layer's way to burn the daemon's CPU. Past the end, nothing is
    /// decoded (the request that ends every directory's reading, one in two of a cold walk's).
    fn list_from(
        &self,
        ino: INodeNo,
        offset: u64,
        mut add: impl FnMut(&FileAttr, u64, &[u8]) -> bool,
    ) -> Result<(), Errno> {
        let dir = self.entry(ino)?;
        if dir.kind != EntryKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let index = self.index();
        let children = index.children(&dir).map_err(|_| Errno::EIO)?;
        // Siblings are sorted and unique (validated): at most one marker, found by its name.
        let marker = index.child(&dir, OPAQUE_MARKER).map_err(|_| Errno::EIO)?;
        let shown = u64::from(children.end - children.start) - u64::from(marker.is_some());
        if offset >= 2 + shown {
            return Ok(());
        }
        if offset == 0 {
            index.expect_walk();
        }
        for pos in offset..2 + shown {
            let (attr, name) = match pos {
                0 => (self.attr(&dir, false)?, b".".to_vec()),
                1 => (self.attr(&index.entry(dir.parent).map_err(|_| Errno::EIO)?, false)?, b"..".to_vec()),
                _ => {
                    // The (pos - 2)th child that is not the marker (pos < 2 + shown fits in u32).
                    let mut id = children.start + (pos - 2) as u32;
                    if marker.is_some_and(|m| m <= id) {
                        id += 1;
                    }
                    let c = index.entry(id).map_err(|_| Errno::EIO)?;
                    let whiteout = Self::is_whiteout_entry(&c);
                    let name = if whiteout { &c.name[WHITEOUT_PREFIX.len()..] } else { c.name };
                    (self.attr(&c, whiteout)?, name.to_vec())
                }
            };
            if add(&attr, pos + 1, &name) {
                break;
            }
        }
        Ok(())
    }
}

/// The attributes of a negative lookup answer: node id 0 tells the kernel the name does not
/// exist, and for how long it may remember that.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        use crate::capabilities as cap;
        let _ = config.add_capabilities(cap::READDIRPLUS);
        let _ = config.add_capabilities(cap::CACHE_SYMLINKS);
        let _ = config.add_capabilities(cap::ALLOW_IDMAP);
        // Opens cost a round trip each (a container start opens hundreds of files; overlayfs
        // opens lower files again and again). Without passthrough there is nothing to decide at
        // open: the kernel may open on its own, keeping the page cache (FOPEN_KEEP_CACHE).
        self.no_opendir = config.add_capabilities(cap::NO_OPENDIR).is_ok();
        let wanted = self.passthrough.wanted();
        self.no_open = !wanted && config.add_capabilities(cap::NO_OPEN).is_ok();
        // Depth 1: backing files on a plain fs, and overlayfs may stack on this mount.
        if wanted && config.add_capabilities(cap::PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok() {
            self.passthrough.granted().store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let granted = self.passthrough.granted().load(std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(passthrough = granted, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.count(FuseOp::Lookup);
        let result = self.entry(parent).and_then(|dir| {
            if dir.kind != EntryKind::Dir {
                return Err(Errno::ENOTDIR);
            }
            let (e, whiteout) = self.find(&dir, name.as_bytes())?;
            self.attr(&e, whiteout)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            // A negative entry (node id 0) the kernel caches: overlayfs looks every name up in
            // every lower layer, and most layers lack most names.
            Err(e) if e == Errno::ENOENT => reply.entry(&TTL, &negative_entry(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir {
            // The kernel then opens directories itself, caching their listings.
            return reply.error(Errno::ENOSYS);
        }
        match self.entry(ino) {
            // Immutable directories: the kernel may keep their listings.
            Ok(e) if e.kind == EntryKind::Dir => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE);
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.count(FuseOp::Getattr);
        match self.entry(ino).and_then(|e| {
            let wh = Self::is_whiteout_entry(&e);
            self.attr(&e, wh)
        }) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.count(FuseOp::Readlink);
        match self.entry(ino) {
            Ok(e) if e.kind == EntryKind::Symlink => reply.data(e.link),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.count(FuseOp::Open);
        if self.no_open {
            // Granted at init: from now on the kernel opens files itself (read-only mount).
            return reply.error(Errno::ENOSYS);
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let entry = match self.entry(ino).and_then(|e| self.index().resolve_hardlink(e).map_err(|_| Errno::EIO)) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let key = u64::from(entry.id) + 1;
        self.passthrough.open(&self.spans, &entry, key, reply);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: fuser::ReplyEmpty) {
        // Nothing is ever written: ENOSYS makes the kernel stop sending FLUSH on every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let key = self
            .entry(ino)
            .and_then(|e| self.index().resolve_hardlink(e).map_err(|_| Errno::EIO))
            .map_or(ino.0, |e| u64::from(e.id) + 1);
        self.passthrough.release(key, fh);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.count(FuseOp::Read);
        let entry = match self.entry(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let e = match self.index().resolve_hardlink(entry) {
            Ok(e) if e.kind == EntryKind::File => e,
            Ok(_) => return reply.error(Errno::EISDIR),
            Err(_) => return reply.error(Errno::EIO),
        };
        if offset >= e.size {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(e.size - offset);
        let start = e.data_offset + offset;
        let sequential = {
            let mut last = self.last_read_end.lock();
            let seq = offset > 0 && last.get(&ino.0) == Some(&offset);
            last.insert(ino.0, offset + len);
            seq
        };
        let started = std::time::Instant::now();
        let readahead = if sequential { SEQUENTIAL_READAHEAD_SPANS } else { self.spans.readahead_spans() };
        let file = e.data_offset..e.data_offset + e.size;
        let result = self.spans.read_hinted(start, start + len, readahead, Some(file));
        if let Some(h) = &self.spans.metrics().read_seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(data) => reply.data(&data),
            Err(err) => {
                // Never wrong bytes: a failed fetch or a bad span is an I/O error for this read.
                tracing::warn!(ino = ino.0, offset, size, error = %err, "layer read failed");
                reply.error(Errno::EIO);
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.count(FuseOp::Readdir);
        let listed = self
            .list_from(ino, offset, |attr, next, name| reply.add(attr.ino, next, attr.kind, OsStr::from_bytes(name)));
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        self.count(FuseOp::Readdirplus);
        let listed = self.list_from(ino, offset, |attr, next, name| {
            reply.add(attr.ino, next, OsStr::from_bytes(name), &TTL, attr, Generation(0))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let index = self.index();
        let blocks = index.uncompressed_size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, u64::from(index.entry_count()), 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.count(FuseOp::Getxattr);
        if !self.has_xattrs() {
            return reply.error(Errno::ENOSYS);
        }
        match self.entry(ino).and_then(|e| self.xattrs(&e)) {
            Ok(list) => match list.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) {
                Some((_, v)) => xattr_reply(reply, size, v),
                None => reply.error(Errno::ENODATA),
            },
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.has_xattrs() {
            return reply.error(Errno::ENOSYS);
        }
        match self.entry(ino).and_then(|e| self.xattrs(&e)) {
            Ok(list) => {
                let mut names = Vec::new();
                for (k, _) in list {
                    names.extend_from_slice(&k);
                    names.push(0);
                }
                xattr_reply(reply, size, &names);
            }
            Err(e) => reply.error(e),
        }
    }
}

/// The session settings of every layer mount. One `/dev/fuse` descriptor shared by the worker
/// threads (no cloned descriptors): the fd keeper's duplicate then keeps every request the
/// daemon had read alive across a restart, where a cloned descriptor's requests would be
/// aborted when the daemon dies.
pub(crate) fn session_config(name: &str) -> fuser::Config {
    use fuser::MountOption as O;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        O::FSName(format!("clip:{name}")),
        O::Subtype("clip".into()),
        O::RO,
        O::DefaultPermissions,
        // As containerd's unpacked layers: overlay and runc's own mount decide for the container.
        O::Dev,
        O::Suid,
        O::Exec,
        O::NoAtime,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = false;
    config
}

/// Mounts `fs` read-only at `mountpoint` (FUSE, `allow_other`, `default_permissions`). Returns
/// the session (dropping it unmounts) and a duplicate of its `/dev/fuse` descriptor for the fd
/// keeper.
pub fn mount(
    fs: LayerFs,
    mountpoint: &std::path::Path,
    name: &str,
) -> std::io::Result<(fuser::BackgroundSession, std::os::fd::OwnedFd)> {
    spawn_session(fs, mountpoint, &session_config(name))
}

/// Mounts `fs` with `config` and serves it in the background; returns the session and a
/// duplicate of its `/dev/fuse` descriptor.
fn spawn_session(
    fs: LayerFs,
    mountpoint: &std::path::Path,
    config: &fuser::Config,
) -> std::io::Result<(fuser::BackgroundSession, std::os::fd::OwnedFd)> {
    use std::os::fd::AsFd;
    let session = fuser::Session::new(fs, mountpoint, config)?;
    let fd = session.as_fd().try_clone_to_owned()?;
    Ok((session.spawn()?, fd))
}

/// [`mount`] for a layer whose code runs outside a runtime's control (the builder's profile
/// command): `nosuid,nodev`, so no setuid file or device node of the image takes effect.
pub fn mount_for_untrusted_code(
    fs: LayerFs,
    mountpoint: &std::path::Path,
    name: &str,
) -> std::io::Result<(fuser::BackgroundSession, std::os::fd::OwnedFd)> {
    use fuser::MountOption as O;
    let mut config = session_config(name);
    for option in &mut config.mount_options {
        match option {
            O::Dev => *option = O::NoDev,
            O::Suid => *option = O::NoSuid,
            _ => {}
        }
    }
    spawn_session(fs, mountpoint, &config)
}
