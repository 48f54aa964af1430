//! TLS termination: a rustls `ServerConfig` per listener (certificates by SNI, ALPN, versions)
//! and the accept step, bounded by the handshake timeout, which returns facts, not behaviour.

pub mod certs;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{self, TlsVersion};

/// The first byte of every TLS connection: a handshake record (RFC 8446 §5.1).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Certificate(#[from] certs::Error),
    #[error("no protocol version left to offer")]
    Versions(#[source] rustls::Error),
    #[error("{}: {reason}", .path.display())]
    Bundle {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// The TLS side of one listener: its acceptor, and what it needs to reload certificates.
pub struct Terminator {
    pub acceptor: TlsAcceptor,
    settings: config::Tls,
    certificates: Arc<certs::Swappable>,
    /// Modification time and length of every certificate and key file at the last load.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Terminator {
    /// Loads the certificates and builds the server config. ring is the crypto provider: it
    /// builds with only a C compiler and is fast at ECDSA P-256, the handshakes that dominate.
    pub fn new(tls: &config::Tls, http2: bool) -> Result<Terminator, Error> {
        let stamps = stamps(tls);
        let resolver = load_resolver(tls)?;
        let certificates = Arc::new(certs::Swappable::new(resolver));
        let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(Error::Versions)?;
        let builder = match &tls.client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => builder.with_client_cert_verifier(client_verifier(auth, provider)?),
        };
        let mut config = builder.with_cert_resolver(certificates.clone());
        config.alpn_protocols = if http2 {
            vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
        } else {
            vec![ALPN_HTTP11.to_vec()]
        };
        Ok(Terminator {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            settings: tls.clone(),
            certificates,
            stamps: Mutex::new(stamps),
        })
    }

    /// Loads every certificate again and serves them from the next handshake on. On any
    /// error the previous certificates keep serving, and the error says which file failed.
    pub fn reload(&self) -> Result<(), Error> {
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = stamps(&self.settings);
        let resolver = load_resolver(&self.settings)?;
        self.certificates.swap(resolver);
        Ok(())
    }

    /// Whether a certificate or key file changed since the last load (or reload attempt).
    pub fn files_changed(&self) -> bool {
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != stamps(&self.settings)
    }

    pub fn watch_interval(&self) -> Duration {
        self.settings.watch_interval
    }
}

/// Verifies client certificates against the CA bundle of `auth`.
fn client_verifier(
    auth: &config::ClientAuth,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_bundle(&auth.ca)?);
    let ca_error = |reason: String| Error::Bundle {
        path: auth.ca.clone(),
        reason,
    };
    if added == 0 {
        return Err(ca_error("no usable CA certificate".to_owned()));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if auth.optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder.build().map_err(|err| ca_error(err.to_string()))
}

/// The names a verified client certificate carries (`DNS:…`, `URI:…`), comma-separated.
fn client_identity(connection: &rustls::ServerConnection) -> Option<String> {
    let leaf = connection.peer_certificates()?.first()?;
    let leaf = webpki::EndEntityCert::try_from(leaf).ok()?;
    let names: Vec<String> = leaf
        .valid_dns_names()
        .map(|n| format!("DNS:{n}"))
        .chain(leaf.valid_uri_names().map(|n| format!("URI:{n}")))
        .collect();
    (!names.is_empty()).then(|| names.join(","))
}

fn load_resolver(tls: &config::Tls) -> Result<certs::Resolver, Error> {
    let certificates = tls
        .certificates
        .iter()
        .map(certs::load)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(certs::Resolver::new(&certificates, tls.unknown_sni))
}

fn stamps(tls: &config::Tls) -> Vec<Option<(SystemTime, u64)>> {
    tls.certificates
        .iter()
        .flat_map(|files| [&files.cert, &files.key])
        .map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.modified().ok()?, metadata.len()))
        })
        .collect()
}

/// The client side towards `https://` upstream servers: verified against the configured CA
/// bundle or the system's roots, HTTP/1.1 by ALPN, an optional client certificate.
pub fn upstream_client_config(tls: &config::UpstreamTls) -> Result<Arc<ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(Error::Versions)?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca {
            Some(ca) => {
                let bundle = read_bundle(ca)?;
                roots.add_parsable_certificates(bundle);
                if roots.is_empty() {
                    return Err(Error::Bundle {
                        path: ca.clone(),
                        reason: "no usable CA certificate".to_owned(),
                    });
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let certificate = certs::load(files)?;
            builder
                .with_client_auth_cert(certificate.chain, certificate.private_key)
                .map_err(|err| Error::Bundle {
                    path: files.key.clone(),
                    reason: err.to_string(),
                })?
        }
    };
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

fn read_bundle(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bundle_error = |reason: String| Error::Bundle {
        path: path.to_owned(),
        reason,
    };
    CertificateDer::pem_file_iter(path)
        .map_err(|err| bundle_error(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bundle_error(err.to_string()))
}

/// `insecure_skip_verify`: signatures are still checked, the certificate is not.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the handshake established.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub sni: Option<String>,
    pub h2: bool,
    /// The verified client certificate's names (mTLS).
    pub client_identity: Option<String>,
}

#[derive(Debug)]
pub enum Accepted {
    Tls(Box<TlsStream<TcpStream>>, Facts),
    /// The client spoke plain HTTP to this TLS port; it deserves a readable answer.
    PlainHttp(TcpStream),
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a ClientHello")]
    Closed,
    #[error("not TLS (first byte {0:#04x})")]
    NotTls(u8),
    #[error("handshake failed")]
    Handshake(#[source] io::Error),
}

impl AcceptError {
    /// A short, stable name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            AcceptError::Timeout(_) => "timeout",
            AcceptError::Closed => "closed",
            AcceptError::NotTls(_) => "not_tls",
            AcceptError::Handshake(_) => "handshake",
        }
    }
}

/// Runs the handshake within `timeout`. Looks at the first byte first: plain HTTP on a TLS
/// port gets an answer instead of a TLS alert the client cannot show.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Result<Accepted, AcceptError> {
    let handshake = async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) => return Err(AcceptError::Closed),
            Ok(_) => {}
            Err(err) => return Err(AcceptError::Handshake(err)),
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            return if first[0].is_ascii_uppercase() {
                Ok(Accepted::PlainHttp(stream))
            } else {
                Err(AcceptError::NotTls(first[0]))
            };
        }
        let tls = acceptor
            .accept(stream)
            .await
            .map_err(AcceptError::Handshake)?;
        let connection = tls.get_ref().1;
        let facts = Facts {
            sni: connection.server_name().map(str::to_owned),
            h2: connection.alpn_protocol() == Some(ALPN_H2),
            client_identity: client_identity(connection),
        };
        Ok(Accepted::Tls(Box::new(tls), facts))
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .unwrap_or(Err(AcceptError::Timeout(timeout)))
}
