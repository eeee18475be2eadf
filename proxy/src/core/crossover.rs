//! Realm crossover, foreign side (docs/realm-crossover.md), sans-IO: a caller of another
//! realm authenticates with its own home through this gateway, which relays sealed tokens
//! and never sees a password equivalent.
//!
//! [`Crossover`] owns the requests parked while their home answers (like a DNS location:
//! the driver asks, [`Proxy::handle_crossover`](super::Proxy::handle_crossover) resumes), the
//! exchanges between the caller's rounds (under this gateway's own `s2s` handle, bound to the
//! Call-ID, From tag, source and TLS connection), and the bounds: relays in flight in all and
//! per realm, a deadline per relay, exchanges between rounds capped and expired in order. A
//! slow or dead home costs its own callers only: nothing waits on the SIP loop.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use gatehouse_auth::xover::{self, Facts, Token};
use gatehouse_auth::{SaslParams, Secret};

use crate::config::crossover::Allowed;
use crate::flow::{ConnId, Flow};
use crate::sip::Message;
use crate::transaction::ServerKey;

/// What the core needs of `[crossover]`.
#[derive(Debug, Clone)]
pub struct CrossoverCore {
    pub realms: Allowed,
    pub deadline: Duration,
    pub max_pending: usize,
    pub max_pending_per_realm: usize,
    /// Rounds one source (an IPv4 address, an IPv6 /64) may have waiting for homes
    /// (`[auth] max_pending_per_source`, as for its SASL exchanges).
    pub max_pending_per_source: usize,
}

/// A question for the driver: relay these parameters to the home of `realm`.
#[derive(Debug)]
pub struct Question {
    pub id: u64,
    pub realm: String,
    /// The HTTP-SASL parameters for the home (its realm, `mech` or its `s2s`, the token).
    pub params: SaslParams,
    /// The facts as this gateway sees them (the body of the relay).
    pub facts: Facts,
    /// The caller's address as this gateway sees it (the subscriber its own limits count): the
    /// home counts its lockout against the caller, not against this gateway.
    pub client: std::net::IpAddr,
    /// When the answer is no longer wanted.
    pub deadline: Instant,
}

/// The home's answer, as the driver read it from HTTPS.
#[derive(Debug)]
pub enum Answer {
    /// 401: the home's handle and the home-next token for the caller.
    Challenge { handle: String, token: Vec<u8> },
    /// 200: the statement and the key.
    Success {
        identity: String,
        released_to: String,
        key: Secret<[u8; 32]>,
        token: Vec<u8>,
    },
    /// 403 from the home: the exchange failed there.
    Refused,
    /// No usable answer (not found, unreachable, certificate, deadline, malformed).
    Failed(&'static str),
}

/// A request waiting for its home.
#[derive(Debug)]
pub struct Parked {
    pub msg: Message,
    pub flow: Flow,
    pub response_flow: Flow,
    pub key: Option<ServerKey>,
    pub source: IpAddr,
    pub realm: String,
    pub facts: Facts,
}

/// An exchange between the caller's rounds.
#[derive(Debug)]
struct Between {
    realm: String,
    home_handle: String,
    call_id: String,
    from_tag: String,
    source: IpAddr,
    conn: Option<ConnId>,
    expires: Instant,
}

/// Why a crossover round was refused before any relay (all answered 403, except
/// `Overloaded`: 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    OwnRealm,
    RealmNotAllowed,
    UnknownHandle,
    Overloaded,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::OwnRealm => "own_realm",
            Refusal::RealmNotAllowed => "realm_not_allowed",
            Refusal::UnknownHandle => "unknown_handle",
            Refusal::Overloaded => "overloaded",
        }
    }
}

/// Counters (bounded labels only: no realm, no user).
#[derive(Debug, Default, Clone)]
pub struct CrossoverStats {
    /// Outcome label -> count: `challenge`, `success`, `refused`, failure labels, refusals.
    pub outcomes: HashMap<&'static str, u64>,
}

/// Exchanges kept between rounds at most (each ~200 bytes).
const BETWEEN_MAX: usize = 16_384;
/// How long an exchange waits for the caller's next round.
const BETWEEN_TTL: Duration = Duration::from_secs(30);

