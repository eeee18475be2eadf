//! The only socket code: UDP sockets, TCP and TLS listeners and connections, and the one
//! I/O loop ([`Driver`]) that owns the sans-IO [`Proxy`] and feeds it.
//!
//! UDP datagrams are received by the driver itself (no channel hop); each TCP/TLS connection
//! is a task that frames the stream and hands complete messages to the driver over one
//! bounded channel, and writes what the driver gives it. Connections are keyed by remote
//! address for reuse.
//!
//! Connections cannot be exhausted by one party ([`ConnLimiter`]): every accepted connection
//! takes a place in its transport's budget (`max_tcp_connections`, `max_tls_connections`, so
//! bare TLS connects cannot starve plain TCP), in its subscriber's share
//! (`max_connections_per_source`; IPv4 address or IPv6 /64) and in the total
//! (`max_connections`, which outbound connections share). A TLS handshake must finish within
//! `handshake_timeout`, a message that has begun within `header_timeout` (slowloris), and a
//! connection with no traffic closes after `connection_idle`. Refusals and deadline closes
//! are counted (`gatehouse_transport_refused_total`, `gatehouse_transport_closed_total`).

// The I/O side: sockets, the clock that feeds the core, the storage worker's channel.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod batch;
pub mod dns;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::ReadBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::core::Proxy;
use crate::flow::{ConnId, Destination, Flow, Transport};
use crate::sip::framer::{Frame, StreamFramer};
use crate::store::worker::{StorageWorker, StoreEvent};
use crate::store::Store;
use crate::tls;
use crate::transaction::{Transmit, TxId};

/// Sockets bound before the gateway runs (tests bind port 0 and read the addresses back).
#[derive(Debug)]
pub struct Bound {
    pub udp: Vec<Arc<UdpSocket>>,
    pub streams: Vec<(Transport, TcpListener)>,
    /// Bound addresses in the order of the configuration's `[[listen]]` tables.
    pub addrs: Vec<(Transport, SocketAddr)>,
    /// The metrics HTTP listener, when configured.
    pub metrics: Option<TcpListener>,
    /// The admin API listener, when configured.
    pub admin: Option<TcpListener>,
    /// The realm crossover home service's listener (`[crossover.home] listen`).
    pub crossover_home: Option<TcpListener>,
}

impl Bound {
    /// Binds every listener of the configuration.
    pub async fn bind(cfg: &Config) -> io::Result<Bound> {
        let mut udp = Vec::new();
        let mut streams = Vec::new();
        let mut addrs = Vec::new();
        for l in &cfg.listen {
            match l.transport {
                Transport::Udp => {
                    let s = bind_udp(l.address).map_err(|e| with_addr(e, l.address))?;
                    addrs.push((Transport::Udp, s.local_addr()?));
                    udp.push(Arc::new(s));
                }
                t => {
                    let s = TcpListener::bind(l.address)
                        .await
                        .map_err(|e| with_addr(e, l.address))?;
                    addrs.push((t, s.local_addr()?));
                    streams.push((t, s));
                }
            }
        }
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|e| with_addr(e, a))?),
            None => None,
        };
        let admin = match &cfg.admin {
            Some(a) => Some(
                TcpListener::bind(a.listen)
                    .await
                    .map_err(|e| with_addr(e, a.listen))?,
            ),
            None => None,
        };
        let crossover_home = match &cfg.crossover_home {
            Some(h) => Some(
                TcpListener::bind(h.listen)
                    .await
                    .map_err(|e| with_addr(e, h.listen))?,
            ),
            None => None,
        };
        Ok(Bound {
            udp,
            streams,
            addrs,
            metrics,
            admin,
            crossover_home,
        })
    }
}

/// The log-level control installed by `main`, if any.
fn log_control() -> Option<crate::admin::LogControl> {
    crate::LOG_CONTROL.get().cloned()
}

/// UDP socket with large kernel buffers: a burst of datagrams must wait in the socket, not
/// be dropped, while the single I/O loop works through the previous burst.
fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(UDP_BUFFER_BYTES);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// Requested UDP socket buffer size.
const UDP_BUFFER_BYTES: usize = 4 << 20;

fn with_addr(e: io::Error, addr: SocketAddr) -> io::Error {
    io::Error::new(e.kind(), format!("cannot bind {addr}: {e}"))
}

/// What connection tasks tell the driver.
enum Event {
    Message(Bytes, Flow),
    Opened {
        id: ConnId,
        transport: Transport,
        remote: SocketAddr,
        tx: mpsc::Sender<Outgoing>,
        tls: Option<gatehouse_auth::TlsInfo>,
    },
    Closed(ConnId),
    SendFailed(Vec<TxId>),
    Resolved(Transmit),
    /// DNS answered one of the core's questions.
    Located(
        u64,
        Result<Vec<Destination>, crate::core::locate::LocateError>,
    ),
    /// A caller's home answered a crossover round (or the relay gave up).
    Crossed(u64, crate::core::crossover::Answer),
}

struct Outgoing {
    bytes: Bytes,
    tx: Option<TxId>,
}

struct ConnHandle {
    transport: Transport,
    remote: SocketAddr,
    tx: mpsc::Sender<Outgoing>,
}

/// Settings shared by connection tasks.
#[derive(Clone)]
struct StreamSettings {
    idle: Duration,
    header_timeout: Duration,
    handshake_timeout: Duration,
    max_message: usize,
    limit: Arc<ConnLimiter>,
    next_id: Arc<AtomicU64>,
    events: mpsc::Sender<Event>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Where inbound connections run (TLS handshake, framing): the connection threads, never
    /// the SIP loop's ([`ConnRuntime`]).
    spawner: tokio::runtime::Handle,
}

/// The threads inbound TCP/TLS connections run on: a TLS handshake costs about a millisecond
/// of CPU, and on the loop's thread a flood of them delays every message on every transport.
/// Connection tasks talk to the loop only through channels, so moving them costs nothing
/// per message. Shut down without waiting when the driver goes (safe inside the runtime the
/// driver runs on, unlike dropping a runtime there).
struct ConnRuntime(Option<tokio::runtime::Runtime>);

/// Threads of the connection runtime.
const CONN_THREADS: usize = 2;

