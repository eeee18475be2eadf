//! TLS with rustls (ring provider only): the server side for `tls` listeners and the
//! client side for `sips:` next hops.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::Config;

/// The process's single crypto provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trust anchors of a PEM file (refused when it holds none).
pub fn roots_from_pem_file(path: &std::path::Path) -> io::Result<rustls::RootCertStore> {
    let bad = |e: &dyn std::fmt::Display| invalid(format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate"));
    }
    Ok(roots)
}

/// A certificate chain and its private key from PEM files (an error names the file at fault).
pub fn cert_and_key(
    certificate: &std::path::Path,
    private_key: &std::path::Path,
) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = CertificateDer::pem_file_iter(certificate)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("{}: {e}", certificate.display())))?;
    let key = PrivateKeyDer::from_pem_file(private_key)
        .map_err(|e| invalid(format!("{}: {e}", private_key.display())))?;
    Ok((certs, key))
}

/// A client configuration that verifies servers against `roots`.
pub fn client_config(roots: rustls::RootCertStore) -> io::Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// TLS configuration for both directions, built once at start.
#[derive(Clone, Default)]
pub struct TlsContext {
    acceptor: Option<TlsAcceptor>,
    connector: Option<TlsConnector>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("server", &self.acceptor.is_some())
            .field("client", &self.connector.is_some())
            .finish()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl TlsContext {
    pub fn from_config(cfg: &Config) -> io::Result<TlsContext> {
        let Some(files) = &cfg.tls else {
            return Ok(TlsContext::default());
        };
        let (certs, key) = cert_and_key(&files.certificate, &files.private_key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                // Client certificates are optional (SCRAM callers have none) but, when
                // presented, verified: their identity is what EXTERNAL authenticates, and
                // their domains name a peer gateway (a federated partner's).
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots_from_pem_file(ca)?),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid(format!("client_ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let server = builder
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| invalid(format!("TLS certificate/key: {e}")))?;
        let connector = match &files.ca {
            None => None,
            Some(ca) => {
                // Outbound, the gateway presents its own certificate: a partner's gateway that
                // asks for client certificates learns it is talking to our domain's gateway
                // (federation: our callers' crossover failures then count at their home only).
                let client = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| invalid(e.to_string()))?
                    .with_root_certificates(roots_from_pem_file(ca)?)
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| invalid(format!("TLS certificate/key: {e}")))?;
                Some(TlsConnector::from(Arc::new(client)))
            }
        };
        Ok(TlsContext {
            acceptor: Some(TlsAcceptor::from(Arc::new(server))),
            connector,
        })
    }

    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.acceptor.clone()
    }

    pub fn connector(&self) -> Option<TlsConnector> {
        self.connector.clone()
    }
}

/// The name to verify the next hop's certificate against: its host name, else its address.
pub fn server_name(name: Option<&str>, addr: SocketAddr) -> ServerName<'static> {
    name.and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
}

/// RFC 9266 `tls-exporter` channel-binding data of a server connection (TLS 1.3; for TLS 1.2
/// the exporter is only safe with extended master secret, which rustls always uses).
pub fn channel_binding(conn: &rustls::ServerConnection) -> gatehouse_auth::TlsInfo {
    let mut exporter = vec![0u8; 32];
    if conn
        .export_keying_material(&mut exporter[..], b"EXPORTER-Channel-Binding", None)
        .is_err()
    {
        exporter.clear();
    }
    let peer = conn.peer_certificates().and_then(|c| c.first());
    gatehouse_auth::TlsInfo {
        exporter,
        peer_identity: peer.and_then(|c| certificate_identity(c)),
        peer_domains: peer
            .map(crate::crossover::certificate_domains)
            .unwrap_or_default(),
    }
}

/// The identity of a verified client certificate: its subject common name, else its first
/// DNS name. This is the SASL EXTERNAL identity, looked up as a username in the store.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Some(cn) = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    x.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
    })
}
