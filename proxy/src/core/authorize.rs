//! Stages 6 (authorize) and 7b (rewrite) of the pipeline for tunnels and calls, and the
//! tunnel side of responses and in-dialog requests (wireguard-sdp.md).
//!
//! - authorize: classify the request (tunnel offer, ordinary call, other method), validate a
//!   WireGuard offer (488 with a Warning naming the fault), ask the policy (403 with a Warning),
//!   derive the `scram` PSK from the SASL transcript when that pskmth is chosen;
//! - rewrite: hand the PSK inward as `pskmth=gateway;psk=...`, only to a TLS hop or an
//!   internal network (else 500), and record the tunnel;
//! - answers: back to the caller's pskmth, `psk` removed, public endpoint substituted;
//!   every relayed message loses any `psk` parameter, so the inward offer the gateway writes
//!   is the only message that can carry one.

use std::time::Instant;

use base64::Engine;
use gatehouse_auth::scram::{derive_psk, PskBinding};
use gatehouse_auth::Secret;
use gatehouse_policy::{Caller, Counts, Permit, Query, Session};

use super::auth::aor_key;
use super::router::Routed;
use super::{Admission, AdmissionBasis, Proxy, Reject};
use crate::flow::{Destination, Flow, Transport};
use crate::sip::{HeaderName, Message, Method, NameAddr};
use crate::transaction::TxId;
use crate::tunnel;
use crate::tunnel::claims::Conflict;
use crate::tunnel::sdp::{strip_psk, SdpError, WgSdp};

use super::error::MediaFault;
use crate::tunnel::{Party, Tunnel, TunnelState};

/// What the policy allowed, and for a tunnel what to do with the offer.
#[derive(Debug)]
pub struct Authorization {
    pub permit: Permit,
    pub tunnel: Option<TunnelPlan>,
}

/// A permitted tunnel offer.
#[derive(Debug)]
pub struct TunnelPlan {
    pub sdp: WgSdp,
    /// The pskmth chosen for the caller (`scram` or `none`).
    pub pskmth: String,
    /// Who opens the tunnel: the authenticated identity, or `trusted`.
    pub identity: String,
    pub psk: Option<Secret<[u8; 32]>>,
}

/// Per-request tunnel state kept in the response context.
#[derive(Debug, Clone)]
pub struct TunnelCtx {
    pub call_id: String,
    pub caller_tag: String,
    pub pskmth: String,
    pub to_aor: String,
}

/// The addr-spec of From or To exactly as written (inside `<...>` when present).
pub(super) fn addr_spec(msg: &Message, name: HeaderName) -> String {
    msg.value_of(name)
        .and_then(|v| NameAddr::parse(&v).map(|n| n.uri.to_owned()))
        .unwrap_or_default()
}

/// What a request's body is, judged by its bytes, not by its labels: any body that mentions
/// `vnd.wireguard` is a WireGuard offer, whatever its Content-Type, and must be a valid one.
#[derive(Debug)]
enum Body {
    /// No body, or a body without WireGuard (an ordinary call's SDP, text, ...).
    Plain { multipart: bool },
    /// A valid WireGuard offer in an INVITE.
    Offer(Box<WgSdp>),
}

/// The media type of a Content-Type value, lower-cased, without parameters.
fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn classify_body(msg: &Message, method: Method) -> Result<Body, Reject> {
    let body = msg.body();
    if body.is_empty() {
        return Ok(Body::Plain { multipart: false });
    }
    // An encoded body cannot be inspected, so it is not relayed (RFC 3261 21.4.16: 415 with
    // Accept-Encoding).
    if let Some(enc) = msg.value_of(HeaderName::ContentEncoding) {
        if !enc.trim().eq_ignore_ascii_case("identity") {
            return Err(Reject::UnsupportedMedia(MediaFault::Encoding));
        }
    }
    let ctype = msg
        .value_of(HeaderName::ContentType)
        .map(|c| media_type(&c))
        .unwrap_or_else(|| "application/sdp".to_owned());
    let multipart = ctype.starts_with("multipart/");
    if multipart && tunnel::sdp::contains_ignore_case(body, b"content-transfer-encoding") {
        // A part could hide anything behind base64 or quoted-printable.
        return Err(Reject::UnsupportedMedia(MediaFault::Encoding));
    }
    if !tunnel::sdp::mentions_wireguard(body) {
        return Ok(Body::Plain { multipart });
    }
    if ctype != "application/sdp" {
        return Err(Reject::UnsupportedMedia(MediaFault::WireGuardNotSdp));
    }
    if method != Method::Invite {
        return Err(Reject::BadOffer(SdpError::NotInInvite));
    }
    match WgSdp::parse(body).map_err(Reject::BadOffer)? {
        Some(sdp) => Ok(Body::Offer(Box::new(sdp))),
        None => Err(Reject::BadOffer(SdpError::Stray)),
    }
}