impl ConnRuntime {
    fn new() -> io::Result<ConnRuntime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(CONN_THREADS)
            .thread_name("gatehouse-conn")
            .enable_all()
            .build()
            .map(|rt| ConnRuntime(Some(rt)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for ConnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The places connections take: the total, a budget per inbound transport, and a share per
/// subscriber. Touched only when a connection opens or closes, never per message.
#[derive(Debug)]
pub struct ConnLimiter {
    total: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
    tls: Arc<Semaphore>,
    per_source: usize,
    sources: std::sync::Mutex<HashMap<gatehouse_auth::Subscriber, usize>>,
    /// New TLS connections per subscriber in the current one-second window.
    handshakes: std::sync::Mutex<HashMap<gatehouse_auth::Subscriber, (Instant, u32)>>,
}

/// New TLS connections (handshakes) a subscriber may open per second: each handshake costs
/// about a millisecond of CPU, so a source gets a bounded share of the connection threads.
pub const HANDSHAKES_PER_SOURCE: u32 = 50;
/// Subscribers whose handshake windows are remembered at most (older windows are dropped
/// first; a dropped window only starts afresh).
const HANDSHAKE_SOURCES: usize = 65_536;

/// Why an inbound connection was refused (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerSource,
    TcpBudget,
    TlsBudget,
    Total,
    /// More new TLS connections from the subscriber this second than it may open.
    HandshakeRate,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PerSource => "per_source",
            Refusal::TcpBudget => "tcp_budget",
            Refusal::TlsBudget => "tls_budget",
            Refusal::Total => "total",
            Refusal::HandshakeRate => "handshake_rate",
        }
    }
}

/// A connection's places; given back when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    _total: tokio::sync::OwnedSemaphorePermit,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
    source: Option<(Arc<ConnLimiter>, gatehouse_auth::Subscriber)>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some((limiter, sub)) = self.source.take() {
            limiter.release_source(sub);
        }
    }
}

impl ConnLimiter {
    pub fn new(total: usize, tcp: usize, tls: usize, per_source: usize) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            total: Arc::new(Semaphore::new(total)),
            tcp: Arc::new(Semaphore::new(tcp)),
            tls: Arc::new(Semaphore::new(tls)),
            per_source,
            sources: std::sync::Mutex::new(HashMap::new()),
            handshakes: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Counts a new TLS connection of `sub` at `now` against [`HANDSHAKES_PER_SOURCE`].
    fn handshake_allowed(&self, sub: gatehouse_auth::Subscriber, now: Instant) -> bool {
        let second = Duration::from_secs(1);
        let mut windows = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= HANDSHAKE_SOURCES && !windows.contains_key(&sub) {
            windows.retain(|_, (start, _)| now.duration_since(*start) < second);
            if windows.len() >= HANDSHAKE_SOURCES {
                // Every window is current (a flood from as many sources): this source cannot
                // be tracked, and refusing it would let the flood lock out every newcomer.
                // The TLS budget still bounds what it can take.
                return true;
            }
        }
        let (start, n) = windows.entry(sub).or_insert((now, 0));
        if now.duration_since(*start) >= second {
            *start = now;
            *n = 0;
        }
        *n += 1;
        *n <= HANDSHAKES_PER_SOURCE
    }

    fn release_source(&self, sub: gatehouse_auth::Subscriber) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = sources.get_mut(&sub) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sources.remove(&sub);
            }
        }
    }

    /// Places for an inbound connection from `remote`.
    pub fn inbound(
        self: &Arc<Self>,
        transport: Transport,
        remote: SocketAddr,
    ) -> Result<ConnPermit, Refusal> {
        let sub = gatehouse_auth::Subscriber::of(remote.ip());
        if transport == Transport::Tls && !self.handshake_allowed(sub, Instant::now()) {
            return Err(Refusal::HandshakeRate);
        }
        {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let n = sources.entry(sub).or_default();
            if *n >= self.per_source {
                return Err(Refusal::PerSource);
            }
            *n += 1;
        }
        let total = match Arc::clone(&self.total).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.release_source(sub);
                return Err(Refusal::Total);
            }
        };
        // From here on dropping the permit gives every place back.
        let mut permit = ConnPermit {
            _total: total,
            _budget: None,
            source: Some((Arc::clone(self), sub)),
        };
        let (budget, refusal) = match transport {
            Transport::Tls => (&self.tls, Refusal::TlsBudget),
            _ => (&self.tcp, Refusal::TcpBudget),
        };
        permit._budget = Some(
            Arc::clone(budget)
                .try_acquire_owned()
                .map_err(|_| refusal)?,
        );
        Ok(permit)
    }

    /// A place for an outbound connection (the total only).
    pub fn outbound(self: &Arc<Self>) -> Option<ConnPermit> {
        Some(ConnPermit {
            _total: Arc::clone(&self.total).try_acquire_owned().ok()?,
            _budget: None,
            source: None,
        })
    }
}

/// What a reload needs to know: the configuration file (and its listeners, which a reload
/// cannot change) or, for the embedded default, the policy file.
#[derive(Debug)]
pub struct Reloader {
    policy_file: Option<std::path::PathBuf>,
    config_source: Option<std::path::PathBuf>,
    /// The configuration the process started with: what only a restart changes is compared
    /// with it (and reported at every reload until the restart).
    started: Box<Config>,
    /// The log filter in force.
    log_level: String,
}

