//! The target stage and the gateway's own names: [`Router`] owns the served domains, the
//! local addresses (as the gateway names itself in Via and Record-Route), the aliases and the
//! static routes; it says whether a URI names the gateway (its addresses and aliases are its
//! domains: Kamailio's `myself`), which local address faces a destination, and where a
//! request goes (registered bindings first, then a route).

use crate::config::route::{self, RouteTable};
use crate::flow::{Destination, Flow};
use crate::sip::{Scheme, Uri, Via};

use super::registrar::Binding;
use super::{canonical_ip, LocalAddr, Reject};

/// Where one branch of a request goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The branch's Request-URI; empty keeps the request's.
    pub ruri: String,
    /// The next hop.
    pub dest: Destination,
    /// Set when the binding's flow is held by another gateway of the cluster: `dest` is that
    /// gateway, and the branch carries a Route naming it and the flow (`Proxy::relay`).
    pub peer: Option<PeerHop>,
}

/// A binding reached through the gateway that holds its flow (RFC 5626 edge proxy).
#[derive(Debug, Clone)]
pub struct PeerHop {
    /// That gateway's `[cluster] peer_uri`.
    pub uri: String,
    /// The flow at that gateway: where it sends the request.
    pub flow: Destination,
}

impl Target {
    /// A branch straight to `dest`.
    pub fn direct(ruri: String, dest: Destination) -> Target {
        Target {
            ruri,
            dest,
            peer: None,
        }
    }

    /// The destinations a PSK in this branch crosses: the next hop, and the flow at the peer.
    pub fn hops(&self) -> impl Iterator<Item = &Destination> {
        std::iter::once(&self.dest).chain(self.peer.as_ref().map(|p| &p.flow))
    }

    /// The branch for a binding: its flow, or the gateway holding it (`None` when the stored
    /// holder is not a SIP URI: the binding is skipped).
    fn of_binding(b: Binding) -> Option<Target> {
        let flow = b.destination();
        let Some(holder) = b.holder else {
            return Some(Target::direct(b.contact, flow));
        };
        let uri = Uri::parse(&holder).ok()?;
        Some(Target {
            dest: route::destination_of(&uri, None),
            ruri: b.contact,
            peer: Some(PeerHop {
                uri: holder.into(),
                flow,
            }),
        })
    }
}

/// The route decision for one out-of-dialog request: the AOR its Request-URI names (the
/// binding or route was looked up for it) and the branches that follow from it. It is the one
/// value both the policy query (`Query::to`) and the relay (through the `Clearance`) read, so
/// what is authorised and where the request goes cannot disagree; only [`Router::route`]
/// makes one.
#[derive(Debug)]
pub struct Routed {
    target: String,
    branches: Vec<Target>,
}

impl Routed {
    /// The AOR the request reaches (`sip:user@host`, host lower-cased; `sip:host` for a
    /// Request-URI without user): the policy's target and the tunnel's recorded target.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The branches (next hops) the route decision chose.
    pub fn branches(&self) -> &[Target] {
        &self.branches
    }

    /// The branches, for the relay stage that consumes the decision.
    pub(super) fn into_branches(self) -> Vec<Target> {
        self.branches
    }
}

/// The AOR a Request-URI names: `sip:user@host` (parameters of the user part dropped, host
/// lower-cased, `sips:` kept), or `sip:host` without a user part.
fn routed_aor(uri: &Uri<'_>) -> String {
    let scheme = if uri.scheme == Scheme::Sips {
        "sips"
    } else {
        "sip"
    };
    let host = uri.host.to_ascii_lowercase();
    match uri.user.and_then(|u| u.split(';').next()) {
        Some(user) => format!("{scheme}:{user}@{host}"),
        None => format!("{scheme}:{host}"),
    }
}

