//! Configuration: TOML with unknown keys refused, validated into the types the gateway
//! runs on. Every error names the line and the key at fault.

pub mod crossover;
pub mod route;

use route::{destination_of, Route, RouteTable};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::flow::Transport;
use crate::sip::{Limits, Scheme, Uri};
use crate::transaction::TimerConfig;

/// The configuration compiled into the binary: a gateway for `org.example` on loopback.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A configuration error with its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}: {key}: {message}")]
pub struct ConfigError {
    pub origin: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    sip: RawSip,
    #[serde(default)]
    listen: Vec<RawListen>,
    tls: Option<RawTls>,
    #[serde(default)]
    timers: RawTimers,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    trust: RawTrust,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    registrar: RawRegistrar,
    #[serde(default)]
    tunnels: RawTunnels,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    rate_limit: RawRateLimit,
    #[serde(default)]
    topology: RawTopology,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    crossover: crossover::RawCrossover,
    #[serde(default)]
    engine: RawEngine,
}

/// `[engine]`: how the process runs (read at start; a reload reports a change as needing a
/// restart).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEngine {
    memory_reserve_mib: Spanned<usize>,
}

impl Default for RawEngine {
    fn default() -> Self {
        RawEngine {
            memory_reserve_mib: unset(64),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    servers: Vec<Spanned<String>>,
    timeout_ms: Spanned<u64>,
    attempts: Spanned<usize>,
}

impl Default for RawDns {
    fn default() -> Self {
        let d = DnsSettings::default();
        RawDns {
            servers: Vec::new(),
            timeout_ms: unset(d.timeout.as_millis() as u64),
            attempts: unset(d.attempts),
        }
    }
}

/// How next hops named by host are located (`[dns]`; RFC 3263 NAPTR, SRV, A/AAAA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers to ask (address, port 53 unless given); empty: `/etc/resolv.conf`.
    pub servers: Vec<SocketAddr>,
    /// How long one question waits for one server.
    pub timeout: Duration,
    /// How many times a question is asked before the name counts as unresolvable.
    pub attempts: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRateLimit {
    enabled: bool,
    requests: Spanned<u32>,
    window_ms: Spanned<u64>,
    ban_ms: Spanned<u64>,
    max_sources: Spanned<usize>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        let d = RateLimitSettings::default();
        RawRateLimit {
            enabled: d.enabled,
            requests: Spanned::new(0..0, d.requests),
            window_ms: Spanned::new(0..0, d.window.as_millis() as u64),
            ban_ms: unset(d.ban.as_millis() as u64),
            max_sources: Spanned::new(0..0, d.max_sources),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    balancers: Vec<Spanned<String>>,
    peer_uri: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    #[serde(default)]
    hide: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    realm: Option<String>,
    #[serde(default)]
    tls: bool,
    session_idle_s: Option<Spanned<u64>>,
    #[serde(default)]
    allow_remote_plain_http: bool,
}

/// Admin API settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub realm: String,
    /// Serve over TLS with the `[tls]` certificate (SCRAM-SHA-256-PLUS then).
    pub tls: bool,
    pub session_idle: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnels {
    policy: Option<Spanned<PathBuf>>,
    #[serde(default)]
    internal_networks: Vec<Spanned<String>>,
    #[serde(default)]
    public_endpoints: std::collections::BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    register_from_outside: Vec<Spanned<String>>,
}

/// Tunnel settings.
#[derive(Debug, Clone, Default)]
pub struct TunnelSettings {
    /// Policy file (reloaded on SIGHUP); `None` = trusted sources only.
    pub policy_file: Option<PathBuf>,
    /// Networks of the inside: a PSK may be handed over plain UDP/TCP only to these.
    pub internal_networks: Vec<ipnet::IpNet>,
    /// Public WireGuard endpoint published for an internal AOR (`sip:vpn@org.example`).
    pub public_endpoints: std::collections::HashMap<String, SocketAddr>,
    /// Tunnel targets that may register from outside the internal networks and trusted
    /// sources (AOR keys, `sip:user@domain`); every other AOR the policy lets receive
    /// tunnels (and so PSKs) registers from the inside only.
    pub register_from_outside: std::collections::HashSet<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    realm: Option<Spanned<String>>,
    mechanisms: Spanned<Vec<String>>,
    store: Option<Spanned<PathBuf>>,
    exchange_ttl_ms: Spanned<u64>,
    max_pending: Spanned<usize>,
    max_pending_per_source: Spanned<usize>,
    iterations: Spanned<u32>,
    failures_before_lockout: Spanned<u32>,
    failure_window_ms: Spanned<u64>,
    lockout_ms: Spanned<u64>,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            realm: None,
            mechanisms: Spanned::new(
                0..0,
                vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
            ),
            store: None,
            exchange_ttl_ms: unset(30_000),
            max_pending: unset(10_000),
            max_pending_per_source: unset(32),
            iterations: unset(4096),
            failures_before_lockout: unset(5),
            failure_window_ms: unset(60_000),
            lockout_ms: unset(300_000),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRegistrar {
    min_expires_s: Spanned<u32>,
    max_expires_s: Spanned<u32>,
    default_expires_s: Spanned<u32>,
    max_bindings_per_aor: Spanned<usize>,
}

impl Default for RawRegistrar {
    fn default() -> Self {
        RawRegistrar {
            min_expires_s: unset(60),
            max_expires_s: unset(7200),
            default_expires_s: unset(3600),
            max_bindings_per_aor: unset(8),
        }
    }
}

/// The table (`[sip]`, `[[listen]]`) the byte offset `at` of the text is in, by the last
/// table header before it.
fn table_at(text: &str, at: usize) -> Option<String> {
    text.get(..at)?
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
}

/// A default value: written nowhere (its span is empty).
fn unset<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}

/// Authentication settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub realm: String,
    pub mechanisms: Vec<gatehouse_auth::Mechanism>,
    /// The store: an SQLite file, or a `postgres://` URL ([`store_url`]); `None` = in memory
    /// (the embedded demo).
    pub store: Option<PathBuf>,
    pub exchange_ttl: Duration,
    pub max_pending: usize,
    pub max_pending_per_source: usize,
    pub iterations: u32,
    pub failures_before_lockout: u32,
    pub failure_window: Duration,
    pub lockout: Duration,
}

impl AuthSettings {
    /// The defaults of an `[auth]` table for `realm` (in-memory store).
    pub fn defaults(realm: &str) -> AuthSettings {
        AuthSettings {
            realm: realm.to_owned(),
            mechanisms: vec![
                gatehouse_auth::Mechanism::ScramSha256Plus,
                gatehouse_auth::Mechanism::ScramSha256,
            ],
            store: None,
            exchange_ttl: Duration::from_secs(30),
            max_pending: 10_000,
            max_pending_per_source: 32,
            iterations: 4096,
            failures_before_lockout: 5,
            failure_window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
        }
    }
}

impl Default for RegistrarSettings {
    fn default() -> Self {
        RegistrarSettings {
            min_expires: 60,
            max_expires: 7200,
            default_expires: 3600,
            max_bindings_per_aor: 8,
        }
    }
}

/// Registrar settings.
#[derive(Debug, Clone, Copy)]
pub struct RegistrarSettings {
    pub min_expires: u32,
    pub max_expires: u32,
    pub default_expires: u32,
    pub max_bindings_per_aor: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSip {
    domains: Spanned<Vec<String>>,
    /// Other names and addresses of this gateway (Kamailio's `alias`): a Request-URI host
    /// among them (or one of the listen addresses) is the gateway's domains.
    #[serde(default)]
    aliases: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_grace")]
    shutdown_grace_ms: Spanned<u64>,
}

fn default_grace() -> Spanned<u64> {
    unset(5000)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    transport: Spanned<Transport>,
    address: Spanned<String>,
    advertise: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: Spanned<PathBuf>,
    private_key: Spanned<PathBuf>,
    /// Trust anchors for outbound TLS (`sips:` next hops).
    ca: Option<Spanned<PathBuf>>,
    /// Trust anchors for client certificates (enables SASL EXTERNAL).
    client_ca: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimers {
    #[serde(default = "d_t1")]
    t1_ms: Spanned<u64>,
    #[serde(default = "d_t2")]
    t2_ms: Spanned<u64>,
    #[serde(default = "d_t4")]
    t4_ms: Spanned<u64>,
    #[serde(default = "d_c")]
    timer_c_ms: Spanned<u64>,
    #[serde(default = "d_failover")]
    failover_ms: Spanned<u64>,
    #[serde(default = "d_dead_address")]
    dead_address_ms: Spanned<u64>,
}

fn d_t1() -> Spanned<u64> {
    Spanned::new(0..0, 500)
}
fn d_t2() -> Spanned<u64> {
    Spanned::new(0..0, 4000)
}
fn d_t4() -> Spanned<u64> {
    Spanned::new(0..0, 5000)
}
fn d_c() -> Spanned<u64> {
    Spanned::new(0..0, 180_000)
}
fn d_failover() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_FAILOVER.as_millis() as u64)
}
fn d_dead_address() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_DEAD_ADDRESS.as_millis() as u64)
}

