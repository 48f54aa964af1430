//! A throwaway PKI made at test time with rcgen (no committed keys): a CA, leaf certificates
//! for given names written as PEM files, and TLS clients that trust the CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{within, WAIT};

pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    dir: PathBuf,
}

/// PEM files of one leaf certificate.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsgate-it-pki-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the PKI folder");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsgate test CA");
        let ca = params.self_signed(&ca_key).expect("self-signed CA");
        Pki { ca, ca_key, dir }
    }

    /// A leaf for `names` (DNS names or IP literals), signed by the CA, as `stem.pem` and
    /// `stem.key` in the PKI folder.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Issued {
        self.issue_with(stem, names, |_| {})
    }

    /// A leaf that expired on 2020-01-01.
    pub fn issue_expired(&self, stem: &str, names: &[&str]) -> Issued {
        self.issue_with(stem, names, |params| {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        })
    }

    fn issue_with(
        &self,
        stem: &str,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Issued {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        adjust(&mut params);
        params.distinguished_name.push(DnType::CommonName, stem);
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("signed leaf");
        let issued = Issued {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write cert");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }

    /// Writes a new leaf for `names` over the files of `issued` (as an operator renewing a
    /// certificate would), returning the new certificate.
    pub fn reissue(&self, issued: &Issued, names: &[&str]) -> Issued {
        let stem = issued
            .cert
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let fresh = self.issue(&format!("{stem}-next"), names);
        std::fs::rename(&fresh.key, &issued.key).expect("replace key");
        std::fs::rename(&fresh.cert, &issued.cert).expect("replace cert");
        Issued {
            cert: issued.cert.clone(),
            key: issued.key.clone(),
            der: fresh.der,
        }
    }

    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        self.client_config_as(alpn, None)
    }

    /// A client that presents `identity` (a leaf of this PKI) when the server asks.
    pub fn client_config_as(
        &self,
        alpn: &[&[u8]],
        identity: Option<&Issued>,
    ) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.der().clone())
            .expect("CA is a valid root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some(issued) => builder
                .with_client_auth_cert(
                    vec![issued.der.clone()],
                    rustls::pki_types::PrivateKeyDer::from_pem_file(&issued.key).expect("key"),
                )
                .expect("client certificate"),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// The CA certificate as a PEM file (a client CA bundle).
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).expect("write CA");
        path
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to `addr` for `server_name` (an IP literal sends no SNI).
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let stream = within(WAIT, TcpStream::connect(addr)).await?;
    let name = ServerName::try_from(server_name.to_owned()).expect("a valid server name");
    within(WAIT, TlsConnector::from(config).connect(name, stream)).await
}

/// An HTTP/1.1 client over TLS to `addr` for `server_name`, trusting `pki`'s CA; the
/// connection is driven by a task of its own.
pub async fn http1_over_tls<B>(
    addr: SocketAddr,
    server_name: &str,
    pki: &Pki,
) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tls_connect(addr, server_name, pki.client_config(&[b"http/1.1"]))
        .await
        .expect("TLS handshake");
    let (sender, connection) = within(
        WAIT,
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .expect("HTTP/1 handshake");
    tokio::spawn(connection);
    sender
}

/// A `wss://` WebSocket to `url` through the TLS listener at `addr`, trusting `pki`'s CA.
pub async fn wss_connect(
    addr: SocketAddr,
    server_name: &str,
    pki: &Pki,
    url: &str,
) -> (
    tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let stream = tls_connect(addr, server_name, pki.client_config(&[b"http/1.1"]))
        .await
        .expect("TLS handshake");
    within(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("wss handshake")
}

/// The leaf certificate the server presented.
pub fn served_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .clone()
}

/// A TLS front on 127.0.0.1:0 for a plain backend at `to`: it terminates TLS with `issued`
/// (asking for a client certificate from `client_ca` when given) and relays the bytes.
pub async fn tls_front(
    issued: &Issued,
    to: SocketAddr,
    client_ca: Option<CertificateDer<'static>>,
) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).expect("CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(
            vec![issued.der.clone()],
            rustls::pki_types::PrivateKeyDer::from_pem_file(&issued.key).expect("key"),
        )
        .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = within(WAIT, tokio::net::TcpListener::bind("127.0.0.1:0"))
        .await
        .expect("front binds");
    let addr = listener.local_addr().expect("front address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut backend) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
            });
        }
    });
    addr
}
