//! Progress of long steps: bars on a terminal (indicatif), plain lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// Where progress goes.
#[derive(Debug)]
pub struct Progress {
    bars: Option<MultiProgress>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn new() -> Self {
        let bars =
            std::io::stderr().is_terminal().then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { bars }
    }

    /// Silent (tests, `--json` callers that parse stderr).
    pub fn hidden() -> Self {
        Self { bars: Some(MultiProgress::with_draw_target(ProgressDrawTarget::hidden())) }
    }

    /// A task of `total` bytes named `name`.
    pub fn task(&self, name: &str, total: u64) -> Task {
        match &self.bars {
            Some(m) => {
                let bar = m.add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template("{msg:<24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_message(name.to_string());
                Task { bar: Some(bar), name: name.to_string() }
            }
            None => {
                eprintln!("{name}: {total} bytes");
                Task { bar: None, name: name.to_string() }
            }
        }
    }
}

/// One task's progress.
#[derive(Debug)]
pub struct Task {
    bar: Option<ProgressBar>,
    name: String,
}

impl Task {
    pub fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    pub fn finish(&self, message: &str) {
        match &self.bar {
            Some(b) => b.finish_with_message(format!("{} {message}", self.name)),
            None => eprintln!("{}: {message}", self.name),
        }
    }
}
