//! The stateful proxy core of RFC 3261 section 16, sans-IO.
//!
//! Every request goes through one fixed pipeline; each stage returns an explicit outcome
//! and every refusal is a [`Reject`] mapped to its response in one place:
//!
//! 0. **rate limit**: messages from a subscriber over `[rate_limit]` are dropped unparsed
//!    ([`ratelimit`]; trusted sources exempt);
//! 1. **sanity**: parse and validate (400 with the fault in the reason phrase, 505),
//!    RFC 3581 `received`/`rport` on the top Via;
//! 2. **retransmission / ACK**: server transaction matching absorbs retransmissions, the
//!    [`stateless`] cache answers retransmissions of requests answered statelessly; ACK for
//!    2xx goes on statelessly;
//!
//! Stages 3 to 5 keep **no state**: what they refuse or challenge is answered statelessly, so
//! unauthenticated traffic cannot fill the transaction table.
//!
//! 3. **checks**: CANCEL matched to its INVITE (481), Max-Forwards (483), loop detection
//!    (482), Request-URI scheme (416), Proxy-Require (420); OPTIONS to the gateway is 200;
//! 4. **in-dialog**: Route pre-processing (16.4), topology tokens opened ([`topology`]); an
//!    in-dialog request must carry a Record-Route entry this gateway signed, of a dialog that
//!    still lives ([`dialogs`]; else 481), and goes only to the next hop that entry names (403);
//! 5. **authenticate**: [`Admission`] proof: a trusted source, or the SASL exchange of
//!    sip-sasl.md (407, `Proxy-Authorization`), whose identity must own the From AOR;
//!    REGISTER runs its 401 exchange here too; failures feed the [`lockout`]; a realm crossover
//!    round is parked for the caller's home ([`crossover`]); a later round of an outward call
//!    this gateway authenticated resumes on its own connection ([`outward`]);
//!
//! Then the server transaction is created (the last quarter of `max_transactions` is kept
//! for trusted sources) and:
//!
//! 6. **target**: registered bindings of the Request-URI's AOR, then static routes (AOR, then
//!    domain) — 480 for the gateway's domains, 403 (no relaying) for others: one
//!    [`router::Routed`] value, the AOR reached and its branches;
//! 7. **authorize**: the body is classified by its bytes (any `vnd.wireguard` is an offer,
//!    whatever the label: 415/488), the policy decides on the `Routed` target, never the To
//!    header (403 + Warning); a WireGuard offer is validated (488 + Warning), its prefixes and
//!    key must not be another identity's live tunnel's (403), and its `scram` PSK derived
//!    (an outward tunnel, to another organisation's domain, gets no key of ours: `xover`, its
//!    call remembered for the partner's rounds and our crossover home service);
//!    then **rewrite**: the tunnel offer for the inside (PSK only over TLS or to internal
//!    networks);
//! 8. **relay**: only to the branches the consumed [`Clearance`] names (the authorisation
//!    invariant); Via with an RFC 3261 branch carrying the loop hash, Max-Forwards,
//!    Record-Route (doubled when transport or address family changes), topology hiding
//!    towards the outside, client transaction, 100 Trying for INVITE, response context with
//!    best-response selection (16.7), Timer C, CANCEL of pending branches, 408/503
//!    synthesised for timeouts and unreachable next hops.
//!
//! A panic while handling one message or timer is caught at [`Proxy::handle_message`] /
//! [`Proxy::handle_timeout`]: a stateless 500, a counted internal error, and the loop goes on.

pub mod admission;
pub mod auth;
pub mod authorize;
pub mod crossover;
pub mod dialogs;
pub mod error;
pub mod locate;
pub mod lockout;
pub mod outward;
pub mod persist;
pub mod ratelimit;
pub mod registrar;
pub mod relay;
pub mod reserve;
pub mod router;
pub mod sampled;
pub mod stateless;
pub mod topology;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_auth::{Authenticated, SaslParams, SaslServer, Secret, ServerSettings, TlsInfo};

pub use crate::config::route::{Route, RouteTable};
pub use admission::{Admission, AdmissionBasis, Clearance, PeerFlow, SignedDialog};
pub use auth::Challenger;
use crossover::crossover_core;
pub use error::{Fault, MediaFault, Reject};
pub use registrar::{Binding, WallClock};
use relay::Context;

use crate::config::{AuthSettings, RegistrarSettings, TunnelSettings};
use crate::flow::{ConnId, Destination, Flow, Transport};
use crate::sip::values::split_list;
use crate::sip::{
    build_response, HeaderName, Limits, Message, Method, ResponseWriter, Scheme, Uri, Via,
};
use crate::transaction::{
    ServerKey, ServerOutcome, TimerConfig, TransactionLayer, Transmit, TxEvent, TxId,
};
use crate::tunnel::{self, TunnelTable};
use std::sync::Arc;

/// One address the gateway listens on, as it names itself in Via and Record-Route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    pub transport: Transport,
    /// The bound socket address.
    pub addr: SocketAddr,
    /// Host written into Via/Record-Route (an advertised name or the address, IPv6 bracketed).
    pub host: String,
    pub port: u16,
}

impl LocalAddr {
    pub fn new(transport: Transport, addr: SocketAddr, advertise: Option<(String, u16)>) -> Self {
        let (host, port) = advertise.unwrap_or_else(|| (host_text(addr.ip()), addr.port()));
        LocalAddr {
            transport,
            addr,
            host,
            port,
        }
    }
}

/// Writes an IP address as a SIP host (IPv6 in brackets).
pub fn host_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Everything the core needs to know, validated by the config layer.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// SIP domains the gateway is the authority for (lower-case).
    pub domains: Vec<String>,
    /// Other hosts naming the gateway (`[sip] aliases`).
    pub aliases: Vec<String>,
    pub locals: Vec<LocalAddr>,
    pub routes: RouteTable,
    /// Sources admitted without authentication (Kamailio `permissions` style).
    pub trusted: Vec<ipnet::IpNet>,
    pub limits: Limits,
    pub max_transactions: usize,
    pub timers: TimerConfig,
    /// How long a branch to one of several addresses of a located next hop waits for a
    /// first response before the next address is tried (`[timers] failover_ms`).
    pub failover: Duration,
    /// How long an address DNS gave that failed is tried last (`[timers] dead_address_ms`;
    /// zero: not at all).
    pub dead_address: Duration,
    /// Key for the Record-Route MAC that admits in-dialog requests.
    pub dialog_key: [u8; 32],
    pub auth: AuthSettings,
    pub registrar: RegistrarSettings,
    /// Key of the fake verifiers that make unknown users look like known ones.
    pub auth_secret: [u8; 32],
    pub tunnels: TunnelSettings,
    pub policy: Arc<gatehouse_policy::Policy>,
    pub rate_limit: ratelimit::RateLimitSettings,
    /// Topology hiding (`[topology] hide`).
    pub hide_topology: bool,
    /// Load balancers in front of the gateway (`[cluster] balancers`): what they relay is
    /// attributed to the client their Via names (rate limit, lockout, SASL exchanges).
    pub balancers: Vec<ipnet::IpNet>,
    /// How the other gateways of a cluster reach this one (`[cluster] peer_uri`): bindings
    /// whose flow this gateway holds are stored with it, and a binding another gateway holds
    /// is reached through that gateway's.
    pub peer_uri: Option<String>,
    /// The store is shared by a cluster: authentication outcomes leave as writes so that the
    /// other gateways' lockouts count them.
    pub shared_store: bool,
    /// Seed of every random choice the core makes (tags, branch salt, SASL handles): from
    /// the operating system in a gateway, fixed in tests. The core reads no global randomness.
    pub seed: [u8; 32],
    /// Realm crossover, foreign side (`[crossover] enabled`): SXOVER-PLUS offered on TLS.
    pub crossover: Option<crossover::CrossoverCore>,
}

