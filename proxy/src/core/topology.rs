//! Topology hiding (`[topology] hide = true`), in the manner of Kamailio's `topoh`: what
//! leaves the gateway towards the outside names no internal address.
//!
//! "Inside" is `tunnels.internal_networks` and `[trust] sources`; everything else is outside.
//! For a message going from inside to outside the gateway
//!
//! - **Contact**: replaces every Contact URI by `sip:gh.TOKEN@<gateway>`, where TOKEN is the
//!   internal URI (and, in a response, the internal Record-Route entries) sealed with
//!   XChaCha20-Poly1305 under a key derived from the dialog-MAC key; the nonce is derived from
//!   the content (SIV style), so a dialog's Contact stays the same token. A request from
//!   outside addressed to a token is given its internal Request-URI and route back;
//! - **Record-Route** (responses): drops the entries of internal proxies and the gateway's own
//!   inside-facing entry, keeping the outside-facing one and the caller's side;
//! - **Via** (requests): sends only the gateway's own Via; the inside's Vias are restored from
//!   the server transaction's request on the way back;
//! - **SDP** (WireGuard answers): the origin and every connection address other than the
//!   published WireGuard endpoint (`tunnels.public_endpoints`) become the gateway's address.
//!
//! Not covered: Call-IDs made inside, media addresses of ordinary (non-WireGuard) calls,
//! which only a media relay could hide, and header fields the gateway does not interpret.

use std::net::IpAddr;

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{canonical_ip, LocalAddr, Proxy, Reject};
use crate::flow::{Destination, Flow};
use crate::sip::values::split_list;
use crate::sip::{HeaderName, Message, NameAddr, Uri};

/// User-part prefix of a hiding Contact URI.
pub const PREFIX: &str = "gh.";
/// Longest token accepted (a Contact and a few routes; bounds the work on input).
const MAX_TOKEN: usize = 2048;

/// The sealing key of topology tokens.
pub struct TopologyKey {
    aead: XChaCha20Poly1305,
    nonce_key: [u8; 32],
}

impl std::fmt::Debug for TopologyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopologyKey(..)")
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl TopologyKey {
    /// Derived from the dialog-MAC key (shared by gateways on one store).
    pub fn derive(dialog_key: &[u8; 32]) -> TopologyKey {
        let key = hmac(dialog_key, &[b"gatehouse topology hiding v1 key"]);
        TopologyKey {
            aead: XChaCha20Poly1305::new(&key.into()),
            nonce_key: hmac(dialog_key, &[b"gatehouse topology hiding v1 nonce"]),
        }
    }

    /// Seals an internal URI and the internal route entries into a token.
    pub fn seal(&self, uri: &str, routes: &[String]) -> String {
        let mut plain = String::with_capacity(uri.len() + 64);
        plain.push_str(uri);
        for r in routes {
            plain.push('\n');
            plain.push_str(r);
        }
        let n = hmac(&self.nonce_key, &[plain.as_bytes()]);
        let nonce = XNonce::from_slice(&n[..24]);
        let sealed = self
            .aead
            .encrypt(nonce, plain.as_bytes())
            .expect("XChaCha20-Poly1305 seals any length the gateway produces");
        let mut out = Vec::with_capacity(24 + sealed.len());
        out.extend_from_slice(&n[..24]);
        out.extend_from_slice(&sealed);
        b64().encode(out)
    }

    /// Opens a token: the internal URI and route entries, or `None` when it is not one of
    /// ours (forged, altered, or sealed under another key).
    pub fn open(&self, token: &str) -> Option<(String, Vec<String>)> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let raw = b64().decode(token).ok()?;
        if raw.len() < 24 + 16 {
            return None;
        }
        let (nonce, sealed) = raw.split_at(24);
        let plain = self.aead.decrypt(XNonce::from_slice(nonce), sealed).ok()?;
        let text = String::from_utf8(plain).ok()?;
        let mut parts = text.split('\n').map(str::to_owned);
        let uri = parts.next()?;
        Some((uri, parts.collect()))
    }
}

