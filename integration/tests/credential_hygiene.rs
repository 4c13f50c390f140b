//! A sentinel password given through every credential path appears in no log line and no
//! error message, in succeeding and in failing runs; only `clip-builder token` prints a secret,
//! on stdout.

use anyhow::{Context, Result};
use clip_config::LongTermCredentials;
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::workspace_binary;
use clip_integration::{TestDir, require_root};
use clip_registry::credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain};
use clip_registry::{HostsConfig, Platform, Reference, RegistryClient, TokenMinter};
use std::io::Write;
use std::sync::{Arc, Mutex};

const GOOD: &str = "Sentinel-Good-7d1e";
const BAD: &str = "Sentinel-Bad-93ac";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn sentinel_passwords_never_reach_logs_or_errors() -> Result<()> {
    require_root();
    let td = TestDir::new("hygiene")?;
    let reg = Registry::start_tls_auth_with(&td, "tls", "builder", GOOD)?;
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "userimages/busybox", "latest")?;
    let (digest, _, _) = layout_layers(&layout, "busybox")?.remove(0);
    let hosts_dir = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts_dir)?;
    let image = Reference::parse(&format!("{}/userimages/busybox:latest", reg.host()))?;
    let scope = BuildRegistryScope::new(reg.host(), "userimages");

    let docker_config = |password: &str| -> Result<std::path::PathBuf> {
        use base64::Engine;
        let p = td.path().join(format!("docker-{password}.json"));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("builder:{password}"));
        std::fs::write(&p, serde_json::json!({"auths": {reg.host(): {"auth": auth}}}).to_string())?;
        Ok(p)
    };
    let password_file = |password: &str| -> Result<std::path::PathBuf> {
        let p = td.path().join(format!("pw-{password}"));
        std::fs::write(&p, format!("{password}\n"))?;
        Ok(p)
    };

    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    let mut errors = Vec::new();
    let mut successes = 0;
    tracing::subscriber::with_default(subscriber, || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let client = RegistryClient::new(HostsConfig { dir: Some(hosts_dir.clone()), plain_http: false });
            for password in [GOOD, BAD] {
                let cred = Credential::new("builder", password);
                let minter = Arc::new(
                    TokenMinter::from_config(&LongTermCredentials::Basic {
                        username: "builder".into(),
                        password: None,
                        password_file: Some(password_file(password)?),
                    })
                    .await?,
                );
                let paths: Vec<(&str, ChainInputs)> = vec![
                    ("image", ChainInputs { image_creds: Some(cred.clone()), ..Default::default() }),
                    ("source", ChainInputs { source_image_creds: Some(cred.clone()), ..Default::default() }),
                    (
                        "build",
                        ChainInputs {
                            build_registry_creds: Some(cred.clone()),
                            build_registry: Some(scope.clone()),
                            ..Default::default()
                        },
                    ),
                    (
                        "minted",
                        ChainInputs {
                            minter: Some(minter.clone()),
                            build_registry: Some(scope.clone()),
                            ..Default::default()
                        },
                    ),
                    (
                        "docker-config",
                        ChainInputs {
                            docker_config: true,
                            docker_config_path: Some(docker_config(password)?),
                            ..Default::default()
                        },
                    ),
                ];
                for (name, inputs) in paths {
                    let repo = client.repository(&image, CredentialChain::for_image(&image, &inputs))?;
                    let result = async {
                        repo.get_image_manifest("latest", &Platform::default()).await?;
                        repo.get_blob_range(&digest, 0, 512).await
                    }
                    .await;
                    match (password, result) {
                        (GOOD, Ok(_)) => successes += 1,
                        (GOOD, Err(e)) => anyhow::bail!("{name} with the right password failed: {e}"),
                        (_, Ok(_)) => anyhow::bail!("{name} with a wrong password succeeded"),
                        (_, Err(e)) => errors.push(format!("{name}: {e} | {e:?}")),
                    }
                }
            }
            anyhow::Ok(())
        })
    })?;
    assert_eq!(successes, 5, "every path works with the right password");
    assert_eq!(errors.len(), 5, "every path fails with a wrong one");
    let logs = String::from_utf8_lossy(&capture.0.lock().expect("lock")).into_owned();
    assert!(logs.lines().count() > 20, "the capture saw the run:\n{logs}");
    assert!(logs.contains("using build registry credentials for image access"), "decision logged");
    for sentinel in [GOOD, BAD] {
        assert!(!logs.contains(sentinel), "{sentinel} leaked into logs");
        for e in &errors {
            assert!(!e.contains(sentinel), "{sentinel} leaked into an error: {e}");
        }
    }
    eprintln!("{} log lines and {} errors checked; e.g. {}", logs.lines().count(), errors.len(), errors[0]);

    // clip-builder token: the secret on stdout only.
    let config = td.path().join("builder.toml");
    std::fs::write(
        &config,
        format!(
            "[build_registry]\nregistry = \"{}\"\nrepository = \"userimages\"\n[build_registry.credentials]\ntype = \"basic\"\nusername = \"builder\"\npassword_file = \"{}\"\n",
            reg.host(),
            password_file(GOOD)?.display()
        ),
    )?;
    let out = std::process::Command::new(workspace_binary("clip-builder")?)
        .args(["token", "--config"])
        .arg(&config)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("builder:{GOOD}"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(GOOD));
    let out = std::process::Command::new(workspace_binary("clip-builder")?)
        .args(["token", "--json", "--config"])
        .arg(&config)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("token --json")?;
    assert_eq!(v["build_registry_creds"], format!("builder:{GOOD}"));
    assert_eq!(v["kind"], "basic");
    // A failing token command names the file, not a secret.
    std::fs::write(
        &config,
        "[build_registry]\nregistry = \"r:1\"\nrepository = \"x\"\n[build_registry.credentials]\ntype = \"basic\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n",
    )?;
    let out = std::process::Command::new(workspace_binary("clip-builder")?)
        .args(["token", "--config"])
        .arg(&config)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pw"));
    Ok(())
}
