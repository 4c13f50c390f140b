//! Image references: parsing and normalisation (`docker.io` aliases, `library/`, ports,
//! tags and digests).

use crate::error::{RegistryError, Result};

/// The canonical name of Docker Hub; `index.docker.io` and `registry-1.docker.io` map to it.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed image reference, e.g. `127.0.0.1:5000/team/app:v1@sha256:...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Normalised `host[:port]`, lower case; Docker Hub is always `docker.io`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

/// Normalises a registry host: lower case, Docker Hub aliases folded into `docker.io`, a
/// scheme or trailing slash removed.
pub fn normalize_registry(host: &str) -> String {
    let h = host
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
        _ => h,
    }
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self> {
        let bad =
            |reason: &str| RegistryError::InvalidReference { reference: input.to_string(), reason: reason.to_string() };
        if input.is_empty() || input.len() > 4096 {
            return Err(bad("empty or longer than 4096 bytes"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(d.to_string())),
            None => (input, None),
        };
        if let Some(d) = &digest {
            clip_config::digest::validate(d).map_err(|e| bad(&e.to_string()))?;
        }
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (&name_tag[..last_slash + i], Some(name_tag[last_slash + i + 1..].to_string())),
            None => (name_tag, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (normalize_registry(first), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if !valid_registry(&registry) {
            return Err(bad("registry must be host[:port]"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
            });
        if !repo_ok {
            return Err(bad("repository must be lower-case [a-z0-9._-] components"));
        }
        Ok(Self { registry, repository, tag, digest })
    }

    /// What the manifest endpoint is asked for: the digest if any, else the tag, else `latest`.
    pub fn manifest_reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// The host requests go to by default (`docker.io` is served by `registry-1.docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { "registry-1.docker.io" } else { &self.registry }
    }

    /// The same repository at `digest`.
    pub fn with_digest(&self, digest: &str) -> Self {
        Self { digest: Some(digest.to_string()), ..self.clone() }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok =
        !host.is_empty() && host.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.chars().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_forms_normalise_to_one_registry() {
        for s in [
            "busybox",
            "docker.io/busybox",
            "index.docker.io/library/busybox",
            "registry-1.docker.io/library/busybox:latest",
        ] {
            let r = Reference::parse(s).expect(s);
            assert_eq!((r.registry.as_str(), r.repository.as_str()), ("docker.io", "library/busybox"), "{s}");
        }
        let r = Reference::parse("someuser/app").expect("user repo");
        assert_eq!(r.repository, "someuser/app");
        assert_eq!(r.api_host(), "registry-1.docker.io");
    }

    #[test]
    fn ports_tags_digests() {
        let r = Reference::parse(&format!("127.0.0.1:5000/team/app:v1.2@{D}")).expect("full");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(r.manifest_reference(), D);
        let r = Reference::parse("localhost:5000/app").expect("port, no tag");
        assert_eq!((r.registry.as_str(), r.tag.as_deref()), ("localhost:5000", None));
        assert_eq!(r.manifest_reference(), "latest");
        let r = Reference::parse("Registry.Example.COM/app").expect("host case");
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.to_string(), "registry.example.com/app");
    }

    #[test]
    fn rejects_malformed() {
        for s in ["", "UPPER/app", "reg.io/app:", "reg.io/app@sha256:xyz", "reg.io//app", "a:b:c/d", "reg.io/app:-x"] {
            assert!(Reference::parse(s).is_err(), "{s:?} should be rejected");
        }
    }
}