/// The foreign side's state (see the module documentation).
#[derive(Debug)]
pub struct Crossover {
    settings: CrossoverCore,
    next_id: u64,
    parked: HashMap<u64, (Parked, Instant)>,
    /// (deadline, id), in deadline order (one deadline for all).
    deadlines: VecDeque<(Instant, u64)>,
    per_realm: HashMap<String, usize>,
    per_source: HashMap<gatehouse_auth::Subscriber, usize>,
    questions: VecDeque<Question>,
    between: HashMap<String, Between>,
    between_order: VecDeque<(Instant, String)>,
    pub stats: CrossoverStats,
}

impl Crossover {
    pub fn new(settings: CrossoverCore) -> Self {
        Crossover {
            settings,
            next_id: 0,
            parked: HashMap::new(),
            deadlines: VecDeque::new(),
            per_realm: HashMap::new(),
            per_source: HashMap::new(),
            questions: VecDeque::new(),
            between: HashMap::new(),
            between_order: VecDeque::new(),
            stats: CrossoverStats::default(),
        }
    }

    pub fn set_settings(&mut self, settings: CrossoverCore) {
        self.settings = settings;
    }

    pub fn count(&mut self, label: &'static str) {
        *self.stats.outcomes.entry(label).or_default() += 1;
    }

    /// Whether these credentials are a crossover round: the mechanism, or a handle of ours.
    pub fn claims(&self, params: &SaslParams) -> bool {
        match (&params.s2s, params.mech.as_deref()) {
            (Some(h), _) => self.between.contains_key(h),
            (None, Some(m)) => m == xover::MECHANISM,
            (None, None) => false,
        }
    }

    /// Requests parked for a home.
    pub fn pending(&self) -> usize {
        self.parked.len()
    }

    /// Exchanges between rounds.
    pub fn between(&self) -> usize {
        self.between.len()
    }

    /// The next question for the driver.
    pub fn poll(&mut self) -> Option<Question> {
        self.questions.pop_front()
    }

    /// The realm a round is for: the first token's, or the exchange's (none: not ours).
    pub fn realm_of(&self, params: &SaslParams) -> Option<String> {
        match &params.s2s {
            Some(h) => self.between.get(h).map(|b| b.realm.clone()),
            None => Token::parse(params.c2s.as_deref()?)
                .ok()
                .and_then(|t| t.realm().map(str::to_owned)),
        }
    }

    /// Parks `parked` and asks its home; on refusal the request comes back for its answer.
    /// `own_realms`: the gateway's own realm and domains (their users authenticate with
    /// SCRAM, never by crossover). A next round's handle must belong to the same Call-ID,
    /// From tag, source and TLS connection as the round it answered.
    pub fn relay(
        &mut self,
        params: &SaslParams,
        parked: Parked,
        own_realms: &[&str],
        now: Instant,
    ) -> Result<(), (Refusal, Box<Parked>)> {
        match self.prepare(params, &parked, own_realms, now) {
            Ok((realm, home_params)) => {
                self.park(realm, home_params, parked, now);
                Ok(())
            }
            Err(r) => Err((r, Box::new(parked))),
        }
    }

    fn prepare(
        &mut self,
        params: &SaslParams,
        parked: &Parked,
        own_realms: &[&str],
        now: Instant,
    ) -> Result<(String, SaslParams), Refusal> {
        self.expire_between(now);
        let c2s = params.c2s.as_deref().ok_or(Refusal::Malformed)?;
        let (realm, home_params) = match &params.s2s {
            None => {
                let realm = Token::parse(c2s)
                    .ok()
                    .and_then(|t| t.realm().map(str::to_owned))
                    .ok_or(Refusal::Malformed)?;
                if own_realms.iter().any(|r| r.eq_ignore_ascii_case(&realm)) {
                    return Err(Refusal::OwnRealm);
                }
                if !self.settings.realms.admits(&realm) {
                    return Err(Refusal::RealmNotAllowed);
                }
                let p = SaslParams {
                    realm: Some(realm.clone()),
                    mech: Some(xover::MECHANISM.into()),
                    c2s: Some(c2s.to_vec()),
                    ..SaslParams::default()
                };
                (realm, p)
            }
            Some(handle) => {
                // Single use: taken out whatever happens next.
                let b = self.between.remove(handle).ok_or(Refusal::UnknownHandle)?;
                let same = b.call_id == parked.facts.call_id
                    && b.from_tag == parked.facts.from_tag
                    && b.source == parked.source
                    && b.conn == parked.flow.conn
                    && b.expires > now;
                if !same {
                    return Err(Refusal::UnknownHandle);
                }
                let p = SaslParams {
                    realm: Some(b.realm.clone()),
                    s2s: Some(b.home_handle),
                    c2s: Some(c2s.to_vec()),
                    ..SaslParams::default()
                };
                (b.realm, p)
            }
        };
        let in_realm = self.per_realm.get(&realm).copied().unwrap_or(0);
        let from_source = self
            .per_source
            .get(&gatehouse_auth::Subscriber::of(parked.source))
            .copied()
            .unwrap_or(0);
        if self.parked.len() >= self.settings.max_pending
            || in_realm >= self.settings.max_pending_per_realm
            || from_source >= self.settings.max_pending_per_source
        {
            return Err(Refusal::Overloaded);
        }
        Ok((realm, home_params))
    }

