//! The home realm's side of a crossover exchange, sans-IO: opens a relayed client-first,
//! checks the facts against what the relaying foreign gateway reports and the domains its
//! certificate names, runs SCRAM-SHA-256 in the realm's own [`SaslServer`], and seals the
//! answers. Exchanges between rounds are parked under the SASL server's own handle (bound to
//! the Call-ID, From tag and relaying source), with the relaying domain and the facts; the
//! table is bounded and expires in insertion order.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::{derive_key, Channel, Facts, HomeKeys, XoverError, MECHANISM};
use crate::header::SaslParams;
use crate::secret::Secret;
use crate::server::{AuthError, CredentialSource, Exchange, Failure, Outcome, SaslServer};

/// What the foreign gateway reports along with a token.
#[derive(Debug, Clone)]
pub struct Relayed<'a> {
    /// The facts as the foreign gateway sees them (its `foreign_domain` is ignored: the
    /// domain comes from `domains`).
    pub facts: &'a Facts,
    /// The domains the relaying gateway's verified client certificate names.
    pub domains: &'a [String],
    /// The relaying gateway's address (the lockout's source).
    pub source: IpAddr,
}

/// A round's answer for the foreign gateway.
#[derive(Debug)]
pub enum HomeOutcome {
    /// 401: the handle to echo and the home-next token for the caller.
    Challenge { handle: String, token: Vec<u8> },
    /// 200: who, to whom, the key, and the home-final token.
    Success {
        identity: String,
        released_to: String,
        call_id: String,
        key: Secret<[u8; 32]>,
        token: Vec<u8>,
    },
}

/// Why a round failed: the foreign gateway only ever sees 403 (400 for `Malformed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeFailure {
    /// The user the exchange claimed, once known (for the lockout).
    pub user: Option<String>,
    pub reason: HomeReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HomeReason {
    Malformed(&'static str),
    Xover(XoverError),
    Auth(Failure),
    /// The relaying domain is not the one the caller sealed.
    Domain,
    /// The user is locked out.
    Locked,
    Internal,
}

impl HomeReason {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            HomeReason::Malformed(_) => "malformed",
            HomeReason::Xover(e) => e.label(),
            HomeReason::Auth(f) => f.label(),
            HomeReason::Domain => "foreign_domain",
            HomeReason::Locked => "locked",
            HomeReason::Internal => "internal",
        }
    }
}

struct Parked {
    channel: Channel,
    facts: Facts,
    user: String,
    expires: Instant,
}

/// A home realm's crossover service state.
pub struct XoverHome {
    keys: HomeKeys,
    server: SaslServer,
    parked: HashMap<String, Parked>,
    order: VecDeque<(String, Instant)>,
    max_pending: usize,
    ttl: Duration,
}

impl std::fmt::Debug for XoverHome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XoverHome")
            .field("realm", &self.keys.realm)
            .field("parked", &self.parked.len())
            .finish_non_exhaustive()
    }
}

fn failed(user: Option<&str>, reason: HomeReason) -> HomeFailure {
    HomeFailure {
        user: user.map(str::to_owned),
        reason,
    }
}

impl XoverHome {
    /// `server` must be the realm's SASL server offering SCRAM-SHA-256.
    pub fn new(keys: HomeKeys, server: SaslServer, max_pending: usize, ttl: Duration) -> Self {
        XoverHome {
            keys,
            server,
            parked: HashMap::new(),
            order: VecDeque::new(),
            max_pending: max_pending.max(1),
            ttl,
        }
    }

    pub fn realm(&self) -> &str {
        &self.keys.realm
    }

    /// Replaces the key pairs (a rotation: the new current key first, the previous after).
    pub fn set_keys(&mut self, keys: HomeKeys) {
        self.keys = keys;
    }

    /// Exchanges parked between rounds.
    pub fn pending(&self) -> usize {
        self.parked.len()
    }

