//! Gatehouse, a SASL-authenticating SIP edge proxy.
//!
//! Layers, bottom up (see ARCHITECTURE.md):
//! - [`sip`] (the `gatehouse-sip` crate): message model, lazy byte-preserving parser, stream
//!   framing, the [`transaction`] machines and timers, [`flow`]s and the WireGuard SDP codec
//!   (all sans-IO);
//! - [`core`]: the RFC 3261 section 16 request pipeline and response contexts (sans-IO);
//! - [`transport`]: sockets and the one I/O loop that drives the core;
//! - [`config`]: validated configuration.

pub mod admin;
pub mod config;
pub mod core;
pub mod crossover;
pub mod http_guard;
pub mod metrics;
pub mod store;
pub mod tls;
pub mod transport;
pub mod tunnel;

pub use gatehouse_sip as sip;
pub use gatehouse_sip::{flow, transaction};

use std::future::Future;
use std::io;

use crate::config::Config;
use crate::core::{CoreConfig, LocalAddr, Proxy, WallClock};
use crate::flow::Transport;
use crate::store::{Store, StoreError};
use crate::transport::{Bound, Driver};

/// Log-level control installed once by the binary (the admin API's `PUT /api/v1/log-level`).
pub static LOG_CONTROL: std::sync::OnceLock<admin::LogControl> = std::sync::OnceLock::new();

/// Builds the core's view of the configuration for the sockets actually bound (`bound`:
/// transport and address of each `[[listen]]`, in order; `Bound::addrs`).
pub fn core_config(
    cfg: &Config,
    bound: &[(Transport, std::net::SocketAddr)],
    store: &Store,
) -> Result<CoreConfig, StoreError> {
    let locals = cfg
        .listen
        .iter()
        .zip(bound)
        .map(|(l, &(transport, actual))| {
            // Port 0 in the configuration becomes the port actually bound.
            let advertise = l.advertise.clone().map(|(h, p)| {
                (
                    h,
                    if l.address.port() == 0 {
                        actual.port()
                    } else {
                        p
                    },
                )
            });
            LocalAddr::new(transport, actual, advertise)
        })
        .collect();
    Ok(CoreConfig {
        dialog_key: store.key("dialog-mac")?,
        auth_secret: store.key("fake-verifier")?,
        auth: cfg.auth.clone(),
        tunnels: cfg.tunnels.clone(),
        policy: std::sync::Arc::clone(&cfg.policy),
        registrar: cfg.registrar,
        domains: cfg.domains.clone(),
        aliases: cfg.aliases.clone(),
        locals,
        routes: cfg.routes.clone(),
        trusted: cfg.trusted.clone(),
        balancers: cfg.balancers.clone(),
        peer_uri: cfg.peer_uri.clone(),
        shared_store: store.is_shared(),
        limits: cfg.limits,
        max_transactions: cfg.max_transactions,
        timers: cfg.timers,
        failover: cfg.failover,
        dead_address: cfg.dead_address,
        rate_limit: cfg.rate_limit,
        hide_topology: cfg.hide_topology,
        // The driver side draws the core's seed from the operating system.
        seed: os_seed(),
        crossover: cfg
            .crossover
            .as_ref()
            .map(|c| crate::core::crossover::crossover_core(c, cfg.auth.max_pending_per_source)),
    })
}

/// 32 bytes from the operating system's generator (the core's seed).
#[allow(clippy::disallowed_methods)] // the driver side: the one place the core's seed is drawn
fn os_seed() -> [u8; 32] {
    rand::random()
}

/// Reads both clocks once: the core's map from its monotonic time to wall-clock seconds
/// (the core itself reads no clock).
#[allow(clippy::disallowed_methods)] // the driver side: this is where the clocks are read
pub fn wall_clock() -> WallClock {
    WallClock {
        instant: std::time::Instant::now(),
        system: std::time::SystemTime::now(),
    }
}

/// Opens the configured store (a file, or memory for the embedded demo).
pub fn open_store(cfg: &Config) -> Result<Store, StoreError> {
    match &cfg.auth.store {
        Some(path) => Store::open(path),
        None => Store::in_memory(),
    }
}

/// Runs the gateway on already bound sockets until `shutdown` resolves, then drains.
pub async fn run(cfg: Config, bound: Bound, shutdown: impl Future<Output = ()>) -> io::Result<()> {
    let invalid = |e: StoreError| io::Error::other(e.to_string());
    let mut store = open_store(&cfg).map_err(invalid)?;
    match &cfg.auth.store {
        Some(location) => tracing::info!(
            backend = store.backend(),
            store = %crate::store::display_location(location),
            "store opened"
        ),
        None => tracing::info!("store in memory (nothing persists)"),
    }
    let core = core_config(&cfg, &bound.addrs, &store).map_err(invalid)?;
    let clock = wall_clock();
    let snapshot = store.snapshot(clock.unix(clock.instant)).map_err(invalid)?;
    let proxy = Proxy::new(core, snapshot, clock);
    // From here on the store belongs to the storage worker (its own thread).
    let driver = Driver::new(&cfg, proxy, bound, store)?;
    driver.run(shutdown).await;
    Ok(())
}
