//! Label and config parsing on arbitrary input: snapshot labels (`key=value` lines) through the
//! split and the lazy-serving request, and the text as a snapshotter and a builder config.
//! Errors are fine; panics, and secrets in errors, are not.
#![no_main]

use clip_config::ConfigFile as _;
use clip_config::labels::{self, RemoteRequest};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = clip_config::SnapshotterConfig::parse(&text, Path::new("fuzz.toml"));
    let _ = clip_config::BuilderConfig::parse(&text, Path::new("fuzz.toml"));

    let mut map = HashMap::new();
    for line in text.lines() {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        // Short names stand for the labels clip reads, so the fuzzer reaches them.
        let key = match k {
            "T" => labels::TARGET_SNAPSHOT_REF,
            "I" => labels::CRI_IMAGE_REF,
            "L" => labels::CRI_LAYER_DIGEST,
            "M" => labels::CRI_MANIFEST_DIGEST,
            "X" => labels::INDEX_DIGEST,
            "B" => labels::BUILD_REGISTRY_CREDS,
            other => other,
        };
        map.insert(key.to_string(), v.to_string());
    }
    // Errors name keys and use fixed words: a secret value found there proves nothing.
    let innocent = format!(
        "label key must not be empty label key and value greater than maximum size (4096 bytes), key: {}",
        map.keys().cloned().collect::<Vec<_>>().join(" ")
    );
    let secret_values: Vec<String> = map
        .iter()
        .filter(|(k, v)| labels::is_secret(k) && v.len() >= 8 && !innocent.contains(v.as_str()))
        .map(|(_, v)| v.clone())
        .collect();
    match labels::split(map) {
        Err(e) => {
            for s in &secret_values {
                assert!(!e.to_string().contains(s.as_str()), "a secret in an error");
            }
        }
        Ok(split) => {
            assert!(split.stored.keys().all(|k| !labels::is_secret(k)));
            if let Ok(Some(req)) = RemoteRequest::from_labels(&split) {
                assert!(clip_config::digest::is_digest(&req.layer_digest));
                assert!(!req.layer_digest.contains('/'));
            }
        }
    }
});
