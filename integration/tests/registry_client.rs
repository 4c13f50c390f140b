//! clip-registry against the test bed's real registries (plain; TLS + basic; Docker token
//! auth with short-lived tokens; a fault-injecting proxy) and against local stand-ins that
//! speak the real wire protocols of AWS ECR and GCP OAuth.

use anyhow::{Context, Result};
use bytes::Bytes;
use clip_config::LongTermCredentials;
use clip_integration::fault_proxy::{Fault, FaultProxy};
use clip_integration::http_stub::{HttpStub, StubResponse};
use clip_integration::images::{TestImage, blob_path, layout_layers, layout_manifest};
use clip_integration::registry::{Registry, Tls};
use clip_integration::snapshotter::workspace_binary;
use clip_integration::token_service::TokenService;
use clip_integration::{TestDir, require_root};
use clip_registry::credentials::{BuildRegistryScope, ChainInputs, Credential, CredentialChain};
use clip_registry::{HostsConfig, Platform, Reference, RegistryClient, RegistryError, TokenMinter};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime")
}

/// Pushes an OCI layout's image with clip-registry itself (blob uploads + manifest PUT).
async fn push_with_client(
    repo: &clip_registry::Repository,
    layout: &Path,
    tag: &str,
    dest_tag: &str,
) -> Result<String> {
    let manifest = layout_manifest(layout, tag)?;
    let mut digests = vec![manifest["config"]["digest"].as_str().context("config")?.to_string()];
    for l in manifest["layers"].as_array().context("layers")? {
        digests.push(l["digest"].as_str().context("digest")?.to_string());
    }
    for d in digests {
        let bytes = std::fs::read(blob_path(layout, &d)?)?;
        assert_eq!(repo.push_blob(Bytes::from(bytes)).await?, d);
    }
    let bytes = serde_json::to_vec(&manifest)?;
    Ok(repo.put_manifest(dest_tag, clip_registry::api::OCI_MANIFEST, Bytes::from(bytes)).await?)
}

/// Reads `n` pseudo-random ranges of `blob` (a local copy) through `repo` and compares.
async fn check_ranges(repo: &clip_registry::Repository, digest: &str, blob: &[u8], n: usize, seed: u64) -> Result<()> {
    let mut x = seed | 1;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let start = x % blob.len() as u64;
        let len = 1 + (x >> 20) % 70_000;
        let end = (start + len).min(blob.len() as u64);
        let got = repo.get_blob_range(digest, start, end).await?;
        assert_eq!(&got[..], &blob[start as usize..end as usize], "range {start}..{end}");
    }
    Ok(())
}

#[test]
fn anonymous_pull_manifest_blob_and_exact_ranges_from_the_plain_registry() -> Result<()> {
    require_root();
    let td = TestDir::new("regplain")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    let (digest, _, size) = layout_layers(&layout, "busybox")?.remove(0);
    let blob = std::fs::read(blob_path(&layout, &digest)?)?;
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let image = Reference::parse(&format!("{}/testbed/busybox:latest", reg.host()))?;
        let repo = client.repository(&image, CredentialChain::anonymous())?;
        let (fetched, manifest) = repo.get_image_manifest("latest", &Platform::default()).await?;
        assert_eq!(manifest.layers()[0].digest().to_string(), digest);
        assert!(fetched.digest.starts_with("sha256:"));
        // By digest too, verified.
        repo.get_manifest(&fetched.digest).await?;
        let whole = repo.get_blob(&digest, 64 << 20).await?;
        assert_eq!(whole.len() as u64, size);
        assert_eq!(&whole[..], &blob[..]);
        check_ranges(&repo, &digest, &blob, 25, 7).await?;
        let e = repo.get_blob_range(&digest, size + 10, size + 20).await.expect_err("past the end");
        assert!(matches!(e, RegistryError::RangeNotSatisfiable { .. }), "{e}");
        let e = repo.get_manifest("nope").await.expect_err("missing tag");
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
        // Referrers: none yet; the registry (2.8) lacks the API, so the tag fallback is used.
        assert!(repo.referrers(&fetched.digest, None).await?.is_empty());
        anyhow::Ok(())
    })
}

/// A TLS registry with basic auth holding busybox as `testbed/busybox:latest`; its first
/// layer's digest and bytes.
fn tls_registry_with_busybox(td: &TestDir) -> Result<(Registry, Tls, String, Vec<u8>)> {
    let reg = Registry::start_tls_auth(td, "tls")?;
    let tls = reg.tls().context("tls")?.clone();
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    let (digest, _, _) = layout_layers(&layout, "busybox")?.remove(0);
    let blob = std::fs::read(blob_path(&layout, &digest)?)?;
    Ok((reg, tls, digest, blob))
}

