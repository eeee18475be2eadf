//! DNS for next hops named by host: RFC 3263 server location with `hickory-resolver`,
//! in tasks of their own, never on the loop. The order of questions and answers is
//! `gatehouse_sip::locate`'s (pure, unit-tested); this module asks them: NAPTR, then SRV, then
//! A/AAAA, through the name servers of `[dns] servers` or `/etc/resolv.conf` (and
//! `/etc/hosts`), with hickory's cache honouring each record's TTL.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use rand::Rng;

use crate::config::DnsSettings;
use crate::core::locate::LocateError;
use crate::flow::{Destination, Transport};
use crate::sip::locate::{self, Naptr, Plan, Query, Srv};

/// At most this many addresses per name (each a failover step): a zone cannot make one
/// request hold a long list.
const MAX_HOPS: usize = 16;

/// The gateway's DNS client.
#[derive(Clone)]
pub struct Locator {
    resolver: TokioResolver,
    /// Transports the gateway has listeners for: the only ones DNS may choose.
    usable: Vec<Transport>,
    /// The most one location may take (its several questions together): a dead name server
    /// must not hold a request for each question's timeouts in turn.
    deadline: Duration,
}

impl std::fmt::Debug for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locator")
            .field("usable", &self.usable)
            .finish()
    }
}