/// The keys whose change a reload does not apply (they need a restart), as written in the
/// configuration file.
pub fn restart_keys(running: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.auth, &new.auth);
    [
        (running.listen != new.listen, "listen"),
        (running.tls != new.tls, "tls"),
        (running.dns != new.dns, "dns"),
        (
            running.memory_reserve != new.memory_reserve,
            "engine.memory_reserve_mib",
        ),
        (a.store != b.store, "auth.store"),
        (a.realm != b.realm, "auth.realm"),
        (a.mechanisms != b.mechanisms, "auth.mechanisms"),
        (a.exchange_ttl != b.exchange_ttl, "auth.exchange_ttl_ms"),
        (a.max_pending != b.max_pending, "auth.max_pending"),
        (
            a.max_pending_per_source != b.max_pending_per_source,
            "auth.max_pending_per_source",
        ),
        (a.iterations != b.iterations, "auth.iterations"),
        (
            running.metrics_listen != new.metrics_listen,
            "metrics.listen",
        ),
        (running.admin != new.admin, "admin"),
        (
            running.crossover.as_ref().map(|c| {
                (
                    &c.certificate,
                    &c.private_key,
                    &c.trusted_cas,
                    &c.homes,
                    c.allow_private,
                )
            }) != new.crossover.as_ref().map(|c| {
                (
                    &c.certificate,
                    &c.private_key,
                    &c.trusted_cas,
                    &c.homes,
                    c.allow_private,
                )
            }),
            "crossover",
        ),
        (
            running.crossover_home.as_ref().map(|h| {
                (
                    h.listen,
                    &h.foreign_domains,
                    h.rate_per_domain,
                    h.max_pending,
                )
            }) != new.crossover_home.as_ref().map(|h| {
                (
                    h.listen,
                    &h.foreign_domains,
                    h.rate_per_domain,
                    h.max_pending,
                )
            }),
            "crossover.home",
        ),
        (
            running.max_connections != new.max_connections,
            "limits.max_connections",
        ),
        (
            running.max_tcp_connections != new.max_tcp_connections,
            "limits.max_tcp_connections",
        ),
        (
            running.max_tls_connections != new.max_tls_connections,
            "limits.max_tls_connections",
        ),
        (
            running.max_connections_per_source != new.max_connections_per_source,
            "limits.max_connections_per_source",
        ),
        (
            running.connection_idle != new.connection_idle,
            "limits.connection_idle_ms",
        ),
        (
            running.header_timeout != new.header_timeout,
            "limits.header_timeout_ms",
        ),
        (
            running.handshake_timeout != new.handshake_timeout,
            "limits.handshake_timeout_ms",
        ),
        (running.log_format != new.log_format, "log.format"),
        (running.peer_uri != new.peer_uri, "cluster.peer_uri"),
    ]
    .into_iter()
    .filter_map(|(changed, key)| changed.then_some(key))
    .collect()
}

/// A configuration (or policy) read and validated off the loop, waiting to be applied on it.
#[derive(Debug)]
pub enum Loaded {
    Config(Box<Config>),
    Policy(Arc<gatehouse_policy::Policy>),
}

impl Reloader {
    /// The reading half of a reload (SIGHUP and the admin API): a job that reads and
    /// validates the configuration file with its policy (resolving route names), or only the
    /// policy file for the embedded default. It runs off the loop (`spawn_blocking`); its
    /// result is applied on the loop by [`Reloader::apply`].
    pub fn prepare(&self) -> impl FnOnce() -> Result<Loaded, String> + Send + 'static {
        let config = self.config_source.clone();
        let policy = self.policy_file.clone();
        move || match (config, policy) {
            (Some(path), _) => crate::config::Config::load(&path)
                .map(|c| Loaded::Config(Box::new(c)))
                .map_err(|e| e.to_string()),
            (None, Some(path)) => crate::config::load_policy(&path)
                .map(|p| Loaded::Policy(Arc::new(p)))
                .map_err(|e| e.to_string()),
            (None, None) => Err("no configuration or policy file to reload".into()),
        }
    }

    /// The applying half: nothing changes unless everything was valid. Applied: domains,
    /// routes, trust, balancers, tunnels, policy, message and rate limits, registrar limits,
    /// timers (new transactions), lockout settings, the log level and the shutdown grace;
    /// every other changed key is named as needing a restart, in the log and the answer.
    pub fn apply(
        &mut self,
        proxy: &mut Proxy,
        loaded: Loaded,
        shutdown_grace: &mut Duration,
    ) -> Result<String, String> {
        match loaded {
            Loaded::Config(cfg) => {
                proxy.apply_config(&cfg);
                *shutdown_grace = cfg.shutdown_grace;
                self.policy_file = cfg.tunnels.policy_file.clone();
                if cfg.log_level != self.log_level {
                    // GATEHOUSE_LOG, when set, overrides the file's level (as at start).
                    match crate::LOG_CONTROL.get() {
                        Some(_) if std::env::var_os("GATEHOUSE_LOG").is_some() => {
                            tracing::warn!("log.level changed, but GATEHOUSE_LOG overrides it")
                        }
                        Some(set) => match set(&cfg.log_level) {
                            Ok(()) => {
                                tracing::info!(level = %cfg.log_level, "log level changed");
                                self.log_level = cfg.log_level.clone();
                            }
                            Err(e) => tracing::warn!(error = %e, "log level not changed"),
                        },
                        None => {}
                    }
                }
                let restart = restart_keys(&self.started, &cfg);
                for key in &restart {
                    tracing::warn!(
                        key,
                        "changed in the configuration; takes effect after a restart"
                    );
                }
                if restart.is_empty() {
                    Ok("configuration and policy".into())
                } else {
                    Ok(format!(
                        "configuration and policy; restart needed for: {}",
                        restart.join(", ")
                    ))
                }
            }
            Loaded::Policy(policy) => {
                proxy.set_policy(policy);
                Ok("policy".into())
            }
        }
    }
}

/// Deferred writes handed to the storage worker at once past this many.
const DEFER_MAX: usize = 1024;

/// A reload read off the loop, and who asked for it (the admin API waits for the outcome).
type ReloadDone = (
    Result<Loaded, String>,
    Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
);

/// Datagrams queued for one UDP socket this loop turn, and the transaction of each (failed
/// if the kernel refuses its datagram).
#[derive(Debug, Default)]
struct UdpQueue {
    datagrams: Vec<(SocketAddr, Bytes)>,
    txs: Vec<Option<TxId>>,
}