    fn park(&mut self, realm: String, home_params: SaslParams, parked: Parked, now: Instant) {
        let id = self.next_id;
        self.next_id += 1;
        let deadline = now + self.settings.deadline;
        *self.per_realm.entry(realm.clone()).or_default() += 1;
        *self
            .per_source
            .entry(gatehouse_auth::Subscriber::of(parked.source))
            .or_default() += 1;
        self.questions.push_back(Question {
            id,
            realm: realm.clone(),
            params: home_params,
            facts: parked.facts.clone(),
            client: parked.source,
            deadline,
        });
        self.deadlines.push_back((deadline, id));
        self.parked
            .insert(id, (Parked { realm, ..parked }, deadline));
        self.count("relayed");
    }

    fn release(&mut self, realm: &str, source: std::net::IpAddr) {
        if let Some(n) = self.per_realm.get_mut(realm) {
            *n -= 1;
            if *n == 0 {
                self.per_realm.remove(realm);
            }
        }
        let sub = gatehouse_auth::Subscriber::of(source);
        if let Some(n) = self.per_source.get_mut(&sub) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&sub);
            }
        }
    }

    /// The parked request an answer belongs to (none when it expired meanwhile).
    pub fn take(&mut self, id: u64) -> Option<Parked> {
        let (p, _) = self.parked.remove(&id)?;
        self.release(&p.realm.clone(), p.source);
        Some(p)
    }

    /// A challenge from the home: remembers the exchange under `ours` (a fresh handle).
    pub fn challenged(&mut self, ours: String, home_handle: String, p: &Parked, now: Instant) {
        self.expire_between(now);
        while self.between.len() >= BETWEEN_MAX {
            match self.between_order.pop_front() {
                Some((_, h)) => {
                    self.between.remove(&h);
                }
                None => break,
            }
        }
        let expires = now + BETWEEN_TTL;
        self.between_order.push_back((expires, ours.clone()));
        self.between.insert(
            ours,
            Between {
                realm: p.realm.clone(),
                home_handle,
                call_id: p.facts.call_id.clone(),
                from_tag: p.facts.from_tag.clone(),
                source: p.source,
                conn: p.flow.conn,
                expires,
            },
        );
    }

    /// Requests whose home did not answer in time (each gets its 403).
    pub fn expire(&mut self, now: Instant) -> Vec<Parked> {
        let mut late = Vec::new();
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(p) = self.take(id) {
                late.push(p);
            }
        }
        late
    }

    fn expire_between(&mut self, now: Instant) {
        while let Some((at, _)) = self.between_order.front() {
            if *at > now {
                break;
            }
            if let Some((at, h)) = self.between_order.pop_front() {
                if self.between.get(&h).is_some_and(|b| b.expires == at) {
                    self.between.remove(&h);
                }
            }
        }
    }

    /// Housekeeping: exchanges between rounds that timed out.
    pub fn maintain(&mut self, now: Instant) -> Vec<Parked> {
        self.expire_between(now);
        self.expire(now)
    }
}

/// The core's view of the `[crossover]` settings.
pub fn crossover_core(
    c: &crate::config::crossover::CrossoverSettings,
    max_pending_per_source: usize,
) -> CrossoverCore {
    CrossoverCore {
        realms: c.realms.clone(),
        deadline: c.deadline,
        max_pending: c.max_pending,
        max_pending_per_realm: c.max_pending_per_realm,
        max_pending_per_source: max_pending_per_source.max(1),
    }
}

use super::auth::{self as sasl_auth, Challenger};
use super::{Admission, Admitted, Proxy, Reject};
use crate::sip::{HeaderName, Scheme, Uri};
use crate::tunnel::sdp::WgSdp;

