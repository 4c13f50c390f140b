//! A Distribution registry (`docker-registry` from Debian) on a free loopback port.

use crate::process::Daemon;
use crate::{TestDir, free_port, run, wait_until};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Basic-auth user of the TLS registry.
pub const TEST_USER: &str = "testuser";
/// Its password.
pub const TEST_PASSWORD: &str = "testpass";

/// TLS material of a [`Registry`] started with [`Registry::start_tls_auth`].
#[derive(Debug, Clone)]
pub struct Tls {
    /// The self-signed CA certificate (also the server certificate), PEM.
    pub ca_cert: PathBuf,
    /// A directory holding `ca.crt`, for `skopeo --cert-dir` / `buildah --cert-dir`.
    pub cert_dir: PathBuf,
    pub username: String,
    pub password: String,
}

/// How a TLS registry's certificate is made.
#[derive(Debug, Clone, Copy)]
enum CertRecipe {
    /// A test CA signs a `CA:FALSE` server certificate.
    CaSigned,
    /// Docker's docs recipe: one self-signed certificate (`CA:TRUE`).
    SelfSigned,
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
}

/// A running registry. Stopped on drop.
#[derive(Debug)]
pub struct Registry {
    daemon: Daemon,
    host: String,
    tls: Option<Tls>,
    dir: PathBuf,
    /// The command prefix that runs a program in the registry's network namespace (empty: the host's).
    wrap: Vec<String>,
}

impl Registry {
    /// A plain-HTTP registry without auth on `127.0.0.1:<free port>`.
    pub fn start_plain(td: &TestDir, name: &str) -> Result<Self> {
        Self::start(td, name, None, "127.0.0.1")
    }

    /// A plain-HTTP registry listening on `addr` (e.g. inside a network namespace via `wrap`).
    pub fn start_plain_at(td: &TestDir, name: &str, listen_ip: &str) -> Result<Self> {
        Self::start(td, name, None, listen_ip)
    }

    /// A TLS registry (self-signed CA for 127.0.0.1 and localhost) with htpasswd basic auth
    /// ([`TEST_USER`] / [`TEST_PASSWORD`]).
    pub fn start_tls_auth(td: &TestDir, name: &str) -> Result<Self> {
        Self::start_tls_auth_with(td, name, TEST_USER, TEST_PASSWORD)
    }

    /// [`Self::start_tls_auth`] with a chosen user and password.
    pub fn start_tls_auth_with(td: &TestDir, name: &str, user: &str, password: &str) -> Result<Self> {
        Self::start_tls(td, name, user, password, CertRecipe::CaSigned)
    }

    /// A TLS + htpasswd registry whose certificate is self-signed the way Docker's registry
    /// docs make it (`openssl req -x509 -newkey rsa:2048 -nodes`, which marks it `CA:TRUE`),
    /// with `subjectAltName` IP:127.0.0.1 and DNS:localhost; [`Tls::ca_cert`] is that
    /// certificate itself.
    pub fn start_tls_auth_self_signed(td: &TestDir, name: &str, user: &str, password: &str) -> Result<Self> {
        Self::start_tls(td, name, user, password, CertRecipe::SelfSigned)
    }

