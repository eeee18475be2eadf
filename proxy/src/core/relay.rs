//! The relay stage and the response side (RFC 3261 sections 16.4 to 16.10): Route
//! pre-processing, the next hop, Via/Record-Route/Max-Forwards, client transactions per
//! branch, the response context that picks the best answer (16.7), CANCEL of pending branches,
//! ACK for 2xx, and responses synthesised for branches that time out or cannot be reached.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

use std::net::SocketAddr;

use super::admission::PeerFlow;
use super::locate::Retry;
use super::router::{PeerHop, Target};
use super::{admission, authorize, Clearance, LocalAddr, Proxy, Reject, SignedDialog};
use crate::config::route;
use crate::flow::{Destination, Flow, Transport};
use crate::sip::values::split_list;
use crate::sip::{build_response, HeaderName, Message, Method, NameAddr, Uri, Via};
use crate::transaction::{build_cancel, TxId};

#[derive(Debug)]
pub(super) struct Branch {
    pub(super) client: TxId,
    pub(super) done: bool,
    pub(super) cancel_pending: bool,
    pub(super) provisional: bool,
    /// Any response arrived, 100 Trying included (a silent next hop is failed over).
    pub(super) heard: bool,
    /// The address, when DNS gave it (remembered as dead when it fails without a word).
    pub(super) located: Option<(Transport, SocketAddr)>,
    /// The inside's Vias were not sent (topology hiding): restore them on responses.
    pub(super) hidden_vias: bool,
    /// More addresses DNS gave for this branch's name (RFC 3263 failover).
    pub(super) retry: Option<Box<Retry>>,
}

/// One branch's request before anything that depends on its next hop (Record-Route, Via,
/// topology hiding): what a branch waiting for DNS, or failing over, keeps.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    pub(super) msg: Message,
    /// Where the request came from.
    pub(super) flow: Flow,
    pub(super) record_route: bool,
    pub(super) loop_hash: u32,
    /// The destination of the clearance this branch stems from (DNS turns a name into the
    /// addresses the branch is sent to): checked by the authorisation invariant.
    pub(super) origin: Destination,
}

/// Response context of a forwarded request (RFC 3261 16.7).
#[derive(Debug)]
pub(super) struct Context {
    pub(super) request: Message,
    pub(super) invite: bool,
    pub(super) branches: Vec<Branch>,
    pub(super) best: Option<(u16, Message)>,
    pub(super) final_sent: bool,
    pub(super) cancelled: bool,
    /// `*-Authentication-Info` added to every final response of an authenticated request.
    pub(super) auth_info: Option<(&'static str, String)>,
    /// Set when the request is a tunnel the gateway authorised.
    pub(super) tunnel: Option<authorize::TunnelCtx>,
    /// When the request arrived (latency metrics).
    pub(super) started: Instant,
    pub(super) latency_recorded: bool,
    /// Branches waiting for DNS (they count as open: no final is chosen before them).
    pub(super) resolving: u16,
    /// The destinations the clearance consumed for this request names (the authorisation
    /// invariant: every branch starts at one of them, or at an address DNS gave for one).
    pub(super) cleared: Vec<Destination>,
}

/// The relay's state (RFC 3261 16.7): the response context of every server transaction
/// the gateway forwards for, which server transaction each client transaction (branch)
/// belongs to, and the branch IDs it writes. Contexts leave with their server transaction,
/// branches with their client transaction: nothing here outlives the transaction layer.
#[derive(Debug)]
pub(super) struct Forwarding {
    /// Boxed: growing the map moves small slots, not whole contexts (see `TransactionLayer`).
    contexts: HashMap<TxId, Box<Context>>,
    branch_of: HashMap<TxId, TxId>,
    hasher: RandomState,
    salt: u32,
    counter: u64,
}

impl Forwarding {
    /// `salt` makes this process's branch IDs its own (from the core's seeded generator).
    pub(super) fn new(salt: u32) -> Self {
        Forwarding {
            contexts: HashMap::new(),
            branch_of: HashMap::new(),
            hasher: RandomState::new(),
            salt,
            counter: 0,
        }
    }

    /// A server transaction the gateway will forward for (or answer itself).
    pub(super) fn open(&mut self, server: TxId, ctx: Context) {
        self.contexts.insert(server, Box::new(ctx));
    }

    pub(super) fn context(&self, server: TxId) -> Option<&Context> {
        self.contexts.get(&server).map(|c| &**c)
    }

    pub(super) fn context_mut(&mut self, server: TxId) -> Option<&mut Context> {
        self.contexts.get_mut(&server).map(|c| &mut **c)
    }

    /// Branch `client` of server transaction `server`.
    pub(super) fn branch_mut(&mut self, server: TxId, client: TxId) -> Option<&mut Branch> {
        self.context_mut(server)?
            .branches
            .iter_mut()
            .find(|b| b.client == client)
    }

    /// The server transaction ended: its context goes.
    pub(super) fn close(&mut self, server: TxId) {
        self.contexts.remove(&server);
    }

