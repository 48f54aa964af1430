//! `[[route]]`: hosts, path prefixes, the one action, extra upgrade protocols.

use std::collections::HashSet;

use http::StatusCode;
use toml::Spanned;

use super::helpers::{is_token_byte, known_list};
use super::Validator;
use crate::config::raw;
use crate::config::{Action, HostPattern, Route, Upstream, WebSocket};

impl Validator<'_> {
    pub(super) fn routes(
        &mut self,
        raw: Vec<raw::Route>,
        upstreams: &[Upstream],
        websocket: &WebSocket,
    ) -> Vec<Route> {
        let mut names = HashSet::new();
        let mut matches = HashSet::new();
        let mut routes = Vec::with_capacity(raw.len());
        for route in raw {
            self.unique_name(&mut names, &route.name, "route");
            let name = route.name.get_ref();
            let hosts: Vec<HostPattern> = route.hosts.iter().filter_map(|h| self.host(h)).collect();
            let path = match &route.path {
                None => "/".to_owned(),
                Some(path) if path.get_ref().starts_with('/') => path.get_ref().clone(),
                Some(path) => {
                    self.error(
                        path.span(),
                        format!(
                            "route {name:?}: path {:?} must start with '/'",
                            path.get_ref()
                        ),
                    );
                    continue;
                }
            };
            let host_keys = if hosts.is_empty() {
                vec![None]
            } else {
                hosts.iter().cloned().map(Some).collect()
            };
            for host in host_keys {
                if !matches.insert((host.clone(), path.clone())) {
                    let span = route.path.as_ref().map_or(route.name.span(), Spanned::span);
                    self.error(
                        span,
                        format!(
                            "route {name:?}: another route already matches {} with path {path:?}",
                            describe_host(&host)
                        ),
                    );
                }
            }
            let action = match (&route.upstream, &route.respond) {
                (Some(upstream), None) => {
                    match upstreams.iter().position(|u| u.name == *upstream.get_ref()) {
                        Some(index) => Action::Proxy { upstream: index },
                        None => {
                            let known: Vec<&str> =
                                upstreams.iter().map(|u| u.name.as_str()).collect();
                            self.error(
                                upstream.span(),
                                format!(
                                    "route {name:?} refers to unknown upstream {:?} {}",
                                    upstream.get_ref(),
                                    known_list(&known)
                                ),
                            );
                            continue;
                        }
                    }
                }
                (None, Some(respond)) => {
                    let status = respond.get_ref().status.get_ref();
                    let valid = u16::try_from(*status)
                        .ok()
                        .filter(|code| (200..=599).contains(code))
                        .and_then(|code| StatusCode::from_u16(code).ok());
                    let Some(status) = valid else {
                        self.error(
                            respond.get_ref().status.span(),
                            format!("route {name:?}: respond status {status} must be between 200 and 599"),
                        );
                        continue;
                    };
                    Action::Respond {
                        status,
                        body: respond.get_ref().body.clone(),
                    }
                }
                (Some(_), Some(respond)) => {
                    self.error(
                        respond.span(),
                        format!("route {name:?} has both upstream and respond: keep one"),
                    );
                    continue;
                }
                (None, None) => {
                    self.error(
                        route.name.span(),
                        format!("route {name:?} needs upstream = \"name\" or respond = {{ status = 200, body = \"...\" }}"),
                    );
                    continue;
                }
            };
            let mut upgrades = Vec::with_capacity(route.upgrades.len());
            for upgrade in &route.upgrades {
                let protocol = upgrade.get_ref().to_ascii_lowercase();
                if protocol == "websocket" {
                    self.error(
                        upgrade.span(),
                        format!("route {name:?}: websocket upgrades are always allowed; list only other protocols"),
                    );
                } else if protocol.is_empty() || !protocol.bytes().all(is_token_byte) {
                    self.error(
                        upgrade.span(),
                        format!(
                            "route {name:?}: {:?} is not a valid Upgrade protocol token",
                            upgrade.get_ref()
                        ),
                    );
                } else {
                    upgrades.push(protocol);
                }
            }
            let websocket = match route.websocket {
                Some(raw) => self.websocket(raw, websocket),
                None => *websocket,
            };
            routes.push(Route {
                name: route.name.into_inner(),
                hosts,
                path,
                action,
                upgrades,
                websocket,
            });
        }
        routes
    }
}

fn describe_host(host: &Option<HostPattern>) -> String {
    match host {
        None => "any host".to_owned(),
        Some(HostPattern::Exact(h)) => format!("host {h:?}"),
        Some(HostPattern::Suffix(s)) => format!("host \"*{s}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, LISTENER};
    use super::super::validate;
    use super::*;

    #[test]
    fn unknown_upstream_names_the_known_ones_at_its_position() {
        let text = format!(
            "{LISTENER}\n[[upstream]]\nname = \"app\"\nservers = [\"127.0.0.1:9000\"]\n\n[[upstream]]\nname = \"api\"\nservers = [\"127.0.0.1:9001\"]\n\n[[route]]\nname = \"api\"\nupstream = \"ap\"\n"
        );
        assert_eq!(
            errors(&text),
            ["t.toml:15:12: route \"api\" refers to unknown upstream \"ap\" (known: app, api)"]
        );
    }

    #[test]
    fn routes_need_exactly_one_action_and_unique_matches() {
        let text = format!(
            "{LISTENER}[[route]]\nname = \"a\"\npath = \"/x\"\nrespond = {{ status = 200 }}\n[[route]]\nname = \"b\"\npath = \"/x\"\nrespond = {{ status = 99 }}\n[[route]]\nname = \"c\"\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("another route already matches any host with path \"/x\""));
        assert!(errs[1].contains("respond status 99 must be between 200 and 599"));
        assert!(errs[2].contains("needs upstream = \"name\" or respond"));
    }

    #[test]
    fn hosts_and_upgrades() {
        let text = format!(
            "{LISTENER}[[route]]\nname = \"a\"\nhosts = [\"Example.com\", \"*.example.com\", \"bad host\"]\nupgrades = [\"websocket\", \"h2c\"]\nrespond = {{ status = 204 }}\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("invalid host \"bad host\""));
        assert!(errs[1].contains("websocket upgrades are always allowed"));

        let text = format!(
            "{LISTENER}[[route]]\nname = \"a\"\nhosts = [\"Example.com\", \"*.example.com\"]\nupgrades = [\"H2C\"]\nrespond = {{ status = 204 }}\n"
        );
        let config = validate(&text, "t.toml").unwrap();
        let route = &config.routes[0];
        assert_eq!(
            route.hosts,
            [
                HostPattern::Exact("example.com".into()),
                HostPattern::Suffix(".example.com".into())
            ]
        );
        assert_eq!(route.upgrades, ["h2c"]);
    }
}
