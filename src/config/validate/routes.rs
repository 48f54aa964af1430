//! `[[route]]`: hosts, path prefixes, the one action, extra upgrade protocols, allowed origins
//! and subprotocols, the body limit, timeouts and the per-client tunnel limit of the route.

use std::collections::HashSet;

use http::StatusCode;
use toml::Spanned;

use super::helpers::{is_token_byte, known_list};
use super::Validator;
use crate::config::raw;
use crate::config::{
    Action, HostPattern, Limits, OriginCheck, OriginPattern, OriginPolicy, Route, RouteTimeouts,
    SubprotocolPolicy, SubprotocolUnmatched, Timeouts, Upstream, WebSocket,
};

impl Validator<'_> {
    pub(super) fn routes(
        &mut self,
        raw: Vec<raw::Route>,
        upstreams: &[Upstream],
        websocket: &WebSocket,
        timeouts: &Timeouts,
        limits: &Limits,
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
            let origins = self.origins(
                name,
                route.allowed_origins,
                route.allow_missing_origin,
                route.origin_check,
            );
            let subprotocols =
                self.subprotocols(name, route.subprotocols, route.subprotocol_unmatched);
            let max_request_body = self.size(
                route.max_request_body,
                &format!("route {name:?}: max_request_body"),
            );
            let timeouts = self.route_timeouts(route.timeouts.unwrap_or_default(), timeouts);
            let max_tunnels_per_client = self
                .count(
                    route.max_tunnels_per_client,
                    &format!("route {name:?}: max_tunnels_per_client"),
                )
                .or(limits.per_client.max_tunnels_per_route);
            routes.push(Route {
                name: route.name.into_inner(),
                hosts,
                path,
                action,
                upgrades,
                websocket,
                origins,
                subprotocols,
                max_request_body,
                timeouts,
                max_tunnels_per_client,
            });
        }
        routes
    }
}

