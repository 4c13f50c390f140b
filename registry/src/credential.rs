//! One credential, `username:password` for a registry, whose password never prints.

use crate::error::{RegistryError, Result};
use crate::secret::Secret;
use crate::source::Source;

/// The user name docker's clients give an identity token (`<token>`).
pub const IDENTITY_TOKEN_USER: &str = "<token>";

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

    /// An identity token (docker `config.json`'s `identitytoken`, what `docker login` keeps for
    /// OAuth registries): exchanged at a Bearer realm for access tokens (`grant_type=
    /// refresh_token`), never sent as a password.
    pub fn identity_token(token: impl Into<String>) -> Self {
        Self::new(IDENTITY_TOKEN_USER, token)
    }

    /// Whether this is an [`Self::identity_token`].
    pub fn is_identity_token(&self) -> bool {
        self.username == IDENTITY_TOKEN_USER
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

    /// Reads `username:password` from a file, or from standard input when `path` is `-` (as
    /// `docker login --password-stdin` does): never from a command line, where every user of the
    /// host reads it in `/proc/<pid>/cmdline`. At most 64 KiB; trailing line ends are dropped.
    pub fn read_file(path: &std::path::Path, source: Source) -> Result<Self> {
        use std::io::Read;
        let fail = |message: String| RegistryError::Credentials { source_name: source.name(), message };
        let mut text = String::new();
        let reader: Box<dyn Read> = if path.as_os_str() == "-" {
            Box::new(std::io::stdin())
        } else {
            Box::new(std::fs::File::open(path).map_err(|e| fail(format!("reading {}: {e}", path.display())))?)
        };
        reader
            .take(64 * 1024 + 1)
            .read_to_string(&mut text)
            .map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
        if text.len() > 64 * 1024 {
            return Err(fail(format!("{} holds more than 64 KiB", path.display())));
        }
        Self::parse(text.trim_end_matches(['\n', '\r']), source)
    }

    /// `Basic base64(user:pass)`.
    pub fn basic_header(&self) -> String {
        use base64::Engine;
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}