    /// A branch forwarded for `server`.
    pub(super) fn add_branch(&mut self, server: TxId, branch: Branch) {
        if let Some(ctx) = self.contexts.get_mut(&server) {
            self.branch_of.insert(branch.client, server);
            ctx.branches.push(branch);
        }
    }

    /// The server transaction a branch belongs to.
    pub(super) fn server_of(&self, client: TxId) -> Option<TxId> {
        self.branch_of.get(&client).copied()
    }

    /// The client transaction ended (or failed): responses for it no longer map anywhere.
    pub(super) fn forget_branch(&mut self, client: TxId) {
        self.branch_of.remove(&client);
    }

    /// A fresh RFC 3261 branch ID (magic cookie, salt, counter) ending in `.suffix` (the loop
    /// hash of 16.6 item 8, or a tag of the sender).
    pub(super) fn next_branch(&mut self, suffix: &str) -> String {
        self.counter += 1;
        format!("z9hG4bK{:08x}{:x}.{suffix}", self.salt, self.counter)
    }

    /// The branch ID for a request forwarded statelessly: a function of the incoming branch,
    /// so that a retransmission is forwarded with the same ID (16.11).
    pub(super) fn stateless_branch(&self, incoming: &str) -> String {
        let mut h = self.hasher.build_hasher();
        h.write(incoming.as_bytes());
        format!("z9hG4bK{:x}a{:016x}", self.salt, h.finish())
    }

    /// The keyed hasher of this process (loop detection).
    pub(super) fn hasher(&self) -> &RandomState {
        &self.hasher
    }

    /// Gives memory back once a flood has drained.
    pub(super) fn shrink(&mut self) {
        super::shrink_idle(&mut self.contexts);
        super::shrink_idle(&mut self.branch_of);
    }
}

impl Proxy {
    pub(super) fn handle_cancel(
        &mut self,
        cancel_id: TxId,
        invite_id: TxId,
        cancel: &Message,
        now: Instant,
    ) {
        let tag = self.new_tag();
        let ok = build_response(cancel, 200, "OK", Some(&tag), &[]);
        self.respond(cancel_id, 200, ok, now);
        let Some(ctx) = self.fwd.context_mut(invite_id) else {
            return;
        };
        ctx.cancelled = true;
        let mut to_cancel = Vec::new();
        for b in ctx.branches.iter_mut().filter(|b| !b.done) {
            if b.provisional {
                to_cancel.push(b.client);
            } else {
                b.cancel_pending = true;
            }
        }
        let no_branch = ctx.branches.is_empty();
        for tx in to_cancel {
            self.send_cancel(tx, now);
        }
        if no_branch && self.txl.server_awaits_final(invite_id) {
            if let Some(request) = self.fwd.context(invite_id).map(|c| c.request.clone()) {
                self.reply(invite_id, &request, Reject::Terminated, now);
            }
        }
    }

    /// Sends a CANCEL for the client INVITE transaction `tx` (RFC 3261 9.1).
    pub(super) fn send_cancel(&mut self, tx: TxId, now: Instant) {
        let Some(request) = self.txl.client_request(tx).cloned() else {
            return;
        };
        let Some((dest, reliable)) = self.txl.client_dest(tx) else {
            return;
        };
        let Ok(invite) = Message::parse(request, &self.cfg.limits) else {
            return;
        };
        let branch = invite
            .top_via_value()
            .and_then(|v| Via::parse(&v).and_then(|v| v.branch()).map(str::to_owned));
        if let Some(branch) = branch {
            let cancel = build_cancel(&invite);
            self.txl
                .start_client(cancel, Method::Cancel, &branch, dest, reliable, now);
        }
    }

    /// Stateless forwarding of an ACK for a 2xx along the route set (16.11).
    pub(super) fn forward_ack(&mut self, mut msg: Message, flow: Flow, now: Instant) {
        // Only in a dialog this gateway signed (the proof is what matters here; an ACK has no
        // transaction to relay through).
        let Ok(Some(signed)) = self.preprocess_routes(&mut msg) else {
            tracing::debug!(remote = %flow.remote, "ACK without a signed Route of ours dropped");
            return;
        };
        if !self.dialog_lives(&msg, now) {
            tracing::debug!(remote = %flow.remote, "ACK for no live dialog dropped");
            return;
        }
        if self.reveal_request_uri(&mut msg).is_err() {
            return;
        }
        if crate::tunnel::sdp::mentions_wireguard(msg.body()) {
            // An offer or answer in an ACK would change a tunnel outside the pipeline.
            return;
        }
        self.tunnel_in_dialog(&mut msg);
        let dest = match self.next_hop_of_dialog(&mut msg, &signed) {
            Ok(dest) => dest,
            Err(reject) => {
                tracing::debug!(remote = %flow.remote, %reject, "ACK dropped");
                return;
            }
        };
        if self.hides_towards(&flow, &dest) {
            self.hide_request(&mut msg, &dest);
        }
        let incoming_branch = msg
            .top_via_value()
            .and_then(|v| Via::parse(&v).and_then(|v| v.branch()).map(str::to_owned))
            .unwrap_or_default();
        let branch = self.fwd.stateless_branch(&incoming_branch);
        self.add_via_and_forwarding_headers(&mut msg, &dest, &branch);
        self.stats.forwarded += 1;
        self.txl.send_stateless(dest, msg.serialize());
    }