/// How long an address DNS gave that failed is tried last (`[timers] dead_address_ms`; like
/// Kamailio's `dst_blacklist_expire`).
pub const DEFAULT_DEAD_ADDRESS: Duration = Duration::from_secs(60);

/// How long a branch to one of several addresses of a next hop waits for a first response
/// (`[timers] failover_ms`).
pub const DEFAULT_FAILOVER: Duration = Duration::from_secs(3);

impl Default for RawTimers {
    fn default() -> Self {
        RawTimers {
            t1_ms: d_t1(),
            t2_ms: d_t2(),
            t4_ms: d_t4(),
            timer_c_ms: d_c(),
            failover_ms: d_failover(),
            dead_address_ms: d_dead_address(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_message_bytes: Spanned<usize>,
    max_headers: Spanned<usize>,
    max_connections: Spanned<usize>,
    max_tcp_connections: Spanned<usize>,
    max_tls_connections: Spanned<usize>,
    max_connections_per_source: Spanned<usize>,
    connection_idle_ms: Spanned<u64>,
    header_timeout_ms: Spanned<u64>,
    handshake_timeout_ms: Spanned<u64>,
    max_transactions: Spanned<usize>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_message_bytes: unset(65_535),
            max_headers: unset(128),
            max_connections: unset(4096),
            max_tcp_connections: unset(1536),
            max_tls_connections: unset(1536),
            max_connections_per_source: unset(64),
            connection_idle_ms: unset(300_000),
            header_timeout_ms: unset(10_000),
            handshake_timeout_ms: unset(5_000),
            max_transactions: unset(200_000),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    #[serde(default)]
    sources: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    aor: Option<Spanned<String>>,
    domain: Option<Spanned<String>>,
    /// The Request-URI to send to (its host and port only: the request's user stays).
    target: Option<Spanned<String>>,
    /// Where to send, the Request-URI unchanged (Kamailio's `$du`).
    next_hop: Option<Spanned<String>>,
    transport: Option<Spanned<Transport>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "d_level")]
    level: Spanned<String>,
    #[serde(default)]
    format: LogFormat,
}

fn d_level() -> Spanned<String> {
    Spanned::new(0..0, "info".into())
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: d_level(),
            format: LogFormat::default(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub transport: Transport,
    pub address: SocketAddr,
    pub advertise: Option<(String, u16)>,
}

/// TLS material paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub ca: Option<PathBuf>,
    /// Client certificates verified against these anchors identify the peer for EXTERNAL.
    pub client_ca: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub domains: Vec<String>,
    /// Host names and addresses that name this gateway besides its listen addresses
    /// (lower-case, no port).
    pub aliases: Vec<String>,
    pub listen: Vec<Listen>,
    pub tls: Option<TlsFiles>,
    pub timers: TimerConfig,
    /// A branch to one of several addresses DNS gave for a next hop (RFC 3263) that has
    /// heard nothing back after this long is moved to the next address (`[timers]
    /// failover_ms`), rather than after the transaction's own timeout (64·T1).
    pub failover: Duration,
    /// An address DNS gave that failed (refused, timed out, silent) goes last in later
    /// answers for this long (`[timers] dead_address_ms`; 0: never).
    pub dead_address: Duration,
    pub limits: Limits,
    pub max_connections: usize,
    /// Budgets per transport: TLS handshakes cannot starve plain TCP, nor the reverse.
    pub max_tcp_connections: usize,
    pub max_tls_connections: usize,
    /// Open connections one subscriber (IPv4 address, IPv6 /64) may hold.
    pub max_connections_per_source: usize,
    pub connection_idle: Duration,
    /// A message that has started must be complete within this time (slowloris).
    pub header_timeout: Duration,
    /// A TLS handshake must be complete within this time.
    pub handshake_timeout: Duration,
    pub max_transactions: usize,
    /// The per-source request rate limit (`[rate_limit]`).
    pub rate_limit: RateLimitSettings,
    /// Topology hiding (`[topology] hide`).
    pub hide_topology: bool,
    pub trusted: Vec<ipnet::IpNet>,
    /// SIP load balancers in front of this gateway (`[cluster] balancers`): requests they
    /// relay are attributed to the client their Via names.
    pub balancers: Vec<ipnet::IpNet>,
    /// How the other gateways of a cluster reach this one (`[cluster] peer_uri`, a
    /// `sip:address:port` URI): stored with the bindings whose flows this gateway holds.
    pub peer_uri: Option<String>,
    /// DNS for next hops named by host.
    pub dns: DnsSettings,
    pub routes: RouteTable,
    pub log_level: String,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub auth: AuthSettings,
    pub registrar: RegistrarSettings,
    pub tunnels: TunnelSettings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (plain HTTP, no SASL).
    pub metrics_listen: Option<SocketAddr>,
    /// The admin API, when configured.
    pub admin: Option<AdminSettings>,
    /// The file this configuration came from (for reloads); `None` for the embedded default.
    pub source: Option<PathBuf>,
    /// The policy in force at load time.
    pub policy: std::sync::Arc<gatehouse_policy::Policy>,
    /// Realm crossover, foreign side (`[crossover] enabled`).
    pub crossover: Option<crossover::CrossoverSettings>,
    /// Realm crossover, home side (`[crossover.home]`).
    pub crossover_home: Option<crossover::HomeSettings>,
    /// Heap written once at start and kept, with freed memory never given back
    /// (`[engine] memory_reserve_mib`, in bytes here; `gatehouse_heap::keep_warm`).
    pub memory_reserve: usize,
}

struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    /// A number written at `v`'s place, within `lo..=hi` (`unit` names the unit in the error):
    /// `FILE:LINE: table.key: allowed range LO to HI`.
    fn range<T>(
        &self,
        v: &Spanned<T>,
        key: &str,
        lo: T,
        hi: T,
        unit: &str,
    ) -> Result<T, ConfigError>
    where
        T: PartialOrd + Copy + std::fmt::Display,
    {
        let x = *v.get_ref();
        if x < lo || x > hi {
            return Err(self.err(
                v.span(),
                key,
                format!("allowed range {lo} to {hi}{unit}, not {x}"),
            ));
        }
        Ok(x)
    }

