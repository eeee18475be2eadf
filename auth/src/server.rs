//! The SASL server of the SIP-SASL and HTTP-SASL profiles, sans-IO.
//!
//! One [`SaslServer`] per realm. A request without credentials gets a challenge listing the
//! mechanisms offered on its transport; a first round (`mech` + `c2s`) starts an exchange; a
//! multi-round mechanism (SCRAM) is parked under an unguessable `s2s` handle bound to the
//! Call-ID (or HTTP connection), From tag, realm and mechanism, with a TTL, a global cap and
//! a per-source cap, and is taken out again (single use) by the next round.
//!
//! The table of parked exchanges cannot be starved: expired exchanges leave before any cap
//! is checked (in O(expired), from a queue in expiry order); a source (an IPv4 address or an
//! IPv6 /64) at its cap loses its own oldest exchange, never another source's; a full table
//! loses its oldest exchange. No new exchange is ever refused for lack of room.
//!
//! Every client message is checked against the RFC 5802 grammar ([`crate::scram_msg`])
//! before rsasl sees it, and every rsasl step runs under `catch_unwind`: a library panic
//! becomes [`AuthError::Internal`] (a 500 and a counted internal error), never a dead process.
//!
//! SCRAM runs in rsasl. Around it, the gateway itself:
//! - checks the GS2 header: a `-PLUS` mechanism requires `p=tls-exporter` (rsasl 2.3.1 would
//!   accept `n`), and `y` on a connection where `-PLUS` was offered is a downgrade;
//! - answers unknown, disabled or mechanism-restricted users exactly like known ones: a
//!   deterministic per-user fake verifier with the same iteration count, and the exchange
//!   fails only at the proof (no `e=unknown-user` ever leaves);
//! - sends a server-final only after a validated success;
//! - recovers ClientKey from the proof for the PSK transcript.
//!
//! The only way to get an [`Authenticated`] is [`SaslServer::step`] returning success.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsasl::callback::{Context, Request, SessionCallback, SessionData};
use rsasl::mechanisms::scram::properties::ScramStoredPassword;
use rsasl::prelude::{
    ChannelBindingCallback, Mechname, Registry, SASLConfig, SASLServer, Session, SessionError,
    State,
};
use rsasl::property::AuthId;
use rsasl::validate::{Validate, Validation, ValidationError};

use crate::header::{HeaderError, SaslParams};
use crate::scram::{self, Transcript, Verifier};
use crate::scram_msg::{ClientFinal, ClientFirst, Gs2Binding};
use crate::secret::Secret;

/// Mechanisms of the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    ScramSha256Plus,
    ScramSha256,
    External,
    Plain,
}

impl Mechanism {
    pub const ALL: [Mechanism; 4] = [
        Mechanism::ScramSha256Plus,
        Mechanism::ScramSha256,
        Mechanism::External,
        Mechanism::Plain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::External => "EXTERNAL",
            Mechanism::Plain => "PLAIN",
        }
    }

    pub fn from_name(n: &str) -> Option<Mechanism> {
        Mechanism::ALL.into_iter().find(|m| m.name() == n)
    }

    /// Offered only over TLS.
    pub fn needs_tls(self) -> bool {
        !matches!(self, Mechanism::ScramSha256)
    }
}

/// A user record as the server needs it.
#[derive(Debug, Clone)]
pub struct Credential {
    pub username: String,
    pub verifier: Verifier,
    /// SIP AORs (or other identities) the user may present.
    pub aors: Vec<String>,
    /// Mechanisms the user may use; `None` = all offered.
    pub mechanisms: Option<Vec<Mechanism>>,
    pub enabled: bool,
}

/// Where user records come from (the store implements it; tests use a map).
pub trait CredentialSource {
    fn lookup(&self, username: &str) -> Option<Credential>;
}

impl CredentialSource for HashMap<String, Credential> {
    fn lookup(&self, username: &str) -> Option<Credential> {
        self.get(username).cloned()
    }
}

