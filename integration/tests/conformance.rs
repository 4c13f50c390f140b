//! containerd 1.6's own snapshotter conformance suite (`snapshots/testsuite.SnapshotterSuite`)
//! against clip-snapshotter through containerd's snapshots proxy client, built offline in
//! GOPATH mode from Debian's `golang-github-containerd-containerd-dev`
//! (see `integration/conformance/conformance_test.go`).

use anyhow::{Context, Result};
use clip_integration::snapshotter::workspace_binary;
use clip_integration::{TestDir, require_root, run};
use std::path::Path;
use std::process::Command;

const GOPATH_DEBIAN: &str = "/usr/share/gocode";

fn build_suite(td: &TestDir) -> Result<std::path::PathBuf> {
    let pkg = td.sub("gopath/src/clipconformance")?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/conformance_test.go");
    std::fs::copy(&src, pkg.join("conformance_test.go")).context("copy the Go harness")?;
    let out = td.path().join("conformance.test");
    run(Command::new("go")
        .args(["test", "-c", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(&pkg)
        .env("GOPATH", format!("{}:{GOPATH_DEBIAN}", td.path().join("gopath").display()))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off"))
    .context("building the Go conformance harness (needs golang-go and golang-github-containerd-containerd-dev)")?;
    Ok(out)
}

#[test]
fn containerd_snapshotter_suite_passes_through_the_proxy_client() -> Result<()> {
    require_root();
    let td = TestDir::new("conformance")?;
    let suite = build_suite(&td)?;
    let tmp = td.sub("tmp")?;
    let out = Command::new(&suite)
        .args(["-test.v", "-test.timeout", "10m"])
        .env("CLIP_SNAPSHOTTER_BIN", workspace_binary("clip-snapshotter")?)
        .env("TMPDIR", &tmp)
        .current_dir(td.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let daemon_logs: String = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".clip.log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        out.status.success(),
        "conformance suite failed:\n{stdout}\n{}\ndaemon logs of failed sub-tests:\n{daemon_logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("--- PASS: TestClipSnapshotter/"))
        .collect();
    eprintln!("conformance sub-tests passed: {}", passed.len());
    // containerd 1.6's suite has 21 sub-tests; upstream skips Rename for every snapshotter.
    for must in ["Basic", "Update", "Walk", "Remove", "128LayersMount", "ViewReadonly", "Chown"] {
        assert!(
            passed.iter().any(|p| p.starts_with(&format!("{must} "))),
            "{must} did not pass:\n{stdout}"
        );
    }
    assert!(passed.len() >= 20, "only {} sub-tests passed:\n{stdout}", passed.len());
    Ok(())
}
