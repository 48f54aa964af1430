//! Certificates: a PEM chain and key, loaded with the checks an operator needs before serving,
//! and the SNI resolver (exact name, then the longest wildcard, then the default).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertificateFiles, UnknownSni};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read certificates from {}", .path.display())]
    ReadCertificates {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("cannot read a private key from {}", .path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("unsupported private key in {}", .path.display())]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the key in {} does not match the certificate in {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate in {} cannot be parsed", .path.display())]
    InvalidCertificate {
        path: PathBuf,
        #[source]
        source: webpki::Error,
    },
}

/// A certificate ready to serve, with the DNS names it is valid for (lowercase; wildcards
/// as `*.example.com`).
pub struct Certificate {
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
    /// The chain and key as read, for presenting as a client.
    pub chain: Vec<CertificateDer<'static>>,
    pub private_key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("names", &self.names)
            .finish()
    }
}

pub fn load(files: &CertificateFiles) -> Result<Certificate, Error> {
    let chain = read_chain(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| Error::ReadKey {
        path: files.key.clone(),
        source,
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|source| {
        Error::UnsupportedKey {
            path: files.key.clone(),
            source,
        }
    })?;
    let names = {
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|source| {
            Error::InvalidCertificate {
                path: files.cert.clone(),
                source,
            }
        })?;
        leaf.valid_dns_names()
            .map(str::to_ascii_lowercase)
            .collect()
    };
    let certified = CertifiedKey::new(chain.clone(), signing_key);
    if certified.keys_match().is_err() {
        return Err(Error::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        });
    }
    Ok(Certificate {
        names,
        key: Arc::new(certified),
        chain,
        private_key: key,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let read_error = |source| Error::ReadCertificates {
        path: path.to_owned(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if chain.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// Picks the certificate for a ClientHello by its SNI.
#[derive(Debug)]
pub struct Resolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored by its suffix `.example.com`.
    wildcards: HashMap<String, Arc<CertifiedKey>>,
    /// For clients without SNI or with an unknown name; `None` refuses them.
    default: Option<Arc<CertifiedKey>>,
}

impl Resolver {
    /// The first certificate is the default; a name in two certificates goes to the first.
    pub fn new(certificates: &[Certificate], unknown_sni: UnknownSni) -> Resolver {
        let mut exact = HashMap::new();
        let mut wildcards = HashMap::new();
        for certificate in certificates {
            for name in &certificate.names {
                let (table, key) = match name.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => (&mut wildcards, suffix),
                    _ => (&mut exact, name.as_str()),
                };
                table
                    .entry(key.to_owned())
                    .or_insert_with(|| certificate.key.clone());
            }
        }
        let default = match unknown_sni {
            UnknownSni::Default => certificates.first().map(|c| c.key.clone()),
            UnknownSni::Refuse => None,
        };
        Resolver {
            exact,
            wildcards,
            default,
        }
    }

    /// The certificate for `server_name`; a wildcard covers exactly one more label (RFC 6125).
    pub fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        let wildcard = name
            .find('.')
            .and_then(|dot| self.wildcards.get(&name[dot..]).cloned());
        wildcard.or_else(|| self.default.clone())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(client_hello.server_name())
    }
}

/// The resolver a listener serves from. A reload swaps what it holds; connections already
/// established keep the certificate they were given.
#[derive(Debug)]
pub struct Swappable(RwLock<Arc<Resolver>>);

impl Swappable {
    pub fn new(resolver: Resolver) -> Swappable {
        Swappable(RwLock::new(Arc::new(resolver)))
    }

    pub fn swap(&self, resolver: Resolver) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(resolver);
    }

    fn current(&self) -> Arc<Resolver> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for Swappable {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().lookup(client_hello.server_name())
    }
}