/// A tunnel just entered in the table as proposed: its key, and what its limits count.
#[derive(Debug)]
pub(super) struct Proposed {
    pub(super) call_id: String,
    pub(super) caller_tag: String,
    pub(super) identity: String,
    pub(super) to: String,
}

impl Proxy {
    /// Stage 6: the policy decision (and the PSK derivation for a `scram` tunnel).
    pub(super) fn authorize(
        &mut self,
        msg: &mut Message,
        admission: &Admission,
        flow: &Flow,
        routed: &Routed,
        outward: bool,
    ) -> Result<Authorization, Reject> {
        let method = msg.method().unwrap_or(Method::Other);
        let (offer, multipart) = match classify_body(msg, method)? {
            Body::Offer(sdp) => (Some(*sdp), false),
            Body::Plain { multipart } => (None, multipart),
        };
        if offer.is_none() {
            // Not an offer: relayed as it is, but never with a `psk` in any part.
            sanitize(msg);
        }
        let from = aor_key(&addr_spec(msg, HeaderName::From)).unwrap_or_default();
        // What the request reaches, as the target stage decided: never the To header.
        let to = routed.target();
        let (caller, identity, transcript, crossed) = match admission.basis() {
            AdmissionBasis::TrustedSource => (Caller::Trusted, "trusted".to_owned(), None, None),
            AdmissionBasis::Sasl(auth) => (
                Caller::Authenticated {
                    aor: &from,
                    // The realm that authenticated the caller: ours, or its home's.
                    realm: auth
                        .crossover()
                        .map_or(self.gate.realm(), |c| c.realm.as_str()),
                    mechanism: auth.mechanism(),
                    crossover: auth.crossover().map(|c| c.realm.as_str()),
                },
                auth.identity().to_owned(),
                auth.transcript().map(|t| (t, auth.mechanism())),
                auth.crossover(),
            ),
        };
        let (by_identity, by_target, total) = self.tunnels.counts(&identity, to);
        let method_text = msg.method_text().into_owned();
        let session = match &offer {
            Some(sdp) => Session::Tunnel {
                prefixes: &sdp.prefixes,
                pskmth: &sdp.pskmth,
                scram_available: transcript.is_some() && !outward,
                xover_available: if outward {
                    // The far end's gateway can get a key from us, the caller's home, for one
                    // of our own callers over TLS (the home checks that channel).
                    flow.transport == Transport::Tls
                        && crossed.is_none()
                        && matches!(admission.basis(), AdmissionBasis::Sasl(_))
                } else {
                    // The home's key is bound to the offer it saw: usable only for this one.
                    crossed.is_some_and(|c| {
                        c.facts.offer_pubkey == sdp.pubkey
                            && c.facts.offer_prefix == sdp.prefix_text
                    })
                },
                outward,
            },
            None if method == Method::Invite => Session::Call,
            None => Session::Method(&method_text),
        };
        let query = Query {
            caller,
            tls: flow.transport == Transport::Tls,
            from: &from,
            to,
            session,
            counts: Counts {
                by_identity,
                by_target,
                total,
            },
        };
        let permit = self.policy.decide(&query).map_err(|d| {
            *self.policy_denials.entry(d.label()).or_default() += 1;
            Reject::PolicyDenied(d)
        })?;
        let Some(sdp) = offer else {
            if multipart && !permit.allows_multipart() {
                return Err(Reject::UnsupportedMedia(MediaFault::Multipart));
            }
            return Ok(Authorization {
                permit,
                tunnel: None,
            });
        };
        // One tunnel never takes over another's: a prefix or key another identity's live
        // tunnel holds is refused before anything is derived or relayed.
        let pubkey = base64::engine::general_purpose::STANDARD.encode(sdp.pubkey);
        if let Err(conflict) = self.tunnels.check_claims(&identity, &sdp.prefixes, &pubkey) {
            let denied = match conflict {
                Conflict::Prefix => gatehouse_policy::Denied::PrefixHeld,
                Conflict::Key => gatehouse_policy::Denied::KeyHeld,
                Conflict::TooManyPrefixes => gatehouse_policy::Denied::Prefix,
            };
            *self.policy_denials.entry(denied.label()).or_default() += 1;
            tracing::info!(%identity, reason = denied.label(), "tunnel offer claims what another tunnel holds");
            return Err(Reject::PolicyDenied(denied));
        }
        let pskmth = permit.pskmth().unwrap_or("none").to_owned();
        let psk = match (pskmth.as_str(), transcript) {
            ("scram", Some((t, mech))) => {
                let binding = PskBinding {
                    mech,
                    from: &addr_spec(msg, HeaderName::From),
                    to: &addr_spec(msg, HeaderName::To),
                    call_id: &msg.call_id(),
                    pubkey: &sdp.pubkey,
                    prefix: &sdp.prefix_text,
                };
                Some(derive_psk(t, &binding))
            }
            ("scram", None) => return Err(Reject::PolicyDenied(gatehouse_policy::Denied::Pskmth)),
            // Outward, the partner's gateway gets the key from us as the caller's home: none
            // of ours goes with the offer.
            ("xover", _) if outward => None,
            // The key the caller's home released, bound to (this domain, Call-ID, From, this
            // offer's key and prefix) — the policy offered `xover` only when they match.
            ("xover", _) => match crossed {
                Some(c)
                    if c.facts.offer_pubkey == sdp.pubkey
                        && c.facts.offer_prefix == sdp.prefix_text
                        && c.facts.call_id == msg.call_id() =>
                {
                    Some(Secret::new(*c.key.expose()))
                }
                _ => return Err(Reject::PolicyDenied(gatehouse_policy::Denied::Pskmth)),
            },
            _ => None,
        };
        Ok(Authorization {
            permit,
            tunnel: Some(TunnelPlan {
                sdp,
                pskmth,
                psk,
                identity,
            }),
        })
    }