    /// Removes the Route entries that name this gateway (16.4); returns the proof when one of
    /// them carried a valid dialog MAC. A strict router's Request-URI pointing at us is replaced
    /// by the last Route entry.
    pub(super) fn preprocess_routes(
        &mut self,
        msg: &mut Message,
    ) -> Result<Option<SignedDialog>, Reject> {
        let mut signed = None;
        // Strict-router case: the Request-URI is one of our Record-Route URIs.
        if let Some(ruri) = msg.request_uri().map(|u| u.into_owned()) {
            if let Ok(u) = Uri::parse(&ruri) {
                if u.user.is_none() && self.router.is_local_hostport(&u) && u.param("gh").is_some()
                {
                    let mac = u.param("gh").unwrap_or_default();
                    let token = u.param("gd").unwrap_or_default();
                    signed = signed.or(SignedDialog::verify(
                        &self.mac_key,
                        &self.topology,
                        msg,
                        mac,
                        token,
                    ));
                    let routes = msg.list_values(HeaderName::Route);
                    if let Some(last) = routes.last() {
                        let na = NameAddr::parse(last).ok_or(Reject::Malformed(
                            crate::sip::ParseError::Malformed(HeaderName::Route),
                        ))?;
                        let new_uri = na.uri.to_owned();
                        self.remove_route_element(msg, routes.len() - 1);
                        msg.set_request_uri(&new_uri);
                    }
                }
            }
        }
        // Loose routing: pop every leading Route entry that is ours (double Record-Route
        // leaves two) — by address, or by a `gh` MAC that verifies for this dialog: an entry
        // another gateway of the cluster signed with the shared key, reaching us because the
        // balancer failed the request over from that gateway (it may be dead).
        while let Some(first) = msg.list_values(HeaderName::Route).into_iter().next() {
            let na = NameAddr::parse(&first).ok_or(Reject::Malformed(
                crate::sip::ParseError::Malformed(HeaderName::Route),
            ))?;
            let Ok(u) = Uri::parse(na.uri) else {
                return Err(Reject::Malformed(crate::sip::ParseError::Malformed(
                    HeaderName::Route,
                )));
            };
            let ours = self.router.is_local_hostport(&u);
            let verified = u.param("gh").filter(|_| u.user.is_none()).and_then(|mac| {
                let token = u.param("gd").unwrap_or_default();
                SignedDialog::verify(&self.mac_key, &self.topology, msg, mac, token)
            });
            if !ours && verified.is_none() {
                break;
            }
            signed = signed.or(verified);
            self.remove_route_element(msg, 0);
        }
        Ok(signed)
    }

    /// Removes the `n`-th element of the Route list, editing multi-value lines.
    pub(super) fn remove_route_element(&self, msg: &mut Message, n: usize) {
        let mut seen = 0;
        let fields: Vec<usize> = msg.fields(HeaderName::Route).map(|(i, _)| i).collect();
        for idx in fields {
            let value = msg.value(idx).into_owned();
            let items: Vec<&str> = split_list(&value).collect();
            if n < seen + items.len() {
                let keep: Vec<&str> = items
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| seen + i != n)
                    .map(|(_, s)| *s)
                    .collect();
                if keep.is_empty() {
                    msg.remove(idx);
                } else {
                    msg.replace_value(idx, keep.join(", "));
                }
                return;
            }
            seen += items.len();
        }
    }

    /// The next hop of an in-dialog request, which must be the one its signed Route entry
    /// names (the dialog's peer in the request's direction): anything else is refused, so a
    /// dialog's entry reaches that party only.
    pub(super) fn next_hop_of_dialog(
        &self,
        msg: &mut Message,
        dialog: &SignedDialog,
    ) -> Result<Destination, Reject> {
        let dest = self.next_hop(msg)?;
        let allowed = Uri::parse(dialog.hop())
            .ok()
            .map(|u| route::destination_of(&u, None));
        if allowed.as_ref() != Some(&dest) {
            return Err(Reject::Forbidden("Forbidden (not this dialog's peer)"));
        }
        Ok(dest)
    }

