//! Proofs that a request may be relayed — the `Authenticated` idea carried through the
//! pipeline.
//!
//! `Proxy::relay` takes a [`Clearance`] by value, and a clearance exists only as
//! - the [`Admission`] of an out-of-dialog request (a trusted source, or a finished SASL
//!   exchange whose identity may present the From AOR) together with the policy's `Permit`
//!   (which only `Policy::decide` makes), or
//! - a [`SignedDialog`]: an in-dialog request whose Route names this gateway with a valid
//!   dialog MAC (which only this gateway's key makes), or
//! - a [`PeerFlow`]: a request another gateway of the cluster admitted and sends through
//!   this one because this one holds the flow of the binding it targets; its Route names the
//!   flow with a MAC over the request's dialog identifiers that only the cluster's key makes.
//!
//! Nothing outside this module can build an `Admission` or a `SignedDialog` except through the
//! checks here, so "relay without authentication, policy or a signed dialog" does not compile.

use std::net::IpAddr;

use gatehouse_auth::Authenticated;
use gatehouse_policy::Permit;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;

use super::auth;
use super::error::Reject;
use super::router::{Routed, Target};
use super::topology::TopologyKey;
use crate::sip::{HeaderName, Message, Method};

/// Proof that an out-of-dialog request passed the authenticate stage.
#[derive(Debug)]
pub struct Admission {
    basis: AdmissionBasis,
}

/// Why a request was admitted.
#[derive(Debug)]
pub enum AdmissionBasis {
    /// From a configured trusted source; no identity.
    TrustedSource,
    /// A finished, validated SASL exchange whose identity may use the From address.
    Sasl(Box<Authenticated>),
}

impl Admission {
    /// Admits a request from `source` when it is inside one of the `trusted` networks.
    pub(super) fn trusted(source: IpAddr, trusted: &[IpNet]) -> Option<Admission> {
        is_trusted(source, trusted).then_some(Admission {
            basis: AdmissionBasis::TrustedSource,
        })
    }

    /// Admits an authenticated request when its identity may present the From AOR (`from`,
    /// `None` when the From header has none): 403 otherwise.
    pub(super) fn authenticated(
        authenticated: Authenticated,
        from: Option<&str>,
    ) -> Result<Admission, Reject> {
        let from = from.ok_or(Reject::IdentityNotAllowed)?;
        if !auth::may_present(&authenticated, from) {
            return Err(Reject::IdentityNotAllowed);
        }
        Ok(Admission {
            basis: AdmissionBasis::Sasl(Box::new(authenticated)),
        })
    }

    pub fn basis(&self) -> &AdmissionBasis {
        &self.basis
    }

    /// Who is admitted: the authenticated identity, or `trusted`.
    pub fn identity(&self) -> &str {
        match &self.basis {
            AdmissionBasis::TrustedSource => "trusted",
            AdmissionBasis::Sasl(a) => a.identity(),
        }
    }
}

/// Whether `source` (an IPv4-mapped IPv6 address counts as IPv4) is in one of the `trusted`
/// networks.
pub(super) fn is_trusted(source: IpAddr, trusted: &[IpNet]) -> bool {
    let source = super::canonical_ip(source);
    trusted.iter().any(|net| net.contains(&source))
}

/// Proof that an in-dialog request belongs to a dialog this gateway (or a gateway of its
/// cluster, with the shared key) record-routed, and of the one next hop it may go to.
///
/// The Record-Route entry the gateway writes is a capability for one direction of one dialog:
/// `gd=` carries ([`hop_token`]: sealed with XChaCha20-Poly1305 under the topology key when
/// topology is hidden, so no internal address leaks) the URI the next hop of that direction is
/// computed from — the proxy or Contact of the party the
/// entry's holder sends to — and, once the callee answered, the callee's tag; `gh=` is the
/// dialog MAC over the Call-ID, the caller's tag and `gd`. The entry in the INVITE (the
/// callee's route set) names the caller's side; the gateway re-signs its entry in every
/// dialog-creating answer (the caller's route set) for the callee's side. A request presenting
/// an entry reaches that party and nobody else: not another host, not another user behind the
/// same proxy.
#[derive(Debug)]
pub struct SignedDialog {
    /// The next hop's URI (a Route entry's or a Contact's) of the direction the entry signs.
    hop: String,
}

