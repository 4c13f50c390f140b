//! The Go tools `integration/install-deps.sh` builds from the Go module proxy (containerd 2.x,
//! nerdctl, crictl, the SOCI peer): where they are, read from the same `integration/go-tools.env` the script
//! sources, so versions are named once.

use anyhow::{Result, bail};
use std::collections::HashMap;
use std::path::PathBuf;

const ENV_FILE: &str = include_str!("../go-tools.env");

/// The variables of `go-tools.env`, with `${VAR:-default}` and `$VAR` expanded against the
/// process environment and the earlier lines.
fn variables() -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = HashMap::new();
    for line in ENV_FILE.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let Some((name, value)) = line.split_once('=') else { continue };
        let value = if let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
            let (var, default) = inner.split_once(":-").unwrap_or((inner, ""));
            std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
        } else {
            let mut out = value.to_string();
            for (k, v) in &vars {
                out = out.replace(&format!("${k}"), v);
            }
            out
        };
        vars.insert(name.to_string(), value);
    }
    vars
}

fn tool(dir_var: &str, name: &str) -> Result<PathBuf> {
    let vars = variables();
    let Some(dir) = vars.get(dir_var) else {
        bail!("integration/go-tools.env does not define {dir_var}");
    };
    let path = PathBuf::from(dir).join("bin").join(name);
    if !path.is_file() {
        bail!("{} not found: run integration/install-deps.sh (it builds the Go tools)", path.display());
    }
    Ok(path)
}

/// The directory with containerd 2.x's `containerd`, `containerd-shim-runc-v2` and `ctr`.
pub fn containerd2_bin_dir() -> Result<PathBuf> {
    let ctr = tool("CONTAINERD2_DIR", "containerd")?;
    Ok(ctr.parent().map(PathBuf::from).unwrap_or_default())
}

/// The version of containerd 2.x that the harness runs.
pub fn containerd2_version() -> String {
    variables().get("CONTAINERD2_VERSION").cloned().unwrap_or_default()
}

pub fn nerdctl() -> Result<PathBuf> {
    tool("NERDCTL_DIR", "nerdctl")
}

/// runc with idmapped mounts (containerd's CRI needs them for user-namespaced pods).
pub fn runc() -> Result<PathBuf> {
    tool("RUNC_DIR", "runc")
}

/// The directory of the CNI plugins `loopback`, `bridge` and `host-local`.
pub fn cni_plugins_dir() -> Result<PathBuf> {
    let bridge = tool("CNI_PLUGINS_DIR", "bridge")?;
    Ok(bridge.parent().map(PathBuf::from).unwrap_or_default())
}

/// cosign, the signing peer.
pub fn cosign() -> Result<PathBuf> {
    tool("COSIGN_DIR", "cosign")
}

pub fn crictl() -> Result<PathBuf> {
    tool("CRICTL_DIR", "crictl")
}

/// The SOCI snapshotter's `serve` and `convert` (benchmark peer), built from `integration/soci`.
pub fn soci() -> Result<PathBuf> {
    tool("SOCI_DIR", "clip-bench-soci")
}

/// A binary of the one-node Kubernetes cluster (`kube-apiserver`, `kube-controller-manager`,
/// `kube-scheduler`, `kubelet`, `kubectl`, `etcd`), built from `integration/kube`.
pub fn kube_tool(name: &str) -> Result<PathBuf> {
    tool("KUBE_DIR", name)
}

/// containerd 2.x's snapshotter conformance suite, built from `integration/conformance2`.
pub fn conformance2_suite() -> Result<PathBuf> {
    tool("CONFORMANCE2_DIR", "conformance.test")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_env_file_names_every_tool() {
        let vars = super::variables();
        for v in ["CONTAINERD2_DIR", "NERDCTL_DIR", "CRICTL_DIR", "CONTAINERD2_VERSION", "CONFORMANCE2_DIR", "SOCI_DIR"]
        {
            assert!(vars.get(v).is_some_and(|d| !d.is_empty() && !d.contains('$')), "{v}: {vars:?}");
        }
    }
}
