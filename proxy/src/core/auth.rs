//! The authenticate stage: SASL in SIP (sip-sasl.md). Runs the exchange for the
//! credentials header of the gateway's realm, answers challenges (407 or 401), and
//! locks out guessers ([`super::lockout`]: per user and source, never a user everywhere).

use std::time::Instant;

use gatehouse_auth::{AuthError, Authenticated, Exchange, Failure, Outcome, SaslParams};

use super::{Proxy, Reject};
use crate::flow::Flow;
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

impl Proxy {
    /// Runs one round of the SASL exchange carried by `msg`. On success the own-realm
    /// credentials header is removed from `msg` and the `*-Authentication-Info` value
    /// is returned with the proof.
    pub(super) fn sasl_round(
        &mut self,
        msg: &mut Message,
        flow: &Flow,
        challenger: Challenger,
        now: Instant,
    ) -> Result<(Authenticated, String), Reject> {
        let realm = self.sasl.realm().to_owned();
        let mut found: Option<(usize, SaslParams)> = None;
        let fields: Vec<usize> = msg
            .fields(challenger.credentials_header())
            .map(|(i, _)| i)
            .collect();
        for idx in fields {
            let value = msg.value(idx).into_owned();
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
        let source = flow.remote.ip();
        let tls = flow.conn.and_then(|c| self.tls.get(&c)).cloned();
        if self.lockout.source_locked(source, now).is_some() {
            self.auth_stats.locked_out += 1;
            return Err(Reject::AuthFailed);
        }
        let Some((idx, params)) = found else {
            return Err(Reject::Challenge {
                challenger,
                value: self.sasl.challenge(tls.as_ref()).emit(),
            });
        };
        let username = self.sasl.claimed_username(&params);
        if let Some(u) = &username {
            let inside_registration = challenger == Challenger::Registrar && self.is_inside(source);
            if self
                .lockout
                .user_locked(u, source, inside_registration, now)
                .is_some()
            {
                self.auth_stats.locked_out += 1;
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
        match self.sasl.step(&params, &ex, &self.credentials, now) {
            Ok(Outcome::Challenge(p)) => Err(Reject::Challenge {
                challenger,
                value: p.emit(),
            }),
            Ok(Outcome::Success { auth, info }) => {
                self.lockout.success(auth.identity(), source, now);
                msg.remove(idx);
                tracing::info!(identity = auth.identity(), mechanism = auth.mechanism().name(), %source, "authenticated");
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
                }
                self.auth_stats.lockouts = self.lockout.lockouts;
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
