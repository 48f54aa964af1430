//! The names of the fields on wsgate's log lines, defined once: the event sites write them,
//! README's "Log fields" lists them, and the integration tests check the output against
//! `EVENTS`. A name here is part of the interface operators' log shippers rely on: rename one
//! only with a note in the README.

/// What kind of line this is, so that a log shipper can filter without matching messages.
/// Its values are in `event`.
pub const EVENT: &str = "event";

/// The values of the `event` field.
pub mod event {
    /// The access line of a request answered without failure (`[log] access`).
    pub const REQUEST: &str = "request";
    /// A request refused before or without its upstream's fault (4xx): no route, a bad
    /// handshake, a limit.
    pub const REFUSED: &str = "refused";
    /// A request that failed upstream (502, 504): every server unreachable, a timeout, a reset.
    pub const UPSTREAM_FAILURE: &str = "upstream_failure";
    /// One server failed and the request went on to the next one; the client saw nothing.
    pub const FAILOVER: &str = "failover";
    /// A WebSocket (or other upgraded) tunnel ended.
    pub const TUNNEL_CLOSED: &str = "tunnel_closed";
    /// A config reload was applied or rejected.
    pub const RELOAD: &str = "reload";
    /// A server went up or down, by its active checks or by passive ejection.
    pub const HEALTH_CHANGE: &str = "health_change";
}

// The connection's: its span's (`conn`), and on the request's, the failures' and the tunnel's
// lines.
/// The `[[listener]]` name the connection arrived on.
pub const LISTENER: &str = "listener";
/// The client socket's address, or the one its PROXY header carried.
pub const PEER: &str = "peer";
/// The TLS server name the client asked for (TLS listeners only, when sent).
pub const SNI: &str = "sni";

// The request's: its span's (`request`), and on its own lines and its tunnel's.
pub const METHOD: &str = "method";
pub const HOST: &str = "host";
/// The path, without the query.
pub const PATH: &str = "path";
/// The `[[route]]` name, `-` when none matched.
pub const ROUTE: &str = "route";

// Event fields.
pub const STATUS: &str = "status";
pub const UPSTREAM: &str = "upstream";
/// A server by its configured address (`host:port`).
pub const SERVER: &str = "server";
/// Who the request counts for: the peer, or the client a trusted proxy named.
pub const CLIENT: &str = "client";
/// Milliseconds from the request's arrival to its response head.
pub const HEAD_MS: &str = "head_ms";
/// A stable token for what failed (`no_route`, `bad_handshake`, `connect`, ...).
pub const FAILURE: &str = "failure";
/// The full cause, `a: b: c`.
pub const ERROR: &str = "error";
pub const DURATION_MS: &str = "duration_ms";
pub const BYTES_UP: &str = "bytes_up";
pub const BYTES_DOWN: &str = "bytes_down";
pub const FRAMES_UP: &str = "frames_up";
pub const FRAMES_DOWN: &str = "frames_down";
pub const MESSAGES_UP: &str = "messages_up";
pub const MESSAGES_DOWN: &str = "messages_down";
pub const CLIENT_CLOSE_CODE: &str = "client_close_code";
pub const UPSTREAM_CLOSE_CODE: &str = "upstream_close_code";
pub const CLOSED_BY: &str = "closed_by";
pub const VIOLATION: &str = "violation";
/// `applied` or `rejected`.
pub const OUTCOME: &str = "outcome";
pub const LISTENERS_ADDED: &str = "listeners_added";
pub const LISTENERS_REMOVED: &str = "listeners_removed";
pub const ROUTES_ADDED: &str = "routes_added";
pub const ROUTES_REMOVED: &str = "routes_removed";
pub const UPSTREAMS_ADDED: &str = "upstreams_added";
pub const UPSTREAMS_REMOVED: &str = "upstreams_removed";
pub const SERVERS_ADDED: &str = "servers_added";
pub const SERVERS_REMOVED: &str = "servers_removed";
pub const TUNNELS_CLOSING: &str = "tunnels_closing";
/// One problem of a rejected config, `file:line:col: message`.
pub const PROBLEM: &str = "problem";
/// `up` or `down`.
pub const STATE: &str = "state";
/// What judged the server: `active` (its health checks) or `passive` (its traffic).
pub const CHECK: &str = "check";
/// Active checks in a row that made the change.
pub const CHECKS: &str = "checks";
/// Why an active check failed.
pub const REASON: &str = "reason";
/// Passive: failures in a row that ejected the server, and for how long.
pub const FAILURES: &str = "failures";
pub const EJECT_S: &str = "eject_s";

/// The span names, as they appear in text lines (`conn{...}:request{...}:`).
pub const CONN_SPAN: &str = "conn";
pub const REQUEST_SPAN: &str = "request";

/// The fields of the connection span, and of the request span.
pub const CONN_SPAN_FIELDS: &[&str] = &[LISTENER, PEER, SNI];
pub const REQUEST_SPAN_FIELDS: &[&str] = &[METHOD, HOST, PATH, ROUTE];

/// Each event and the fields its line always carries besides `event`. `failover` and a passive
/// `health_change` also carry the spans' fields (`CONN_SPAN_FIELDS`, `REQUEST_SPAN_FIELDS`)
/// where the spans are on; some lines carry more when they apply (README's "Log fields").
pub const EVENTS: &[(&str, &[&str])] = &[
    (
        event::REQUEST,
        &[
            LISTENER, PEER, STATUS, ROUTE, SERVER, METHOD, HOST, PATH, CLIENT, HEAD_MS,
        ],
    ),
    (
        event::REFUSED,
        &[
            LISTENER, PEER, STATUS, FAILURE, ROUTE, METHOD, HOST, PATH, CLIENT, ERROR,
        ],
    ),
    (
        event::UPSTREAM_FAILURE,
        &[
            LISTENER, PEER, STATUS, FAILURE, ROUTE, UPSTREAM, SERVER, METHOD, HOST, PATH, CLIENT,
            ERROR,
        ],
    ),
    (event::FAILOVER, &[UPSTREAM, SERVER, ERROR]),
    (
        event::TUNNEL_CLOSED,
        &[
            LISTENER,
            PEER,
            METHOD,
            HOST,
            PATH,
            ROUTE,
            UPSTREAM,
            SERVER,
            CLIENT,
            DURATION_MS,
            BYTES_UP,
            BYTES_DOWN,
            CLOSED_BY,
        ],
    ),
    (event::RELOAD, &[OUTCOME]),
    (event::HEALTH_CHANGE, &[UPSTREAM, SERVER, STATE, CHECK]),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// README's "Log fields" names every event, span and field listed here.
    #[test]
    fn the_readme_documents_every_event_and_field() {
        let readme = include_str!("../../README.md");
        let start = readme.find("### Log fields").expect("a Log fields section");
        let section = &readme[start..];
        let section = &section[..section[4..]
            .find("\n##")
            .map_or(section.len(), |end| end + 4)];
        let documented = |name: &str| section.contains(&format!("`{name}`"));
        for span in [CONN_SPAN, REQUEST_SPAN] {
            assert!(documented(span), "span {span}");
        }
        for field in CONN_SPAN_FIELDS.iter().chain(REQUEST_SPAN_FIELDS) {
            assert!(documented(field), "span field {field}");
        }
        for (event, fields) in EVENTS {
            assert!(section.contains(&format!("| `{event}` |")), "event {event}");
            for field in *fields {
                assert!(documented(field), "{event}: field {field}");
            }
        }
        assert!(documented(EVENT));
    }
}
