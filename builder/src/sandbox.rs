//! Runs an image's own code — the profile command — as an unprivileged container: through runc,
//! with an OCI spec as containerd writes one for a pod, plus a user namespace. The command is
//! root only inside it (uid and gid 0 are [`ID_SHIFT`] on the host), has no network but its own
//! loopback, sees a private `/dev` with the standard devices only, cannot mount (the default
//! capability set, `no_new_privileges`), and its mounts are made by runc inside the root, so an
//! image's symlinks never lead onto host paths. The image's layers are mounted `nosuid,nodev`
//! with their owners shifted by [`ID_SHIFT`] (`clip_layerfs::LayerFs::with_id_shift`), so the
//! container's root owns what the image's root owns, and nothing of the host.

use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The host uid and gid of the container's 0.
pub const ID_SHIFT: u32 = 1 << 30;
/// How many ids the container has (0..65535, as a pod with a user namespace).
pub const ID_COUNT: u32 = 65536;

/// Where bundles live: every directory above a rootfs must be searchable by the container's
/// root, which is nobody on the host (containerd keeps its bundles 0711 for the same reason).
const BUNDLES: &str = "/run/clip-builder";

/// The capabilities containerd gives a container by default.
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A bundle directory (`config.json`, `rootfs/`), 0711, removed when dropped.
#[derive(Debug)]
pub struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    pub fn new() -> Result<Self> {
        std::fs::create_dir_all(BUNDLES).with_context(|| format!("creating {BUNDLES}"))?;
        std::fs::set_permissions(BUNDLES, std::fs::Permissions::from_mode(0o711))?;
        let dir = tempfile::Builder::new().prefix("profile-").tempdir_in(BUNDLES).context("bundle directory")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        std::fs::create_dir(dir.path().join("rootfs"))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the image's root is to be mounted.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

/// The OCI runtime spec of the profile container: `/bin/sh -c script` as root of a user
/// namespace, the image's environment.
pub fn spec(env: &[String], script: &str) -> serde_json::Value {
    let caps = DEFAULT_CAPABILITIES;
    let ids = [serde_json::json!({"containerID": 0, "hostID": ID_SHIFT, "size": ID_COUNT})];
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh", "-c", script],
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "clip-profile",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "uidMappings": ids,
            "gidMappings": ids,
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "user"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// Runs `script` in `bundle` (its rootfs mounted) until it exits or `limit` passes; returns its
/// exit code (`None`: killed at the limit). Its output goes to stderr.
pub fn run(bundle: &Bundle, env: &[String], script: &str, limit: Duration) -> Result<Option<i32>> {
    std::fs::write(bundle.path().join("config.json"), serde_json::to_vec_pretty(&spec(env, script))?)?;
    let state = bundle.path().join("runc");
    let id = format!("clip-profile-{}", std::process::id());
    let runc = |args: &[&str]| {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&state).args(args);
        c
    };
    let mut child = runc(&["run", "--bundle"])
        .arg(bundle.path())
        .arg(&id)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        // The command's output goes to stderr: stdout is the report's.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run runc ({e}); is it installed (apt install runc)?"))?;
    let until = Instant::now() + limit;
    let exit_code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if Instant::now() >= until {
            tracing::warn!(seconds = limit.as_secs(), "the profile command runs past the time limit; killed");
            let _ = runc(&["kill", &id, "KILL"]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = runc(&["delete", "--force", &id]).stderr(std::process::Stdio::null()).status();
    Ok(exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_is_an_unprivileged_container() {
        let spec = spec(&["PATH=/bin".into()], "true");
        let namespaces: Vec<&str> =
            spec["linux"]["namespaces"].as_array().into_iter().flatten().filter_map(|n| n["type"].as_str()).collect();
        for ns in ["user", "network", "pid", "mount"] {
            assert!(namespaces.contains(&ns), "{ns} namespace missing");
        }
        assert_eq!(spec["linux"]["uidMappings"][0]["hostID"], ID_SHIFT);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        let caps = spec["process"]["capabilities"]["bounding"].to_string();
        assert!(!caps.contains("CAP_SYS_ADMIN") && !caps.contains("CAP_NET_ADMIN"), "{caps}");
        assert!(spec["mounts"].as_array().into_iter().flatten().all(|m| m["source"] != "/dev"), "no host /dev");
    }
}
