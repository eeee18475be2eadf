//! Static routing: an AOR or a whole domain maps to an internal target (RFC 3261 16.5
//! "determining request targets", the static part).

use std::collections::HashMap;

use crate::flow::{Destination, Transport};
use crate::sip::Uri;

/// One configured `[[route]]`: where requests for a matched AOR or domain go. The router turns
/// it into the branch it forwards (`core::router::Target`, the only "target" type: a route is
/// configuration, a target is a branch of one request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The route's `target` (see [`Route::request_uri`]); empty for a `next_hop` route, which
    /// keeps the Request-URI.
    pub uri: String,
    /// The next hop.
    pub dest: Destination,
}

impl Route {
    /// The Request-URI of a request for `ruri` sent along this route: the target when it names
    /// a user; the request's user at the target's host and port when it names none (like
    /// Kamailio's `$rd`/`$rp`: a phone behind the route still sees whom the call is for);
    /// empty — the Request-URI unchanged — for a `next_hop` route (Kamailio's `$du`).
    pub fn request_uri(&self, ruri: &Uri<'_>) -> String {
        if self.uri.is_empty() {
            return String::new();
        }
        match (Uri::parse(&self.uri), ruri.user) {
            (Ok(target), Some(user)) if target.user.is_none() => {
                let (scheme, rest) = self.uri.split_once(':').unwrap_or(("sip", &self.uri));
                format!("{scheme}:{user}@{rest}")
            }
            _ => self.uri.clone(),
        }
    }
}

/// AOR routes win over domain routes. Keys are lower-cased hosts; users compare exactly.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    aors: HashMap<(String, String), Route>,
    domains: HashMap<String, Route>,
}

impl RouteTable {
    pub fn add_aor(&mut self, user: &str, host: &str, target: Route) {
        self.aors
            .insert((user.to_owned(), host.to_ascii_lowercase()), target);
    }

    pub fn add_domain(&mut self, host: &str, target: Route) {
        self.domains.insert(host.to_ascii_lowercase(), target);
    }

    pub fn lookup(&self, uri: &Uri<'_>) -> Option<&Route> {
        let host = uri.host.to_ascii_lowercase();
        if let Some(user) = uri.user {
            let user = user.split(';').next().unwrap_or(user);
            if let Some(t) = self.aors.get(&(user.to_owned(), host.clone())) {
                return Some(t);
            }
        }
        self.domains.get(&host)
    }

    pub fn is_empty(&self) -> bool {
        self.aors.is_empty() && self.domains.is_empty()
    }

    /// Every route's target (AOR routes, then domain routes; in no particular order within).
    pub fn targets(&self) -> impl Iterator<Item = &Route> {
        self.aors.values().chain(self.domains.values())
    }
}

/// The next hop for a URI (RFC 3263 section 4): an IP address is used as it is (UDP unless
/// `transport=` or `fixed` says otherwise, TLS for `sips:`); a host name stays a name, with
/// what the URI fixes, for DNS NAPTR/SRV/A to complete before the request is sent.
pub fn destination_of(uri: &Uri<'_>, fixed: Option<Transport>) -> Destination {
    let secure = uri.scheme == crate::sip::Scheme::Sips;
    let named = uri.transport().and_then(Transport::from_token).or(fixed);
    match uri.ip() {
        Some(ip) => {
            let transport = if secure {
                Transport::Tls
            } else {
                named.unwrap_or(Transport::Udp)
            };
            Destination::Addr {
                transport,
                addr: (ip, uri.port.unwrap_or(transport.default_port())).into(),
                server_name: None,
            }
        }
        None => Destination::Name {
            host: uri.host.into(),
            port: uri.port,
            transport: if secure { Some(Transport::Tls) } else { named },
            secure,
        },
    }
}
