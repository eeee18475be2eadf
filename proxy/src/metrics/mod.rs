//! Prometheus metrics (names `gatehouse_<area>_<thing>_<unit>`, bounded labels only: method,
//! status class, transport, mechanism, outcome, reason — never a user, Call-ID or address)
//! and the HTTP listener that serves `/metrics`, `/healthz` and `/readyz`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `gatehouse_sip_requests_total` | counter | `method`, `transport` |
//! | `gatehouse_sip_responses_total` | counter | `class` (1xx..6xx), `transport` |
//! | `gatehouse_sip_parse_errors_total` | counter | |
//! | `gatehouse_sip_dropped_total` | counter | `reason` (`malformed_response`, `stray_response`) |
//! | `gatehouse_sip_transactions` | gauge | |
//! | `gatehouse_sip_retransmissions_total` | counter | `kind` (`sent`, `absorbed`) |
//! | `gatehouse_sip_transaction_timeouts_total` | counter | | client transactions that timed out (Timer B/F) |
//! | `gatehouse_sip_dns_lookups_total` | counter | `outcome` (`resolved`, `failed`): next hops named by host, located per RFC 3263 |
//! | `gatehouse_sip_dead_addresses` | gauge | | addresses DNS gave that failed lately, tried last until `dead_address_ms` is up |
//! | `gatehouse_sip_failovers_total` | counter | | branches sent to the next address DNS gave after a transport error, a timeout, or `failover_ms` of silence |
//! | `gatehouse_sip_invite_final_latency_seconds` | histogram | |
//! | `gatehouse_transport_connections` | gauge | |
//! | `gatehouse_auth_attempts_total` | counter | `mechanism`, `outcome` |
//! | `gatehouse_auth_pending_exchanges` | gauge | |
//! | `gatehouse_auth_challenges_total`, `gatehouse_auth_lockouts_total` | counter | |
//! | `gatehouse_admin_logins_total` | counter | `outcome` (`success`, `failure`, `locked`): admin API SASL exchanges that ended, and attempts refused while locked out |
//! | `gatehouse_crossover_total` | counter | `side` (`foreign`: rounds of callers from other realms relayed to their home; `home`: rounds foreign gateways relayed to us), `outcome` (`relayed`, `challenge`, `success`, `released`, `refused`, `deadline`, `unreachable`, `certificate`, refusal labels); no realm or user labels |
//! | `gatehouse_crossover_pending` | gauge | requests parked for their home (foreign side) |
//! | `gatehouse_policy_denials_total` | counter | `reason` |
//! | `gatehouse_tunnel_active` | gauge | |
//! | `gatehouse_tunnel_limit_checks_total` | counter | `outcome` (`granted`, `refused`, `unverified`): set-ups counted against the cluster's limits by the shared store (`unverified`: it did not answer in time, the gateway's own counts decided) |
//! | `gatehouse_tunnel_setup_duration_seconds` | histogram | |
//! | `gatehouse_registrar_bindings` | gauge | |
//! | `gatehouse_internal_errors_total` | counter | `area` (`sip`, `sasl`, `admin`, `reload`): panics caught |
//! | `gatehouse_auth_evicted_total` | counter | | parked exchanges dropped to make room |
//! | `gatehouse_sip_rate_limited_total` | counter | | requests dropped by the per-source limit |
//! | `gatehouse_sip_banned_sources` | gauge | | sources currently banned by the rate limit |
//! | `gatehouse_sip_stateless_challenges_total` | counter | `kind` (`sent`, `retransmitted`) |
//! | `gatehouse_transport_refused_total` | counter | `reason` (`per_source`, `tcp_budget`, `tls_budget`, `handshake_rate`) |
//! | `gatehouse_transport_closed_total` | counter | `reason` (`header_deadline`, `handshake_deadline`, `idle`) |
//! | `gatehouse_store_errors_total` | counter | | store writes that failed (logged too) |
//! | `gatehouse_store_commit_seconds` | histogram | | one batch of writes committed by the storage worker |
//! | `gatehouse_store_queued_writes` | gauge | | writes handed to the storage worker, not yet committed |
//! | `gatehouse_store_busy_retries_total` | counter | | commits retried because another connection held the write lock |
//! | `gatehouse_store_held_transmits` | gauge | | messages waiting for a tunnel's commit before they leave |
//! | `gatehouse_store_available` | gauge | | 1 while the store answers, 0 while it is locked elsewhere or unreachable (writes queue) |
//! | `gatehouse_auth_users` | gauge | | users in the credential snapshot the SASL server uses |
//! | `gatehouse_cluster_peers` | gauge | | gateways (this one included) connected to the shared store, as last read; 0 on a file store |
//! | `gatehouse_loop_message_seconds` | histogram | | the I/O loop's time on one received message |
//! | `gatehouse_loop_tick_seconds` | histogram | | the I/O loop's time on one maintenance tick or timer batch |
//! | `process_*` | (process collector) | |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric of the gateway, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub sip_requests: IntCounterVec,
    pub sip_responses: IntCounterVec,
    pub sip_parse_errors: IntCounter,
    pub sip_dropped: IntCounterVec,
    pub sip_transactions: IntGauge,
    pub sip_dead_addresses: IntGauge,
    pub invite_final_latency: Histogram,
    pub connections: IntGauge,
    pub sasl_attempts: IntCounterVec,
    pub sasl_pending: IntGauge,
    pub auth_challenges: IntCounter,
    pub auth_lockouts: IntCounter,
    pub admin_logins: IntCounterVec,
    pub crossover: IntCounterVec,
    pub crossover_pending: IntGauge,
    pub policy_denials: IntCounterVec,
    pub tunnels_active: IntGauge,
    pub tunnel_limit_checks: IntCounterVec,
    pub tunnel_setup: Histogram,
    pub registrar_bindings: IntGauge,
    pub internal_errors: IntCounterVec,
    pub sasl_evicted: IntCounter,
    pub rate_limited: IntCounter,
    pub banned_sources: IntGauge,
    pub stateless_challenges: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub store_errors: IntCounter,
    pub store_commit: Histogram,
    pub store_queued: IntGauge,
    pub store_busy_retries: IntCounter,
    pub store_held: IntGauge,
    pub store_available: IntGauge,
    pub auth_users: IntGauge,
    pub sip_retransmissions: IntCounterVec,
    pub sip_timeouts: IntCounter,
    pub sip_dns_lookups: IntCounterVec,
    pub sip_failovers: IntCounter,
    pub cluster_peers: IntGauge,
    pub loop_message: Histogram,
    pub loop_tick: Histogram,
    /// Set while the gateway accepts new requests.
    pub ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