    /// The next hop of a request after Route pre-processing (16.6 items 6 and 7).
    pub(super) fn next_hop(&self, msg: &mut Message) -> Result<Destination, Reject> {
        let routes = msg.list_values(HeaderName::Route);
        let bad_route = || Reject::Malformed(crate::sip::ParseError::Malformed(HeaderName::Route));
        if let Some(first) = routes.first() {
            let na = NameAddr::parse(first).ok_or_else(bad_route)?;
            let uri = Uri::parse(na.uri).map_err(|_| bad_route())?;
            if uri.param("lr").is_none() {
                // Strict router next: it wants its URI as Request-URI.
                let ruri = msg.request_uri().unwrap_or_default().into_owned();
                let route_uri = na.uri.to_owned();
                let dest = route::destination_of(&uri, None);
                self.remove_route_element(msg, 0);
                msg.push(HeaderName::Route, format!("<{ruri}>"));
                msg.set_request_uri(&route_uri);
                return Ok(dest);
            }
            return Ok(route::destination_of(&uri, None));
        }
        let ruri = msg.request_uri().unwrap_or_default().into_owned();
        let uri =
            Uri::parse(&ruri).map_err(|_| Reject::Malformed(crate::sip::ParseError::RequestUri))?;
        Ok(route::destination_of(&uri, None))
    }

    /// Forwards the request to each branch its clearance names (parallel forking); an empty
    /// Request-URI keeps the request's.
    pub(super) fn relay(
        &mut self,
        id: TxId,
        msg: Message,
        flow: Flow,
        loop_hash: u32,
        clearance: Clearance,
        now: Instant,
    ) -> Result<(), Reject> {
        let record_route = clearance.record_route(msg.method());
        tracing::trace!(on_behalf_of = clearance.identity(), "relay");
        if let Some(ctx) = self.fwd.context_mut(id) {
            ctx.cleared = clearance.destinations();
        }
        let targets = clearance.into_branches();
        let method = msg.method().unwrap_or(Method::Other);
        if method == Method::Invite {
            self.send_trying(id, now);
        }
        let last = targets.len().saturating_sub(1);
        let mut msg = Some(msg);
        for (n, target) in targets.into_iter().enumerate() {
            let Target { ruri, dest, peer } = target;
            // The last branch takes the message itself; the others a copy.
            let mut branch_msg =
                if n == last { msg.take() } else { msg.clone() }.ok_or(Reject::NotFound)?;
            if !ruri.is_empty() {
                branch_msg.set_request_uri(&ruri);
            }
            if let Some(peer) = peer {
                self.add_peer_route(&mut branch_msg, &peer)?;
            }
            let prepared = Prepared {
                msg: branch_msg,
                flow,
                record_route,
                loop_hash,
                origin: dest.clone(),
            };
            match dest.query() {
                // A host name: DNS first (RFC 3263), off the loop.
                Some(query) => self.locate(id, prepared, query),
                None => self.start_branch(id, prepared, dest, None, now),
            }
        }
        Ok(())
    }

    /// Sends one branch of server transaction `id` to `dest` (an address or a flow).
    /// `located` is `Some` when DNS gave `dest`, with the addresses after it to fail over to
    /// (RFC 3263 section 4.3); `None` for a literal next hop.
    pub(super) fn start_branch(
        &mut self,
        id: TxId,
        prepared: Prepared,
        dest: Destination,
        located: Option<VecDeque<Destination>>,
        now: Instant,
    ) {
        let located_branch = located.is_some();
        let address = located
            .as_ref()
            .and_then(|_| super::locate::dead_key(&dest));
        let retry = located.filter(|rest| !rest.is_empty()).map(|rest| {
            Box::new(Retry {
                prepared: prepared.clone(),
                rest,
            })
        });
        let Prepared {
            msg: mut branch_msg,
            flow,
            record_route,
            loop_hash,
            origin,
        } = prepared;
        if !self.cleared_for(id, &origin, &dest, located_branch) {
            // A bug, never an input: the request would go where no clearance names. It is
            // not sent; the branch is answered as unreachable, and counted.
            self.authorization_violations += 1;
            debug_assert!(false, "a branch to {dest:?} that no clearance names");
            tracing::error!(?dest, "refused to relay a branch no clearance names (bug)");
            let open = self
                .fwd
                .context(id)
                .filter(|c| !c.final_sent && c.branches.is_empty());
            if let Some(request) = open.map(|c| c.request.clone()) {
                self.reply(id, &request, Reject::Internal, now);
            }
            return;
        }
        let method = branch_msg.method().unwrap_or(Method::Other);
        if record_route {
            self.add_record_route(&mut branch_msg, &flow, &dest);
        }
        let hidden_vias = self.hides_towards(&flow, &dest);
        if hidden_vias {
            self.hide_request(&mut branch_msg, &dest);
        }
        let branch = self.fwd.next_branch(&format!("{loop_hash:08x}"));
        self.add_via_and_forwarding_headers(&mut branch_msg, &dest, &branch);
        let reliable = dest.transport().is_reliable();
        let bytes = branch_msg.serialize();
        let client = self
            .txl
            .start_client(bytes, method, &branch, dest, reliable, now);
        if retry.is_some() {
            self.lookups.watch(now + self.cfg.failover, client);
        }
        self.fwd.add_branch(
            id,
            Branch {
                client,
                done: false,
                cancel_pending: false,
                provisional: false,
                heard: false,
                located: address,
                hidden_vias,
                retry,
            },
        );
        self.stats.forwarded += 1;
    }

