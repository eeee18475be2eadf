//! Configuration: TOML with unknown keys refused, validated into the types the gateway
//! runs on. Every error names the line and the key at fault.

pub mod route;

use route::{destination_of, RouteTable, Target};

use std::net::{SocketAddr, ToSocketAddrs};
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRateLimit {
    enabled: bool,
    requests: Spanned<u32>,
    window_ms: Spanned<u64>,
    ban_ms: u64,
    max_sources: Spanned<usize>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        let d = RateLimitSettings::default();
        RawRateLimit {
            enabled: d.enabled,
            requests: Spanned::new(0..0, d.requests),
            window_ms: Spanned::new(0..0, d.window.as_millis() as u64),
            ban_ms: d.ban.as_millis() as u64,
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
    session_idle_s: Option<u64>,
    #[serde(default)]
    allow_remote_plain_http: bool,
}

/// Admin API settings.
#[derive(Debug, Clone)]
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    realm: Option<Spanned<String>>,
    mechanisms: Spanned<Vec<String>>,
    store: Option<Spanned<PathBuf>>,
    exchange_ttl_ms: u64,
    max_pending: usize,
    max_pending_per_source: usize,
    iterations: Spanned<u32>,
    failures_before_lockout: u32,
    failure_window_ms: u64,
    lockout_ms: u64,
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
            exchange_ttl_ms: 30_000,
            max_pending: 10_000,
            max_pending_per_source: 32,
            iterations: Spanned::new(0..0, 4096),
            failures_before_lockout: 5,
            failure_window_ms: 60_000,
            lockout_ms: 300_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRegistrar {
    min_expires_s: u32,
    max_expires_s: u32,
    default_expires_s: u32,
    max_bindings_per_aor: usize,
}

impl Default for RawRegistrar {
    fn default() -> Self {
        RawRegistrar {
            min_expires_s: 60,
            max_expires_s: 7200,
            default_expires_s: 3600,
            max_bindings_per_aor: 8,
        }
    }
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
    #[serde(default = "default_grace")]
    shutdown_grace_ms: u64,
}

fn default_grace() -> u64 {
    5000
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

impl Default for RawTimers {
    fn default() -> Self {
        RawTimers {
            t1_ms: d_t1(),
            t2_ms: d_t2(),
            t4_ms: d_t4(),
            timer_c_ms: d_c(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_message_bytes: usize,
    max_headers: usize,
    max_connections: usize,
    max_tcp_connections: usize,
    max_tls_connections: usize,
    max_connections_per_source: usize,
    connection_idle_ms: u64,
    header_timeout_ms: u64,
    handshake_timeout_ms: u64,
    max_transactions: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_message_bytes: 65_535,
            max_headers: 128,
            max_connections: 4096,
            max_tcp_connections: 1536,
            max_tls_connections: 1536,
            max_connections_per_source: 64,
            connection_idle_ms: 300_000,
            header_timeout_ms: 10_000,
            handshake_timeout_ms: 5_000,
            max_transactions: 200_000,
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
    target: Spanned<String>,
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
    pub listen: Vec<Listen>,
    pub tls: Option<TlsFiles>,
    pub timers: TimerConfig,
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
}

struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
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

/// Whether loading a configuration resolves the host names of route targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Resolve them (once, at load): what a running gateway uses.
    Names,
    /// Leave them as names: no network at all (`check-config` without `--resolve`).
    Never,
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded() -> Config {
        Config::parse(DEFAULT_CONFIG, "<embedded>").expect("the embedded default config is valid")
    }

    /// Reads and validates a file; route targets named by host are resolved (what a
    /// running gateway needs: `run`, reloads, `check-config --resolve`).
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        Config::load_with(path, Resolve::Names)
    }

    /// Reads and validates a file without touching the network: route targets named by host
    /// stay names (`check-config`, the user commands).
    pub fn load_offline(path: &std::path::Path) -> Result<Config, ConfigError> {
        Config::load_with(path, Resolve::Never)
    }

    fn load_with(path: &std::path::Path, resolve: Resolve) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            line: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let mut cfg = Config::parse_with(&text, &origin, path.parent(), resolve)?;
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
        Config::parse_with(text, origin, base, Resolve::Names)
    }

    /// [`Config::parse_in`], resolving route targets' host names or not.
    pub fn parse_with(
        text: &str,
        origin: &str,
        base: Option<&std::path::Path>,
        names: Resolve,
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
        if raw.listen.is_empty() {
            return Err(cx.err(0..0, "listen", "at least one [[listen]] table is required"));
        }
        let mut listen = Vec::new();
        for (i, l) in raw.listen.iter().enumerate() {
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
            if *l.transport.get_ref() == Transport::Tls && raw.tls.is_none() {
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
        let tls = match &raw.tls {
            None => None,
            Some(t) => {
                for (p, key) in [
                    (&t.certificate, "tls.certificate"),
                    (&t.private_key, "tls.private_key"),
                ] {
                    if !resolve(p.get_ref()).exists() {
                        return Err(cx.err(
                            p.span(),
                            key,
                            format!("{} does not exist", resolve(p.get_ref()).display()),
                        ));
                    }
                }
                Some(TlsFiles {
                    certificate: resolve(t.certificate.get_ref()),
                    private_key: resolve(t.private_key.get_ref()),
                    ca: t.ca.as_ref().map(|c| resolve(c.get_ref())),
                    client_ca: t.client_ca.as_ref().map(|c| resolve(c.get_ref())),
                })
            }
        };
        let ms = |s: &Spanned<u64>, key: &str, min: u64| -> Result<Duration, ConfigError> {
            if *s.get_ref() < min {
                return Err(cx.err(s.span(), key, format!("must be at least {min} ms")));
            }
            Ok(Duration::from_millis(*s.get_ref()))
        };
        let timers = TimerConfig {
            t1: ms(&raw.timers.t1_ms, "timers.t1_ms", 10)?,
            t2: ms(&raw.timers.t2_ms, "timers.t2_ms", 10)?,
            t4: ms(&raw.timers.t4_ms, "timers.t4_ms", 10)?,
            timer_c: ms(&raw.timers.timer_c_ms, "timers.timer_c_ms", 100)?,
        };
        // Addresses or prefixes (a bare address is a host prefix), host bits cleared.
        let nets =
            |list: &[Spanned<String>], key: &str| -> Result<Vec<ipnet::IpNet>, ConfigError> {
                list.iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let text = n.get_ref();
                        text.parse::<ipnet::IpNet>()
                            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                            .map(|net| net.trunc())
                            .map_err(|_| {
                                cx.err(
                                    n.span(),
                                    &format!("{key}[{i}]"),
                                    format!("`{text}` is not an address or prefix"),
                                )
                            })
                    })
                    .collect()
            };
        let trusted = nets(&raw.trust.sources, "trust.sources")?;
        let balancers = nets(&raw.cluster.balancers, "cluster.balancers")?;
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
        let mut routes = RouteTable::default();
        for (i, r) in raw.route.iter().enumerate() {
            let target_text = r.target.get_ref();
            let key = format!("route[{i}].target");
            let uri = Uri::parse(target_text)
                .ok()
                .filter(|u| matches!(u.scheme, Scheme::Sip | Scheme::Sips))
                .ok_or_else(|| {
                    cx.err(
                        r.target.span(),
                        &key,
                        format!("`{target_text}` is not a sip: or sips: URI"),
                    )
                })?;
            let default = r
                .transport
                .as_ref()
                .map_or(Transport::Udp, |t| *t.get_ref());
            let mut dest = destination_of(&uri, default);
            if let (
                crate::flow::Destination::Name {
                    transport,
                    host,
                    port,
                },
                Resolve::Names,
            ) = (&dest, names)
            {
                // Resolve static targets once, at load time.
                let addr = (host.as_ref(), *port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        cx.err(r.target.span(), &key, format!("cannot resolve `{host}`"))
                    })?;
                dest = crate::flow::Destination::Addr {
                    transport: *transport,
                    addr,
                    server_name: Some(host.clone()),
                };
            }
            let transport = match &dest {
                crate::flow::Destination::Addr { transport, .. }
                | crate::flow::Destination::Name { transport, .. } => *transport,
                crate::flow::Destination::Flow(_) => default,
            };
            if !listen.iter().any(|l| l.transport == transport) {
                return Err(cx.err(
                    r.target.span(),
                    &key,
                    format!("no listener for transport {transport}"),
                ));
            }
            let target = Target {
                uri: target_text.clone(),
                dest,
                transport,
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
                        r.target.span(),
                        &format!("route[{i}]"),
                        "give exactly one of `aor` or `domain`",
                    ));
                }
            }
        }
        let level = raw.log.level.get_ref().to_ascii_lowercase();
        if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(cx.err(
                raw.log.level.span(),
                "log.level",
                "one of error, warn, info, debug, trace",
            ));
        }
        let l = &raw.limits;
        if l.max_message_bytes < 1024
            || l.max_headers < 8
            || l.max_connections == 0
            || l.max_tcp_connections == 0
            || l.max_tls_connections == 0
            || l.max_connections_per_source == 0
            || l.max_transactions < 4
            || l.header_timeout_ms < 100
            || l.handshake_timeout_ms < 100
        {
            return Err(cx.err(
                0..0,
                "limits",
                "limits too small (max_message_bytes >= 1024, max_headers >= 8, max_transactions >= 4, timeouts >= 100 ms, others > 0)",
            ));
        }
        let rl = &raw.rate_limit;
        if *rl.requests.get_ref() == 0 {
            return Err(cx.err(rl.requests.span(), "rate_limit.requests", "must be > 0"));
        }
        if *rl.window_ms.get_ref() < 100 {
            return Err(cx.err(
                rl.window_ms.span(),
                "rate_limit.window_ms",
                "must be >= 100",
            ));
        }
        if *rl.max_sources.get_ref() < 64 {
            return Err(cx.err(
                rl.max_sources.span(),
                "rate_limit.max_sources",
                "must be >= 64",
            ));
        }
        let rate_limit = RateLimitSettings {
            enabled: rl.enabled,
            requests: *rl.requests.get_ref(),
            window: Duration::from_millis(*rl.window_ms.get_ref()),
            ban: Duration::from_millis(rl.ban_ms),
            max_sources: *rl.max_sources.get_ref(),
        };
        let a = &raw.auth;
        let realm = match &a.realm {
            Some(r) if r.get_ref().trim().is_empty() => {
                return Err(cx.err(r.span(), "auth.realm", "must not be empty"))
            }
            Some(r) => r.get_ref().clone(),
            None => domains[0].clone(),
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
        if *a.iterations.get_ref() < gatehouse_auth::scram::MIN_ITERATIONS {
            return Err(cx.err(
                a.iterations.span(),
                "auth.iterations",
                "must be at least 4096",
            ));
        }
        if a.max_pending == 0 || a.max_pending_per_source == 0 || a.failures_before_lockout == 0 {
            return Err(cx.err(
                0..0,
                "auth",
                "max_pending, max_pending_per_source and failures_before_lockout must be > 0",
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
            exchange_ttl: Duration::from_millis(a.exchange_ttl_ms.max(1000)),
            max_pending: a.max_pending,
            max_pending_per_source: a.max_pending_per_source,
            iterations: *a.iterations.get_ref(),
            failures_before_lockout: a.failures_before_lockout,
            failure_window: Duration::from_millis(a.failure_window_ms),
            lockout: Duration::from_millis(a.lockout_ms),
        };
        let r = &raw.registrar;
        if r.min_expires_s > r.max_expires_s
            || r.default_expires_s < r.min_expires_s
            || r.default_expires_s > r.max_expires_s
            || r.max_bindings_per_aor == 0
        {
            return Err(cx.err(0..0, "registrar", "need min_expires_s <= default_expires_s <= max_expires_s and max_bindings_per_aor > 0"));
        }
        let registrar = RegistrarSettings {
            min_expires: r.min_expires_s,
            max_expires: r.max_expires_s,
            default_expires: r.default_expires_s,
            max_bindings_per_aor: r.max_bindings_per_aor,
        };
        let t = &raw.tunnels;
        let internal_networks = nets(&t.internal_networks, "tunnels.internal_networks")?;
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
        let metrics_listen = match &raw.metrics.listen {
            None => None,
            Some(l) => Some(
                l.get_ref()
                    .parse::<SocketAddr>()
                    .map_err(|_| cx.err(l.span(), "metrics.listen", "expected IP:port"))?,
            ),
        };
        let admin = match &raw.admin.listen {
            None => None,
            Some(l) => {
                let listen: SocketAddr = l
                    .get_ref()
                    .parse()
                    .map_err(|_| cx.err(l.span(), "admin.listen", "expected IP:port"))?;
                if !raw.admin.tls && !plain_http_allowed(listen, raw.admin.allow_remote_plain_http)
                {
                    return Err(cx.err(l.span(), "admin.listen", "plain HTTP only on loopback: set admin.tls = true (or allow_remote_plain_http)"));
                }
                if raw.admin.tls && raw.tls.is_none() {
                    return Err(cx.err(l.span(), "admin.tls", "needs the [tls] table"));
                }
                if raw.auth.store.is_none() {
                    return Err(cx.err(
                        l.span(),
                        "admin.listen",
                        "the admin API needs auth.store (admin identities live there)",
                    ));
                }
                Some(AdminSettings {
                    listen,
                    realm: raw
                        .admin
                        .realm
                        .clone()
                        .unwrap_or_else(|| format!("admin.{}", domains[0])),
                    tls: raw.admin.tls,
                    session_idle: Duration::from_secs(
                        raw.admin.session_idle_s.unwrap_or(900).max(1),
                    ),
                })
            }
        };
        Ok(Config {
            source: None,
            admin,
            metrics_listen,
            tunnels: TunnelSettings {
                policy_file,
                internal_networks,
                public_endpoints,
            },
            policy: std::sync::Arc::new(policy),
            auth,
            registrar,
            domains,
            listen,
            tls,
            timers,
            limits: Limits {
                max_message_bytes: l.max_message_bytes,
                max_headers: l.max_headers,
            },
            max_connections: l.max_connections,
            max_tcp_connections: l.max_tcp_connections,
            max_tls_connections: l.max_tls_connections,
            max_connections_per_source: l.max_connections_per_source,
            connection_idle: Duration::from_millis(l.connection_idle_ms.max(1000)),
            header_timeout: Duration::from_millis(l.header_timeout_ms),
            handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
            max_transactions: l.max_transactions,
            rate_limit,
            hide_topology: raw.topology.hide,
            balancers,
            peer_uri,
            trusted,
            routes,
            log_level: level,
            log_format: raw.log.format,
            shutdown_grace: Duration::from_millis(raw.sip.shutdown_grace_ms),
        })
    }
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

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[sip]\ndomains = [\"org.example\"]\n\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:5060\"\nadress = \"x\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err();
        assert_eq!(e.line, 7, "{e}");
        assert_eq!(e.key, "adress", "{e}");
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
