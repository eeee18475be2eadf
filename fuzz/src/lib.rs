//! Shared set-up of the fuzz targets: a gateway core on a fixed loopback configuration with
//! SASL on (one user in an in-memory store), as the `proxy_datagrams` target drives it.

use std::net::SocketAddr;
use std::time::Instant;

use gatehouse::config::Config;
use gatehouse::core::Proxy;
use gatehouse::store::Store;

/// The configuration of the fuzzed gateway: one domain, a trusted inside network, a route,
/// a policy allowing partners' tunnels, and low limits so the fuzzer reaches them.
pub const CONFIG: &str = r#"
[sip]
domains = ["org.example"]

[[listen]]
transport = "udp"
address = "192.0.2.1:5060"

[[listen]]
transport = "tcp"
address = "192.0.2.1:5060"

[trust]
sources = ["198.51.100.0/24"]

[[route]]
domain = "org.example"
target = "sip:198.51.100.20:5060"

[limits]
max_transactions = 64

[auth]
max_pending = 16
max_pending_per_source = 4

[rate_limit]
requests = 50
"#;

/// The core, its store holding `alice` (password `alice-secret`).
pub fn proxy() -> Proxy {
    let cfg = Config::parse(CONFIG, "fuzz").expect("the fuzz configuration is valid");
    let mut store = Store::in_memory().expect("in-memory store");
    store
        .add_user(
            "alice",
            b"alice-secret",
            &["sip:alice@partner.example".into()],
            None,
            4096,
        )
        .expect("user added");
    let bound: Vec<_> = cfg.listen.iter().map(|l| (l.transport, l.address)).collect();
    let core = gatehouse::core_config(&cfg, &bound, &store).expect("core configuration");
    let clock = gatehouse::wall_clock();
    let snapshot = store
        .snapshot(clock.unix(clock.instant))
        .expect("snapshot");
    Proxy::new(core, snapshot, clock)
}

/// Sources the datagrams come from: outside, outside, inside (trusted), IPv6 outside.
pub fn source(n: u8) -> SocketAddr {
    match n % 4 {
        0 => "203.0.113.5:5062",
        1 => "203.0.113.77:5060",
        2 => "198.51.100.20:5060",
        _ => "[2001:db8::5]:5060",
    }
    .parse()
    .expect("address")
}

/// A start instant shared by a run.
pub fn start() -> Instant {
    Instant::now()
}
