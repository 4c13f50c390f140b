//! The FUSE connection keeper: a small process that holds a duplicate of every lazy layer's
//! `/dev/fuse` descriptor, so that the kernel keeps each FUSE connection (and the requests the
//! daemon had read but not answered) alive while the daemon is killed or restarted. A new daemon
//! takes the descriptors back, serves the same connections again and asks the kernel to resend
//! what was lost (see [`crate::reattach`]); running containers only see a pause.
//!
//! The keeper is `clip-snapshotter keep-fds`, started by the daemon when it mounts its first
//! lazy layer, in its own session (so a
//! SIGKILL of the daemon, or `systemctl restart` with `KillMode=process`, leaves it alive). It
//! listens on `<root>/fd-keeper.sock` (`SOCK_SEQPACKET`, mode 0600 in the root-only state
//! directory). One JSON request per message, descriptors as `SCM_RIGHTS`:
//! `{"op":"put","key":K,"meta":M}` + fd, `{"op":"drop","key":K}`, `{"op":"list"}` (answered by
//! one message per entry with a duplicate of its fd, then `{"end":true}`), `{"op":"exit"}`.
//! When no daemon has been connected for `orphan_timeout`, the keeper closes everything and
//! exits: pending reads then fail with an I/O error instead of hanging forever.

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAX_MESSAGE: usize = 64 * 1024;

/// Errors of the keeper protocol.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("fd keeper socket {path}: {source}")]
    Socket { path: PathBuf, source: nix::Error },
    #[error("fd keeper: {0}")]
    Io(#[from] nix::Error),
    #[error("fd keeper: {0}")]
    Protocol(String),
    #[error("starting the fd keeper: {0}")]
    Spawn(std::io::Error),
}

/// The socket path of the keeper of a state directory.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("fd-keeper.sock")
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
}

fn send(fd: BorrowedFd<'_>, msg: &serde_json::Value, pass: Option<RawFd>) -> Result<(), KeeperError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| KeeperError::Protocol(e.to_string()))?;
    let iov = [IoSlice::new(&bytes)];
    let fds;
    let cmsgs: Vec<ControlMessage<'_>> = match pass {
        Some(f) => {
            fds = [f];
            vec![ControlMessage::ScmRights(&fds)]
        }
        None => Vec::new(),
    };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message; `None` when the peer closed the connection.
#[allow(unsafe_code)] // adopting descriptors the kernel passed us
fn recv(fd: BorrowedFd<'_>) -> Result<Option<(serde_json::Value, Option<OwnedFd>)>, KeeperError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, received) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut received: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these descriptors in this process for us.
                received.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        (msg.bytes, received)
    };
    if n == 0 {
        return Ok(None);
    }
    let value = serde_json::from_slice(&buf[..n]).map_err(|e| KeeperError::Protocol(format!("bad message: {e}")))?;
    Ok(Some((value, received.into_iter().next())))
}

/// One descriptor handed back by the keeper.
#[derive(Debug)]
pub struct Kept {
    pub key: String,
    pub meta: serde_json::Value,
    pub fd: OwnedFd,
}

/// The daemon's connection to its keeper.
#[derive(Debug)]
pub struct KeeperClient {
    conn: parking_lot::Mutex<OwnedFd>,
    /// The keeper's process id (from its pid file).
    pub pid: Option<i32>,
}

