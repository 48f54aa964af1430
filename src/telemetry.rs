//! Logging setup (text or JSON lines on stderr), a request's spans, made only when a line
//! inside it needs them, and how errors are written into one log line.

pub mod fields;
mod json;

use std::ffi::OsString;
use std::io::IsTerminal;
use tracing::Span;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

/// Installs the global subscriber: `RUST_LOG`, when set, overrides the configured level.
pub fn init(log: &Log) {
    // An invalid RUST_LOG must not pass unnoticed: it is reported, and the config's level used.
    let mut rejected = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => match directives.parse::<EnvFilter>() {
            Ok(filter) => filter,
            Err(err) => {
                rejected = Some((directives, err));
                configured_filter(log)
            }
        },
        Err(_) => configured_filter(log),
    };
    let ansi = use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let lines = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => lines.with_ansi(ansi).try_init(),
        LogFormat::Json => lines
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(json::Json)
            .try_init(),
    };
    if let Some((directives, err)) = rejected {
        tracing::warn!(
            rust_log = %directives,
            error = %err,
            "RUST_LOG is not a valid filter; using [log] level from the config"
        );
    }
}

/// Colour is for a person at a terminal: a file, journald or a pipe gets plain lines that
/// grep and log shippers can read. A non-empty `NO_COLOR` (no-color.org) turns it off anyway.
pub fn use_ansi(is_terminal: bool, no_color: Option<OsString>) -> bool {
    is_terminal && no_color.is_none_or(|value| value.is_empty())
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

/// How to make a request's spans (the connection's, and the request's as its child) for a line
/// inside the request written by code that does not know it (a failover, an ejection): made
/// for that line only. Every other line carries the connection's and the request's fields
/// itself, because spans are dear where a line is written for every request or kept for a
/// connection's life (measured, with the fmt subscriber at `info`):
/// - made and closed, about 6,700 instructions for the request's alone (its four fields
///   formatted, a registry slot), a fifth of a whole proxied request; entered around each
///   poll (`Instrument`), 800 more per poll, and a copy of the request's future;
/// - kept by an idle keep-alive connection, 2.2 KiB of RSS each (4.4 to 6.6), and 1.6 KiB
///   even when dropped as the connection parks: the registry keeps every slot a burst of
///   connections used, with its extensions' map, and those small allocations pin the pages of
///   the connections' freed buffers;
/// - kept by an idle WebSocket, 3.1 KiB each (2.5 to 5.6).
///
/// Where no subscriber wants them, `make` returns `Span::none()` at the cost of a level check.
#[derive(Clone, Copy)]
pub struct RequestSpan<'a>(&'a (dyn Fn() -> Span + Sync));

impl<'a> RequestSpan<'a> {
    pub fn new(make: &'a (dyn Fn() -> Span + Sync)) -> RequestSpan<'a> {
        RequestSpan(make)
    }

    /// The span to name as a line's `parent:`; keep it until the line is written.
    pub fn make(&self) -> Span {
        (self.0)()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let cases = [
            (true, None, true),
            (true, Some(""), true),
            (true, Some("1"), false),
            (true, Some("0"), false),
            (false, None, false),
            (false, Some(""), false),
            (false, Some("1"), false),
        ];
        for (is_terminal, no_color, want) in cases {
            assert_eq!(
                use_ansi(is_terminal, no_color.map(OsString::from)),
                want,
                "terminal {is_terminal}, NO_COLOR {no_color:?}"
            );
        }
    }
}
