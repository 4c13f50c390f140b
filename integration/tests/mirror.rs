//! A fleet behind a pull-through cache (the Distribution registry with `proxy.remoteurl`, a
//! `hosts.toml` mirror): what the origin registry serves while three cold nodes start the
//! python image lazily through it, one after the other, with the daemon's defaults.

use anyhow::Result;
use clip_config::SnapshotterConfig;
use clip_integration::bed::{IndexedImage, containerd_for};
use clip_integration::containerd::Flavor;
use clip_integration::images::TestImage;
use clip_integration::registry::Registry;
use clip_integration::snapshotter::{ClipSnapshotter, workspace_binary};
use clip_integration::{TestDir, require_root, run};
use std::process::Command;

#[test]
fn a_fleet_behind_a_pull_through_mirror_costs_the_origin_about_one_image() -> Result<()> {
    require_root();
    let td = TestDir::new("mirror")?;
    let image = IndexedImage::plain(&td, TestImage::Python, "testbed/python")?;
    let mirror = Registry::start_pull_through(&td, "mirror", &image.registry)?;
    let hosts = td.sub("certs.d")?;
    image.registry.write_hosts_toml_with_mirror(&hosts, &mirror)?;
    let before = image.registry.blob_bytes_served();
    let mut per_node = Vec::new();
    for n in 0..3 {
        let node = TestDir::new(&format!("mirror-node{n}"))?;
        let mut config = SnapshotterConfig::default();
        config.registry.hosts_dir = Some(hosts.clone());
        let snap = ClipSnapshotter::start_configured(&node, "clip", &config, &[])?;
        let ctrd = containerd_for(&node, &snap, Flavor::V2)?;
        let origin0 = image.registry.blob_bytes_served();
        let mirror0 = mirror.blob_bytes_served();
        run(Command::new(workspace_binary("clip-snapshotter")?)
            .args(["pull", "-n", "t", "--hosts-dir"])
            .arg(&hosts)
            .arg("--containerd-address")
            .arg(ctrd.socket())
            .arg(&image.reference))?;
        let out = ctrd.ctr_run(
            "t",
            &[
                "run",
                "--rm",
                "--snapshotter",
                "clip",
                &image.reference,
                "m1",
                "python3",
                "-c",
                "import numpy; print('ok')",
            ],
        )?;
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok"), "{}", snap.log());
        // Background completion included (its default start delay is 5 s).
        std::thread::sleep(std::time::Duration::from_secs(8));
        let (origin, served) = (image.registry.blob_bytes_served() - origin0, mirror.blob_bytes_served() - mirror0);
        eprintln!("node {n}: the origin served {origin} bytes, the mirror {served}");
        per_node.push(origin);
        ctrd.purge()?;
    }
    let origin = image.registry.blob_bytes_served() - before;
    let ratio = origin as f64 / image.layer_bytes as f64;
    eprintln!(
        "three nodes through the mirror: the origin served {origin} bytes, {ratio:.2}x the image's {} (per node {per_node:?})",
        image.layer_bytes
    );
    // Before ranges of a blob the mirror was pulling through went to the origin, the first
    // node's parallel range requests made the mirror fetch every blob two or three times
    // (measured 2.60x here; 1.58x since). What is left above 1.0x: Distribution's proxy
    // fetches a blob it does not have twice when one client asks (once to store, once for
    // the client), so the small blobs read whole (indexes, windows) cost twice; each hang-up
    // on a blob still being pulled through costs what was in flight; and the first node's
    // own ranges go to the origin until the mirror has the blob.
    assert!(ratio < 1.8, "the origin served {ratio:.2}x the image");
    assert!(per_node[1] + per_node[2] < image.layer_bytes / 20, "later nodes reached the origin: {per_node:?}");
    Ok(())
}