    fn start_tls(td: &TestDir, name: &str, user: &str, password: &str, recipe: CertRecipe) -> Result<Self> {
        let dir = td.sub(&format!("registry-{name}"))?;
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir)?;
        let key = dir.join("registry.key");
        let crt = dir.join("registry.crt");
        let ca = match recipe {
            CertRecipe::SelfSigned => {
                run(Command::new("openssl")
                    .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3", "-subj", "/CN=127.0.0.1"])
                    .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
                    .arg(&key)
                    .arg("-out")
                    .arg(&crt))?;
                crt.clone()
            }
            CertRecipe::CaSigned => Self::ca_signed_cert(&dir, &key, &crt)?,
        };
        std::fs::copy(&ca, cert_dir.join("ca.crt"))?;
        let htpasswd = run(Command::new("htpasswd").args(["-Bbn", user, password]))?;
        std::fs::write(dir.join("htpasswd"), &htpasswd.stdout)?;
        let tls = Tls { ca_cert: ca, cert_dir, username: user.into(), password: password.into() };
        Self::start(td, name, Some(tls), "127.0.0.1")
    }

    /// A CA, and a server certificate it signs; returns the CA's certificate.
    fn ca_signed_cert(dir: &Path, key: &Path, crt: &Path) -> Result<PathBuf> {
        let ca_key = dir.join("ca.key");
        let ca = dir.join("ca.crt");
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3", "-subj", "/CN=clip test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca))?;
        let csr = dir.join("registry.csr");
        run(Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(key)
            .arg("-out")
            .arg(&csr))?;
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:registry.clip.test\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "3", "-set_serial", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(crt))?;
        Ok(ca)
    }

    fn start(td: &TestDir, name: &str, tls: Option<Tls>, listen_ip: &str) -> Result<Self> {
        Self::start_wrapped(td, name, tls, listen_ip, &[])
    }

    /// A plain-HTTP registry with Docker token auth: clients get Bearer tokens from
    /// `service` (its certificate is the registry's `rootcertbundle`).
    pub fn start_token_auth(td: &TestDir, name: &str, service: &crate::token_service::TokenService) -> Result<Self> {
        let extra = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            service.realm(),
            crate::token_service::SERVICE,
            crate::token_service::ISSUER,
            service.cert.display()
        );
        Self::start_configured(td, name, None, "127.0.0.1", &[], &extra)
    }

    /// A pull-through cache of `upstream` (the Distribution registry's `proxy.remoteurl`),
    /// plain HTTP on loopback.
    pub fn start_pull_through(td: &TestDir, name: &str, upstream: &Registry) -> Result<Self> {
        let proxy = format!("proxy:\n  remoteurl: {}\n", upstream.base_url());
        Self::start_configured(td, name, None, "127.0.0.1", &[], &proxy)
    }

    /// A `hosts.toml` under `hosts_dir` for this registry with `mirror` tried first.
    pub fn write_hosts_toml_with_mirror(&self, hosts_dir: &Path, mirror: &Registry) -> Result<()> {
        let d = hosts_dir.join(&self.host);
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"{}\"\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                self.base_url(),
                mirror.base_url()
            ),
        )?;
        Ok(())
    }

    /// Starts the registry through a command prefix (e.g. `ip netns exec NS`).
    pub fn start_wrapped(td: &TestDir, name: &str, tls: Option<Tls>, listen_ip: &str, wrap: &[&str]) -> Result<Self> {
        Self::start_configured(td, name, tls, listen_ip, wrap, "")
    }

    fn start_configured(
        td: &TestDir,
        name: &str,
        tls: Option<Tls>,
        listen_ip: &str,
        wrap: &[&str],
        extra_config: &str,
    ) -> Result<Self> {
        let dir = td.sub(&format!("registry-{name}"))?;
        let port = free_port()?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {listen_ip}:{port}\n  secret: clip-test-{name}\n",
            data.display()
        );
        if tls.is_some() {
            let _ = write!(
                cfg,
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: clip-test\n    path: {}\n",
                dir.join("registry.crt").display(),
                dir.join("registry.key").display(),
                dir.join("htpasswd").display()
            );
        }
        cfg.push_str(extra_config);
        let cfg_path = dir.join("config.yml");
        std::fs::write(&cfg_path, cfg)?;
        let mut cmd = if let Some((first, rest)) = wrap.split_first() {
            let mut c = Command::new(first);
            c.args(rest).arg("docker-registry");
            c
        } else {
            Command::new("docker-registry")
        };
        cmd.arg("serve").arg(&cfg_path);
        let daemon = Daemon::spawn(&format!("registry-{name}"), cmd, &dir.join("registry.log"))?;
        let host = format!("{listen_ip}:{port}");
        let wrap = wrap.iter().map(ToString::to_string).collect();
        let mut reg = Self { daemon, host, tls, dir, wrap };
        let ready = wait_until(Duration::from_secs(15), || reg.answers());
        if !ready {
            bail!("registry {name} did not come up on {}:\n{}", reg.host, reg.daemon.log());
        }
        if !reg.daemon.is_running() {
            bail!("registry {name} exited:\n{}", reg.daemon.log());
        }
        Ok(reg)
    }

    fn answers(&self) -> bool {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2"]);
        if let Some(t) = &self.tls {
            c.arg("--cacert").arg(&t.ca_cert);
        }
        c.arg(format!("{}/v2/", self.base_url()));
        c.output().is_ok_and(|o| matches!(&o.stdout[..], b"200" | b"401"))
    }

    /// `host:port`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://host:port` or `https://host:port`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host)
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Changes one byte (in the middle, the size kept) of this registry's stored copy of blob
    /// `digest`: it then serves bytes that are not the digest's, until restored.
    pub fn flip_blob(&self, digest: &str) -> Result<FlippedBlob> {
        let hex = digest.trim_start_matches("sha256:");
        let path = self.dir.join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
        let original = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let mut flipped = original.clone();
        flipped[original.len() / 2] ^= 0xff;
        std::fs::write(&path, &flipped)?;
        Ok(FlippedBlob { path, original })
    }

    /// Writes a `hosts.toml` for this registry under `hosts_dir/<host>/` (containerd's layout).
    pub fn write_hosts_toml(&self, hosts_dir: &Path) -> Result<()> {
        let d = hosts_dir.join(&self.host);
        std::fs::create_dir_all(&d)?;
        let url = self.base_url();
        let extra = match &self.tls {
            Some(t) => format!("  ca = \"{}\"\n", t.ca_cert.display()),
            None => "  skip_verify = true\n".into(),
        };
        std::fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"{url}\"\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n{extra}"
            ),
        )?;
        Ok(())
    }

    /// `program`, run in the registry's network namespace: set-up (pushing, indexing) reaches a
    /// registry behind a slow link without crossing it — the link is for what a test measures.
    pub fn beside(&self, program: &str) -> Command {
        match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Copies an image from an OCI layout (`layout`, tag `tag`) to `repo:dest_tag` here, blobs
    /// byte for byte (digests preserved), from beside the registry ([`Self::beside`]).
    pub fn push_layout(&self, layout: &Path, tag: &str, repo: &str, dest_tag: &str) -> Result<String> {
        let dest = format!("docker://{}/{repo}:{dest_tag}", self.host);
        let mut c = self.beside("skopeo");
        c.arg("copy").arg("--preserve-digests");
        match &self.tls {
            Some(t) => {
                let auth = self.dir.join("skopeo-auth.json");
                write_authfile(&auth, &self.host, &t.username, &t.password)?;
                c.arg("--dest-authfile").arg(&auth).arg("--dest-cert-dir").arg(&t.cert_dir);
            }
            None => {
                c.arg("--dest-tls-verify=false");
            }
        }
        c.arg(format!("oci:{}:{tag}", layout.display())).arg(&dest);
        run(&mut c).with_context(|| format!("push {tag} to {dest}"))?;
        Ok(format!("{}/{repo}:{dest_tag}", self.host))
    }

    /// [`Self::push_layout`] to a plain-HTTP registry that wants `user`/`password` (token auth).
    pub fn push_layout_as(
        &self,
        layout: &Path,
        tag: &str,
        repo: &str,
        dest_tag: &str,
        user: &str,
        password: &str,
    ) -> Result<String> {
        let dest = format!("docker://{}/{repo}:{dest_tag}", self.host);
        let auth = self.dir.join("skopeo-push-auth.json");
        write_authfile(&auth, &self.host, user, password)?;
        let mut c = self.beside("skopeo");
        c.arg("copy").arg("--preserve-digests").arg("--dest-tls-verify=false").arg("--dest-authfile").arg(&auth);
        c.arg(format!("oci:{}:{tag}", layout.display())).arg(&dest);
        let pushed = run(&mut c).with_context(|| format!("push {tag} to {dest}"));
        let _ = std::fs::remove_file(&auth);
        pushed?;
        Ok(format!("{}/{repo}:{dest_tag}", self.host))
    }

    /// The access log so far (requests to `/v2/...`).
    pub fn access_log(&self) -> Vec<AccessEntry> {
        parse_access_log(&self.daemon.log())
    }

    /// Bytes the registry sent in blob responses so far.
    pub fn blob_bytes_served(&self) -> u64 {
        self.access_log().iter().filter(|e| e.path.contains("/blobs/")).map(|e| e.bytes).sum()
    }

    /// The daemon's raw log.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

/// Writes a containers-auth.json / docker config.json with one entry (mode 0600).
pub fn write_authfile(path: &Path, host: &str, user: &str, password: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let auth = base64_encode(format!("{user}:{password}").as_bytes());
    let body = serde_json::json!({ "auths": { host: { "auth": auth } } });
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(body.to_string().as_bytes())?;
    Ok(())
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parses Apache combined log lines as the registry writes them:
/// `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 206 50000 "" "agent"`.
pub fn parse_access_log(log: &str) -> Vec<AccessEntry> {
    log.lines()
        .filter_map(|line| {
            let start = line.find("] \"")? + 3;
            let rest = &line[start..];
            let end = rest.find('"')?;
            let mut req = rest[..end].split(' ');
            let method = req.next()?.to_string();
            let path = req.next()?.to_string();
            if !path.starts_with("/v2/") {
                return None;
            }
            let mut tail = rest[end + 1..].split_whitespace();
            let status = tail.next()?.parse().ok()?;
            let bytes = tail.next()?.parse().unwrap_or(0);
            Some(AccessEntry { method, path, status, bytes })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_lines() {
        let log = "time=\"x\" level=info msg=\"response completed\"\n\
            127.0.0.1 - - [28/Nov/2026:05:00:00 +0000] \"GET /v2/a/blobs/sha256:ab HTTP/1.1\" 206 50000 \"\" \"Go-http-client/1.1\"\n\
            127.0.0.1 - - [28/Nov/2026:05:00:00 +0000] \"HEAD /v2/a/manifests/latest HTTP/1.1\" 200 0 \"\" \"x\"\n";
        let e = parse_access_log(log);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            AccessEntry { method: "GET".into(), path: "/v2/a/blobs/sha256:ab".into(), status: 206, bytes: 50000 }
        );
        assert_eq!(e[1].method, "HEAD");
    }

    #[test]
    fn base64_matches_reference() {
        assert_eq!(base64_encode(b"testuser:testpass"), "dGVzdHVzZXI6dGVzdHBhc3M=");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_encode(b"ab"), "YWI=");
    }
}

/// A blob a [`Registry::flip_blob`] changed.
#[derive(Debug)]
pub struct FlippedBlob {
    path: PathBuf,
    original: Vec<u8>,
}

impl FlippedBlob {
    /// Puts the original bytes back.
    pub fn restore(&self) -> Result<()> {
        std::fs::write(&self.path, &self.original).with_context(|| self.path.display().to_string())
    }
}