impl Proxy {
    /// Stage 5, crossover part: `Some(params)` when the request's credentials are a realm
    /// crossover round (its own-realm header removed: it never travels on), to be relayed.
    /// SXOVER-PLUS is offered on TLS only; naming it elsewhere is a failed exchange.
    pub(super) fn crossover_round(
        &mut self,
        msg: &mut Message,
        flow: &Flow,
        source: IpAddr,
        now: Instant,
    ) -> Result<Option<SaslParams>, Reject> {
        let Some(x) = &self.crossover else {
            return Ok(None);
        };
        let Some((idx, params)) = self.gate.own_credentials(msg, Challenger::Proxy)? else {
            return Ok(None);
        };
        if !x.claims(&params) {
            return Ok(None);
        }
        let realm = x.realm_of(&params);
        if self.gate.tls_of(flow.conn).is_none() || realm.is_none() {
            if let Some(x) = self.crossover.as_mut() {
                x.count("not_offered");
            }
            return Err(Reject::AuthFailed);
        }
        if realm.is_some_and(|r| {
            !self.gate.from_realms_gateway(flow.conn, &r)
                && self.gate.crossover_locked(&r, source, now)
        }) {
            return Err(Reject::AuthFailed);
        }
        msg.remove(idx);
        Ok(Some(params))
    }

    /// What this gateway sees of a crossover request (docs/realm-crossover.md, "facts").
    fn crossover_facts(&self, msg: &Message, flow: &Flow) -> Result<Facts, Reject> {
        let ruri = msg.request_uri().unwrap_or_default().into_owned();
        let uri =
            Uri::parse(&ruri).map_err(|_| Reject::Malformed(crate::sip::ParseError::RequestUri))?;
        if !matches!(uri.scheme, Scheme::Sip | Scheme::Sips) {
            return Err(Reject::UnsupportedScheme);
        }
        let (offer_pubkey, offer_prefix) = if crate::tunnel::sdp::mentions_wireguard(msg.body()) {
            match WgSdp::parse(msg.body()).map_err(Reject::BadOffer)? {
                Some(sdp) => (sdp.pubkey.to_vec(), sdp.prefix_text.clone()),
                None => (Vec::new(), String::new()),
            }
        } else {
            (Vec::new(), String::new())
        };
        let facts = Facts {
            foreign_domain: uri.host.trim_end_matches('.').to_ascii_lowercase(),
            call_id: msg.call_id().into_owned(),
            from_tag: msg.tag(HeaderName::From).unwrap_or_default(),
            from_aor: super::authorize::addr_spec(msg, HeaderName::From),
            channel_binding: self
                .gate
                .tls_of(flow.conn)
                .map(|t| t.exporter.clone())
                .unwrap_or_default(),
            offer_pubkey,
            offer_prefix,
        };
        facts.check().map_err(|_| Reject::AuthFailed)?;
        Ok(facts)
    }