/// Server settings for one realm.
#[derive(Clone)]
pub struct ServerSettings {
    pub realm: String,
    /// Mechanisms offered, in order of preference.
    pub mechanisms: Vec<Mechanism>,
    pub ttl: Duration,
    pub max_pending: usize,
    pub max_pending_per_source: usize,
    /// Iteration count of the fake verifiers (set it to the store's default).
    pub iterations: u32,
    /// Key for the fake verifiers of unknown users (stable across restarts for the same users).
    pub secret: Secret<[u8; 32]>,
    /// Seed of the generator of `s2s` handles: 32 bytes from the operating system in a
    /// gateway, fixed in tests. The server reads no global randomness.
    pub seed: Secret<[u8; 32]>,
}

impl std::fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSettings")
            .field("realm", &self.realm)
            .field("mechanisms", &self.mechanisms)
            .finish_non_exhaustive()
    }
}

/// TLS facts of the connection a request came on.
#[derive(Clone, Default)]
pub struct TlsInfo {
    /// RFC 9266 tls-exporter channel-binding data (32 bytes).
    pub exporter: Vec<u8>,
    /// Identity of a verified client certificate, for EXTERNAL.
    pub peer_identity: Option<String>,
    /// The domains a verified client certificate names (DNS or `sip:` URI SANs, no
    /// wildcards): the peer is a gateway of these domains (RFC 5922).
    pub peer_domains: Vec<String>,
}

impl std::fmt::Debug for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsInfo")
            .field("peer_identity", &self.peer_identity)
            .finish_non_exhaustive()
    }
}

/// The request an exchange step belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    /// SIP Call-ID (HTTP: a connection or client identifier).
    pub call_id: &'a str,
    /// SIP From tag.
    pub from_tag: &'a str,
    pub source: IpAddr,
    pub tls: Option<&'a TlsInfo>,
}

/// Why authentication failed. The peer only ever sees a generic 403; the label is for
/// logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    UnknownHandle,
    ForeignHandle,
    Expired,
    MechanismNotOffered,
    ChannelBinding,
    Protocol,
    BadCredentials,
    IdentityNotAllowed,
}

impl Failure {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::UnknownHandle => "unknown_handle",
            Failure::ForeignHandle => "foreign_handle",
            Failure::Expired => "expired",
            Failure::MechanismNotOffered => "mechanism_not_offered",
            Failure::ChannelBinding => "channel_binding",
            Failure::Protocol => "protocol",
            Failure::BadCredentials => "bad_credentials",
            Failure::IdentityNotAllowed => "identity_not_allowed",
        }
    }
}

/// Errors of a step, each with one response: 400, 503, 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed SASL header: {0}")]
    Malformed(#[from] HeaderError),
    /// A step failed inside the SASL library (a panic caught at the boundary): a bug, answered
    /// 500 and counted, never a dead gateway.
    #[error("internal error in the SASL library")]
    Internal,
    #[error("authentication failed ({})", .0.label())]
    Failed(Failure),
}

/// Proof of a finished, validated exchange. Fields are private: only this crate builds it
/// ([`SaslServer::step`] for a local user, [`crate::xover::accept_release`] for a caller its
/// home realm vouched for).
#[derive(Debug)]
pub struct Authenticated {
    identity: String,
    mechanism: &'static str,
    aors: Vec<String>,
    transcript: Option<Transcript>,
    crossover: Option<Box<Crossed>>,
}

/// What a home realm vouched for (realm crossover): its realm and the tunnel key it released,
/// bound to these facts.
#[derive(Debug)]
pub struct Crossed {
    pub realm: String,
    pub key: Secret<[u8; 32]>,
    pub facts: crate::xover::Facts,
}