impl Locator {
    /// A locator asking `settings.servers` (or the system's name servers) for transports
    /// `usable`. Without any name server (no `[dns] servers` and no readable
    /// `/etc/resolv.conf`) only `/etc/hosts` answers; that is logged.
    pub fn new(settings: &DnsSettings, usable: Vec<Transport>) -> Locator {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if settings.servers.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "no system name servers (/etc/resolv.conf); names resolve through /etc/hosts only"
                    );
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                        provider,
                    )
                }
            }
        } else {
            let servers = settings
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        opts.timeout = settings.timeout;
        opts.attempts = settings.attempts;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder.build().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "DNS resolver configuration refused; using defaults");
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                TokioRuntimeProvider::default(),
            )
            .build()
            .expect("an empty resolver configuration builds")
        });
        let deadline = settings.timeout * u32::try_from(settings.attempts).unwrap_or(5) * 2;
        Locator {
            resolver,
            usable,
            deadline,
        }
    }

    /// The addresses to try for `q`, best first (RFC 3263 section 4), each with its transport
    /// and the URI's host as the TLS server name; an error when there are none, or when DNS
    /// did not answer within twice `[dns] timeout_ms` × `attempts` in all.
    pub async fn locate(&self, q: &Query) -> Result<Vec<Destination>, LocateError> {
        tokio::time::timeout(self.deadline, self.locate_inner(q))
            .await
            .unwrap_or_else(|_| {
                Err(LocateError(format!(
                    "{}: DNS did not answer within {} ms",
                    q.host,
                    self.deadline.as_millis()
                )))
            })
    }

    async fn locate_inner(&self, q: &Query) -> Result<Vec<Destination>, LocateError> {
        let names = match locate::plan(q) {
            Plan::Address(transport, port) => {
                let hops = self.addresses(&q.host, transport, port, q).await?;
                return Ok(hops);
            }
            Plan::Srv(names) => names,
            Plan::Naptr => {
                let records = self.naptr(&q.host).await;
                let ordered = locate::order_naptr(&records, q.secure, &self.usable);
                if ordered.is_empty() {
                    locate::srv_fallback(q, &self.usable)
                } else {
                    ordered
                }
            }
        };
        let mut hops = Vec::new();
        let mut any_srv = false;
        for (transport, name) in &names {
            let records = self.srv(name).await;
            any_srv |= !records.is_empty();
            let ordered = {
                let mut rng = rand::rng();
                locate::order_srv(&records, |sum| rng.random_range(0..=sum))
            };
            for srv in ordered {
                if hops.len() >= MAX_HOPS {
                    break;
                }
                if let Ok(found) = self.addresses(&srv.target, *transport, srv.port, q).await {
                    hops.extend(found);
                }
            }
        }
        if !any_srv {
            let (transport, port) = locate::address_fallback(q, &names);
            return self.addresses(&q.host, transport, port, q).await;
        }
        hops.truncate(MAX_HOPS);
        if hops.is_empty() {
            return Err(LocateError(format!(
                "the SRV targets of {} have no address",
                q.host
            )));
        }
        Ok(hops)
    }

    /// The addresses of a service found by SRV (RFC 2782 order and weights), or of `host`
    /// itself at `default_port` when it has no SRV records; within the location deadline.
    pub async fn service(
        &self,
        srv_name: &str,
        host: &str,
        default_port: u16,
    ) -> Result<Vec<SocketAddr>, LocateError> {
        let find = async {
            let records = self.srv(&fqdn(srv_name)).await;
            let targets: Vec<(String, u16)> = if records.is_empty() {
                vec![(host.to_owned(), default_port)]
            } else {
                let mut rng = rand::rng();
                locate::order_srv(&records, |sum| rng.random_range(0..=sum))
                    .into_iter()
                    .map(|r| (r.target.trim_end_matches('.').to_owned(), r.port))
                    .collect()
            };
            let mut out = Vec::new();
            for (target, port) in targets.into_iter().take(MAX_HOPS) {
                if let Ok(found) = self.resolver.lookup_ip(fqdn(&target).as_str()).await {
                    out.extend(found.iter().map(|ip| SocketAddr::new(ip, port)));
                }
                if out.len() >= MAX_HOPS {
                    break;
                }
            }
            out.truncate(MAX_HOPS);
            if out.is_empty() {
                Err(LocateError(format!("{srv_name}: no address")))
            } else {
                Ok(out)
            }
        };
        tokio::time::timeout(self.deadline, find)
            .await
            .unwrap_or_else(|_| Err(LocateError(format!("{srv_name}: DNS did not answer"))))
    }

    /// A/AAAA of `host` (IPv4 first) at `port` with `transport`.
    async fn addresses(
        &self,
        host: &str,
        transport: Transport,
        port: u16,
        q: &Query,
    ) -> Result<Vec<Destination>, LocateError> {
        let found = self
            .resolver
            .lookup_ip(fqdn(host).as_str())
            .await
            .map_err(|e| {
                LocateError(if e.is_no_records_found() {
                    format!("{host} has no address (A/AAAA)")
                } else {
                    format!("{host}: {e}")
                })
            })?;
        let mut ips: Vec<IpAddr> = found.iter().collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips.truncate(MAX_HOPS);
        if ips.is_empty() {
            return Err(LocateError(format!("{host}: no address")));
        }
        Ok(ips
            .into_iter()
            .map(|ip| Destination::Addr {
                transport,
                addr: SocketAddr::new(ip, port),
                server_name: Some(q.host.as_str().into()),
            })
            .collect())
    }

    /// The NAPTR records of `host`; none when there are none or DNS failed (RFC 3263 then
    /// goes on with SRV).
    async fn naptr(&self, host: &str) -> Vec<Naptr> {
        self.records(&fqdn(host), RecordType::NAPTR, |data| match data {
            RData::NAPTR(n) => Some(Naptr {
                order: n.order,
                preference: n.preference,
                flags: String::from_utf8_lossy(&n.flags).into_owned(),
                services: String::from_utf8_lossy(&n.services).into_owned(),
                replacement: n.replacement.to_ascii(),
            }),
            _ => None,
        })
        .await
    }

    /// The SRV records of `name`; none when there are none or DNS failed.
    async fn srv(&self, name: &str) -> Vec<Srv> {
        self.records(name, RecordType::SRV, |data| match data {
            RData::SRV(s) => Some(Srv {
                priority: s.priority,
                weight: s.weight,
                port: s.port,
                target: s.target.to_ascii(),
            }),
            _ => None,
        })
        .await
    }

    /// The answers of type `kind` for `name`, each as `read` makes it; none when DNS failed.
    async fn records<T>(
        &self,
        name: &str,
        kind: RecordType,
        read: impl Fn(&RData) -> Option<T>,
    ) -> Vec<T> {
        match self.resolver.lookup(name, kind).await {
            Ok(found) => found
                .answers()
                .iter()
                .filter_map(|r| read(&r.data))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A host name as an absolute name: a SIP URI's host is never relative to a search domain.
fn fqdn(host: &str) -> String {
    if host.ends_with('.') {
        host.to_owned()
    } else {
        format!("{host}.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name server that never answers costs a request at most the location's deadline, not
    /// each question's timeouts in turn (NAPTR, then the SRV names, then A/AAAA).
    #[tokio::test]
    async fn a_silent_name_server_fails_the_location_within_its_deadline() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let settings = DnsSettings {
            servers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(100),
            attempts: 1,
        };
        let locator = Locator::new(&settings, vec![Transport::Udp, Transport::Tcp]);
        let started = std::time::Instant::now();
        let q = Query {
            host: "partner.test".into(),
            port: None,
            transport: None,
            secure: false,
        };
        let err = locator.locate(&q).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(
            err.0.contains("DNS did not answer within 200 ms"),
            "{}",
            err.0
        );
    }
}
