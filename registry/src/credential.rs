//! One credential, `username:password` for a registry, whose password never prints.

use crate::error::{RegistryError, Result};
use crate::secret::Secret;
use crate::source::Source;

/// `username:password` for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential {{ username: {:?}, password: <redacted> }}", self.username)
    }
}

impl Credential {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self { username: username.into(), password: Secret::new(password) }
    }

    /// Parses `username:password` (split at the first `:`; the password may contain more).
    /// The error never repeats the input.
    pub fn parse(s: &str, source: Source) -> Result<Self> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() && !p.is_empty() => Ok(Self::new(u, p)),
            _ => Err(RegistryError::Credentials {
                source_name: source.name(),
                message: "expected username:password".into(),
            }),
        }
    }

    /// `Basic base64(user:pass)`.
    pub fn basic_header(&self) -> String {
        use base64::Engine;
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}
