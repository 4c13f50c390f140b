//! A one-node Kubernetes control plane for the tests: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler built from the Go module proxy
//! (`integration/kube`, see `install-deps.sh`), on loopback ports of their own, with a private CA,
//! certificates and kubeconfigs made by `openssl` in the test directory. Stopped (every process
//! by its pid) when dropped.

use crate::process::Daemon;
use crate::{TestDir, free_port, run};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The cluster's service network (the API server's `kubernetes` service takes its first address).
const SERVICE_CIDR: &str = "10.96.0.0/24";

/// A private CA and the certificates it signs.
#[derive(Debug)]
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: PathBuf) -> Result<Self> {
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=clip-test-kube-ca"])
            .arg("-keyout")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(dir.join("ca.crt")))?;
        Ok(Self { dir })
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `<name>.crt`/`<name>.key` for subject `subject`, with `sans` (server certificates) or
    /// for client authentication.
    fn issue(&self, name: &str, subject: &str, sans: Option<&str>) -> Result<(PathBuf, PathBuf)> {
        let (key, csr, crt, ext) = (
            self.dir.join(format!("{name}.key")),
            self.dir.join(format!("{name}.csr")),
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.ext")),
        );
        run(Command::new("openssl")
            .args(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&csr))?;
        let usage = match sans {
            Some(s) => format!("subjectAltName={s}\nextendedKeyUsage=serverAuth,clientAuth\n"),
            None => "extendedKeyUsage=clientAuth\n".to_string(),
        };
        std::fs::write(&ext, format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{usage}"))?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(self.ca())
            .arg("-CAkey")
            .arg(self.dir.join("ca.key"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&crt))?;
        Ok((crt, key))
    }

    /// A kubeconfig for `server` with a client certificate for `subject`.
    fn kubeconfig(&self, name: &str, subject: &str, server: &str) -> Result<PathBuf> {
        let (crt, key) = self.issue(name, subject, None)?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: clip-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
                 users:\n- name: {name}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
                 contexts:\n- name: clip-test\n  context: {{cluster: clip-test, user: {name}}}\ncurrent-context: clip-test\n",
                ca = self.ca().display(),
                crt = crt.display(),
                key = key.display()
            ),
        )?;
        Ok(path)
    }
}

/// The node's address: the host's first global IPv4 address (kubelet refuses a loopback node
/// IP; the API server reaches kubelet there for logs and exec). Traffic to it stays on the host.
pub fn node_ip() -> Result<String> {
    let out = crate::run_stdout(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]))?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("the host has no global IPv4 address for kubelet's node IP"))
}

/// Where the cluster's binaries are.
fn bin(name: &str) -> Result<PathBuf> {
    crate::gotools::kube_tool(name)
}