#[test]
fn basic_auth_over_tls_with_the_test_ca_and_clear_errors_for_wrong_passwords() -> Result<()> {
    require_root();
    let td = TestDir::new("regtls")?;
    let (reg, tls, digest, blob) = tls_registry_with_busybox(&td)?;
    let hosts_dir = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts_dir)?;
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: Some(hosts_dir.clone()), plain_http: false });
        let image = Reference::parse(&format!("{}/testbed/busybox:latest", reg.host()))?;
        let good = Credential::new(&tls.username, &tls.password);
        let bad = Credential::new(&tls.username, "WRONG-SENTINEL-PW");

        let chain = |inputs: ChainInputs| CredentialChain::for_image(&image, &inputs);
        let repo =
            client.repository(&image, chain(ChainInputs { image_creds: Some(good.clone()), ..Default::default() }))?;
        repo.get_image_manifest("latest", &Platform::default()).await?;
        check_ranges(&repo, &digest, &blob, 5, 3).await?;

        // Wrong image creds, right build registry creds: the chain moves on and succeeds.
        let repo = client.repository(
            &image,
            chain(ChainInputs {
                image_creds: Some(bad.clone()),
                build_registry_creds: Some(good.clone()),
                build_registry: Some(BuildRegistryScope::new(reg.host(), "testbed")),
                ..Default::default()
            }),
        )?;
        repo.get_blob_range(&digest, 0, 100).await?;

        // Only wrong creds: a clear error naming the registry and the sources, not the password.
        let repo =
            client.repository(&image, chain(ChainInputs { image_creds: Some(bad.clone()), ..Default::default() }))?;
        let e = repo.get_manifest("latest").await.expect_err("wrong password");
        let msg = format!("{e} {e:?}");
        assert!(matches!(e, RegistryError::Unauthorized { .. }), "{msg}");
        assert!(msg.contains(reg.host()), "{msg}");
        assert!(msg.contains("clip.image-creds"), "{msg}");
        assert!(!msg.contains("WRONG-SENTINEL-PW"), "{msg}");
        eprintln!("wrong password error: {e}");

        // With another CA configured the TLS handshake fails (verification is on). (Without any
        // hosts.toml a loopback registry is reached unverified, as containerd reaches it.)
        let other_dir = td.sub("certs.d-other")?;
        let other_ca = other_ca(&td)?;
        write_hosts_with_ca(&other_dir, reg.host(), &other_ca)?;
        let wrong_ca = RegistryClient::new(HostsConfig { dir: Some(other_dir), plain_http: false });
        let repo = wrong_ca.repository(&image, chain(ChainInputs { image_creds: Some(good), ..Default::default() }))?;
        let e = repo.get_manifest("latest").await.expect_err("untrusted certificate");
        assert!(matches!(e, RegistryError::Transport { .. }), "{e}");
        anyhow::Ok(())
    })
}

/// A CA certificate that signed nothing here.
fn other_ca(td: &TestDir) -> Result<std::path::PathBuf> {
    let (key, crt) = (td.path().join("other-ca.key"), td.path().join("other-ca.crt"));
    clip_integration::run(
        std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&crt),
    )?;
    Ok(crt)
}

fn write_hosts_with_ca(dir: &Path, host: &str, ca: &Path) -> Result<()> {
    let d = dir.join(host);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("hosts.toml"), format!("server = \"https://{host}\"\nca = \"{}\"\n", ca.display()))?;
    Ok(())
}