/// The I/O loop: owns the proxy core, the UDP sockets and the connection table.
pub struct Driver {
    proxy: Proxy,
    udp: Vec<Arc<UdpSocket>>,
    udp_local: Vec<SocketAddr>,
    /// Datagrams to send per UDP socket, sent with one `sendmmsg` per socket at the end of
    /// each loop turn ([`Driver::flush_udp`]).
    udp_out: Vec<UdpQueue>,
    /// Buffers of `recvmmsg` and the datagrams one read returned.
    recv_bufs: batch::RecvBuffers,
    received: Vec<(Bytes, SocketAddr)>,
    conns: HashMap<ConnId, ConnHandle>,
    by_remote: HashMap<(Transport, SocketAddr), ConnId>,
    settings: StreamSettings,
    events: mpsc::Receiver<Event>,
    /// RFC 3263 location of next hops named by host (tasks, off the loop).
    locator: dns::Locator,
    tls: tls::TlsContext,
    accept_tasks: Vec<JoinHandle<()>>,
    /// The threads inbound connections run on (shut down with the driver).
    _conn_runtime: ConnRuntime,
    shutdown_grace: Duration,
    rotate: usize,
    reloader: Reloader,
    metrics: Arc<crate::metrics::Metrics>,
    admin: Option<mpsc::Receiver<crate::admin::Command>>,
    /// The realm crossover relay client (foreign side), when `[crossover] enabled`.
    relay: Option<crate::crossover::relay::Relay>,
    /// The realm crossover home service, when `[crossover.home]` is configured.
    crossover_home: Option<Arc<crate::crossover::home::HomeService>>,
    /// The storage worker (its own thread) and what it reports.
    storage: Option<StorageWorker>,
    store_events: mpsc::UnboundedReceiver<StoreEvent>,
    /// Transmits waiting for a durable batch's commit, in order, each with the batch number
    /// it waits for.
    held: std::collections::VecDeque<(u64, Transmit)>,
    /// The last durable batch submitted, and the last batch the worker acknowledged.
    hold_until: u64,
    committed: u64,
    /// Writes not yet handed to the worker (see `flush`).
    deferred: Vec<crate::core::persist::StoreWrite>,
    reloads: (
        mpsc::UnboundedSender<ReloadDone>,
        mpsc::UnboundedReceiver<ReloadDone>,
    ),
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("conns", &self.conns.len())
            .finish()
    }
}

