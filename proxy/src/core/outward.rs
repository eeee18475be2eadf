//! Federation, this gateway as the home of an outward caller (docs/realm-crossover.md,
//! "Federation").
//!
//! An internal caller authenticated here (SCRAM over TLS) sends a tunnel INVITE to another
//! organisation's domain. That domain's gateway challenges with SXOVER-PLUS: the caller seals
//! its exchange to us, its home, and the partner's gateway relays it to our crossover service.
//! Two parts of this gateway must remember such a call, and this table is what they share:
//!
//! - **the core** (the only writer): the caller's next requests of the call carry the
//!   partner's credentials, not ours. A request on the same TLS connection, with the same
//!   Call-ID, From tag and Request-URI, is admitted as the identity that authenticated, at
//!   most [`MAX_RESUMES`] times within [`TTL`] of the exchange, without a new exchange with us
//!   (which would nest our three rounds inside each of the partner's). Nothing else resumes:
//!   not another connection (an attacker cannot share the caller's TLS session), not another
//!   call, not another target — and the policy judges each request again;
//! - **the crossover home service** (a reader, on its own threads): the caller binds its
//!   sealed exchange to its TLS channel with *us* (the partner sees only its own connection
//!   with this gateway). The home accepts that binding only for a call in this table, sent to
//!   the domain that relays it, from the same From AOR ([`OutwardCalls::channel_for`]).
//!
//! Bounds: [`CAPACITY`] calls in all and [`PER_IDENTITY`] per identity (503 beyond), each kept
//! [`TTL`] from its exchange and expired in order by the core's housekeeping (a queue, no
//! scan). The map is a `DashMap`: the home service's reads never wait for the SIP loop.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use gatehouse_auth::Authenticated;

use crate::flow::ConnId;

/// How long after the caller's exchange with us its call may resume and be vouched for: the
/// partner's rounds (two), each within Timer B.
pub const TTL: Duration = Duration::from_secs(64);
/// Requests of one outward call admitted without a new exchange (the partner's two rounds,
/// and a retry of each).
pub const MAX_RESUMES: u8 = 4;
/// Outward calls remembered.
pub const CAPACITY: usize = 16_384;
/// Outward calls of one identity remembered: one user cannot take the table.
pub const PER_IDENTITY: u32 = 64;

/// (Call-ID, From tag).
type CallKey = (Box<str>, Box<str>);

/// One outward tunnel call.
#[derive(Debug)]
struct Outward {
    /// The domain it was routed to (lower case).
    domain: String,
    /// The From AOR as written.
    from_aor: String,
    /// The caller's tls-exporter with this gateway (secret-equivalent for this channel: never
    /// logged).
    channel: Vec<u8>,
    conn: ConnId,
    /// The caller's address (what our home's lockout counts for it).
    source: IpAddr,
    request_uri: String,
    identity: Authenticated,
    resumes: u8,
    expires: Instant,
}

/// The table shared by the core (writer) and the crossover home service (reader).
#[derive(Debug, Default)]
pub struct OutwardCalls {
    calls: DashMap<CallKey, Outward>,
}

impl OutwardCalls {
    /// The channel binding the home expects for an exchange relayed by one of `domains`
    /// about (`call_id`, `from_tag`, `from_aor`) — the caller's channel with this gateway —
    /// and the caller's address, when this gateway sent that call to that domain less than
    /// [`TTL`] ago.
    pub fn channel_for(
        &self,
        call_id: &str,
        from_tag: &str,
        from_aor: &str,
        domains: &[String],
        now: Instant,
    ) -> Option<(Vec<u8>, IpAddr)> {
        let key: CallKey = (call_id.into(), from_tag.into());
        let call = self.calls.get(&key)?;
        let relayed_by_its_domain = domains.iter().any(|d| d.eq_ignore_ascii_case(&call.domain));
        (now < call.expires && relayed_by_its_domain && call.from_aor == from_aor)
            .then(|| (call.channel.clone(), call.source))
    }

    /// Calls remembered.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// What a new outward call needs remembered.
#[derive(Debug)]
pub struct NewOutward<'a> {
    pub call_id: &'a str,
    pub from_tag: &'a str,
    pub domain: &'a str,
    pub from_aor: &'a str,
    pub channel: &'a [u8],
    pub conn: ConnId,
    pub source: IpAddr,
    pub request_uri: &'a str,
    pub identity: &'a Authenticated,
}

/// The table is full, or this identity has its share.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// The core's side: the writer, with the expiry order and the per-identity counts.
#[derive(Debug, Default)]
pub struct Outbound {
    shared: Arc<OutwardCalls>,
    order: VecDeque<(Instant, CallKey)>,
    per_identity: HashMap<String, u32>,
}

impl Outbound {
    /// The shared table, for the home service.
    pub fn shared(&self) -> Arc<OutwardCalls> {
        Arc::clone(&self.shared)
    }

    /// Remembers a call whose caller just authenticated here (a call already remembered
    /// keeps its first entry: its deadline never moves).
    pub fn record(&mut self, call: NewOutward<'_>, now: Instant) -> Result<(), Full> {
        let key: CallKey = (call.call_id.into(), call.from_tag.into());
        if self.shared.calls.contains_key(&key) {
            return Ok(());
        }
        let identity = call.identity.identity();
        let count = self.per_identity.get(identity).copied().unwrap_or(0);
        if self.shared.calls.len() >= CAPACITY || count >= PER_IDENTITY {
            return Err(Full);
        }
        let expires = now + TTL;
        self.shared.calls.insert(
            key.clone(),
            Outward {
                domain: call.domain.to_ascii_lowercase(),
                from_aor: call.from_aor.to_owned(),
                channel: call.channel.to_vec(),
                conn: call.conn,
                source: call.source,
                request_uri: call.request_uri.to_owned(),
                identity: call.identity.resumed(),
                resumes: 0,
                expires,
            },
        );
        *self.per_identity.entry(identity.to_owned()).or_default() += 1;
        self.order.push_back((expires, key));
        Ok(())
    }

    /// A later request of a remembered call, on its connection, to its Request-URI: the
    /// identity that authenticated (without anything a key can be derived from).
    pub fn resume(
        &mut self,
        call_id: &str,
        from_tag: &str,
        conn: Option<ConnId>,
        request_uri: &str,
        now: Instant,
    ) -> Option<Authenticated> {
        // Asked for every request without our credentials on a connection: no key built, no
        // lookup, while no call is out (a gateway without federation never has one).
        if self.is_empty() {
            return None;
        }
        let key: CallKey = (call_id.into(), from_tag.into());
        let mut call = self.shared.calls.get_mut(&key)?;
        if now >= call.expires
            || Some(call.conn) != conn
            || call.request_uri != request_uri
            || call.resumes >= MAX_RESUMES
        {
            return None;
        }
        call.resumes += 1;
        Some(call.identity.resumed())
    }

    /// No outward call is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Forgets the calls whose time is up (in order: no scan).
    pub fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if *at > now {
                break;
            }
            let Some((_, key)) = self.order.pop_front() else {
                break;
            };
            if let Some((_, call)) = self.shared.calls.remove(&key) {
                let identity = call.identity.identity();
                if let Some(n) = self.per_identity.get_mut(identity) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_identity.remove(identity);
                    }
                }
            }
        }
    }
}
