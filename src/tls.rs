//! TLS for both kinds of connection (SQL and replication), with libpq's meaning of `sslmode` and
//! `sslrootcert`. tokio-postgres knows only `disable`, `prefer` and `require`, and refuses any
//! parameter it does not know; so a URL is read here first. The verification parameters are
//! taken out, tokio-postgres parses the rest, and the rustls verifier follows from them:
//!
//! | url                                        | certificate checked                  |
//! | ------------------------------------------ | ------------------------------------ |
//! | `prefer`, `require` (no root certificate)  | no (encrypted only, as libpq)        |
//! | `prefer`, `require` with `sslrootcert`     | signed by that CA (libpq does so too)|
//! | `verify-ca`                                | signed by a CA of `sslrootcert`      |
//! | `verify-full`, or `sslrootcert=system`     | signed, and names the url's host     |
//!
//! Without `sslrootcert`, libpq's default `~/.postgresql/root.crt` is used when it exists.

use std::error::Error;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection URL, read: tokio-postgres's config and how TLS checks the server.
pub struct Url {
    pub pg: tokio_postgres::Config,
    pub tls: Tls,
    /// The password file's line the password came from (the URL had none).
    pub password_from: Option<crate::pgpass::Source>,
}

/// How the server's certificate is checked (when TLS is used at all: see `pg.get_ssl_mode()`),
/// and the client certificate shown, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub verify: Verify,
    pub roots: Roots,
    /// `sslcert` and `sslkey`: PEM files of a certificate (chain) and its private key.
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Encrypted; the certificate is not checked (the handshake's signature is).
    Encrypt,
    /// Signed by a trusted CA; the name in it is not checked.
    Chain,
    /// Signed by a trusted CA and naming the host connected to.
    Full,
}

/// The CAs trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    None,
    /// A PEM file (`sslrootcert=/path`).
    File(PathBuf),
    /// The machine's trust store (`sslrootcert=system`, as libpq 16).
    System,
}

/// Read `url` (a `postgresql://` URL or `key=value` words), with libpq's defaults from the
/// environment: the operating system's user where it names none (so the SQL and replication
/// connections are one role's), and the password file's password where it has none.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let home_root = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
        .filter(|p| p.is_file());
    let mut u = parse_with(url, home_root)?;
    if u.pg.get_user().is_none() {
        if let Some(name) = crate::pgpass::os_user() {
            u.pg.user(name);
        }
    }
    if u.pg.get_password().is_none() {
        let host = match u.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.as_str(),
            _ => "localhost",
        };
        let user = u.pg.get_user().unwrap_or_default().to_string();
        let target = crate::pgpass::Target {
            host,
            port: u.pg.get_ports().first().copied().unwrap_or(5432),
            database: u.pg.get_dbname().unwrap_or(&user),
            user: &user,
        };
        if let Some((password, from)) = crate::pgpass::lookup(&target) {
            u.pg.password(password);
            u.password_from = Some(from);
        }
    }
    Ok(u)
}

/// [`parse_url`], with libpq's default root certificate (when it exists) given.
fn parse_with(url: &str, default_root: Option<PathBuf>) -> Result<Url, String> {
    let TlsParams {
        rest,
        mode,
        root,
        cert,
        key,
    } = take_tls_params(url)?;
    let client = match (cert, key) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        (None, None) => None,
        (Some(_), None) => {
            return Err(
                "sslcert is given without sslkey: add sslkey=/path/to/client.key \
                        (the private key of the client certificate)"
                    .into(),
            )
        }
        (None, Some(_)) => {
            return Err("sslkey is given without sslcert: add sslcert=/path/to/client.crt".into())
        }
    };
    let roots = match root.as_deref() {
        None | Some("") => default_root.map_or(Roots::None, Roots::File),
        Some("system") => Roots::System,
        Some(path) => Roots::File(PathBuf::from(path)),
    };
    let (verify, pg_mode) = match (mode.as_deref(), &roots) {
        (Some("verify-full"), _) | (None, Roots::System) => (Verify::Full, Some("require")),
        (Some(m), Roots::System) => {
            return Err(format!(
                "sslrootcert=system checks the host name, and sslmode={m} would not: \
                 use sslmode=verify-full or leave sslmode out"
            ))
        }
        (Some("verify-ca"), _) => (Verify::Chain, Some("require")),
        (Some("allow"), _) => {
            return Err(
                "sslmode=allow is not supported (it prefers no encryption): use prefer or require"
                    .into(),
            )
        }
        (Some(m @ ("disable" | "prefer" | "require")), Roots::File(_)) => (Verify::Chain, Some(m)),
        (Some(m @ ("disable" | "prefer" | "require")), Roots::None) => (Verify::Encrypt, Some(m)),
        (None, Roots::File(_)) => (Verify::Chain, None),
        (None, Roots::None) => (Verify::Encrypt, None),
        (Some(m), _) => {
            return Err(format!(
                "sslmode={m} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
        }
    };
    if verify != Verify::Encrypt && roots == Roots::None {
        return Err(format!(
            "sslmode={} checks the server's certificate, but no CA is given to check it \
             against: add sslrootcert=/path/to/ca.crt (the CA that signed the server's \
             certificate) or sslrootcert=system (the CAs this machine trusts)",
            mode.unwrap_or_default()
        ));
    }
    let rest = match (pg_mode, url_form(&rest).map(|a| params_at(a).is_some())) {
        (None, _) => rest,
        (Some(m), Some(true)) => format!("{rest}&sslmode={m}"),
        (Some(m), Some(false)) => format!("{rest}?sslmode={m}"),
        (Some(m), None) => format!("{rest} sslmode={m}"),
    };
    let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| match e.source() {
        Some(why) => format!("{e}: {why}"),
        None => e.to_string(),
    })?;
    Ok(Url {
        pg,
        tls: Tls {
            verify,
            roots,
            client,
        },
        password_from: None,
    })
}

