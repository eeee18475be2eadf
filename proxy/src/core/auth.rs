//! The authenticate stage: SASL in SIP (sip-sasl.md). [`SaslGate`] owns everything it
//! needs — the SASL server (exchanges parked between rounds), the credential snapshot, the
//! TLS facts of each connection (channel binding) and the [`super::lockout`] table — runs the
//! exchange for the credentials header of the gateway's realm, answers challenges (407 or
//! 401), and locks out guessers (per user and source, never a user everywhere).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use gatehouse_auth::{
    AuthError, Authenticated, Exchange, Failure, Outcome, SaslParams, SaslServer, TlsInfo,
};

use super::lockout::Lockout;
use super::persist::Credentials;
use super::{AuthStats, Reject};
use crate::flow::{ConnId, Flow};
use crate::sip::{HeaderName, Message, NameAddr};

/// Which flow of the profile: proxy challenge (INVITE etc.) or registrar challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenger {
    /// 407, Proxy-Authenticate / Proxy-Authorization / Proxy-Authentication-Info.
    Proxy,
    /// 401, WWW-Authenticate / Authorization / Authentication-Info.
    Registrar,
}

impl Challenger {
    fn credentials_header(self) -> HeaderName {
        match self {
            Challenger::Proxy => HeaderName::ProxyAuthorization,
            Challenger::Registrar => HeaderName::Authorization,
        }
    }

    pub fn challenge_header(self) -> &'static str {
        match self {
            Challenger::Proxy => "Proxy-Authenticate",
            Challenger::Registrar => "WWW-Authenticate",
        }
    }

    pub fn info_header(self) -> &'static str {
        match self {
            Challenger::Proxy => "Proxy-Authentication-Info",
            Challenger::Registrar => "Authentication-Info",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Challenger::Proxy => 407,
            Challenger::Registrar => 401,
        }
    }
}

pub use crate::sip::uri::aor_key;

/// The addr-spec of the From or To header.
pub fn header_aor(msg: &Message, name: HeaderName) -> Option<String> {
    let v = msg.value_of(name)?;
    aor_key(NameAddr::parse(&v)?.uri)
}

/// True when the authenticated identity may present `aor` (a `sips:` AOR also matches its
/// `sip:` record).
pub fn may_present(auth: &Authenticated, aor: &str) -> bool {
    let plain = aor.replacen("sips:", "sip:", 1);
    auth.aors()
        .iter()
        .filter_map(|a| aor_key(a))
        .any(|a| a.replacen("sips:", "sip:", 1) == plain)
}

/// The authentication owner of the core (see the module documentation).
#[derive(Debug)]
pub struct SaslGate {
    server: SaslServer,
    credentials: Credentials,
    lockout: Lockout,
    tls: HashMap<ConnId, TlsInfo>,
    stats: AuthStats,
    /// Outcomes for the other gateways of a cluster (`Some` when the store is shared), until
    /// the core takes them as writes; at most [`SHARED_OUTCOMES_MAX`] between two takes.
    shared: Option<Vec<SharedOutcome>>,
    /// Realm crossover is on: the proxy challenge on TLS also offers SXOVER-PLUS.
    crossover: bool,
}

/// An authentication outcome the other gateways count: (user, source, success).
pub type SharedOutcome = (Option<String>, IpAddr, bool);

/// Outcomes kept between two write batches (one loop turn); more are not shared (a flood
/// of failures locks here first anyway).
pub const SHARED_OUTCOMES_MAX: usize = 4096;

/// The longest username shared (longer ones are no user's: the store refuses them).
const SHARED_USER_MAX: usize = 128;

impl SaslGate {
    pub fn new(server: SaslServer, credentials: Credentials, lockout: Lockout) -> Self {
        SaslGate {
            server,
            credentials,
            lockout,
            tls: HashMap::new(),
            stats: AuthStats::default(),
            shared: None,
            crossover: false,
        }
    }

    /// New lockout settings (a reload).
    pub fn set_lockout(&mut self, auth: &crate::config::AuthSettings) {
        self.lockout.set_settings(
            auth.failures_before_lockout,
            auth.failure_window,
            auth.lockout,
        );
    }

    /// Share every outcome with the other gateways of a cluster (`take_shared`).
    pub fn share_outcomes(&mut self) {
        self.shared = Some(Vec::new());
    }

