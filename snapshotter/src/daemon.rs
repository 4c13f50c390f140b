//! Running the daemon: the unix socket, the gRPC server, readiness, signals, metrics.

use crate::metrics::{self, Metrics};
use crate::remote::RemoteLayers;
use crate::service::{ClipSnapshotter, State};
use anyhow::{Context, bail};
use clip_config::SnapshotterConfig;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

/// Serves the snapshots API on `cfg.address` until SIGTERM or SIGINT.
pub async fn run(cfg: SnapshotterConfig) -> anyhow::Result<()> {
    let mut state = tokio::task::spawn_blocking({
        let root = cfg.root.clone();
        move || State::open(&root)
    })
    .await?
    .with_context(|| format!("opening state in {}", cfg.root.display()))?;
    let metrics = Arc::new(Metrics::new());
    let remote = Arc::new(
        RemoteLayers::new(&cfg, tokio::runtime::Handle::current(), metrics.clone())
            .await
            .context("setting up lazy layers (registry access, build registry credentials)")?,
    );
    state.remote = Some(remote.clone());
    let state = Arc::new(state);
    let remounted = tokio::task::spawn_blocking({
        let state = state.clone();
        move || state.restore_remote_layers()
    })
    .await??;
    let (interrupted, orphans) = tokio::task::spawn_blocking({
        let state = state.clone();
        move || anyhow::Ok((state.discard_interrupted_unpacks()?, state.cleanup()?))
    })
    .await??;
    tracing::info!(root = %cfg.root.display(), orphans_removed = orphans, interrupted_unpacks_removed = interrupted, remounted, "state opened");

    if !cfg.metrics_address.is_empty() {
        let addr = cfg.metrics_address.parse().context("metrics_address must be ip:port")?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }

    // SIGTERM/SIGINT stop every server.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        }
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let cri_proxy = match &cfg.cri.image_service_address {
        Some(address) => {
            let containerd = cfg.cri.containerd_address.clone().unwrap_or_else(|| cfg.containerd_address.clone());
            let proxy = clip_cri_proxy::CriImageProxy::new(&containerd, remote.sessions().clone());
            let (address, stop) = (address.clone(), stopped(stop_rx.clone()));
            Some(tokio::spawn(async move {
                if let Err(e) = clip_cri_proxy::serve(&address, proxy, stop).await {
                    tracing::error!(error = format!("{e:#}"), "the CRI image service proxy stopped");
                }
            }))
        }
        None => None,
    };

    let listener = bind_socket(&cfg.address)?;
    let lookup = cfg.lazy.serve_unlabelled_pulls.then(|| {
        let known = crate::content_lookup::KnownRegistries {
            hosts_dir: cfg.registry.hosts_dir.clone(),
            docker_config: cfg.registry.docker_config.clone(),
            build_registry: cfg.build_registry.as_ref().map(|b| b.registry.clone()),
        };
        Arc::new(crate::content_lookup::ContentLookup::new(cfg.containerd_address.clone(), known))
    });
    let service = containerd_snapshots::server(Arc::new(ClipSnapshotter::new(state, metrics, lookup)));
    tracing::info!(address = %cfg.address.display(), "serving the containerd snapshots API");
    notify_ready();

    let result = containerd_snapshots::tonic::transport::Server::builder()
        .layer(crate::request_namespace::NamespaceLayer)
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(stop_rx.clone()))
        .await;
    let _ = stop_tx.send(true);
    if let Some(task) = cri_proxy {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&cfg.address);
    tokio::task::spawn_blocking(move || remote.shut_down()).await?;
    result.context("gRPC server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Creates the socket's directory, replaces a stale socket (refusing to steal the socket of a
/// daemon that still answers), binds, and sets mode 0660.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running process; is another clip-snapshotter running?", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(listener)
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// `sd_notify(READY=1)` when started by systemd with `Type=notify`.
fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&target, "READY=1\nSTATUS=serving\n") {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

fn send_notify(target: &std::ffi::OsStr, message: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
        None => SocketAddr::from_pathname(Path::new(target))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(message.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        send_notify(path.as_os_str(), "READY=1\n").expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
