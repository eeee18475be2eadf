//! Locating SIP servers (RFC 3263 section 4), without I/O: which DNS questions to ask for a
//! next hop named by host, and how to order what the answers say. The driver asks the
//! questions (`proxy/src/transport/dns.rs`) and the core tries the resulting hops in order,
//! failing over to the next on a transport error or a timeout (section 4.3).
//!
//! The steps, for a host that is not an IP address:
//! 1. Transport: fixed by `transport=` or `sips:`; else, with a port in the URI, UDP (TLS for
//!    `sips:`); else NAPTR records of the domain with the services this gateway can use
//!    (`SIP+D2U`, `SIP+D2T`, `SIPS+D2T`; only `SIPS+D2T` for `sips:`), in order and preference,
//!    each pointing at an SRV name; without NAPTR records, the SRV names of every usable
//!    transport (`_sip._udp`, `_sip._tcp`, `_sips._tcp`).
//! 2. Port and address: with a port in the URI, A/AAAA of the host; else the SRV records of
//!    the chosen names (RFC 2782 order: priority, then weighted random), then A/AAAA of each
//!    target; when no SRV record exists, A/AAAA of the host at the transport's default port.
//!
//! Every NAPTR record of the usable services is kept, in order, so that a failure on one
//! transport falls over to the next (a gateway that cannot reach a partner's TCP servers tries
//! its UDP ones); RFC 3263 leaves the failover list to the client.

use crate::flow::Transport;

/// A next hop named by host, as the URI gives it (RFC 3263 section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub host: String,
    /// The URI's port; `None` lets SRV choose.
    pub port: Option<u16>,
    /// The URI's `transport=`; `None` lets NAPTR/SRV choose.
    pub transport: Option<Transport>,
    /// A `sips:` URI: TLS only.
    pub secure: bool,
}

/// What to ask DNS first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// NAPTR records of the host; their SRV names, or [`Plan::Srv`]'s when there are none.
    Naptr,
    /// SRV records of these names in this order (their transports fixed).
    Srv(Vec<(Transport, String)>),
    /// A/AAAA records of the host, at this port with this transport.
    Address(Transport, u16),
}

/// The first step for `q`.
pub fn plan(q: &Query) -> Plan {
    let transport = q.transport.or(if q.secure {
        Some(Transport::Tls)
    } else if q.port.is_some() {
        Some(Transport::Udp)
    } else {
        None
    });
    match (transport, q.port) {
        (Some(t), Some(port)) => Plan::Address(t, port),
        (Some(t), None) => Plan::Srv(vec![(t, srv_name(t, &q.host))]),
        (None, _) => Plan::Naptr,
    }
}

/// The SRV names to ask when the host has no usable NAPTR record: every usable transport,
/// UDP first (the one every SIP element supports), TLS only for `sips:`.
pub fn srv_fallback(q: &Query, usable: &[Transport]) -> Vec<(Transport, String)> {
    [Transport::Udp, Transport::Tcp, Transport::Tls]
        .into_iter()
        .filter(|t| usable.contains(t) && (!q.secure || *t == Transport::Tls))
        .map(|t| (t, srv_name(t, &q.host)))
        .collect()
}

/// Where no SRV record exists: the host itself at the transport's default port (for the
/// first usable transport the plan named, UDP or TLS for `sips:` otherwise).
pub fn address_fallback(q: &Query, names: &[(Transport, String)]) -> (Transport, u16) {
    let t = q
        .transport
        .or(names.first().map(|(t, _)| *t))
        .unwrap_or(if q.secure {
            Transport::Tls
        } else {
            Transport::Udp
        });
    (t, q.port.unwrap_or(t.default_port()))
}

/// `_sip._udp.host`, `_sip._tcp.host`, `_sips._tcp.host` (RFC 3263 section 4.1).
pub fn srv_name(t: Transport, host: &str) -> String {
    let host = host.trim_end_matches('.');
    match t {
        Transport::Udp => format!("_sip._udp.{host}."),
        Transport::Tcp => format!("_sip._tcp.{host}."),
        Transport::Tls => format!("_sips._tcp.{host}."),
    }
}

/// A NAPTR record as DNS returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naptr {
    pub order: u16,
    pub preference: u16,
    pub flags: String,
    pub services: String,
    pub replacement: String,
}

/// The transport a NAPTR service field names (RFC 3263 section 4.1, RFC 3261 section 26.4).
fn service_transport(services: &str) -> Option<Transport> {
    if services.eq_ignore_ascii_case("SIP+D2U") {
        Some(Transport::Udp)
    } else if services.eq_ignore_ascii_case("SIP+D2T") {
        Some(Transport::Tcp)
    } else if services.eq_ignore_ascii_case("SIPS+D2T") {
        Some(Transport::Tls)
    } else {
        None
    }
}