    /// A share of a total (a per-source or per-kind cap under an overall one): written, it
    /// must not exceed the total (`FILE:LINE: key: at most TOTAL_KEY (TOTAL)`); unset, it is
    /// `derive(total)`, never more than the total either.
    fn share(
        &self,
        v: &Spanned<usize>,
        key: &str,
        total: usize,
        total_key: &str,
        derive: impl Fn(usize) -> usize,
    ) -> Result<usize, ConfigError> {
        if v.span() == (0..0) {
            return Ok(derive(total).clamp(1, total.max(1)));
        }
        let x = self.range(v, key, 1, 10_000_000, "")?;
        if x > total {
            return Err(self.err(
                v.span(),
                key,
                format!("at most {total_key} ({total}), not {x}: a share cannot exceed its total"),
            ));
        }
        Ok(x)
    }

    fn ms(&self, v: &Spanned<u64>, key: &str, lo: u64, hi: u64) -> Result<Duration, ConfigError> {
        self.range(v, key, lo, hi, " ms").map(Duration::from_millis)
    }

    /// The last line of the text (where a missing table would be added).
    fn end(&self) -> std::ops::Range<usize> {
        let at = self.text.trim_end().len().saturating_sub(1);
        at..at + 1
    }

    fn err(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        let line = if span.start == 0 && span.end == 0 {
            0
        } else {
            self.text[..span.start.min(self.text.len())]
                .matches('\n')
                .count()
                + 1
        };
        ConfigError {
            origin: self.origin.to_owned(),
            line,
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded() -> Config {
        Config::parse(DEFAULT_CONFIG, "<embedded>").expect("the embedded default config is valid")
    }

    /// Reads and validates a file. Nothing here touches the network: route targets named by
    /// host stay names, located through DNS for each request (`check-config --resolve` asks
    /// DNS up front).
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            line: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let mut cfg = Config::parse_in(&text, &origin, path.parent())?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_in(text, origin, None)
    }

    /// Parses configuration text whose relative file paths (TLS material, store, policy)
    /// are relative to `base` (the configuration file's directory).
    pub fn parse_in(
        text: &str,
        origin: &str,
        base: Option<&std::path::Path>,
    ) -> Result<Config, ConfigError> {
        let resolve = |p: &std::path::Path| -> PathBuf {
            match base {
                Some(b) if p.is_relative() => b.join(p),
                _ => p.to_path_buf(),
            }
        };
        let cx = Ctx { origin, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().to_owned();
            let key = msg
                .split('`')
                .nth(1)
                .map(str::to_owned)
                .unwrap_or_else(|| text.get(span.clone()).unwrap_or("").trim().to_owned());
            // A key is named with its table (`sip.foo`), as every other error names it.
            let key = match table_at(text, span.start) {
                Some(table) if !key.is_empty() && !key.contains('.') => format!("{table}.{key}"),
                _ => key,
            };
            let mut err = cx.err(span, &key, msg);
            if err.line == 0 {
                err.line = 1;
            }
            err
        })?;
        let domains: Vec<String> = raw
            .sip
            .domains
            .get_ref()
            .iter()
            .map(|d| d.to_ascii_lowercase())
            .collect();
        if domains.is_empty() {
            return Err(cx.err(
                raw.sip.domains.span(),
                "sip.domains",
                "at least one domain is required",
            ));
        }
        for d in &domains {
            if crate::sip::uri::split_hostport(d).is_none_or(|(_, p)| p.is_some()) {
                return Err(cx.err(
                    raw.sip.domains.span(),
                    "sip.domains",
                    format!("`{d}` is not a host name"),
                ));
            }
        }
        let mut aliases = Vec::new();
        if let Some(list) = &raw.sip.aliases {
            for a in list.get_ref() {
                let a = a.to_ascii_lowercase();
                let host_only =
                    crate::sip::uri::split_hostport(&a).is_some_and(|(_, p)| p.is_none());
                if !host_only {
                    return Err(cx.err(
                        list.span(),
                        "sip.aliases",
                        format!("`{a}` is not a host name or address (no port)"),
                    ));
                }
                aliases.push(a.trim_start_matches('[').trim_end_matches(']').to_owned());
            }
        }
        if raw.listen.is_empty() {
            return Err(cx.err(
                cx.end(),
                "listen",
                "at least one [[listen]] table is required",
            ));
        }
        let listen = listeners(&cx, &raw.listen, raw.tls.is_some())?;
        let tls = raw
            .tls
            .as_ref()
            .map(|t| t.validate(&cx, &resolve))
            .transpose()?;
        let t = &raw.timers;
        let timers = TimerConfig {
            t1: cx.ms(&t.t1_ms, "timers.t1_ms", 10, 10_000)?,
            t2: cx.ms(&t.t2_ms, "timers.t2_ms", *t.t1_ms.get_ref(), 60_000)?,
            t4: cx.ms(&t.t4_ms, "timers.t4_ms", 10, 60_000)?,
            timer_c: cx.ms(&t.timer_c_ms, "timers.timer_c_ms", 100, 3_600_000)?,
        };
        let failover = cx.ms(&t.failover_ms, "timers.failover_ms", 100, 64_000)?;
        let dead_address = cx.ms(&t.dead_address_ms, "timers.dead_address_ms", 0, 3_600_000)?;
        let trusted = cx.nets(&raw.trust.sources, "trust.sources")?;
        let balancers = cx.nets(&raw.cluster.balancers, "cluster.balancers")?;
        // A trusted balancer would admit everyone it relays without authentication.
        for (i, b) in balancers.iter().enumerate() {
            if trusted.iter().any(|t| t.contains(b) || b.contains(t)) {
                return Err(cx.err(
                    raw.cluster.balancers[i].span(),
                    &format!("cluster.balancers[{i}]"),
                    format!(
                        "`{b}` overlaps [trust] sources: a trusted balancer would admit every \
                         caller it relays without authentication"
                    ),
                ));
            }
        }
        let peer_uri = match &raw.cluster.peer_uri {
            None => None,
            Some(p) => {
                let text = p.get_ref();
                let ok = Uri::parse(text).ok().filter(|u| {
                    matches!(u.scheme, Scheme::Sip | Scheme::Sips)
                        && u.user.is_none()
                        && u.host
                            .trim_start_matches('[')
                            .trim_end_matches(']')
                            .parse::<std::net::IpAddr>()
                            .is_ok()
                });
                // Announced in the database's `application_name` (63 bytes, with a prefix).
                if ok.is_none() || text.len() > 50 {
                    return Err(cx.err(
                        p.span(),
                        "cluster.peer_uri",
                        format!(
                            "`{text}` is not a SIP URI of an address and port without a user \
                             part (at most 50 characters), e.g. sip:10.0.0.11:5060"
                        ),
                    ));
                }
                Some(text.clone())
            }
        };
        let dns = raw.dns.validate(&cx)?;
        let routes = route_table(&cx, &raw.route, &listen)?;
        let level = raw.log.level.get_ref().to_ascii_lowercase();
        if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(cx.err(
                raw.log.level.span(),
                "log.level",
                "one of error, warn, info, debug, trace",
            ));
        }
        let LimitSettings {
            max_message_bytes,
            max_headers,
            max_connections,
            max_tcp_connections,
            max_tls_connections,
            max_connections_per_source,
            max_transactions,
            connection_idle,
            header_timeout,
            handshake_timeout,
        } = raw.limits.validate(&cx)?;
        let rate_limit = raw.rate_limit.validate(&cx)?;
        let auth = raw.auth.validate(&cx, &domains[0], &resolve)?;
        let registrar = raw.registrar.validate(&cx)?;
        let (tunnels, policy) = raw.tunnels.validate(&cx, &resolve)?;
        let metrics_listen = raw.metrics.validate(&cx)?;
        let admin = raw.admin.validate(
            &cx,
            &domains[0],
            raw.tls.is_some(),
            raw.auth.store.is_some(),
        )?;
        let (crossover, crossover_home) =
            raw.crossover.validate(&cx, &resolve, raw.tls.is_some())?;
        // At most 16 GiB: a reserve is memory the process holds for its whole life.
        let memory_reserve = cx.range(
            &raw.engine.memory_reserve_mib,
            "engine.memory_reserve_mib",
            0,
            16_384,
            " MiB",
        )? << 20;
        Ok(Config {
            source: None,
            crossover,
            crossover_home,
            memory_reserve,
            admin,
            metrics_listen,
            tunnels,
            policy: std::sync::Arc::new(policy),
            auth,
            registrar,
            domains,
            aliases,
            listen,
            tls,
            timers,
            failover,
            dead_address,
            limits: Limits {
                max_message_bytes,
                max_headers,
            },
            max_connections,
            max_tcp_connections,
            max_tls_connections,
            max_connections_per_source,
            connection_idle,
            header_timeout,
            handshake_timeout,
            max_transactions,
            rate_limit,
            hide_topology: raw.topology.hide,
            balancers,
            peer_uri,
            dns,
            trusted,
            routes,
            log_level: level,
            log_format: raw.log.format,
            shutdown_grace: cx.ms(
                &raw.sip.shutdown_grace_ms,
                "sip.shutdown_grace_ms",
                0,
                600_000,
            )?,
        })
    }
}