#[test]
fn a_self_signed_certificate_from_dockers_recipe_is_trusted_as_containerd_trusts_it() -> Result<()> {
    require_root();
    let td = TestDir::new("regselfsigned")?;
    let reg = Registry::start_tls_auth_self_signed(&td, "selfsigned", "docs-user", "Docs-Pass-19")?;
    let cert = reg.tls().context("tls")?.ca_cert.clone();
    let ca_true = clip_integration::run_stdout(
        std::process::Command::new("openssl").args(["x509", "-noout", "-ext", "basicConstraints", "-in"]).arg(&cert),
    )?;
    assert!(ca_true.contains("CA:TRUE"), "the recipe's certificate is a CA: {ca_true}");
    let reference = reg.push_layout(&TestImage::Busybox.layout()?, "busybox", "team/busybox", "latest")?;
    let hosts = td.sub("certs.d")?;
    write_hosts_with_ca(&hosts, reg.host(), &cert)?;
    let creds = td.path().join("creds");
    std::fs::write(&creds, "docs-user:Docs-Pass-19\n")?;
    // The failing case of before: clip-builder's registry client refused it (CaUsedAsEndEntity).
    clip_integration::run(
        std::process::Command::new(workspace_binary("clip-builder")?)
            .args(["index", "--hosts-dir"])
            .arg(&hosts)
            .arg("--creds-file")
            .arg(&creds)
            .arg(&reference),
    )?;
    // Another certificate configured instead: refused.
    let other = td.sub("certs.d-other")?;
    write_hosts_with_ca(&other, reg.host(), &other_ca(&td)?)?;
    let out = std::process::Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--hosts-dir"])
        .arg(&other)
        .arg("--creds-file")
        .arg(&creds)
        .arg(&reference)
        .output()?;
    assert!(!out.status.success(), "indexed through an untrusted certificate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(reg.host()), "{err}");
    Ok(())
}

#[test]
fn bearer_tokens_from_a_token_service_are_renewed_across_expiries_during_range_reads() -> Result<()> {
    require_root();
    let td = TestDir::new("regtoken")?;
    let ttl_s = 3;
    let service = TokenService::start(&td, "builder", "token-pass", ttl_s)?;
    let reg = Registry::start_token_auth(&td, "token", &service)?;
    let layout = TestImage::Busybox.layout()?;
    let (digest, _, _) = layout_layers(&layout, "busybox")?.remove(0);
    let blob = std::fs::read(blob_path(&layout, &digest)?)?;
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let image = Reference::parse(&format!("{}/userimages/busybox:latest", reg.host()))?;
        let inputs = ChainInputs {
            build_registry_creds: Some(Credential::new("builder", "token-pass")),
            build_registry: Some(BuildRegistryScope::new(reg.host(), "userimages")),
            ..Default::default()
        };
        let pusher = client.repository(&image, CredentialChain::for_image(&image, &inputs))?.for_push();
        push_with_client(&pusher, &layout, "busybox", "latest").await?;

        let repo = client.repository(&image, CredentialChain::for_image(&image, &inputs))?;
        let start = Instant::now();
        let before = service.issued();
        let mut reads = 0;
        while start.elapsed() < Duration::from_secs(ttl_s * 4) {
            check_ranges(&repo, &digest, &blob, 1, reads + 11).await?;
            reads += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tokens = service.issued() - before;
        eprintln!("{reads} range reads over {:?} with {tokens} tokens of {ttl_s} s", start.elapsed());
        assert!(tokens >= 4, "tokens must have been renewed across expiries ({tokens})");
        // Anonymous access is refused by this registry: clear error.
        let anon = client.repository(&image, CredentialChain::anonymous())?;
        let e = anon.get_manifest("latest").await.expect_err("anonymous");
        assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");
        anyhow::Ok(())
    })
}

#[test]
fn injected_5xx_resets_and_truncated_bodies_are_survived() -> Result<()> {
    require_root();
    let td = TestDir::new("regfault")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    let (digest, _, _) = layout_layers(&layout, "busybox")?.remove(0);
    let blob = std::fs::read(blob_path(&layout, &digest)?)?;
    let proxy = FaultProxy::start(reg.host(), Fault::Cycle)?;
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let image = Reference::parse(&format!("{}/testbed/busybox:latest", proxy.host()))?;
        let repo = client.repository(&image, CredentialChain::anonymous())?;
        repo.get_image_manifest("latest", &Platform::default()).await?;
        check_ranges(&repo, &digest, &blob, 40, 5).await?;
        let whole = repo.get_blob(&digest, 64 << 20).await?;
        assert_eq!(&whole[..], &blob[..]);
        anyhow::Ok(())
    })?;
    eprintln!(
        "{} faults injected over {} connections, every read correct",
        proxy.faults_injected(),
        proxy.connections()
    );
    assert!(proxy.faults_injected() >= 30);
    // A byte flipped in transit is caught by digest verification of a whole blob.
    proxy.set_mode(Fault::FlipByte);
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let image = Reference::parse(&format!("{}/testbed/busybox:latest", proxy.host()))?;
        let repo = client.repository(&image, CredentialChain::anonymous())?;
        let e = repo.get_blob(&digest, 64 << 20).await.expect_err("corrupted");
        assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
        anyhow::Ok(())
    })
}

#[test]
fn hostile_answers_cost_a_bounded_read_endless_bodies_and_ignored_ranges() -> Result<()> {
    require_root();
    let td = TestDir::new("reghostile")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    let (digest, _, size) = layout_layers(&layout, "busybox")?.remove(0);
    let blob = std::fs::read(blob_path(&layout, &digest)?)?;
    let proxy = FaultProxy::start(reg.host(), Fault::IgnoreRange)?;
    let repo_of = |client: &Arc<RegistryClient>| -> Result<clip_registry::Repository> {
        let image = Reference::parse(&format!("{}/testbed/busybox:latest", proxy.host()))?;
        Ok(client.repository(&image, CredentialChain::anonymous())?)
    };
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let repo = repo_of(&client)?;
        // A registry that ignores Range: a near range is cut from the start of the blob...
        check_ranges(&repo, &digest, &blob, 10, 3).await?;
        // ...a far one is refused at once with a clear error (was: up to 512 MiB read per span).
        let far = clip_registry::api::MAX_RANGE_IGNORED_READ + 10;
        let e = repo.get_blob_range(&digest, far, far + 100).await.expect_err("far range");
        assert!(e.to_string().contains("ignores Range"), "{e}");
        anyhow::Ok(())
    })?;
    assert!(size < clip_registry::api::MAX_RANGE_IGNORED_READ);
    // Endless chunked bodies (no Content-Length to refuse up front): a manifest, a blob, and an
    // error answer each cost about their limit, never the stream.
    proxy.set_mode(Fault::EndlessBody(200));
    let started = Instant::now();
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let repo = repo_of(&client)?;
        let e = repo.get_manifest("latest").await.expect_err("endless manifest");
        assert!(e.to_string().contains("larger than"), "{e}");
        let e = repo.get_blob(&digest, 1 << 20).await.expect_err("endless blob");
        assert!(e.to_string().contains("larger than"), "{e}");
        anyhow::Ok(())
    })?;
    let sent = proxy.hostile_bytes();
    eprintln!("endless 200 bodies: {sent} bytes sent before clip hung up, in {:?}", started.elapsed());
    assert!(sent < 64 << 20, "{sent} bytes read of endless bodies");
    proxy.set_mode(Fault::EndlessBody(500));
    let connections = proxy.connections();
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let repo = repo_of(&client)?;
        let e = repo.get_manifest("latest").await.expect_err("endless error");
        assert!(matches!(e, RegistryError::Status { status: 500, .. }), "{e}");
        assert!(e.to_string().len() < 1000, "{e}");
        anyhow::Ok(())
    })?;
    // What the server counts includes what the sockets' buffers took (a few MiB on loopback).
    let (sent_500, answers) = (proxy.hostile_bytes() - sent, proxy.connections() - connections);
    eprintln!("endless 500 bodies: {sent_500} bytes sent over {answers} answers (retries)");
    assert!(sent_500 / answers.max(1) < 16 << 20, "{sent_500} bytes read of {answers} endless error bodies");
    Ok(())
}

