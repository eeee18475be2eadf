//! Limits and deadlines of the gateway's HTTP listeners (the admin API and `/metrics`): they
//! face the same attackers as SIP. (The SIP TCP/TLS listeners use [`accept`] too; their limits
//! are `transport::ConnLimiter`'s.) Each listener has
//!
//! - a cap on its open connections and a share per subscriber (an IPv4 address or an IPv6
//!   /64): a connection beyond either is closed at once;
//! - a header-read deadline (slowloris) and a lifetime per connection (an idle keep-alive
//!   connection cannot be held for ever);
//! - an accept loop that backs off when accepting fails (out of descriptors: `EMFILE`,
//!   `ENFILE`) instead of spinning, and a reserved descriptor it gives up to accept and close
//!   the waiting connection, so the backlog drains and the loop does not wake again at once.
//!
//! The process raises its own descriptor limit at start ([`raise_descriptor_limit`]).

// I/O side: listeners, clocks and descriptors.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub per_source: usize,
    pub header_timeout: Duration,
    pub lifetime: Duration,
}

impl HttpLimits {
    /// The admin API: a few operators and their scripts.
    pub const ADMIN: HttpLimits = HttpLimits {
        max_connections: 64,
        per_source: 8,
        header_timeout: Duration::from_secs(5),
        lifetime: Duration::from_secs(300),
    };
    /// The realm crossover home service: foreign gateways, each one source relaying many
    /// callers' rounds (one connection per round), so a larger share per source; a round is
    /// one request, so a short lifetime.
    pub const CROSSOVER: HttpLimits = HttpLimits {
        max_connections: 1024,
        per_source: 128,
        header_timeout: Duration::from_secs(5),
        lifetime: Duration::from_secs(30),
    };
    /// `/metrics`, `/healthz`, `/readyz`: scrapers and probes.
    pub const METRICS: HttpLimits = HttpLimits {
        max_connections: 64,
        per_source: 8,
        header_timeout: Duration::from_secs(5),
        lifetime: Duration::from_secs(300),
    };
}

/// One listener's connection places.
#[derive(Debug)]
pub struct HttpGuard {
    limits: HttpLimits,
    total: Arc<Semaphore>,
    sources: Mutex<HashMap<gatehouse_auth::Subscriber, usize>>,
    /// Connections refused (over a cap) since start: metrics read it.
    refused: std::sync::atomic::AtomicU64,
}

/// A connection's place; given back when dropped.
#[derive(Debug)]
pub struct HttpPermit {
    _total: OwnedSemaphorePermit,
    guard: Arc<HttpGuard>,
    source: gatehouse_auth::Subscriber,
}

impl Drop for HttpPermit {
    fn drop(&mut self) {
        let mut sources = self.guard.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = sources.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

impl HttpGuard {
    pub fn new(limits: HttpLimits) -> Arc<HttpGuard> {
        Arc::new(HttpGuard {
            limits,
            total: Arc::new(Semaphore::new(limits.max_connections)),
            sources: Mutex::new(HashMap::new()),
            refused: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A place for a connection from `remote`, or `None` (over the listener's cap or the
    /// source's share).
    pub fn admit(self: &Arc<Self>, remote: IpAddr) -> Option<HttpPermit> {
        let source = gatehouse_auth::Subscriber::of(remote);
        let refuse = || {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        };
        let Ok(total) = Arc::clone(&self.total).try_acquire_owned() else {
            return refuse();
        };
        {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let n = sources.entry(source).or_default();
            if *n >= self.limits.per_source {
                drop(sources);
                return refuse();
            }
            *n += 1;
        }
        Some(HttpPermit {
            _total: total,
            guard: Arc::clone(self),
            source,
        })
    }

    /// An HTTP/1.1 server connection builder with the header-read deadline.
    pub fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout);
        b
    }
}

/// Accepts the next connection, backing off while accepting fails (out of descriptors, or
/// any other error) instead of spinning: `backoff` grows from 10 ms to 1 s and is reset by a
/// success. When the process is out of descriptors, `reserve` (a descriptor held for this)
/// is given up to accept the waiting connection and close it, then taken again.
pub async fn accept(
    listener: &TcpListener,
    backoff: &mut Duration,
    reserve: &mut Option<std::fs::File>,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                *backoff = Duration::ZERO;
                if reserve.is_none() {
                    *reserve = std::fs::File::open("/dev/null").ok();
                }
                return accepted;
            }
            Err(e) => {
                let out_of_descriptors = matches!(e.raw_os_error(), Some(24 | 23));
                if out_of_descriptors {
                    if let Some(spare) = reserve.take() {
                        drop(spare);
                        if let Ok((stream, _)) = listener.accept().await {
                            drop(stream);
                        }
                        *reserve = std::fs::File::open("/dev/null").ok();
                    }
                }
                *backoff = (*backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(*backoff).await;
            }
        }
    }
}

/// Raises the process's soft limit on open descriptors to its hard limit (the systemd unit
/// sets `LimitNOFILE`): connections and listeners share it. Returns the limit now in force.
pub fn raise_descriptor_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
        return Some(hard);
    }
    Some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_listener_and_per_source() {
        let g = HttpGuard::new(HttpLimits {
            max_connections: 3,
            per_source: 2,
            ..HttpLimits::ADMIN
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = g.admit(a).expect("first");
        let _p2 = g.admit(a).expect("second");
        assert!(g.admit(a).is_none(), "a source's share is 2");
        let _p3 = g.admit(b).expect("another source");
        assert!(g.admit(b).is_none(), "the listener's cap is 3");
        drop(p1);
        assert!(g.admit(b).is_some(), "a place given back is free again");
        assert_eq!(g.refused(), 2);
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, Resource};
        let now = raise_descriptor_limit().expect("a limit");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((soft, now), (hard, hard));
    }
}