/// Authentication counters for the metrics layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuthStats {
    pub challenges: u64,
    pub locked_out: u64,
    pub lockouts: u64,
}

/// Counters the metrics layer reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct CoreStats {
    pub requests: u64,
    pub responses: u64,
    pub parse_errors: u64,
    pub malformed_responses_dropped: u64,
    pub stray_responses: u64,
    pub rejected: u64,
    pub forwarded: u64,
    /// 407/401 challenges sent without a server transaction.
    pub stateless_challenges: u64,
    /// Retransmitted requests answered from the stateless-response cache.
    pub stateless_resent: u64,
    /// Panics caught around the handling of one message or timer (bugs; the loop went on).
    pub internal_errors: u64,
    /// Client transactions that timed out (Timer B/F).
    pub transaction_timeouts: u64,
}

/// What stages 3 to 5 decided, before any server transaction exists.
#[derive(Debug)]
enum Admitted {
    /// A CANCEL for this server INVITE transaction.
    Cancel(TxId),
    /// In a dialog this gateway signed: relayed along the route set.
    InDialog {
        loop_hash: u32,
        dialog: SignedDialog,
    },
    /// A REGISTER to the registrar, authenticated.
    Register(Box<Authenticated>),
    /// Out of dialog and admitted (trusted source, or authenticated).
    OutOfDialog {
        admission: Admission,
        loop_hash: u32,
    },
    /// From another gateway of the cluster, for a flow this one holds.
    Peer { peer: PeerFlow, loop_hash: u32 },
    /// A realm crossover round: relayed to the caller's home, the request parked meanwhile.
    Relay(Box<SaslParams>),
}

/// What the gateway allows (OPTIONS answers).
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK, NOTIFY, REFER";

/// The sans-IO stateful proxy.
#[derive(Debug)]
pub struct Proxy {
    cfg: CoreConfig,
    txl: TransactionLayer,
    /// The relay's state: response contexts, branches, branch IDs.
    fwd: relay::Forwarding,
    /// Tags and salts (seeded from `CoreConfig::seed`).
    rng: rand::rngs::StdRng,
    draining: bool,
    /// The authenticate stage's owner: SASL server, credential snapshot, TLS facts, lockout.
    gate: auth::SaslGate,
    /// Changes to persistent state not yet taken by the driver (`take_writes`).
    writes: Vec<persist::StoreWrite>,
    /// The registrar owner: bindings and the rules that change them.
    registrar: registrar::Registrar,
    /// Where requests go and which addresses are the gateway's own.
    router: router::Router,
    ratelimit: ratelimit::RateLimit,
    /// A comparison of the tunnel table with the shared store in progress.
    resync: Option<TunnelResync>,
    /// Set-ups waiting for the shared store to count them against the cluster's limits.
    reserving: reserve::Reservations,
    lookups: locate::Lookups,
    /// Realm crossover, foreign side: requests parked for their home, exchanges between rounds.
    crossover: Option<crossover::Crossover>,
    /// Federation: tunnel calls this gateway authenticated and sent to other domains.
    outward: outward::Outbound,
    /// The dialogs record-routed here that still live (in-dialog requests need one).
    dialogs: dialogs::Dialogs,
    /// `cfg.dialog_key`, keyed for HMAC once.
    mac_key: admission::MacKey,
    /// Bans in force at the last [`Proxy::maintain`] (metrics).
    banned_sources: usize,
    /// Branches refused because no clearance named their destination (a bug: always 0; the
    /// fuzz target and the core tests check it after every step).
    authorization_violations: u64,
    /// A tunnel was established: the next write batch is durable (its transmits wait for it).
    durable: bool,
    stateless: stateless::StatelessCache,
    topology: topology::TopologyKey,
    clock: WallClock,
    policy: Arc<gatehouse_policy::Policy>,
    tunnels: TunnelTable,
    /// Policy denials by reason label.
    pub policy_denials: HashMap<&'static str, u64>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Values already reported into `metrics` by `sync_metrics`.
    synced: HashMap<(&'static str, &'static str), u64>,
    pub stats: CoreStats,
}

/// The stored tunnels' keys a resynchronisation compares the table with, and how far it is.
#[derive(Debug)]
struct TunnelResync {
    keys: std::collections::HashSet<(String, String)>,
    before_unix: u64,
    cursor: Option<String>,
}

/// Entries of the lockout table (each about 100 bytes).
const LOCKOUT_CAPACITY: usize = 100_000;
/// Dialogs remembered (each about 150 bytes); at the bound the least recently used call's
/// goes (tunnels' are never pushed out).
const DIALOG_CAPACITY: usize = 200_000;
/// Stateless responses kept for retransmissions (each about 600 bytes).
const STATELESS_CAPACITY: usize = 16_384;

impl Proxy {
    /// A proxy starting from `snapshot` (credentials, bindings, tunnels, as the store had
    /// them); `clock` maps its time to wall-clock time for persisted expiries.
    pub fn new(cfg: CoreConfig, snapshot: persist::Snapshot, clock: WallClock) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::from_seed(cfg.seed);
        let txl = TransactionLayer::new(cfg.timers);
        let a = &cfg.auth;
        let sasl = SaslServer::new(ServerSettings {
            realm: a.realm.clone(),
            mechanisms: a.mechanisms.clone(),
            ttl: a.exchange_ttl,
            max_pending: a.max_pending,
            max_pending_per_source: a.max_pending_per_source,
            iterations: a.iterations,
            secret: Secret::new(cfg.auth_secret),
            seed: Secret::new(rng.random()),
        });
        let lockout = lockout::Lockout::new(
            a.failures_before_lockout,
            a.failure_window,
            a.lockout,
            LOCKOUT_CAPACITY,
        );
        let mut proxy = Proxy {
            policy: Arc::clone(&cfg.policy),
            tunnels: {
                let mut t = TunnelTable::default();
                t.store_proposed(cfg.shared_store);
                t
            },
            policy_denials: HashMap::new(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            synced: HashMap::new(),
            gate: {
                let mut gate = auth::SaslGate::new(sasl, snapshot.credentials, lockout);
                if cfg.shared_store {
                    gate.share_outcomes();
                }
                gate.set_crossover(cfg.crossover.is_some());
                gate
            },
            writes: Vec::new(),
            router: router::Router::new(
                cfg.domains.clone(),
                cfg.aliases.clone(),
                cfg.locals.clone(),
                cfg.routes.clone(),
            ),
            registrar: registrar::Registrar::new(
                cfg.registrar,
                clock,
                snapshot.bindings,
                cfg.peer_uri.clone(),
            ),
            ratelimit: ratelimit::RateLimit::new(cfg.rate_limit),
            resync: None,
            reserving: Default::default(),
            lookups: Default::default(),
            crossover: cfg.crossover.clone().map(crossover::Crossover::new),
            outward: outward::Outbound::default(),
            dialogs: dialogs::Dialogs::new(DIALOG_CAPACITY),
            banned_sources: 0,
            authorization_violations: 0,
            durable: false,
            stateless: stateless::StatelessCache::new(STATELESS_CAPACITY),
            topology: topology::TopologyKey::derive(&cfg.dialog_key),
            mac_key: admission::MacKey::new(&cfg.dialog_key),
            clock,
            cfg,
            txl,
            fwd: relay::Forwarding::new(rng.random()),
            rng,
            draining: false,
            stats: CoreStats::default(),
        };
        for t in snapshot.tunnels {
            // An established tunnel's dialog lives as long as the tunnel (its BYE must pass).
            if let Some(callee_tag) = &t.callee_tag {
                proxy.dialogs.answered(
                    &t.call_id,
                    &t.caller_tag,
                    callee_tag,
                    true,
                    true,
                    clock.instant,
                );
            }
            proxy.tunnels.load(t);
        }
        proxy
    }