    /// The authorisation invariant for one branch of server transaction `id`: it stems from a
    /// destination the consumed clearance names (`origin`), and goes there — or, for a name,
    /// to an address DNS gave for it (`located`).
    fn cleared_for(
        &self,
        id: TxId,
        origin: &Destination,
        dest: &Destination,
        located: bool,
    ) -> bool {
        let Some(ctx) = self.fwd.context(id) else {
            return false;
        };
        ctx.cleared.contains(origin)
            && (origin == dest || (located && matches!(origin, Destination::Name { .. })))
    }

    /// Names the gateway holding a binding's flow, and the flow, in a Route entry signed for
    /// this request ([`admission::PeerFlow`]): that gateway sends the request on the flow.
    fn add_peer_route(&self, msg: &mut Message, peer: &PeerHop) -> Result<(), Reject> {
        let token = admission::flow_token(&peer.flow).ok_or(Reject::NotFound)?;
        let mac = admission::flow_mac(
            &self.mac_key,
            &msg.call_id(),
            msg.tag(HeaderName::From).as_deref().unwrap_or(""),
            &token,
        );
        let pos = msg.position_of(HeaderName::Route).unwrap_or(0);
        msg.insert(
            pos,
            HeaderName::Route,
            format!("<{};lr;gf={token};gm={mac}>", peer.uri),
        );
        Ok(())
    }

    /// A request another gateway of the cluster sent for a flow this one holds: the first
    /// Route entry names this gateway with a flow token (`gf`); its MAC must verify, and it
    /// leaves the route set. `None` when the request has no such entry.
    pub(super) fn peer_route(&mut self, msg: &mut Message) -> Result<Option<PeerFlow>, Reject> {
        // Runs for every request with a Route (in-dialog ones too): the first entry only, and
        // parsed only when it names a flow; Route pre-processing reads the rest.
        let Some(field) = msg.value_of(HeaderName::Route) else {
            return Ok(None);
        };
        let Some(first) = split_list(&field).next().filter(|e| e.contains(";gf=")) else {
            return Ok(None);
        };
        let first = first.to_owned();
        drop(field);
        let bad_route = || Reject::Malformed(crate::sip::ParseError::Malformed(HeaderName::Route));
        let na = NameAddr::parse(&first).ok_or_else(bad_route)?;
        let uri = Uri::parse(na.uri).map_err(|_| bad_route())?;
        let Some(token) = uri.param("gf") else {
            return Ok(None);
        };
        if !self.router.is_local_hostport(&uri) {
            return Ok(None);
        }
        let mac = uri.param("gm").unwrap_or_default();
        let peer = PeerFlow::verify(&self.mac_key, msg, token, mac).ok_or(Reject::Forbidden(
            "Forbidden (peer route not signed by this cluster)",
        ))?;
        self.remove_route_element(msg, 0);
        Ok(Some(peer))
    }

    /// 100 Trying for a server INVITE transaction, built from the stored request by
    /// reference (no copy of the message per INVITE).
    pub(super) fn send_trying(&mut self, id: TxId, now: Instant) {
        let trying = self
            .fwd
            .context(id)
            .map(|c| build_response(&c.request, 100, "Trying", None, &[]));
        if let Some(trying) = trying {
            self.respond(id, 100, trying, now);
        }
    }

    pub(super) fn add_via_and_forwarding_headers(
        &self,
        msg: &mut Message,
        dest: &Destination,
        branch: &str,
    ) {
        let local = self.router.local_for(dest);
        let via = format!(
            "SIP/2.0/{} {}:{};branch={branch}",
            local.transport.via_token(),
            local.host,
            local.port
        );
        match msg.position_of(HeaderName::MaxForwards) {
            Some(idx) => {
                let mf = msg.max_forwards().unwrap_or(70).saturating_sub(1);
                msg.replace_value(idx, mf.to_string());
            }
            None => msg.push(HeaderName::MaxForwards, "70".into()),
        }
        msg.insert(0, HeaderName::Via, via);
    }

    /// Adds our Record-Route entry, or two when the request changes transport or address
    /// family (the outbound-facing entry on top), each a capability for the callee's
    /// requests towards the caller ([`SignedDialog`]): the caller's side's next hop — the
    /// proxy that record-routed before us, else the caller's Contact — sealed in `gd`, signed
    /// with the dialog MAC in `gh`.
    pub(super) fn add_record_route(&self, msg: &mut Message, flow: &Flow, dest: &Destination) {
        let inbound = self.router.local_for_flow(flow);
        let outbound = self.router.local_for(dest);
        let hop = msg
            .list_values(HeaderName::RecordRoute)
            .into_iter()
            .next()
            .or_else(|| msg.value_of(HeaderName::Contact).map(|c| c.into_owned()))
            .and_then(|v| NameAddr::parse(&v).map(|na| na.uri.to_owned()))
            .unwrap_or_default();
        let token = admission::hop_token(&self.topology, &hop, None, self.cfg.hide_topology);
        let mac = admission::dialog_mac(
            &self.mac_key,
            &msg.call_id(),
            msg.tag(HeaderName::From).as_deref().unwrap_or(""),
            &token,
        );
        let pos = msg.position_of(HeaderName::RecordRoute).unwrap_or(0);
        msg.insert(
            pos,
            HeaderName::RecordRoute,
            rr_value(inbound, &mac, &token),
        );
        if outbound != inbound {
            msg.insert(
                pos,
                HeaderName::RecordRoute,
                rr_value(outbound, &mac, &token),
            );
        }
    }