#[test]
fn a_whole_layer_streams_for_as_long_as_it_keeps_coming_and_a_stall_fails_fast() -> Result<()> {
    require_root();
    let td = TestDir::new("regslow")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    let (digest, _, size) = layout_layers(&layout, "busybox")?.remove(0);
    let blob = std::fs::read(blob_path(&layout, &digest)?)?;
    // A link slow enough that the layer takes several times the client's request timeout.
    let pieces = size.div_ceil(64 << 10);
    let piece_ms = 3000 / pieces.max(1);
    let proxy = FaultProxy::start(reg.host(), Fault::Trickle(piece_ms))?;
    let timeouts = clip_registry::Timeouts { connect: Duration::from_secs(5), request: Duration::from_secs(1) };
    let client = RegistryClient::with_policy(
        HostsConfig { dir: None, plain_http: true },
        clip_registry::RetryPolicy::default(),
        timeouts,
    );
    let repo = client.repository(
        &Reference::parse(&format!("{}/testbed/busybox:latest", proxy.host()))?,
        CredentialChain::anonymous(),
    )?;
    rt().block_on(async {
        // Before: the whole-request timeout cut a multi-GB layer off after 60 s ("reading layer").
        let started = Instant::now();
        let resp = repo.blob_response(&digest).await?;
        let body = resp.bytes().await?;
        let took = started.elapsed();
        eprintln!("{} bytes in {took:?} with a 1 s request timeout", body.len());
        assert_eq!(body.as_ref(), blob.as_slice());
        assert!(took > Duration::from_secs(2), "the trickle was not slow: {took:?}");
        anyhow::Ok(())
    })?;
    // A registry that answers a head and then nothing: the read timeout ends it.
    proxy.set_mode(Fault::Stall);
    rt().block_on(async {
        let started = Instant::now();
        let resp = repo.blob_response(&digest).await;
        let failed = match resp {
            Ok(resp) => resp.bytes().await.is_err(),
            Err(_) => true,
        };
        assert!(failed, "a stalled body was read");
        assert!(started.elapsed() < Duration::from_secs(20), "a stall held the read for {:?}", started.elapsed());
        anyhow::Ok(())
    })?;
    Ok(())
}

/// A stand-in for ECR's JSON 1.1 API: checks the SigV4 credential scope and the target, and
/// answers `GetAuthorizationToken` with a token that expires after `ttl_s`.
fn fake_ecr(ttl_s: u64, calls: Arc<AtomicU64>, seen: Arc<Mutex<Vec<String>>>) -> Result<HttpStub> {
    HttpStub::start(move |req| {
        let target = req.headers.get("x-amz-target").cloned().unwrap_or_default();
        let auth = req.headers.get("authorization").cloned().unwrap_or_default();
        seen.lock().expect("lock").push(format!("{} {target} {auth}", req.method));
        if target != "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
            || !auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIATESTKEY/")
            || !auth.contains("/eu-west-1/ecr/aws4_request")
        {
            return StubResponse::json(
                400,
                &serde_json::json!({"__type": "UnrecognizedClientException", "message": "bad request"}),
            );
        }
        let n = calls.fetch_add(1, Ordering::SeqCst);
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:ecr-password-{n}"));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut r = StubResponse::json(
            200,
            &serde_json::json!({"authorizationData": [{"authorizationToken": token, "expiresAt": now + ttl_s as f64, "proxyEndpoint": "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com"}]}),
        );
        r.headers = vec![("Content-Type".into(), "application/x-amz-json-1.1".into())];
        r
    })
}

