//! The foreign gateway's relay client: one question of the core ([`Question`]) becomes one
//! HTTPS request to the home of its realm, and its answer one [`Answer`].
//!
//! - The home is found by `[crossover.homes]` (pinned) or DNS SRV `_sxover._tcp.REALM`
//!   (RFC 2782 order; no SRV: the realm's own addresses on port 443). Private, loopback and
//!   link-local addresses are refused unless `[crossover] allow_private`.
//! - TLS: the home's certificate chain must verify against `[crossover] trusted_cas` for the
//!   **realm** as server name, and name the realm exactly (no wildcard), whatever target SRV
//!   gave; this gateway presents its client certificate (its domain).
//! - Everything (location, connection, handshake, request, answer) happens within the
//!   question's deadline; a home that does not answer costs this question only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::wire;
use crate::config::crossover::CrossoverSettings;
use crate::core::crossover::{Answer, Question};
use crate::transport::dns::Locator;
use gatehouse_auth::SaslParams;

/// The path of the relay on the home (docs/realm-crossover.md).
pub const PATH: &str = "/sxover/v1";
/// The SRV service of a realm's crossover service.
pub fn srv_name(realm: &str) -> String {
    format!("_sxover._tcp.{realm}")
}

/// The relay client (cheap to clone: shared TLS configuration and resolver).
#[derive(Clone)]
pub struct Relay {
    connector: TlsConnector,
    homes: Arc<std::collections::BTreeMap<String, SocketAddr>>,
    locator: Locator,
    allow_private: bool,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("homes", &self.homes)
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Whether an address is one a home may not have unless `allow_private` (a relay must not be
/// turned against the inside: loopback, private, link-local, unique-local, unspecified).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_private(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || (v6.segments()[0] & 0xfe00) == 0xfc00
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        },
    }
}