impl Driver {
    /// The loop for `proxy` on `bound` sockets; `store` goes to the storage worker's thread.
    pub fn new(cfg: &Config, proxy: Proxy, bound: Bound, store: Store) -> io::Result<Driver> {
        let (events_tx, events) = mpsc::channel(8192);
        let conn_runtime = ConnRuntime::new()?;
        let settings = StreamSettings {
            idle: cfg.connection_idle,
            header_timeout: cfg.header_timeout,
            handshake_timeout: cfg.handshake_timeout,
            max_message: cfg.limits.max_message_bytes,
            limit: ConnLimiter::new(
                cfg.max_connections,
                cfg.max_tcp_connections,
                cfg.max_tls_connections,
                cfg.max_connections_per_source,
            ),
            next_id: Arc::new(AtomicU64::new(1)),
            events: events_tx,
            metrics: proxy.metrics(),
            spawner: conn_runtime.handle(),
        };
        let tls = tls::TlsContext::from_config(cfg)?;
        let mut accept_tasks = Vec::new();
        let metrics = proxy.metrics();
        let admin = match (bound.admin, &cfg.admin, &cfg.auth.store) {
            (Some(listener), Some(settings), Some(store_path)) => {
                let store = crate::store::Store::open(store_path)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let (tx, rx) = mpsc::channel(64);
                let state = Arc::new(crate::admin::AdminState::new(
                    &settings.realm,
                    store,
                    settings.session_idle,
                    tx,
                    log_control(),
                    Arc::clone(&metrics),
                    &cfg.auth,
                ));
                let acceptor = if settings.tls { tls.acceptor() } else { None };
                tokio::spawn(crate::admin::serve(listener, state, acceptor));
                Some(rx)
            }
            _ => None,
        };
        if let Some(listener) = bound.metrics {
            // Not an accept task: it keeps answering (/readyz = 503) while the gateway drains.
            tokio::spawn(crate::metrics::serve(listener, Arc::clone(&metrics)));
        }
        for (transport, listener) in bound.streams {
            let acceptor = match transport {
                Transport::Tls => Some(tls.acceptor().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "tls listener without [tls]")
                })?),
                _ => None,
            };
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                transport,
                acceptor,
                settings.clone(),
            )));
        }
        let udp_local = bound
            .udp
            .iter()
            .map(|s| s.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let (store_tx, store_events) = mpsc::unbounded_channel();
        let peer = proxy.config().peer_uri.clone();
        // The crossover home's fake verifiers are the SIP side's (same key, same users).
        let xover_secret = match &cfg.crossover_home {
            Some(_) => Some(
                store
                    .key("fake-verifier")
                    .map_err(|e| io::Error::other(e.to_string()))?,
            ),
            None => None,
        };
        let storage = StorageWorker::start(store, Arc::clone(&metrics), store_tx, peer.as_deref())?;
        let mut usable: Vec<Transport> = cfg.listen.iter().map(|l| l.transport).collect();
        usable.dedup();
        let locator = dns::Locator::new(&cfg.dns, usable);
        let relay = match &cfg.crossover {
            Some(x) => Some(crate::crossover::relay::Relay::new(x, locator.clone())?),
            None => None,
        };
        let crossover_home = match (
            bound.crossover_home,
            &cfg.crossover_home,
            &cfg.tls,
            xover_secret,
        ) {
            (Some(listener), Some(h), Some(tls_files), Some(secret)) => {
                let home = Arc::new(crate::crossover::home::HomeService::new(
                    h,
                    &cfg.auth,
                    secret,
                    proxy.credentials().clone(),
                    Arc::clone(&metrics),
                    proxy.outward_calls(),
                )?);
                let acceptor = home.acceptor(tls_files)?;
                tokio::spawn(crate::crossover::home::serve(
                    listener,
                    Arc::clone(&home),
                    acceptor,
                ));
                Some(home)
            }
            _ => None,
        };
        Ok(Driver {
            relay,
            crossover_home,
            proxy,
            locator,
            udp: bound.udp,
            udp_out: (0..udp_local.len()).map(|_| UdpQueue::default()).collect(),
            udp_local,
            recv_bufs: batch::RecvBuffers::default(),
            received: Vec::with_capacity(batch::RECV_BATCH),
            conns: HashMap::new(),
            by_remote: HashMap::new(),
            settings,
            events,
            tls,
            accept_tasks,
            _conn_runtime: conn_runtime,
            shutdown_grace: cfg.shutdown_grace,
            rotate: 0,
            reloader: Reloader {
                policy_file: cfg.tunnels.policy_file.clone(),
                config_source: cfg.source.clone(),
                started: Box::new(cfg.clone()),
                log_level: cfg.log_level.clone(),
            },
            metrics,
            admin,
            storage: Some(storage),
            store_events,
            held: std::collections::VecDeque::new(),
            hold_until: 0,
            committed: 0,
            deferred: Vec::new(),
            reloads: mpsc::unbounded_channel(),
        })
    }

    /// Runs until `shutdown` resolves, then drains running transactions up to the grace time.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut buf = vec![0u8; 65_536];
        tokio::pin!(shutdown);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut sync = tokio::time::interval(Duration::from_millis(250));
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.metrics.ready.store(true, Ordering::Relaxed);
        let mut draining_until: Option<Instant> = None;
        loop {
            self.flush();
            if let Some(deadline) = draining_until {
                if self.proxy.is_idle() || Instant::now() >= deadline {
                    break;
                }
            }
            let timer_at = self
                .proxy
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let drain_at =
                draining_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let udp = &self.udp;
            let rotate = self.rotate;
            tokio::select! {
                biased;
                _ = &mut shutdown, if draining_until.is_none() => {
                    tracing::info!("shutdown requested: refusing new requests, draining transactions");
                    self.proxy.begin_shutdown();
                    self.metrics.ready.store(false, Ordering::Relaxed);
                    for t in &self.accept_tasks {
                        t.abort();
                    }
                    draining_until = Some(Instant::now() + self.shutdown_grace);
                }
                Some(ev) = self.store_events.recv() => self.on_store_event(ev),
                ev = self.events.recv() => {
                    if let Some(ev) = ev {
                        self.on_event(ev);
                    }
                }
                (idx, res) = std::future::poll_fn(|cx| poll_udp(udp, rotate, cx, &mut buf)) => {
                    self.rotate = self.rotate.wrapping_add(1);
                    if let Ok((n, from)) = res {
                        self.on_datagram(idx, Bytes::copy_from_slice(&buf[..n]), from);
                        self.drain_udp(idx);
                    }
                }
                _ = tokio::time::sleep_until(timer_at.into()) => {
                    let t0 = Instant::now();
                    self.proxy.handle_timeout(t0);
                    self.metrics.loop_tick.observe(t0.elapsed().as_secs_f64());
                }
                Some((loaded, reply)) = self.reloads.1.recv() => {
                    let (proxy, reloader) = (&mut self.proxy, &mut self.reloader);
                    let outcome = match loaded {
                        Ok(l) => {
                            let grace = &mut self.shutdown_grace;
                            contained(&self.metrics, "reload", || reloader.apply(proxy, l, grace))
                        }
                            .unwrap_or_else(|| Err("internal error".into())),
                        Err(e) => Err(e),
                    };
                    if let (Ok(_), Some(home)) = (&outcome, &self.crossover_home) {
                        // Key rotation: the files are read off the loop; a bad file keeps the
                        // keys in force.
                        let home = Arc::clone(home);
                        tokio::task::spawn_blocking(move || match home.reload_keys() {
                            Ok(()) => tracing::info!("crossover home keys reloaded"),
                            Err(e) => tracing::error!(error = %e, "crossover home keys not reloaded; the keys in force stay"),
                        });
                    }
                    match &outcome {
                        Ok(what) => tracing::info!(%what, "reloaded"),
                        Err(e) => tracing::error!(error = %e, "reload refused; the configuration in force stays"),
                    }
                    if let Some(tx) = reply {
                        let _ = tx.send(outcome);
                    }
                }
                _ = tokio::time::sleep_until(drain_at.into()), if draining_until.is_some() => {}
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.start_reload(None);
                }
                Some(cmd) = async { match self.admin.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                    match cmd {
                        crate::admin::Command::Reload(tx) => self.start_reload(Some(tx)),
                        crate::admin::Command::UsersChanged => {
                            if let Some(s) = &self.storage {
                                s.refresh_credentials();
                            }
                        }
                        cmd => {
                            let connections = self.conns.len();
                            let proxy = &mut self.proxy;
                            contained(&self.metrics, "admin", || {
                                crate::admin::execute(proxy, cmd, connections)
                            });
                        }
                    }
                }
                _ = sync.tick() => {
                    let t0 = Instant::now();
                    self.submit_deferred();
                    self.proxy.maintain(t0);
                    self.proxy.sync_metrics();
                    self.metrics.connections.set(self.conns.len() as i64);
                    self.metrics.loop_tick.observe(t0.elapsed().as_secs_f64());
                }
            }
        }
        // Whatever the last inputs changed goes to the worker; the worker commits everything
        // queued before its thread ends; then the held transmits may leave.
        self.flush();
        self.submit_deferred();
        if let Some(storage) = self.storage.take() {
            storage.close().await;
        }
        while let Ok(ev) = self.store_events.try_recv() {
            self.on_store_event(ev);
        }
        self.release(u64::MAX);
        tracing::info!(transactions = self.proxy.transactions(), "gateway stopped");
    }

    /// Hands the deferred writes to the storage worker; returns their batch number.
    fn submit_deferred(&mut self) -> Option<u64> {
        if self.deferred.is_empty() {
            return None;
        }
        let writes = std::mem::take(&mut self.deferred);
        self.storage.as_mut().and_then(|s| s.submit(writes))
    }

    /// Reads the configuration off the loop; the outcome comes back through `reloads`.
    fn start_reload(
        &mut self,
        reply: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
    ) {
        let job = self.reloader.prepare();
        let done = self.reloads.0.clone();
        tokio::task::spawn_blocking(move || {
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
                .unwrap_or_else(|_| Err("internal error while reading the configuration".into()));
            let _ = done.send((loaded, reply));
        });
    }

    fn on_store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Committed(seq) => self.release(seq),
            StoreEvent::TunnelGone {
                call_id,
                caller_tag,
            } => self.proxy.forget_tunnel(&call_id, &caller_tag),
            StoreEvent::TunnelKeys { keys, read_unix } => {
                self.proxy.resync_tunnels(keys, read_unix)
            }
            StoreEvent::AuthOutcome {
                user,
                source,
                success,
            } => self
                .proxy
                .remote_auth_outcome(user.as_deref(), source, success, Instant::now()),
            StoreEvent::Bindings { aor, records } => {
                self.proxy.stored_bindings(&aor, records, Instant::now())
            }
            StoreEvent::AllBindings(stored) => {
                self.proxy.all_stored_bindings(stored, Instant::now())
            }
            StoreEvent::Reservations(outcomes) => {
                let now = Instant::now();
                for r in outcomes {
                    self.proxy
                        .reservation_outcome(&r.call_id, &r.caller_tag, r.refused, now);
                }
            }
            StoreEvent::Peers(peers) => {
                tracing::info!(
                    peers = peers.len(),
                    "gateways connected to the store changed"
                );
                self.metrics.cluster_peers.set(peers.len() as i64);
                self.proxy.set_live_peers(peers)
            }
            StoreEvent::Credentials(c) => {
                tracing::info!(users = c.len(), "credentials refreshed from the store");
                if let Some(home) = &self.crossover_home {
                    home.set_credentials(c.clone());
                }
                self.proxy.set_credentials(c);
            }
        }
    }

    /// The worker committed every batch up to `seq`: what waited for them leaves, in order.
    fn release(&mut self, seq: u64) {
        self.committed = self.committed.max(seq);
        while self.held.front().is_some_and(|(s, _)| *s <= self.committed) {
            if let Some((_, t)) = self.held.pop_front() {
                self.dispatch(t);
            }
        }
        self.metrics.store_held.set(self.held.len() as i64);
    }

    /// After one readable event, read what else is queued on that socket (bounded). What the
    /// batch produced is sent once it is done (the loop flushes), so tunnel commits that must
    /// precede their 200s are grouped into one store transaction per batch.
    /// Reads with `recvmmsg` ([`batch::recv_batch`]), at most 63 more datagrams per wake-up.
    fn drain_udp(&mut self, idx: usize) {
        let sock = Arc::clone(&self.udp[idx]);
        let mut left = 63;
        while left > 0 {
            let mut got = std::mem::take(&mut self.received);
            let asked = left.min(batch::RECV_BATCH);
            let n = match batch::recv_batch(&sock, &mut self.recv_bufs, asked, &mut got) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive failed");
                    0
                }
            };
            for (data, from) in got.drain(..) {
                self.on_datagram(idx, data, from);
            }
            self.received = got;
            if n < asked {
                break;
            }
            left -= n;
        }
    }

    fn on_datagram(&mut self, idx: usize, data: Bytes, from: SocketAddr) {
        let local = self.udp_local[idx];
        if data.iter().all(|&c| matches!(c, b'\r' | b'\n' | b' ' | 0)) {
            return; // keep-alive datagram
        }
        let flow = Flow {
            transport: Transport::Udp,
            local,
            remote: from,
            conn: None,
        };
        self.message(data, flow);
    }

    /// One received message through the core, timed (`gatehouse_loop_message_seconds`).
    fn message(&mut self, bytes: Bytes, flow: Flow) {
        let t0 = Instant::now();
        self.proxy.handle_message(bytes, flow, t0);
        self.metrics
            .loop_message
            .observe(t0.elapsed().as_secs_f64());
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Message(bytes, flow) => self.message(bytes, flow),
            Event::Opened {
                id,
                transport,
                remote,
                tx,
                tls,
            } => {
                if let Some(info) = tls {
                    self.proxy.set_connection_tls(id, info);
                }
                self.by_remote.insert((transport, remote), id);
                self.conns.insert(
                    id,
                    ConnHandle {
                        transport,
                        remote,
                        tx,
                    },
                );
            }
            Event::Closed(id) => {
                self.proxy.connection_closed(id);
                if let Some(h) = self.conns.remove(&id) {
                    if self.by_remote.get(&(h.transport, h.remote)) == Some(&id) {
                        self.by_remote.remove(&(h.transport, h.remote));
                    }
                }
            }
            Event::SendFailed(txs) => {
                for tx in txs {
                    self.proxy.handle_transport_error(tx, Instant::now());
                }
            }
            Event::Resolved(t) => self.dispatch(t),
            Event::Located(id, result) => self.proxy.handle_located(id, result, Instant::now()),
            Event::Crossed(id, answer) => self.proxy.handle_crossover(id, answer, Instant::now()),
        }
    }

    /// Hands the core's writes to the storage worker, then sends what the core produced. A
    /// durable batch (a tunnel established) holds every transmit from here on until the
    /// worker has committed (or journaled) it: the tunnel's 200 never leaves before the
    /// tunnel is on disk, and nothing overtakes it (a retransmitted 200 included). Other
    /// writes are deferred to the next durable batch or the 250 ms tick (a crash may lose
    /// them: a proposal, a removal the admin API can redo, a binding the endpoint renews).
    fn flush(&mut self) {
        if let Some(batch) = self.proxy.take_writes() {
            // Writes that hold nothing back (proposals, removals, bindings) wait for the next
            // durable batch or tick, so the worker wakes and commits once for many of them;
            // order is kept, since everything goes through the one queue in sequence.
            self.deferred.extend(batch.writes);
            if batch.durable || batch.urgent || self.deferred.len() >= DEFER_MAX {
                let seq = self.submit_deferred();
                if let (Some(seq), true) = (seq, batch.durable) {
                    self.hold_until = seq;
                }
            }
        }
        while let Some(lookup) = self.proxy.poll_lookup() {
            let locator = self.locator.clone();
            let events = self.settings.events.clone();
            tokio::spawn(async move {
                let result = locator.locate(&lookup.query).await;
                let _ = events.send(Event::Located(lookup.id, result)).await;
            });
        }
        while let Some(question) = self.proxy.poll_crossover() {
            let events = self.settings.events.clone();
            let id = question.id;
            match &self.relay {
                Some(relay) => {
                    let relay = relay.clone();
                    tokio::spawn(async move {
                        let answer = relay.ask(question).await;
                        let _ = events.send(Event::Crossed(id, answer)).await;
                    });
                }
                None => self.proxy.handle_crossover(
                    id,
                    crate::core::crossover::Answer::Failed("unconfigured"),
                    Instant::now(),
                ),
            }
        }
        let hold = self.hold_until > self.committed;
        while let Some(t) = self.proxy.poll_transmit() {
            if hold {
                self.held.push_back((self.hold_until, t));
            } else {
                self.dispatch(t);
            }
        }
        if hold {
            self.metrics.store_held.set(self.held.len() as i64);
        }
        self.flush_udp();
    }

    fn dispatch(&mut self, t: Transmit) {
        match t.dest.clone() {
            Destination::Flow(flow) => match flow.transport {
                Transport::Udp => self.send_udp(Some(flow.local), flow.remote, t),
                transport => {
                    let id = flow
                        .conn
                        .filter(|id| self.conns.contains_key(id))
                        .or_else(|| self.by_remote.get(&(transport, flow.remote)).copied());
                    match id {
                        Some(id) => self.send_conn(id, t),
                        None => self.fail(t.tx),
                    }
                }
            },
            Destination::Addr {
                transport: Transport::Udp,
                addr,
                ..
            } => self.send_udp(None, addr, t),
            Destination::Addr {
                transport,
                addr,
                server_name,
            } => {
                let id = match self.by_remote.get(&(transport, addr)) {
                    Some(id) => *id,
                    None => self.connect(transport, addr, server_name),
                };
                self.send_conn(id, t);
            }
            Destination::Name { .. } => {
                // A stateless message (an ACK for a 2xx, a response to a named Via): the
                // first address DNS gives. Requests are located by the core before they get
                // here, with failover.
                let events = self.settings.events.clone();
                let locator = self.locator.clone();
                let Some(query) = t.dest.query() else {
                    return;
                };
                tokio::spawn(async move {
                    let first = locator
                        .locate(&query)
                        .await
                        .ok()
                        .and_then(|hops| hops.into_iter().next());
                    let ev = match first {
                        Some(dest) => Event::Resolved(Transmit { dest, ..t }),
                        None => Event::SendFailed(t.tx.into_iter().collect()),
                    };
                    let _ = events.send(ev).await;
                });
            }
        }
    }

    fn send_udp(&mut self, local: Option<SocketAddr>, to: SocketAddr, t: Transmit) {
        let idx = self
            .udp_local
            .iter()
            .position(|a| Some(*a) == local)
            .or_else(|| {
                self.udp_local
                    .iter()
                    .position(|a| a.is_ipv4() == to.is_ipv4())
            });
        let Some(i) = idx else {
            self.fail(t.tx);
            return;
        };
        let q = &mut self.udp_out[i];
        q.datagrams.push((to, t.bytes));
        q.txs.push(t.tx);
    }

    /// Sends the datagrams queued this loop turn, one `sendmmsg` per socket and batch. A
    /// datagram the kernel refuses fails its transaction (16.9: 503 for the branch); when the
    /// socket buffer is full the rest go from a task that waits for room, never the loop.
    fn flush_udp(&mut self) {
        for i in 0..self.udp_out.len() {
            if self.udp_out[i].datagrams.is_empty() {
                continue;
            }
            let mut q = std::mem::take(&mut self.udp_out[i]);
            let sock = Arc::clone(&self.udp[i]);
            let mut start = 0;
            while start < q.datagrams.len() {
                let done = batch::send_batch(&sock, &q.datagrams[start..]);
                start += done.sent;
                if let Some(e) = done.refused {
                    tracing::debug!(error = %e, to = %q.datagrams[start].0, "udp send failed");
                    self.fail(q.txs[start]);
                    start += 1;
                } else if done.blocked {
                    let rest = q.datagrams.split_off(start);
                    let sock = Arc::clone(&sock);
                    tokio::spawn(async move {
                        for (to, bytes) in rest {
                            let _ = sock.send_to(&bytes, to).await;
                        }
                    });
                    break;
                }
            }
            q.datagrams.clear();
            q.txs.clear();
            // Keep the allocations for the next turn.
            self.udp_out[i] = q;
        }
    }

    fn send_conn(&mut self, id: ConnId, t: Transmit) {
        let Some(h) = self.conns.get(&id) else {
            self.fail(t.tx);
            return;
        };
        if h.tx
            .try_send(Outgoing {
                bytes: t.bytes,
                tx: t.tx,
            })
            .is_err()
        {
            self.fail(t.tx);
        }
    }

    fn fail(&mut self, tx: Option<TxId>) {
        if let Some(tx) = tx {
            self.proxy.handle_transport_error(tx, Instant::now());
        }
    }

    /// Opens an outbound connection; messages queue on its channel until it is up.
    fn connect(
        &mut self,
        transport: Transport,
        addr: SocketAddr,
        server_name: Option<Box<str>>,
    ) -> ConnId {
        let id = self.settings.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        self.by_remote.insert((transport, addr), id);
        self.conns.insert(
            id,
            ConnHandle {
                transport,
                remote: addr,
                tx,
            },
        );
        let settings = self.settings.clone();
        let connector = self.tls.connector();
        tokio::spawn(async move {
            let Some(permit) = settings.limit.outbound() else {
                fail_queued(rx, &settings, id).await;
                return;
            };
            let stream =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await;
            let stream = match stream {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%addr, "connect failed");
                    fail_queued(rx, &settings, id).await;
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(addr);
            match transport {
                Transport::Tls => {
                    let Some(connector) = connector else {
                        fail_queued(rx, &settings, id).await;
                        return;
                    };
                    let name = tls::server_name(server_name.as_deref(), addr);
                    match connector.connect(name, stream).await {
                        Ok(s) => {
                            serve_conn(s, id, transport, local, addr, rx, settings, permit).await
                        }
                        Err(_) => fail_queued(rx, &settings, id).await,
                    }
                }
                _ => serve_conn(stream, id, transport, local, addr, rx, settings, permit).await,
            }
        });
        id
    }
}

