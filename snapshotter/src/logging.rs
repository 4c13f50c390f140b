//! Logging set-up shared by the binaries: text or JSON lines on stderr, filtered by level.

use clip_config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is a level or a tracing filter directive;
/// `RUST_LOG`, when set, wins.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .map_err(|e| anyhow::anyhow!("invalid log level {level:?}: {e}"))?;
    use std::io::IsTerminal;
    // Colours only for a person at a terminal; log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))
}