/// Buckets of the loop histograms: 10 µs to 1 s (a message normally takes tens of µs; a
/// stall of milliseconds shows in the upper buckets).
fn loop_buckets() -> Vec<f64> {
    vec![
        0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01,
        0.05, 0.1, 1.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let latency = vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 180.0];
        let m = Metrics {
            sip_requests: counter_vec(
                &r,
                "gatehouse_sip_requests_total",
                "SIP requests received",
                &["method", "transport"],
            ),
            sip_responses: counter_vec(
                &r,
                "gatehouse_sip_responses_total",
                "SIP responses sent",
                &["class", "transport"],
            ),
            sip_parse_errors: counter(
                &r,
                "gatehouse_sip_parse_errors_total",
                "Messages that did not parse",
            ),
            sip_dropped: counter_vec(
                &r,
                "gatehouse_sip_dropped_total",
                "Messages dropped",
                &["reason"],
            ),
            sip_transactions: gauge(&r, "gatehouse_sip_transactions", "Live SIP transactions"),
            sip_dead_addresses: gauge(
                &r,
                "gatehouse_sip_dead_addresses",
                "Addresses DNS gave that failed lately (refused, timed out, silent): tried last until timers.dead_address_ms is up",
            ),
            invite_final_latency: histogram(
                &r,
                "gatehouse_sip_invite_final_latency_seconds",
                "INVITE received to final response sent",
                latency.clone(),
            ),
            connections: gauge(
                &r,
                "gatehouse_transport_connections",
                "Open TCP and TLS connections",
            ),
            sasl_attempts: counter_vec(
                &r,
                "gatehouse_auth_attempts_total",
                "Finished SASL exchanges",
                &["mechanism", "outcome"],
            ),
            sasl_pending: gauge(
                &r,
                "gatehouse_auth_pending_exchanges",
                "SASL exchanges parked between rounds",
            ),
            auth_challenges: counter(
                &r,
                "gatehouse_auth_challenges_total",
                "SASL challenges sent to callers (407 rounds)",
            ),
            auth_lockouts: counter(&r, "gatehouse_auth_lockouts_total", "Lockouts started"),
            admin_logins: counter_vec(
                &r,
                "gatehouse_admin_logins_total",
                "Admin API SASL exchanges by outcome (locked: refused while locked out)",
                &["outcome"],
            ),
            crossover: counter_vec(
                &r,
                "gatehouse_crossover_total",
                "Realm crossover rounds by side and outcome",
                &["side", "outcome"],
            ),
            crossover_pending: gauge(
                &r,
                "gatehouse_crossover_pending",
                "Requests parked while their home realm answers",
            ),
            policy_denials: counter_vec(
                &r,
                "gatehouse_policy_denials_total",
                "Requests denied by policy",
                &["reason"],
            ),
            tunnel_limit_checks: counter_vec(
                &r,
                "gatehouse_tunnel_limit_checks_total",
                "Tunnel set-ups counted against the cluster's limits by the shared store",
                &["outcome"],
            ),
            tunnels_active: gauge(
                &r,
                "gatehouse_tunnel_active",
                "Tunnels in the tunnel table",
            ),
            tunnel_setup: histogram(
                &r,
                "gatehouse_tunnel_setup_duration_seconds",
                "Tunnel INVITE received to 2xx relayed",
                latency,
            ),
            registrar_bindings: gauge(
                &r,
                "gatehouse_registrar_bindings",
                "Live registrar bindings",
            ),
            internal_errors: counter_vec(
                &r,
                "gatehouse_internal_errors_total",
                "Panics caught while handling one message or request (bugs; the gateway went on)",
                &["area"],
            ),
            sasl_evicted: counter(
                &r,
                "gatehouse_auth_evicted_total",
                "Parked SASL exchanges dropped to make room (source at its cap, or table full)",
            ),
            rate_limited: counter(
                &r,
                "gatehouse_sip_rate_limited_total",
                "Requests dropped by the per-source rate limit",
            ),
            banned_sources: gauge(
                &r,
                "gatehouse_sip_banned_sources",
                "Sources banned by the per-source rate limit",
            ),
            stateless_challenges: counter_vec(
                &r,
                "gatehouse_sip_stateless_challenges_total",
                "Challenges answered without a server transaction",
                &["kind"],
            ),
            connections_refused: counter_vec(
                &r,
                "gatehouse_transport_refused_total",
                "Connections refused at accept",
                &["reason"],
            ),
            connections_closed: counter_vec(
                &r,
                "gatehouse_transport_closed_total",
                "Connections closed by a deadline",
                &["reason"],
            ),
            store_errors: counter(
                &r,
                "gatehouse_store_errors_total",
                "Store writes that failed (each is logged)",
            ),
            store_commit: histogram(
                &r,
                "gatehouse_store_commit_seconds",
                "Time to commit one batch of writes (storage worker, off the SIP loop)",
                vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
            ),
            store_queued: gauge(
                &r,
                "gatehouse_store_queued_writes",
                "Writes handed to the storage worker and not yet committed",
            ),
            store_busy_retries: counter(
                &r,
                "gatehouse_store_busy_retries_total",
                "Commits retried because another connection held the store's write lock",
            ),
            store_held: gauge(
                &r,
                "gatehouse_store_held_transmits",
                "Messages waiting for a tunnel's commit before they leave",
            ),
            store_available: {
                let g = gauge(
                    &r,
                    "gatehouse_store_available",
                    "1 while the store answers; 0 while it is locked elsewhere or unreachable (writes queue)",
                );
                g.set(1);
                g
            },
            auth_users: gauge(
                &r,
                "gatehouse_auth_users",
                "Users in the credential snapshot the SASL server uses",
            ),
            cluster_peers: gauge(
                &r,
                "gatehouse_cluster_peers",
                "Gateways (this one included) connected to the shared store, as last read",
            ),
            loop_message: histogram(
                &r,
                "gatehouse_loop_message_seconds",
                "Time the I/O loop spent on one received message",
                loop_buckets(),
            ),
            loop_tick: histogram(
                &r,
                "gatehouse_loop_tick_seconds",
                "Time the I/O loop spent on one maintenance tick or timer batch",
                loop_buckets(),
            ),
            sip_retransmissions: counter_vec(
                &r,
                "gatehouse_sip_retransmissions_total",
                "Retransmissions by the transaction layer: sent (requests and finals on unreliable transports) and absorbed (received and answered from the transaction)",
                &["kind"],
            ),
            sip_timeouts: counter(
                &r,
                "gatehouse_sip_transaction_timeouts_total",
                "Client transactions that timed out (Timer B/F: the next hop never answered)",
            ),
            sip_dns_lookups: counter_vec(
                &r,
                "gatehouse_sip_dns_lookups_total",
                "Next hops named by host located through DNS (RFC 3263 NAPTR, SRV, A/AAAA): resolved, or failed (no address; the branch ends as 503)",
                &["outcome"],
            ),
            sip_failovers: counter(
                &r,
                "gatehouse_sip_failovers_total",
                "Branches sent to the next address DNS gave after a transport error, a timeout or failover_ms of silence (RFC 3263 section 4.3)",
            ),
            ready: Arc::new(AtomicBool::new(false)),
            registry: r,
        };
        m.initialise_series();
        // What runs: constant 1, the version and commit as labels (Prometheus convention).
        let build = prometheus::IntGaugeVec::new(
            Opts::new(
                "gatehouse_build_info",
                "The gateway's version and commit (always 1)",
            ),
            &["version", "commit"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GATEHOUSE_COMMIT")])
            .set(1);
        let _ = m.registry.register(Box::new(build));
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Every known label combination starts at 0, so a series exists (and `rate()` works)
    /// before its first event (Prometheus convention).
    fn initialise_series(&self) {
        for method in METHODS {
            for t in TRANSPORTS {
                self.sip_requests.with_label_values(&[method, t]);
            }
        }
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx", "6xx"] {
            for t in TRANSPORTS {
                self.sip_responses.with_label_values(&[class, t]);
            }
        }
        for mech in MECHANISMS {
            for outcome in ["success", "bad_credentials", "expired", "protocol"] {
                self.sasl_attempts.with_label_values(&[mech, outcome]);
            }
        }
        for d in gatehouse_policy::Denied::ALL {
            self.policy_denials.with_label_values(&[d.label()]);
        }
        for outcome in ["success", "failure", "locked"] {
            self.admin_logins.with_label_values(&[outcome]);
        }
        for outcome in ["relayed", "challenge", "success", "refused", "deadline"] {
            self.crossover.with_label_values(&["foreign", outcome]);
        }
        for outcome in [
            "challenge",
            "released",
            "bad_credentials",
            "domain_not_allowed",
        ] {
            self.crossover.with_label_values(&["home", outcome]);
        }
        for area in ["sip", "sasl", "admin", "reload"] {
            self.internal_errors.with_label_values(&[area]);
        }
        for reason in ["malformed_response", "stray_response"] {
            self.sip_dropped.with_label_values(&[reason]);
        }
        for kind in ["sent", "retransmitted"] {
            self.stateless_challenges.with_label_values(&[kind]);
        }
        for reason in ["per_source", "tcp_budget", "tls_budget", "handshake_rate"] {
            self.connections_refused.with_label_values(&[reason]);
        }
        for reason in ["header_deadline", "handshake_deadline", "idle"] {
            self.connections_closed.with_label_values(&[reason]);
        }
        for kind in ["sent", "absorbed"] {
            self.sip_retransmissions.with_label_values(&[kind]);
        }
        for outcome in ["granted", "refused", "unverified"] {
            self.tunnel_limit_checks.with_label_values(&[outcome]);
        }
        for outcome in ["resolved", "failed"] {
            self.sip_dns_lookups.with_label_values(&[outcome]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Response status class label.
pub fn class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "6xx",
    }
}

/// Method label, bounded: known methods by name, everything else `other`.
pub fn method_label(m: crate::sip::Method) -> &'static str {
    use crate::sip::Method::*;
    match m {
        Invite => "invite",
        Ack => "ack",
        Bye => "bye",
        Cancel => "cancel",
        Register => "register",
        Options => "options",
        Info => "info",
        Update => "update",
        Prack => "prack",
        Subscribe => "subscribe",
        Notify => "notify",
        Refer => "refer",
        Message => "message",
        Publish => "publish",
        Other => "other",
    }
}

/// The label values of every known method (series initialised at 0).
const METHODS: [&str; 15] = [
    "invite",
    "ack",
    "bye",
    "cancel",
    "register",
    "options",
    "info",
    "update",
    "prack",
    "subscribe",
    "notify",
    "refer",
    "message",
    "publish",
    "other",
];

const TRANSPORTS: [&str; 3] = ["udp", "tcp", "tls"];

/// SASL mechanism label, lower case (`scram-sha-256-plus`).
pub fn mechanism_label(name: &str) -> &'static str {
    match name {
        "SCRAM-SHA-256-PLUS" => "scram-sha-256-plus",
        "SCRAM-SHA-256" => "scram-sha-256",
        "EXTERNAL" => "external",
        "PLAIN" => "plain",
        _ => "other",
    }
}

const MECHANISMS: [&str; 4] = ["scram-sha-256-plus", "scram-sha-256", "external", "plain"];

async fn handle(
    metrics: Arc<Metrics>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        // Ready while the gateway serves calls, which it does with its store unreachable too
        // (authentication from the snapshot, writes queued): the body says so, the status
        // stays 200 so that a database outage does not take every gateway of a cluster out.
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
            let body = if metrics.store_available.get() == 1 {
                "ready\n".to_owned()
            } else {
                format!(
                    "ready; store unavailable, {} writes queued\n",
                    metrics.store_queued.get()
                )
            };
            (StatusCode::OK, "text/plain", body)
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let resp = Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
    Ok(resp)
}

/// Serves the metrics listener until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    // The same defences as the admin API's listener (`http_guard`).
    let guard = crate::http_guard::HttpGuard::new(crate::http_guard::HttpLimits::METRICS);
    let (mut backoff, mut reserve) = (std::time::Duration::ZERO, None);
    loop {
        let (stream, remote) =
            crate::http_guard::accept(&listener, &mut backoff, &mut reserve).await;
        let Some(permit) = guard.admit(remote.ip()) else {
            tracing::debug!(%remote, "metrics connection refused: over the listener's or the source's cap");
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let guard = Arc::clone(&guard);
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&metrics), req));
            let serve = guard.http1().serve_connection(io, service);
            let _ = tokio::time::timeout(guard.limits().lifetime, serve).await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gatehouse_build_info` names the version and the commit built (issue 12, item 10).
    #[test]
    fn build_info_names_version_and_commit() {
        let text = Metrics::new().render();
        let commit = env!("GATEHOUSE_COMMIT");
        assert!(
            text.contains(&format!(
                "gatehouse_build_info{{commit=\"{commit}\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(
            commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{commit}"
        );
    }
}