    /// Federation: an outward tunnel whose far end keys it by crossover (`xover`) is
    /// remembered (see [`super::outward`]) — its caller's later rounds, the home's check of
    /// its channel. 503 when the table (or this identity's share) is full.
    pub(super) fn remember_outward(
        &mut self,
        msg: &Message,
        flow: &Flow,
        admission: &Admission,
        plan: &TunnelPlan,
        domain: &str,
        now: Instant,
    ) -> Result<(), Reject> {
        let (AdmissionBasis::Sasl(auth), Some(conn), "xover") =
            (admission.basis(), flow.conn, plan.pskmth.as_str())
        else {
            return Ok(());
        };
        let Some(channel) = self.gate.tls_of(flow.conn).map(|t| t.exporter.clone()) else {
            return Ok(());
        };
        let call = super::outward::NewOutward {
            call_id: &msg.call_id(),
            from_tag: &msg.tag(HeaderName::From).unwrap_or_default(),
            domain,
            from_aor: &addr_spec(msg, HeaderName::From),
            channel: &channel,
            conn,
            source: flow.remote.ip(),
            request_uri: &msg.request_uri().unwrap_or_default(),
            identity: auth,
        };
        self.outward.record(call, now).map_err(|_| {
            tracing::info!(
                identity = auth.identity(),
                "outward calls table full for this identity or in all"
            );
            Reject::Overloaded
        })
    }

