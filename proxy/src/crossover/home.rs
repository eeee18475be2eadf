//! The home side: an HTTPS service (`[crossover.home] listen`) that authenticates this
//! gateway's users for foreign gateways (docs/realm-crossover.md).
//!
//! Mutual TLS: the service's certificate is the `[tls]` one (it must name the realm); a
//! client certificate verified against `[crossover] trusted_cas` is required, and its domains
//! are who is asking. Then, per request: the domain must be allowed
//! (`foreign_domains`), under its rate (`rate_per_domain`, token bucket, burst 4x); the
//! HTTP-SASL round runs in the sans-IO [`XoverHome`] (SCRAM with the store's verifiers, the
//! same lockout settings as SIP, per user and per caller — the `client` address the relaying
//! gateway reports, or for our own callers going out (federation) the address our gateway saw
//! them at, never the relaying gateway's own address, which all of its callers share); every key
//! released is logged (foreign domain, user, a hash of the Call-ID) and counted. No lock is held
//! across an await.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_auth::xover::{
    HomeFailure, HomeKey, HomeKeys, HomeOutcome, HomeReason, Relayed, XoverHome, MECHANISM,
};
use gatehouse_auth::{Mechanism, SaslParams, SaslServer, Secret, ServerSettings};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use sha2::Digest;

use super::wire;
use crate::config::crossover::HomeSettings;
use crate::core::lockout::Lockout;
use crate::core::outward::OutwardCalls;
use crate::core::persist::Credentials;

/// Foreign domains whose rate is tracked at once (verified certificates only reach here).
const RATE_DOMAINS_MAX: usize = 4096;
/// Entries of the home's lockout table.
const LOCKOUT_CAPACITY: usize = 10_000;