    /// Applies a reloaded configuration's domains, routes, trusted sources, balancers, tunnel settings,
    /// message limits, registrar limits, timers (for new transactions), lockout settings and
    /// policy (what needs a restart: `transport::restart_keys`).
    /// Running transactions and tunnels keep what they had.
    pub fn apply_config(&mut self, cfg: &crate::config::Config) {
        self.cfg.timers = cfg.timers;
        self.txl.set_timers(cfg.timers);
        self.cfg.failover = cfg.failover;
        self.cfg.dead_address = cfg.dead_address;
        self.cfg.auth.failures_before_lockout = cfg.auth.failures_before_lockout;
        self.cfg.auth.failure_window = cfg.auth.failure_window;
        self.cfg.auth.lockout = cfg.auth.lockout;
        self.gate.set_lockout(&cfg.auth);
        self.cfg.domains = cfg.domains.clone();
        self.cfg.aliases = cfg.aliases.clone();
        self.cfg.routes = cfg.routes.clone();
        self.router
            .set_routes(cfg.domains.clone(), cfg.aliases.clone(), cfg.routes.clone());
        self.cfg.trusted = cfg.trusted.clone();
        self.cfg.balancers = cfg.balancers.clone();
        self.cfg.tunnels = cfg.tunnels.clone();
        self.cfg.limits = cfg.limits;
        self.cfg.max_transactions = cfg.max_transactions;
        self.cfg.rate_limit = cfg.rate_limit;
        self.ratelimit.set_settings(cfg.rate_limit);
        self.cfg.hide_topology = cfg.hide_topology;
        self.cfg.registrar = cfg.registrar;
        self.registrar.set_settings(cfg.registrar);
        self.policy = Arc::clone(&cfg.policy);
        // Crossover on or off takes effect for new exchanges; parked ones finish either way.
        match (&mut self.crossover, &cfg.crossover) {
            (Some(x), Some(c)) => {
                x.set_settings(crossover_core(c, cfg.auth.max_pending_per_source))
            }
            (None, Some(c)) => {
                self.crossover = Some(crossover::Crossover::new(crossover_core(
                    c,
                    cfg.auth.max_pending_per_source,
                )))
            }
            (Some(_), None) | (None, None) => {}
        }
        self.cfg.crossover = cfg
            .crossover
            .as_ref()
            .map(|c| crossover_core(c, cfg.auth.max_pending_per_source));
        self.gate.set_crossover(cfg.crossover.is_some());
    }

    /// Replaces the policy (hot reload). Running calls keep the decision they had.
    pub fn set_policy(&mut self, policy: Arc<gatehouse_policy::Policy>) {
        self.policy = policy;
    }

