//! A CRI client (on the `k8s-cri` crate) standing in for crictl/kubelet: image pulls with or
//! without a pull secret, host-network pod sandboxes, containers with logs, exec, teardown.

use anyhow::{Context, Result, bail};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic_14::transport::Channel;

/// Connects a tonic 0.14 channel to a unix socket.
pub async fn connect(socket: &Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    let channel = tonic_14::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower_05::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    Ok(channel)
}

/// A CRI client: the runtime service of containerd, the image service of `images` (containerd
/// itself, or clip's CRI image service proxy).
#[derive(Debug)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    logs: PathBuf,
}

/// A finished container.
#[derive(Debug)]
pub struct Finished {
    pub exit_code: i32,
    pub log: String,
}

impl CriClient {
    pub async fn connect(containerd: &Path, images: &Path, logs: &Path) -> Result<Self> {
        std::fs::create_dir_all(logs)?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(connect(containerd).await?),
            images: ImageServiceClient::new(connect(images).await?),
            logs: logs.to_path_buf(),
        })
    }

    /// PullImage, with `user:password` as the pull secret when given; returns the image ref.
    pub async fn pull(&mut self, image: &str, auth: Option<(&str, &str)>) -> Result<String> {
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
            auth: auth.map(|(u, p)| cri::AuthConfig { username: u.into(), password: p.into(), ..Default::default() }),
            sandbox_config: None,
        };
        Ok(self.images.pull_image(req).await.context("PullImage")?.into_inner().image_ref)
    }

    fn sandbox_config(name: &str, logs: &Path) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "clip-test".into(),
                attempt: 0,
            }),
            // Host network: no hostname of its own (runc refuses one without a UTS namespace).
            log_directory: logs.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with the host network; returns the sandbox id.
    pub async fn run_pod(&mut self, name: &str) -> Result<String> {
        let logs = self.logs.join(name);
        std::fs::create_dir_all(&logs)?;
        let req = cri::RunPodSandboxRequest {
            config: Some(Self::sandbox_config(name, &logs)),
            runtime_handler: String::new(),
        };
        Ok(self.runtime.run_pod_sandbox(req).await.context("RunPodSandbox")?.into_inner().pod_sandbox_id)
    }

    /// CreateContainer + StartContainer of `image` running `command` in pod `pod`.
    pub async fn start(
        &mut self,
        pod: &str,
        pod_name: &str,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
            command: command.iter().map(ToString::to_string).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let logs = self.logs.join(pod_name);
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(Self::sandbox_config(pod_name, &logs)),
        };
        let id = self.runtime.create_container(req).await.context("CreateContainer")?.into_inner().container_id;
        self.runtime
            .start_container(cri::StartContainerRequest { container_id: id.clone() })
            .await
            .context("StartContainer")?;
        Ok(id)
    }

    /// Waits until the container exits (ContainerStatus) and reads its CRI log.
    pub async fn wait(&mut self, id: &str, pod_name: &str, name: &str, timeout: Duration) -> Result<Finished> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let status = self
                .runtime
                .container_status(cri::ContainerStatusRequest { container_id: id.into(), verbose: false })
                .await
                .context("ContainerStatus")?
                .into_inner()
                .status
                .context("no status")?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                let raw =
                    std::fs::read_to_string(self.logs.join(pod_name).join(format!("{name}.log"))).unwrap_or_default();
                // CRI log lines: `<time> <stream> <F|P> <text>`.
                let log = raw.lines().filter_map(|l| l.splitn(4, ' ').nth(3)).collect::<Vec<_>>().join("\n");
                return Ok(Finished { exit_code: status.exit_code, log });
            }
            if std::time::Instant::now() > deadline {
                bail!("container {name} still {:?} after {timeout:?}", status.state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// ExecSync in a running container; returns (exit code, stdout).
    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> Result<(i32, String)> {
        let r = self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(ToString::to_string).collect(),
                timeout: 60,
            })
            .await
            .context("ExecSync")?
            .into_inner();
        Ok((r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()))
    }

    /// Stops and removes every container of the pod, then the pod.
    pub async fn teardown(&mut self, pod: &str) -> Result<()> {
        let list = self
            .runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter { pod_sandbox_id: pod.into(), ..Default::default() }),
            })
            .await?
            .into_inner();
        for c in list.containers {
            let _ =
                self.runtime.stop_container(cri::StopContainerRequest { container_id: c.id.clone(), timeout: 5 }).await;
            self.runtime
                .remove_container(cri::RemoveContainerRequest { container_id: c.id })
                .await
                .context("RemoveContainer")?;
        }
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.into() })
            .await
            .context("StopPodSandbox")?;
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.into() })
            .await
            .context("RemovePodSandbox")?;
        Ok(())
    }
}