#[test]
fn ecr_tokens_are_minted_with_explicit_keys_and_refreshed_before_expiry() -> Result<()> {
    // No default chain, no metadata service: explicit keys and an endpoint override.
    unsafe_env_guard();
    let calls = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ecr = fake_ecr(3, calls.clone(), seen.clone())?;
    rt().block_on(async {
        let minter = TokenMinter::from_config(&LongTermCredentials::Ecr {
            region: "eu-west-1".into(),
            access_key_id: Some("AKIATESTKEY".into()),
            secret_access_key: Some("SECRET-SENTINEL-KEY".into()),
            use_default_chain: false,
            endpoint_url: Some(ecr.url()),
        })
        .await?;
        let t1 = minter.current(false).await?;
        assert_eq!(t1.credential.username, "AWS");
        assert_eq!(t1.credential.password.expose(), "ecr-password-0");
        let left = t1.expires_at.context("expiry")?.duration_since(std::time::SystemTime::now())?;
        assert!(left <= Duration::from_secs(3) && left >= Duration::from_secs(1), "{left:?}");
        // Cached while fresh...
        let t2 = minter.current(false).await?;
        assert_eq!(t2.credential.password.expose(), "ecr-password-0");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // ...re-minted once 80 % of the lifetime has passed, before it expires.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let t3 = minter.current(false).await?;
        assert_eq!(t3.credential.password.expose(), "ecr-password-1");
        assert!(t1.expires_at < t3.expires_at);
        anyhow::Ok(())
    })?;
    let seen = seen.lock().expect("lock");
    assert!(seen.iter().all(|s| !s.contains("SECRET-SENTINEL-KEY")), "the secret key is only used to sign");
    Ok(())
}

/// A stand-in for Google's OAuth token endpoint (JWT bearer grant, RFC 7523): checks the
/// assertion's claims and answers with an access token that expires after `ttl_s`.
fn fake_gcp(ttl_s: u64, calls: Arc<AtomicU64>) -> Result<HttpStub> {
    HttpStub::start(move |req| {
        let form = req.form();
        let get = |k: &str| form.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
        if req.method != "POST" || get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
            return StubResponse::json(400, &serde_json::json!({"error": "unsupported_grant_type"}));
        }
        let assertion = get("assertion");
        let claims = assertion.split('.').nth(1).and_then(|c| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()
        });
        let claims: serde_json::Value = claims.and_then(|c| serde_json::from_slice(&c).ok()).unwrap_or_default();
        if claims["iss"] != "clip-test@clip-test.iam.gserviceaccount.com"
            || !claims["scope"].as_str().unwrap_or("").contains("cloud-platform")
        {
            return StubResponse::json(400, &serde_json::json!({"error": "invalid_grant"}));
        }
        let n = calls.fetch_add(1, Ordering::SeqCst);
        StubResponse::json(
            200,
            &serde_json::json!({"access_token": format!("ya29.test-{n}"), "expires_in": ttl_s, "token_type": "Bearer"}),
        )
    })
}

fn write_service_account(dir: &Path, token_uri: &str) -> Result<std::path::PathBuf> {
    let key = dir.join("sa.key");
    clip_integration::run(
        std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&key),
    )?;
    let pem = std::fs::read_to_string(&key)?;
    let sa = serde_json::json!({
        "type": "service_account", "project_id": "clip-test", "private_key_id": "k1",
        "private_key": pem, "client_email": "clip-test@clip-test.iam.gserviceaccount.com",
        "client_id": "1", "auth_uri": "https://accounts.google.invalid/o/oauth2/auth",
        "token_uri": token_uri,
    });
    let path = dir.join("sa.json");
    std::fs::write(&path, sa.to_string())?;
    Ok(path)
}

#[test]
fn gcp_tokens_are_minted_from_a_service_account_key_and_refreshed() -> Result<()> {
    unsafe_env_guard();
    let dir = tempfile::tempdir()?;
    let calls = Arc::new(AtomicU64::new(0));
    let gcp = fake_gcp(3, calls.clone())?;
    let key_file = write_service_account(dir.path(), &format!("{}/token", gcp.url()))?;
    rt().block_on(async {
        let minter = TokenMinter::from_config(&LongTermCredentials::Gcp { service_account_key_file: key_file }).await?;
        let t1 = minter.current(false).await?;
        assert_eq!(t1.credential.username, "oauth2accesstoken");
        assert_eq!(t1.credential.password.expose(), "ya29.test-0");
        assert!(t1.expires_at.is_some());
        assert_eq!(minter.current(false).await?.credential.password.expose(), "ya29.test-0");
        tokio::time::sleep(Duration::from_millis(2600)).await;
        assert_eq!(minter.current(false).await?.credential.password.expose(), "ya29.test-1");
        anyhow::Ok(())
    })?;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    Ok(())
}

/// Tests never reach a cloud metadata service.
fn unsafe_env_guard() {
    assert_eq!(
        std::env::var("AWS_EC2_METADATA_DISABLED").as_deref(),
        Ok("true"),
        "run the suite with AWS_EC2_METADATA_DISABLED=true (integration/test-all.sh sets it)"
    );
}

