//! Serving a FUSE connection again after the daemon restarted. The connection was kept alive
//! by the fd keeper ([`crate::keeper`]); the kernel considers it initialised and will never send
//! another `FUSE_INIT`, while `fuser` only starts a session with a handshake. So the session is
//! started on one end of a `SOCK_SEQPACKET` pair (which, like `/dev/fuse`, keeps message
//! boundaries) fed with a synthetic `FUSE_INIT` that offers what the kernel granted the first
//! time; its answer is discarded; then the kept `/dev/fuse` descriptor is `dup3`ed over the
//! session's descriptor number, so every later read, reply and passthrough ioctl goes to the
//! real connection. Last, `FUSE_NOTIFY_RESEND` (kernel 6.9+) makes the kernel queue again the
//! requests the dead daemon had read but not answered: the container's pending reads complete
//! instead of hanging.

use crate::LayerFs;
use nix::sys::socket::{AddressFamily, SockFlag, SockType};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

const FUSE_INIT: u32 = 26;
const FUSE_NOTIFY_RESEND: i32 = 7;

/// The synthetic `FUSE_INIT` request: `fuse_in_header` + `fuse_init_in`.
fn init_request(passthrough: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(104);
    let push = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_ne_bytes());
    push(&mut b, 104); // len
    push(&mut b, FUSE_INIT); // opcode
    b.extend_from_slice(&u64::MAX.to_ne_bytes()); // unique: never a kernel id
    b.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    for _ in 0..4 {
        push(&mut b, 0); // uid, gid, pid, padding
    }
    push(&mut b, 7); // major
    push(&mut b, 40); // minor: what fuser 0.18 speaks
    push(&mut b, 128 * 1024); // max_readahead
    let (flags, flags2) = crate::capabilities::offered_words(passthrough);
    push(&mut b, flags);
    push(&mut b, flags2);
    for _ in 0..11 {
        push(&mut b, 0);
    }
    b
}

/// Serves the kept connection `fuse` with `fs`. `passthrough` says whether the kernel granted
/// passthrough when the layer was first mounted.
#[allow(unsafe_code)] // dup3 over the session's descriptor
pub fn reattach(
    fs: LayerFs,
    fuse: OwnedFd,
    name: &str,
    passthrough: bool,
) -> std::io::Result<fuser::BackgroundSession> {
    let (ours, feeder) =
        nix::sys::socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    nix::unistd::write(&feeder, &init_request(passthrough))?;
    let config = crate::fs::session_config(name);
    let session = fuser::Session::from_fd(fs, ours, config.acl, config)?;
    // Drain fuser's INIT answer; nobody needs it.
    let mut answer = [0u8; 512];
    let _ = nix::sys::socket::recv(feeder.as_raw_fd(), &mut answer, nix::sys::socket::MsgFlags::MSG_DONTWAIT);
    drop(feeder);
    // The session's descriptor number now names the real connection.
    let target = session.as_fd().as_raw_fd();
    // SAFETY: `target` is the session's own descriptor; dup3 atomically replaces the socket
    // behind that number with the kept /dev/fuse file, which the session then owns.
    let rc = unsafe { libc::dup3(fuse.as_raw_fd(), target, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(fuse);
    resend_pending(session.as_fd())?;
    session.spawn()
}

/// `FUSE_NOTIFY_RESEND`: requests read but never answered go back to the pending queue.
fn resend_pending(fuse: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&16u32.to_ne_bytes());
    header.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    header.extend_from_slice(&0u64.to_ne_bytes());
    match nix::unistd::write(fuse, &header) {
        Ok(_) => Ok(()),
        // Kernels before 6.9 do not know the notification; nothing was lost unless the daemon
        // died with requests in hand.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
            tracing::warn!("the kernel cannot resend lost FUSE requests (FUSE_NOTIFY_RESEND needs Linux 6.9)");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_request_layout() {
        let r = super::init_request(true);
        assert_eq!(r.len(), 104);
        assert_eq!(u32::from_ne_bytes(r[4..8].try_into().expect("4")), super::FUSE_INIT);
        assert_eq!(u32::from_ne_bytes(r[40..44].try_into().expect("4")), 7);
        // FUSE_PASSTHROUGH is bit 37 (bit 5 of flags2), FUSE_ALLOW_IDMAP bit 40 (bit 8 of flags2);
        // FUSE_INIT_EXT (bit 30) says flags2 is there.
        assert_eq!(u32::from_ne_bytes(r[56..60].try_into().expect("4")), 1 << 5 | 1 << 8);
        assert_ne!(u32::from_ne_bytes(r[52..56].try_into().expect("4")) & (1 << 30), 0);
        assert_eq!(u32::from_ne_bytes(super::init_request(false)[56..60].try_into().expect("4")), 1 << 8);
    }
}