impl KeeperClient {
    /// Connects to the keeper of `root`, starting one (`exe keep-fds`) when none answers.
    #[allow(unsafe_code)] // pre_exec
    pub fn connect_or_spawn(root: &Path, exe: &Path, orphan_timeout: Duration) -> Result<Self, KeeperError> {
        let path = socket_path(root);
        if let Ok(c) = Self::connect(&path) {
            return Ok(c);
        }
        let _ = std::fs::remove_file(&path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("fd-keeper.log"))
            .map_err(KeeperError::Spawn)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("keep-fds")
            .arg("--socket")
            .arg(&path)
            .arg("--orphan-timeout-s")
            .arg(orphan_timeout.as_secs().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; the keeper gets its own session and process
        // group, so signals aimed at the daemon's group do not reach it.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(KeeperError::Spawn)?;
        // Not waited for: it outlives us by design. Reaped by init when we die first.
        std::mem::forget(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Self::connect(&path) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Connects to the keeper of `root` if one runs; starts none.
    pub fn connect_existing(root: &Path) -> Result<Self, KeeperError> {
        Self::connect(&socket_path(root))
    }

    fn connect(path: &Path) -> Result<Self, KeeperError> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(|source| KeeperError::Socket { path: path.into(), source })?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|source| KeeperError::Socket { path: path.into(), source })?;
        // A keeper serving another daemon would never answer: give up after a while.
        socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(10, 0))?;
        let pid = std::fs::read_to_string(path.with_extension("pid")).ok().and_then(|s| s.trim().parse().ok());
        let client = Self { conn: parking_lot::Mutex::new(fd), pid };
        client.request(&serde_json::json!({"op": "ping"}), None)?;
        Ok(client)
    }

    fn request(&self, msg: &serde_json::Value, pass: Option<RawFd>) -> Result<serde_json::Value, KeeperError> {
        let conn = self.conn.lock();
        send(conn.as_fd(), msg, pass)?;
        match recv(conn.as_fd())? {
            Some((v, _)) if v.get("ok").and_then(serde_json::Value::as_bool) == Some(true) => Ok(v),
            Some((v, _)) => Err(KeeperError::Protocol(format!("refused: {v}"))),
            None => Err(KeeperError::Protocol("keeper closed the connection".into())),
        }
    }

    /// Keeps a duplicate of `fd` under `key` (replacing what was kept under it).
    pub fn put(&self, key: &str, fd: BorrowedFd<'_>, meta: &serde_json::Value) -> Result<(), KeeperError> {
        self.request(&serde_json::json!({"op": "put", "key": key, "meta": meta}), Some(fd.as_raw_fd())).map(drop)
    }

    /// Closes the keeper's copy of `key`.
    pub fn drop_key(&self, key: &str) -> Result<(), KeeperError> {
        self.request(&serde_json::json!({"op": "drop", "key": key}), None).map(drop)
    }

    /// Duplicates of every kept descriptor (the keeper keeps its own).
    pub fn list(&self) -> Result<Vec<Kept>, KeeperError> {
        let conn = self.conn.lock();
        send(conn.as_fd(), &serde_json::json!({"op": "list"}), None)?;
        let mut out = Vec::new();
        loop {
            match recv(conn.as_fd())? {
                None => return Err(KeeperError::Protocol("keeper closed the connection".into())),
                Some((v, _)) if v.get("end").is_some() => return Ok(out),
                Some((v, Some(fd))) => out.push(Kept {
                    key: v.get("key").and_then(serde_json::Value::as_str).unwrap_or_default().to_string(),
                    meta: v.get("meta").cloned().unwrap_or_default(),
                    fd,
                }),
                Some((v, None)) => return Err(KeeperError::Protocol(format!("entry without a descriptor: {v}"))),
            }
        }
    }

    /// Asks the keeper to close everything and exit (a stop that unmounts everything).
    pub fn exit(&self) -> Result<(), KeeperError> {
        self.request(&serde_json::json!({"op": "exit"}), None).map(drop)
    }
}

