//! The only place where a failure becomes a status code: each error knows which side caused
//! it, and `respond` turns it into a short page and one log line.

use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, SEC_WEBSOCKET_VERSION};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use super::policy::{OriginRefused, TunnelRefused};
use crate::metrics::Refusal;
use crate::telemetry::{error_chain, fields as f};
use crate::upstream;
use crate::websocket::HandshakeError;

/// The whole answer to plain HTTP on a TLS port, before any HTTP parsing (as nginx's 400
/// "The plain HTTP request was sent to HTTPS port").
pub const PLAIN_HTTP_TO_TLS_PORT: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 68\r\n\
connection: close\r\n\
\r\n\
400 Bad Request: plain HTTP was sent to an HTTPS port; use https://\n";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("CONNECT is not supported: wsgate is a reverse proxy")]
    ConnectMethod,
    #[error("missing, repeated or invalid Host header")]
    BadHost,
    #[error("invalid WebSocket handshake")]
    Handshake(#[source] HandshakeError),
    /// Cross-site WebSocket hijacking (RFC 6455 §10.2): refused before any backend is asked.
    #[error("origin not allowed on this route")]
    Origin(#[source] OriginRefused),
    #[error("none of the offered subprotocols is allowed on this route")]
    NoSubprotocol,
    #[error("too many WebSocket handshakes from this client; retry in {}s", retry_after.as_secs())]
    HandshakeRate { retry_after: std::time::Duration },
    #[error("too many requests from this client; retry in {}s", retry_after.as_secs())]
    RequestRate { retry_after: std::time::Duration },
    #[error("request body is over the route's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("too many open WebSockets from this client")]
    Tunnels(#[source] TunnelRefused),
    #[error("upstream {upstream:?} failed")]
    Upstream {
        upstream: String,
        #[source]
        source: upstream::Error,
    },
    #[error("upstream {upstream:?} answered 101 without switching to the requested protocol")]
    BadSwitch {
        upstream: String,
        server: std::sync::Arc<str>,
    },
}

/// Who caused a failure, which decides both the status family and how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BadHost => StatusCode::BAD_REQUEST,
            ProxyError::Handshake(HandshakeError::UnsupportedVersion) => {
                StatusCode::UPGRADE_REQUIRED
            }
            ProxyError::Handshake(HandshakeError::UnsupportedProtocol) => {
                StatusCode::NOT_IMPLEMENTED
            }
            ProxyError::Handshake(_) => StatusCode::BAD_REQUEST,
            ProxyError::Origin(_) => StatusCode::FORBIDDEN,
            ProxyError::NoSubprotocol => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HandshakeRate { .. }
            | ProxyError::RequestRate { .. }
            | ProxyError::Tunnels(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Upstream { source, .. } => match source {
                err if err.is_body_too_large() => StatusCode::PAYLOAD_TOO_LARGE,
                upstream::Error::ConnectTimeout { .. }
                | upstream::Error::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                err if err.is_client_body() => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            },
            ProxyError::BadSwitch { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Why a request or handshake was refused before any backend was asked, for the metric.
    pub fn refusal(&self) -> Option<Refusal> {
        Some(match self {
            ProxyError::Handshake(HandshakeError::UnsupportedVersion) => Refusal::UpgradeRequired,
            ProxyError::Handshake(HandshakeError::UnsupportedProtocol) => return None,
            ProxyError::Handshake(_) | ProxyError::NoSubprotocol => Refusal::BadRequest,
            ProxyError::Origin(_) => Refusal::Origin,
            ProxyError::HandshakeRate { .. }
            | ProxyError::RequestRate { .. }
            | ProxyError::Tunnels(_) => Refusal::RateLimited,
            _ => return None,
        })
    }

    /// A stable token for the log line's `failure` field: what a log shipper counts by.
    pub fn failure(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::ConnectMethod => "connect_method",
            ProxyError::BadHost => "bad_host",
            ProxyError::Handshake(_) => "bad_handshake",
            ProxyError::Origin(_) => "origin",
            ProxyError::NoSubprotocol => "no_subprotocol",
            ProxyError::HandshakeRate { .. } => "handshake_rate",
            ProxyError::RequestRate { .. } => "request_rate",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::Tunnels(_) => "tunnels",
            ProxyError::Upstream { source, .. } => match source {
                err if err.is_body_too_large() => "body_too_large",
                err if err.is_client_body() => "client_body",
                upstream::Error::Connect { .. } => "connect",
                upstream::Error::ConnectTimeout { .. } => "connect_timeout",
                upstream::Error::Tls { .. } => "tls",
                upstream::Error::ResponseTimeout { .. } => "response_timeout",
                upstream::Error::Exchange { .. } => "exchange",
            },
            ProxyError::BadSwitch { .. } => "bad_switch",
        }
    }

    /// The upstream and server the failure names, if any.
    fn upstream(&self) -> (Option<&str>, Option<&str>) {
        match self {
            ProxyError::Upstream { upstream, source } => (Some(upstream), Some(source.server())),
            ProxyError::BadSwitch { upstream, server } => (Some(upstream), Some(server)),
            _ => (None, None),
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ProxyError::Upstream { source, .. } if source.is_client_body() => Side::Downstream,
            ProxyError::Upstream { .. } | ProxyError::BadSwitch { .. } => Side::Upstream,
            _ => Side::Downstream,
        }
    }

    /// The page a client sees: the status and what went wrong, never a backend address.
    fn page(&self) -> String {
        let status = self.status();
        let reason = status.canonical_reason().unwrap_or("");
        let detail = match self {
            ProxyError::Upstream { upstream, .. } if status == StatusCode::GATEWAY_TIMEOUT => {
                format!("upstream \"{upstream}\" did not answer in time")
            }
            ProxyError::Upstream { upstream, source } if !source.is_client_body() => {
                format!("upstream \"{upstream}\" is unavailable")
            }
            ProxyError::Upstream { source, .. } if source.is_body_too_large() => {
                "request body is over the route's limit".to_owned()
            }
            ProxyError::Handshake(err) => err.to_string(),
            other => other.to_string(),
        };
        format!("{} {reason}: {detail}\n", status.as_u16())
    }
}

/// What the failure log line names about the request.
#[derive(Debug)]
pub struct RequestLabels<'a> {
    pub method: &'a http::Method,
    pub host: &'a str,
    pub path: &'a str,
    pub route: Option<&'a str>,
    pub client: std::net::SocketAddr,
    /// The connection, for its listener, peer and TLS server name.
    pub conn: &'a super::ConnInfo,
}

pub fn respond(err: ProxyError, labels: &RequestLabels<'_>) -> Response<ProxyBody> {
    let status = err.status();
    failure_line(&err, status, labels);
    let mut response = Response::new(ProxyBody::fixed(err.page()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    match err {
        // RFC 6455 §4.4: tell the client which version we speak.
        ProxyError::Handshake(HandshakeError::UnsupportedVersion) => {
            headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        // RFC 6585 §4: when the client may try again.
        ProxyError::HandshakeRate { retry_after } | ProxyError::RequestRate { retry_after } => {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after.as_secs()));
        }
        // RFC 9110 §15.5.6: a 405 lists what is allowed.
        ProxyError::ConnectMethod => {
            headers.insert(
                ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        _ => {}
    }
    response
}

/// The failure's one line. It carries the connection's and the request's fields itself, not
/// through spans: an upstream failure is a `warn`, and must name its request under a `warn`
/// filter too. Out of line, as `proxy::access_line` is: the macro's expansion is large.
#[inline(never)]
fn failure_line(err: &ProxyError, status: StatusCode, labels: &RequestLabels<'_>) {
    let cause = error_chain(err);
    let route = labels.route.unwrap_or("-");
    let (upstream, server) = err.upstream();
    macro_rules! failure_line {
        ($level:ident, $event:expr, $message:literal) => {
            tracing::event!(
                tracing::Level::$level,
                { f::EVENT } = $event,
                { f::LISTENER } = %labels.conn.listener,
                { f::PEER } = %labels.conn.peer,
                { f::SNI } = super::sni(labels.conn),
                { f::STATUS } = status.as_u16(),
                { f::FAILURE } = err.failure(),
                { f::ROUTE } = route,
                { f::UPSTREAM } = upstream,
                { f::SERVER } = server,
                { f::METHOD } = %labels.method,
                { f::HOST } = labels.host,
                { f::PATH } = labels.path,
                { f::CLIENT } = %labels.client,
                { f::ERROR } = %cause,
                $message
            )
        };
    }
    match err.side() {
        Side::Upstream => failure_line!(WARN, f::event::UPSTREAM_FAILURE, "request failed"),
        Side::Downstream => failure_line!(INFO, f::event::REFUSED, "request refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn upstream(source: upstream::Error) -> ProxyError {
        ProxyError::Upstream {
            upstream: "app".into(),
            source,
        }
    }

    #[test]
    fn plain_http_answer_has_a_correct_length() {
        let text = std::str::from_utf8(PLAIN_HTTP_TO_TLS_PORT).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
    }

    #[test]
    fn statuses_follow_where_the_failure_happened() {
        let refused = upstream(upstream::Error::Connect {
            server: "127.0.0.1:9".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        });
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(refused.side(), Side::Upstream);
        assert_eq!(
            refused.page(),
            "502 Bad Gateway: upstream \"app\" is unavailable\n"
        );
        let slow = upstream(upstream::Error::ResponseTimeout {
            server: "127.0.0.1:9".into(),
            after: Duration::from_secs(1),
        });
        assert_eq!(slow.status(), StatusCode::GATEWAY_TIMEOUT);
        let connect_slow = upstream(upstream::Error::ConnectTimeout {
            server: "127.0.0.1:9".into(),
            after: Duration::from_secs(1),
        });
        assert_eq!(connect_slow.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ProxyError::NoRoute.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ProxyError::ConnectMethod.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            ProxyError::Handshake(HandshakeError::UnsupportedVersion).status(),
            StatusCode::UPGRADE_REQUIRED
        );
        assert_eq!(
            ProxyError::Handshake(HandshakeError::MissingKey).status(),
            StatusCode::BAD_REQUEST
        );
        let origin = ProxyError::Origin(OriginRefused::NotAllowed);
        assert_eq!(origin.status(), StatusCode::FORBIDDEN);
        assert_eq!(origin.side(), Side::Downstream);
        assert_eq!(
            origin.page(),
            "403 Forbidden: origin not allowed on this route\n"
        );
        assert_eq!(ProxyError::NoSubprotocol.status(), StatusCode::BAD_REQUEST);
        let rate = ProxyError::HandshakeRate {
            retry_after: Duration::from_secs(3),
        };
        assert_eq!(rate.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            ProxyError::Tunnels(TunnelRefused::PerClient(2)).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