/// The SRV names the NAPTR records lead to, best first: only records with the `s` flag and a
/// service this gateway can use (`SIPS+D2T` alone for `sips:`), sorted by order then
/// preference; duplicates dropped.
pub fn order_naptr(
    records: &[Naptr],
    secure: bool,
    usable: &[Transport],
) -> Vec<(Transport, String)> {
    let mut usable_records: Vec<(&Naptr, Transport)> = records
        .iter()
        .filter(|r| r.flags.eq_ignore_ascii_case("s") && !r.replacement.is_empty())
        .filter_map(|r| service_transport(&r.services).map(|t| (r, t)))
        .filter(|(_, t)| usable.contains(t) && (!secure || *t == Transport::Tls))
        .collect();
    usable_records.sort_by_key(|(r, _)| (r.order, r.preference));
    let mut out: Vec<(Transport, String)> = Vec::with_capacity(usable_records.len());
    for (r, t) in usable_records {
        let mut name = r.replacement.clone();
        if !name.ends_with('.') {
            name.push('.');
        }
        if !out
            .iter()
            .any(|(ot, on)| *ot == t && on.eq_ignore_ascii_case(&name))
        {
            out.push((t, name));
        }
    }
    out
}

/// An SRV record as DNS returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// The order in which to try SRV targets (RFC 2782): lowest priority first; within one
/// priority, a weighted random order — each pick takes the first record whose running sum of
/// weights reaches `pick(sum)` (a number in `0..=sum` from the caller's generator), zero
/// weights first in the list so that they have a small chance. A single target `.` means the
/// service is decidedly not available here: nothing.
pub fn order_srv(records: &[Srv], mut pick: impl FnMut(u32) -> u32) -> Vec<Srv> {
    if records.len() == 1 && records[0].target.trim_end_matches('.').is_empty() {
        return Vec::new();
    }
    let mut rest: Vec<Srv> = records
        .iter()
        .filter(|r| !r.target.trim_end_matches('.').is_empty())
        .cloned()
        .collect();
    rest.sort_by_key(|r| (r.priority, r.weight != 0));
    let mut out = Vec::with_capacity(rest.len());
    while let Some(priority) = rest.first().map(|r| r.priority) {
        let end = rest
            .iter()
            .position(|r| r.priority != priority)
            .unwrap_or(rest.len());
        let mut group: Vec<Srv> = rest.drain(..end).collect();
        while !group.is_empty() {
            let sum: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let target = pick(sum).min(sum);
            let mut running = 0u32;
            let idx = group
                .iter()
                .position(|r| {
                    running += u32::from(r.weight);
                    running >= target
                })
                .unwrap_or(0);
            out.push(group.remove(idx));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Transport; 3] = [Transport::Udp, Transport::Tcp, Transport::Tls];

    fn q(host: &str, port: Option<u16>, transport: Option<Transport>, secure: bool) -> Query {
        Query {
            host: host.into(),
            port,
            transport,
            secure,
        }
    }

    #[test]
    fn the_uri_decides_what_dns_is_asked() {
        // Nothing fixed: NAPTR.
        assert_eq!(plan(&q("partner.example", None, None, false)), Plan::Naptr);
        // A port: UDP (TLS for sips:) to the host's addresses, no NAPTR, no SRV.
        assert_eq!(
            plan(&q("partner.example", Some(5070), None, false)),
            Plan::Address(Transport::Udp, 5070)
        );
        assert_eq!(
            plan(&q("partner.example", Some(5071), None, true)),
            Plan::Address(Transport::Tls, 5071)
        );
        // A transport: its SRV name.
        assert_eq!(
            plan(&q("partner.example", None, Some(Transport::Tcp), false)),
            Plan::Srv(vec![(Transport::Tcp, "_sip._tcp.partner.example.".into())])
        );
        assert_eq!(
            plan(&q("partner.example.", None, None, true)),
            Plan::Srv(vec![(Transport::Tls, "_sips._tcp.partner.example.".into())])
        );
    }

    #[test]
    fn without_naptr_every_usable_transport_is_asked_and_then_the_host() {
        let plain = q("p.example", None, None, false);
        assert_eq!(
            srv_fallback(&plain, &[Transport::Udp, Transport::Tcp]),
            vec![
                (Transport::Udp, "_sip._udp.p.example.".into()),
                (Transport::Tcp, "_sip._tcp.p.example.".into())
            ]
        );
        let secure = q("p.example", None, None, true);
        assert_eq!(
            srv_fallback(&secure, &ALL),
            vec![(Transport::Tls, "_sips._tcp.p.example.".into())]
        );
        assert!(srv_fallback(&secure, &[Transport::Udp]).is_empty());
        assert_eq!(
            address_fallback(&plain, &srv_fallback(&plain, &ALL)),
            (Transport::Udp, 5060)
        );
        assert_eq!(address_fallback(&secure, &[]), (Transport::Tls, 5061));
    }

    fn naptr(order: u16, pref: u16, flags: &str, services: &str, repl: &str) -> Naptr {
        Naptr {
            order,
            preference: pref,
            flags: flags.into(),
            services: services.into(),
            replacement: repl.into(),
        }
    }

    #[test]
    fn naptr_records_are_filtered_by_service_and_flag_and_ordered() {
        let records = [
            naptr(20, 10, "s", "SIP+D2U", "_sip._udp.p.example"),
            naptr(10, 20, "S", "SIP+D2T", "_sip._tcp.p.example."),
            naptr(10, 10, "s", "SIPS+D2T", "_sips._tcp.p.example."),
            naptr(5, 10, "s", "SIP+D2S", "_sip._sctp.p.example."),
            naptr(5, 10, "u", "E2U+sip", ""),
            naptr(30, 10, "s", "SIP+D2U", "_sip._udp.p.example."),
        ];
        assert_eq!(
            order_naptr(&records, false, &ALL),
            vec![
                (Transport::Tls, "_sips._tcp.p.example.".into()),
                (Transport::Tcp, "_sip._tcp.p.example.".into()),
                (Transport::Udp, "_sip._udp.p.example.".into()),
            ]
        );
        assert_eq!(
            order_naptr(&records, true, &ALL),
            vec![(Transport::Tls, "_sips._tcp.p.example.".into())]
        );
        // A gateway without a TLS listener skips SIPS+D2T.
        assert_eq!(
            order_naptr(&records, false, &[Transport::Udp, Transport::Tcp])[0],
            (Transport::Tcp, "_sip._tcp.p.example.".into())
        );
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port,
            target: target.into(),
        }
    }

    #[test]
    fn srv_targets_go_by_priority_then_weight() {
        let records = [
            srv(20, 0, 5060, "c.p.example."),
            srv(10, 60, 5060, "a.p.example."),
            srv(10, 40, 5060, "b.p.example."),
        ];
        let targets = |picks: &[u32]| {
            let mut picks = picks.iter().copied();
            order_srv(&records, |_| picks.next().unwrap_or(0))
                .into_iter()
                .map(|r| r.target)
                .collect::<Vec<_>>()
        };
        // Running sums in the group of priority 10: a 60, b 100.
        assert_eq!(
            targets(&[10, 0]),
            ["a.p.example.", "b.p.example.", "c.p.example."]
        );
        assert_eq!(
            targets(&[61, 0]),
            ["b.p.example.", "a.p.example.", "c.p.example."]
        );
        // The weights decide the share: over all picks, a first 60 times in 100.
        let mut n = 0u32;
        let firsts = (0..=99)
            .filter(|_| {
                let mut first = true;
                let got = order_srv(&records, |sum| {
                    let v = if first { n % (sum + 1) } else { 0 };
                    first = false;
                    v
                });
                n += 1;
                got[0].target == "a.p.example."
            })
            .count();
        assert!((55..=65).contains(&firsts), "{firsts}");
    }

    proptest::proptest! {
        /// Whatever DNS returns and whatever the generator draws, every usable target comes out
        /// exactly once, lower priority numbers first.
        #[test]
        fn srv_order_is_a_priority_ordered_permutation(
            records in proptest::collection::vec(
                (0u16..4, 0u16..100, proptest::sample::select(vec!["a.", "b.", "c.", "d.", "."])),
                0..12,
            ),
            draws in proptest::collection::vec(0u32..1000, 1..16),
        ) {
            let records: Vec<Srv> = records
                .into_iter()
                .enumerate()
                .map(|(i, (priority, weight, target))| srv(priority, weight, 5060 + i as u16, target))
                .collect();
            let mut n = 0;
            let out = order_srv(&records, |sum| {
                n += 1;
                draws[n % draws.len()] % (sum + 1)
            });
            let mut want: Vec<u16> = records.iter().filter(|r| r.target != ".").map(|r| r.port).collect();
            let mut got: Vec<u16> = out.iter().map(|r| r.port).collect();
            want.sort_unstable();
            got.sort_unstable();
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert!(out.windows(2).all(|w| w[0].priority <= w[1].priority));
        }
    }

    #[test]
    fn a_lone_dot_target_means_no_service() {
        assert!(order_srv(&[srv(0, 0, 0, ".")], |_| 0).is_empty());
        assert_eq!(order_srv(&[srv(0, 0, 5060, "x.example.")], |_| 0).len(), 1);
    }
}