impl Authenticated {
    /// The authenticated identity (authzid when given and equal to the authcid, else authcid;
    /// `user@realm` for a crossover caller).
    pub fn identity(&self) -> &str {
        &self.identity
    }
    /// The SASL mechanism's name (`SXOVER-PLUS` for a crossover caller).
    pub fn mechanism(&self) -> &'static str {
        self.mechanism
    }
    /// The identities (SIP AORs) this user may present.
    pub fn aors(&self) -> &[String] {
        &self.aors
    }
    /// SCRAM transcript for the PSK derivation (`None` for PLAIN, EXTERNAL and crossover).
    pub fn transcript(&self) -> Option<&Transcript> {
        self.transcript.as_ref()
    }
    /// The home realm's statement, for a crossover caller.
    pub fn crossover(&self) -> Option<&Crossed> {
        self.crossover.as_deref()
    }

    /// The same identity for a later request of the same exchange's call (federation: the
    /// rounds a partner's gateway asks for after this gateway authenticated the caller), with
    /// nothing a key can be derived from: no transcript, no home statement.
    pub fn resumed(&self) -> Authenticated {
        Authenticated {
            identity: self.identity.clone(),
            mechanism: self.mechanism,
            aors: self.aors.clone(),
            transcript: None,
            crossover: None,
        }
    }

    pub(crate) fn crossed(identity: String, aor: String, crossed: Crossed) -> Authenticated {
        Authenticated {
            identity,
            mechanism: crate::xover::MECHANISM,
            aors: vec![aor],
            transcript: None,
            crossover: Some(Box::new(crossed)),
        }
    }
}

/// What to answer.
#[derive(Debug)]
pub enum Outcome {
    /// Send a challenge (407/401) carrying these parameters.
    Challenge(SaslParams),
    /// Authenticated; `info` goes into the final response's *-Authentication-Info.
    Success {
        auth: Authenticated,
        info: SaslParams,
    },
}

/// Counters for the metrics layer.
#[derive(Debug, Default, Clone)]
pub struct ServerStats {
    /// (mechanism, outcome label) -> count. Outcomes: `success`, failure labels.
    pub outcomes: HashMap<(&'static str, &'static str), u64>,
    /// Parked exchanges dropped to make room (source at its cap, or table full).
    pub evicted: u64,
    /// Panics caught around rsasl.
    pub internal_errors: u64,
}

struct GatehouseValidation;
impl Validation for GatehouseValidation {
    type Value = String;
}

/// Per-exchange rsasl callback: answers the stored-password request with this exchange's
/// (real or fake) verifier and validates by returning the authcid.
struct ExchangeCallback {
    verifier: Verifier,
}

impl SessionCallback for ExchangeCallback {
    fn callback(
        &self,
        _session: &SessionData,
        _context: &Context,
        request: &mut Request,
    ) -> Result<(), SessionError> {
        let v = &self.verifier;
        request.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
            v.iterations,
            &v.salt,
            &v.stored_key,
            &v.server_key,
        ))?;
        Ok(())
    }

    fn validate(
        &self,
        _session: &SessionData,
        context: &Context,
        validate: &mut Validate<'_>,
    ) -> Result<(), ValidationError> {
        let authid = context.get_ref::<AuthId>().map(str::to_owned);
        validate.with::<GatehouseValidation, _>(|| {
            authid.ok_or(ValidationError::MissingRequiredProperty)
        })?;
        Ok(())
    }
}

struct Binding(Option<Vec<u8>>);
impl ChannelBindingCallback for Binding {
    fn get_cb_data(&self, cbname: &str) -> Option<&[u8]> {
        (cbname == "tls-exporter")
            .then_some(self.0.as_deref())
            .flatten()
    }
}

static SCRAM_MECHANISMS: &[rsasl::prelude::Mechanism] = &[
    rsasl::mechanisms::scram::SCRAM_SHA256_PLUS,
    rsasl::mechanisms::scram::SCRAM_SHA256,
];