    /// Re-signs our Record-Route entries in a dialog-creating answer (the caller's route set)
    /// for the caller's requests towards the callee: the callee's side's next hop — the
    /// nearest proxy above us that record-routed, else the answer's Contact — and the callee's
    /// tag. Our entries are the ones we wrote (`...;lr;gh=MAC;gd=TOKEN>`): only the two last
    /// parameters change.
    /// False when the answer has no entry of ours (nothing record-routed here).
    pub(super) fn resign_record_route(&self, resp: &mut Message) -> bool {
        let Some(callee_tag) = resp.tag(HeaderName::To) else {
            return false;
        };
        let entries = resp.list_values(HeaderName::RecordRoute);
        let Some(first_ours) = entries.iter().position(|e| self.is_own_rr(e)) else {
            return false;
        };
        let hop = entries[..first_ours]
            .last()
            .cloned()
            .or_else(|| resp.value_of(HeaderName::Contact).map(|c| c.into_owned()))
            .and_then(|v| NameAddr::parse(&v).map(|na| na.uri.to_owned()))
            .unwrap_or_default();
        let token = admission::hop_token(
            &self.topology,
            &hop,
            Some(&callee_tag),
            self.cfg.hide_topology,
        );
        let caller_tag = resp.tag(HeaderName::From).unwrap_or_default();
        let mac = admission::dialog_mac(&self.mac_key, &resp.call_id(), &caller_tag, &token);
        let fields: Vec<usize> = resp
            .fields(HeaderName::RecordRoute)
            .map(|(i, _)| i)
            .collect();
        for idx in fields {
            let value = resp.value(idx).into_owned();
            let items: Vec<String> = split_list(&value)
                .map(|e| match e.find(";gh=") {
                    Some(at) if self.is_own_rr(e) => {
                        format!("{};gh={mac};gd={token}>", &e[..at])
                    }
                    _ => e.to_owned(),
                })
                .collect();
            let joined = items.join(", ");
            if joined != value {
                resp.replace_value(idx, joined);
            }
        }
        true
    }

    /// A Record-Route entry this gateway (or its cluster) wrote: one of our addresses with a
    /// `gh` parameter.
    fn is_own_rr(&self, entry: &str) -> bool {
        NameAddr::parse(entry)
            .and_then(|na| {
                Uri::parse(na.uri)
                    .ok()
                    .map(|u| (u.param("gh").is_some(), u))
            })
            .is_some_and(|(signed, u)| signed && self.router.is_local_hostport(&u))
    }

    // ===== responses =====

    pub(super) fn handle_response(&mut self, mut msg: Message, now: Instant) {
        let Some(client) = self.txl.on_response(&msg, now) else {
            self.stats.stray_responses += 1;
            return;
        };
        let status = msg.status().unwrap_or(500);
        let server = self.fwd.server_of(client);
        let ctx = server.and_then(|s| self.fwd.context(s));
        let hidden_vias = ctx.is_some_and(|c| {
            c.branches
                .iter()
                .any(|b| b.client == client && b.hidden_vias)
        });
        // 16.7 item 3: remove our Via (and put back the inside's, when they were hidden).
        let more = remove_top_via(&mut msg);
        if hidden_vias {
            if let Some(c) = ctx {
                Self::restore_vias(&c.request, &mut msg);
            }
        } else if !more {
            return;
        }
        let Some(server) = server else {
            // Context gone (only 2xx retransmissions can get here): forward statelessly,
            // re-signed as the first one was (the caller may take its route set from this one).
            if (200..300).contains(&status) {
                self.resign_record_route(&mut msg);
                if let Some(clean) = crate::tunnel::sdp::strip_psk(msg.body()) {
                    msg.set_body(clean.into());
                }
                if let Some(dest) = via_destination(&msg) {
                    if self.cfg.hide_topology && !self.dest_inside(&dest) {
                        let inbound = self.router.local_for(&dest).clone();
                        self.hide_response(&inbound, &mut msg);
                    }
                    self.txl.send_stateless(dest, msg.serialize());
                }
            }
            return;
        };
        if status == 100 {
            // Not relayed (16.7 item 4), but the next hop is alive.
            if let Some(b) = self.fwd.branch_mut(server, client) {
                b.heard = true;
                if let Some(addr) = b.located {
                    self.lookups.dead.revive(&addr);
                }
            }
            return;
        }
        self.tunnel_response(server, client, status, &mut msg, now);
        let creates_dialog = self.fwd.context(server).is_some_and(|c| {
            matches!(
                c.request.method(),
                Some(Method::Invite | Method::Subscribe | Method::Refer | Method::Notify)
            )
        });
        if creates_dialog && (101..300).contains(&status) && self.resign_record_route(&mut msg) {
            let tunnel = self.fwd.context(server).is_some_and(|c| c.tunnel.is_some());
            if let Some(callee_tag) = msg.tag(HeaderName::To) {
                let caller_tag = msg.tag(HeaderName::From).unwrap_or_default();
                let call_id = msg.call_id().into_owned();
                self.dialogs.answered(
                    &call_id,
                    &caller_tag,
                    &callee_tag,
                    status >= 200,
                    tunnel,
                    now,
                );
            }
        }
        if let Some(to) = self.txl.server_flow(server) {
            if self.hides_response_to(&to) {
                let inbound = self.router.local_for_flow(&to).clone();
                self.hide_response(&inbound, &mut msg);
            }
        }
        self.on_branch_response(server, client, status, msg, now);
    }