impl Ctx<'_> {
    /// Addresses or prefixes (a bare address is a host prefix), host bits cleared.
    fn nets(&self, list: &[Spanned<String>], key: &str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, n)| {
                let text = n.get_ref();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        self.err(
                            n.span(),
                            &format!("{key}[{i}]"),
                            format!("`{text}` is not an address or prefix"),
                        )
                    })
            })
            .collect()
    }
}

impl RawLimits {
    /// `[limits]`: sizes, connection budgets (shares never above their totals), transactions
    /// and connection deadlines.
    fn validate(&self, cx: &Ctx<'_>) -> Result<LimitSettings, ConfigError> {
        let l = self;
        let max_message_bytes = cx.range(
            &l.max_message_bytes,
            "limits.max_message_bytes",
            1024,
            65_535,
            " bytes",
        )?;
        let max_headers = cx.range(&l.max_headers, "limits.max_headers", 8, 1024, "")?;
        let count = |v: &Spanned<usize>, key: &str| cx.range(v, key, 1, 10_000_000, "");
        let max_connections = count(&l.max_connections, "limits.max_connections")?;
        // Shares of the total: per kind at most the total (default 1536, or the total when it
        // is smaller), per source a sixteenth of it (default 64 of 4096) — one source never
        // takes every slot.
        let total = "limits.max_connections";
        let max_tcp_connections = cx.share(
            &l.max_tcp_connections,
            "limits.max_tcp_connections",
            max_connections,
            total,
            |t| t.min(1536),
        )?;
        let max_tls_connections = cx.share(
            &l.max_tls_connections,
            "limits.max_tls_connections",
            max_connections,
            total,
            |t| t.min(1536),
        )?;
        let max_connections_per_source = cx.share(
            &l.max_connections_per_source,
            "limits.max_connections_per_source",
            max_connections,
            total,
            |t| (t / 16).min(64),
        )?;
        let max_transactions = cx.range(
            &l.max_transactions,
            "limits.max_transactions",
            4,
            10_000_000,
            "",
        )?;
        let connection_idle = cx.ms(
            &l.connection_idle_ms,
            "limits.connection_idle_ms",
            1000,
            86_400_000,
        )?;
        let header_timeout = cx.ms(
            &l.header_timeout_ms,
            "limits.header_timeout_ms",
            100,
            600_000,
        )?;
        let handshake_timeout = cx.ms(
            &l.handshake_timeout_ms,
            "limits.handshake_timeout_ms",
            100,
            600_000,
        )?;
        Ok(LimitSettings {
            max_message_bytes,
            max_headers,
            max_connections,
            max_tcp_connections,
            max_tls_connections,
            max_connections_per_source,
            max_transactions,
            connection_idle,
            header_timeout,
            handshake_timeout,
        })
    }
}

/// `[limits]` validated (spread over [`Config`]'s fields).
struct LimitSettings {
    max_message_bytes: usize,
    max_headers: usize,
    max_connections: usize,
    max_tcp_connections: usize,
    max_tls_connections: usize,
    max_connections_per_source: usize,
    max_transactions: usize,
    connection_idle: Duration,
    header_timeout: Duration,
    handshake_timeout: Duration,
}

