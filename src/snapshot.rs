//! One configuration as the running gateway reads it: routes, upstream groups, timeouts and
//! each listener's policy. Immutable once published; every request loads the current one once,
//! and keeps it to its end. A reload builds the next snapshot from the previous one, so that
//! what stays (a server's pool and counters, a route's stats) is carried over by `Arc`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Uri};

use crate::config::{self, CidrSet, Config, Timeouts};
use crate::router::Router;
use crate::upstream::{self, UpstreamGroup};

/// The snapshot in force, swapped whole by a reload; loading it takes no lock.
pub type Current = Arc<ArcSwap<Snapshot>>;

#[derive(Debug)]
pub struct Snapshot {
    pub router: Router,
    pub upstreams: Vec<UpstreamGroup>,
    pub timeouts: Timeouts,
    /// The limits the (longer-lived) client limiter applies.
    pub per_client: config::PerClient,
    pub access_log: bool,
    /// By listener name.
    policies: Vec<(String, Arc<ListenerPolicy>)>,
}

impl Snapshot {
    /// `previous`: the snapshot being replaced, whose servers and route stats carry over where
    /// the new config keeps them.
    pub fn build(
        config: &Config,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, upstream::SetupError> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|upstream| {
                let before = previous.and_then(|p| p.upstream(&upstream.name));
                UpstreamGroup::new(upstream, before, config.reload.close_spread)
            })
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            router: Router::new(&config.routes, previous.map(|p| &p.router)),
            upstreams,
            timeouts: config.timeouts,
            per_client: config.limits.per_client,
            access_log: config.log.access,
            policies: config
                .listeners
                .iter()
                .map(|listener| {
                    (
                        listener.name.clone(),
                        Arc::new(ListenerPolicy::new(listener)),
                    )
                })
                .collect(),
        })
    }

    /// Starts the upstreams' active health checks (needs a Tokio runtime); a snapshot that is
    /// only validated never checks anyone.
    pub fn start_health_checks(&self) {
        self.upstreams
            .iter()
            .for_each(UpstreamGroup::start_health_checks);
    }

    /// The snapshot was replaced: its successor checks the servers now.
    pub fn stop_health_checks(&self) {
        self.upstreams
            .iter()
            .for_each(UpstreamGroup::stop_health_checks);
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamGroup> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }

    /// The policy of the listener called `name`. A listener removed by a reload has none: its
    /// connections are draining and get the empty policy.
    pub fn policy(&self, listener: &str) -> &ListenerPolicy {
        static NONE: ListenerPolicy = ListenerPolicy {
            redirect: None,
            hsts: None,
            client_identity_header: None,
            trusted_proxies: CidrSet::new(Vec::new()),
        };
        self.policies
            .iter()
            .find(|(name, _)| name == listener)
            .map_or(&NONE, |(_, policy)| policy)
    }
}

/// What a listener does to every request besides routing it.
#[derive(Debug, Default)]
pub struct ListenerPolicy {
    pub redirect: Option<HttpsRedirect>,
    /// Added to every response (`Strict-Transport-Security`).
    pub hsts: Option<HeaderValue>,
    /// Carries the client certificate's identity upstream; a client's own is removed.
    pub client_identity_header: Option<HeaderName>,
    /// Peers whose forwarding headers are kept, and who name the client by them.
    pub trusted_proxies: CidrSet,
}

impl ListenerPolicy {
    fn new(listener: &config::Listener) -> ListenerPolicy {
        let tls = listener.tls.as_ref();
        ListenerPolicy {
            redirect: listener.redirect_https.as_ref().map(|r| HttpsRedirect {
                port: r.port,
                except: r.except.clone(),
            }),
            hsts: tls.and_then(|tls| tls.hsts.clone()),
            client_identity_header: tls
                .and_then(|tls| tls.client_auth.as_ref()?.identity_header.clone()),
            trusted_proxies: listener.trusted_proxies.clone(),
        }
    }
}

/// Answer with a permanent redirect to HTTPS, except under some path prefixes (ACME http-01
/// challenges must reach a backend over plain HTTP).
#[derive(Debug, Clone)]
pub struct HttpsRedirect {
    pub port: u16,
    pub except: Vec<String>,
}

impl HttpsRedirect {
    pub fn exempts(&self, path: &str) -> bool {
        self.except
            .iter()
            .any(|prefix| path.starts_with(prefix.as_str()))
    }

    /// Same host (without its port) and target; the port only when it is not 443.
    pub fn location(&self, host: &str, uri: &Uri) -> String {
        let host = crate::router::host_without_port(host);
        let target = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        match self.port {
            443 => format!("https://{host}{target}"),
            port => format!("https://{host}:{port}{target}"),
        }
    }
}