impl SignedDialog {
    /// The URI the request's next hop must be computed from.
    pub fn hop(&self) -> &str {
        &self.hop
    }
}

type HmacSha256 = Hmac<Sha256>;

/// The dialog-MAC key, keyed once: HMAC's inner and outer key blocks are hashed when the core
/// starts, and each MAC clones that state (two SHA-256 blocks per MAC instead of four; MACs
/// are computed for every INVITE's Record-Route and checked for every in-dialog request).
#[derive(Clone)]
pub struct MacKey(HmacSha256);

impl MacKey {
    pub fn new(key: &[u8; 32]) -> MacKey {
        let Ok(mac) = HmacSha256::new_from_slice(key) else {
            unreachable!("HMAC takes keys of any length")
        };
        MacKey(mac)
    }

    fn start(&self) -> HmacSha256 {
        self.0.clone()
    }
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

/// The first 96 bits of a MAC in lower-case hex.
fn hex96(mac: HmacSha256) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let out = mac.finalize().into_bytes();
    let mut s = String::with_capacity(24);
    for b in &out[..12] {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// The `gh=` MAC of a dialog direction: HMAC-SHA-256 over the Call-ID, the caller's tag and
/// the `gd=` token of the direction, 96 bits in hex.
pub fn dialog_mac(key: &MacKey, call_id: &str, caller_tag: &str, hop_token: &str) -> String {
    let mut mac = key.start();
    mac.update(b"gatehouse dialog v2\0");
    mac.update(call_id.as_bytes());
    mac.update(b"\0");
    mac.update(caller_tag.as_bytes());
    mac.update(b"\0");
    mac.update(hop_token.as_bytes());
    hex96(mac)
}

/// The `gd=` token of a dialog direction: the next hop's URI and, once known, the callee's
/// tag. With topology hiding (`sealed`) the outside reads neither: `s.` and the two sealed
/// under the topology key. Without it the inside's addresses leave in Contacts anyway, so
/// they travel readable, `p.` and base64url (no cipher on every dialog's path); the MAC over
/// the token authenticates either form.
pub fn hop_token(
    topology: &TopologyKey,
    hop: &str,
    callee_tag: Option<&str>,
    sealed: bool,
) -> String {
    use base64::Engine;
    let extra: Vec<String> = callee_tag.map(str::to_owned).into_iter().collect();
    if sealed {
        return format!("s.{}", topology.seal(hop, &extra));
    }
    let mut plain = String::with_capacity(hop.len() + 24);
    plain.push_str(hop);
    for e in &extra {
        plain.push('\n');
        plain.push_str(e);
    }
    format!(
        "p.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(plain)
    )
}

/// Reads a `gd=` token (either form): the hop URI and the callee's tag if it names one.
fn read_hop_token(topology: &TopologyKey, token: &str) -> Option<(String, Option<String>)> {
    use base64::Engine;
    let (hop, mut rest) = if let Some(sealed) = token.strip_prefix("s.") {
        let (hop, extra) = topology.open(sealed)?;
        (hop, extra.into_iter())
    } else {
        let plain = token.strip_prefix("p.")?;
        if plain.len() > 4096 {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(plain)
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.split('\n').map(str::to_owned);
        let hop = parts.next()?;
        (hop, parts.collect::<Vec<_>>().into_iter())
    };
    Some((hop, rest.next()))
}

impl SignedDialog {
    /// Checks a Route entry of ours (`gh` = `presented`, `gd` = `token`) against the request:
    /// the MAC over its Call-ID, either tag as the caller's and the token; a token that names
    /// the callee's tag must name the request's other tag.
    pub(super) fn verify(
        key: &MacKey,
        topology: &TopologyKey,
        msg: &Message,
        presented: &str,
        token: &str,
    ) -> Option<SignedDialog> {
        let call_id = msg.call_id();
        let from = msg.tag(HeaderName::From).unwrap_or_default();
        let to = msg.tag(HeaderName::To).unwrap_or_default();
        for (caller, other) in [(&from, &to), (&to, &from)] {
            let expected = dialog_mac(key, &call_id, caller, token);
            if gatehouse_auth::scram::constant_time_eq(expected.as_bytes(), presented.as_bytes()) {
                let (hop, callee) = read_hop_token(topology, token)?;
                if callee.is_some_and(|callee| &callee != other) {
                    return None;
                }
                return Some(SignedDialog { hop });
            }
        }
        None
    }
}

/// Proof that an out-of-dialog request comes from a gateway of the cluster, for a binding
/// whose flow this gateway holds: the flow (`gf=transport:address` in the Route entry naming
/// this gateway) is signed (`gm=`) with the cluster's key over the request's Call-ID and From
/// tag, so the entry cannot be forged nor moved to another request.
#[derive(Debug)]
pub struct PeerFlow {
    dest: crate::flow::Destination,
}

/// The `gm=` MAC of a flow token for a request: HMAC-SHA-256 over a label, the Call-ID, the
/// From tag and the token, 96 bits in hex.
pub fn flow_mac(key: &MacKey, call_id: &str, from_tag: &str, token: &str) -> String {
    let mut mac = key.start();
    mac.update(b"gatehouse flow\0");
    mac.update(call_id.as_bytes());
    mac.update(b"\0");
    mac.update(from_tag.as_bytes());
    mac.update(b"\0");
    mac.update(token.as_bytes());
    hex96(mac)
}

/// The flow token of a destination: `udp:192.0.2.7:5060` (`None` for a name).
pub fn flow_token(dest: &crate::flow::Destination) -> Option<String> {
    let (transport, addr) = match dest {
        crate::flow::Destination::Addr {
            transport, addr, ..
        } => (*transport, *addr),
        crate::flow::Destination::Flow(f) => (f.transport, f.remote),
        crate::flow::Destination::Name { .. } => return None,
    };
    Some(format!("{}:{addr}", transport.token()))
}

impl PeerFlow {
    /// Checks a Route entry's flow `token` and `presented` MAC against the request.
    pub(super) fn verify(
        key: &MacKey,
        msg: &Message,
        token: &str,
        presented: &str,
    ) -> Option<PeerFlow> {
        let expected = flow_mac(
            key,
            &msg.call_id(),
            &msg.tag(HeaderName::From).unwrap_or_default(),
            token,
        );
        if !gatehouse_auth::scram::constant_time_eq(expected.as_bytes(), presented.as_bytes()) {
            return None;
        }
        let (transport, addr) = token.split_once(':')?;
        Some(PeerFlow {
            dest: crate::flow::Destination::Addr {
                transport: crate::flow::Transport::from_token(transport)?,
                addr: addr.parse().ok()?,
                server_name: None,
            },
        })
    }

    /// The flow to send the request on.
    pub fn destination(&self) -> crate::flow::Destination {
        self.dest.clone()
    }
}

/// What entitles a request to be relayed, and where to: `Proxy::relay` consumes one and sends
/// the request only to the destinations it names (its branches come from here, never from a
/// separate argument).
#[derive(Debug)]
pub enum Clearance {
    /// Out of dialog: admitted, and what the policy permitted for the route decision it
    /// judged (`routed.target()` was the policy's target; `routed.branches()` are the hops).
    OutOfDialog {
        admission: Admission,
        permit: Permit,
        routed: Routed,
    },
    /// In a dialog this gateway signed, to the next hop the signature allows.
    InDialog {
        dialog: SignedDialog,
        next_hop: crate::flow::Destination,
    },
    /// Sent by another gateway of the cluster to the flow this one holds.
    Peer(PeerFlow),
}

impl Clearance {
    /// The branches the clearance names; the clearance is used up.
    pub(super) fn into_branches(self) -> Vec<Target> {
        match self {
            Clearance::OutOfDialog { routed, .. } => routed.into_branches(),
            Clearance::InDialog { next_hop, .. } => vec![Target::direct(String::new(), next_hop)],
            Clearance::Peer(peer) => vec![Target::direct(String::new(), peer.destination())],
        }
    }

    /// The destinations the clearance allows a branch to start at (before DNS: a name stands
    /// for the addresses it resolves to). The authorisation invariant: every request relayed
    /// on behalf of a source goes to one of these.
    pub fn destinations(&self) -> Vec<crate::flow::Destination> {
        match self {
            Clearance::OutOfDialog { routed, .. } => {
                routed.branches().iter().map(|t| t.dest.clone()).collect()
            }
            Clearance::InDialog { next_hop, .. } => vec![next_hop.clone()],
            Clearance::Peer(peer) => vec![peer.destination()],
        }
    }

    /// Whether the relayed request gets this gateway's Record-Route: dialog-creating requests
    /// out of dialog; never in a dialog (its route set is fixed).
    pub(super) fn record_route(&self, method: Option<Method>) -> bool {
        match self {
            // The holder of the flow stays in the dialog too: the device's in-dialog requests
            // arrive on that flow.
            Clearance::OutOfDialog { .. } | Clearance::Peer(_) => matches!(
                method,
                Some(Method::Invite | Method::Subscribe | Method::Refer | Method::Notify)
            ),
            Clearance::InDialog { .. } => false,
        }
    }

    /// Who the request is relayed for (logs).
    pub(super) fn identity(&self) -> &str {
        match self {
            Clearance::OutOfDialog { admission, .. } => admission.identity(),
            Clearance::InDialog { .. } => "dialog",
            Clearance::Peer(_) => "cluster peer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms of a hop token read back; a sealed one does not show the hop.
    #[test]
    fn hop_tokens_read_back_in_either_form() {
        let topo = TopologyKey::derive(&[7; 32]);
        for sealed in [false, true] {
            let t = hop_token(&topo, "sip:vpn@198.51.100.20:5060", Some("uas1"), sealed);
            assert_eq!(
                read_hop_token(&topo, &t),
                Some(("sip:vpn@198.51.100.20:5060".into(), Some("uas1".into())))
            );
            let t = hop_token(&topo, "sip:a@b", None, sealed);
            assert_eq!(read_hop_token(&topo, &t), Some(("sip:a@b".into(), None)));
            assert_eq!(t.starts_with("s."), sealed);
        }
        let sealed = hop_token(&topo, "sip:vpn@198.51.100.20:5060", None, true);
        assert!(!sealed.contains("198"));
        assert_eq!(read_hop_token(&topo, "x.abc"), None);
        assert_eq!(read_hop_token(&topo, "s.forged"), None);
    }

    /// The keyed-once MAC is plain HMAC-SHA-256 (another gateway of the cluster computes the
    /// same): a freshly keyed HMAC over a label, Call-ID, tag and hop token, NUL-separated,
    /// truncated to 96 bits.
    #[test]
    fn macs_are_plain_hmac_sha256_truncated() {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = dialog_mac(&MacKey::new(&key), "what do ya want ", "for nothing?", "T");
        let mut reference = HmacSha256::new_from_slice(&key).unwrap();
        reference.update(b"gatehouse dialog v2\0what do ya want \0for nothing?\0T");
        let expected: String = reference.finalize().into_bytes()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(mac, expected);
        // The same key state serves any number of MACs.
        let key = MacKey::new(&key);
        assert_eq!(
            dialog_mac(&key, "a", "b", "t"),
            dialog_mac(&key, "a", "b", "t")
        );
        assert_ne!(
            dialog_mac(&key, "a", "b", "t"),
            dialog_mac(&key, "a", "c", "t")
        );
        assert_ne!(
            dialog_mac(&key, "a", "b", "t"),
            dialog_mac(&key, "a", "b", "u")
        );
    }
}
