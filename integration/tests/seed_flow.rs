//! The seed system's flow end to end: `clip-builder token` mints a short-lived build registry
//! token (ECR's protocol, local stand-in) for a registry with Docker token auth; `clip-builder
//! build` pushes and indexes with it; `clip-snapshotter pull` passes it as
//! `clip.build-registry-creds` and the container starts lazily; the token expires; reads of files
//! never fetched still succeed because the snapshotter mints its own from its config. The logs
//! name the credential source at build and at run time, never a secret.

use anyhow::Result;
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::ecr_stub::FakeEcr;
use clip_integration::images::TestImage;
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::token_service::TokenService;
use clip_integration::{TestDir, require_root, run};
use std::process::Command;
use std::time::{Duration, Instant};

/// Lifetime of a build registry token (ECR's are 12 h; short here so it expires in the test).
const TOKEN_TTL_S: u64 = 45;
const AWS_SECRET: &str = "Aws-Secret-Key-Sentinel-51f0";

#[test]
fn a_built_image_runs_lazily_and_keeps_reading_after_its_build_token_expired() -> Result<()> {
    require_root();
    let td = TestDir::new("seed")?;
    let base = Registry::start_plain(&td, "base")?;
    let base_ref = base.push_layout(&TestImage::Python.layout()?, "pyapp", "library/python", "latest")?;
    let ecr = FakeEcr::start(TOKEN_TTL_S)?;
    let tokens = TokenService::start_checking(&td, ecr.checker(), 5)?;
    let build = Registry::start_token_auth(&td, "build", &tokens)?;
    let credentials = format!(
        "[build_registry.credentials]\ntype = \"ecr\"\nregion = \"eu-west-1\"\naccess_key_id = \"AKIATESTKEY\"\n\
         secret_access_key = \"{AWS_SECRET}\"\nendpoint_url = \"{}\"\n",
        ecr.url()
    );
    let builder_config = td.path().join("builder.toml");
    std::fs::write(
        &builder_config,
        format!(
            "storage_root = \"{0}/buildah-root\"\nrunroot = \"{0}/buildah-run\"\nstorage_driver = \"vfs\"\nstate_dir = \"{0}/state\"\n\
             [build_registry]\nregistry = \"{1}\"\nrepository = \"userimages\"\ninsecure = true\n{credentials}",
            td.path().display(),
            build.host(),
        ),
    )?;

    // 1. A short-lived token, minted by the builder.
    let minted_at = Instant::now();
    let out = run(Command::new(workspace_binary("clip-builder")?).args(["token", "--config"]).arg(&builder_config))?;
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(token.starts_with("AWS:ecr-password-"), "not a minted token");
    let expiry_note = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(expiry_note.contains("expires in"), "{expiry_note}");

    // 2. Build, push and index with it (given only through the environment).
    let context = td.sub("context")?;
    std::fs::write(context.join("Containerfile"), format!("FROM {base_ref}\nCOPY added.txt /added.txt\n"))?;
    std::fs::write(context.join("added.txt"), "built with a short-lived token\n")?;
    let target = format!("{}/userimages/app:v1", build.host());
    let out = Command::new(workspace_binary("clip-builder")?)
        .args(["build", "--json", "--config"])
        .arg(&builder_config)
        .args(["-t", &target])
        .arg(&context)
        .env("CLIP_BUILD_REGISTRY_CREDS", &token)
        .env("RUST_LOG", "info")
        .env("TMPDIR", td.sub("tmp")?)
        .output()?;
    let build_log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "build failed:\n{build_log}");
    assert!(build_log.contains("build registry credentials (clip.build-registry-creds)"), "{build_log}");

    // 3. Pull with the token as clip.build-registry-creds; the container starts lazily.
    let hosts_dir = td.sub("certs.d")?;
    let d = hosts_dir.join(build.host());
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"http://{}\"\n", build.host()))?;
    let mut snap_config = lazy_config(true);
    snap_config.registry.hosts_dir = Some(hosts_dir.clone());
    snap_config.build_registry = Some(clip_config::BuildRegistry {
        registry: build.host().to_string(),
        repository: "userimages".into(),
        insecure: true,
        ca_file: None,
        credentials: Some(clip_config::LongTermCredentials::Ecr {
            region: "eu-west-1".into(),
            access_key_id: Some("AKIATESTKEY".into()),
            secret_access_key: Some(AWS_SECRET.into()),
            use_default_chain: false,
            endpoint_url: Some(ecr.url()),
        }),
    });
    let snap = ClipSnapshotter::start_configured(&td, "clip", &snap_config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    let out = run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--json", "--plain-http", "-n", "t", "--config"])
        .arg(td.path().join("clip.toml"))
        .arg("--hosts-dir")
        .arg(&hosts_dir)
        .arg("--containerd-address")
        .arg(ctrd.socket())
        .arg(&target)
        .env("CLIP_BUILD_REGISTRY_CREDS", &token))?;
    let pulled: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(pulled["lazy_layers"], 5, "{pulled}");
    let out = ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &target, "first", "cat", "/added.txt"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "built with a short-lived token");
    let ecr_calls_before = ecr.calls.load(std::sync::atomic::Ordering::SeqCst);

    // 4. The token expires (and the registry's bearer tokens, 5 s).
    let expired_at = Duration::from_secs(TOKEN_TTL_S + 6);
    if let Some(left) = expired_at.checked_sub(minted_at.elapsed()) {
        eprintln!("waiting {:.0} s for the build token to expire", left.as_secs_f64());
        std::thread::sleep(left);
    }
    assert!(!(ecr.checker())("AWS", token.trim_start_matches("AWS:")), "the token should have expired");

    // 5. Files never fetched (numpy) still read: the snapshotter mints its own token.
    let out = ctrd.ctr_run(
        "t",
        &["run", "--rm", "--snapshotter", "clip", &target, "second", "python3", "-c", "import numpy; print(42)"],
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    assert!(ecr.calls.load(std::sync::atomic::Ordering::SeqCst) > ecr_calls_before, "the snapshotter minted nothing");
    let log = snap.log();
    assert!(
        log.contains("using build registry credentials for image access (image was built and pushed by us)"),
        "{log}"
    );
    assert!(log.contains("using a build registry token minted from the configured long-term credentials"), "{log}");
    for (what, text) in [("snapshotter log", &log), ("build output", &build_log), ("containerd log", &ctrd.log())] {
        assert!(!text.contains("ecr-password-"), "a token in the {what}");
        assert!(!text.contains(AWS_SECRET), "the AWS secret in the {what}");
    }
    ctrd.purge()?;
    Ok(())
}
