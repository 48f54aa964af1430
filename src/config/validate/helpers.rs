//! What several sections share: durations, one-of-these choices and their `(known: …)` list,
//! host names, unique names, paths next to the config file, HTTP tokens, counts, CIDR lists.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::{Validator, MAX_COUNT};
use crate::config::{Cidr, CidrSet, HostPattern};

impl<'a> Validator<'a> {
    /// Relative paths in the config are read from the config file's folder.
    pub(super) fn config_dir(&self) -> &'a Path {
        Path::new(self.file).parent().unwrap_or(Path::new(""))
    }

    /// The value `raw` names among `known`, or `default` when it is absent. Anything else is
    /// reported as `{what} "other" (known: …)` and gives `default` too.
    pub(super) fn choice<T: Copy>(
        &mut self,
        raw: Option<&Spanned<String>>,
        what: &str,
        known: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(raw) = raw else { return default };
        if let Some((_, value)) = known.iter().find(|(name, _)| name == raw.get_ref()) {
            return *value;
        }
        // A name TOML would read as a number is shown quoted: it must be written as a string.
        let names: Vec<String> = known
            .iter()
            .map(|(name, _)| match name.parse::<f64>() {
                Ok(_) => format!("{name:?}"),
                Err(_) => (*name).to_owned(),
            })
            .collect();
        self.error(
            raw.span(),
            format!("{what} {:?} {}", raw.get_ref(), known_list(&names)),
        );
        default
    }

    pub(super) fn duration(&mut self, raw: Option<Spanned<String>>, default: Duration) -> Duration {
        let Some(raw) = raw else { return default };
        match parse_duration(raw.get_ref()) {
            Some(d) if !d.is_zero() => d,
            _ => {
                self.error(
                    raw.span(),
                    format!(
                        "invalid duration {:?}: expected a positive number with a unit, e.g. \"250ms\", \"5s\", \"2m\", \"1h\"",
                        raw.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn unique_name(
        &mut self,
        seen: &mut HashSet<String>,
        name: &Spanned<String>,
        what: &str,
    ) {
        if name.get_ref().is_empty() {
            self.error(name.span(), format!("{what} name must not be empty"));
        } else if !seen.insert(name.get_ref().clone()) {
            self.error(
                name.span(),
                format!("duplicate {what} name {:?}", name.get_ref()),
            );
        }
    }

    /// A count from 1 to `MAX_COUNT`, or `None` when absent (or wrong, which is reported).
    pub(super) fn count(&mut self, raw: Option<Spanned<i64>>, what: &str) -> Option<u32> {
        let raw = raw?;
        if (1..=MAX_COUNT).contains(raw.get_ref()) {
            return Some(*raw.get_ref() as u32);
        }
        self.error(
            raw.span(),
            format!("{what} must be between 1 and {MAX_COUNT}"),
        );
        None
    }

    /// Address ranges; each bad one is reported with what is wrong with it.
    pub(super) fn cidrs(&mut self, raw: &[Spanned<String>], what: &str) -> CidrSet {
        let mut ranges = Vec::with_capacity(raw.len());
        for text in raw {
            match text.get_ref().parse::<Cidr>() {
                Ok(range) => ranges.push(range),
                Err(err) => self.error(text.span(), format!("{what}: {err}")),
            }
        }
        CidrSet::new(ranges)
    }

    pub(super) fn host(&mut self, raw: &Spanned<String>) -> Option<HostPattern> {
        let host = raw.get_ref().to_ascii_lowercase();
        let (pattern, name) = match host.strip_prefix("*.") {
            Some(rest) => (HostPattern::Suffix(format!(".{rest}")), rest.to_owned()),
            None => (HostPattern::Exact(host.clone()), host),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            || name.starts_with('[') && name.ends_with(']');
        if valid {
            Some(pattern)
        } else {
            self.error(
                raw.span(),
                format!(
                    "invalid host {:?}: expected a name without port, e.g. \"example.com\" or \"*.example.com\"",
                    raw.get_ref()
                ),
            );
            None
        }
    }
}

/// `(known: a, b)`, or `(known: none)`.
pub(super) fn known_list<S: AsRef<str>>(names: &[S]) -> String {
    if names.is_empty() {
        return "(known: none)".to_owned();
    }
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    format!("(known: {})", names.join(", "))
}

/// `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let value: u64 = text[..digits_end].parse().ok()?;
    let millis = match &text[digits_end..] {
        "ms" => value,
        "s" => value.checked_mul(1_000)?,
        "m" => value.checked_mul(60_000)?,
        "h" => value.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

/// RFC 9110 `tchar`.
pub(super) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::super::tests::errors;
    use super::*;

    #[test]
    fn choices_name_what_is_known() {
        let text = "[[listener]]\nname = \"https\"\nbind = \"127.0.0.1:8443\"\n[listener.tls]\ncertificates = [{ cert = \"c\", key = \"k\" }]\nunknown_sni = \"ignore\"\nmin_version = \"1.1\"\nclient_ca = \"ca.pem\"\nclient_auth = \"maybe\"\n[[upstream]]\nname = \"app\"\nbalance = \"random\"\nservers = [\"127.0.0.1:9000\"]\n";
        assert_eq!(
            errors(text),
            [
                "t.toml:6:15: unknown unknown_sni \"ignore\" (known: default, refuse)",
                "t.toml:7:15: unsupported min_version \"1.1\" (known: \"1.2\", \"1.3\")",
                "t.toml:9:15: unknown client_auth \"maybe\" (known: required, optional)",
                "t.toml:12:11: upstream \"app\": unknown balance \"random\" (known: hash, least_connections, round_robin)",
            ]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "5 s", "-1s", "1.5s", "5d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