    /// Stage 7b: the inward offer, and the tunnel record (returned: what its limits count).
    pub(super) fn rewrite_offer(
        &mut self,
        id: TxId,
        msg: &mut Message,
        plan: TunnelPlan,
        routed: &Routed,
        flow: &Flow,
        now: Instant,
    ) -> Result<Proposed, Reject> {
        let TunnelPlan {
            mut sdp,
            pskmth,
            psk,
            identity,
        } = plan;
        match &psk {
            Some(psk) => {
                for dest in routed.branches().iter().flat_map(|t| t.hops()) {
                    if !self.is_protected_inside(dest) {
                        tracing::error!(
                            "refusing to hand a PSK over an unprotected hop: make the target TLS or list its network in tunnels.internal_networks"
                        );
                        return Err(Reject::InsecureInternalHop);
                    }
                }
                sdp.set_param("pskmth", Some("gateway"));
                let encoded = base64::engine::general_purpose::STANDARD.encode(psk.expose());
                sdp.set_param("psk", Some(&encoded));
            }
            None => {
                sdp.set_param("pskmth", Some(&pskmth));
                sdp.set_param("psk", None);
            }
        }
        msg.set_body(sdp.to_bytes().into());
        let call_id = msg.call_id().into_owned();
        let caller_tag = msg.tag(HeaderName::From).unwrap_or_default();
        let tunnel = Tunnel {
            call_id: call_id.clone(),
            caller_tag: caller_tag.clone(),
            callee_tag: None,
            identity,
            from: aor_key(&addr_spec(msg, HeaderName::From)).unwrap_or_default(),
            // The target the policy judged and the branches go to (not the To header).
            to: routed.target().to_owned(),
            prefixes: sdp.prefix_text.clone(),
            pubkey: base64::engine::general_purpose::STANDARD.encode(sdp.pubkey),
            pskmth: pskmth.clone(),
            created_unix: self.clock.unix(now),
            state: TunnelState::Proposed,
            caller: msg
                .value_of(HeaderName::Contact)
                .and_then(|c| NameAddr::parse(&c).map(|n| n.uri.to_owned()))
                .map(|contact| Party {
                    contact,
                    transport: flow.transport,
                    addr: flow.remote,
                    aor: addr_spec(msg, HeaderName::From),
                    tag: msg.tag(HeaderName::From).unwrap_or_default(),
                    // The proxies before the gateway (a load balancer) that stay in the
                    // dialog: a BYE of the gateway's towards the caller goes through them.
                    route: msg.list_values(HeaderName::RecordRoute).join(", "),
                }),
            callee: None,
        };
        let to_aor = tunnel.to.clone();
        let proposed = Proposed {
            call_id: call_id.clone(),
            caller_tag: caller_tag.clone(),
            identity: tunnel.identity.clone(),
            to: to_aor.clone(),
        };
        self.tunnels.insert(tunnel);
        if let Some(ctx) = self.fwd.context_mut(id) {
            ctx.tunnel = Some(TunnelCtx {
                call_id,
                caller_tag,
                pskmth,
                to_aor,
            });
        }
        Ok(proposed)
    }

    /// A hop a PSK may travel over: TLS, or an address in the internal networks.
    fn is_protected_inside(&self, dest: &Destination) -> bool {
        let internal = |ip: std::net::IpAddr| {
            self.cfg
                .tunnels
                .internal_networks
                .iter()
                .any(|n| n.contains(&ip))
        };
        // A name is judged before DNS answers: only TLS (`sips:`, `transport=tls`) will do,
        // since whatever address DNS gives, the certificate is what vouches for it.
        if dest.transport() == Transport::Tls {
            return true;
        }
        match dest {
            Destination::Flow(f) => internal(f.remote.ip()),
            Destination::Addr { addr, .. } => internal(addr.ip()),
            Destination::Name { .. } => false,
        }
    }

    /// The Record-Route entries of a response above this gateway's own: the proxies between
    /// the gateway and the callee that stay in the dialog, as a Route value (empty when the
    /// callee is reached directly).
    fn route_after_us(&self, resp: &Message) -> String {
        let mut after = Vec::new();
        for entry in resp.list_values(HeaderName::RecordRoute) {
            let ours = NameAddr::parse(&entry)
                .and_then(|na| {
                    crate::sip::Uri::parse(na.uri)
                        .ok()
                        .map(|u| self.router.is_local_hostport(&u))
                })
                .unwrap_or(false);
            if ours {
                return after.join(", ");
            }
            after.push(entry);
        }
        // None of ours: not a response to a request this gateway record-routed.
        String::new()
    }

