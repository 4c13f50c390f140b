//! Where an [`Index`](super::Index)'s bytes live: owned in memory (an index just built or fetched)
//! or a read-only map of its stored file, so that a daemon serving a 1M-entry layer holds only the
//! pages its lookups touch, not the whole index (about 100 MB for a million entries).
//!
//! A mapped index is read in place: its file must never change under the map. The snapshotter's
//! stored indexes are written once, by an atomic rename, and removed by unlinking; both leave a
//! mapped inode as it was. Truncating a stored index in place (which only root can) would make
//! the daemon's next read of a cut page a `SIGBUS`.

use crate::IndexError;
use crate::error::format_err;
use std::path::Path;

/// The bytes of an index.
pub(crate) enum Backing {
    Owned(Vec<u8>),
    /// The map, and whether its faults read around them yet ([`Backing::read_around`]).
    Mapped(memmap2::Mmap, std::sync::atomic::AtomicBool),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Mapped(m, _) => m,
        }
    }
}

impl Backing {
    /// Maps `file` read-only, or reads it when it is packed (a zstd frame: stored indexes are
    /// plain, but a packed one is accepted as [`Index::open_any`](super::Index::open_any) would).
    /// `max_len` bounds the file's size before anything is read.
    pub(crate) fn map_file(path: &Path, max_len: usize) -> Result<Self, IndexError> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len > max_len as u64 {
            return Err(format_err(format!("{} is {len} bytes, more than an index may be", path.display())));
        }
        let mut head = Vec::with_capacity(4);
        std::io::Read::read_to_end(&mut std::io::Read::take(&file, 4), &mut head)?;
        if head.len() < 4 || head[..] == super::codes::ZSTD_MAGIC {
            // Packed (or too short to be anything): read whole, as far as the limit allows.
            let mut bytes = Vec::new();
            std::io::Seek::rewind(&mut &file)?;
            std::io::Read::read_to_end(&mut std::io::Read::take(&file, max_len as u64 + 1), &mut bytes)?;
            if bytes.len() > max_len {
                return Err(format_err(format!("{} grew past what an index may be", path.display())));
            }
            return Ok(Self::Owned(bytes));
        }
        // SAFETY: the map is read-only and private, and stored index files are never written in
        // place (see the module's docs), so the bytes behind the slice do not change.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
        // Lookups jump about (binary searches): no read-around at each fault (the device's
        // `read_ahead_kb` around it: 8 MiB on the test VM), which also mapped more of the index
        // after a mount (22 MB against 19 MB RSS with a 100k-entry layer, single runs). A walk
        // turns it on ([`Self::read_around`]).
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Self::Mapped(map, std::sync::atomic::AtomicBool::new(false)))
    }

    /// Drops this process's hold on the pages of a mapped index that a whole pass (the checksum,
    /// [`validate`](super::Index::validate)) touched: they stay in the kernel's page cache, out of
    /// the daemon's resident memory, and fault back in when a lookup needs them. No-op when owned.
    pub(crate) fn release_resident(&self) {
        if let Self::Mapped(m, _) = self {
            // SAFETY: MADV_DONTNEED on a read-only, private file map only unmaps its pages; the
            // next read of them faults the file's unchanged bytes back in.
            #[allow(unsafe_code)]
            let r = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
            // It cannot fail on a live map; if it did, the pages would only stay resident.
            let _ = r;
        }
    }

    /// From now on a fault in a mapped index reads around it, as the kernel does by default:
    /// someone walks the tree, and without it every 4 KiB page of the index was a synchronous
    /// disk read of its own (1,840 in a cold walk of a 111k-entry node_modules tree; 10 with
    /// read-around). Once per map; no-op when owned.
    pub(crate) fn read_around(&self) {
        if let Self::Mapped(m, around) = self
            && !around.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // Advice only: if it fails, faults go on reading single pages.
            let _ = m.advise(memmap2::Advice::Normal);
        }
    }

    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self, Self::Mapped(..))
    }
}