#[test]
fn redirects_to_an_object_store_drop_authorization_and_are_cached_per_blob() -> Result<()> {
    // A stand-in registry that authenticates and redirects blob GETs to a stand-in object
    // store (as registries backed by S3 or GCS do), which must never see the credentials.
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = clip_registry::api::sha256_digest(&blob);
    let store_auth_seen = Arc::new(AtomicU64::new(0));
    let store_gets = Arc::new(AtomicU64::new(0));
    let store = {
        let (blob, seen, gets) = (blob.clone(), store_auth_seen.clone(), store_gets.clone());
        HttpStub::start(move |req| {
            gets.fetch_add(1, Ordering::SeqCst);
            if req.headers.contains_key("authorization") {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            let range = req.headers.get("range").and_then(|r| {
                let (s, e) = r.strip_prefix("bytes=")?.split_once('-')?;
                Some((s.parse::<usize>().ok()?, e.parse::<usize>().ok()?))
            });
            match range {
                Some((s, e)) => StubResponse {
                    status: 206,
                    headers: vec![("Content-Range".into(), format!("bytes {s}-{e}/{}", blob.len()))],
                    body: blob[s..=e].to_vec(),
                    cut: None,
                },
                None => StubResponse { status: 200, headers: vec![], body: blob.clone(), cut: None },
            }
        })?
    };
    let registry_blob_gets = Arc::new(AtomicU64::new(0));
    let registry = {
        let (store_url, gets, digest) = (store.url(), registry_blob_gets.clone(), digest.clone());
        HttpStub::start(move |req| {
            if req.headers.get("authorization").map(String::as_str) != Some("Basic dXNlcjpwYXNz") {
                let mut r = StubResponse::status(401);
                r.headers.push(("WWW-Authenticate".into(), "Basic realm=\"stub\"".into()));
                return r;
            }
            if req.path() == format!("/v2/team/app/blobs/{digest}") {
                gets.fetch_add(1, Ordering::SeqCst);
                let mut r = StubResponse::status(307);
                r.headers.push(("Location".into(), format!("{store_url}/bucket/{digest}?X-Amz-Signature=abc")));
                return r;
            }
            StubResponse::status(404)
        })?
    };
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let image = Reference::parse(&format!("127.0.0.1:{}/team/app:latest", registry.port()))?;
        let inputs = ChainInputs { image_creds: Some(Credential::new("user", "pass")), ..Default::default() };
        let repo = client.repository(&image, CredentialChain::for_image(&image, &inputs))?;
        check_ranges(&repo, &digest, &blob, 10, 9).await?;
        assert_eq!(&repo.get_blob(&digest, 1 << 20).await?[..], &blob[..]);
        anyhow::Ok(())
    })?;
    assert_eq!(store_auth_seen.load(Ordering::SeqCst), 0, "Authorization was forwarded to the object store");
    assert!(store_gets.load(Ordering::SeqCst) >= 11);
    assert_eq!(registry_blob_gets.load(Ordering::SeqCst), 1, "the redirect target is cached per blob");
    Ok(())
}

#[test]
fn publishing_an_artifact_with_a_subject_is_found_through_the_referrers_fallback() -> Result<()> {
    require_root();
    let td = TestDir::new("regreferrers")?;
    let reg = Registry::start_plain(&td, "plain")?;
    let layout = TestImage::Busybox.layout()?;
    reg.push_layout(&layout, "busybox", "testbed/busybox", "latest")?;
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
        let image = Reference::parse(&format!("{}/testbed/busybox:latest", reg.host()))?;
        let repo = client.repository(&image, CredentialChain::anonymous())?.for_push();
        let (subject, _) = repo.get_image_manifest("latest", &Platform::default()).await?;
        let payload = repo.push_blob(Bytes::from_static(b"an index")).await?;
        let empty = repo.push_blob(Bytes::from_static(b"{}")).await?;
        let artifact = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": clip_registry::api::OCI_MANIFEST,
            "artifactType": "application/vnd.clip.index.v1",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/vnd.clip.index.v1", "digest": payload, "size": 8}],
            "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.bytes.len()},
        });
        let bytes = serde_json::to_vec(&artifact)?;
        let size = bytes.len();
        let digest = repo
            .put_manifest(
                &clip_registry::api::sha256_digest(&bytes),
                clip_registry::api::OCI_MANIFEST,
                Bytes::from(bytes),
            )
            .await?;
        let desc: oci_descriptor::Descriptor = serde_json::from_value(serde_json::json!({
            "mediaType": clip_registry::api::OCI_MANIFEST, "digest": digest, "size": size,
            "artifactType": "application/vnd.clip.index.v1"
        }))?;
        repo.add_referrer_to_fallback_tag(&subject.digest, desc.clone()).await?;
        repo.add_referrer_to_fallback_tag(&subject.digest, desc).await?; // idempotent
        let found = repo.referrers(&subject.digest, Some("application/vnd.clip.index.v1")).await?;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].digest().to_string(), digest);
        assert!(repo.referrers(&subject.digest, Some("application/other")).await?.is_empty());
        anyhow::Ok(())
    })
}