    /// The tunnel side of a response going back to the caller: answer rewrite, table update,
    /// and in every case no `psk` leaves.
    pub(super) fn tunnel_response(
        &mut self,
        server: TxId,
        client: TxId,
        status: u16,
        resp: &mut Message,
        now: Instant,
    ) {
        let ctx = self.fwd.context(server).and_then(|c| c.tunnel.clone());
        if let Some(t) = &ctx {
            if (200..300).contains(&status) {
                if let Ok(Some(mut answer)) = WgSdp::parse(resp.body()) {
                    answer.set_param("pskmth", Some(&t.pskmth));
                    answer.set_param("psk", None);
                    let public = self.cfg.tunnels.public_endpoints.get(&t.to_aor).copied();
                    if let Some(ep) = public {
                        answer.set_endpoint(ep);
                    }
                    if let Some(to) = self.txl.server_flow(server) {
                        if self.hides_response_to(&to) {
                            let ip = public
                                .map_or(self.router.local_for_flow(&to).addr.ip(), |ep| ep.ip());
                            answer.hide_addresses(ip);
                        }
                    }
                    resp.set_body(answer.to_bytes().into());
                }
                let callee_tag = resp.tag(HeaderName::To);
                if let Some(ctx) = self.fwd.context(server) {
                    self.metrics
                        .tunnel_setup
                        .observe(now.saturating_duration_since(ctx.started).as_secs_f64());
                }
                let callee = match (
                    self.txl.client_dest(client),
                    resp.value_of(HeaderName::Contact),
                ) {
                    (
                        Some((
                            Destination::Addr {
                                transport, addr, ..
                            },
                            _,
                        )),
                        Some(c),
                    ) => NameAddr::parse(&c).map(|n| Party {
                        contact: n.uri.to_owned(),
                        transport,
                        addr,
                        aor: addr_spec(resp, HeaderName::To),
                        tag: callee_tag.clone().unwrap_or_default(),
                        // The proxies after the gateway that stay in the dialog (the
                        // gateway of the cluster holding the endpoint's flow), if any.
                        route: self.route_after_us(resp),
                    }),
                    _ => None,
                };
                self.tunnels.set_callee(&t.call_id, &t.caller_tag, callee);
                if let Some(tunnel) = self
                    .tunnels
                    .establish(&t.call_id, &t.caller_tag, callee_tag)
                {
                    tracing::info!(identity = %tunnel.identity(), to = %tunnel.to(), pskmth = %tunnel.pskmth(), "tunnel up");
                }
                // Durable before the 200 leaves: the caller is told "up" only about a tunnel
                // a restarted gateway still knows (and can tear down). The write batch is
                // marked durable; the driver holds this batch's transmits until the storage
                // worker has committed it (one commit for all the tunnels a batch of messages
                // established).
                self.durable = true;
            } else if status >= 300 {
                self.tunnels.remove(&t.call_id, &t.caller_tag);
            }
        }
        sanitize(resp);
    }

    /// An in-dialog request: no `psk` passes, and a BYE tears its tunnel down.
    pub(super) fn tunnel_in_dialog(&mut self, msg: &mut Message) {
        sanitize(msg);
        if msg.method() == Some(Method::Bye) {
            let call_id = msg.call_id().into_owned();
            let from_tag = msg.tag(HeaderName::From).unwrap_or_default();
            let to_tag = msg.tag(HeaderName::To).unwrap_or_default();
            // The dialog is over: its Route entries admit nothing more.
            self.dialogs.ended(&call_id, &from_tag, &to_tag);
            if let Some(t) = self.tunnels.remove_dialog(&call_id, &from_tag, &to_tag) {
                tracing::info!(identity = %t.identity, to = %t.to, "tunnel down (BYE)");
            } else if self.cfg.shared_store {
                // Not in our table: another gateway of the cluster set it up (the balancer
                // brought its BYE here). Its row goes, and NOTIFY tells that gateway; either
                // tag may be the caller's, one of the two deletes finds nothing.
                for caller_tag in [from_tag, to_tag] {
                    self.writes.push(super::persist::StoreWrite::DeleteTunnel {
                        call_id: call_id.clone(),
                        caller_tag,
                    });
                }
            }
        }
    }
}

/// Removes any `psk` fmtp parameter from a relayed message's WireGuard SDP.
fn sanitize(msg: &mut Message) {
    if let Some(clean) = strip_psk(msg.body()) {
        msg.set_body(clean.into());
    }
}

impl Proxy {
    /// Another gateway of the cluster ended this tunnel (its row left the shared database):
    /// drop it from the table, without a write of our own.
    pub fn forget_tunnel(&mut self, call_id: &str, caller_tag: &str) {
        if let Some(gone) = self.tunnels.remove_ended_elsewhere(call_id, caller_tag) {
            tracing::info!(identity = %gone.identity, to = %gone.to, "tunnel ended by another gateway");
        }
    }

