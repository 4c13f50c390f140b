//! A pull secret's `.dockerconfigjson` (docker's `config.json`): the `auths` it names, by
//! registry. The secret is someone else's input: at most [`MAX_BYTES`] and [`MAX_REGISTRIES`]
//! entries are read, credential helpers (`credsStore`, `credHelpers`) are ignored — a secret must
//! never make the node run a program — and errors never quote a value.

use base64::Engine;
use clip_registry::credentials::Credential;
use clip_registry::reference::normalize_registry;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The most of a secret's config read (the API server's own limit on a Secret is 1 MiB).
pub const MAX_BYTES: usize = 1 << 20;
/// The most registries one secret may name.
pub const MAX_REGISTRIES: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DockerConfigError {
    #[error("larger than {MAX_BYTES} bytes")]
    TooLarge,
    #[error("names more than {MAX_REGISTRIES} registries")]
    TooMany,
    #[error("not a docker config.json (JSON with an `auths` object)")]
    Malformed,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The credentials `bytes` holds, by normalised registry (`host[:port]`). Entries without a
/// usable credential are skipped.
pub fn credentials(bytes: &[u8]) -> Result<Vec<(String, Credential)>, DockerConfigError> {
    if bytes.len() > MAX_BYTES {
        return Err(DockerConfigError::TooLarge);
    }
    let config: Config = serde_json::from_slice(bytes).map_err(|_| DockerConfigError::Malformed)?;
    if config.auths.len() > MAX_REGISTRIES {
        return Err(DockerConfigError::TooMany);
    }
    Ok(config.auths.into_iter().filter_map(|(server, auth)| Some((registry_of(&server)?, credential(auth)?))).collect())
}

/// `https://index.docker.io/v1/`, `host:port`, `https://host/path` → the registry's `host[:port]`.
fn registry_of(server: &str) -> Option<String> {
    let s = server.trim();
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let host = s.split('/').next().unwrap_or_default();
    (!host.is_empty()).then(|| normalize_registry(host))
}

fn credential(auth: AuthEntry) -> Option<Credential> {
    if let Some(token) = auth.identitytoken.filter(|t| !t.is_empty()) {
        return Some(Credential::identity_token(token));
    }
    if let (Some(u), Some(p)) = (&auth.username, &auth.password)
        && !u.is_empty()
        && !p.is_empty()
    {
        return Some(Credential::new(u.clone(), p.clone()));
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(auth.auth?.trim()).ok()?;
    let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    (!u.is_empty() && !p.is_empty()).then(|| Credential::new(u, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_docker_and_kubectl_write_are_read() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u1:p:1");
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"Registry.Example:5000":{{"username":"u2","password":"p2"}},
            "https://ghcr.io/v2/":{{"identitytoken":"tok"}},"empty.example":{{}}}},"credsStore":"evil"}}"#
        );
        let mut got: Vec<(String, String, String)> = credentials(json.as_bytes())
            .expect("valid")
            .into_iter()
            .map(|(r, c)| (r, c.username.clone(), c.password.expose().to_string()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("docker.io".into(), "u1".into(), "p:1".into()),
                ("ghcr.io".into(), "<token>".into(), "tok".into()),
                ("registry.example:5000".into(), "u2".into(), "p2".into()),
            ]
        );
    }

    #[test]
    fn hostile_configs_are_refused_without_quoting_them() {
        let big = vec![b' '; MAX_BYTES + 1];
        assert_eq!(credentials(&big).err(), Some(DockerConfigError::TooLarge));
        let many: Vec<String> = (0..=MAX_REGISTRIES).map(|i| format!("\"r{i}.example\":{{}}")).collect();
        let many = format!("{{\"auths\":{{{}}}}}", many.join(","));
        assert_eq!(credentials(many.as_bytes()).err(), Some(DockerConfigError::TooMany));
        for bad in [&b"Sentinel-Secret"[..], b"{\"auths\":[\"Sentinel-Secret\"]}", b"\xff\xfe"] {
            let err = credentials(bad).expect_err("malformed");
            assert!(!err.to_string().contains("Sentinel"), "{err}");
        }
        // Undecodable auth fields give nothing, never a panic.
        let none = credentials(br#"{"auths":{"r.example":{"auth":"%%%"},"s.example":{"auth":"bm9jb2xvbg=="}}}"#);
        assert_eq!(none.expect("valid").len(), 0);
    }
}
