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
    #[error("the certificate in {} expired (not after {not_after} UTC)", .path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("the certificate in {} is not valid yet (not before {not_before} UTC)", .path.display())]
    NotYetValid { path: PathBuf, not_before: String },
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
    check_dates(&chain[0], &files.cert)?;
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

/// Refuses a leaf outside its validity period: serving it would fail every handshake.
fn check_dates(leaf: &CertificateDer<'_>, path: &Path) -> Result<(), Error> {
    let Some((not_before, not_after)) = validity(leaf) else {
        return Ok(()); // webpki parsed it; clients will judge the dates themselves.
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now > not_after {
        return Err(Error::Expired {
            path: path.to_owned(),
            not_after: format_utc(not_after),
        });
    }
    if now < not_before {
        return Err(Error::NotYetValid {
            path: path.to_owned(),
            not_before: format_utc(not_before),
        });
    }
    Ok(())
}

/// `2026-11-25 13:05:00` from Unix seconds (civil_from_days, the inverse of the above).
fn format_utc(seconds: i64) -> String {
    let (days, secs) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
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

/// The validity period of a DER certificate, as Unix seconds (RFC 5280 §4.1.2.5). webpki only
/// checks dates while verifying a chain, so a server checking its own certificate reads them.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (tbs, _) = der_element(certificate, 0x30)?;
    let mut rest = tbs;
    // [0] version is optional; serialNumber, signature and issuer come before validity.
    if rest.first() == Some(&0xA0) {
        rest = der_skip(rest)?;
    }
    for _ in 0..3 {
        rest = der_skip(rest)?;
    }
    let (validity, _) = der_element(rest, 0x30)?;
    let (not_before, after) = der_time(validity)?;
    let (not_after, _) = der_time(after)?;
    Some((not_before, not_after))
}

/// The content of the element at the start of `der` if its tag is `tag`, and what follows.
fn der_element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *der.first()? != tag {
        return None;
    }
    let (len, header) = match *der.get(1)? {
        short @ 0..=0x7f => (usize::from(short), 2),
        long => {
            let bytes = usize::from(long & 0x7f);
            if bytes == 0 || bytes > 4 {
                return None;
            }
            let len = der
                .get(2..2 + bytes)?
                .iter()
                .fold(0usize, |n, b| n << 8 | usize::from(*b));
            (len, 2 + bytes)
        }
    };
    let content = der.get(header..header + len)?;
    Some((content, &der[header + len..]))
}

fn der_skip(der: &[u8]) -> Option<&[u8]> {
    der_element(der, *der.first()?).map(|(_, rest)| rest)
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn der_time(der: &[u8]) -> Option<(i64, &[u8])> {
    let tag = *der.first()?;
    let (text, rest) = der_element(der, tag)?;
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest_text) = match tag {
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest_text.get(i..i + 2)?.parse().ok() };
    let (month, day) = (field(0)?, field(2)?);
    let seconds = field(4)? * 3600 + field(6)? * 60 + field(8)?;
    Some((days_from_civil(year, month, day) * 86_400 + seconds, rest))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_back() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(20_782 * 86_400 + 3661), "2026-11-25 01:01:01");
        assert_eq!(
            format_utc(days_from_civil(2000, 2, 29) * 86_400),
            "2000-02-29 00:00:00"
        );
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 25), 20_782);
    }

    #[test]
    fn reads_both_time_forms() {
        let utc = [
            0x17, 13, b'2', b'6', b'1', b'1', b'2', b'5', b'0', b'0', b'0', b'0', b'0', b'1', b'Z',
        ];
        assert_eq!(der_time(&utc).map(|(t, _)| t), Some(20_782 * 86_400 + 1));
        let generalized = [
            0x18, 15, b'2', b'0', b'5', b'0', b'0', b'1', b'0', b'1', b'0', b'0', b'0', b'0', b'0',
            b'0', b'Z',
        ];
        assert_eq!(
            der_time(&generalized).map(|(t, _)| t),
            Some(days_from_civil(2050, 1, 1) * 86_400)
        );
    }
}