    pub(super) fn on_branch_response(
        &mut self,
        server: TxId,
        client: TxId,
        status: u16,
        mut resp: Message,
        now: Instant,
    ) {
        let mut cancel_now = Vec::new();
        let Some(ctx) = self.fwd.context_mut(server) else {
            return;
        };
        let Some(branch) = ctx.branches.iter_mut().find(|b| b.client == client) else {
            return;
        };
        branch.heard = true;
        if let Some(addr) = branch.located {
            self.lookups.dead.revive(&addr);
        }
        if status < 200 {
            branch.provisional = true;
            if branch.cancel_pending {
                branch.cancel_pending = false;
                cancel_now.push(client);
            }
            if !ctx.final_sent {
                self.respond(server, status, resp.serialize(), now);
            }
        } else if status < 300 {
            branch.done = true;
            // 2xx are forwarded at once, every one of them (16.7 item 5).
            ctx.final_sent = true;
            if ctx.invite {
                cancel_now.extend(
                    ctx.branches
                        .iter()
                        .filter(|b| !b.done && b.client != client)
                        .map(|b| b.client),
                );
            }
            if let Some((name, value)) = &ctx.auth_info {
                resp.insert_named(usize::MAX, HeaderName::Other, name, value.clone());
            }
            self.respond(server, status, resp.serialize(), now);
        } else {
            branch.done = true;
            if status >= 600 && ctx.invite {
                cancel_now.extend(ctx.branches.iter().filter(|b| !b.done).map(|b| b.client));
            }
            self.offer_final(server, status, resp, now);
        }
        for tx in cancel_now {
            self.send_cancel(tx, now);
        }
    }

    /// A final non-2xx response of a branch: kept when it is the best so far (16.7 item 6),
    /// sent when no branch is left.
    pub(super) fn offer_final(&mut self, server: TxId, status: u16, resp: Message, now: Instant) {
        let Some(ctx) = self.fwd.context_mut(server) else {
            return;
        };
        let better = match &ctx.best {
            None => true,
            Some((best, _)) => response_rank(status) < response_rank(*best),
        };
        if better {
            ctx.best = Some((status, resp));
        }
        self.maybe_send_best(server, now);
    }

    /// Sends the best final response once every branch is done (16.7 item 6).
    pub(super) fn maybe_send_best(&mut self, server: TxId, now: Instant) {
        let Some(ctx) = self.fwd.context_mut(server) else {
            return;
        };
        if ctx.final_sent || ctx.resolving > 0 || ctx.branches.iter().any(|b| !b.done) {
            return;
        }
        if let Some((status, mut resp)) = ctx.best.take() {
            ctx.final_sent = true;
            if let Some(t) = &ctx.tunnel {
                self.tunnels.remove(&t.call_id, &t.caller_tag);
            }
            if ctx.invite {
                // The call failed: its early dialogs are over.
                let call_id = ctx.request.call_id().into_owned();
                let caller_tag = ctx.request.tag(HeaderName::From).unwrap_or_default();
                self.dialogs.failed(&call_id, &caller_tag);
            }
            if let Some((name, value)) = &ctx.auth_info {
                resp.insert_named(usize::MAX, HeaderName::Other, name, value.clone());
            }
            self.respond(server, status, resp.serialize(), now);
        }
    }

    /// A branch ended without a response (timeout, unreachable): behave as if `reject`'s
    /// response had arrived from it.
    pub(super) fn branch_failed(&mut self, client: TxId, reject: Reject, now: Instant) {
        let Some(server) = self.fwd.server_of(client) else {
            return;
        };
        let Some(ctx) = self.fwd.context(server) else {
            return;
        };
        if ctx.branches.iter().any(|b| b.client == client && b.done) {
            return;
        }
        if matches!(reject, Reject::Timeout | Reject::Unreachable) {
            self.note_dead(server, client, now);
            if self.fail_over(server, client, now) {
                return;
            }
        }
        if let Some((code, resp)) = self.synthesised(server, &reject) {
            self.on_branch_response(server, client, code, resp, now);
        }
    }