impl Relay {
    /// Loads the client certificate, its key and the anchors (a missing or bad file is an
    /// error naming it).
    pub fn new(settings: &CrossoverSettings, locator: Locator) -> std::io::Result<Relay> {
        let (certs, key) = crate::tls::cert_and_key(&settings.certificate, &settings.private_key)?;
        let roots = crate::tls::roots_from_pem_file(&settings.trusted_cas)?;
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| invalid(format!("crossover client certificate: {e}")))?;
        Ok(Relay {
            connector: TlsConnector::from(Arc::new(config)),
            homes: Arc::new(settings.homes.clone()),
            locator,
            allow_private: settings.allow_private,
        })
    }

    /// Asks the home; always answers by the question's deadline.
    pub async fn ask(&self, q: Question) -> Answer {
        let deadline = tokio::time::Instant::from_std(q.deadline);
        match tokio::time::timeout_at(deadline, self.ask_inner(&q)).await {
            Ok(answer) => answer,
            Err(_) => Answer::Failed("deadline"),
        }
    }

    async fn addresses(&self, realm: &str) -> Result<Vec<SocketAddr>, &'static str> {
        let found = match self.homes.get(realm) {
            Some(a) => vec![*a],
            None => self
                .locator
                .service(&srv_name(realm), realm, 443)
                .await
                .map_err(|_| "not_found")?,
        };
        let usable: Vec<SocketAddr> = found
            .into_iter()
            .filter(|a| self.allow_private || !is_private(a.ip()))
            .collect();
        if usable.is_empty() {
            return Err("private_address");
        }
        Ok(usable)
    }

    async fn ask_inner(&self, q: &Question) -> Answer {
        let addrs = match self.addresses(&q.realm).await {
            Ok(a) => a,
            Err(why) => return Answer::Failed(why),
        };
        let mut last = "unreachable";
        for addr in addrs {
            match self.post(addr, q).await {
                Ok(answer) => return answer,
                // The next address only when this one could not be reached; a home that
                // answered (even badly) is not asked twice.
                Err(Failure::Connect) => last = "unreachable",
                Err(Failure::Certificate) => return Answer::Failed("certificate"),
                Err(Failure::Protocol(why)) => return Answer::Failed(why),
            }
        }
        Answer::Failed(last)
    }

    async fn post(&self, addr: SocketAddr, q: &Question) -> Result<Answer, Failure> {
        let started = Instant::now();
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|_| Failure::Connect)?;
        let name = ServerName::try_from(q.realm.clone()).map_err(|_| Failure::Certificate)?;
        let tls = self.connector.connect(name, tcp).await.map_err(|e| {
            tracing::info!(realm = %q.realm, %addr, error = %e, "crossover home's TLS refused");
            Failure::Certificate
        })?;
        // The chain verified for the realm as a DNS name; RFC 5922 also wants it named
        // exactly, not by a wildcard.
        let exact = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .is_some_and(|c| super::names_exactly(c, &q.realm));
        if !exact {
            tracing::info!(realm = %q.realm, %addr, "crossover home's certificate does not name the realm exactly");
            return Err(Failure::Certificate);
        }
        let io = hyper_util::rt::TokioIo::new(tls);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|_| Failure::Protocol("http"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = hyper::Request::post(PATH)
            .header("Host", q.realm.as_str())
            .header("Authorization", q.params.emit())
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(wire::facts_json(
                &q.facts,
                Some(q.client),
            ))))
            .map_err(|_| Failure::Protocol("request"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| Failure::Protocol("http"))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let challenge = header("WWW-Authenticate");
        let info = header("Authentication-Info");
        let body = Limited::new(response.into_body(), wire::BODY_MAX)
            .collect()
            .await
            .map_err(|_| Failure::Protocol("body"))?
            .to_bytes();
        tracing::debug!(realm = %q.realm, status, ms = started.elapsed().as_millis() as u64, "crossover home answered");
        Ok(match status {
            401 => {
                let params = challenge
                    .as_deref()
                    .and_then(|c| SaslParams::parse(c).ok())
                    .ok_or(Failure::Protocol("challenge"))?;
                match (params.s2s, params.s2c) {
                    (Some(handle), Some(token)) if handle.len() <= 256 => {
                        Answer::Challenge { handle, token }
                    }
                    _ => return Err(Failure::Protocol("challenge")),
                }
            }
            200 => {
                let token = info
                    .as_deref()
                    .and_then(parse_info)
                    .and_then(|p| p.s2c)
                    .ok_or(Failure::Protocol("info"))?;
                let st =
                    wire::parse_statement(&body).map_err(|_| Failure::Protocol("statement"))?;
                Answer::Success {
                    identity: st.identity,
                    released_to: st.released_to,
                    key: st.key,
                    token,
                }
            }
            403 => Answer::Refused,
            429 => Answer::Failed("rate_limited"),
            _ => Answer::Failed("status"),
        })
    }
}

/// `Authentication-Info` in RFC 7615's form (auth-params, no scheme), or with the `SASL`
/// scheme some peers write.
pub fn parse_info(value: &str) -> Option<SaslParams> {
    SaslParams::parse_info(value)
}

enum Failure {
    Connect,
    Certificate,
    Protocol(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_known() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.1.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["192.0.2.7", "2001:db8::7", "8.8.8.8"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn authentication_info_in_both_forms() {
        let std_form = parse_info("s2c=\"AAEC\"").unwrap();
        assert_eq!(std_form.s2c, Some(vec![0, 1, 2]));
        let sasl_form = parse_info("SASL s2c=\"AAEC\", s2s=\"x\"").unwrap();
        assert_eq!(sasl_form.s2c, Some(vec![0, 1, 2]));
        // Found by the crossover_relay fuzz target: a multi-byte character across byte 5.
        assert!(parse_info("{\n\n\n\u{1e9}\0\0V=").is_none());
        // What the home and the admin API send: auth-params only, read back the same.
        let sent = SaslParams {
            s2c: Some(vec![0, 1, 2]),
            s2s: Some("x".into()),
            ..SaslParams::default()
        };
        let value = sent.emit_auth_params();
        assert!(!value.starts_with("SASL"), "{value}");
        let read = parse_info(&value).unwrap();
        assert_eq!((read.s2c, read.s2s), (sent.s2c, sent.s2s));
    }
}