/// Reads a home key file: the 32 private bytes in base64 on one line.
pub fn read_key(path: &std::path::Path) -> std::io::Result<HomeKey> {
    use base64::Engine;
    let text = std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: not a crossover key (base64 of 32 bytes)",
                    path.display()
                ),
            )
        })?;
    HomeKey::from_private(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// The realm's key pairs from the settings (current first).
pub fn load_keys(settings: &HomeSettings, realm: &str) -> std::io::Result<HomeKeys> {
    let mut keys = vec![read_key(&settings.key_file)?];
    if let Some(prev) = &settings.previous_key_file {
        keys.push(read_key(prev)?);
    }
    Ok(HomeKeys {
        realm: realm.to_owned(),
        keys,
    })
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The home service's shared state.
pub struct HomeService {
    home: Mutex<XoverHome>,
    credentials: Mutex<Arc<Credentials>>,
    lockout: Mutex<Lockout>,
    rates: Mutex<HashMap<String, Bucket>>,
    settings: HomeSettings,
    realm: String,
    metrics: Arc<crate::metrics::Metrics>,
    /// Federation: the calls our SIP core sent to other domains for our own callers.
    outward: Arc<OutwardCalls>,
}

impl std::fmt::Debug for HomeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HomeService")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

impl HomeService {
    pub fn new(
        settings: &HomeSettings,
        auth: &crate::config::AuthSettings,
        secret: [u8; 32],
        credentials: Credentials,
        metrics: Arc<crate::metrics::Metrics>,
        outward: Arc<OutwardCalls>,
    ) -> std::io::Result<HomeService> {
        let keys = load_keys(settings, &auth.realm)?;
        let server = SaslServer::new(ServerSettings {
            realm: auth.realm.clone(),
            mechanisms: vec![Mechanism::ScramSha256],
            ttl: Duration::from_secs(30),
            max_pending: settings.max_pending,
            max_pending_per_source: settings.max_pending,
            iterations: auth.iterations,
            // The same fake verifiers as the SIP side: an unknown user looks like a known one.
            secret: Secret::new(secret),
            // The I/O side: the handle generator's seed comes from the operating system.
            seed: Secret::new(rand::random()),
        });
        tracing::info!(
            realm = %auth.realm,
            key = %base64::Engine::encode(&base64::engine::general_purpose::STANDARD, keys.keys[0].public()),
            "crossover home service: callers seal to this public key"
        );
        Ok(HomeService {
            home: Mutex::new(XoverHome::new(
                keys,
                server,
                settings.max_pending,
                Duration::from_secs(30),
            )),
            credentials: Mutex::new(Arc::new(credentials)),
            lockout: Mutex::new(Lockout::new(
                auth.failures_before_lockout,
                auth.failure_window,
                auth.lockout,
                LOCKOUT_CAPACITY,
            )),
            rates: Mutex::new(HashMap::new()),
            settings: settings.clone(),
            realm: auth.realm.clone(),
            metrics,
            outward,
        })
    }

    /// The store's users changed.
    pub fn set_credentials(&self, credentials: Credentials) {
        if let Ok(mut c) = self.credentials.lock() {
            *c = Arc::new(credentials);
        }
    }

    /// Re-reads the key files (a rotation: the new key in `key_file`, the old one in
    /// `previous_key_file`); on error the keys in force stay.
    pub fn reload_keys(&self) -> std::io::Result<()> {
        let keys = load_keys(&self.settings, &self.realm)?;
        if let Ok(mut h) = self.home.lock() {
            h.set_keys(keys);
        }
        Ok(())
    }

    /// The TLS acceptor: the `[tls]` certificate, client certificates required.
    pub fn acceptor(
        &self,
        tls: &crate::config::TlsFiles,
    ) -> std::io::Result<tokio_rustls::TlsAcceptor> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let (certs, key) = crate::tls::cert_and_key(&tls.certificate, &tls.private_key)?;
        if !certs
            .first()
            .is_some_and(|c| super::names_exactly(c, &self.realm))
        {
            return Err(invalid(format!(
                "{}: the crossover service's certificate must name the realm {} (a DNS or sip: URI subject alternative name)",
                tls.certificate.display(),
                self.realm
            )));
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(crate::tls::roots_from_pem_file(&self.settings.trusted_cas)?),
            crate::tls::provider(),
        )
        .build()
        .map_err(|e| invalid(format!("crossover.trusted_cas: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| invalid(format!("TLS certificate/key: {e}")))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .crossover
            .with_label_values(&["home", outcome])
            .inc();
    }

    /// Takes a token from `domain`'s bucket.
    fn admit_rate(&self, domain: &str, now: Instant) -> bool {
        let Ok(mut rates) = self.rates.lock() else {
            return false;
        };
        let rate = f64::from(self.settings.rate_per_domain);
        let burst = rate * 4.0;
        if rates.len() >= RATE_DOMAINS_MAX && !rates.contains_key(domain) {
            // Full of domains: those whose buckets are full again are forgotten.
            rates.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if rates.len() >= RATE_DOMAINS_MAX {
                return false;
            }
        }
        let b = rates.entry(domain.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// One relayed round (everything after TLS): the response to send.
    fn round(
        &self,
        authorization: Option<&str>,
        body: &[u8],
        domains: &[String],
        source: IpAddr,
    ) -> Response<Full<Bytes>> {
        let now = Instant::now();
        let allowed: Vec<String> = domains
            .iter()
            .filter(|d| self.settings.foreign_domains.admits(d))
            .cloned()
            .collect();
        let Some(first) = allowed.first() else {
            self.count("domain_not_allowed");
            tracing::info!(?domains, %source, "crossover request from a domain not allowed");
            return plain(StatusCode::FORBIDDEN, "");
        };
        if !self.admit_rate(first, now) {
            self.count("rate_limited");
            return plain(StatusCode::TOO_MANY_REQUESTS, "");
        }
        let Some(params) = authorization.and_then(|a| SaslParams::parse(a).ok()) else {
            self.count("malformed");
            return plain(StatusCode::BAD_REQUEST, "SASL Authorization expected");
        };
        let (mut facts, reported) = match wire::parse_facts(body) {
            Ok(f) => f,
            Err(why) => {
                self.count("malformed");
                return plain(StatusCode::BAD_REQUEST, why);
            }
        };
        // Whom the lockout counts: the caller as the relaying gateway saw it, not the gateway
        // (all of a partner's callers share its address: counting that would let anyone
        // guessing through the partner lock every caller relayed by it out).
        let mut client = reported.unwrap_or(source);
        // Federation: our own caller, whose call our gateway sent to the relaying domain,
        // bound its exchange to its channel with us; the relaying gateway's connection is with
        // our gateway, not with the caller. Only for such a call is that binding expected, and
        // its caller's address is the one our gateway saw.
        if let Some((channel, caller)) = self.outward.channel_for(
            &facts.call_id,
            &facts.from_tag,
            &facts.from_aor,
            &allowed,
            now,
        ) {
            facts.channel_binding = channel;
            client = caller;
        }
        let credentials = match self.credentials.lock() {
            Ok(c) => Arc::clone(&c),
            Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, ""),
        };
        let relayed = Relayed {
            facts: &facts,
            domains: &allowed,
            source,
        };
        let outcome = {
            let (Ok(mut lockout), Ok(mut home)) = (self.lockout.lock(), self.home.lock()) else {
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "");
            };
            let locked = |u: &str| {
                lockout.source_locked(client, now).is_some()
                    || lockout.user_locked(u, client, false, now).is_some()
            };
            let outcome = home.step(&params, &relayed, credentials.as_ref(), &locked, now);
            match &outcome {
                Ok(HomeOutcome::Success { identity, .. }) => {
                    let user = identity
                        .rsplit_once('@')
                        .map_or(identity.as_str(), |(u, _)| u);
                    lockout.success(user, client, now);
                }
                Err(HomeFailure {
                    user,
                    reason: HomeReason::Auth(_) | HomeReason::Xover(_),
                }) => lockout.failure(user.as_deref(), client, now),
                Ok(HomeOutcome::Challenge { .. }) | Err(_) => {}
            }
            outcome
        };
        match outcome {
            Ok(HomeOutcome::Challenge { handle, token }) => {
                self.count("challenge");
                let value = SaslParams {
                    realm: Some(self.realm.clone()),
                    mech: Some(MECHANISM.into()),
                    s2s: Some(handle),
                    s2c: Some(token),
                    ..SaslParams::default()
                }
                .emit();
                Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .header("WWW-Authenticate", value)
                    .body(Full::new(Bytes::new()))
                    .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, ""))
            }
            Ok(HomeOutcome::Success {
                identity,
                released_to,
                call_id,
                key,
                token,
            }) => {
                self.count("released");
                let call_hash = sha2::Sha256::digest(call_id.as_bytes());
                tracing::info!(
                    foreign_domain = %released_to,
                    identity = %identity,
                    call_id_hash = %hex8(&call_hash),
                    %source,
                    %client,
                    "crossover: tunnel key released"
                );
                // RFC 7615's form: auth-params, no scheme (http-sasl.md).
                let info = SaslParams {
                    s2c: Some(token),
                    ..SaslParams::default()
                }
                .emit_auth_params();
                Response::builder()
                    .status(StatusCode::OK)
                    .header("Authentication-Info", info)
                    .header("Content-Type", "application/json")
                    .header("Cache-Control", "no-store")
                    .body(Full::new(Bytes::from(wire::statement_json(
                        &identity,
                        &released_to,
                        key.expose(),
                    ))))
                    .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, ""))
            }
            Err(f) => {
                self.count(f.reason.label());
                tracing::info!(reason = f.reason.label(), %source, %client, ?domains, "crossover round refused");
                match f.reason {
                    HomeReason::Malformed(why) => plain(StatusCode::BAD_REQUEST, why),
                    HomeReason::Internal => plain(StatusCode::INTERNAL_SERVER_ERROR, ""),
                    _ => plain(StatusCode::FORBIDDEN, ""),
                }
            }
        }
    }
}

