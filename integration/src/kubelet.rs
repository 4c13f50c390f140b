//! kubelet for the one-node cluster of [`crate::kube`]: the node's containerd (with CRI on clip)
//! as its runtime, optionally clip's CRI image-service proxy as its image service, the cgroupfs
//! driver (cgroup v1, no systemd), its state, pod logs and certificates in the test directory.
//! Pods use the host network (the bed has no CNI): the node stays `NotReady` for networking and
//! pods tolerate that ([`pod_tolerations`]). On drop, kubelet is stopped by its pid after the
//! caller deleted its pods.

use crate::kube::{ControlPlane, node_ip, tail};
use crate::process::Daemon;
use crate::{TestDir, free_port, wait_until};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The node's name.
pub const NODE: &str = "clip-node";

/// What a pod spec needs to run on this node: any taint tolerated (the node has no pod network).
pub fn pod_tolerations() -> &'static str {
    "tolerations: [{operator: Exists}]"
}

#[derive(Debug)]
pub struct Kubelet {
    daemon: Daemon,
    root: PathBuf,
    /// Its configuration file and command line, to start it again ([`Kubelet::restart_with`]).
    config: PathBuf,
    args: Vec<std::ffi::OsString>,
}

impl Kubelet {
    /// Starts kubelet on `containerd` (its CRI socket); `image_service`: another CRI image
    /// service endpoint (clip's proxy); `args`: more flags (e.g. a credential provider's).
    /// Waits until the node is registered.
    pub fn start(
        td: &TestDir,
        plane: &ControlPlane,
        containerd: &Path,
        image_service: Option<&Path>,
        args: &[std::ffi::OsString],
    ) -> Result<Self> {
        let root = td.sub("kubelet")?;
        let kubeconfig = plane.node_kubeconfig(NODE)?;
        let ip = node_ip()?;
        let (crt, key) = plane.kubelet_serving_cert(NODE, &ip)?;
        let image_service =
            image_service.map_or(String::new(), |p| format!("imageServiceEndpoint: unix://{}\n", p.display()));
        let config = root.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 cgroupDriver: cgroupfs\ncontainerRuntimeEndpoint: unix://{runtime}\n{image_service}\
                 address: {ip}\nport: {port}\nreadOnlyPort: 0\nhealthzBindAddress: 127.0.0.1\nhealthzPort: {healthz}\n\
                 tlsCertFile: {crt}\ntlsPrivateKeyFile: {key}\n\
                 authentication:\n  anonymous: {{enabled: false}}\n  webhook: {{enabled: false}}\n  x509: {{clientCAFile: {ca}}}\n\
                 authorization: {{mode: AlwaysAllow}}\n\
                 failSwapOn: false\nfailCgroupV1: false\nenforceNodeAllocatable: []\nprotectKernelDefaults: false\n\
                 evictionHard: {{memory.available: \"1Mi\", nodefs.available: \"1%\", imagefs.available: \"1%\"}}\n\
                 imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
                 podLogsDir: {logs}\nresolvConf: /etc/resolv.conf\nlocalStorageCapacityIsolation: true\n\
                 serializeImagePulls: false\nnodeStatusReportFrequency: 10s\n",
                runtime = containerd.display(),
                port = free_port()?,
                healthz = free_port()?,
                crt = crt.display(),
                key = key.display(),
                ca = plane.ca().display(),
                logs = td.sub("kubelet-pod-logs")?.display(),
            ),
        )?;
        let mut all: Vec<std::ffi::OsString> = vec![
            "--config".into(),
            config.clone().into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--root-dir".into(),
            root.join("state").into(),
            "--cert-dir".into(),
            root.join("pki").into(),
        ];
        all.extend(["--hostname-override", NODE, "--node-ip", &ip, "--v", "2"].map(std::ffi::OsString::from));
        all.extend(args.iter().cloned());
        let daemon = launch(&all, &root, plane)?;
        Ok(Self { daemon, root, config, args: all })
    }

    /// Stops kubelet, replaces `from` by `to` in its configuration and starts it again (pods
    /// keep running meanwhile, as on a node whose kubelet restarts).
    pub fn restart_with(&mut self, plane: &ControlPlane, from: &str, to: &str) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        if !text.contains(from) {
            bail!("kubelet's configuration has no {from:?}");
        }
        std::fs::write(&self.config, text.replace(from, to))?;
        self.daemon.stop();
        self.daemon = launch(&self.args, &self.root, plane)?;
        Ok(())
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Starts kubelet and waits until the node is registered.
fn launch(args: &[std::ffi::OsString], root: &Path, plane: &ControlPlane) -> Result<Daemon> {
    let mut cmd = Command::new(crate::gotools::kube_tool("kubelet")?);
    cmd.args(args);
    let mut daemon = Daemon::spawn("kubelet", cmd, &root.join("kubelet.log"))?;
    let registered = wait_until(Duration::from_secs(90), || {
        daemon.is_running()
            && plane.kubectl(&["get", "node", NODE, "-o", "name"]).output().is_ok_and(|o| o.status.success())
    });
    if !registered {
        let log = daemon.log();
        daemon.stop();
        bail!("kubelet did not register the node:\n{}", tail(&log, 60));
    }
    Ok(daemon)
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.daemon.stop();
        remove_pod_cgroups();
    }
}

/// Removes the (empty) `kubepods` cgroups kubelet made in every v1 hierarchy, deepest first.
fn remove_pod_cgroups() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    for h in hierarchies.flatten() {
        let mut dirs = Vec::new();
        let mut stack = vec![h.path().join("kubepods"), h.path().join("kubepods.slice")];
        while let Some(d) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(&d) {
                stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
                dirs.push(d);
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