struct Pending {
    /// Insertion number: ties queue entries to this exchange (handles are never reused, but
    /// a queue entry may outlive its exchange).
    seq: u64,
    session: Session<GatehouseValidation, Binding>,
    mechanism: Mechanism,
    call_id: String,
    from_tag: String,
    source: Subscriber,
    expires: Instant,
    client_first_bare: String,
    server_first: String,
    username: String,
    credential: Option<Credential>,
}

/// What the per-source cap counts: an IPv4 address, or an IPv6 /64 (one subscriber's
/// allocation; rotating addresses inside it does not buy more room).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subscriber {
    V4(u32),
    V6(u64),
}

impl Subscriber {
    pub fn of(ip: IpAddr) -> Subscriber {
        match ip {
            IpAddr::V4(v4) => Subscriber::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Subscriber::V4(v4.into()),
                None => Subscriber::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The SASL server of one realm.
pub struct SaslServer {
    settings: ServerSettings,
    pending: HashMap<String, Pending>,
    /// (seq, handle, expiry) in insertion order = expiry order (one TTL for all).
    order: VecDeque<(u64, String, Instant)>,
    /// Each source's parked exchanges, oldest first (at most `max_pending_per_source`).
    per_source: HashMap<Subscriber, VecDeque<u64>>,
    /// seq -> handle, for per-source eviction.
    handles: HashMap<u64, String>,
    next_seq: u64,
    /// Handle generator (ChaCha12, seeded from `ServerSettings::seed`).
    rng: rand::rngs::StdRng,
    pub stats: ServerStats,
}

impl std::fmt::Debug for SaslServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslServer")
            .field("realm", &self.settings.realm)
            .field("pending", &self.pending.len())
            .finish()
    }
}

fn fail<T>(f: Failure) -> Result<T, AuthError> {
    Err(AuthError::Failed(f))
}

impl SaslServer {
    pub fn new(settings: ServerSettings) -> Self {
        use rand::SeedableRng;
        let rng = rand::rngs::StdRng::from_seed(*settings.seed.expose());
        SaslServer {
            rng,
            settings,
            pending: HashMap::new(),
            order: VecDeque::new(),
            per_source: HashMap::new(),
            handles: HashMap::new(),
            next_seq: 0,
            stats: ServerStats::default(),
        }
    }

    pub fn realm(&self) -> &str {
        &self.settings.realm
    }

    /// The username a client claimed in a parked exchange or in a first-round token, for
    /// per-user failure accounting before the step runs.
    pub fn claimed_username(&self, params: &SaslParams) -> Option<String> {
        if let Some(h) = &params.s2s {
            return self.pending.get(h).map(|p| p.username.clone());
        }
        let c2s = params.c2s.as_deref()?;
        match params.mech.as_deref().and_then(Mechanism::from_name)? {
            Mechanism::ScramSha256 | Mechanism::ScramSha256Plus => {
                ClientFirst::parse(c2s).ok().map(|c| c.username)
            }
            Mechanism::Plain => c2s
                .split(|&b| b == 0)
                .nth(1)
                .and_then(|u| std::str::from_utf8(u).ok())
                .map(str::to_owned),
            Mechanism::External => None,
        }
    }

    /// Exchanges parked between rounds.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Mechanisms offered on a connection (the -PLUS, PLAIN and EXTERNAL ones need TLS;
    /// EXTERNAL also a client certificate).
    pub fn offered(&self, tls: Option<&TlsInfo>) -> Vec<Mechanism> {
        self.settings
            .mechanisms
            .iter()
            .copied()
            .filter(|m| match m {
                Mechanism::ScramSha256 => true,
                Mechanism::ScramSha256Plus => tls.is_some_and(|t| t.exporter.len() == 32),
                Mechanism::External => tls.is_some_and(|t| t.peer_identity.is_some()),
                Mechanism::Plain => tls.is_some(),
            })
            .collect()
    }