impl RawRateLimit {
    /// `[rate_limit]`.
    fn validate(&self, cx: &Ctx<'_>) -> Result<RateLimitSettings, ConfigError> {
        let rl = self;
        let rate_limit = RateLimitSettings {
            enabled: rl.enabled,
            requests: cx.range(&rl.requests, "rate_limit.requests", 1, 10_000_000, "")?,
            window: cx.ms(&rl.window_ms, "rate_limit.window_ms", 100, 3_600_000)?,
            ban: cx.ms(&rl.ban_ms, "rate_limit.ban_ms", 0, 86_400_000)?,
            max_sources: cx.range(
                &rl.max_sources,
                "rate_limit.max_sources",
                64,
                10_000_000,
                "",
            )?,
        };
        Ok(rate_limit)
    }
}

impl RawAuth {
    /// `[auth]`: the realm defaults to the first served domain; a store file is relative to
    /// the configuration's folder.
    fn validate(
        &self,
        cx: &Ctx<'_>,
        first_domain: &str,
        resolve: &dyn Fn(&std::path::Path) -> PathBuf,
    ) -> Result<AuthSettings, ConfigError> {
        let a = self;
        let max_pending = cx.range(&a.max_pending, "auth.max_pending", 1, 10_000_000, "")?;
        let realm = match &a.realm {
            Some(r) if r.get_ref().trim().is_empty() => {
                return Err(cx.err(r.span(), "auth.realm", "must not be empty"))
            }
            Some(r) => r.get_ref().clone(),
            None => first_domain.to_owned(),
        };
        let mut mechanisms = Vec::new();
        for m in a.mechanisms.get_ref() {
            let mech = gatehouse_auth::Mechanism::from_name(m)
            .ok_or_else(|| cx.err(a.mechanisms.span(), "auth.mechanisms", format!("unknown mechanism `{m}` (SCRAM-SHA-256-PLUS, SCRAM-SHA-256, EXTERNAL, PLAIN)")))?;
            mechanisms.push(mech);
        }
        if mechanisms.is_empty() {
            return Err(cx.err(
                a.mechanisms.span(),
                "auth.mechanisms",
                "at least one mechanism",
            ));
        }
        let auth = AuthSettings {
            realm,
            mechanisms,
            // A PostgreSQL URL is taken as written; a file is relative to the config's folder.
            store: a.store.as_ref().map(|p| match store_url(p.get_ref()) {
                Some(_) => p.get_ref().clone(),
                None => resolve(p.get_ref()),
            }),
            exchange_ttl: cx.ms(&a.exchange_ttl_ms, "auth.exchange_ttl_ms", 1000, 300_000)?,
            max_pending,
            // A share of the pending table: by default 32, or a sixteenth of a smaller table.
            max_pending_per_source: cx.share(
                &a.max_pending_per_source,
                "auth.max_pending_per_source",
                max_pending,
                "auth.max_pending",
                |t| (t / 16).min(32),
            )?,
            iterations: cx.range(
                &a.iterations,
                "auth.iterations",
                gatehouse_auth::scram::MIN_ITERATIONS,
                10_000_000,
                "",
            )?,
            failures_before_lockout: cx.range(
                &a.failures_before_lockout,
                "auth.failures_before_lockout",
                1,
                1000,
                "",
            )?,
            failure_window: cx.ms(
                &a.failure_window_ms,
                "auth.failure_window_ms",
                1000,
                86_400_000,
            )?,
            lockout: cx.ms(&a.lockout_ms, "auth.lockout_ms", 1000, 86_400_000)?,
        };
        Ok(auth)
    }
}

impl RawRegistrar {
    /// `[registrar]`: expiry bounds in order (min <= default <= max).
    fn validate(&self, cx: &Ctx<'_>) -> Result<RegistrarSettings, ConfigError> {
        let r = self;
        let min_expires = cx.range(&r.min_expires_s, "registrar.min_expires_s", 1, 86_400, " s")?;
        let max_expires = cx.range(
            &r.max_expires_s,
            "registrar.max_expires_s",
            min_expires,
            604_800,
            " s",
        )?;
        let registrar = RegistrarSettings {
            min_expires,
            max_expires,
            default_expires: cx.range(
                &r.default_expires_s,
                "registrar.default_expires_s",
                min_expires,
                max_expires,
                " s",
            )?,
            max_bindings_per_aor: cx.range(
                &r.max_bindings_per_aor,
                "registrar.max_bindings_per_aor",
                1,
                1000,
                "",
            )?,
        };
        Ok(registrar)
    }
}