/// Runs a step of the loop that is not one message's handling (a reload, an admin command)
/// with a panic contained: counted in `gatehouse_internal_errors_total{area}`, logged, and the
/// loop goes on (the proxy core contains its own per-message panics).
fn contained<T>(
    metrics: &crate::metrics::Metrics,
    area: &'static str,
    f: impl FnOnce() -> T,
) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            metrics.internal_errors.with_label_values(&[area]).inc();
            tracing::error!(area, "panic contained; the gateway goes on");
            None
        }
    }
}

async fn fail_queued(mut rx: mpsc::Receiver<Outgoing>, settings: &StreamSettings, id: ConnId) {
    rx.close();
    let mut failed = Vec::new();
    while let Ok(m) = rx.try_recv() {
        failed.extend(m.tx);
    }
    let _ = settings.events.send(Event::Closed(id)).await;
    let _ = settings.events.send(Event::SendFailed(failed)).await;
}

fn poll_udp(
    socks: &[Arc<UdpSocket>],
    rotate: usize,
    cx: &mut TaskContext<'_>,
    buf: &mut [u8],
) -> Poll<(usize, io::Result<(usize, SocketAddr)>)> {
    let n = socks.len();
    for k in 0..n {
        let i = (rotate + k) % n;
        let mut rb = ReadBuf::new(buf);
        match socks[i].poll_recv_from(cx, &mut rb) {
            Poll::Ready(Ok(from)) => return Poll::Ready((i, Ok((rb.filled().len(), from)))),
            Poll::Ready(Err(e)) => return Poll::Ready((i, Err(e))),
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    settings: StreamSettings,
) {
    // Out of descriptors (EMFILE), accept fails at once for as long as it lasts: back off
    // instead of spinning the thread the SIP loop shares (`http_guard::accept`).
    let (mut backoff, mut reserve) = (Duration::ZERO, None);
    loop {
        let (stream, remote) =
            crate::http_guard::accept(&listener, &mut backoff, &mut reserve).await;
        let permit = match settings.limit.inbound(transport, remote) {
            Ok(p) => p,
            Err(refusal) => {
                settings
                    .metrics
                    .connections_refused
                    .with_label_values(&[refusal.label()])
                    .inc();
                tracing::debug!(%remote, reason = refusal.label(), "connection refused");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let settings = settings.clone();
        let acceptor = acceptor.clone();
        // The connection (its TLS handshake first) runs on the connection threads. The
        // stream was registered with this runtime's reactor: hand it over as a std socket.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let spawner = settings.spawner.clone();
        spawner.spawn(async move {
            let Ok(stream) = TcpStream::from_std(stream) else {
                return;
            };
            let local = stream.local_addr().unwrap_or(remote);
            let id = settings.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(1024);
            match acceptor {
                Some(acc) => {
                    let hs =
                        tokio::time::timeout(settings.handshake_timeout, acc.accept(stream)).await;
                    let tls = match hs {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(_)) => {
                            tracing::debug!(%remote, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            settings
                                .metrics
                                .connections_closed
                                .with_label_values(&["handshake_deadline"])
                                .inc();
                            tracing::debug!(%remote, "TLS handshake deadline passed");
                            return;
                        }
                    };
                    let info = tls::channel_binding(tls.get_ref().1);
                    let opened = Event::Opened {
                        id,
                        transport,
                        remote,
                        tx,
                        tls: Some(info),
                    };
                    if settings.events.send(opened).await.is_ok() {
                        serve_conn(tls, id, transport, local, remote, rx, settings, permit).await;
                    }
                }
                None => {
                    if settings
                        .events
                        .send(Event::Opened {
                            id,
                            transport,
                            remote,
                            tx,
                            tls: None,
                        })
                        .await
                        .is_ok()
                    {
                        serve_conn(stream, id, transport, local, remote, rx, settings, permit)
                            .await;
                    }
                }
            }
        });
    }
}

/// One connection: frames incoming bytes into messages for the driver, writes outgoing
/// messages, answers RFC 5626 pings, closes when idle. The permit bounds the connection count.
#[allow(clippy::too_many_arguments)]
async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    id: ConnId,
    transport: Transport,
    local: SocketAddr,
    remote: SocketAddr,
    mut rx: mpsc::Receiver<Outgoing>,
    settings: StreamSettings,
    _permit: ConnPermit,
) {
    let flow = Flow {
        transport,
        local,
        remote,
        conn: Some(id),
    };
    let mut framer = StreamFramer::new(settings.max_message);
    let mut failed: Vec<TxId> = Vec::new();
    // Deadline of the message being received (armed by its first byte).
    let mut message_deadline: Option<tokio::time::Instant> = None;
    let closed = |reason: &str| {
        settings
            .metrics
            .connections_closed
            .with_label_values(&[reason])
            .inc();
    };
    'conn: loop {
        let idle_at = tokio::time::Instant::now() + settings.idle;
        tokio::select! {
            r = stream.read_buf(framer.buffer()) => {
                match r {
                    Ok(0) | Err(_) => break 'conn,
                    Ok(_) => loop {
                        match framer.next_frame() {
                            Ok(Some(Frame::Message(bytes))) => {
                                if settings.events.send(Event::Message(bytes, flow)).await.is_err() {
                                    break 'conn;
                                }
                            }
                            Ok(Some(Frame::Ping)) => {
                                if stream.write_all(b"\r\n").await.is_err() {
                                    break 'conn;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(%remote, error = %e, "closing unframeable stream");
                                break 'conn;
                            }
                        }
                    },
                }
                message_deadline = match (framer.pending(), message_deadline) {
                    (0, _) => None,
                    (_, Some(d)) => Some(d),
                    (_, None) => Some(tokio::time::Instant::now() + settings.header_timeout),
                };
            }
            out = rx.recv() => match out {
                Some(m) => {
                    if stream.write_all(&m.bytes).await.is_err() {
                        failed.extend(m.tx);
                        break 'conn;
                    }
                }
                None => break 'conn,
            },
            _ = tokio::time::sleep_until(message_deadline.map_or(idle_at, |d| d.min(idle_at))) => {
                if message_deadline.is_some_and(|d| d <= idle_at) {
                    tracing::debug!(%remote, "message not complete within the header deadline: closing");
                    closed("header_deadline");
                } else {
                    closed("idle");
                }
                break 'conn;
            }
        }
    }
    let _ = stream.shutdown().await;
    rx.close();
    while let Ok(m) = rx.try_recv() {
        failed.extend(m.tx);
    }
    let _ = settings.events.send(Event::Closed(id)).await;
    if !failed.is_empty() {
        let _ = settings.events.send(Event::SendFailed(failed)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tls_connections_are_rate_limited_per_source() {
        let limiter = ConnLimiter::new(10_000, 10_000, 10_000, 10_000);
        let t0 = Instant::now();
        let a = gatehouse_auth::Subscriber::of("192.0.2.1".parse().unwrap());
        let b = gatehouse_auth::Subscriber::of("192.0.2.2".parse().unwrap());
        for _ in 0..HANDSHAKES_PER_SOURCE {
            assert!(limiter.handshake_allowed(a, t0));
        }
        assert!(!limiter.handshake_allowed(a, t0), "over the source's rate");
        assert!(
            limiter.handshake_allowed(b, t0),
            "another source is not affected"
        );
        assert!(
            limiter.handshake_allowed(a, t0 + Duration::from_secs(1)),
            "a new second, a new allowance"
        );
    }
}
