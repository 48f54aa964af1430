//! `wsgate proxy`: the config a command line stands for, written as TOML text and validated by
//! `config::parse` like a file, so that the one-liner gets every check and default a file gets.
//!
//! Each command-line value enters the text only as a TOML string written by the `toml` crate,
//! so no value can add a key or a table; where each one sits is kept, so that a problem found in
//! it is told as its flag (`--to "nope": invalid server address ...`), not as a line of a text
//! the user never saw.

use std::fmt;
use std::ops::Range;

use crate::config::{self, Config, Diagnostic};

/// What the generated text is called in error locations. Without a `/`, so that relative
/// certificate paths resolve against the working directory, as a shell user expects.
pub const SOURCE: &str = "wsgate proxy";
/// The names in the generated config (they appear in log lines).
const ROUTE: &str = "all";
const UPSTREAM: &str = "app";

/// The values `wsgate proxy` was given.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--from`: the listener's bind address.
    pub from: String,
    /// `--to`, in order: the upstream's servers.
    pub to: Vec<String>,
    /// `--tls-cert` and `--tls-key`: serve HTTPS.
    pub tls: Option<TlsFiles>,
    /// `--log-level`: a tracing filter.
    pub log_level: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
}

/// The config text, and where in it each command-line value was written.
#[derive(Debug)]
pub struct Generated {
    pub text: String,
    values: Vec<Placed>,
}

#[derive(Debug)]
struct Placed {
    flag: &'static str,
    value: String,
    /// The value's TOML string in `text`, quotes included.
    span: Range<usize>,
}

impl Generated {
    /// Appends `raw` as it is: generated keys and punctuation, never a command-line value.
    fn push(&mut self, raw: &str) {
        self.text.push_str(raw);
    }

    /// Appends `value` as a TOML string and notes that `flag` gave it.
    fn push_value(&mut self, flag: &'static str, value: &str) {
        let start = self.text.len();
        self.text.push_str(&toml_string(value));
        self.values.push(Placed {
            flag,
            value: value.to_owned(),
            span: start..self.text.len(),
        });
    }

    /// The flag value a diagnostic points into, if any.
    fn placed_at(&self, diagnostic: &Diagnostic) -> Option<&Placed> {
        let at = (diagnostic.location.line, diagnostic.location.col);
        self.values.iter().find(|placed| {
            let start = line_col(&self.text, placed.span.start);
            let end = line_col(&self.text, placed.span.end);
            start <= at && at < end
        })
    }
}

/// The config for `flags`: one listener on `--from` (TLS with the given files), one route for
/// every host and path, one `least_connections` upstream over the `--to` servers.
pub fn config_text(flags: &Flags) -> Generated {
    let mut out = Generated {
        text: String::new(),
        values: Vec::new(),
    };
    if let Some(level) = &flags.log_level {
        out.push("[log]\nlevel = ");
        out.push_value("--log-level", level);
        out.push("\n\n");
    }
    let listener = if flags.tls.is_some() { "https" } else { "http" };
    out.push(&format!("[[listener]]\nname = \"{listener}\"\nbind = "));
    out.push_value("--from", &flags.from);
    out.push("\n");
    if let Some(tls) = &flags.tls {
        out.push("\n[listener.tls]\ncertificates = [{ cert = ");
        out.push_value("--tls-cert", &tls.cert);
        out.push(", key = ");
        out.push_value("--tls-key", &tls.key);
        out.push(" }]\n");
    }
    out.push(&format!(
        "\n[[route]]\nname = \"{ROUTE}\"\npath = \"/\"\nupstream = \"{UPSTREAM}\"\n"
    ));
    out.push(&format!(
        "\n[[upstream]]\nname = \"{UPSTREAM}\"\nbalance = \"least_connections\"\nservers = [\n"
    ));
    for server in &flags.to {
        out.push("    ");
        out.push_value("--to", server);
        out.push(",\n");
    }
    out.push("]\n");
    out
}