mod oci_descriptor {
    pub use oci_spec::image::Descriptor;
}

#[test]
fn a_streamed_blob_must_be_exactly_its_descriptors_size_and_digest() -> Result<()> {
    let content: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let digest = clip_registry::api::sha256_digest(&content);
    let size = content.len() as u64;
    let served = content.clone();
    // Each repository of the stand-in answers the blob its own way.
    let stub = HttpStub::start(move |req| {
        let mut body = served.clone();
        match req.path().split('/').nth(2).unwrap_or_default() {
            "long" => body.push(0),
            "short" => {
                body.pop();
            }
            "flipped" => body[1 << 20] ^= 0xff,
            _ => {}
        }
        StubResponse { status: 200, headers: Vec::new(), body, cut: None }
    })?;
    let endless = FaultProxy::start(&format!("127.0.0.1:{}", stub.port()), Fault::EndlessBody(200))?;
    let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
    let collect = |host: String, repo: &'static str| {
        let client = client.clone();
        let digest = digest.clone();
        async move {
            use futures::StreamExt;
            let repo = client
                .repository(&Reference::parse(&format!("{host}/{repo}:latest"))?, CredentialChain::anonymous())?;
            let mut stream = std::pin::pin!(repo.blob_stream(&digest, size, Duration::from_secs(10)).await?);
            let mut got = Vec::new();
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk?);
            }
            anyhow::Ok(got)
        }
    };
    let host = format!("127.0.0.1:{}", stub.port());
    rt().block_on(async {
        assert_eq!(collect(host.clone(), "ok").await?, content);
        for (repo, says) in [
            ("long", format!("more than the {size} bytes its descriptor says")),
            ("short", format!("{} bytes, its descriptor says {size}", size - 1)),
            ("flipped", "digest".to_string()),
        ] {
            let e = collect(host.clone(), repo).await.expect_err(repo);
            assert!(e.to_string().contains(&says), "{repo}: {e:#}");
        }
        // An endless body: refused at the first byte past the size, having read about that much.
        let e = collect(endless.host(), "ok").await.expect_err("endless");
        assert!(e.to_string().contains("more than"), "{e:#}");
        anyhow::Ok(())
    })?;
    let sent = endless.hostile_bytes();
    assert!(sent < size + (16 << 20), "{sent} bytes of an endless body were read for a {size}-byte blob");
    Ok(())
}

/// A blob download that breaks off — the connection cut, or silent — goes on from the byte it
/// reached with a ranged request, and the bytes it yields are the blob's; a registry that
/// keeps breaking, or that answers the resumption with the wrong range or the wrong bytes,
/// ends the download with a clear error after a bounded number of requests.
#[test]
fn a_broken_off_blob_download_resumes_where_it_stopped() -> Result<()> {
    use clip_integration::http_stub::Cut;
    let content: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let digest = clip_registry::api::sha256_digest(&content);
    let size = content.len();
    let first_cut = (1 << 20) + 123;
    let requests: Arc<Mutex<Vec<(String, Option<String>)>>> = Arc::default();
    let (served, seen) = (content.clone(), Arc::clone(&requests));
    let stub = HttpStub::start(move |req| {
        let repo = req.path().split('/').nth(2).unwrap_or_default().to_string();
        let range = req.headers.get("range").cloned();
        seen.lock().expect("lock").push((repo.clone(), range.clone()));
        let cut = |after: usize, hold_ms: u64| Some(Cut { after, hold: Duration::from_millis(hold_ms) });
        let start = range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.split_once('-')?.0.parse::<usize>().ok());
        let Some(start) = start else {
            // The first request: the head says all of it, the body breaks off.
            let cut = match repo.as_str() {
                "stall" => cut(first_cut, 4000),
                "always" => cut(64 << 10, 0),
                _ => cut(first_cut, 0),
            };
            return StubResponse { status: 200, headers: Vec::new(), body: served.clone(), cut };
        };
        let partial = |from: usize, body: Vec<u8>, cut| StubResponse {
            status: 206,
            headers: vec![("Content-Range".into(), format!("bytes {from}-{}/{size}", from + body.len() - 1))],
            body,
            cut,
        };
        match repo.as_str() {
            "ignores-range" => StubResponse { status: 200, headers: Vec::new(), body: served.clone(), cut: None },
            "always" => partial(start, served[start..].to_vec(), cut(64 << 10, 0)),
            "wrong-range" => partial(0, served.clone(), None),
            "wrong-bytes" => {
                let mut body = served[start..].to_vec();
                body[4096] ^= 0x5a;
                partial(start, body, None)
            }
            _ => partial(start, served[start..].to_vec(), None),
        }
    })?;
    let client = RegistryClient::new(HostsConfig { dir: None, plain_http: true });
    let host = format!("127.0.0.1:{}", stub.port());
    let collect = |repo: &'static str| {
        let (client, digest, host) = (client.clone(), digest.clone(), host.clone());
        async move {
            use futures::StreamExt;
            let repo = client
                .repository(&Reference::parse(&format!("{host}/{repo}:latest"))?, CredentialChain::anonymous())?;
            let mut stream = std::pin::pin!(repo.blob_stream(&digest, size as u64, Duration::from_secs(1)).await?);
            let mut got = Vec::new();
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk?);
            }
            anyhow::Ok(got)
        }
    };
    let asked = |repo: &str| -> Vec<Option<String>> {
        requests.lock().expect("lock").iter().filter(|(r, _)| r == repo).map(|(_, range)| range.clone()).collect()
    };
    rt().block_on(async {
        for repo in ["cut", "stall", "ignores-range"] {
            let started = Instant::now();
            let got = collect(repo).await.with_context(|| repo.to_string())?;
            assert!(got == content, "{repo}: {} bytes, not the blob's", got.len());
            // One resumption, from the byte the body broke off at (a stall: after the 1 s bound,
            // not the 4 s the registry stayed silent).
            assert_eq!(asked(repo), vec![None, Some(format!("bytes={first_cut}-{}", size - 1))], "{repo}");
            assert!(started.elapsed() < Duration::from_secs(4), "{repo} took {:?}", started.elapsed());
        }
        // Breaking off every 64 KiB: given up after BLOB_RESUMES resumptions, each from where
        // the last one stopped.
        let e = collect("always").await.expect_err("always");
        assert!(e.to_string().contains(&format!("after {} resumptions", clip_registry::BLOB_RESUMES)), "{e:#}");
        let ranges = asked("always");
        assert_eq!(ranges.len() as u32, clip_registry::BLOB_RESUMES + 1, "{ranges:?}");
        for (i, range) in ranges.iter().enumerate().skip(1) {
            assert_eq!(range.as_deref(), Some(format!("bytes={}-{}", i * (64 << 10), size - 1).as_str()));
        }
        // A resumption answered with another range, or with other bytes: refused.
        let e = collect("wrong-range").await.expect_err("wrong-range");
        assert!(format!("{e:#}").contains("Content-Range"), "{e:#}");
        let e = collect("wrong-bytes").await.expect_err("wrong-bytes");
        assert!(format!("{e:#}").contains("digest"), "{e:#}");
        anyhow::Ok(())
    })?;
    Ok(())
}

