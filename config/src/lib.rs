//! `clip-config`: the TOML configuration shared by `clip-snapshotter` and `clip-builder`.
//!
//! This crate owns three things and nothing else:
//! - the configuration file format of both programs, with defaults and validation
//!   ([`SnapshotterConfig`], [`BuilderConfig`], [`BuildRegistry`]);
//! - the names of the snapshot labels clip reads ([`labels`]), and the one check of the
//!   digests they and every other input carry ([`digest`]), and the user-namespace mapping
//!   containerd gives a user-namespaced container's root file system ([`idmap`]);
//! - the credential settings of the build registry ([`LongTermCredentials`]).
//!
//! Loading never panics: a missing file, bad TOML, an unknown key or an invalid value is a
//! [`ConfigError`] naming the file and the key.

pub mod digest;
pub mod idmap;
pub mod labels;
mod model;

pub use model::{
    BuildRegistry, BuilderConfig, CompletionConfig, CriProxyConfig, KubernetesConfig, LazyConfig, LogFormat,
    LongTermCredentials, PrefetchConfig, ProfilesConfig, RegistryHosts, SnapshotterConfig, TrustConfig,
};

use std::path::{Path, PathBuf};

/// Default config file of the snapshotter.
pub const DEFAULT_SNAPSHOTTER_CONFIG: &str = "/etc/clip/snapshotter.toml";
/// Default config file of the builder.
pub const DEFAULT_BUILDER_CONFIG: &str = "/etc/clip/builder.toml";
/// Default state directory of the snapshotter.
pub const DEFAULT_ROOT: &str = "/var/lib/clip-snapshotter";
/// Default gRPC socket of the snapshotter.
pub const DEFAULT_ADDRESS: &str = "/run/clip-snapshotter/clip-snapshotter.sock";

/// Default API socket of containerd.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: `{key}`: {message}")]
    Invalid { path: PathBuf, key: &'static str, message: String },
}

/// A config file of one of clip's programs: read, parsed (unknown keys are errors naming the
/// key) and validated once, at load; the values are used as they are from then on.
pub trait ConfigFile: serde::de::DeserializeOwned + Default {
    /// Where the program looks when no file is named.
    const DEFAULT_PATH: &'static str;

    /// Checks the values (`origin` names the file in errors).
    fn validate(&self, origin: &Path) -> Result<(), ConfigError>;

    /// Loads and validates a config file.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text (`origin` names it in errors).
    fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_path_buf(), message: parse_error_text(&e, text) })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Loads `path` if given, else the default file if it exists, else the defaults.
    fn load_or_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => Self::load(p),
            None if Path::new(Self::DEFAULT_PATH).exists() => Self::load(Path::new(Self::DEFAULT_PATH)),
            None => Ok(Self::default()),
        }
    }
}

impl ConfigFile for SnapshotterConfig {
    const DEFAULT_PATH: &'static str = DEFAULT_SNAPSHOTTER_CONFIG;

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        self.check(origin)
    }
}

impl ConfigFile for BuilderConfig {
    const DEFAULT_PATH: &'static str = DEFAULT_BUILDER_CONFIG;

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        self.check(origin)
    }
}

impl SnapshotterConfig {
    /// The config as the TOML text [`ConfigFile::parse`] reads back (programs and tests that
    /// write a config for a daemon).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse { path: "<serialized>".into(), message: e.to_string() })
    }
}

/// A TOML error as "line L, column C: message", without the offending line and with quoted
/// values elided: the line may be `password = "…"` (toml's own text quotes it in full).
fn parse_error_text(e: &toml::de::Error, text: &str) -> String {
    let mut message = String::new();
    let mut quoted = false;
    for c in e.message().chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                message.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                message.push('"');
            }
            (_, true) => {}
            (c, false) => message.push(c),
        }
    }
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_error_never_echoes_a_value() {
        for text in [
            "[build_registry]\nregistry = \"r\"\n[build_registry.credentials]\npassword = \"SENTINEL-PW\nx",
            "root = 5\nlog_level = \"SENTINEL-PW\" \"x\"\n",
            "[registry]\nhosts_dir = [\"SENTINEL-PW\"]\n",
            "root = \"SENTINEL-PW\"x\n",
        ] {
            let e = SnapshotterConfig::parse(text, Path::new("/etc/clip/snapshotter.toml")).expect_err("invalid");
            let shown = e.to_string();
            assert!(!shown.contains("SENTINEL"), "{shown}");
            assert!(shown.contains("line "), "{shown}");
        }
    }
}
