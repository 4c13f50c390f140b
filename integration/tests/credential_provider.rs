//! kubelet credential provider plugins called by the snapshotter itself: a plugin (a script
//! speaking the exec protocol) hands out tokens that a registry's token service accepts for
//! 45 seconds only. A container started lazily keeps reading files it never read before long
//! after the token its layers were opened with expired, because the snapshotter renews it
//! through the plugin (at the end of the plugin's cache duration, before the registry refuses).

use anyhow::Result;
use clip_integration::bed::lazy_config;
use clip_integration::containerd::{Containerd, ContainerdOptions};
use clip_integration::images::TestImage;
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::token_service::TokenService;
use clip_integration::{TestDir, require_root, run};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// How long a plugin's token is accepted.
const TOKEN_LIFETIME_S: u64 = 45;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A token as the plugin makes it: `tok-<unix seconds>`.
fn token_now() -> String {
    format!("tok-{}", now())
}

#[test]
fn a_credential_provider_plugin_keeps_a_long_running_container_reading() -> Result<()> {
    require_root();
    let td = TestDir::new("cred-provider")?;
    // The token service accepts `plugin`/`tok-<t>` while t is less than 45 s old; its registry
    // tokens live 5 s, so every few seconds the snapshotter asks it again.
    let accepts = Arc::new(|user: &str, password: &str| {
        let issued = password.strip_prefix("tok-").and_then(|t| t.parse::<u64>().ok());
        user == "plugin" && issued.is_some_and(|t| t <= now() && now() - t < TOKEN_LIFETIME_S)
    });
    let tokens = TokenService::start_checking(&td, accepts, 5)?;
    let reg = Registry::start_token_auth(&td, "private", &tokens)?;
    let reference =
        reg.push_layout_as(&TestImage::Python.layout()?, "pyapp", "team/python", "latest", "plugin", &token_now())?;
    let creds = td.path().join("index-creds");
    std::fs::write(&creds, format!("plugin:{}", token_now()))?;
    run(Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--plain-http", "--creds-file"])
        .arg(&creds)
        .arg(&reference))?;
    std::fs::remove_file(&creds)?;

    // The plugin and kubelet's config for it: answers cached 20 s (the registry keeps them 45).
    let bin = td.sub("provider-bin")?;
    let calls = td.path().join("plugin-calls");
    let plugin = bin.join("clip-test-provider");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\nread -r request\necho \"$request\" >> {}\n\
             printf '{{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\"kind\":\"CredentialProviderResponse\",\
             \"cacheKeyType\":\"Registry\",\"cacheDuration\":\"20s\",\"auth\":{{\"%s\":{{\"username\":\"plugin\",\"password\":\"tok-%s\"}}}}}}' \
             \"$REGISTRY\" \"$(date +%s)\"\n",
            calls.display()
        ),
    )?;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755))?;
    let provider_config = td.path().join("credential-providers.yaml");
    std::fs::write(
        &provider_config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n\
             - name: clip-test-provider\n  matchImages: [\"{0}\"]\n  defaultCacheDuration: 10m\n\
             \x20 apiVersion: credentialprovider.kubelet.k8s.io/v1\n  env:\n  - {{name: REGISTRY, value: \"{0}\"}}\n",
            reg.host()
        ),
    )?;

    // Prefetch off: the files read at the end are fetched then, with whatever token is current.
    let mut config = lazy_config(false);
    config.registry.credential_provider_config = Some(provider_config);
    config.registry.credential_provider_bin_dir = Some(bin);
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = Containerd::start(
        &td,
        &ContainerdOptions { clip_socket: Some(snap.socket().to_path_buf()), ..Default::default() },
    )?;
    // No credential given to the pull: it asks the plugin too (the snapshotter's config).
    let out = run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--json", "--plain-http", "-n", "t", "--config"])
        .arg(td.path().join("clip.toml"))
        .arg("--containerd-address")
        .arg(ctrd.socket())
        .arg(&reference))?;
    let pulled: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(pulled["lazy_layers"], 4, "{pulled}");
    let started = std::time::Instant::now();
    let wait = TOKEN_LIFETIME_S + 10;
    let script = format!(
        "python3 -c 'print(1)' >/dev/null; sleep {wait}; find /usr/share /usr/lib/python3* -type f -exec cat {{}} + | wc -c"
    );
    let out = ctrd.ctr_run("t", &["run", "--rm", "--snapshotter", "clip", &reference, "long1", "sh", "-c", &script])?;
    let read: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    let plugin_calls = std::fs::read_to_string(&calls)?.lines().count();
    eprintln!(
        "read {read} bytes of never-read files {:.0} s after the start ({wait} s asleep); the plugin was called {plugin_calls} times",
        started.elapsed().as_secs_f64()
    );
    assert!(read > 20 << 20, "the container could not read after its first token expired:\n{}", snap.log());
    assert!(plugin_calls >= 3, "the token was renewed through the plugin ({plugin_calls} calls)");
    let log = snap.log();
    assert!(log.contains("using credentials from a kubelet credential provider plugin"), "{log}");
    assert!(!log.contains("tok-"), "a token in the log");
    ctrd.purge()?;
    Ok(())
}
