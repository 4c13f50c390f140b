//! The FUSE capabilities a layer mount uses, in one place: [`crate::fs::LayerFs`] asks the
//! kernel for them at `FUSE_INIT`, and a reattach ([`crate::reattach`]) offers the same set in
//! its synthetic `FUSE_INIT`, so the daemon's view of a kept connection matches what the kernel
//! granted when the layer was first mounted.

use fuser::InitFlags as F;

/// Directory listings with attributes in one round trip (ls -l, find, stat walks).
pub const READDIRPLUS: F = F::FUSE_DO_READDIRPLUS.union(F::FUSE_READDIRPLUS_AUTO);
/// Symlink targets never change: the kernel may keep them.
pub const CACHE_SYMLINKS: F = F::FUSE_CACHE_SYMLINKS;
/// Opendir needs no answer: the kernel skips it.
pub const NO_OPENDIR: F = F::FUSE_NO_OPENDIR_SUPPORT;
/// Open needs no answer (only without passthrough, where there is nothing to decide at open).
pub const NO_OPEN: F = F::FUSE_NO_OPEN_SUPPORT;
/// Reads of fully local files go straight to a backing file.
pub const PASSTHROUGH: F = F::FUSE_PASSTHROUGH;
/// The mount may be idmapped (kernel 6.12+, with `default_permissions`, which every layer mount
/// has): containerd shifts the lower layers of a user-namespaced pod this way instead of copying
/// and chowning its root file system.
pub const ALLOW_IDMAP: F = F::FUSE_ALLOW_IDMAP;
/// What `fuser` itself relies on: large requests and the second flags word.
const TRANSPORT: F = F::FUSE_MAX_PAGES.union(F::FUSE_INIT_EXT);

/// Everything a layer mount may ask for; `passthrough` when the kernel granted it.
pub fn offered(passthrough: bool) -> F {
    let all = READDIRPLUS | CACHE_SYMLINKS | NO_OPENDIR | NO_OPEN | ALLOW_IDMAP | TRANSPORT;
    if passthrough { all | PASSTHROUGH } else { all }
}

/// [`offered`] as the two 32-bit words of `fuse_init_in` (`flags`, `flags2`).
pub fn offered_words(passthrough: bool) -> (u32, u32) {
    let bits = offered(passthrough).bits();
    (bits as u32, (bits >> 32) as u32)
}
