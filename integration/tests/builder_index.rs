//! `clip-builder index REF`: index an image in a registry and publish its index artifact, which
//! is then found through the referrers fallback and holds a valid index per layer.

use anyhow::{Context, Result};
use clip_integration::images::{TestImage, layout_layers};
use clip_integration::registry::Registry;
use clip_integration::snapshotter::workspace_binary;
use clip_integration::{TestDir, require_root, run};
use clip_registry::{CredentialChain, HostsConfig, Reference, RegistryClient};
use std::process::Command;

#[test]
fn index_ref_publishes_an_artifact_found_through_referrers() -> Result<()> {
    require_root();
    let td = TestDir::new("builder-index")?;
    let reg = Registry::start_tls_auth(&td, "tls")?;
    let tls = reg.tls().context("tls")?.clone();
    let layout = TestImage::Python.layout()?;
    let reference = reg.push_layout(&layout, "pyapp", "testbed/python", "latest")?;
    let hosts_dir = td.sub("certs.d")?;
    reg.write_hosts_toml(&hosts_dir)?;
    let creds = td.path().join("creds");
    std::fs::write(&creds, format!("{}:{}\n", tls.username, tls.password))?;

    let out = run(Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--json", "--hosts-dir"])
        .arg(&hosts_dir)
        .arg("--creds-file")
        .arg(&creds)
        .arg(&reference))?;
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let layers = layout_layers(&layout, "pyapp")?;
    assert_eq!(result["layers"].as_array().map(Vec::len), Some(layers.len()));
    let index_digest = result["index_digest"].as_str().context("index_digest")?.to_string();
    let manifest_digest = result["manifest_digest"].as_str().context("manifest_digest")?.to_string();
    let total_layers: u64 = layers.iter().map(|(_, _, s)| s).sum();
    let total_index: u64 =
        result["layers"].as_array().context("layers")?.iter().filter_map(|l| l["index_size"].as_u64()).sum();
    eprintln!(
        "indexed {} layers ({total_layers} bytes) in {:.2} s; indexes {total_index} bytes ({:.2}%)",
        layers.len(),
        result["seconds"].as_f64().unwrap_or_default(),
        total_index as f64 * 100.0 / total_layers as f64
    );
    assert!(total_index * 50 < total_layers, "indexes should be under 2% of the layers");

    // Wrong credentials: a clear failure naming the registry.
    std::fs::write(&creds, format!("{}:wrong\n", tls.username))?;
    let bad = Command::new(workspace_binary("clip-builder")?)
        .args(["index", "--hosts-dir"])
        .arg(&hosts_dir)
        .arg("--creds-file")
        .arg(&creds)
        .arg(&reference)
        .output()?;
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains(reg.host()) && stderr.contains("access denied"), "{stderr}");

    // Discovery as the snapshotter does it: referrers of the manifest, then each layer's index.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = RegistryClient::new(HostsConfig { dir: Some(hosts_dir.clone()), plain_http: false });
        let image = Reference::parse(&reference)?;
        let chain = CredentialChain::for_image(
            &image,
            &clip_registry::ChainInputs {
                image_creds: Some(clip_registry::Credential::new(&tls.username, &tls.password)),
                ..Default::default()
            },
        );
        let repo = client.repository(&image, chain)?;
        let found = repo.referrers(&manifest_digest, Some(clip_index::artifact::ARTIFACT_TYPE)).await?;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].digest().to_string(), index_digest);
        let artifact = repo.get_manifest(&index_digest).await?;
        let artifact: serde_json::Value = serde_json::from_slice(&artifact.bytes)?;
        assert_eq!(artifact["subject"]["digest"], manifest_digest.as_str());
        let index_layers: Vec<&serde_json::Value> = artifact["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .filter(|l| l["mediaType"] == clip_index::artifact::LAYER_INDEX_MEDIA_TYPE)
            .collect();
        assert_eq!(index_layers.len(), layers.len());
        for (layer, desc) in layers.iter().zip(index_layers) {
            assert_eq!(desc["annotations"][clip_index::artifact::LAYER_DIGEST_ANNOTATION], layer.0.as_str());
            let blob = repo.get_blob(desc["digest"].as_str().context("digest")?, 64 << 20).await?;
            let index = clip_index::Index::open_any(blob.to_vec())?;
            index.validate()?;
            assert_eq!(index.layer_digest(), layer.0);
            assert_eq!(index.compressed_size(), layer.2);
        }
        anyhow::Ok(())
    })
}