    /// The response a branch of `server` that ended without one stands for: `reject`'s, to
    /// the forwarded request (16.9: a transport error as 503, a timeout as 408).
    pub(super) fn synthesised(&mut self, server: TxId, reject: &Reject) -> Option<(u16, Message)> {
        let request = self.fwd.context(server)?.request.clone();
        let (code, reason, _) = reject.response();
        let tag = self.new_tag();
        let bytes = build_response(&request, code, reason, Some(&tag), &[]);
        Message::parse(bytes, &self.cfg.limits)
            .ok()
            .map(|resp| (code, resp))
    }
}

fn rr_value(local: &LocalAddr, mac: &str, token: &str) -> String {
    let transport = match local.transport.uri_param() {
        Some(t) => format!(";transport={t}"),
        None => String::new(),
    };
    format!(
        "<sip:{}:{}{transport};lr;gh={mac};gd={token}>",
        local.host, local.port
    )
}

/// Ranking for best-response selection: 6xx first, then the lowest class (16.7 item 6).
fn response_rank(status: u16) -> u16 {
    match status {
        600..=699 => 0,
        s => s,
    }
}

/// Removes the topmost Via value; false when no Via remains (the response was for us).
fn remove_top_via(msg: &mut Message) -> bool {
    let Some((idx, _)) = msg.fields(HeaderName::Via).next() else {
        return false;
    };
    let value = msg.value(idx).into_owned();
    let rest: Vec<&str> = split_list(&value).skip(1).collect();
    if rest.is_empty() {
        msg.remove(idx);
    } else {
        msg.replace_value(idx, rest.join(", "));
    }
    msg.position_of(HeaderName::Via).is_some()
}

/// Destination of a response from its top Via (18.2.2), for stateless forwarding.
fn via_destination(msg: &Message) -> Option<Destination> {
    let top = msg.top_via_value()?;
    let via = Via::parse(&top)?;
    let transport = Transport::from_token(via.transport)?;
    let port = via.param("rport").and_then(|p| p.parse().ok()).or(via.port);
    let ip = via
        .param("received")
        .and_then(crate::sip::uri::host_ip)
        .or_else(|| crate::sip::uri::host_ip(via.host));
    Some(match ip {
        Some(ip) => Destination::Addr {
            transport,
            addr: SocketAddr::new(ip, port.unwrap_or(transport.default_port())),
            server_name: None,
        },
        // RFC 3263 section 5: the sent-by's addresses, or its SRV records without a port.
        None => Destination::Name {
            host: via.host.into(),
            port,
            transport: Some(transport),
            secure: false,
        },
    })
}

// Tests start their clock somewhere real; the code under test only takes `now` as input.
#[allow(clippy::disallowed_methods)]
#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> Context {
        let req = Message::parse(
            bytes::Bytes::from_static(
                b"OPTIONS sip:a@x SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
From: <sip:b@x>;tag=1\r\nTo: <sip:a@x>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            ),
            &crate::sip::Limits::default(),
        )
        .unwrap();
        Context {
            request: req,
            invite: false,
            branches: Vec::new(),
            best: None,
            final_sent: false,
            cancelled: false,
            auth_info: None,
            tunnel: None,
            started: Instant::now(),
            latency_recorded: false,
            resolving: 0,
            cleared: Vec::new(),
        }
    }

    fn branch(client: TxId) -> Branch {
        Branch {
            client,
            done: false,
            cancel_pending: false,
            provisional: false,
            heard: false,
            located: None,
            hidden_vias: false,
            retry: None,
        }
    }

    #[test]
    fn branches_map_to_their_context_until_forgotten() {
        let mut f = Forwarding::new(7);
        f.add_branch(1, branch(10));
        assert_eq!(f.server_of(10), None, "no context: no branch");
        f.open(1, context());
        f.add_branch(1, branch(10));
        f.add_branch(1, branch(11));
        assert_eq!((f.server_of(10), f.server_of(11)), (Some(1), Some(1)));
        assert_eq!(f.context(1).map(|c| c.branches.len()), Some(2));
        f.forget_branch(10);
        assert_eq!(f.server_of(10), None);
        f.close(1);
        assert!(f.context(1).is_none());
        f.shrink();
    }

    #[test]
    fn branch_ids_are_rfc_3261_unique_and_stateless_ones_repeat() {
        let mut f = Forwarding::new(0xabc);
        let a = f.next_branch("0000002a");
        let b = f.next_branch("0000002a");
        assert!(a.starts_with("z9hG4bK") && a.ends_with(".0000002a"), "{a}");
        assert_ne!(a, b);
        let s1 = f.stateless_branch("z9hG4bKin");
        assert_eq!(
            s1,
            f.stateless_branch("z9hG4bKin"),
            "a retransmission keeps its ID"
        );
        assert_ne!(s1, f.stateless_branch("z9hG4bKother"));
        assert!(s1.starts_with("z9hG4bK"));
    }
}