    /// The outcomes since the last call.
    pub fn take_shared(&mut self) -> Vec<SharedOutcome> {
        self.shared.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn record(&mut self, user: Option<&str>, source: IpAddr, success: bool) {
        if let Some(list) = &mut self.shared {
            if list.len() < SHARED_OUTCOMES_MAX {
                let user = user
                    .filter(|u| u.len() <= SHARED_USER_MAX)
                    .map(str::to_owned);
                list.push((user, source, success));
            }
        }
    }

    /// Another gateway's outcome, counted as if it were ours (not shared again).
    pub fn remote_outcome(
        &mut self,
        user: Option<&str>,
        source: IpAddr,
        success: bool,
        now: Instant,
    ) {
        match (success, user) {
            (true, Some(u)) => self.lockout.success(u, source, now),
            (true, None) => {}
            (false, _) => self.lockout.failure(user, source, now),
        }
    }

    /// Offer SXOVER-PLUS in proxy challenges on TLS connections (realm crossover).
    pub fn set_crossover(&mut self, on: bool) {
        self.crossover = on;
    }

    /// The TLS facts of a connection.
    pub fn tls_of(&self, conn: Option<ConnId>) -> Option<&TlsInfo> {
        conn.and_then(|c| self.tls.get(&c))
    }

    /// The lockout's name for a realm's crossover callers at one source (the user is sealed
    /// from us): `@realm`, which no local username can be.
    fn realm_key(realm: &str) -> String {
        format!("@{realm}")
    }

    /// Whether a crossover round from `source` for `realm` is locked out (the source, or the
    /// realm at that source after repeated failures).
    pub fn crossover_locked(&mut self, realm: &str, source: IpAddr, now: Instant) -> bool {
        let locked = self.lockout.source_locked(source, now).is_some()
            || self
                .lockout
                .user_locked(&Self::realm_key(realm), source, false, now)
                .is_some();
        if locked {
            self.stats.locked_out += 1;
        }
        locked
    }

    /// A crossover outcome, counted like a local one under the realm's name — except in the
    /// lockout when the request came from the realm's own gateway (see
    /// [`SaslGate::from_realms_gateway`]).
    pub fn crossover_outcome(
        &mut self,
        realm: &str,
        source: IpAddr,
        conn: Option<ConnId>,
        success: bool,
        now: Instant,
    ) {
        let key = Self::realm_key(realm);
        if !self.from_realms_gateway(conn, realm) {
            if success {
                self.lockout.success(&key, source, now);
            } else {
                self.lockout.failure(Some(&key), source, now);
            }
        }
        self.record(Some(&key), source, success);
    }

    /// Whether `conn` is a TLS connection from a gateway of `realm` itself (its verified
    /// client certificate names the realm: `[tls] client_ca`). Federation: every caller of that
    /// realm comes through its gateway, one source here; the realm's home locks its users out
    /// per user and caller, so this gateway's lockout of (realm, source) would only lock the
    /// whole realm out on one user's mistakes.
    pub fn from_realms_gateway(&self, conn: Option<ConnId>, realm: &str) -> bool {
        self.tls_of(conn)
            .is_some_and(|t| t.peer_domains.iter().any(|d| d.eq_ignore_ascii_case(realm)))
    }

    /// The credentials header of this gateway's realm, if any (index and parameters); a
    /// malformed or doubled one is refused.
    pub fn own_credentials(
        &self,
        msg: &Message,
        challenger: Challenger,
    ) -> Result<Option<(usize, SaslParams)>, Reject> {
        let realm = self.server.realm();
        let mut found: Option<(usize, SaslParams)> = None;
        for (idx, _) in msg.fields(challenger.credentials_header()) {
            let value = msg.value(idx);
            let scheme = value.split_whitespace().next().unwrap_or("");
            if !scheme.eq_ignore_ascii_case("SASL") {
                continue; // another scheme: not for this gateway
            }
            let params = SaslParams::parse(&value).map_err(Reject::AuthMalformed)?;
            if params.realm.as_deref().is_none_or(|r| r == realm) {
                if found.is_some() {
                    return Err(Reject::AuthMalformed(
                        gatehouse_auth::HeaderError::Duplicate("realm"),
                    ));
                }
                found = Some((idx, params));
            }
        }
        Ok(found)
    }

    /// The realm this gateway authenticates in.
    pub fn realm(&self) -> &str {
        self.server.realm()
    }

    /// Replaces the credential snapshot (users changed in the store).
    pub fn set_credentials(&mut self, credentials: Credentials) {
        self.credentials = credentials;
    }

    /// The credential snapshot.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Users in the credential snapshot.
    pub fn users(&self) -> usize {
        self.credentials.len()
    }

    /// The TLS facts of a new connection (channel binding, client identity).
    pub fn connection_tls(&mut self, conn: ConnId, info: TlsInfo) {
        self.tls.insert(conn, info);
    }

    /// A connection closed: its channel binding is gone.
    pub fn connection_closed(&mut self, conn: ConnId) {
        self.tls.remove(&conn);
    }

    /// Exchanges parked between rounds.
    pub fn pending(&self) -> usize {
        self.server.pending()
    }

    /// The SASL server's own counters (outcomes, evictions, contained panics).
    pub fn server_stats(&self) -> &gatehouse_auth::ServerStats {
        &self.server.stats
    }

    /// Challenges, refusals of locked requests, locks set.
    pub fn stats(&self) -> AuthStats {
        AuthStats {
            lockouts: self.lockout.lockouts,
            ..self.stats
        }
    }

    /// Counts a challenge sent by the proxy flow.
    pub fn count_challenge(&mut self) {
        self.stats.challenges += 1;
    }

    /// Expires parked exchanges and sweeps at most `limit` lockout entries.
    pub fn maintain(&mut self, now: Instant, limit: usize) {
        self.server.expire(now);
        self.lockout.sweep(now, limit);
    }

    /// Runs one round of the SASL exchange carried by `msg`. On success the own-realm
    /// credentials header is removed from `msg` and the `*-Authentication-Info` value
    /// is returned with the proof. `inside` says the request is a REGISTER from an internal
    /// address (a user-wide lock spares it). `source` is the subscriber the lockout and the
    /// exchange are bound to: the flow's peer, or the client behind a declared balancer.
    pub fn round(
        &mut self,
        msg: &mut Message,
        flow: &Flow,
        source: IpAddr,
        challenger: Challenger,
        inside: bool,
        now: Instant,
    ) -> Result<(Authenticated, String), Reject> {
        let found = self.own_credentials(msg, challenger)?;
        let tls = flow.conn.and_then(|c| self.tls.get(&c)).cloned();
        if self.lockout.source_locked(source, now).is_some() {
            self.stats.locked_out += 1;
            return Err(Reject::AuthFailed);
        }
        let Some((idx, params)) = found else {
            let mut challenge = self.server.challenge(tls.as_ref());
            if self.crossover && tls.is_some() && challenger == Challenger::Proxy {
                challenge.mech = Some(match challenge.mech {
                    Some(m) if !m.is_empty() => format!("{m} {}", gatehouse_auth::xover::MECHANISM),
                    _ => gatehouse_auth::xover::MECHANISM.to_owned(),
                });
            }
            return Err(Reject::Challenge {
                challenger,
                value: challenge.emit(),
            });
        };
        let username = self.server.claimed_username(&params);
        if let Some(u) = &username {
            let inside_registration = challenger == Challenger::Registrar && inside;
            if self
                .lockout
                .user_locked(u, source, inside_registration, now)
                .is_some()
            {
                self.stats.locked_out += 1;
                return Err(Reject::AuthFailed);
            }
        }
        let call_id = msg.call_id().into_owned();
        let from_tag = msg.tag(HeaderName::From).unwrap_or_default();
        let ex = Exchange {
            call_id: &call_id,
            from_tag: &from_tag,
            source,
            tls: tls.as_ref(),
        };
        match self.server.step(&params, &ex, &self.credentials, now) {
            Ok(Outcome::Challenge(p)) => Err(Reject::Challenge {
                challenger,
                value: p.emit(),
            }),
            Ok(Outcome::Success { auth, info }) => {
                self.lockout.success(auth.identity(), source, now);
                self.record(Some(auth.identity()), source, true);
                msg.remove(idx);
                tracing::info!(identity = auth.identity(), mechanism = auth.mechanism(), %source, "authenticated");
                Ok((auth, info.emit()))
            }
            Err(AuthError::Malformed(e)) => Err(Reject::AuthMalformed(e)),
            Err(AuthError::Internal) => {
                tracing::error!(%source, "panic inside the SASL library contained; answered 500");
                Err(Reject::Internal)
            }
            Err(AuthError::Failed(f)) => {
                tracing::info!(reason = f.label(), %source, "authentication failed");
                if !matches!(f, Failure::Expired | Failure::UnknownHandle) {
                    self.lockout.failure(username.as_deref(), source, now);
                    self.record(username.as_deref(), source, false);
                }
                Err(Reject::AuthFailed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aor_comparison() {
        assert_eq!(
            aor_key("sip:Alice@Partner.Example:5060;transport=tcp").as_deref(),
            Some("sip:Alice@partner.example")
        );
        assert_eq!(aor_key("sip:partner.example"), None);
    }
}