/// Runs the keeper on `socket` until told to exit or orphaned for `orphan_timeout`.
#[allow(unsafe_code)] // adopting accepted descriptors
pub fn serve(socket_path: &Path, orphan_timeout: Duration) -> anyhow::Result<()> {
    use anyhow::Context;
    let _ = std::fs::remove_file(socket_path);
    let listener = seqpacket()?;
    let addr = UnixAddr::new(socket_path)?;
    socket::bind(listener.as_raw_fd(), &addr).with_context(|| format!("binding {}", socket_path.display()))?;
    std::fs::set_permissions(socket_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    socket::listen(&listener, Backlog::new(4)?)?;
    let pid_path = socket_path.with_extension("pid");
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))?;
    tracing::info!(socket = %socket_path.display(), "fd keeper started");
    let mut kept: BTreeMap<String, (OwnedFd, serde_json::Value)> = BTreeMap::new();
    let mut orphaned_since = Instant::now();
    loop {
        let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16))?;
        if ready == 0 {
            if orphaned_since.elapsed() >= orphan_timeout {
                tracing::warn!(kept = kept.len(), "no daemon for {:?}: closing every kept connection", orphan_timeout);
                break;
            }
            continue;
        }
        let raw = match socket::accept(listener.as_raw_fd()) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "accept");
                continue;
            }
        };
        // SAFETY: accept returned a new descriptor we own.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        match serve_connection(conn.as_fd(), &mut kept) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "daemon connection failed"),
        }
        tracing::info!(kept = kept.len(), "daemon disconnected");
        orphaned_since = Instant::now();
    }
    let _ = std::fs::remove_file(socket_path);
    let _ = std::fs::remove_file(&pid_path);
    drop(kept);
    tracing::info!("fd keeper stopped");
    Ok(())
}

/// Serves one daemon connection; `Ok(true)` when told to exit.
fn serve_connection(
    conn: BorrowedFd<'_>,
    kept: &mut BTreeMap<String, (OwnedFd, serde_json::Value)>,
) -> Result<bool, KeeperError> {
    let ok = serde_json::json!({"ok": true});
    while let Some((msg, fd)) = recv(conn)? {
        let key = msg.get("key").and_then(serde_json::Value::as_str).map(str::to_string);
        match (msg.get("op").and_then(serde_json::Value::as_str), key, fd) {
            (Some("ping"), _, _) => send(conn, &ok, None)?,
            (Some("put"), Some(key), Some(fd)) => {
                let meta = msg.get("meta").cloned().unwrap_or_default();
                kept.insert(key, (fd, meta));
                send(conn, &ok, None)?;
            }
            (Some("drop"), Some(key), _) => {
                kept.remove(&key);
                send(conn, &ok, None)?;
            }
            (Some("list"), _, _) => {
                for (key, (fd, meta)) in kept.iter() {
                    send(conn, &serde_json::json!({"key": key, "meta": meta}), Some(fd.as_raw_fd()))?;
                }
                send(conn, &serde_json::json!({"end": true}), None)?;
            }
            (Some("exit"), _, _) => {
                send(conn, &ok, None)?;
                return Ok(true);
            }
            _ => send(conn, &serde_json::json!({"ok": false, "error": "bad request"}), None)?,
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_descriptors_across_clients() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = socket_path(dir.path());
        let server = {
            let sock = sock.clone();
            std::thread::spawn(move || serve(&sock, Duration::from_secs(2)))
        };
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (r, w) = nix::unistd::pipe().expect("pipe");
        {
            let c = KeeperClient::connect(&sock).expect("connect");
            c.put("7", w.as_fd(), &serde_json::json!({"dir": "/x"})).expect("put");
            c.put("8", r.as_fd(), &serde_json::json!({})).expect("put");
            c.drop_key("8").expect("drop");
        }
        drop(w);
        // A second client (a restarted daemon) gets the write end back; it still works.
        let c = KeeperClient::connect(&sock).expect("reconnect");
        let kept = c.list().expect("list");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].key, "7");
        assert_eq!(kept[0].meta["dir"], "/x");
        nix::unistd::write(&kept[0].fd, b"hi").expect("write through the kept fd");
        let mut buf = [0u8; 2];
        nix::unistd::read(r.as_raw_fd(), &mut buf).expect("read");
        assert_eq!(&buf, b"hi");
        c.exit().expect("exit");
        server.join().expect("join").expect("serve");
        assert!(!sock.exists());
    }
}