    /// Tunnels in the table.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    /// The tunnel table, in Call-ID order (O(n): tests and tools).
    pub fn tunnels(&self) -> impl Iterator<Item = crate::tunnel::Tunnel> + '_ {
        self.tunnels.iter()
    }

    /// A page of the tunnel table (admin API; see `TunnelTable::page`).
    pub fn tunnel_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<crate::tunnel::Tunnel>, Option<String>) {
        self.tunnels.page(after, limit)
    }

    /// The driver reports the TLS facts of a new connection (channel binding, client identity).
    pub fn set_connection_tls(&mut self, conn: ConnId, info: TlsInfo) {
        self.gate.connection_tls(conn, info);
    }

    /// The driver reports a closed connection.
    pub fn connection_closed(&mut self, conn: ConnId) {
        self.gate.connection_closed(conn);
    }

    /// SASL exchanges parked between rounds.
    pub fn pending_sasl(&self) -> usize {
        self.gate.pending()
    }

    /// Authentication counters (challenges, refusals while locked, locks set).
    pub fn auth_stats(&self) -> AuthStats {
        self.gate.stats()
    }

    /// Live registrar bindings.
    pub fn registrations(&self) -> usize {
        self.registrar.count()
    }

    /// SASL outcome counters by (mechanism, outcome).
    pub fn sasl_outcomes(&self) -> &HashMap<(&'static str, &'static str), u64> {
        &self.gate.server_stats().outcomes
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Panics caught so far, in the core and in its SASL server (0 unless there is a bug).
    pub fn internal_errors(&self) -> u64 {
        self.stats.internal_errors + self.gate.server_stats().internal_errors
    }

    /// Branches the authorisation invariant refused (every branch starts at a destination the
    /// clearance it was relayed on names, or at an address DNS gave for one): 0 unless there
    /// is a bug. The fuzz target and the core tests' harness check it after every step.
    pub fn authorization_violations(&self) -> u64 {
        self.authorization_violations
    }

    /// Live transactions (server and client).
    pub fn transactions(&self) -> usize {
        self.txl.len()
    }

    /// Sends a response through a server transaction, counting it.
    fn respond(&mut self, id: TxId, status: u16, bytes: Bytes, now: Instant) {
        if let Some(flow) = self.txl.server_flow(id) {
            self.metrics
                .sip_responses
                .with_label_values(&[crate::metrics::class(status), flow.transport.token()])
                .inc();
        }
        if status >= 200 {
            if let Some(ctx) = self.fwd.context_mut(id) {
                if ctx.invite && !ctx.latency_recorded {
                    ctx.latency_recorded = true;
                    self.metrics
                        .invite_final_latency
                        .observe(now.saturating_duration_since(ctx.started).as_secs_f64());
                }
            }
        }
        self.txl.respond(id, status, bytes, now);
    }

    /// The metrics this proxy reports into.
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Brings gauges and counters kept by the sans-IO layers into the metrics (the driver
    /// calls it a few times a second).
    pub fn sync_metrics(&mut self) {
        let m = Arc::clone(&self.metrics);
        m.sip_transactions.set(self.txl.len() as i64);
        m.sip_dead_addresses.set(self.lookups.dead.len() as i64);
        m.sasl_pending.set(self.gate.pending() as i64);
        m.tunnels_active.set(self.tunnels.len() as i64);
        m.registrar_bindings.set(self.registrar.count() as i64);
        // Keys are static: a tick formats nothing.
        let mut bump = |key: (&'static str, &'static str), now: u64, inc: &dyn Fn(u64)| {
            let last = self.synced.entry(key).or_default();
            if now > *last {
                inc(now - *last);
                *last = now;
            }
        };
        let auth_stats = self.gate.stats();
        let sasl_stats = self.gate.server_stats();
        for (&(mech, outcome), &n) in &sasl_stats.outcomes {
            bump((mech, outcome), n, &|d| {
                m.sasl_attempts
                    .with_label_values(&[crate::metrics::mechanism_label(mech), outcome])
                    .inc_by(d)
            });
        }
        if let Some(x) = &self.crossover {
            m.crossover_pending.set(x.pending() as i64);
            for (&outcome, &n) in &x.stats.outcomes {
                bump(("crossover", outcome), n, &|d| {
                    m.crossover
                        .with_label_values(&["foreign", outcome])
                        .inc_by(d)
                });
            }
        }
        for (&reason, &n) in &self.policy_denials {
            bump(("policy", reason), n, &|d| {
                m.policy_denials.with_label_values(&[reason]).inc_by(d)
            });
        }
        let checks = self.reserving.checks;
        for (label, n) in [
            ("granted", checks.granted),
            ("refused", checks.refused),
            ("unverified", checks.unverified),
        ] {
            bump(("limits", label), n, &|d| {
                m.tunnel_limit_checks.with_label_values(&[label]).inc_by(d)
            });
        }
        let tx = &self.txl.stats;
        bump(
            ("sip/retransmitted", "sent"),
            tx.retransmissions_sent,
            &|d| m.sip_retransmissions.with_label_values(&["sent"]).inc_by(d),
        );
        bump(
            ("sip/retransmitted", "absorbed"),
            tx.retransmissions_absorbed,
            &|d| {
                m.sip_retransmissions
                    .with_label_values(&["absorbed"])
                    .inc_by(d)
            },
        );
        bump(
            ("sip/timeouts", ""),
            self.stats.transaction_timeouts,
            &|d| m.sip_timeouts.inc_by(d),
        );
        let dns = self.lookups.stats;
        for (label, n) in [("resolved", dns.resolved), ("failed", dns.failed)] {
            bump(("sip/dns", label), n, &|d| {
                m.sip_dns_lookups.with_label_values(&[label]).inc_by(d)
            });
        }
        bump(("sip/failovers", ""), dns.failovers, &|d| {
            m.sip_failovers.inc_by(d)
        });
        bump(("auth/challenges", ""), auth_stats.challenges, &|d| {
            m.auth_challenges.inc_by(d)
        });
        bump(("auth/lockouts", ""), auth_stats.lockouts, &|d| {
            m.auth_lockouts.inc_by(d)
        });
        bump(
            ("sip/malformed", ""),
            self.stats.malformed_responses_dropped,
            &|d| {
                m.sip_dropped
                    .with_label_values(&["malformed_response"])
                    .inc_by(d)
            },
        );
        bump(("sip/stray", ""), self.stats.stray_responses, &|d| {
            m.sip_dropped
                .with_label_values(&["stray_response"])
                .inc_by(d)
        });
        bump(("sip/parse", ""), self.stats.parse_errors, &|d| {
            m.sip_parse_errors.inc_by(d)
        });
        bump(("internal/sip", ""), self.stats.internal_errors, &|d| {
            m.internal_errors.with_label_values(&["sip"]).inc_by(d)
        });
        bump(("internal/sasl", ""), sasl_stats.internal_errors, &|d| {
            m.internal_errors.with_label_values(&["sasl"]).inc_by(d)
        });
        bump(("sasl/evicted", ""), sasl_stats.evicted, &|d| {
            m.sasl_evicted.inc_by(d)
        });
        bump(("sip/rate_limited", ""), self.ratelimit.dropped, &|d| {
            m.rate_limited.inc_by(d)
        });
        bump(
            ("sip/stateless_sent", ""),
            self.stats.stateless_challenges,
            &|d| {
                m.stateless_challenges
                    .with_label_values(&["sent"])
                    .inc_by(d)
            },
        );
        bump(
            ("sip/stateless_resent", ""),
            self.stats.stateless_resent,
            &|d| {
                m.stateless_challenges
                    .with_label_values(&["retransmitted"])
                    .inc_by(d)
            },
        );
        m.banned_sources.set(self.banned_sources as i64);
        m.auth_users.set(self.gate.users() as i64);
    }

    /// Housekeeping the driver runs from its tick: expired SASL exchanges, idle lockout
    /// entries (bounded work per call), and memory given back after a flood.
    pub fn maintain(&mut self, now: Instant) {
        self.gate.maintain(now, 4096);
        self.registrar.expire(now, 4096, &mut self.writes);
        self.ratelimit.sweep(now, 4096);
        self.banned_sources = self.ratelimit.banned(now);
        self.stateless.expire(now);
        self.resync_step(4096);
        self.expire_reservations(now);
        self.expire_crossover(now);
        self.outward.expire(now);
        self.fwd.shrink();
        self.txl.shrink();
        self.lookups.shrink();
        self.lookups.dead.expire(now, 4096);
        // Tunnels that ended however they did (another gateway, a resynchronisation, a BYE):
        // their dialogs end with them (a tunnel's is pinned: nothing else would remove it).
        for (call_id, caller_tag) in self.tunnels.take_gone() {
            // A set-up the far end challenged (407) and the caller retried within the same
            // call has its tunnel again: the dialog its 2xx made is that tunnel's.
            if self.tunnels.contains(&call_id, &caller_tag) {
                continue;
            }
            self.dialogs.end_call(&call_id, &caller_tag);
        }
        self.dialogs.expire(now, 4096);
    }

    /// Stop admitting new out-of-dialog requests; in-dialog requests and running
    /// transactions continue.
    pub fn begin_shutdown(&mut self) {
        self.draining = true;
    }

    /// True when no transaction waits for a final response: shutting down loses nothing.
    pub fn is_idle(&self) -> bool {
        self.txl.unfinished() == 0
    }

    /// The next message to send. A driver takes the write batch first (`take_writes`): when
    /// it is durable, what this returns must wait until the batch is committed.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.txl.poll_transmit()
    }

    /// The changes to persistent state since the last call, in order (tunnel table changes
    /// last), or `None` when there are none. `durable` is set when a tunnel was established:
    /// the transmits produced since the last call (its 200 among them) must leave only after
    /// the batch is committed.
    pub fn take_writes(&mut self) -> Option<persist::WriteBatch> {
        for (user, source, success) in self.gate.take_shared() {
            self.writes.push(persist::StoreWrite::AuthOutcome {
                user,
                source,
                success,
            });
        }
        for change in self.tunnels.take_dirty() {
            self.writes.push(match change {
                Ok(t) => persist::StoreWrite::SaveTunnel(Box::new(t)),
                Err((call_id, caller_tag)) => persist::StoreWrite::DeleteTunnel {
                    call_id,
                    caller_tag,
                },
            });
        }
        // After the rows they count (`ReserveTunnel`).
        let reservations = self.reserving.take_writes();
        let urgent = !reservations.is_empty();
        self.writes.extend(reservations);
        if self.writes.is_empty() {
            return None;
        }
        Some(persist::WriteBatch {
            writes: std::mem::take(&mut self.writes),
            durable: std::mem::take(&mut self.durable),
            urgent,
        })
    }

    /// Another gateway of the cluster authenticated `user` from `source` (or failed to): the
    /// lockout counts it as its own, so guesses spread over gateways add up.
    pub fn remote_auth_outcome(
        &mut self,
        user: Option<&str>,
        source: IpAddr,
        success: bool,
        now: Instant,
    ) {
        self.gate.remote_outcome(user, source, success, now);
    }

    /// A new credential snapshot (users changed in the store); exchanges in progress
    /// finish with the credential they started with.
    /// The outward calls this gateway vouches for as their caller's home (the crossover home
    /// service reads them).
    pub fn outward_calls(&self) -> Arc<outward::OutwardCalls> {
        self.outward.shared()
    }

    /// The credential snapshot in force (the crossover home service starts from it).
    pub fn credentials(&self) -> &persist::Credentials {
        self.gate.credentials()
    }

    pub fn set_credentials(&mut self, credentials: persist::Credentials) {
        self.gate.set_credentials(credentials);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.txl.poll_timeout(), self.lookups.next_silence()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Entry point for every message the transports receive.
    ///
    /// A panic while handling one message is a bug, and it stays one message's problem: it is
    /// caught here, counted (`gatehouse_internal_errors_total{area="sip"}`), logged, and a
    /// request gets a stateless 500; the I/O loop and every other transaction go on.
    pub fn handle_message(&mut self, bytes: Bytes, flow: Flow, now: Instant) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.handle_message_inner(bytes.clone(), flow, now)
        }));
        if outcome.is_err() {
            self.stats.internal_errors += 1;
            tracing::error!(remote = %flow.remote, "panic while handling a message contained; answered 500");
            if !looks_like_response(&bytes) && !starts_with_ack(&bytes) {
                self.answer_unparsed(&bytes, Reject::Internal, flow);
            }
        }
    }

    fn handle_message_inner(&mut self, bytes: Bytes, flow: Flow, now: Instant) {
        // Per-source rate limit before any parsing (trusted sources are never limited; what a
        // declared balancer relays is limited per client once its Via is read, stage 2).
        let peer = flow.remote.ip();
        if !self.is_trusted(peer) && !self.is_balancer(peer) && !self.ratelimit.admit(peer, now) {
            return;
        }
        #[cfg(test)]
        if bytes.windows(19).any(|w| w == b"X-Test-Panic: now\r\n") {
            panic!("injected by a test");
        }
        match Message::parse(bytes.clone(), &self.cfg.limits) {
            Ok(msg) if msg.is_request() => {
                self.stats.requests += 1;
                if let Some(m) = msg.method() {
                    self.metrics
                        .sip_requests
                        .with_label_values(&[
                            crate::metrics::method_label(m),
                            flow.transport.token(),
                        ])
                        .inc();
                }
                self.handle_request(msg, flow, now);
            }
            Ok(msg) => {
                self.stats.responses += 1;
                self.handle_response(msg, now);
            }
            Err(e) => {
                self.stats.parse_errors += 1;
                if looks_like_response(&bytes) {
                    self.stats.malformed_responses_dropped += 1;
                    tracing::debug!(error = %e, remote = %flow.remote, "malformed response dropped");
                    return;
                }
                tracing::debug!(error = %e, remote = %flow.remote, "malformed request");
                self.answer_unparsed(&bytes, Reject::Malformed(e), flow);
            }
        }
    }

    /// Answers a request that could not be handled as a message, from its raw lines.
    fn answer_unparsed(&mut self, bytes: &[u8], reject: Reject, flow: Flow) {
        let (code, reason, _) = reject.response();
        let tag = self.new_tag();
        if let Some(resp) = raw_response(bytes, code, reason, &tag) {
            self.txl.send_stateless(Destination::Flow(flow), resp);
        }
    }

    /// The transport could not deliver a message of client transaction `tx` (17.1.4, 16.9).
    pub fn handle_transport_error(&mut self, tx: TxId, now: Instant) {
        if self.txl.transport_error(tx) {
            self.branch_failed(tx, Reject::Unreachable, now);
            self.fwd.forget_branch(tx);
        }
    }

    /// Runs due timers (a panic is contained and counted as in [`Proxy::handle_message`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.handle_timeout_inner(now)
        }));
        if outcome.is_err() {
            self.stats.internal_errors += 1;
            tracing::error!("panic while running timers contained");
        }
    }

    fn handle_timeout_inner(&mut self, now: Instant) {
        for ev in self.txl.handle_timeout(now) {
            match ev {
                TxEvent::Timeout(tx) => {
                    self.stats.transaction_timeouts += 1;
                    self.branch_failed(tx, Reject::Timeout, now);
                    self.fwd.forget_branch(tx);
                }
                TxEvent::TimerC { tx, provisional } => {
                    // 16.8: CANCEL a branch that answered provisionally, and in either case
                    // answer the caller 408 now rather than wait for the branch.
                    if provisional {
                        self.send_cancel(tx, now);
                    } else {
                        self.txl.abandon_client(tx);
                    }
                    self.branch_failed(tx, Reject::Timeout, now);
                    if !provisional {
                        self.fwd.forget_branch(tx);
                    }
                }
                TxEvent::ServerGone(id) => {
                    self.fwd.close(id);
                }
                TxEvent::ClientGone(id) => {
                    self.fwd.forget_branch(id);
                }
            }
        }
        while let Some(client) = self.lookups.silent_until(now) {
            self.fail_over_silent(client, now);
        }
    }

    // ===== requests =====

    fn handle_request(&mut self, mut msg: Message, flow: Flow, now: Instant) {
        // Stage 1: sanity (parsing done), RFC 3581 annotation.
        annotate_via(&mut msg, &flow);
        let response_flow = response_flow(&msg, flow);
        let method = msg.method().unwrap_or(Method::Other);

        // Stage 2: retransmissions and ACK. A retransmission of a request answered
        // statelessly is answered from the cache.
        let key = ServerKey::of_request(&msg);
        match self.txl.absorb(key.as_ref(), &msg, now) {
            Some(ServerOutcome::AckToCore) => {
                // An ACK outside any transaction: for a 2xx it goes on along the route set;
                // for a response sent statelessly it ends that response's retransmissions.
                // (A request without a usable transaction key lands here too: dropped.)
                if method == Method::Ack {
                    if let Some(key) = &key {
                        self.stateless.remove(key);
                    }
                    self.forward_ack(msg, flow, now);
                }
                return;
            }
            Some(_) => return,
            None => {}
        }
        let cached = key
            .as_ref()
            .and_then(|k| self.stateless.lookup(k, flow.remote.ip()));
        if let Some((bytes, to)) = cached {
            self.stats.stateless_resent += 1;
            self.txl.send_stateless(Destination::Flow(to), bytes);
            return;
        }

        // The subscriber: the peer, or the client a declared balancer names in its Via
        // (rate-limited here, as any other source is before parsing).
        let source = if self.is_balancer(flow.remote.ip()) {
            match balancer_client(&msg, flow.remote.ip()) {
                Some(client) if self.ratelimit.admit(client, now) => client,
                Some(_) => return,
                None => {
                    self.reply_stateless(&msg, response_flow, key, Reject::NoClientVia, None, now);
                    return;
                }
            }
        } else {
            flow.remote.ip()
        };

        // Stages 3 to 5 keep no state: what they refuse or challenge is answered statelessly.
        let mut auth_info = None;
        let admitted = match self.admit(&mut msg, &flow, source, &mut auth_info, now) {
            Ok(Some(a)) => a,
            Ok(None) => {
                let tag = self.new_tag();
                let resp = build_response(
                    &msg,
                    200,
                    "OK",
                    Some(&tag),
                    &[("Allow", ALLOW), ("Accept", "application/sdp")],
                );
                self.send_stateless_response(&msg, response_flow, key, 200, resp, now);
                return;
            }
            Err(reject) => {
                self.reply_stateless(&msg, response_flow, key, reject, auth_info, now);
                return;
            }
        };

        if let Admitted::Relay(params) = admitted {
            self.park_crossover(&params, msg, flow, response_flow, key, source, now);
            return;
        }
        self.proceed(msg, flow, response_flow, key, admitted, auth_info, now);
    }

    /// From the server transaction on, for a request stages 3 to 5 admitted (at once, or
    /// when its home answered a crossover round).
    #[allow(clippy::too_many_arguments)]
    fn proceed(
        &mut self,
        msg: Message,
        flow: Flow,
        response_flow: Flow,
        key: Option<ServerKey>,
        admitted: Admitted,
        auth_info: Option<(&'static str, String)>,
        now: Instant,
    ) {
        let method = msg.method().unwrap_or(Method::Other);
        // The transaction budget: the last quarter is kept for trusted sources (the inside).
        let budget = if self.is_trusted(flow.remote.ip()) {
            self.cfg.max_transactions
        } else {
            self.cfg.max_transactions - self.cfg.max_transactions / 4
        };
        if self.txl.len() >= budget {
            self.reply_stateless(&msg, response_flow, key, Reject::Overloaded, auth_info, now);
            return;
        }
        let Some(id) = key.and_then(|k| self.txl.create_server(k, &msg, response_flow)) else {
            return;
        };
        self.fwd.open(
            id,
            Context {
                request: msg.clone(),
                invite: method == Method::Invite,
                branches: Vec::new(),
                best: None,
                final_sent: false,
                cancelled: false,
                auth_info,
                tunnel: None,
                started: now,
                latency_recorded: false,
                resolving: 0,
                cleared: Vec::new(),
            },
        );
        let result = match admitted {
            Admitted::Cancel(invite) => {
                self.handle_cancel(id, invite, &msg, now);
                Ok(())
            }
            Admitted::InDialog { loop_hash, dialog } => {
                self.relay_in_dialog(id, msg, flow, loop_hash, dialog, now)
            }
            Admitted::Register(auth) => self.register(id, msg, flow, *auth, now),
            Admitted::OutOfDialog {
                admission,
                loop_hash,
            } => self.route_admitted(id, msg, flow, admission, loop_hash, now),
            Admitted::Peer { peer, loop_hash } => {
                self.relay(id, msg, flow, loop_hash, Clearance::Peer(peer), now)
            }
            // Parked before any transaction exists (handled by the caller).
            Admitted::Relay(_) => Ok(()),
        };
        if let Err(reject) = result {
            self.stats.rejected += 1;
            tracing::debug!(%reject, "request rejected");
            if let Some(req) = self.fwd.context(id).map(|c| c.request.clone()) {
                self.reply(id, &req, reject, now);
            }
        }
    }

    /// Stages 3 to 5, before any state is kept: checks, in-dialog classification, the
    /// gateway's own requests, authentication. `auth_info` receives the server-final as soon
    /// as an exchange succeeded, so that every later refusal carries it too. `Ok(None)`: an
    /// OPTIONS to the gateway itself, answered 200 without state.
    fn admit(
        &mut self,
        msg: &mut Message,
        flow: &Flow,
        source: IpAddr,
        auth_info: &mut Option<(&'static str, String)>,
        now: Instant,
    ) -> Result<Option<Admitted>, Reject> {
        if msg.method() == Some(Method::Cancel) {
            return self
                .txl
                .invite_for_cancel(msg)
                .map(|invite| Some(Admitted::Cancel(invite)))
                .ok_or(Reject::NoDialog);
        }
        // Stage 3: checks.
        let ruri = msg
            .request_uri()
            .map(|u| u.into_owned())
            .unwrap_or_default();
        let uri =
            Uri::parse(&ruri).map_err(|_| Reject::Malformed(crate::sip::ParseError::RequestUri))?;
        if !matches!(uri.scheme, Scheme::Sip | Scheme::Sips) {
            return Err(Reject::UnsupportedScheme);
        }
        // The gateway itself: a URI naming it without a user, or an OPTIONS to one of its
        // addresses or aliases whatever the user (`sipsak -s sip:ping@GATEWAY`).
        let names_us = self.router.is_self_uri(&uri)
            || (msg.method() == Some(Method::Options) && self.router.is_myself(&uri));
        let to_self = names_us && msg.position_of(HeaderName::Route).is_none();
        if msg.max_forwards() == Some(0) {
            if to_self && msg.method() == Some(Method::Options) {
                return Ok(None);
            }
            return Err(Reject::TooManyHops);
        }
        let loop_hash = self.loop_hash(msg);
        if self.is_loop(msg, loop_hash) {
            return Err(Reject::Loop);
        }
        if let Some(tags) = unsupported_requirements(msg) {
            return Err(Reject::BadExtension(tags));
        }

        // Stage 4: Route pre-processing and in-dialog requests. A request another gateway of
        // the cluster admitted, for a flow this one holds, names the flow in its first Route.
        if let Some(peer) = self.peer_route(msg)? {
            if msg.tag(HeaderName::To).is_some() {
                return Err(Reject::NoDialog);
            }
            return Ok(Some(Admitted::Peer { peer, loop_hash }));
        }
        let signed_route = self.preprocess_routes(msg)?;
        self.reveal_request_uri(msg)?;
        if msg.tag(HeaderName::To).is_some() {
            let Some(dialog) = signed_route else {
                return Err(Reject::NoDialog);
            };
            if !self.dialog_lives(msg, now) {
                return Err(Reject::NoDialog);
            }
            return Ok(Some(Admitted::InDialog { loop_hash, dialog }));
        }
        if self.draining {
            return Err(Reject::ShuttingDown);
        }
        if to_self {
            return match msg.method() {
                Some(Method::Options) => Ok(None),
                Some(Method::Register) => {
                    let inside = self.is_inside(flow.remote.ip());
                    let (auth, info) =
                        self.gate
                            .round(msg, flow, source, Challenger::Registrar, inside, now)?;
                    *auth_info = Some((Challenger::Registrar.info_header(), info));
                    Ok(Some(Admitted::Register(Box::new(auth))))
                }
                _ => Err(Reject::NotImplemented),
            };
        }

        // Stage 5: authenticate (a realm crossover round is relayed to the caller's home).
        if let Some(params) = self.crossover_round(msg, flow, source, now)? {
            return Ok(Some(Admitted::Relay(Box::new(params))));
        }
        let admission = self.authenticate(msg, flow, source, auth_info, now)?;
        Ok(Some(Admitted::OutOfDialog {
            admission,
            loop_hash,
        }))
    }

    /// Whether an in-dialog request's dialog still lives: in this gateway's table (ended by
    /// BYE, forgotten when idle), or — on a store shared by a cluster, where another gateway
    /// may have record-routed it and failed over to this one — on the strength of its signed
    /// Route entry alone, which still reaches only that dialog's peer.
    pub(super) fn dialog_lives(&mut self, msg: &Message, now: Instant) -> bool {
        let known = self.dialogs.lookup(
            &msg.call_id(),
            &msg.tag(HeaderName::From).unwrap_or_default(),
            &msg.tag(HeaderName::To).unwrap_or_default(),
            now,
        );
        known == dialogs::Known::Yes || self.cfg.shared_store
    }

    /// Dialogs remembered (see [`dialogs`]).
    pub fn dialog_count(&self) -> usize {
        self.dialogs.len()
    }

    /// An in-dialog request of a dialog this gateway signed: along the route set.
    fn relay_in_dialog(
        &mut self,
        id: TxId,
        mut msg: Message,
        flow: Flow,
        loop_hash: u32,
        dialog: SignedDialog,
        now: Instant,
    ) -> Result<(), Reject> {
        if tunnel::sdp::mentions_wireguard(msg.body()) {
            // A tunnel is offered, checked, keyed and recorded by the out-of-dialog pipeline
            // only: an offer (or answer) inside a dialog would bypass it.
            return Err(Reject::BadOffer(tunnel::sdp::SdpError::InDialog));
        }
        self.tunnel_in_dialog(&mut msg);
        let next_hop = self.next_hop_of_dialog(&mut msg, &dialog)?;
        self.relay(
            id,
            msg,
            flow,
            loop_hash,
            Clearance::InDialog { dialog, next_hop },
            now,
        )
    }

    /// Stages 6 to 8 for an admitted out-of-dialog request that has its server transaction.
    fn route_admitted(
        &mut self,
        id: TxId,
        mut msg: Message,
        flow: Flow,
        admission: Admission,
        loop_hash: u32,
        now: Instant,
    ) -> Result<(), Reject> {
        // Stage 6, target: the policy judges the AOR the request
        // will reach (its Request-URI, as routing read it), not the To header, which routing
        // never reads. One value, `Routed`, goes from here into the policy query, the tunnel
        // record and the clearance the relay consumes.
        // A Request-URI naming the gateway by address or alias is for its domains.
        let ruri = msg.request_uri().unwrap_or_default().into_owned();
        let ruri = self.router.as_our_domain(&ruri).unwrap_or(ruri);
        let routed = self.router.route(&ruri, self.bindings_for(&ruri, now))?;

        // Federation: a target in another organisation's domain.
        let outward = self.router.foreign_domain(&routed);

        // Stage 7: authorize (policy; a tunnel offer is validated and its PSK derived).
        let authorization =
            self.authorize(&mut msg, &admission, &flow, &routed, outward.is_some())?;

        // Stage 7b: rewrite the tunnel offer for the inside (checked against the branches);
        // an outward tunnel's call is remembered for the partner's rounds and our home.
        let proposed = match authorization.tunnel {
            Some(plan) => {
                if let Some(domain) = &outward {
                    self.remember_outward(&msg, &flow, &admission, &plan, domain, now)?;
                }
                Some(self.rewrite_offer(id, &mut msg, plan, &routed, &flow, now)?)
            }
            None => None,
        };

        // Stage 8: relay, on the strength of the admission and the policy's permit — for a
        // tunnel with limits on a shared store, once the cluster's counts allow it too.
        let limits = authorization.permit.limits();
        let clearance = Clearance::OutOfDialog {
            admission,
            permit: authorization.permit,
            routed,
        };
        match proposed {
            Some(p) if self.cfg.shared_store && limits.any() => {
                let parked = reserve::Parked {
                    id,
                    msg,
                    flow,
                    loop_hash,
                    clearance,
                };
                self.park_for_limits(
                    parked,
                    limits,
                    (p.call_id, p.caller_tag),
                    p.identity,
                    p.to,
                    now,
                );
                Ok(())
            }
            _ => self.relay(id, msg, flow, loop_hash, clearance, now),
        }
    }

    /// A source in `[trust] sources`.
    fn is_trusted(&self, ip: IpAddr) -> bool {
        admission::is_trusted(ip, &self.cfg.trusted)
    }

    /// A load balancer in `[cluster] balancers` (never trusted: the configuration refuses it).
    fn is_balancer(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.cfg.balancers.iter().any(|n| n.contains(&ip))
    }

    /// The authenticate stage. Trusted sources are admitted as such; every other request runs
    /// the SASL exchange (407 flow), and its identity must be allowed to use the From address.
    fn authenticate(
        &mut self,
        msg: &mut Message,
        flow: &Flow,
        source: IpAddr,
        auth_info: &mut Option<(&'static str, String)>,
        now: Instant,
    ) -> Result<Admission, Reject> {
        if let Some(admission) = Admission::trusted(flow.remote.ip(), &self.cfg.trusted) {
            return Ok(admission);
        }
        // Federation: a later round of an outward call this gateway authenticated, on the
        // same connection (see [`outward`]); the partner's credentials pass on untouched.
        if flow.conn.is_some()
            && !self.outward.is_empty()
            && self.gate.own_credentials(msg, Challenger::Proxy)?.is_none()
        {
            let ruri = msg.request_uri().unwrap_or_default();
            let resumed = self.outward.resume(
                &msg.call_id(),
                &msg.tag(HeaderName::From).unwrap_or_default(),
                flow.conn,
                &ruri,
                now,
            );
            if let Some(authenticated) = resumed {
                let from = auth::header_aor(msg, HeaderName::From);
                return Admission::authenticated(authenticated, from.as_deref());
            }
        }
        let round = self
            .gate
            .round(msg, flow, source, Challenger::Proxy, false, now);
        if matches!(round, Err(Reject::Challenge { .. })) {
            self.gate.count_challenge();
        }
        let (authenticated, info) = round?;
        // Every final response of this request now carries the server-final (mutual authentication).
        *auth_info = Some((Challenger::Proxy.info_header(), info));
        let from = auth::header_aor(msg, HeaderName::From);
        Admission::authenticated(authenticated, from.as_deref())
    }

    fn auth_info(&self, id: TxId) -> Option<(&'static str, String)> {
        self.fwd.context(id).and_then(|c| c.auth_info.clone())
    }

    fn reply(&mut self, id: TxId, req: &Message, reject: Reject, now: Instant) {
        log_reject(&reject);
        let (code, reason, mut extra) = reject.response();
        if let Some(info) = self.auth_info(id) {
            extra.push(info);
        }
        let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let tag = self.new_tag();
        let resp = build_response(req, code, reason, Some(&tag), &extra);
        self.finish(id, code, resp, now);
    }

    fn finish(&mut self, id: TxId, code: u16, resp: Bytes, now: Instant) {
        self.respond(id, code, resp, now);
        if let Some(ctx) = self.fwd.context_mut(id) {
            ctx.final_sent = true;
        }
    }

    /// A refusal or challenge answered without a server transaction (see [`stateless`]).
    fn reply_stateless(
        &mut self,
        msg: &Message,
        flow: Flow,
        key: Option<ServerKey>,
        reject: Reject,
        auth_info: Option<(&'static str, String)>,
        now: Instant,
    ) {
        self.stats.rejected += 1;
        log_reject(&reject);
        let (code, reason, mut extra) = reject.response();
        extra.extend(auth_info);
        let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let tag = self.new_tag();
        let resp = build_response(msg, code, reason, Some(&tag), &extra);
        if matches!(reject, Reject::Challenge { .. }) {
            self.stats.stateless_challenges += 1;
        }
        self.send_stateless_response(msg, flow, key, code, resp, now);
    }

    /// Sends a final response of the gateway's own without a transaction, remembering it
    /// for retransmissions over UDP.
    fn send_stateless_response(
        &mut self,
        msg: &Message,
        flow: Flow,
        key: Option<ServerKey>,
        code: u16,
        resp: Bytes,
        now: Instant,
    ) {
        self.metrics
            .sip_responses
            .with_label_values(&[crate::metrics::class(code), flow.transport.token()])
            .inc();
        if msg.method() == Some(Method::Invite) {
            // Answered in the step it arrived in: no time passes on the core's clock.
            self.metrics.invite_final_latency.observe(0.0);
        }
        if let Some(key) =
            key.filter(|_| !flow.transport.is_reliable() && msg.method() != Some(Method::Ack))
        {
            self.stateless.insert(key, resp.clone(), flow, now);
        }
        self.txl.send_stateless(Destination::Flow(flow), resp);
    }

    // ===== identity helpers =====

    /// The loop-detection hash of 16.6 item 8 over the fields that change on a spiral.
    fn loop_hash(&self, msg: &Message) -> u32 {
        let mut h = self.fwd.hasher().build_hasher();
        h.write(msg.request_uri().unwrap_or_default().as_bytes());
        h.write(msg.tag(HeaderName::From).unwrap_or_default().as_bytes());
        h.write(msg.tag(HeaderName::To).unwrap_or_default().as_bytes());
        h.write(msg.call_id().as_bytes());
        h.write_u32(msg.cseq().seq);
        for name in [HeaderName::ProxyRequire, HeaderName::ProxyAuthorization] {
            for (idx, _) in msg.fields(name) {
                h.write(msg.value(idx).as_bytes());
            }
        }
        h.finish() as u32
    }

    /// 16.3 item 4: a Via of ours whose branch carries this request's loop hash.
    fn is_loop(&self, msg: &Message, loop_hash: u32) -> bool {
        let suffix = format!(".{loop_hash:08x}");
        msg.list_values(HeaderName::Via).iter().any(|v| {
            Via::parse(v).is_some_and(|via| {
                via.branch().is_some_and(|b| b.ends_with(&suffix)) && self.router.is_our_via(&via)
            })
        })
    }

    fn new_tag(&mut self) -> String {
        use rand::Rng;
        format!("gh{:08x}", self.rng.random::<u32>())
    }
}

/// Gives a map's memory back once a flood has drained (a quarter full or less).
fn shrink_idle<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 4096 && map.len() * 4 < map.capacity() {
        map.shrink_to_fit();
    }
}

/// Proxy-Require option tags this gateway does not support (all of them, for now).
fn unsupported_requirements(msg: &Message) -> Option<String> {
    let tags = msg.list_values(HeaderName::ProxyRequire);
    (!tags.is_empty()).then(|| tags.join(", "))
}

/// RFC 3261 18.2.1 and RFC 3581: add `received` when the sent-by host is not the source
/// address, and fill an empty `rport` with the source port.
fn annotate_via(msg: &mut Message, flow: &Flow) {
    let Some((idx, _)) = msg.fields(HeaderName::Via).next() else {
        return;
    };
    let value = msg.value(idx).into_owned();
    let mut items = split_list(&value);
    let Some(first) = items.next() else { return };
    let Some(via) = Via::parse(first) else { return };
    let src = canonical_ip(flow.remote.ip());
    let sent_by_is_source =
        crate::sip::uri::host_ip(via.host).is_some_and(|ip| canonical_ip(ip) == src);
    let wants_rport = via.param("rport").is_some();
    if sent_by_is_source && !wants_rport {
        return;
    }
    let mut new_first = String::with_capacity(first.len() + 48);
    let head_end = first.find(';').unwrap_or(first.len());
    new_first.push_str(first[..head_end].trim_end());
    for p in via
        .params
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let name = p.split('=').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("rport") || name.eq_ignore_ascii_case("received") {
            continue;
        }
        new_first.push(';');
        new_first.push_str(p);
    }
    if !sent_by_is_source || wants_rport {
        new_first.push_str(";received=");
        new_first.push_str(&src.to_string());
    }
    if wants_rport {
        new_first.push_str(";rport=");
        new_first.push_str(&flow.remote.port().to_string());
    }
    let rest: Vec<&str> = items.collect();
    if !rest.is_empty() {
        new_first.push_str(", ");
        new_first.push_str(&rest.join(", "));
    }
    msg.replace_value(idx, new_first);
}

/// The client behind a load balancer: the second Via's `received` address (RFC 3261 18.2.1,
/// which the balancer writes, replacing any the client sent: `force_rport()` in
/// `deploy/cluster/kamailio.cfg` makes it write one always), else that Via's sent-by when it
/// is an address literal. A request with the balancer's Via only is the balancer's own (its
/// OPTIONS probes). `None` when the client's Via names no address.
fn balancer_client(msg: &Message, balancer: IpAddr) -> Option<IpAddr> {
    let literal = |s: &str| {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    };
    let client = |v: &str| {
        let via = Via::parse(v)?;
        via.param("received")
            .and_then(literal)
            .or_else(|| literal(via.host))
            .map(canonical_ip)
    };
    // The second element of the Via list, read where it stands (no copy of the list).
    let mut seen = 0;
    for (idx, _) in msg.fields(HeaderName::Via) {
        let value = msg.value(idx);
        for v in split_list(&value) {
            seen += 1;
            if seen == 2 {
                return client(v);
            }
        }
    }
    Some(canonical_ip(balancer))
}

/// Where responses to a request go (18.2.2): the flow itself for reliable transports and
/// `rport`; otherwise the source address with the Via port.
fn response_flow(msg: &Message, flow: Flow) -> Flow {
    if flow.transport.is_reliable() {
        return flow;
    }
    let Some(top) = msg.top_via_value() else {
        return flow;
    };
    let Some(via) = Via::parse(&top) else {
        return flow;
    };
    if via.param("rport").is_some() {
        return flow;
    }
    let port = via.port.unwrap_or(5060);
    Flow {
        remote: SocketAddr::new(flow.remote.ip(), port),
        ..flow
    }
}

pub(super) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn starts_with_ack(b: &[u8]) -> bool {
    b.trim_ascii_start().starts_with(b"ACK ")
}

fn looks_like_response(b: &[u8]) -> bool {
    let start = b
        .iter()
        .position(|c| !matches!(c, b'\r' | b'\n'))
        .unwrap_or(b.len());
    b[start..].len() >= 4 && b[start..start + 4].eq_ignore_ascii_case(b"SIP/")
}

/// A response to a request that could not be parsed, from its raw header lines: Via, From,
/// To (given the gateway's `tag` when it has none, RFC 3261 8.2.6.2), Call-ID and CSeq as they
/// came, through the one response writer. `None` without a Via (nowhere to send it).
fn raw_response(b: &[u8], code: u16, reason: &str, tag: &str) -> Option<Bytes> {
    let mut w = ResponseWriter::new(code, reason, Some(tag));
    for line in b.split(|&c| c == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            continue;
        };
        w.copy(
            HeaderName::from_wire(line[..colon].trim_ascii()),
            line[colon + 1..].trim_ascii(),
        );
    }
    w.has_via().then(|| w.finish(&[]))
}

/// Logs a refusal at the level its fault deserves: the caller's mistakes are routine
/// (debug), the next hop's are worth noticing (info), the gateway's own are a warning.
fn log_reject(reject: &Reject) {
    match reject.fault() {
        Fault::Caller => tracing::debug!(%reject, "request refused"),
        Fault::NextHop => tracing::info!(%reject, "request failed at the next hop"),
        Fault::Gateway => tracing::warn!(%reject, "request refused by the gateway itself"),
    }
}

#[cfg(test)]
mod tests;
