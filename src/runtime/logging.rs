//! Structured logs for every binary: text or JSON lines on stderr, `RUST_LOG` to filter,
//! colours only when stderr is a terminal (log files and pipes get no escape codes).
use clap::ValueEnum;
use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt};

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (event fields at the top level), for log pipelines.
    Json,
}

/// Install the global tracing subscriber. `RUST_LOG` overrides the default `info` filter.
/// Calling it twice is harmless (the second call is ignored, as when a test harness or an
/// embedding binary installed one first).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