/// A mirror that refuses every request walks the credential chain on its own: concurrent
/// requests whose mirror walk is still going never move the registry's place in the chain.
/// (Seen in CI: the registry itself was asked with docker config.json, then anonymously —
/// never with the image's credentials — while another request's mirror walk was at those.)
#[test]
fn a_refusing_mirrors_credential_walk_never_moves_the_registrys() -> Result<()> {
    require_root();
    let td = TestDir::new("mirror-walk")?;
    let (reg, tls, digest, blob) = tls_registry_with_busybox(&td)?;
    // Replies after a few milliseconds, varying, so the requests' walks interleave.
    let replies = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&replies);
    let mirror = HttpStub::start(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(n * 7 % 23));
        StubResponse {
            status: 401,
            headers: vec![("WWW-Authenticate".into(), "Basic realm=\"mirror\"".into())],
            body: Vec::new(),
            cut: None,
        }
    })?;
    let hosts_dir = td.sub("certs.d")?;
    std::fs::create_dir_all(hosts_dir.join(reg.host()))?;
    std::fs::write(
        hosts_dir.join(reg.host()).join("hosts.toml"),
        format!(
            "server = \"{}\"\nca = \"{}\"\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.base_url(),
            tls.ca_cert.display(),
            mirror.url()
        ),
    )?;
    let docker_config = td.path().join("config.json");
    std::fs::write(&docker_config, "{\"auths\":{}}")?;
    rt().block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: Some(hosts_dir.clone()), plain_http: false });
        let image = Reference::parse(&format!("{}/testbed/busybox:latest", reg.host()))?;
        for round in 0..4 {
            let inputs = ChainInputs {
                image_creds: Some(Credential::new(&tls.username, &tls.password)),
                docker_config: true,
                docker_config_path: Some(docker_config.clone()),
                ..Default::default()
            };
            let repo = Arc::new(client.repository(&image, CredentialChain::for_image(&image, &inputs))?);
            let reads = (0..12u64).map(|i| {
                let (repo, digest) = (Arc::clone(&repo), digest.clone());
                tokio::spawn(async move { repo.get_blob_range(&digest, i * 10, i * 10 + 100).await })
            });
            for (i, read) in futures::future::join_all(reads).await.into_iter().enumerate() {
                let got = read?.with_context(|| format!("round {round}, read {i}"))?;
                let start = i * 10;
                assert_eq!(&got[..], &blob[start..start + 100], "round {round}, read {i}");
            }
        }
        anyhow::Ok(())
    })?;
    assert!(replies.load(Ordering::SeqCst) > 0, "the mirror was never asked");
    Ok(())
}