/// The validated config for `flags`, or every problem, each told by the flag it is in.
pub fn config(flags: &Flags) -> Result<Config, Vec<Problem>> {
    let generated = config_text(flags);
    let diagnostics = match config::parse(&generated.text, SOURCE) {
        Ok(config) => return Ok(config),
        Err(config::Error::Invalid(diagnostics)) => diagnostics,
        Err(config::Error::Read { .. }) => unreachable!("parse reads no file"),
    };
    let upstream_prefix = format!("upstream {UPSTREAM:?}: ");
    let problems = diagnostics
        .into_iter()
        .map(|diagnostic| match generated.placed_at(&diagnostic) {
            Some(placed) => Problem::Flag {
                flag: placed.flag,
                value: placed.value.clone(),
                // The upstream is the command line's one; naming it says nothing.
                message: diagnostic
                    .message
                    .strip_prefix(&upstream_prefix)
                    .unwrap_or(&diagnostic.message)
                    .to_owned(),
            },
            None => Problem::Generated(diagnostic),
        })
        .collect();
    Err(problems)
}

/// One reason the command line does not make a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// In a value the user gave, e.g. `--to "nope": invalid server address "nope": ...`.
    Flag {
        flag: &'static str,
        value: String,
        message: String,
    },
    /// Elsewhere in the generated text, which is wsgate's own mistake: told with its place.
    Generated(Diagnostic),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Flag {
                flag,
                value,
                message,
            } => write!(f, "{flag} {value:?}: {message}"),
            Problem::Generated(diagnostic) => diagnostic.fmt(f),
        }
    }
}

/// `value` as a TOML string: quotes, backslashes, newlines and control characters escaped
/// (a value with a newline may come out as a multi-line string; it is still one value).
fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