impl RawTunnels {
    /// `[tunnels]` and the policy file it names (read and validated here: a bad policy is
    /// refused with the configuration).
    fn validate(
        &self,
        cx: &Ctx<'_>,
        resolve: &dyn Fn(&std::path::Path) -> PathBuf,
    ) -> Result<(TunnelSettings, gatehouse_policy::Policy), ConfigError> {
        let t = self;
        let internal_networks = cx.nets(&t.internal_networks, "tunnels.internal_networks")?;
        let register_from_outside = t
            .register_from_outside
            .iter()
            .map(|aor| {
                crate::sip::uri::aor_key(aor.get_ref()).ok_or_else(|| {
                    cx.err(
                        aor.span(),
                        "tunnels.register_from_outside",
                        format!("`{}` is not a sip:user@domain AOR", aor.get_ref()),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let mut public_endpoints = std::collections::HashMap::new();
        for (aor, ep) in &t.public_endpoints {
            let key = crate::sip::uri::aor_key(aor).ok_or_else(|| {
                cx.err(
                    ep.span(),
                    &format!("tunnels.public_endpoints.\"{aor}\""),
                    "key must be a sip:user@domain AOR",
                )
            })?;
            let addr: SocketAddr = ep.get_ref().parse().map_err(|_| {
                cx.err(
                    ep.span(),
                    &format!("tunnels.public_endpoints.\"{aor}\""),
                    "expected IP:port",
                )
            })?;
            public_endpoints.insert(key, addr);
        }
        let policy_file = t.policy.as_ref().map(|p| resolve(p.get_ref()));
        let policy = match &t.policy {
            None => gatehouse_policy::Policy::trusted_only(),
            Some(p) => load_policy(&resolve(p.get_ref()))
                .map_err(|e| cx.err(p.span(), "tunnels.policy", e.to_string()))?,
        };
        Ok((
            TunnelSettings {
                policy_file,
                internal_networks,
                public_endpoints,
                register_from_outside,
            },
            policy,
        ))
    }
}

impl RawMetrics {
    /// `[metrics]`.
    fn validate(&self, cx: &Ctx<'_>) -> Result<Option<SocketAddr>, ConfigError> {
        let metrics_listen = match &self.listen {
            None => None,
            Some(l) => Some(
                l.get_ref()
                    .parse::<SocketAddr>()
                    .map_err(|_| cx.err(l.span(), "metrics.listen", "expected IP:port"))?,
            ),
        };
        Ok(metrics_listen)
    }
}

impl RawAdmin {
    /// `[admin]`: plain HTTP only on loopback (unless allowed), TLS needs `[tls]`, and the
    /// admin identities live in the store.
    fn validate(
        &self,
        cx: &Ctx<'_>,
        first_domain: &str,
        has_tls: bool,
        has_store: bool,
    ) -> Result<Option<AdminSettings>, ConfigError> {
        let admin = match &self.listen {
            None => None,
            Some(l) => {
                let listen: SocketAddr = l
                    .get_ref()
                    .parse()
                    .map_err(|_| cx.err(l.span(), "admin.listen", "expected IP:port"))?;
                if !self.tls && !plain_http_allowed(listen, self.allow_remote_plain_http) {
                    return Err(cx.err(l.span(), "admin.listen", "plain HTTP only on loopback: set admin.tls = true (or allow_remote_plain_http)"));
                }
                if self.tls && !has_tls {
                    return Err(cx.err(l.span(), "admin.tls", "needs the [tls] table"));
                }
                if !has_store {
                    return Err(cx.err(
                        l.span(),
                        "admin.listen",
                        "the admin API needs auth.store (admin identities live there)",
                    ));
                }
                Some(AdminSettings {
                    listen,
                    realm: self
                        .realm
                        .clone()
                        .unwrap_or_else(|| format!("admin.{first_domain}")),
                    tls: self.tls,
                    session_idle: Duration::from_secs(match &self.session_idle_s {
                        Some(v) => cx.range(v, "admin.session_idle_s", 1, 86_400, " s")?,
                        None => 900,
                    }),
                })
            }
        };
        Ok(admin)
    }
}

/// `[[listen]]`: addresses, advertised names, and a `[tls]` table for every TLS listener.
fn listeners(cx: &Ctx<'_>, raw: &[RawListen], has_tls: bool) -> Result<Vec<Listen>, ConfigError> {
    let mut listen = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        let key = format!("listen[{i}].address");
        let address: SocketAddr = l.address.get_ref().parse().map_err(|_| {
            cx.err(
                l.address.span(),
                &key,
                "expected IP:port, e.g. \"127.0.0.1:5060\" or \"[::1]:5060\"",
            )
        })?;
        let advertise = match &l.advertise {
            None => None,
            Some(a) => {
                let (h, p) = crate::sip::uri::split_hostport(a.get_ref()).ok_or_else(|| {
                    cx.err(
                        a.span(),
                        &format!("listen[{i}].advertise"),
                        "expected host[:port]",
                    )
                })?;
                Some((h.to_owned(), p.unwrap_or(address.port())))
            }
        };
        if *l.transport.get_ref() == Transport::Tls && !has_tls {
            return Err(cx.err(
                l.transport.span(),
                &format!("listen[{i}].transport"),
                "a tls listener needs a [tls] table",
            ));
        }
        listen.push(Listen {
            transport: *l.transport.get_ref(),
            address,
            advertise,
        });
    }
    Ok(listen)
}

impl RawTls {
    /// `[tls]`: the certificate and key must exist (relative to the configuration's folder).
    fn validate(
        &self,
        cx: &Ctx<'_>,
        resolve: &dyn Fn(&std::path::Path) -> PathBuf,
    ) -> Result<TlsFiles, ConfigError> {
        for (p, key) in [
            (&self.certificate, "tls.certificate"),
            (&self.private_key, "tls.private_key"),
        ] {
            if !resolve(p.get_ref()).exists() {
                return Err(cx.err(
                    p.span(),
                    key,
                    format!("{} does not exist", resolve(p.get_ref()).display()),
                ));
            }
        }
        Ok(TlsFiles {
            certificate: resolve(self.certificate.get_ref()),
            private_key: resolve(self.private_key.get_ref()),
            ca: self.ca.as_ref().map(|c| resolve(c.get_ref())),
            client_ca: self.client_ca.as_ref().map(|c| resolve(c.get_ref())),
        })
    }
}

impl RawDns {
    /// `[dns]`: name servers as `IP` (port 53) or `IP:port`.
    fn validate(&self, cx: &Ctx<'_>) -> Result<DnsSettings, ConfigError> {
        let mut servers = Vec::new();
        for (i, s) in self.servers.iter().enumerate() {
            let text = s.get_ref();
            let addr = text
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| {
                    text.parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| (ip, 53).into())
                })
                .ok_or_else(|| {
                    cx.err(
                        s.span(),
                        &format!("dns.servers[{i}]"),
                        format!("`{text}` is not an IP address with an optional port"),
                    )
                })?;
            servers.push(addr);
        }
        let dns = DnsSettings {
            servers,
            timeout: cx.ms(&self.timeout_ms, "dns.timeout_ms", 100, 30_000)?,
            attempts: cx.range(&self.attempts, "dns.attempts", 1, 5, "")?,
        };
        Ok(dns)
    }
}

/// `[[route]]`: each an `aor` or a `domain` with a `target` (rewrites the Request-URI) or a
/// `next_hop` (keeps it), over a transport some listener serves.
fn route_table(
    cx: &Ctx<'_>,
    raw: &[RawRoute],
    listen: &[Listen],
) -> Result<RouteTable, ConfigError> {
    let mut routes = RouteTable::default();
    for (i, r) in raw.iter().enumerate() {
        // `target` rewrites the Request-URI, `next_hop` only says where to send it.
        let (spanned, key, rewrites) = match (&r.target, &r.next_hop) {
            (Some(t), None) => (t, format!("route[{i}].target"), true),
            (None, Some(n)) => (n, format!("route[{i}].next_hop"), false),
            (Some(_), Some(n)) => {
                return Err(cx.err(
                    n.span(),
                    &format!("route[{i}].next_hop"),
                    "give `target` (rewrites the Request-URI) or `next_hop` (keeps it), not both",
                ))
            }
            (None, None) => {
                let span = r
                    .aor
                    .as_ref()
                    .or(r.domain.as_ref())
                    .map_or_else(|| cx.end(), |s| s.span());
                return Err(cx.err(span, &format!("route[{i}]"), "needs `target` or `next_hop`"));
            }
        };
        let target_text = spanned.get_ref();
        let uri = Uri::parse(target_text)
            .ok()
            .filter(|u| matches!(u.scheme, Scheme::Sip | Scheme::Sips))
            .ok_or_else(|| {
                cx.err(
                    spanned.span(),
                    &key,
                    format!("`{target_text}` is not a sip: or sips: URI"),
                )
            })?;
        // A host name stays a name: DNS (RFC 3263) locates it for each request, so a
        // partner's NAPTR/SRV records and their changes are followed.
        let dest = destination_of(&uri, r.transport.as_ref().map(|t| *t.get_ref()));
        let fixed = match &dest {
            crate::flow::Destination::Addr { transport, .. } => Some(*transport),
            crate::flow::Destination::Name { transport, .. } => *transport,
            crate::flow::Destination::Flow(_) => None,
        };
        if let Some(transport) = fixed.filter(|t| !listen.iter().any(|l| l.transport == *t)) {
            return Err(cx.err(
                spanned.span(),
                &key,
                format!("no listener for transport {transport}"),
            ));
        }
        let target = Route {
            // Empty: the Request-URI stays (`next_hop`).
            uri: if rewrites {
                target_text.clone()
            } else {
                String::new()
            },
            dest,
        };
        match (&r.aor, &r.domain) {
            (Some(aor), None) => {
                let u = Uri::parse(aor.get_ref())
                    .ok()
                    .filter(|u| u.user.is_some())
                    .ok_or_else(|| {
                        cx.err(
                            aor.span(),
                            &format!("route[{i}].aor"),
                            "expected sip:user@domain",
                        )
                    })?;
                routes.add_aor(u.user.unwrap_or_default(), u.host, target);
            }
            (None, Some(domain)) => routes.add_domain(domain.get_ref(), target),
            _ => {
                return Err(cx.err(
                    spanned.span(),
                    &format!("route[{i}]"),
                    "give exactly one of `aor` or `domain`",
                ));
            }
        }
    }
    Ok(routes)
}

/// Reads and validates a policy file (errors name the file and line).
pub fn load_policy(
    path: &std::path::Path,
) -> Result<gatehouse_policy::Policy, gatehouse_policy::PolicyError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| gatehouse_policy::PolicyError {
        origin: origin.clone(),
        line: 0,
        message: format!("cannot read: {e}"),
    })?;
    gatehouse_policy::Policy::parse(&text, &origin)
}

