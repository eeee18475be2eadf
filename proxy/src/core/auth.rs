//! The authenticate stage: SASL in SIP (sip-sasl.md). Runs the exchange for the
//! credentials header of the gateway's realm, answers challenges (407 or 401), and
//! locks out sources and users that keep failing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use gatehouse_auth::{AuthError, Authenticated, Exchange, Failure, Outcome, SaslParams};

use super::{Proxy, Reject};
use crate::flow::Flow;
use crate::sip::{HeaderName, Message, NameAddr, Uri};

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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LockKey {
    Source(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// Failure counters per source address and per username; a key that fails
/// `threshold` times within `window` is refused for `duration`, even with good credentials.
#[derive(Debug)]
pub struct Lockout {
    threshold: u32,
    window: Duration,
    duration: Duration,
    entries: HashMap<LockKey, Entry>,
    /// Number of lockouts started (metrics).
    pub lockouts: u64,
}

/// Bound on the table; expired entries are purged when it is reached.
const LOCKOUT_CAPACITY: usize = 100_000;

impl Lockout {
    pub fn new(threshold: u32, window: Duration, duration: Duration) -> Self {
        Lockout {
            threshold,
            window,
            duration,
            entries: HashMap::new(),
            lockouts: 0,
        }
    }

    fn locked(&self, key: &LockKey, now: Instant) -> bool {
        self.entries
            .get(key)
            .and_then(|e| e.locked_until)
            .is_some_and(|until| now < until)
    }

    fn failure(&mut self, key: LockKey, now: Instant) {
        if self.entries.len() >= LOCKOUT_CAPACITY {
            let (window, duration) = (self.window, self.duration);
            self.entries.retain(|_, e| {
                now < e.window_start + window || e.locked_until.is_some_and(|u| now < u + duration)
            });
            if self.entries.len() >= LOCKOUT_CAPACITY {
                return;
            }
        }
        let e = self.entries.entry(key).or_insert(Entry {
            failures: 0,
            window_start: now,
            locked_until: None,
        });
        if now >= e.window_start + self.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures += 1;
        if e.failures >= self.threshold && e.locked_until.is_none_or(|u| now >= u) {
            e.locked_until = Some(now + self.duration);
            e.failures = 0;
            e.window_start = now;
            self.lockouts += 1;
        }
    }

    fn success(&mut self, key: &LockKey) {
        self.entries.remove(key);
    }
}

/// The AOR form used to compare identities: `sip:user@host`, host lower-cased.
pub fn aor_key(uri: &str) -> Option<String> {
    let u = Uri::parse(uri).ok()?;
    let user = u.user?.split(';').next()?;
    let scheme = match u.scheme {
        crate::sip::Scheme::Sips => "sips",
        _ => "sip",
    };
    Some(format!("{scheme}:{user}@{}", u.host.to_ascii_lowercase()))
}

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
        if self.lockout.locked(&LockKey::Source(source), now) {
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
            if self.lockout.locked(&LockKey::User(u.clone()), now) {
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
        match self.sasl.step(&params, &ex, &self.store, now) {
            Ok(Outcome::Challenge(p)) => Err(Reject::Challenge {
                challenger,
                value: p.emit(),
            }),
            Ok(Outcome::Success { auth, info }) => {
                self.lockout.success(&LockKey::Source(source));
                self.lockout
                    .success(&LockKey::User(auth.identity().to_owned()));
                msg.remove(idx);
                tracing::info!(identity = auth.identity(), mechanism = auth.mechanism().name(), %source, "authenticated");
                Ok((auth, info.emit()))
            }
            Err(AuthError::Malformed(e)) => Err(Reject::AuthMalformed(e)),
            Err(AuthError::Overloaded) => Err(Reject::AuthBusy),
            Err(AuthError::Failed(f)) => {
                tracing::info!(reason = f.label(), %source, "authentication failed");
                if !matches!(f, Failure::Expired | Failure::UnknownHandle) {
                    self.lockout.failure(LockKey::Source(source), now);
                    if let Some(u) = username {
                        self.lockout.failure(LockKey::User(u), now);
                    }
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
    fn lockout_after_threshold_within_window() {
        let t0 = Instant::now();
        let mut l = Lockout::new(3, Duration::from_secs(60), Duration::from_secs(300));
        let k = LockKey::Source("192.0.2.1".parse().unwrap());
        l.failure(k.clone(), t0);
        l.failure(k.clone(), t0);
        assert!(!l.locked(&k, t0));
        l.failure(k.clone(), t0);
        assert!(l.locked(&k, t0 + Duration::from_secs(299)));
        assert!(!l.locked(&k, t0 + Duration::from_secs(300)));
        // Failures spread beyond the window do not add up.
        let k2 = LockKey::User("bob".into());
        l.failure(k2.clone(), t0);
        l.failure(k2.clone(), t0 + Duration::from_secs(61));
        l.failure(k2.clone(), t0 + Duration::from_secs(62));
        assert!(!l.locked(&k2, t0 + Duration::from_secs(62)));
    }

    #[test]
    fn aor_comparison() {
        assert_eq!(
            aor_key("sip:Alice@Partner.Example:5060;transport=tcp").as_deref(),
            Some("sip:Alice@partner.example")
        );
        assert_eq!(aor_key("sip:partner.example"), None);
    }
}