    /// Drops exchanges whose time passed (O(expired)).
    pub fn expire(&mut self, now: Instant) {
        while let Some((_, at)) = self.order.front() {
            if *at > now && self.parked.len() <= self.max_pending {
                break;
            }
            if let Some((handle, at)) = self.order.pop_front() {
                if self.parked.get(&handle).is_some_and(|p| p.expires == at) {
                    self.parked.remove(&handle);
                }
            }
        }
        self.server.expire(now);
    }

    /// One relayed round. `locked(user)` asks the caller's lockout before SCRAM runs.
    pub fn step(
        &mut self,
        params: &SaslParams,
        relayed: &Relayed<'_>,
        creds: &dyn CredentialSource,
        locked: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> Result<HomeOutcome, HomeFailure> {
        self.expire(now);
        if params
            .realm
            .as_deref()
            .is_some_and(|r| r != self.keys.realm)
        {
            return Err(failed(None, HomeReason::Xover(XoverError::WrongRealm)));
        }
        let c2s = params
            .c2s
            .as_deref()
            .ok_or(failed(None, HomeReason::Malformed("c2s")))?;
        match (&params.s2s, params.mech.as_deref()) {
            (Some(handle), _) => self.next_round(handle, c2s, relayed, creds, locked, now),
            (None, Some(m)) if m == MECHANISM => self.first_round(c2s, relayed, creds, locked, now),
            (None, _) => Err(failed(None, HomeReason::Auth(Failure::MechanismNotOffered))),
        }
    }

    fn first_round(
        &mut self,
        c2s: &[u8],
        relayed: &Relayed<'_>,
        creds: &dyn CredentialSource,
        locked: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> Result<HomeOutcome, HomeFailure> {
        let mut opened = self
            .keys
            .open_first(c2s)
            .map_err(|e| failed(None, HomeReason::Xover(e)))?;
        // The domain the caller sealed must be one the relaying certificate names; then every
        // other fact must be what the relay saw.
        let domain = opened.facts.foreign_domain.clone();
        if !relayed
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&domain))
        {
            return Err(failed(None, HomeReason::Domain));
        }
        let reported = Facts {
            foreign_domain: domain,
            ..relayed.facts.clone()
        };
        opened
            .facts
            .agree(&reported)
            .map_err(|e| failed(None, HomeReason::Xover(e)))?;
        let first = crate::scram_msg::ClientFirst::parse(&opened.scram_client_first)
            .map_err(|_| failed(None, HomeReason::Xover(XoverError::Scram)))?;
        let user = first.username.clone();
        if locked(&user) {
            return Err(failed(Some(&user), HomeReason::Locked));
        }
        let params = SaslParams {
            realm: Some(self.keys.realm.clone()),
            mech: Some("SCRAM-SHA-256".into()),
            c2s: Some(opened.scram_client_first.clone()),
            ..SaslParams::default()
        };
        let ex = Exchange {
            call_id: &opened.facts.call_id,
            from_tag: &opened.facts.from_tag,
            source: relayed.source,
            tls: None,
        };
        let outcome = self.server.step(&params, &ex, creds, now);
        let (handle, server_first) = match outcome {
            Ok(Outcome::Challenge(p)) => match (p.s2s, p.s2c) {
                (Some(h), Some(s)) => (h, s),
                _ => return Err(failed(Some(&user), HomeReason::Internal)),
            },
            Ok(Outcome::Success { .. }) => return Err(failed(Some(&user), HomeReason::Internal)),
            Err(e) => return Err(failed(Some(&user), auth_reason(e))),
        };
        let token = opened
            .channel
            .seal_home_next(&server_first)
            .map_err(|e| failed(Some(&user), HomeReason::Xover(e)))?;
        let expires = now + self.ttl;
        if self.parked.len() >= self.max_pending {
            // Full: the oldest goes (its caller's next round fails), never this one.
            while let Some((h, _)) = self.order.pop_front() {
                if self.parked.remove(&h).is_some() {
                    break;
                }
            }
        }
        self.order.push_back((handle.clone(), expires));
        self.parked.insert(
            handle.clone(),
            Parked {
                channel: opened.channel,
                facts: opened.facts,
                user,
                expires,
            },
        );
        Ok(HomeOutcome::Challenge { handle, token })
    }

