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

/// Proof that an in-dialog request belongs to a dialog this gateway record-routed.
#[derive(Debug)]
pub struct SignedDialog {
    _proof: (),
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

/// The `gh=` MAC of a dialog: HMAC-SHA-256 over Call-ID and the caller's tag, 96 bits in hex.
pub fn dialog_mac(key: &MacKey, call_id: &str, caller_tag: &str) -> String {
    let mut mac = key.start();
    mac.update(call_id.as_bytes());
    mac.update(b"\0");
    mac.update(caller_tag.as_bytes());
    hex96(mac)
}

impl SignedDialog {
    /// Checks the MAC a Route entry of ours presented against the request's Call-ID and either
    /// tag (the request may come from either party).
    pub(super) fn verify(key: &MacKey, msg: &Message, presented: &str) -> Option<SignedDialog> {
        let call_id = msg.call_id();
        [HeaderName::From, HeaderName::To]
            .iter()
            .any(|h| {
                let tag = msg.tag(*h).unwrap_or_default();
                gatehouse_auth::scram::constant_time_eq(
                    dialog_mac(key, &call_id, &tag).as_bytes(),
                    presented.as_bytes(),
                )
            })
            .then_some(SignedDialog { _proof: () })
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

/// What entitles a request to be relayed; `Proxy::relay` consumes one.
#[derive(Debug)]
pub enum Clearance {
    /// Out of dialog: admitted, and what the policy permitted.
    OutOfDialog {
        admission: Admission,
        permit: Permit,
    },
    /// In a dialog this gateway signed.
    InDialog(SignedDialog),
    /// Sent by another gateway of the cluster to the flow this one holds.
    Peer(PeerFlow),
}

impl Clearance {
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
            Clearance::InDialog(_) => false,
        }
    }

    /// Who the request is relayed for (logs).
    pub(super) fn identity(&self) -> &str {
        match self {
            Clearance::OutOfDialog { admission, .. } => admission.identity(),
            Clearance::InDialog(_) => "dialog",
            Clearance::Peer(_) => "cluster peer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keyed-once MAC is HMAC-SHA-256 as before (Route entries written by an earlier
    /// gateway, or another gateway of the cluster, still verify): a freshly keyed HMAC over
    /// Call-ID, NUL, tag, truncated to 96 bits.
    #[test]
    fn macs_are_plain_hmac_sha256_truncated() {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = dialog_mac(&MacKey::new(&key), "what do ya want ", "for nothing?");
        let mut reference = HmacSha256::new_from_slice(&key).unwrap();
        reference.update(b"what do ya want \0for nothing?");
        let expected: String = reference.finalize().into_bytes()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(mac, expected);
        // The same key state serves any number of MACs.
        let key = MacKey::new(&key);
        assert_eq!(dialog_mac(&key, "a", "b"), dialog_mac(&key, "a", "b"));
        assert_ne!(dialog_mac(&key, "a", "b"), dialog_mac(&key, "a", "c"));
    }
}