impl Proxy {
    /// Inside: an internal network or a trusted source.
    pub(super) fn is_inside(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.is_trusted(ip)
            || self
                .cfg
                .tunnels
                .internal_networks
                .iter()
                .any(|n| n.contains(&ip))
    }

    pub(super) fn dest_inside(&self, dest: &Destination) -> bool {
        match dest {
            Destination::Flow(f) => self.is_inside(f.remote.ip()),
            Destination::Addr { addr, .. } => self.is_inside(addr.ip()),
            Destination::Name { .. } => false,
        }
    }

    /// True when a request from `from` to `dest` leaves the inside with hiding on.
    pub(super) fn hides_towards(&self, from: &Flow, dest: &Destination) -> bool {
        self.cfg.hide_topology && self.is_inside(from.remote.ip()) && !self.dest_inside(dest)
    }

    /// True when a response to the sender `to` must be hidden.
    pub(super) fn hides_response_to(&self, to: &Flow) -> bool {
        self.cfg.hide_topology && !self.is_inside(to.remote.ip())
    }

    /// A request leaving the inside: only the gateway's own Via goes (added after this); of
    /// the Record-Route entries only the gateway's outward-facing one stays — its inward-facing
    /// one goes, the inside's proxies go into the Contact token (so the outside's in-dialog
    /// requests get them back) — and Contacts become tokens.
    pub(super) fn hide_request(&self, msg: &mut Message, dest: &Destination) {
        let vias: Vec<usize> = msg.fields(HeaderName::Via).map(|(i, _)| i).collect();
        for idx in vias {
            msg.remove(idx);
        }
        let local = self.router.local_for(dest).clone();
        let mut hidden = Vec::new();
        let rr = msg.list_values(HeaderName::RecordRoute);
        if !rr.is_empty() {
            let mut kept = Vec::new();
            for v in rr {
                match self.own_rr_faces(&v, &local) {
                    Some(true) => kept.push(v),
                    Some(false) => {}
                    None => hidden.push(v),
                }
            }
            let fields: Vec<usize> = msg
                .fields(HeaderName::RecordRoute)
                .map(|(i, _)| i)
                .collect();
            let at = fields.first().copied().unwrap_or(0);
            for idx in fields.into_iter().rev() {
                msg.remove(idx);
            }
            if !kept.is_empty() {
                msg.insert(at, HeaderName::RecordRoute, kept.join(", "));
            }
        }
        // A token's routes are put back in reverse (they are sealed in a response's order,
        // callee's side first); a request's inside entries are in the order the outside's
        // requests meet them already, so they are sealed reversed.
        hidden.reverse();
        self.hide_contacts(msg, &hidden, &local);
    }

    /// A response going to an outside sender through the gateway's `inbound` address:
    /// internal Record-Route entries and the gateway's inside-facing entry go (into the
    /// Contact token), Contacts become tokens.
    pub(super) fn hide_response(&self, inbound: &LocalAddr, resp: &mut Message) {
        let inbound = inbound.clone();
        let mut hidden = Vec::new();
        let rr = resp.list_values(HeaderName::RecordRoute);
        if !rr.is_empty() {
            let mut kept = Vec::new();
            let mut ours_seen = false;
            for v in rr {
                match self.own_rr_faces(&v, &inbound) {
                    Some(true) => {
                        ours_seen = true;
                        kept.push(v);
                    }
                    Some(false) => ours_seen = true,
                    None if ours_seen => kept.push(v),
                    None => hidden.push(v),
                }
            }
            let fields: Vec<usize> = resp
                .fields(HeaderName::RecordRoute)
                .map(|(i, _)| i)
                .collect();
            let at = fields.first().copied().unwrap_or(0);
            for idx in fields.into_iter().rev() {
                resp.remove(idx);
            }
            if !kept.is_empty() {
                resp.insert(at, HeaderName::RecordRoute, kept.join(", "));
            }
        }
        self.hide_contacts(resp, &hidden, &inbound);
    }