    fn next_round(
        &mut self,
        handle: &str,
        c2s: &[u8],
        relayed: &Relayed<'_>,
        creds: &dyn CredentialSource,
        locked: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> Result<HomeOutcome, HomeFailure> {
        let Some(mut parked) = self.parked.remove(handle) else {
            return Err(failed(None, HomeReason::Auth(Failure::UnknownHandle)));
        };
        let user = parked.user.clone();
        let domain = parked.facts.foreign_domain.clone();
        if !relayed
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&domain))
        {
            return Err(failed(Some(&user), HomeReason::Domain));
        }
        let reported = Facts {
            foreign_domain: domain.clone(),
            ..relayed.facts.clone()
        };
        parked
            .facts
            .agree(&reported)
            .map_err(|e| failed(Some(&user), HomeReason::Xover(e)))?;
        if locked(&user) {
            return Err(failed(Some(&user), HomeReason::Locked));
        }
        let client_final = parked
            .channel
            .open_client_next(c2s)
            .map_err(|e| failed(Some(&user), HomeReason::Xover(e)))?;
        let params = SaslParams {
            realm: Some(self.keys.realm.clone()),
            s2s: Some(handle.to_owned()),
            c2s: Some(client_final),
            ..SaslParams::default()
        };
        let ex = Exchange {
            call_id: &parked.facts.call_id,
            from_tag: &parked.facts.from_tag,
            source: relayed.source,
            tls: None,
        };
        let (auth, info) = match self.server.step(&params, &ex, creds, now) {
            Ok(Outcome::Success { auth, info }) => (auth, info),
            Ok(Outcome::Challenge(_)) => return Err(failed(Some(&user), HomeReason::Internal)),
            Err(e) => return Err(failed(Some(&user), auth_reason(e))),
        };
        // The From AOR the caller presents must be one of the user's.
        let from = aor_key(&parked.facts.from_aor);
        if !auth.aors().iter().any(|a| aor_key(a) == from) {
            return Err(failed(
                Some(&user),
                HomeReason::Auth(Failure::IdentityNotAllowed),
            ));
        }
        let transcript = auth
            .transcript()
            .ok_or(failed(Some(&user), HomeReason::Internal))?;
        let key = derive_key(transcript, &parked.facts);
        let identity = format!("{}@{}", auth.identity(), self.keys.realm);
        let server_final = info.s2c.unwrap_or_default();
        let token = parked
            .channel
            .seal_home_final(&server_final, &identity, &domain)
            .map_err(|e| failed(Some(&user), HomeReason::Xover(e)))?;
        Ok(HomeOutcome::Success {
            identity,
            released_to: domain,
            call_id: parked.facts.call_id.clone(),
            key,
            token,
        })
    }
}

/// An AOR for comparison: `sips:` as `sip:`, without `<>`, parameters or port, the host in
/// lower case (`<sip:bob@Partner.Example;transport=tls>` is `sip:bob@partner.example`).
fn aor_key(aor: &str) -> String {
    let a = aor.trim().trim_start_matches('<').trim_end_matches('>');
    let a = a
        .strip_prefix("sips:")
        .map_or_else(|| a.to_owned(), |r| format!("sip:{r}"));
    let a = a.split([';', '?']).next().unwrap_or("");
    match a.rsplit_once('@') {
        Some((user, host)) => format!(
            "{user}@{}",
            host.split(':').next().unwrap_or(host).to_ascii_lowercase()
        ),
        None => a.to_ascii_lowercase(),
    }
}

fn auth_reason(e: AuthError) -> HomeReason {
    match e {
        AuthError::Malformed(_) => HomeReason::Malformed("SCRAM"),
        AuthError::Internal => HomeReason::Internal,
        AuthError::Failed(f) => HomeReason::Auth(f),
    }
}

#[cfg(test)]
pub(super) fn aor_key_for_tests(aor: &str) -> String {
    aor_key(aor)
}