/// The PostgreSQL URL of a store location (`postgres://` or `postgresql://`), if it is one;
/// any other location is an SQLite file.
pub fn store_url(location: &std::path::Path) -> Option<&str> {
    location
        .to_str()
        .filter(|s| s.starts_with("postgres://") || s.starts_with("postgresql://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded();
        assert!(c.listen.iter().all(|l| l.address.ip().is_loopback()));
        assert_eq!(c.domains, vec!["org.example"]);
        assert_eq!(c.memory_reserve, 64 << 20, "the default heap reserve");
    }

    #[test]
    fn examples_are_valid() {
        for f in [
            "examples/bench.toml",
            "examples/edge.toml",
            "cluster/gateway.toml",
        ] {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/").to_owned() + f;
            Config::load(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    /// Issue 21 item 5: a share (per source, per kind) never exceeds the total it lives
    /// under: unset, it is derived from the total; written larger, it is refused with its line.
    #[test]
    fn shares_never_exceed_their_totals() {
        let base = "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n";
        let c =
            Config::parse(&format!("{base}[limits]\nmax_connections = 50\n"), "t.toml").unwrap();
        assert_eq!(
            (
                c.max_connections_per_source,
                c.max_tcp_connections,
                c.max_tls_connections
            ),
            (3, 50, 50),
            "derived from the total"
        );
        let c = Config::parse(base, "t.toml").unwrap();
        assert_eq!(
            (c.max_connections_per_source, c.max_tcp_connections),
            (64, 1536),
            "the defaults of a default total"
        );
        for (extra, key, line) in [
            (
                "[limits]\nmax_connections = 50\nmax_connections_per_source = 64\n",
                "limits.max_connections_per_source",
                8,
            ),
            (
                "[limits]\nmax_connections = 50\nmax_tcp_connections = 51\n",
                "limits.max_tcp_connections",
                8,
            ),
            (
                "[limits]\nmax_tls_connections = 5000\n",
                "limits.max_tls_connections",
                7,
            ),
            (
                "[auth]\nmax_pending = 100\nmax_pending_per_source = 101\n",
                "auth.max_pending_per_source",
                8,
            ),
        ] {
            let e = Config::parse(&format!("{base}{extra}"), "t.toml").unwrap_err();
            assert_eq!((e.key.as_str(), e.line), (key, line), "{e}");
            assert!(e.to_string().contains("cannot exceed its total"), "{e}");
        }
        let c = Config::parse(&format!("{base}[auth]\nmax_pending = 100\n"), "t.toml").unwrap();
        assert_eq!(c.auth.max_pending_per_source, 6);
    }

    #[test]
    fn aliases_are_hosts_without_ports() {
        let base = "[sip]\ndomains = [\"org.example\"]\naliases = [\"GW.org.example\", \"192.0.2.1\", \"[2001:db8::1]\"]\n\
[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n";
        let c = Config::parse(base, "t.toml").unwrap();
        assert_eq!(
            c.aliases,
            vec!["gw.org.example", "192.0.2.1", "2001:db8::1"]
        );
        let e = Config::parse(
            &base.replace("\"192.0.2.1\"", "\"192.0.2.1:5060\""),
            "t.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "sip.aliases"), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[sip]\ndomains = [\"org.example\"]\n\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\nadress = \"x\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err();
        assert_eq!(e.line, 7, "{e}");
        assert_eq!(e.key, "listen.adress", "{e}");
        let e =
            Config::parse("[sip]\ndomains = [\"org.example\"]\nfoo = 1\n", "t.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "sip.foo"), "{e}");
    }

    /// Out-of-range values are refused, never raised silently: `FILE:LINE: table.key:
    /// allowed range`; every error names a real line.
    #[test]
    fn out_of_range_values_are_refused_with_their_line() {
        let base = "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n";
        let cases: &[(&str, &str, &str)] = &[
            (
                "[auth]\nexchange_ttl_ms = 5\n",
                "auth.exchange_ttl_ms",
                "allowed range 1000 to 300000 ms, not 5",
            ),
            (
                "[limits]\nconnection_idle_ms = 1\n",
                "limits.connection_idle_ms",
                "allowed range 1000 to 86400000 ms",
            ),
            (
                "[limits]\nmax_headers = 2\n",
                "limits.max_headers",
                "allowed range 8 to 1024",
            ),
            (
                "[limits]\nmax_message_bytes = 100000\n",
                "limits.max_message_bytes",
                "allowed range 1024 to 65535 bytes",
            ),
            (
                "[engine]\nmemory_reserve_mib = 20000\n",
                "engine.memory_reserve_mib",
                "allowed range 0 to 16384 MiB",
            ),
            (
                "[limits]\nmax_transactions = 0\n",
                "limits.max_transactions",
                "allowed range 4 to",
            ),
            (
                "[auth]\nmax_pending = 0\n",
                "auth.max_pending",
                "allowed range 1 to",
            ),
            (
                "[auth]\nfailures_before_lockout = 0\n",
                "auth.failures_before_lockout",
                "allowed range 1 to 1000",
            ),
            (
                "[auth]\niterations = 1000\n",
                "auth.iterations",
                "allowed range 4096 to",
            ),
            (
                "[auth]\nlockout_ms = 10\n",
                "auth.lockout_ms",
                "allowed range 1000 to",
            ),
            (
                "[timers]\nt1_ms = 500\nt2_ms = 100\n",
                "timers.t2_ms",
                "allowed range 500 to 60000 ms",
            ),
            (
                "[timers]\ndead_address_ms = 3600001\n",
                "timers.dead_address_ms",
                "allowed range 0 to 3600000 ms",
            ),
            (
                "[timers]\nfailover_ms = 50\n",
                "timers.failover_ms",
                "allowed range 100 to 64000 ms",
            ),
            (
                "[timers]\ntimer_c_ms = 99999999\n",
                "timers.timer_c_ms",
                "allowed range 100 to 3600000 ms",
            ),
            (
                "[registrar]\nmin_expires_s = 600\nmax_expires_s = 60\n",
                "registrar.max_expires_s",
                "allowed range 600 to 604800 s",
            ),
            (
                "[registrar]\ndefault_expires_s = 10\n",
                "registrar.default_expires_s",
                "allowed range 60 to 7200 s",
            ),
            (
                "[registrar]\nmax_bindings_per_aor = 0\n",
                "registrar.max_bindings_per_aor",
                "allowed range 1 to 1000",
            ),
            (
                "[rate_limit]\nwindow_ms = 1\n",
                "rate_limit.window_ms",
                "allowed range 100 to",
            ),
            (
                "[rate_limit]\nmax_sources = 1\n",
                "rate_limit.max_sources",
                "allowed range 64 to",
            ),
            (
                "[dns]\ntimeout_ms = 5\n",
                "dns.timeout_ms",
                "allowed range 100 to 30000 ms",
            ),
            (
                "[dns]\nattempts = 9\n",
                "dns.attempts",
                "allowed range 1 to 5",
            ),
            (
                "[dns]\nservers = [\"ns1.example\"]\n",
                "dns.servers[0]",
                "is not an IP address",
            ),
        ];
        for (table, key, says) in cases {
            let text = format!("{base}{table}");
            let e = Config::parse(&text, "t.toml").unwrap_err();
            let line = text.lines().count();
            assert_eq!((e.line, e.key.as_str()), (line, *key), "{e}");
            assert!(e.to_string().contains(says), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("t.toml:{line}: {key}: ")),
                "{e}"
            );
        }
        let e = Config::parse(
            &base.replace(
                "[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n",
                "",
            ),
            "t.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "listen"), "{e}");
        let e = Config::parse(&format!("{base}[sip]\n"), "t.toml").unwrap_err();
        assert!(e.line > 0, "{e}");
        let e = Config::parse(&format!("{base}[admin]\nlisten = \"127.0.0.1:1\"\nsession_idle_s = 0\n[auth]\nstore = \"x\"\n"), "t.toml").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (8, "admin.session_idle_s"), "{e}");
    }

    #[test]
    fn names_stay_names_and_dns_servers_take_a_default_port() {
        let text = "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n\
[[route]]\ndomain = \"partner.invalid\"\ntarget = \"sip:partner.invalid\"\n\
[dns]\nservers = [\"192.0.2.53\", \"[2001:db8::53]:5353\"]\n";
        let cfg = Config::parse(text, "t.toml").unwrap();
        assert_eq!(
            cfg.dns.servers,
            [
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap()
            ]
        );
        let uri = crate::sip::Uri::parse("sip:bob@partner.invalid").unwrap();
        let target = cfg.routes.lookup(&uri).unwrap();
        // Not resolved at load: located through DNS for each request.
        assert_eq!(
            target.dest.query().map(|q| (q.host, q.port, q.transport)),
            Some(("partner.invalid".to_owned(), None, None))
        );
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let base = "[sip]\ndomains = [\"org.example\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\n";
        let e = Config::parse(
            &format!("{base}[trust]\nsources = [\"10.0.0.0/33\"]\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (7, "trust.sources[0]"), "{e}");
        // A balancer inside the trusted sources would admit its callers unauthenticated.
        let e = Config::parse(
            &format!(
                "{base}[trust]\nsources = [\"10.0.0.0/8\"]\n[cluster]\nbalancers = [\"192.0.2.9\",\n  \"10.1.2.3\"]\n"
            ),
            "t",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (10, "cluster.balancers[1]"),
            "{e}"
        );
        assert!(e.to_string().contains("overlaps [trust] sources"), "{e}");
        let ok = Config::parse(
            &format!("{base}[cluster]\nbalancers = [\"192.0.2.9\"]\n"),
            "t",
        )
        .unwrap();
        assert_eq!(
            ok.balancers,
            vec!["192.0.2.9/32".parse::<ipnet::IpNet>().unwrap()]
        );
        // A route gives `target` or `next_hop`, exactly one.
        let both = format!("{base}[[route]]\ndomain = \"org.example\"\ntarget = \"sip:127.0.0.1:5070\"\nnext_hop = \"sip:127.0.0.1:5071\"\n");
        let e = Config::parse(&both, "t").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (9, "route[0].next_hop"), "{e}");
        let neither = format!("{base}[[route]]\ndomain = \"org.example\"\n");
        let e = Config::parse(&neither, "t").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (7, "route[0]"), "{e}");
        let next = Config::parse(
            &format!(
                "{base}[[route]]\ndomain = \"org.example\"\nnext_hop = \"sip:127.0.0.1:5071\"\n"
            ),
            "t",
        )
        .unwrap();
        assert!(!next.routes.is_empty());
        // The peer URI is an address other gateways can reach, not a name or an AOR.
        for bad in [
            "sip:gw1.example:5060",
            "sip:alice@10.0.0.1",
            "http://10.0.0.1",
        ] {
            let e = Config::parse(&format!("{base}[cluster]\npeer_uri = \"{bad}\"\n"), "t")
                .unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (7, "cluster.peer_uri"), "{e}");
        }
        for good in [
            "sip:10.0.0.11:5060",
            "sip:[2001:db8::11]:5060;transport=tcp",
        ] {
            let ok =
                Config::parse(&format!("{base}[cluster]\npeer_uri = \"{good}\"\n"), "t").unwrap();
            assert_eq!(ok.peer_uri.as_deref(), Some(good));
        }
        let e = Config::parse(
            &format!("{base}[[route]]\naor = \"sip:a@org.example\"\ntarget = \"mailto:x\"\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (8, "route[0].target"), "{e}");
        let e = Config::parse(&base.replace("127.0.0.1:5060", "127.0.0.1"), "t").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (5, "listen[0].address"), "{e}");
        let e = Config::parse(&base.replace("\"udp\"", "\"sctp\""), "t").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
    }
}

/// Rate-limit settings (`[rate_limit]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Messages a subscriber may send per window.
    pub requests: u32,
    pub window: Duration,
    pub ban: Duration,
    pub max_sources: usize,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            enabled: true,
            requests: 200,
            window: Duration::from_secs(2),
            ban: Duration::from_secs(60),
            max_sources: 65_536,
        }
    }
}

/// Whether a plain-HTTP admin listener may bind `addr`: loopback only, unless the operator
/// says otherwise (`admin.allow_remote_plain_http`).
pub fn plain_http_allowed(addr: std::net::SocketAddr, allow_remote: bool) -> bool {
    addr.ip().is_loopback() || allow_remote
}