    /// Parks a crossover round for its home (the driver asks; `handle_crossover` resumes),
    /// or answers it at once when it cannot go.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn park_crossover(
        &mut self,
        params: &SaslParams,
        msg: Message,
        flow: Flow,
        response_flow: Flow,
        key: Option<ServerKey>,
        source: IpAddr,
        now: Instant,
    ) {
        let facts = match self.crossover_facts(&msg, &flow) {
            Ok(f) => f,
            Err(reject) => {
                self.reply_stateless(&msg, response_flow, key, reject, None, now);
                return;
            }
        };
        let mut own: Vec<&str> = self.cfg.domains.iter().map(String::as_str).collect();
        own.push(self.gate.realm());
        let parked = Parked {
            msg,
            flow,
            response_flow,
            key,
            source,
            realm: String::new(),
            facts,
        };
        let Some(x) = self.crossover.as_mut() else {
            return;
        };
        if let Err((refusal, p)) = x.relay(params, parked, &own, now) {
            x.count(refusal.label());
            tracing::info!(reason = refusal.label(), %source, "crossover round refused");
            let reject = match refusal {
                Refusal::Overloaded => Reject::Overloaded,
                _ => Reject::AuthFailed,
            };
            self.answer_parked(&p, reject, None, now);
        }
    }

    /// The next question for the driver: relay to a home.
    pub fn poll_crossover(&mut self) -> Option<Question> {
        self.crossover.as_mut()?.poll()
    }

    /// Crossover exchanges: (parked for a home, between rounds).
    pub fn crossover_pending(&self) -> (usize, usize) {
        self.crossover
            .as_ref()
            .map_or((0, 0), |x| (x.pending(), x.between()))
    }

    /// Crossover outcomes by label (metrics).
    pub fn crossover_outcomes(&self) -> Option<&HashMap<&'static str, u64>> {
        self.crossover.as_ref().map(|x| &x.stats.outcomes)
    }

    /// The home answered question `id` (or the driver gave up on it).
    pub fn handle_crossover(&mut self, id: u64, answer: Answer, now: Instant) {
        let Some(p) = self.crossover.as_mut().and_then(|x| x.take(id)) else {
            return;
        };
        let realm_own = self.gate.realm().to_owned();
        match answer {
            Answer::Challenge { handle, token } => {
                use rand::Rng;
                let ours = base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    self.rng.random::<[u8; 18]>(),
                );
                if let Some(x) = self.crossover.as_mut() {
                    x.challenged(ours.clone(), handle, &p, now);
                    x.count("challenge");
                }
                self.gate.count_challenge();
                let value = SaslParams {
                    realm: Some(realm_own),
                    mech: Some(xover::MECHANISM.into()),
                    s2s: Some(ours),
                    s2c: Some(token),
                    ..SaslParams::default()
                }
                .emit();
                let reject = Reject::Challenge {
                    challenger: Challenger::Proxy,
                    value,
                };
                self.answer_parked(&p, reject, None, now);
            }
            Answer::Success {
                identity,
                released_to,
                key,
                token,
            } => {
                let released = xover::accept_release(
                    &p.realm,
                    &self.cfg.domains,
                    p.facts.clone(),
                    &identity,
                    &released_to,
                    *key.expose(),
                );
                let auth = match released {
                    Ok(auth) => auth,
                    Err(e) => {
                        self.count_crossover("statement");
                        tracing::warn!(realm = %p.realm, error = %e, "a home's statement refused");
                        self.answer_parked(&p, Reject::AuthFailed, None, now);
                        return;
                    }
                };
                self.count_crossover("success");
                self.gate
                    .crossover_outcome(&p.realm, p.source, p.flow.conn, true, now);
                tracing::info!(identity = %identity, realm = %p.realm, source = %p.source, "authenticated by its home (crossover)");
                let info = SaslParams {
                    realm: Some(realm_own),
                    s2c: Some(token),
                    ..SaslParams::default()
                }
                .emit();
                let auth_info = Some((Challenger::Proxy.info_header(), info));
                let from = sasl_auth::header_aor(&p.msg, HeaderName::From);
                match Admission::authenticated(auth, from.as_deref()) {
                    Ok(admission) => {
                        if self.draining {
                            self.answer_parked(&p, Reject::ShuttingDown, auth_info, now);
                            return;
                        }
                        let loop_hash = self.loop_hash(&p.msg);
                        let admitted = Admitted::OutOfDialog {
                            admission,
                            loop_hash,
                        };
                        self.proceed(
                            p.msg,
                            p.flow,
                            p.response_flow,
                            p.key,
                            admitted,
                            auth_info,
                            now,
                        );
                    }
                    Err(reject) => self.answer_parked(&p, reject, auth_info, now),
                }
            }
            Answer::Refused => {
                self.count_crossover("refused");
                self.gate
                    .crossover_outcome(&p.realm, p.source, p.flow.conn, false, now);
                tracing::info!(realm = %p.realm, source = %p.source, "crossover refused by the home");
                self.answer_parked(&p, Reject::AuthFailed, None, now);
            }
            Answer::Failed(why) => {
                self.count_crossover(why);
                tracing::info!(realm = %p.realm, reason = why, "no answer from the home");
                self.answer_parked(&p, Reject::AuthFailed, None, now);
            }
        }
    }

    /// The stateless answer to a parked round (its home refused, failed or is too late, or
    /// the gateway is draining): no server transaction was ever made for it.
    fn answer_parked(
        &mut self,
        p: &Parked,
        reject: Reject,
        auth_info: Option<(&'static str, String)>,
        now: Instant,
    ) {
        self.reply_stateless(
            &p.msg,
            p.response_flow,
            p.key.clone(),
            reject,
            auth_info,
            now,
        );
    }

    fn count_crossover(&mut self, label: &'static str) {
        if let Some(x) = self.crossover.as_mut() {
            x.count(label);
        }
    }

    /// Requests whose home did not answer within the deadline: 403, that call only.
    pub(super) fn expire_crossover(&mut self, now: Instant) {
        let late = match self.crossover.as_mut() {
            Some(x) => x.maintain(now),
            None => return,
        };
        for p in late {
            self.count_crossover("deadline");
            tracing::info!(realm = %p.realm, "the home did not answer within the deadline");
            self.answer_parked(&p, Reject::AuthFailed, None, now);
        }
    }
}