/// A `hosts.toml` mirror that answers every request with 401 (Basic, and Bearer naming a token
/// realm on yet another host) must never receive the registry's password or be handed to that
/// realm, must be asked with `ns=` as containerd asks, and must be left alone once it refused,
/// while the image still starts lazily from the registry itself.
#[test]
fn mirrors_that_ask_for_credentials_never_receive_the_registrys_and_are_set_aside() -> Result<()> {
    use clip_integration::http_stub::{HttpStub, StubRequest, StubResponse};
    use std::sync::{Arc, Mutex};
    require_root();
    const PASSWORD: &str = "Sentinel-Mirror-Pass-3b9d";
    let td = TestDir::new("mirror-creds")?;
    let reg = Registry::start_tls_auth_with(&td, "private", "reader", PASSWORD)?;
    let hosts = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts)?;
    let creds = td.path().join("creds");
    std::fs::write(&creds, format!("reader:{PASSWORD}\n"))?;
    let reference =
        reg.push_layout(&TestImage::Busybox.layout()?, TestImage::Busybox.tag(), "team/busybox", "latest")?;
    run(Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--hosts-dir"])
        .arg(&hosts)
        .arg("--creds-file")
        .arg(&creds)
        .arg(&reference))?;
    let record = |seen: Arc<Mutex<Vec<StubRequest>>>, reply: StubResponse| {
        move |req: &StubRequest| {
            seen.lock().expect("lock").push(req.clone());
            reply.clone()
        }
    };
    let (realm_seen, basic_seen, bearer_seen) = (Arc::default(), Arc::default(), Arc::default());
    let realm = HttpStub::start(record(Arc::clone(&realm_seen), StubResponse::status(401)))?;
    let unauthorized = |challenge: String| StubResponse {
        status: 401,
        headers: vec![("WWW-Authenticate".into(), challenge)],
        body: Vec::new(),
        cut: None,
    };
    let basic = HttpStub::start(record(Arc::clone(&basic_seen), unauthorized("Basic realm=\"mirror\"".into())))?;
    let bearer_challenge = format!("Bearer realm=\"{}/token\",service=\"mirror\"", realm.url());
    let bearer = HttpStub::start(record(Arc::clone(&bearer_seen), unauthorized(bearer_challenge)))?;
    let ca = reg.tls().map(|t| t.ca_cert.display().to_string()).unwrap_or_default();
    std::fs::write(
        hosts.join(reg.host()).join("hosts.toml"),
        format!(
            "server = \"{url}\"\nca = \"{ca}\"\n[host.\"{basic}\"]\n  capabilities = [\"pull\", \"resolve\"]\n[host.\"{bearer}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            url = reg.base_url(),
            basic = basic.url(),
            bearer = bearer.url()
        ),
    )?;

    let mut config = clip_integration::bed::lazy_config(false);
    config.registry.hosts_dir = Some(hosts.clone());
    let snap = ClipSnapshotter::start_configured(&td, "clip", &config, &[])?;
    let ctrd = containerd_for(&td, &snap, Flavor::V2)?;
    let out = run(Command::new(workspace_binary("clip-snapshotter")?)
        .args(["pull", "--json", "-n", "t", "--hosts-dir"])
        .arg(&hosts)
        .arg("--creds-file")
        .arg(&creds)
        .arg("--containerd-address")
        .arg(ctrd.socket())
        .arg(&reference))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["lazy_layers"], 1, "{report}\n{}", snap.log());
    let seen = |s: &Arc<Mutex<Vec<StubRequest>>>| s.lock().map(|v| v.clone()).unwrap_or_default();
    let asked = || seen(&basic_seen).len() + seen(&bearer_seen).len();
    let after_pull = asked();
    // Reads of files no one read yet fetch spans: the mirrors, set aside, are not asked again.
    let ran = ctrd.ctr_run(
        "t",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "clip",
            &reference,
            "m1",
            "sh",
            "-c",
            "cat /bin/* /etc/* > /dev/null; echo ok",
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&ran.stdout).trim(), "ok", "{}", snap.log());
    let after_run = asked();

    let (to_basic, to_bearer, to_realm) = (seen(&basic_seen), seen(&bearer_seen), seen(&realm_seen));
    eprintln!(
        "mirror requests: {} to the Basic mirror, {} to the Bearer mirror, {} to its realm",
        to_basic.len(),
        to_bearer.len(),
        to_realm.len()
    );
    // Seen before: 485 of 1,751 requests to such a mirror carried the registry's password.
    let leaked: Vec<&StubRequest> = to_basic
        .iter()
        .chain(&to_bearer)
        .chain(&to_realm)
        .filter(|r| r.headers.contains_key("authorization"))
        .collect();
    assert!(leaked.is_empty(), "{} requests carried credentials, e.g. to {}", leaked.len(), leaked[0].target);
    for r in to_basic.iter().chain(&to_bearer) {
        assert!(r.query().iter().any(|(k, v)| k == "ns" && v == reg.host()), "no ns= in {}", r.target);
    }
    assert_eq!(after_run, after_pull, "a mirror that refused was asked again within its set-aside time");
    // Set aside after refusing: what the first requests of each session cost (each walks its
    // credential chain), not one or more per request made.
    assert!(to_basic.len() + to_bearer.len() < 100, "{} + {} mirror requests", to_basic.len(), to_bearer.len());
    assert!(!snap.log().contains(PASSWORD));
    ctrd.purge()?;
    Ok(())
}