    /// `Some(true)` for our Record-Route entry facing `inbound`, `Some(false)` for another
    /// of ours, `None` for someone else's.
    fn own_rr_faces(&self, value: &str, inbound: &LocalAddr) -> Option<bool> {
        let na = NameAddr::parse(value)?;
        let uri = Uri::parse(na.uri).ok()?;
        if uri.param("gh").is_none() || !self.router.is_local_hostport(&uri) {
            return None;
        }
        let port = uri.port.unwrap_or(inbound.transport.default_port());
        Some(uri.host.eq_ignore_ascii_case(&inbound.host) && port == inbound.port)
    }

    /// Replaces every Contact URI by a token URI of the gateway at `local`.
    fn hide_contacts(&self, msg: &mut Message, routes: &[String], local: &LocalAddr) {
        let fields: Vec<usize> = msg.fields(HeaderName::Contact).map(|(i, _)| i).collect();
        for idx in fields {
            let value = msg.value(idx).into_owned();
            let items: Vec<String> = split_list(&value)
                .map(|item| {
                    let Some(na) = NameAddr::parse(item) else {
                        return item.to_owned();
                    };
                    if item.trim() == "*" || na.uri.contains(&format!(":{PREFIX}")) {
                        return item.to_owned();
                    }
                    let token = self.topology.seal(na.uri, routes);
                    let transport = local
                        .transport
                        .uri_param()
                        .map(|t| format!(";transport={t}"))
                        .unwrap_or_default();
                    let params = if na.params.is_empty() {
                        String::new()
                    } else {
                        format!(";{}", na.params)
                    };
                    format!(
                        "<sip:{PREFIX}{token}@{}:{}{transport}>{params}",
                        local.host, local.port
                    )
                })
                .collect();
            msg.replace_value(idx, items.join(", "));
        }
    }

    /// A request addressed to a token of ours: its internal Request-URI and route set back.
    pub(super) fn reveal_request_uri(&self, msg: &mut Message) -> Result<(), Reject> {
        let Some(ruri) = msg.request_uri().map(|u| u.into_owned()) else {
            return Ok(());
        };
        let Ok(uri) = Uri::parse(&ruri) else {
            return Ok(());
        };
        let Some(token) = uri.user.and_then(|u| u.strip_prefix(PREFIX)) else {
            return Ok(());
        };
        if !self.router.is_local_hostport(&uri) {
            return Ok(());
        }
        let (internal, routes) = self.topology.open(token).ok_or(Reject::NotFound)?;
        msg.set_request_uri(&internal);
        if !routes.is_empty() {
            // Response order is the callee's side first; a request from the caller's side
            // meets them in reverse.
            let route: Vec<&str> = routes.iter().rev().map(String::as_str).collect();
            let at = msg.position_of(HeaderName::Route).unwrap_or(0);
            msg.insert(at, HeaderName::Route, route.join(", "));
        }
        Ok(())
    }

    /// Puts back the Vias of the inside (from the server transaction's request) in a
    /// response to a request whose Vias were hidden.
    pub(super) fn restore_vias(request: &Message, resp: &mut Message) {
        for (n, v) in request.list_values(HeaderName::Via).into_iter().enumerate() {
            resp.insert(n, HeaderName::Via, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_are_stable_and_cannot_be_forged() {
        let k = TopologyKey::derive(&[7; 32]);
        let routes = vec!["<sip:10.0.0.7;lr>".to_owned()];
        let t = k.seal("sip:vpn@198.51.100.20:5060", &routes);
        assert_eq!(t, k.seal("sip:vpn@198.51.100.20:5060", &routes), "stable");
        assert!(!t.contains("198.51.100.20"));
        assert_eq!(
            k.open(&t),
            Some(("sip:vpn@198.51.100.20:5060".to_owned(), routes))
        );
        let mut forged = t.clone().into_bytes();
        forged[30] = if forged[30] == b'A' { b'B' } else { b'A' };
        assert_eq!(k.open(&String::from_utf8(forged).unwrap()), None);
        assert_eq!(TopologyKey::derive(&[8; 32]).open(&t), None, "other key");
        assert_eq!(k.open("short"), None);
    }
}
