//! `clip-config`: the TOML configuration shared by `clip-snapshotter` and `clip-builder`.
//!
//! This crate owns three things and nothing else:
//! - the configuration file format of both programs, with defaults and validation
//!   ([`SnapshotterConfig`], [`BuilderConfig`], [`BuildRegistry`]);
//! - the names of the snapshot labels clip reads ([`labels`]), and the one check of the
//!   digests they and every other input carry ([`digest`]);
//! - the credential settings of the build registry ([`LongTermCredentials`]).
//!
//! Loading never panics: a missing file, bad TOML, an unknown key or an invalid value is a
//! [`ConfigError`] naming the file and the key.

pub mod digest;
pub mod labels;
mod model;

pub use model::{
    BuildRegistry, BuilderConfig, CriProxyConfig, LazyConfig, LogFormat, LongTermCredentials, RegistryHosts,
    SnapshotterConfig,
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

fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse_toml(&text, path)
}

fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

impl SnapshotterConfig {
    /// Loads and validates a snapshotter config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = load_toml(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parses and validates config text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = parse_toml(text, origin)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Loads `path` if given, else the default file if it exists, else the defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => Self::load(p),
            None if Path::new(DEFAULT_SNAPSHOTTER_CONFIG).exists() => Self::load(Path::new(DEFAULT_SNAPSHOTTER_CONFIG)),
            None => Ok(Self::default()),
        }
    }
    /// The config as the TOML text [`Self::parse`] reads back (programs and tests that write
    /// a config for a daemon).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse { path: "<serialized>".into(), message: e.to_string() })
    }
}

impl BuilderConfig {
    /// Loads and validates a builder config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = load_toml(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parses and validates config text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = parse_toml(text, origin)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Loads `path` if given, else the default file if it exists, else the defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => Self::load(p),
            None if Path::new(DEFAULT_BUILDER_CONFIG).exists() => Self::load(Path::new(DEFAULT_BUILDER_CONFIG)),
            None => Ok(Self::default()),
        }
    }
}