    /// The first challenge: realm and mechanism list.
    pub fn challenge(&self, tls: Option<&TlsInfo>) -> SaslParams {
        SaslParams {
            realm: Some(self.settings.realm.clone()),
            mech: Some(
                self.offered(tls)
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            ..SaslParams::default()
        }
    }

    /// Drops exchanges whose TTL passed: O(number expired), oldest first.
    pub fn expire(&mut self, now: Instant) {
        while let Some((seq, _, expires)) = self.order.front() {
            if *expires > now {
                break;
            }
            let seq = *seq;
            if let Some((_, handle, _)) = self.order.pop_front() {
                self.take_if(&handle, seq);
            }
        }
        self.compact();
    }

    /// Drops the oldest live exchange (the table is full).
    fn evict_oldest(&mut self) {
        while let Some((seq, handle, _)) = self.order.pop_front() {
            if self.take_if(&handle, seq).is_some() {
                self.stats.evicted += 1;
                return;
            }
        }
    }

    /// Takes the exchange under `handle` if it is still the one numbered `seq`.
    fn take_if(&mut self, handle: &str, seq: u64) -> Option<Pending> {
        if self.pending.get(handle).is_some_and(|p| p.seq == seq) {
            self.take(handle)
        } else {
            None
        }
    }

    fn take(&mut self, handle: &str) -> Option<Pending> {
        let p = self.pending.remove(handle)?;
        self.handles.remove(&p.seq);
        if let Some(q) = self.per_source.get_mut(&p.source) {
            q.retain(|&s| s != p.seq);
            if q.is_empty() {
                self.per_source.remove(&p.source);
            }
        }
        Some(p)
    }

    /// Keeps the expiry queue within a constant factor of the live exchanges (entries of
    /// exchanges finished early stay queued until their expiry time otherwise), and gives
    /// memory back after a flood.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.pending.len() + 64 {
            let pending = &self.pending;
            self.order
                .retain(|(seq, h, _)| pending.get(h).is_some_and(|p| p.seq == *seq));
        }
        if self.pending.is_empty() && self.pending.capacity() > 1024 {
            self.pending.shrink_to_fit();
            self.handles.shrink_to_fit();
            self.per_source.shrink_to_fit();
            self.order.shrink_to_fit();
        }
    }

    /// Makes room for one more exchange from `source`: its own oldest goes when it is at its
    /// cap, the table's oldest when the table is full.
    fn make_room(&mut self, source: Subscriber) {
        let at_cap = self
            .per_source
            .get(&source)
            .is_some_and(|q| q.len() >= self.settings.max_pending_per_source.max(1));
        if at_cap {
            let oldest = self
                .per_source
                .get(&source)
                .and_then(|q| q.front().copied());
            if let Some(handle) = oldest.and_then(|seq| self.handles.get(&seq).cloned()) {
                self.take(&handle);
                self.stats.evicted += 1;
            }
        }
        while self.pending.len() >= self.settings.max_pending.max(1) {
            self.evict_oldest();
        }
    }