    /// Starts comparing the table with the shared store's tunnels (`keys`, read at Unix second
    /// `read_unix`): the listener was disconnected, so some `TunnelGone` may have been missed.
    /// The work is done in bounded steps by [`Proxy::maintain`].
    pub fn resync_tunnels(
        &mut self,
        keys: std::collections::HashSet<(String, String)>,
        read_unix: u64,
    ) {
        self.resync = Some(super::TunnelResync {
            keys,
            // A second's margin: `created_unix` is whole seconds.
            before_unix: read_unix.saturating_sub(1),
            cursor: None,
        });
    }

    /// One bounded step of a resynchronisation in progress.
    pub(super) fn resync_step(&mut self, budget: usize) {
        let Some(r) = &mut self.resync else {
            return;
        };
        let (removed, next) =
            self.tunnels
                .remove_absent(&r.keys, r.before_unix, r.cursor.as_deref(), budget);
        if removed > 0 {
            tracing::info!(
                removed,
                "tunnels ended by other gateways while notifications were lost"
            );
        }
        match next {
            Some(c) => r.cursor = Some(c),
            None => self.resync = None,
        }
    }

    /// Tears down a tunnel another gateway of the cluster set up, from its stored record: the
    /// record joins this table and leaves it as [`Proxy::teardown`] ends it (which deletes the
    /// shared row).
    pub fn teardown_stored(&mut self, t: Tunnel, now: Instant) -> Result<(), String> {
        let call_id = t.call_id.clone();
        if self.tunnels.by_call_id(&call_id).is_none() {
            if t.caller.is_none() || t.callee.is_none() {
                // A set-up another gateway proposed and never finished (it died with it, or
                // is still at it): no dialog to end, so no BYE; the row goes, and the table
                // here never holds it.
                self.writes.push(super::persist::StoreWrite::DeleteTunnel {
                    call_id,
                    caller_tag: t.caller_tag,
                });
                return Ok(());
            }
            self.tunnels.load(t);
        }
        self.teardown(&call_id, now)
    }

    /// Ends a tunnel from the gateway (admin API): BYE to both parties, as each would have
    /// received it from the other, then the table entry goes. The endpoint removes its
    /// WireGuard peer on that BYE.
    pub fn teardown(&mut self, call_id: &str, now: Instant) -> Result<(), String> {
        let t = self.tunnels.by_call_id(call_id).ok_or("no such tunnel")?;
        let (Some(caller), Some(callee)) = (&t.caller, &t.callee) else {
            return Err("the tunnel is not established".into());
        };
        for (to, from) in [(callee, caller), (caller, callee)] {
            let branch = self.fwd.next_branch("td");
            let dest = Destination::Addr {
                transport: to.transport,
                addr: to.addr,
                server_name: None,
            };
            let local = self.router.local_for(&dest).clone();
            // The route set towards the party (a balancer in between): the BYE goes to the
            // previous hop, which the Route names, then on to the Contact.
            let route = if to.route.is_empty() {
                String::new()
            } else {
                format!("Route: {}\r\n", to.route)
            };
            let bye = format!(
                "BYE {} SIP/2.0\r\nVia: SIP/2.0/{} {}:{};branch={branch}\r\nMax-Forwards: 70\r\n{route}\
From: <{}>;tag={}\r\nTo: <{}>;tag={}\r\nCall-ID: {}\r\nCSeq: 999999 BYE\r\nReason: SIP;cause=200;text=\"ended by the gateway\"\r\n\
Content-Length: 0\r\n\r\n",
                to.contact,
                local.transport.via_token(),
                local.host,
                local.port,
                from.aor,
                from.tag,
                to.aor,
                to.tag,
                t.call_id
            );
            let reliable = to.transport.is_reliable();
            self.txl.start_client(
                bytes::Bytes::from(bye),
                Method::Bye,
                &branch,
                dest,
                reliable,
                now,
            );
        }
        self.tunnels.remove(&t.call_id, &t.caller_tag);
        if let Some(callee_tag) = &t.callee_tag {
            self.dialogs.ended(&t.call_id, &t.caller_tag, callee_tag);
        }
        tracing::info!(identity = %t.identity, to = %t.to, "tunnel torn down by the admin API");
        Ok(())
    }
}