/// The control plane of a one-node cluster.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    pki: Pki,
    server: String,
    admin: PathBuf,
    daemons: Vec<Daemon>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (waiting for `/readyz`), kube-controller-manager and
    /// kube-scheduler under `td`.
    pub fn start(td: &TestDir) -> Result<Self> {
        let dir = td.sub("kube")?;
        let pki = Pki::new(td.sub("kube/pki")?)?;
        let (etcd_client, etcd_peer, api_port) = (free_port()?, free_port()?, free_port()?);
        let server = format!("https://127.0.0.1:{api_port}");
        let mut daemons = Vec::new();

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let mut etcd = Command::new(bin("etcd")?);
        etcd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{etcd_peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{etcd_peer}")])
            .args(["--initial-cluster", &format!("default=http://127.0.0.1:{etcd_peer}")])
            .args(["--unsafe-no-fsync"]);
        daemons.push(Daemon::spawn("etcd", etcd, &dir.join("etcd.log"))?);

        // The API server advertises the host's address (a loopback one is refused); it listens on
        // loopback only.
        let host_ip = node_ip()?;
        let sans = format!("IP:127.0.0.1,IP:{host_ip},IP:10.96.0.1,DNS:kubernetes");
        let (api_crt, api_key) = pki.issue("apiserver", "/CN=kube-apiserver", Some(&sans))?;
        let sa_key = pki.dir.join("sa.key");
        run(Command::new("openssl").args(["genrsa", "-out"]).arg(&sa_key).arg("2048"))?;
        let sa_pub = pki.dir.join("sa.pub");
        run(Command::new("openssl").args(["rsa", "-pubout", "-in"]).arg(&sa_key).arg("-out").arg(&sa_pub))?;
        let (kubelet_client_crt, kubelet_client_key) =
            pki.issue("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", None)?;
        let mut api = Command::new(bin("kube-apiserver")?);
        api.args(["--etcd-servers", &etcd_url, "--bind-address", "127.0.0.1", "--advertise-address", &host_ip])
            .args(["--secure-port", &api_port.to_string(), "--service-cluster-ip-range", SERVICE_CIDR])
            .arg("--tls-cert-file")
            .arg(&api_crt)
            .arg("--tls-private-key-file")
            .arg(&api_key)
            .arg("--client-ca-file")
            .arg(pki.ca())
            .arg("--kubelet-certificate-authority")
            .arg(pki.ca())
            .arg("--kubelet-client-certificate")
            .arg(&kubelet_client_crt)
            .arg("--kubelet-client-key")
            .arg(&kubelet_client_key)
            .arg("--service-account-key-file")
            .arg(&sa_pub)
            .arg("--service-account-signing-key-file")
            .arg(&sa_key)
            .args(["--service-account-issuer", "https://kubernetes.default.svc.cluster.local"])
            .args(["--authorization-mode=Node,RBAC", "--allow-privileged=true"])
            // Reach kubelet at its node IP: a node name would be looked up in DNS, off the host.
            .args(["--kubelet-preferred-address-types=InternalIP"])
            .arg("--cert-dir")
            .arg(dir.join("apiserver-certs"));
        daemons.push(Daemon::spawn("kube-apiserver", api, &dir.join("kube-apiserver.log"))?);
        let admin = pki.kubeconfig("admin", "/O=system:masters/CN=clip-test-admin", &server)?;
        let mut plane = Self { dir: dir.clone(), pki, server, admin, daemons };
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        let ready = loop {
            if plane.kubectl(&["get", "--raw", "/readyz"]).output().is_ok_and(|o| o.stdout == b"ok") {
                break true;
            }
            if std::time::Instant::now() > deadline || !plane.daemons.iter_mut().all(Daemon::is_running) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        if !ready {
            bail!("kube-apiserver did not become ready:\n{}", plane.logs());
        }

        let controllers =
            plane.pki.kubeconfig("controller-manager", "/CN=system:kube-controller-manager", &plane.server)?;
        let mut cm = Command::new(bin("kube-controller-manager")?);
        cm.arg("--kubeconfig")
            .arg(&controllers)
            .arg("--authentication-kubeconfig")
            .arg(&controllers)
            .arg("--authorization-kubeconfig")
            .arg(&controllers)
            .arg("--service-account-private-key-file")
            .arg(&sa_key)
            .arg("--root-ca-file")
            .arg(plane.pki.ca())
            .args(["--use-service-account-credentials=true", "--bind-address", "127.0.0.1"])
            .args(["--secure-port", &free_port()?.to_string(), "--leader-elect=false"])
            .args(["--service-cluster-ip-range", SERVICE_CIDR]);
        plane.daemons.push(Daemon::spawn("kube-controller-manager", cm, &dir.join("kube-controller-manager.log"))?);
        let scheduler = plane.pki.kubeconfig("scheduler", "/CN=system:kube-scheduler", &plane.server)?;
        let mut sched = Command::new(bin("kube-scheduler")?);
        sched
            .arg("--kubeconfig")
            .arg(&scheduler)
            .arg("--authentication-kubeconfig")
            .arg(&scheduler)
            .arg("--authorization-kubeconfig")
            .arg(&scheduler)
            .args(["--bind-address", "127.0.0.1", "--secure-port", &free_port()?.to_string(), "--leader-elect=false"]);
        plane.daemons.push(Daemon::spawn("kube-scheduler", sched, &dir.join("kube-scheduler.log"))?);
        Ok(plane)
    }

    /// `kubectl` as the cluster's administrator.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("kubectl").unwrap_or_else(|_| PathBuf::from("kubectl")));
        c.arg("--kubeconfig").arg(&self.admin).args(["--request-timeout", "60s"]).args(args);
        c
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The cluster CA (kubelet's client CA).
    pub fn ca(&self) -> PathBuf {
        self.pki.ca()
    }

    /// A kubeconfig for node `node` (`system:node:<node>`, group `system:nodes`).
    pub fn node_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        self.pki.kubeconfig(&format!("kubelet-{node}"), &format!("/O=system:nodes/CN=system:node:{node}"), &self.server)
    }

    /// A serving certificate for a kubelet at `ip`.
    pub fn kubelet_serving_cert(&self, node: &str, ip: &str) -> Result<(PathBuf, PathBuf)> {
        let sans = format!("IP:{ip},IP:127.0.0.1,DNS:{node}");
        self.pki.issue(&format!("kubelet-serving-{node}"), &format!("/CN={node}"), Some(&sans))
    }

    /// Every component's log.
    /// Waits up to `timeout` until no pod is left (in any namespace when `all_namespaces`,
    /// else in `default`).
    pub fn pods_gone(&self, all_namespaces: bool, timeout: std::time::Duration) -> bool {
        let args: &[&str] =
            if all_namespaces { &["get", "pods", "-A", "-o", "name"] } else { &["get", "pods", "-o", "name"] };
        crate::wait_until(timeout, || {
            self.kubectl(args).output().is_ok_and(|o| o.status.success() && o.stdout.is_empty())
        })
    }

    pub fn logs(&self) -> String {
        let parts: Vec<String> =
            self.daemons.iter().map(|d| format!("== {}\n{}", d.log_path().display(), tail(&d.log(), 40))).collect();
        parts.join("\n")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The scheduler and controllers first, etcd last.
        while let Some(mut d) = self.daemons.pop() {
            d.stop();
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `kubectl` and returns its stdout, failing with its stderr.
pub fn kubectl_stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().context("running kubectl")?;
    if !out.status.success() {
        bail!("kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