impl Validator<'_> {
    fn origins(
        &mut self,
        route: &str,
        allowed: Option<Vec<Spanned<String>>>,
        allow_missing: Option<Spanned<bool>>,
        check: Option<Spanned<String>>,
    ) -> Option<OriginPolicy> {
        let Some(allowed) = allowed else {
            for span in [allow_missing.map(|a| a.span()), check.map(|c| c.span())]
                .into_iter()
                .flatten()
            {
                self.error(
                    span,
                    format!("route {route:?}: allow_missing_origin and origin_check need allowed_origins = [\"https://app.example.com\"]"),
                );
            }
            return None;
        };
        let mut patterns = Vec::with_capacity(allowed.len());
        for entry in &allowed {
            match entry.get_ref().parse::<OriginPattern>() {
                Ok(pattern) => patterns.push(pattern),
                Err(err) => self.error(
                    entry.span(),
                    format!(
                        "route {route:?}: allowed_origins {:?}: {err}",
                        entry.get_ref()
                    ),
                ),
            }
        }
        Some(OriginPolicy {
            allowed: patterns,
            // Browsers always send Origin with a handshake; a request without one comes from a
            // native app, a server or a script, which a cross-site page cannot make it be.
            allow_missing: allow_missing.is_none_or(|a| *a.get_ref()),
            check: self.choice(
                check.as_ref(),
                &format!("route {route:?}: unknown origin_check"),
                &[
                    ("websocket", OriginCheck::WebSocket),
                    ("all", OriginCheck::All),
                ],
                OriginCheck::WebSocket,
            ),
        })
    }

    fn subprotocols(
        &mut self,
        route: &str,
        allowed: Option<Vec<Spanned<String>>>,
        unmatched: Option<Spanned<String>>,
    ) -> Option<SubprotocolPolicy> {
        let Some(allowed) = allowed else {
            if let Some(unmatched) = unmatched {
                self.error(
                    unmatched.span(),
                    format!(
                        "route {route:?}: subprotocol_unmatched needs subprotocols = [\"name\"]"
                    ),
                );
            }
            return None;
        };
        let mut tokens = Vec::with_capacity(allowed.len());
        for token in allowed {
            if token.get_ref().is_empty() || !token.get_ref().bytes().all(is_token_byte) {
                self.error(
                    token.span(),
                    format!(
                        "route {route:?}: {:?} is not a valid subprotocol token",
                        token.get_ref()
                    ),
                );
            } else {
                tokens.push(token.into_inner());
            }
        }
        Some(SubprotocolPolicy {
            allowed: tokens,
            unmatched: self.choice(
                unmatched.as_ref(),
                &format!("route {route:?}: unknown subprotocol_unmatched"),
                &[
                    ("refuse", SubprotocolUnmatched::Refuse),
                    ("forward", SubprotocolUnmatched::Forward),
                ],
                // A client offering only what the backend does not speak is misconfigured or
                // probing; a 400 at the edge says so, where forwarding would hide it.
                SubprotocolUnmatched::Refuse,
            ),
        })
    }

    fn route_timeouts(&mut self, raw: raw::RouteTimeouts, global: &Timeouts) -> RouteTimeouts {
        RouteTimeouts {
            connect: self.duration(raw.connect, global.connect),
            upstream_response_header: self.duration(
                raw.upstream_response_header,
                global.upstream_response_header,
            ),
            websocket_idle: self.duration(raw.websocket_idle, global.websocket_idle),
            websocket_half_closed: self
                .duration(raw.websocket_half_closed, global.websocket_half_closed),
        }
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
    use std::time::Duration;

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

    const ROUTE: &str = "[[route]]\nname = \"chat\"\nrespond = { status = 204 }\n";

    #[test]
    fn allowed_origins() {
        let text = format!("{LISTENER}{ROUTE}allowed_origins = [\"https://app.example.com\", \"https://*.example.org\", \"null\"]\n");
        let config = validate(&text, "t.toml").unwrap();
        let origins = config.routes[0].origins.as_ref().unwrap();
        assert_eq!(origins.allowed.len(), 3);
        assert_eq!(origins.allowed[2], OriginPattern::Null);
        assert!(origins.allow_missing, "non-browser clients send no Origin");
        assert_eq!(origins.check, OriginCheck::WebSocket);

        let text = format!("{LISTENER}{ROUTE}allowed_origins = []\nallow_missing_origin = false\norigin_check = \"all\"\n");
        let config = validate(&text, "t.toml").unwrap();
        let origins = config.routes[0].origins.as_ref().unwrap();
        assert!(origins.allowed.is_empty());
        assert!(!origins.allow_missing);
        assert_eq!(origins.check, OriginCheck::All);

        let text = format!("{LISTENER}{ROUTE}");
        assert!(validate(&text, "t.toml").unwrap().routes[0]
            .origins
            .is_none());

        let text = format!("{LISTENER}{ROUTE}allowed_origins = [\"https://app.example.com/\", \"app.example.com\", \"https://a.*.example.com\"]\norigin_check = \"http\"\n[[route]]\nname = \"feed\"\npath = \"/feed\"\nrespond = {{ status = 204 }}\nallow_missing_origin = true\n");
        assert_eq!(
            errors(&text),
            [
                "t.toml:7:20: route \"chat\": allowed_origins \"https://app.example.com/\": an origin has no path: write only scheme://host[:port]",
                "t.toml:7:48: route \"chat\": allowed_origins \"app.example.com\": expected an origin such as \"https://app.example.com\", \"https://*.example.com\" or \"null\"",
                "t.toml:7:67: route \"chat\": allowed_origins \"https://a.*.example.com\": a wildcard must be the whole first label, as in \"https://*.example.com\"",
                "t.toml:8:16: route \"chat\": unknown origin_check \"http\" (known: websocket, all)",
                "t.toml:13:24: route \"feed\": allow_missing_origin and origin_check need allowed_origins = [\"https://app.example.com\"]",
            ]
        );
    }

    #[test]
    fn subprotocols() {
        let text =
            format!("{LISTENER}{ROUTE}subprotocols = [\"graphql-transport-ws\", \"v2.chat\"]\n");
        let config = validate(&text, "t.toml").unwrap();
        let subprotocols = config.routes[0].subprotocols.as_ref().unwrap();
        assert_eq!(subprotocols.allowed, ["graphql-transport-ws", "v2.chat"]);
        assert_eq!(subprotocols.unmatched, SubprotocolUnmatched::Refuse);

        let text = format!(
            "{LISTENER}{ROUTE}subprotocols = [\"mqtt\"]\nsubprotocol_unmatched = \"forward\"\n"
        );
        let config = validate(&text, "t.toml").unwrap();
        let subprotocols = config.routes[0].subprotocols.as_ref().unwrap();
        assert_eq!(subprotocols.unmatched, SubprotocolUnmatched::Forward);

        let text = format!("{LISTENER}{ROUTE}subprotocols = [\"mqtt v5\", \"\", \"ok\"]\nsubprotocol_unmatched = \"drop\"\n[[route]]\nname = \"feed\"\npath = \"/feed\"\nrespond = {{ status = 204 }}\nsubprotocol_unmatched = \"refuse\"\n");
        assert_eq!(
            errors(&text),
            [
                "t.toml:7:17: route \"chat\": \"mqtt v5\" is not a valid subprotocol token",
                "t.toml:7:28: route \"chat\": \"\" is not a valid subprotocol token",
                "t.toml:8:25: route \"chat\": unknown subprotocol_unmatched \"drop\" (known: refuse, forward)",
                "t.toml:13:25: route \"feed\": subprotocol_unmatched needs subprotocols = [\"name\"]",
            ]
        );
    }

    #[test]
    fn body_limit_timeouts_and_tunnels_per_client() {
        let text = format!("{LISTENER}[timeouts]\nconnect = \"2s\"\nupstream_response_header = \"30s\"\n[limits.per_client]\nmax_tunnels_per_route = 4\n{ROUTE}max_request_body = 1048576\ntimeouts = {{ upstream_response_header = \"5m\", websocket_idle = \"1h\" }}\n[[route]]\nname = \"feed\"\npath = \"/feed\"\nrespond = {{ status = 204 }}\nmax_tunnels_per_client = 1\n");
        let config = validate(&text, "t.toml").unwrap();
        let (chat, feed) = (&config.routes[0], &config.routes[1]);
        assert_eq!(chat.max_request_body, Some(1_048_576));
        assert_eq!(feed.max_request_body, None);
        // Overrides win, the rest is the global value (set or default).
        assert_eq!(
            chat.timeouts.upstream_response_header,
            Duration::from_secs(300)
        );
        assert_eq!(chat.timeouts.websocket_idle, Duration::from_secs(3600));
        assert_eq!(chat.timeouts.connect, Duration::from_secs(2));
        assert_eq!(chat.timeouts.websocket_half_closed, Duration::from_secs(30));
        assert_eq!(
            feed.timeouts.upstream_response_header,
            Duration::from_secs(30)
        );
        assert_eq!(chat.max_tunnels_per_client, Some(4));
        assert_eq!(feed.max_tunnels_per_client, Some(1));

        let text = format!("{LISTENER}{ROUTE}max_request_body = 0\nmax_tunnels_per_client = -1\ntimeouts = {{ connect = \"fast\" }}\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!(errs[0], "t.toml:7:20: route \"chat\": max_request_body must be a positive number of bytes, e.g. 1048576");
        assert_eq!(
            errs[1],
            "t.toml:8:26: route \"chat\": max_tunnels_per_client must be between 1 and 1000000"
        );
        assert!(
            errs[2].starts_with("t.toml:9:24: invalid duration \"fast\""),
            "{errs:?}"
        );
        // Only the timeouts that make sense for one route.
        let text = format!("{LISTENER}{ROUTE}timeouts = {{ drain = \"1s\" }}\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("t.toml:7:14: unknown field `drain`, expected one of `connect`, `upstream_response_header`"), "{errs:?}");
    }
}
