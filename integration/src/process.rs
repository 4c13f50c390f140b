//! A daemon started by a test: its own process group, output to a log file, stopped by PID on drop.

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running daemon. Dropping it sends SIGTERM, waits up to 10 s, then SIGKILLs its process group.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` in a new process group with stdin from /dev/null and stdout+stderr appended to
    /// `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self { name: name.to_string(), child: Some(child), log: log.to_path_buf() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` to the daemon's PID.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid() as i32), signal).with_context(|| format!("signal {}", self.name))
    }

    /// Stops the daemon: `signal`, then up to `grace` to exit, then SIGKILL to its group.
    pub fn stop_with(&mut self, signal: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let pid = Pid::from_raw(child.id() as i32);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = kill(pid, signal);
            let exited = crate::wait_until(grace, || matches!(child.try_wait(), Ok(Some(_))));
            if !exited {
                eprintln!("{} ({pid}) did not exit on {signal}; killing its group", self.name);
            }
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the daemon with SIGTERM.
    pub fn stop(&mut self) {
        self.stop_with(Signal::SIGTERM, Duration::from_secs(10));
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...) in bytes; 0 if absent.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let prefix = format!("{field}:");
    status
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or_default() * 1024)
}

/// What `/proc/PID/stat` says of a process's work so far; zeros if it is gone.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    /// User and system CPU, its waited-for children's included.
    pub cpu_seconds: f64,
    /// Page faults that read from disk (a mapped file's pages not in the page cache).
    pub major_faults: u64,
}

pub fn proc_stat(pid: u32) -> ProcStat {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3, majflt 12, utime 14 .. cstime 17.
    let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or_default();
    ProcStat { cpu_seconds: (field(14) + field(15) + field(16) + field(17)) as f64 / ticks, major_faults: field(12) }
}

/// Waits for `child` while watching its peak resident memory (`VmHWM`, read every 20 ms until
/// it exits): its output and that peak in bytes.
pub fn wait_with_peak_rss(child: std::process::Child) -> std::io::Result<(std::process::Output, u64)> {
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(status_bytes(pid, "VmHWM"));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let out = child.wait_with_output();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = watcher.join().unwrap_or_default();
    Ok((out?, peak))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