/// Routing and self-recognition (see the module documentation).
#[derive(Debug)]
pub struct Router {
    /// Lower-case domains the gateway is the authority for.
    domains: Vec<String>,
    /// Other hosts that name the gateway (lower-case; any port).
    aliases: Vec<String>,
    /// Never empty (the configuration needs a listener).
    locals: Vec<LocalAddr>,
    routes: RouteTable,
}

impl Router {
    pub fn new(
        domains: Vec<String>,
        aliases: Vec<String>,
        locals: Vec<LocalAddr>,
        routes: RouteTable,
    ) -> Self {
        assert!(!locals.is_empty(), "a gateway listens somewhere");
        Router {
            domains,
            aliases,
            locals,
            routes,
        }
    }

    /// New domains, aliases and routes (reload); listeners need a restart.
    pub fn set_routes(&mut self, domains: Vec<String>, aliases: Vec<String>, routes: RouteTable) {
        self.domains = domains;
        self.aliases = aliases;
        self.routes = routes;
    }

    /// Whether a URI's host (and port) names this gateway itself: one of its listen addresses
    /// or advertised names, or an alias (Kamailio's `myself`, less the domains).
    pub fn is_myself(&self, uri: &Uri<'_>) -> bool {
        let host = uri.host.trim_start_matches('[').trim_end_matches(']');
        self.is_local_hostport(uri) || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(host))
    }

    /// A Request-URI that names the gateway by address or alias, with a user, read as that
    /// user in the first domain (`sip:ping@192.0.2.1` -> `sip:ping@org.example`): requests to
    /// the gateway's addresses are for its domains. Other URIs: `None`.
    pub fn as_our_domain(&self, ruri: &str) -> Option<String> {
        let uri = Uri::parse(ruri).ok()?;
        let user = uri.user?.split(';').next()?;
        if self.is_our_domain(uri.host) || !self.is_myself(&uri) {
            return None;
        }
        let scheme = if uri.scheme == Scheme::Sips {
            "sips"
        } else {
            "sip"
        };
        Some(format!("{scheme}:{user}@{}", self.domains.first()?))
    }

    /// The target stage: the AOR's registered `bindings` when there are any, else a static
    /// route; an AOR of our domains with neither is temporarily unavailable (480), other
    /// domains are not relayed (403).
    pub fn targets(&self, ruri: &str, bindings: Vec<Binding>) -> Result<Vec<Target>, Reject> {
        self.route(ruri, bindings).map(|r| r.branches)
    }

    /// The route decision of an out-of-dialog request ([`Router::targets`]) together with the
    /// AOR it reaches: what the policy judges is what the branches were chosen for.
    pub fn route(&self, ruri: &str, bindings: Vec<Binding>) -> Result<Routed, Reject> {
        let uri = Uri::parse(ruri).map_err(|_| Reject::NotFound)?;
        let target = routed_aor(&uri);
        let branches: Vec<Target> = bindings
            .into_iter()
            .filter_map(Target::of_binding)
            .collect();
        if !branches.is_empty() {
            return Ok(Routed { target, branches });
        }
        if let Some(t) = self.routes.lookup(&uri) {
            let branches = vec![Target::direct(t.request_uri(&uri), t.dest.clone())];
            return Ok(Routed { target, branches });
        }
        if self.is_our_domain(uri.host) {
            Err(Reject::TemporarilyUnavailable)
        } else {
            Err(Reject::Forbidden("Forbidden (relaying denied)"))
        }
    }

    /// The domain of a routed target that is not one of ours (lower case): the request
    /// leaves the organisation (federation).
    pub fn foreign_domain(&self, routed: &Routed) -> Option<String> {
        let uri = Uri::parse(routed.target()).ok()?;
        let host = uri.host.trim_end_matches('.');
        (!self.is_our_domain(host) && !self.is_local_hostport(&uri))
            .then(|| host.to_ascii_lowercase())
    }

    pub fn is_our_domain(&self, host: &str) -> bool {
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(host))
    }

    /// A URI that names this gateway: one of its addresses, or a served domain without user.
    pub fn is_self_uri(&self, uri: &Uri<'_>) -> bool {
        uri.user.is_none() && (self.is_local_hostport(uri) || self.is_our_domain(uri.host))
    }

    /// The URI's host and port are one of the gateway's addresses.
    pub fn is_local_hostport(&self, uri: &Uri<'_>) -> bool {
        let ip = uri.ip();
        self.locals.iter().any(|l| {
            let host_match = l.host.eq_ignore_ascii_case(uri.host)
                || ip.is_some_and(|ip| canonical_ip(ip) == canonical_ip(l.addr.ip()));
            let port = uri.port.unwrap_or(if uri.scheme == Scheme::Sips {
                5061
            } else {
                l.transport.default_port()
            });
            host_match && port == l.port
        })
    }

    /// A Via the gateway wrote (its sent-by is one of the gateway's names).
    pub fn is_our_via(&self, via: &Via<'_>) -> bool {
        self.locals
            .iter()
            .any(|l| l.host.eq_ignore_ascii_case(via.host) && via.port.unwrap_or(5060) == l.port)
    }

    /// The local address a message arrived at on `flow`.
    pub fn local_for_flow(&self, flow: &Flow) -> &LocalAddr {
        self.locals
            .iter()
            .find(|l| l.transport == flow.transport && l.addr == flow.local)
            .or_else(|| {
                self.locals.iter().find(|l| {
                    l.transport == flow.transport && l.addr.is_ipv4() == flow.local.is_ipv4()
                })
            })
            .unwrap_or(&self.locals[0])
    }

    /// The local address the gateway uses towards `dest`: same transport, same family.
    pub fn local_for(&self, dest: &Destination) -> &LocalAddr {
        let transport = dest.transport();
        let v4 = match dest {
            Destination::Flow(f) => f.remote.is_ipv4(),
            Destination::Addr { addr, .. } => addr.is_ipv4(),
            Destination::Name { .. } => true,
        };
        self.locals
            .iter()
            .find(|l| l.transport == transport && l.addr.is_ipv4() == v4)
            .or_else(|| self.locals.iter().find(|l| l.transport == transport))
            .unwrap_or(&self.locals[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::Route;
    use crate::flow::Transport;

    fn router() -> Router {
        let mut routes = RouteTable::default();
        routes.add_aor(
            "vpn",
            "org.example",
            Route {
                uri: "sip:vpn@198.51.100.20:5060".into(),
                dest: Destination::Addr {
                    transport: Transport::Udp,
                    addr: "198.51.100.20:5060".parse().unwrap(),
                    server_name: None,
                },
            },
        );
        Router::new(
            vec!["org.example".into()],
            vec!["gw.org.example".into(), "203.0.113.1".into()],
            vec![
                LocalAddr::new(Transport::Udp, "192.0.2.1:5060".parse().unwrap(), None),
                LocalAddr::new(Transport::Udp, "[2001:db8::1]:5060".parse().unwrap(), None),
                LocalAddr::new(
                    Transport::Tls,
                    "192.0.2.1:5061".parse().unwrap(),
                    Some(("sip.org.example".into(), 5061)),
                ),
            ],
            routes,
        )
    }

    #[test]
    fn targets_prefer_bindings_then_routes_then_refuse() {
        let r = router();
        let t = r.targets("sip:vpn@org.example", Vec::new()).unwrap();
        assert_eq!(t[0].ruri, "sip:vpn@198.51.100.20:5060");
        assert!(matches!(
            r.targets("sip:nobody@org.example", Vec::new()),
            Err(Reject::TemporarilyUnavailable)
        ));
        assert!(matches!(
            r.targets("sip:x@elsewhere.example", Vec::new()),
            Err(Reject::Forbidden(_))
        ));
        assert!(matches!(
            r.targets("not a uri", Vec::new()),
            Err(Reject::NotFound)
        ));
    }

    /// The gateway's own addresses and aliases are its domains (Kamailio's `myself`):
    /// `sip:vpn@192.0.2.1` is `sip:vpn@org.example`; another port, another host, or a domain
    /// of ours already is left alone.
    #[test]
    fn own_addresses_and_aliases_are_the_first_domain() {
        let r = router();
        for ruri in [
            "sip:vpn@192.0.2.1",
            "sip:vpn@192.0.2.1:5060",
            "sip:vpn@[2001:db8::1]",
            "sip:vpn@sip.org.example:5061",
            "sip:vpn@gw.org.example",
            "sip:vpn@203.0.113.1:5080",
        ] {
            assert_eq!(
                r.as_our_domain(ruri).as_deref(),
                Some("sip:vpn@org.example"),
                "{ruri}"
            );
        }
        for ruri in [
            "sip:vpn@192.0.2.1:5070",
            "sip:vpn@192.0.2.9",
            "sip:vpn@org.example",
            "sip:192.0.2.1",
        ] {
            assert_eq!(r.as_our_domain(ruri), None, "{ruri}");
        }
        assert!(r.is_myself(&Uri::parse("sip:ping@192.0.2.1").unwrap()));
        assert!(!r.is_myself(&Uri::parse("sip:ping@198.51.100.20").unwrap()));
    }

    /// A target with a user replaces the Request-URI; one with only host and port keeps the
    /// user (real phones answer for their user); a `next_hop` route keeps the URI whole.
    #[test]
    fn routes_rewrite_whole_host_port_or_nothing() {
        let dest = Destination::Addr {
            transport: Transport::Udp,
            addr: "127.0.0.1:5070".parse().unwrap(),
            server_name: None,
        };
        let mut routes = RouteTable::default();
        let route = |uri: &str| Route {
            uri: uri.into(),
            dest: dest.clone(),
        };
        routes.add_domain("org.example", route("sip:127.0.0.1:5070;transport=udp"));
        routes.add_domain("next.example", route(""));
        routes.add_aor("vpn", "org.example", route("sip:vpn-1@127.0.0.1:5070"));
        let r = Router::new(
            vec!["org.example".into(), "next.example".into()],
            Vec::new(),
            vec![LocalAddr::new(
                Transport::Udp,
                "192.0.2.1:5060".parse().unwrap(),
                None,
            )],
            routes,
        );
        let ruri = |s: &str| r.targets(s, Vec::new()).unwrap()[0].ruri.clone();
        assert_eq!(
            ruri("sip:alice@org.example"),
            "sip:alice@127.0.0.1:5070;transport=udp"
        );
        assert_eq!(ruri("sip:vpn@org.example"), "sip:vpn-1@127.0.0.1:5070");
        assert_eq!(ruri("sip:bob@next.example"), "", "kept");
        assert_eq!(
            r.targets("sip:bob@next.example", Vec::new()).unwrap()[0].dest,
            dest
        );
    }

    #[test]
    fn self_recognition_and_local_choice() {
        let r = router();
        let uri = |s: &'static str| Uri::parse(s).unwrap();
        assert!(r.is_self_uri(&uri("sip:org.example")));
        assert!(r.is_self_uri(&uri("sip:192.0.2.1")));
        assert!(r.is_self_uri(&uri("sips:sip.org.example")));
        assert!(
            !r.is_self_uri(&uri("sip:vpn@org.example")),
            "a user is not the gateway"
        );
        assert!(!r.is_local_hostport(&uri("sip:192.0.2.1:5070")));
        assert!(r.is_local_hostport(&uri("sip:[2001:db8::1]")));
        let v6 = Destination::Addr {
            transport: Transport::Udp,
            addr: "[2001:db8::9]:5060".parse().unwrap(),
            server_name: None,
        };
        assert!(r.local_for(&v6).addr.is_ipv6());
        let tls = Destination::Addr {
            transport: Transport::Tls,
            addr: "[2001:db8::9]:5061".parse().unwrap(),
            server_name: None,
        };
        assert_eq!(
            r.local_for(&tls).transport,
            Transport::Tls,
            "same transport first"
        );
    }
}