/// The part of a `postgresql://` URL after the scheme; `None` for `key=value` words.
fn url_form(url: &str) -> Option<&str> {
    ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| url.strip_prefix(p))
}

/// Where a URL's parameters start, in the part after the scheme, as tokio-postgres reads it:
/// the credentials end at the first `@`, and the parameters start at the first `?` after them.
fn params_at(after_scheme: &str) -> Option<usize> {
    let creds = after_scheme.find('@').map_or(0, |i| i + 1);
    after_scheme[creds..].find('?').map(|q| creds + q)
}

/// A URL without the TLS parameters tokio-postgres does not know, and their values.
struct TlsParams {
    rest: String,
    mode: Option<String>,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

fn take_tls_params(url: &str) -> Result<TlsParams, String> {
    let (mut mode, mut root, mut cert, mut key) = (None, None, None, None);
    let mut take = |name: &str, value: &str| {
        let slot = match name {
            "sslmode" => &mut mode,
            "sslrootcert" => &mut root,
            "sslcert" => &mut cert,
            "sslkey" => &mut key,
            _ => return false,
        };
        *slot = Some(value.to_string());
        true
    };
    let rest = match url_form(url) {
        Some(after) => {
            // `&`-separated `key=value`, percent-encoded.
            match params_at(after) {
                None => url.to_string(),
                Some(q) => {
                    let at = url.len() - after.len() + q;
                    let mut kept = Vec::new();
                    for part in url[at + 1..].split('&') {
                        let (k, v) = part.split_once('=').unwrap_or((part, ""));
                        if !take(&decode(k)?, &decode(v)?) {
                            kept.push(part);
                        }
                    }
                    match kept.is_empty() {
                        true => url[..at].to_string(),
                        false => format!("{}?{}", &url[..at], kept.join("&")),
                    }
                }
            }
        }
        None => {
            let mut kept = Vec::new();
            for (k, v) in words(url)? {
                if !take(&k, &v) {
                    let v = v.replace('\\', "\\\\").replace('\'', "\\'");
                    kept.push(format!("{k}='{v}'"));
                }
            }
            kept.join(" ")
        }
    };
    Ok(TlsParams {
        rest,
        mode,
        root,
        cert,
        key,
    })
}

fn decode(s: &str) -> Result<String, String> {
    // The text is not repeated: it may be a password.
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|e| format!("a url parameter is not percent-encoded UTF-8 ({e})"))
}

/// The `key=value` pairs of a libpq keyword/value string, values unquoted and unescaped the way
/// tokio-postgres reads them (optionally single-quoted, backslash escapes).
fn words(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(format!(
                "expected `=` after `{key}` in the connection string"
            ));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let quoted = it.next_if_eq(&'\'').is_some();
        let mut value = String::new();
        loop {
            match it.next() {
                Some('\\') => value.extend(it.next()),
                Some('\'') if quoted => break,
                Some(c) if quoted || !c.is_whitespace() => value.push(c),
                None if quoted => return Err(format!("`{key}`'s quoted value is not closed")),
                _ => break,
            }
        }
        out.push((key, value));
    }
}