/// The 1-based line and column (in characters) of byte `offset`, counted as
/// `config::validate` counts them for a diagnostic.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, Balance, ServerAddress};

    fn flags(from: &str, to: &[&str]) -> Flags {
        Flags {
            from: from.to_owned(),
            to: to.iter().map(|s| (*s).to_owned()).collect(),
            ..Flags::default()
        }
    }

    fn problems(flags: &Flags) -> Vec<String> {
        match config(flags) {
            Ok(_) => panic!("accepted:\n{}", config_text(flags).text),
            Err(problems) => problems.iter().map(Problem::to_string).collect(),
        }
    }

    #[test]
    fn the_text_is_one_listener_one_route_one_upstream() {
        let text = config_text(&flags(
            "127.0.0.1:8080",
            &["127.0.0.1:9000", "127.0.0.1:9001"],
        ))
        .text;
        assert_eq!(
            text,
            "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:8080\"\n\
             \n[[route]]\nname = \"all\"\npath = \"/\"\nupstream = \"app\"\n\
             \n[[upstream]]\nname = \"app\"\nbalance = \"least_connections\"\nservers = [\n    \"127.0.0.1:9000\",\n    \"127.0.0.1:9001\",\n]\n"
        );
    }

    #[test]
    fn tls_and_log_level_add_their_tables() {
        let flags = Flags {
            tls: Some(TlsFiles {
                cert: "site.pem".into(),
                key: "/etc/site.key".into(),
            }),
            log_level: Some("wsgate=debug".into()),
            ..flags("[::1]:8443", &["127.0.0.1:9000"])
        };
        let text = config_text(&flags).text;
        assert!(text.starts_with("[log]\nlevel = \"wsgate=debug\"\n\n[[listener]]\nname = \"https\"\nbind = \"[::1]:8443\"\n\n[listener.tls]\ncertificates = [{ cert = \"site.pem\", key = \"/etc/site.key\" }]\n\n[[route]]"), "{text}");
        let config = config(&flags).expect("valid");
        let listener = &config.listeners[0];
        assert_eq!(listener.bind, "[::1]:8443".parse().unwrap());
        let tls = listener.tls.as_ref().expect("a TLS listener");
        // Relative to the working directory, as a shell user means it.
        assert_eq!(tls.certificates[0].cert, std::path::Path::new("site.pem"));
        assert_eq!(
            tls.certificates[0].key,
            std::path::Path::new("/etc/site.key")
        );
        assert!(listener.http2, "a file's default for a TLS listener");
        assert_eq!(config.log.level.len(), 1);
    }

    #[test]
    fn the_config_is_a_file_s_with_its_defaults() {
        let config = config(&flags(
            "127.0.0.1:0",
            &["127.0.0.1:9000", "https://app.test:443"],
        ))
        .expect("valid");
        assert_eq!(config.timeouts, config::Timeouts::default());
        assert_eq!(config.listeners.len(), 1);
        assert!(!config.listeners[0].http2);
        assert_eq!(config.routes.len(), 1);
        assert!(config.routes[0].hosts.is_empty(), "every host");
        assert_eq!(config.routes[0].path, "/");
        assert!(matches!(
            config.routes[0].action,
            Action::Proxy { upstream: 0 }
        ));
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.balance, Balance::LeastConnections);
        assert_eq!(upstream.servers.len(), 2);
        assert_eq!(
            upstream.servers[0].address,
            ServerAddress::Ip("127.0.0.1:9000".parse().unwrap())
        );
        assert!(upstream.servers[0].tls.is_none());
        assert!(
            upstream.servers[1].tls.is_some(),
            "https:// keeps its meaning"
        );
    }

    #[test]
    fn a_bad_value_is_told_by_its_flag() {
        assert_eq!(
            problems(&flags("127.0.0.1:8080", &["127.0.0.1:9000", "nope"])),
            ["--to \"nope\": invalid server address \"nope\": expected host:port, e.g. \"127.0.0.1:9000\""]
        );
        let lines = problems(&Flags {
            log_level: Some("wsgate=loud".into()),
            ..flags(":8080", &["nope", "also:bad:3"])
        });
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0].starts_with("--log-level \"wsgate=loud\": invalid log level"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("--from \":8080\": invalid bind address \":8080\""),
            "{lines:?}"
        );
        assert!(
            lines[2].starts_with("--to \"nope\": invalid server address"),
            "{lines:?}"
        );
        assert!(
            lines[3].starts_with("--to \"also:bad:3\": invalid server address"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_value_cannot_write_config() {
        let attempts = [
            "127.0.0.1:1\"]\n[[route]]\nname = \"x\"\nrespond = { status = 200 }\n#",
            "127.0.0.1:1\", \"127.0.0.1:2",
            "127.0.0.1:1'''\n\"\"\"\\",
            "127.0.0.1:1\r\n[log]\r\nlevel = \"trace\"",
            "127.0.0.1:1\u{0}\u{7f}\u{1b}[31m",
        ];
        for attempt in attempts {
            let flags = flags("127.0.0.1:8080", &["127.0.0.1:9000", attempt]);
            let generated = config_text(&flags);
            // The text still holds exactly one of everything, and the value as given.
            let raw: toml::Table = generated.text.parse().expect("the text is TOML");
            assert_eq!(
                raw.keys().collect::<Vec<_>>(),
                ["listener", "route", "upstream"]
            );
            assert_eq!(raw["route"].as_array().unwrap().len(), 1);
            let servers = raw["upstream"][0]["servers"].as_array().unwrap();
            assert_eq!(servers.len(), 2, "{}", generated.text);
            assert_eq!(servers[1].as_str(), Some(attempt));
            assert_eq!(
                problems(&flags),
                [format!("--to {attempt:?}: invalid server address {attempt:?}: expected host:port, e.g. \"127.0.0.1:9000\"")]
            );
        }
        let flags = Flags {
            tls: Some(TlsFiles {
                cert: "c.pem\" }]\nclient_auth = \"none".into(),
                key: "k.pem".into(),
            }),
            ..flags("127.0.0.1:8080", &["127.0.0.1:9000"])
        };
        let config = config(&flags).expect("a strange file name, but a file name");
        let tls = config.listeners[0].tls.as_ref().unwrap();
        assert_eq!(
            tls.certificates[0].cert,
            std::path::Path::new("c.pem\" }]\nclient_auth = \"none")
        );
    }

    #[test]
    fn line_col_counts_as_the_validator_does() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, text.find('"').unwrap()), (2, 6));
        let problem = config::parse("[[listener]]\nname = \"é\"\nbind = \"x\"\n", "t")
            .expect_err("invalid")
            .to_string();
        assert!(problem.starts_with("t:3:8: "), "{problem}");
    }
}
