//! Raw TOML -> domain types. Every problem is collected, not just the first, so that
//! `wsgate check` shows them all at once; each names its place as `file:line:col`.
//!
//! This module holds the entry point and the small top-level sections (workers, log,
//! timeouts, limits); each larger section has its own file.

mod helpers;
mod listeners;
mod routes;
mod upstreams;
mod websocket;

use std::num::NonZeroU32;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use tracing_subscriber::filter::{Directive, LevelFilter};

use super::raw;
use super::{
    Config, Diagnostic, Limits, Location, Log, LogFormat, PerClient, Rate, Reload, Timeouts,
};

/// hyper cannot read a request head into a buffer smaller than this.
const MIN_HEADER_BYTES: i64 = 8 * 1024;
const MAX_HEADER_BYTES: i64 = 1024 * 1024;
const MAX_WORKERS: i64 = 1024;
/// The largest connection, tunnel or rate count the config takes.
const MAX_COUNT: i64 = 1_000_000;

pub(super) fn validate(text: &str, file: &str) -> Result<Config, Vec<Diagnostic>> {
    let mut v = Validator {
        text,
        file,
        diagnostics: Vec::new(),
    };
    let raw: raw::Config = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            let span = err.span().unwrap_or(0..0);
            // toml's messages can span lines ("invalid table header\nexpected ..."); a
            // diagnostic is one line.
            let message: Vec<&str> = err
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            v.error(span, message.join(": "));
            return Err(v.diagnostics);
        }
    };
    let config = v.config(raw);
    if v.diagnostics.is_empty() {
        Ok(config)
    } else {
        // In file order, the way an editor walks them.
        v.diagnostics
            .sort_by_key(|d| (d.location.line, d.location.col));
        Err(v.diagnostics)
    }
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: String) {
        let location = self.locate(span.start);
        self.diagnostics.push(Diagnostic { location, message });
    }

    fn locate(&self, offset: usize) -> Location {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            file: self.file.to_owned(),
            line,
            col: before[line_start..].chars().count() + 1,
        }
    }

    fn config(&mut self, raw: raw::Config) -> Config {
        let workers = match raw.workers {
            None => 0,
            Some(w) if (0..=MAX_WORKERS).contains(w.get_ref()) => *w.get_ref() as usize,
            Some(w) => {
                self.error(
                    w.span(),
                    format!("workers must be between 0 (one per core) and {MAX_WORKERS}"),
                );
                0
            }
        };
        let upstreams = self.upstreams(raw.upstreams);
        let websocket = self.websocket(raw.websocket, &crate::config::WebSocket::default());
        // Routes start from these.
        let timeouts = self.timeouts(raw.timeouts);
        let limits = self.limits(raw.limits);
        let listeners = self.listeners(raw.listeners);
        Config {
            workers,
            log: self.log(raw.log),
            reload: self.reload(raw.reload),
            admin: raw.admin.and_then(|admin| self.admin(admin, &listeners)),
            listeners,
            routes: self.routes(raw.routes, &upstreams, &websocket, &timeouts, &limits),
            timeouts,
            limits,
            upstreams,
        }
    }

    fn log(&mut self, raw: raw::Log) -> Log {
        let level = match raw.level {
            None => vec![LevelFilter::INFO.into()],
            // Split the way `EnvFilter` splits, so the error is the one it would give.
            Some(level) => match level
                .get_ref()
                .split(',')
                .filter(|directive| !directive.is_empty())
                .map(str::parse::<Directive>)
                .collect()
            {
                Ok(directives) => directives,
                Err(err) => {
                    self.error(
                        level.span(),
                        format!(
                            "invalid log level {:?}: {err} (e.g. \"info\", \"wsgate=debug\")",
                            level.get_ref()
                        ),
                    );
                    Vec::new()
                }
            },
        };
        Log {
            level,
            access: raw.access.unwrap_or(true),
            format: self.choice(
                raw.format.as_ref(),
                "unknown log format",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
                LogFormat::Text,
            ),
        }
    }

    fn timeouts(&mut self, raw: raw::Timeouts) -> Timeouts {
        let default = Timeouts::default();
        Timeouts {
            connect: self.duration(raw.connect, default.connect),
            tls_handshake: self.duration(raw.tls_handshake, default.tls_handshake),
            request_header: self.duration(raw.request_header, default.request_header),
            upstream_response_header: self.duration(
                raw.upstream_response_header,
                default.upstream_response_header,
            ),
            upstream_keepalive: self.duration(raw.upstream_keepalive, default.upstream_keepalive),
            websocket_idle: self.duration(raw.websocket_idle, default.websocket_idle),
            websocket_half_closed: self
                .duration(raw.websocket_half_closed, default.websocket_half_closed),
            drain: self.duration(raw.drain, default.drain),
        }
    }

    fn reload(&mut self, raw: raw::Reload) -> Reload {
        let default = Reload::default();
        Reload {
            watch: raw.watch.unwrap_or(default.watch),
            watch_interval: self.duration(raw.watch_interval, default.watch_interval),
            close_spread: self.duration(raw.close_spread, default.close_spread),
        }
    }

    fn limits(&mut self, raw: raw::Limits) -> Limits {
        let mut limits = Limits::default();
        // RFC 9113 §6.9.1: windows are between 65,535 and 2^31-1.
        let window = 65_535..=i64::from(i32::MAX);
        limits.h2_max_concurrent_streams = self.bounded(
            raw.h2_max_concurrent_streams,
            1..=10_000,
            "h2_max_concurrent_streams",
            limits.h2_max_concurrent_streams,
        );
        limits.h2_stream_window = self.bounded(
            raw.h2_stream_window,
            window.clone(),
            "h2_stream_window",
            limits.h2_stream_window,
        );
        limits.h2_connection_window = self.bounded(
            raw.h2_connection_window,
            window,
            "h2_connection_window",
            limits.h2_connection_window,
        );
        if let Some(bytes) = raw.request_header_bytes {
            if (MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(bytes.get_ref()) {
                limits.request_header_bytes = *bytes.get_ref() as usize;
            } else {
                self.error(
                    bytes.span(),
                    format!("request_header_bytes must be between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES}"),
                );
            }
        }
        limits.per_client = self.per_client(raw.per_client);
        limits
    }

    fn per_client(&mut self, raw: raw::PerClient) -> PerClient {
        let default = PerClient::default();
        let handshakes = self.rate(
            raw.handshakes_per_second,
            raw.handshake_burst,
            ("handshakes_per_second", "handshake_burst"),
        );
        let requests = self.rate(
            raw.requests_per_second,
            raw.request_burst,
            ("requests_per_second", "request_burst"),
        );
        PerClient {
            handshakes,
            requests,
            max_tunnels: self.count(raw.max_tunnels, "max_tunnels"),
            max_tunnels_per_route: self.count(raw.max_tunnels_per_route, "max_tunnels_per_route"),
            tracked_clients: self.bounded(
                raw.tracked_clients,
                1024..=16_777_216,
                "tracked_clients",
                default.tracked_clients as u32,
            ) as usize,
        }
    }

    /// A token bucket from `<what>_per_second` and its burst (`keys`).
    fn rate(
        &mut self,
        per_second: Option<Spanned<f64>>,
        burst: Option<Spanned<i64>>,
        keys: (&str, &str),
    ) -> Option<Rate> {
        let (rate_key, burst_key) = keys;
        let depth = self.count(burst.clone(), burst_key);
        match per_second {
            None => {
                if let Some(burst) = &burst {
                    self.error(burst.span(), format!("{burst_key} needs {rate_key}"));
                }
                None
            }
            Some(rate) if *rate.get_ref() > 0.0 && *rate.get_ref() <= MAX_COUNT as f64 => {
                let per_second = *rate.get_ref();
                Some(Rate {
                    interval: Duration::from_secs_f64(1.0 / per_second),
                    // One second's worth by default, and at least one.
                    burst: NonZeroU32::new(depth.unwrap_or(per_second.ceil() as u32))
                        .unwrap_or(NonZeroU32::MIN),
                })
            }
            Some(rate) => {
                self.error(
                    rate.span(),
                    format!(
                        "{rate_key} must be a positive number up to {MAX_COUNT}, e.g. 5 or 0.5"
                    ),
                );
                None
            }
        }
    }
    fn bounded(
        &mut self,
        raw: Option<Spanned<i64>>,
        range: std::ops::RangeInclusive<i64>,
        what: &str,
        default: u32,
    ) -> u32 {
        match raw {
            None => default,
            Some(value) if range.contains(value.get_ref()) => *value.get_ref() as u32,
            Some(value) => {
                self.error(
                    value.span(),
                    format!(
                        "{what} must be between {} and {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn errors(text: &str) -> Vec<String> {
        match validate(text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(d) => d.iter().map(ToString::to_string).collect(),
        }
    }

    pub(super) const LISTENER: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:8080\"\n";

    #[test]
    fn unknown_key_is_located() {
        let text = format!("{LISTENER}colour = \"red\"\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("t.toml:4:1: unknown field `colour`"),
            "{errs:?}"
        );
    }

    #[test]
    fn every_error_is_collected() {
        let text = "[[listener]]\nname = \"a\"\nbind = \"nowhere\"\n[timeouts]\nconnect = \"5 seconds\"\n[[route]]\nname = \"r\"\npath = \"api\"\nupstream = \"x\"\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("t.toml:3:8: invalid bind address"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:5:11: invalid duration"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("t.toml:8:8: route \"r\": path \"api\" must start"),
            "{errs:?}"
        );
    }

    #[test]
    fn h2_limits_are_bounded() {
        let text = format!("{LISTENER}[limits]\nh2_max_concurrent_streams = 0\nh2_stream_window = 1024\nh2_connection_window = 8388608\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0]
                .starts_with("t.toml:5:29: h2_max_concurrent_streams must be between 1 and 10000"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:6:20: h2_stream_window must be between 65535"),
            "{errs:?}"
        );
    }

    #[test]
    fn log_format_is_text_json_or_a_located_error() {
        let format = |text: &str| validate(text, "t.toml").unwrap().log.format;
        assert_eq!(format(LISTENER), LogFormat::Text, "the default");
        let with = |value: &str| format!("[log]\nformat = {value}\n{LISTENER}");
        assert_eq!(format(&with("\"text\"")), LogFormat::Text);
        assert_eq!(format(&with("\"json\"")), LogFormat::Json);
        assert_eq!(
            errors(&with("\"JSON\"")),
            ["t.toml:2:10: unknown log format \"JSON\" (known: text, json)"]
        );
        assert!(
            errors(&with("1"))[0].starts_with("t.toml:2:10: invalid type: integer `1`"),
            "{:?}",
            errors(&with("1"))
        );
    }

    #[test]
    fn missing_listener_is_an_error() {
        assert_eq!(
            errors("workers = 1\n"),
            ["t.toml:1:1: no listener: add one, e.g. [[listener]] name = \"http\" bind = \"127.0.0.1:8080\""]
        );
    }

    #[test]
    fn per_client_limits() {
        let text = format!("{LISTENER}[limits.per_client]\nhandshakes_per_second = 5\nmax_tunnels = 20\nmax_tunnels_per_route = 8\ntracked_clients = 100000\n");
        let per_client = validate(&text, "t.toml").unwrap().limits.per_client;
        let rate = per_client.handshakes.unwrap();
        assert_eq!(rate.interval, Duration::from_millis(200));
        assert_eq!(rate.burst.get(), 5, "one second's worth by default");
        assert_eq!(per_client.max_tunnels, Some(20));
        assert_eq!(per_client.max_tunnels_per_route, Some(8));
        assert_eq!(per_client.tracked_clients, 100_000);

        let text = format!(
            "{LISTENER}[limits.per_client]\nhandshakes_per_second = 0.5\nhandshake_burst = 3\n"
        );
        let rate = validate(&text, "t.toml")
            .unwrap()
            .limits
            .per_client
            .handshakes
            .unwrap();
        assert_eq!(rate.interval, Duration::from_secs(2));
        assert_eq!(rate.burst.get(), 3);

        let text = format!("{LISTENER}[limits.per_client]\nhandshakes_per_second = 0.25\n");
        let rate = validate(&text, "t.toml")
            .unwrap()
            .limits
            .per_client
            .handshakes
            .unwrap();
        assert_eq!(rate.burst.get(), 1, "never less than one");

        let text = format!(
            "{LISTENER}[limits.per_client]\nrequests_per_second = 50\nrequest_burst = 200\n"
        );
        let per_client = validate(&text, "t.toml").unwrap().limits.per_client;
        let rate = per_client.requests.unwrap();
        assert_eq!(rate.interval, Duration::from_millis(20));
        assert_eq!(rate.burst.get(), 200);
        assert_eq!(per_client.handshakes, None, "a bucket of its own");
        let text = format!("{LISTENER}[limits.per_client]\nrequest_burst = 2\n");
        assert_eq!(
            errors(&text),
            ["t.toml:5:17: request_burst needs requests_per_second"]
        );

        let unset = validate(LISTENER, "t.toml").unwrap().limits.per_client;
        assert_eq!(unset, PerClient::default());
        assert_eq!(unset.handshakes, None);
        assert_eq!(unset.tracked_clients, 65_536);

        let text = format!("{LISTENER}[limits.per_client]\nhandshakes_per_second = 0\nhandshake_burst = 0\nmax_tunnels = 0\nmax_tunnels_per_route = 2000000\ntracked_clients = 10\n");
        assert_eq!(
            errors(&text),
            [
                "t.toml:5:25: handshakes_per_second must be a positive number up to 1000000, e.g. 5 or 0.5",
                "t.toml:6:19: handshake_burst must be between 1 and 1000000",
                "t.toml:7:15: max_tunnels must be between 1 and 1000000",
                "t.toml:8:25: max_tunnels_per_route must be between 1 and 1000000",
                "t.toml:9:19: tracked_clients must be between 1024 and 16777216",
            ]
        );
        let text = format!("{LISTENER}[limits.per_client]\nhandshake_burst = 10\n");
        assert_eq!(
            errors(&text),
            ["t.toml:5:19: handshake_burst needs handshakes_per_second"]
        );
    }
}