impl Tls {
    /// The rustls connector for these settings; reads the root certificates.
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let full = match self.verify {
            Verify::Encrypt => None,
            _ => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.root_store()?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?,
            ),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.verify, full) {
            (Verify::Full, Some(full)) => full,
            (_, chain) => Arc::new(Partial {
                provider: provider.clone(),
                chain,
            }),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client {
            None => config.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = pem_certificates(cert, "sslcert", "the client certificate")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!(
                        "sslkey {}: {e}; point sslkey at the unencrypted PEM private key of \
                         the client certificate",
                        key.display()
                    )
                })?;
                config
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn root_store(&self) -> Result<RootCertStore, String> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            Roots::File(path) => {
                let what = "the CA that signed the server's certificate";
                for cert in pem_certificates(path, "sslrootcert", what)? {
                    store.add(cert).map_err(|e| {
                        format!("sslrootcert {}: {e}; point it at {what}", path.display())
                    })?;
                }
            }
            Roots::System => {
                // Certificates the machine lists but rustls cannot use are skipped, as a
                // browser would; only none at all is an error.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = store.add(cert);
                }
                if store.is_empty() {
                    return Err("sslrootcert=system, but this machine has no trusted CA \
                                certificates (install the ca-certificates package)"
                        .into());
                }
            }
            Roots::None => return Err("no CA certificate to check the server against".into()),
        }
        Ok(store)
    }
}

/// The certificates in PEM file `path`, given as URL parameter `param` for `what`: at least one.
fn pem_certificates(
    path: &std::path::Path,
    param: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |e: &dyn std::fmt::Display| {
        format!(
            "{param} {}: {e}; point {param} at the PEM file of {what}",
            path.display()
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"holds no certificate"));
    }
    Ok(certs)
}

/// What is wrong with a certificate, in words with the fix, when `e` (or an error it wraps) is
/// the server's certificate rejected by our verifier, or ours rejected by the server.
pub fn certificate_problem(e: &(dyn Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired,
        )) = tls
        {
            // Alerts about certificates come from the server checking ours.
            return Some(
                "the server rejected the client certificate (sslcert): give one signed by a CA \
                 the server trusts (its ssl_ca_file) and still valid"
                    .into(),
            );
        }
        if let Some(rustls::Error::InvalidCertificate(c)) = tls {
            return Some(match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    "the server's certificate is not signed by a CA in sslrootcert; set \
                     sslrootcert to the certificate of the CA that issued it"
                        .to_string()
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "the server's certificate does not name the host in the url \
                     (sslmode=verify-full checks it); connect by a name the certificate holds, \
                     or use sslmode=verify-ca to check the CA only"
                        .to_string()
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is outside its validity period; renew it on the \
                     server (or check this machine's clock)"
                        .to_string()
                }
                other => format!("the server's certificate was rejected: {other:?}"),
            });
        }
        cur = err.source();
    }
    None
}

