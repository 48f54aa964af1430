//! Logging setup, and how errors are written into one log line.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::Log;

/// Installs the global subscriber: `RUST_LOG`, when set, overrides the configured level.
pub fn init(log: &Log) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<EnvFilter>().ok())
        .unwrap_or_else(|| configured_filter(log));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The filter from `[log] level`, from directives `config::validate` already parsed. As with
/// `EnvFilter::new`, no directive at all means errors only.
fn configured_filter(log: &Log) -> EnvFilter {
    if log.level.is_empty() {
        return EnvFilter::default().add_directive(LevelFilter::ERROR.into());
    }
    log.level
        .iter()
        .cloned()
        .fold(EnvFilter::default(), EnvFilter::add_directive)
}

/// `a: b: c` from an error and its sources, for one-line logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