    /// One rsasl step, with a library panic contained.
    fn guarded_step(
        &mut self,
        session: &mut Session<GatehouseValidation, Binding>,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Result<State, SessionError>, AuthError> {
        match catch_unwind(AssertUnwindSafe(|| session.step(Some(input), out))) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.stats.internal_errors += 1;
                Err(AuthError::Internal)
            }
        }
    }

    /// An unguessable handle (144 bits).
    fn new_handle(&mut self) -> String {
        use base64::Engine;
        use rand::Rng;
        let bytes: [u8; 18] = self.rng.random();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn count(&mut self, mech: Mechanism, outcome: &'static str) {
        *self
            .stats
            .outcomes
            .entry((mech.name(), outcome))
            .or_default() += 1;
    }

    /// One round of an exchange. `params` is the client's header for this realm.
    pub fn step(
        &mut self,
        params: &SaslParams,
        ex: &Exchange<'_>,
        creds: &dyn CredentialSource,
        now: Instant,
    ) -> Result<Outcome, AuthError> {
        if let Some(realm) = &params.realm {
            if realm != &self.settings.realm {
                return fail(Failure::Protocol);
            }
        }
        match (&params.s2s, &params.mech) {
            (Some(handle), _) => self.continue_exchange(handle, params, ex, now),
            (None, Some(mech)) => self.start_exchange(mech, params, ex, creds, now),
            (None, None) => Ok(Outcome::Challenge(self.challenge(ex.tls))),
        }
    }

    fn start_exchange(
        &mut self,
        mech: &str,
        params: &SaslParams,
        ex: &Exchange<'_>,
        creds: &dyn CredentialSource,
        now: Instant,
    ) -> Result<Outcome, AuthError> {
        let Some(mechanism) =
            Mechanism::from_name(mech).filter(|m| self.offered(ex.tls).contains(m))
        else {
            return fail(Failure::MechanismNotOffered);
        };
        let c2s = params
            .c2s
            .as_deref()
            .ok_or(AuthError::Malformed(HeaderError::Value("c2s")))?;
        match mechanism {
            Mechanism::Plain => self.plain(c2s, creds),
            Mechanism::External => self.external(c2s, ex, creds),
            Mechanism::ScramSha256 | Mechanism::ScramSha256Plus => {
                self.scram_first(mechanism, c2s, ex, creds, now)
            }
        }
    }

    /// The record to run an exchange against: the user's when it exists, is enabled and may
    /// use the mechanism; else a fake one that looks the same and never verifies.
    fn verifier_for(
        &self,
        username: &str,
        mechanism: Mechanism,
        creds: &dyn CredentialSource,
    ) -> (Verifier, Option<Credential>) {
        // The fake verifier is derived whoever asks (three HMACs), so that a known and an
        // unknown user cost the same: the answer's timing tells nobody which users exist.
        let fake = std::hint::black_box(self.fake_verifier(username));
        match creds.lookup(username) {
            Some(c)
                if c.enabled && c.mechanisms.as_ref().is_none_or(|m| m.contains(&mechanism)) =>
            {
                (c.verifier.clone(), Some(c))
            }
            _ => (fake, None),
        }
    }

    fn fake_verifier(&self, username: &str) -> Verifier {
        let key = self.settings.secret.expose();
        let salt = scram::hmac(key, &[b"fake-salt\0", username.as_bytes()])[..16].to_vec();
        Verifier {
            salt,
            iterations: self.settings.iterations,
            stored_key: scram::hmac(key, &[b"fake-stored\0", username.as_bytes()]),
            server_key: scram::hmac(key, &[b"fake-server\0", username.as_bytes()]),
        }
    }

    fn scram_first(
        &mut self,
        mechanism: Mechanism,
        c2s: &[u8],
        ex: &Exchange<'_>,
        creds: &dyn CredentialSource,
        now: Instant,
    ) -> Result<Outcome, AuthError> {
        let first = ClientFirst::parse(c2s).map_err(|_| AuthError::Failed(Failure::Protocol))?;
        let plus_offered = self.offered(ex.tls).contains(&Mechanism::ScramSha256Plus);
        match (&first.binding, mechanism) {
            (Gs2Binding::Used(name), Mechanism::ScramSha256Plus)
                if name == "tls-exporter" && ex.tls.is_some() => {}
            (_, Mechanism::ScramSha256Plus) => return fail(Failure::ChannelBinding),
            (Gs2Binding::Used(_), _) => return fail(Failure::ChannelBinding),
            (Gs2Binding::SupportedNotUsed, _) if plus_offered => {
                return fail(Failure::ChannelBinding)
            }
            _ => {}
        }
        if first.authzid.as_ref().is_some_and(|a| a != &first.username) {
            return fail(Failure::IdentityNotAllowed);
        }
        // Expired exchanges leave first; then room is made, at the cost of this source's
        // own oldest exchange or of the table's oldest, never by refusing this one.
        self.expire(now);
        let source = Subscriber::of(ex.source);
        self.make_room(source);
        let (verifier, credential) = self.verifier_for(&first.username, mechanism, creds);
        let config = SASLConfig::builder()
            .with_registry(Registry::with_mechanisms(SCRAM_MECHANISMS))
            .with_callback(ExchangeCallback { verifier })
            .map_err(|_| AuthError::Failed(Failure::Protocol))?;
        let binding = Binding(ex.tls.map(|t| t.exporter.clone()));
        let mechname = Mechname::parse(mechanism.name().as_bytes())
            .map_err(|_| AuthError::Failed(Failure::Protocol))?;
        let mut session =
            SASLServer::<GatehouseValidation, Binding>::with_cb(Arc::clone(&config), binding)
                .start_suggested(mechname)
                .map_err(|_| AuthError::Failed(Failure::Protocol))?;
        let mut out = Vec::new();
        match self.guarded_step(&mut session, c2s, &mut out)? {
            Ok(State::Running) => {}
            _ => return fail(Failure::Protocol),
        }
        let server_first =
            String::from_utf8(out).map_err(|_| AuthError::Failed(Failure::Protocol))?;
        if server_first.starts_with("e=") {
            // rsasl refused (e.g. a binding it could not satisfy): never forward its error text.
            return fail(Failure::Protocol);
        }
        let handle = self.new_handle();
        let seq = self.next_seq;
        self.next_seq += 1;
        let expires = now + self.settings.ttl;
        self.per_source.entry(source).or_default().push_back(seq);
        self.handles.insert(seq, handle.clone());
        self.order.push_back((seq, handle.clone(), expires));
        self.pending.insert(
            handle.clone(),
            Pending {
                seq,
                session,
                mechanism,
                call_id: ex.call_id.to_owned(),
                from_tag: ex.from_tag.to_owned(),
                source,
                expires,
                client_first_bare: first.bare,
                server_first: server_first.clone(),
                username: first.username,
                credential,
            },
        );
        Ok(Outcome::Challenge(SaslParams {
            realm: Some(self.settings.realm.clone()),
            mech: Some(mechanism.name().to_owned()),
            s2s: Some(handle),
            s2c: Some(server_first.into_bytes()),
            c2s: None,
        }))
    }

    fn continue_exchange(
        &mut self,
        handle: &str,
        params: &SaslParams,
        ex: &Exchange<'_>,
        now: Instant,
    ) -> Result<Outcome, AuthError> {
        let Some(p) = self.pending.get(handle) else {
            return fail(Failure::UnknownHandle);
        };
        if p.call_id != ex.call_id || p.from_tag != ex.from_tag {
            // Someone else's handle: refuse without consuming it.
            return fail(Failure::ForeignHandle);
        }
        let Some(mut p) = self.take(handle) else {
            return fail(Failure::UnknownHandle);
        };
        let mech = p.mechanism;
        if p.expires <= now {
            self.count(mech, Failure::Expired.label());
            return fail(Failure::Expired);
        }
        if params.mech.as_deref().is_some_and(|m| m != mech.name()) {
            return fail(Failure::Protocol);
        }
        let Some(c2s) = params.c2s.as_deref() else {
            return Err(AuthError::Malformed(HeaderError::Value("c2s")));
        };
        // Our grammar first: rsasl panics on some malformed client-finals (docs/SECURITY.md).
        let Ok(client_final) = ClientFinal::parse(c2s) else {
            self.count(mech, Failure::Protocol.label());
            return fail(Failure::Protocol);
        };
        let mut out = Vec::new();
        let state = self.guarded_step(&mut p.session, c2s, &mut out)?;
        let validated = p.session.validation();
        let (Ok(State::Finished(_)), Some(authcid), Some(credential)) =
            (state, validated, p.credential.take())
        else {
            self.count(mech, Failure::BadCredentials.label());
            return fail(Failure::BadCredentials);
        };
        if authcid != credential.username {
            self.count(mech, Failure::BadCredentials.label());
            return fail(Failure::BadCredentials);
        }
        let auth_message = format!(
            "{},{},{}",
            p.client_first_bare, p.server_first, client_final.without_proof
        );
        let client_key = scram::recover_client_key(
            &credential.verifier.stored_key,
            &auth_message,
            &client_final.proof,
        )
        .ok_or(AuthError::Failed(Failure::BadCredentials))?;
        self.count(mech, "success");
        Ok(Outcome::Success {
            auth: Authenticated {
                identity: credential.username,
                mechanism: mech.name(),
                aors: credential.aors,
                crossover: None,
                transcript: Some(Transcript {
                    auth_message,
                    client_key,
                }),
            },
            info: SaslParams {
                realm: Some(self.settings.realm.clone()),
                s2c: Some(out),
                ..SaslParams::default()
            },
        })
    }

    /// PLAIN (TLS only): `authzid NUL authcid NUL password`, checked against the SCRAM verifier.
    fn plain(&mut self, c2s: &[u8], creds: &dyn CredentialSource) -> Result<Outcome, AuthError> {
        let parts: Vec<&[u8]> = c2s.split(|&b| b == 0).collect();
        let [authzid, authcid, password] = parts[..] else {
            return fail(Failure::Protocol);
        };
        let authcid =
            std::str::from_utf8(authcid).map_err(|_| AuthError::Failed(Failure::Protocol))?;
        if !authzid.is_empty() && authzid != authcid.as_bytes() {
            return fail(Failure::IdentityNotAllowed);
        }
        let (verifier, credential) = self.verifier_for(authcid, Mechanism::Plain, creds);
        let ok = verifier.check_password(password);
        match credential {
            Some(c) if ok => {
                self.count(Mechanism::Plain, "success");
                Ok(Outcome::Success {
                    auth: Authenticated {
                        identity: c.username,
                        mechanism: Mechanism::Plain.name(),
                        aors: c.aors,
                        crossover: None,
                        transcript: None,
                    },
                    info: SaslParams {
                        realm: Some(self.settings.realm.clone()),
                        ..SaslParams::default()
                    },
                })
            }
            _ => {
                self.count(Mechanism::Plain, Failure::BadCredentials.label());
                fail(Failure::BadCredentials)
            }
        }
    }

    /// EXTERNAL: the identity of the verified TLS client certificate; `c2s` may name the same
    /// identity (authzid) or be empty.
    fn external(
        &mut self,
        c2s: &[u8],
        ex: &Exchange<'_>,
        creds: &dyn CredentialSource,
    ) -> Result<Outcome, AuthError> {
        let Some(identity) = ex.tls.and_then(|t| t.peer_identity.as_deref()) else {
            return fail(Failure::MechanismNotOffered);
        };
        if !c2s.is_empty() && c2s != identity.as_bytes() {
            return fail(Failure::IdentityNotAllowed);
        }
        match creds.lookup(identity) {
            Some(c)
                if c.enabled
                    && c.mechanisms
                        .as_ref()
                        .is_none_or(|m| m.contains(&Mechanism::External)) =>
            {
                self.count(Mechanism::External, "success");
                Ok(Outcome::Success {
                    auth: Authenticated {
                        identity: c.username,
                        mechanism: Mechanism::External.name(),
                        aors: c.aors,
                        crossover: None,
                        transcript: None,
                    },
                    info: SaslParams {
                        realm: Some(self.settings.realm.clone()),
                        ..SaslParams::default()
                    },
                })
            }
            _ => {
                self.count(Mechanism::External, Failure::BadCredentials.label());
                fail(Failure::BadCredentials)
            }
        }
    }
}

#[cfg(test)]
mod tests;