/// The server's certificate as `Verify` says: not at all (libpq's `prefer`/`require` without a
/// root certificate: encrypted, and the handshake's signature still checked), or its chain only
/// (`verify-ca`). `verify-full` uses rustls's own verifier.
#[derive(Debug)]
struct Partial {
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// `Some` for `verify-ca`: the full check, whose name mismatch is then forgiven. rustls checks
    /// the chain before the name, so a name mismatch means the chain was good.
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Partial {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode;

    fn read(url: &str) -> Url {
        parse_with(url, None).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    /// The error reading `url` (with no default root certificate).
    fn refused(url: &str) -> String {
        parse_with(url, None)
            .err()
            .unwrap_or_else(|| panic!("{url} was accepted"))
    }

    fn file(p: &str) -> Roots {
        Roots::File(PathBuf::from(p))
    }

    #[test]
    fn verify_modes_are_taken_out_of_a_url_and_the_rest_reaches_tokio_postgres() {
        // Percent-encoded path, a password with `?` (before the `@`), other parameters kept.
        let u = read(
            "postgresql://app:p?w%26@db.example.com:6543/postgres?application_name=x\
             &sslmode=verify-full&sslrootcert=%2Ftmp%2Fca%20dir%2Fca.crt&connect_timeout=7",
        );
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!(u.pg.get_password(), Some(&b"p?w&"[..]));
        assert_eq!(u.pg.get_application_name(), Some("x"));
        assert_eq!(u.pg.get_dbname(), Some("postgres"));
        assert_eq!(
            u.pg.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert_eq!(u.tls.verify, Verify::Full);
        assert_eq!(u.tls.roots, file("/tmp/ca dir/ca.crt"));

        // A `?` in the password, and no parameter left once ours are taken out.
        let u = read("postgresql://app:a?b@h/db?sslmode=verify-full&sslrootcert=/c.pem");
        assert_eq!(u.pg.get_password(), Some(&b"a?b"[..]));
        assert_eq!(u.pg.get_dbname(), Some("db"));
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Require);

        let u = read("postgres://app@h/db?sslrootcert=/c.pem&sslmode=verify-ca");
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!((u.tls.verify, u.tls.roots), (Verify::Chain, file("/c.pem")));

        // Nothing of ours: the url as it was.
        let u = read("postgresql://app@h:5433/db");
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(u.pg.get_ports(), &[5433]);
        assert_eq!((u.tls.verify, u.tls.roots), (Verify::Encrypt, Roots::None));
        let u = read("postgresql://app@h/db?sslmode=disable");
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn a_root_certificate_makes_prefer_and_require_check_the_ca_as_libpq_does() {
        let u = read("postgresql://h/db?sslmode=require&sslrootcert=/ca.crt");
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!(u.tls.verify, Verify::Chain);
        let u = read("postgresql://h/db?sslmode=require");
        assert_eq!(u.tls.verify, Verify::Encrypt);
        // libpq's default ~/.postgresql/root.crt, when it exists.
        let u = parse_with("postgresql://h/db", Some(PathBuf::from("/home/x/root.crt"))).unwrap();
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(
            (u.tls.verify, u.tls.roots),
            (Verify::Chain, file("/home/x/root.crt"))
        );
        let u = parse_with(
            "postgresql://h/db?sslmode=verify-full",
            Some(PathBuf::from("/home/x/root.crt")),
        )
        .unwrap();
        assert_eq!(u.tls.verify, Verify::Full);
    }

    #[test]
    fn sslrootcert_system_means_verify_full_and_refuses_a_weaker_mode() {
        let u = read("postgresql://h/db?sslrootcert=system");
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!((u.tls.verify, u.tls.roots), (Verify::Full, Roots::System));
        let e = refused("postgresql://h/db?sslrootcert=system&sslmode=require");
        assert!(
            e.contains("sslmode=require would not") && e.contains("verify-full"),
            "{e}"
        );
    }

    #[test]
    fn a_verify_mode_without_a_ca_or_an_unknown_mode_is_an_error_saying_what_to_set() {
        let e = refused("postgresql://h/db?sslmode=verify-full");
        assert!(
            e.contains("sslmode=verify-full") && e.contains("add sslrootcert=/path/to/ca.crt"),
            "{e}"
        );
        let e = refused("postgresql://h/db?sslmode=allow");
        assert!(e.contains("use prefer or require"), "{e}");
        let e = refused("postgresql://h/db?sslmode=verify_full");
        assert!(e.contains("not one of disable, prefer"), "{e}");
        // tokio-postgres's own errors still come through.
        let e = refused("postgresql://h/db?sslmod=require");
        assert!(e.contains("sslmod"), "{e}");
    }

    #[test]
    fn a_client_certificate_needs_both_files() {
        let u =
            read("postgresql://h/db?sslcert=/c/client.crt&sslkey=/c/client.key&sslmode=require");
        assert_eq!(
            u.tls.client,
            Some((
                PathBuf::from("/c/client.crt"),
                PathBuf::from("/c/client.key")
            ))
        );
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Require);
        let e = refused("postgresql://h/db?sslcert=/c/client.crt");
        assert!(e.contains("add sslkey="), "{e}");
        let e = refused("host=h sslkey=/c/client.key");
        assert!(e.contains("add sslcert="), "{e}");
    }

    #[test]
    fn keyword_value_strings_are_read_like_urls() {
        let u = read(
            r"host=db.example.com port = 6543 password='a b\'c' sslmode=verify-full  sslrootcert='/x y/ca.crt' dbname=d\ e",
        );
        assert_eq!(u.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!(u.pg.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(u.pg.get_dbname(), Some("d e"));
        assert_eq!(u.pg.get_ports(), &[6543]);
        assert_eq!(
            (u.tls.verify, u.tls.roots),
            (Verify::Full, file("/x y/ca.crt"))
        );
        let e = refused("host=h password='open");
        assert!(e.contains("not closed"), "{e}");
        // A bad parameter is named, never repeated: it may be a password.
        let e = refused("postgresql://u@h/db?password=s3cr%FFt");
        assert!(
            e.contains("not percent-encoded") && !e.contains("s3cr"),
            "{e}"
        );
    }

    #[test]
    fn an_unreadable_or_empty_root_file_is_an_error_naming_it() {
        let tls = |p: &str| Tls {
            verify: Verify::Full,
            roots: file(p),
            client: None,
        };
        let e = tls("/nonexistent/ca.crt").connector().err().unwrap();
        assert!(
            e.contains("sslrootcert /nonexistent/ca.crt") && e.contains("point sslrootcert at"),
            "{e}"
        );
        let empty = std::env::temp_dir().join(format!("tandem-empty-{}.crt", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = tls(empty.to_str().unwrap()).connector().err().unwrap();
        std::fs::remove_file(&empty).unwrap();
        assert!(e.contains("holds no certificate"), "{e}");
        assert!(Tls {
            verify: Verify::Encrypt,
            roots: Roots::None,
            client: None,
        }
        .connector()
        .is_ok());
    }
}