fn hex8(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_owned())));
    *r.status_mut() = status;
    r
}

async fn handle(
    svc: Arc<HomeService>,
    req: Request<hyper::body::Incoming>,
    domains: Arc<Vec<String>>,
    source: IpAddr,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != hyper::Method::POST || req.uri().path() != super::relay::PATH {
        return Ok(plain(StatusCode::NOT_FOUND, ""));
    }
    let authorization = req
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), wire::BODY_MAX)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(plain(StatusCode::PAYLOAD_TOO_LARGE, "")),
    };
    Ok(svc.round(authorization.as_deref(), &body, &domains, source))
}

/// Serves the crossover home on `listener` (`HttpLimits::CROSSOVER`: caps in all and per
/// source, header deadline, connection lifetime; a client certificate is required by the
/// acceptor).
pub async fn serve(
    listener: tokio::net::TcpListener,
    svc: Arc<HomeService>,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    let guard = crate::http_guard::HttpGuard::new(crate::http_guard::HttpLimits::CROSSOVER);
    let (mut backoff, mut reserve) = (Duration::ZERO, None);
    loop {
        let (stream, remote) =
            crate::http_guard::accept(&listener, &mut backoff, &mut reserve).await;
        let Some(permit) = guard.admit(remote.ip()) else {
            continue;
        };
        let svc = Arc::clone(&svc);
        let acceptor = acceptor.clone();
        let guard = Arc::clone(&guard);
        tokio::spawn(async move {
            let _permit = permit;
            let limits = guard.limits();
            let http = guard.http1();
            let serve = async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                else {
                    svc.count("tls_refused");
                    return;
                };
                let domains: Vec<String> = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(super::certificate_domains)
                    .unwrap_or_default();
                let domains = Arc::new(domains);
                let io = hyper_util::rt::TokioIo::new(tls);
                let service = hyper::service::service_fn(move |req| {
                    handle(Arc::clone(&svc), req, Arc::clone(&domains), remote.ip())
                });
                let _ = http.serve_connection(io, service).await;
            };
            let _ = tokio::time::timeout(limits.lifetime, serve).await;
        });
    }
}
