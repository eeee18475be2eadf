//! The registrar for internal endpoints (the To side of tunnels): REGISTER authenticated
//! with the 401 SASL flow, the identity must own the To AOR, bindings AOR -> Contact through
//! the flow the REGISTER came on, with expiry, persisted in the store so that they survive a
//! restart (RFC 3261 section 10.3, with the flow kept as RFC 5626 would).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::ops::Bound;
use std::time::{Duration, Instant, SystemTime};

use super::auth::{aor_key, header_aor, may_present};
use super::persist::{BindingRecord, StoreWrite};
use super::{Proxy, Reject};
use crate::config::RegistrarSettings;
use crate::flow::{Destination, Flow, Transport};
use crate::sip::{build_response, HeaderName, Message, NameAddr};
use crate::transaction::TxId;
use gatehouse_auth::Authenticated;

/// One live binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub contact: String,
    pub transport: Transport,
    /// Where the REGISTER came from: requests for the AOR go there (NAT-safe).
    pub remote: SocketAddr,
    pub expires: Instant,
    /// RFC 5627 `+sip.instance` of the Contact: the same device across reconnections.
    pub instance: Option<String>,
    /// RFC 5626 `reg-id`: which of the instance's flows this is.
    pub reg_id: Option<u32>,
    /// The `[cluster] peer_uri` of the gateway holding the flow when it is another one: requests
    /// for the binding go through that gateway (RFC 5626 edge proxy). `None`: this gateway
    /// holds it (or the binding is reached directly).
    pub holder: Option<Box<str>>,
    /// When this gateway last accepted a REGISTER for it (a reload from the shared store does
    /// not drop a binding refreshed here moments ago: its write may not have landed yet).
    pub refreshed: Option<Instant>,
}

impl Binding {
    /// The flow, as the gateway holding it sends on it.
    pub fn destination(&self) -> Destination {
        Destination::Addr {
            transport: self.transport,
            addr: self.remote,
            server_name: None,
        }
    }
}

/// How long a binding refreshed here survives a reload from the shared store that does not
/// show it yet (its own write is under way).
const FRESH: Duration = Duration::from_secs(5);

/// Live bindings by AOR key (`sip:user@host`), with an expiry index so that expired bindings
/// leave in order (bounded work per tick) and a running count: no operation scans the table.
#[derive(Debug, Default)]
pub struct Bindings {
    /// Ordered by AOR: the admin listing pages from a cursor.
    by_aor: BTreeMap<String, Vec<Binding>>,
    /// (expiry, AOR, contact) of every binding, earliest first.
    expiry: BTreeSet<(Instant, String, String)>,
    total: usize,
}

/// What [`Bindings::upsert`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Upsert {
    /// Stored; these older contacts of the same instance (RFC 5627 `+sip.instance`, with the
    /// same RFC 5626 `reg-id`) were replaced by it and must be removed from the store too.
    Stored { replaced: Vec<String> },
    /// The AOR already has `max` bindings: nothing changed.
    Full,
}

impl Bindings {
    /// Live bindings of an AOR, most recently refreshed first.
    pub fn live(&self, aor: &str, now: Instant) -> Vec<Binding> {
        self.by_aor.get(aor).map_or_else(Vec::new, |list| {
            list.iter().filter(|b| b.expires > now).cloned().collect()
        })
    }

    /// Bindings held (live, or expired and not yet swept).
    pub fn count(&self) -> usize {
        self.total
    }

    /// Adds or refreshes a binding. A binding with the contact of an existing one refreshes
    /// it; one that names an instance (and reg-id) already bound from another contact replaces
    /// that binding — the endpoint reconnected, its old flow is dead (RFC 5626 section 6).
    pub fn upsert(&mut self, aor: &str, b: Binding, max: usize) -> Upsert {
        let list = self.by_aor.entry(aor.to_owned()).or_default();
        let same_instance =
            |x: &Binding| b.instance.is_some() && x.instance == b.instance && x.reg_id == b.reg_id;
        let replaced: Vec<Binding> = if b.instance.is_some() {
            let (gone, kept) = std::mem::take(list)
                .into_iter()
                .partition(|x| x.contact != b.contact && same_instance(x));
            *list = kept;
            gone
        } else {
            Vec::new()
        };
        for g in &replaced {
            self.expiry
                .remove(&(g.expires, aor.to_owned(), g.contact.clone()));
        }
        self.total -= replaced.len();
        if let Some(existing) = list.iter_mut().find(|x| x.contact == b.contact) {
            self.expiry
                .remove(&(existing.expires, aor.to_owned(), existing.contact.clone()));
            self.expiry
                .insert((b.expires, aor.to_owned(), b.contact.clone()));
            *existing = b;
        } else {
            if list.len() >= max {
                // Nothing replaced can be lost here: a replaced binding freed its place.
                return Upsert::Full;
            }
            self.expiry
                .insert((b.expires, aor.to_owned(), b.contact.clone()));
            list.push(b);
            self.total += 1;
        }
        list.sort_by_key(|b| std::cmp::Reverse(b.expires));
        Upsert::Stored {
            replaced: replaced.into_iter().map(|g| g.contact).collect(),
        }
    }

    /// Removes one binding, returning it.
    pub fn remove(&mut self, aor: &str, contact: &str) -> Option<Binding> {
        let list = self.by_aor.get_mut(aor)?;
        let i = list.iter().position(|b| b.contact == contact)?;
        let b = list.remove(i);
        if list.is_empty() {
            self.by_aor.remove(aor);
        }
        self.expiry
            .remove(&(b.expires, aor.to_owned(), b.contact.clone()));
        self.total -= 1;
        Some(b)
    }

    /// The AORs held, in order (a resynchronisation compares them with the store's).
    pub fn aors(&self) -> impl Iterator<Item = &String> {
        self.by_aor.keys()
    }

    /// The live bindings of at most `limit` AORs after the AOR `after` (from the start when
    /// `None`), ordered by AOR, and the cursor of the next page when there is more:
    /// O(log n + limit).
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        now: Instant,
    ) -> (Vec<(String, Binding)>, Option<String>) {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = self
            .by_aor
            .range::<str, _>((start, Bound::Unbounded))
            .peekable();
        let mut out = Vec::new();
        let mut last = None;
        for (aor, list) in it.by_ref().take(limit) {
            out.extend(
                list.iter()
                    .filter(|b| b.expires > now)
                    .map(|b| (aor.clone(), b.clone())),
            );
            last = Some(aor);
        }
        let next = match (it.peek(), last) {
            (Some(_), Some(last)) => Some(last.clone()),
            _ => None,
        };
        (out, next)
    }

    /// Removes every binding of an AOR, returning them.
    pub fn clear(&mut self, aor: &str) -> Vec<Binding> {
        let gone = self.by_aor.remove(aor).unwrap_or_default();
        for b in &gone {
            self.expiry
                .remove(&(b.expires, aor.to_owned(), b.contact.clone()));
        }
        self.total -= gone.len();
        gone
    }

    /// Removes at most `limit` bindings expired at `now`, earliest first; returns them with
    /// their AOR so that the store forgets them too.
    pub fn sweep(&mut self, now: Instant, limit: usize) -> Vec<(String, Binding)> {
        let mut gone = Vec::new();
        while gone.len() < limit {
            let Some((at, aor, contact)) = self.expiry.first().cloned() else {
                break;
            };
            if at > now {
                break;
            }
            if let Some(b) = self.remove(&aor, &contact) {
                gone.push((aor, b));
            }
        }
        gone
    }
}

/// Maps the core's monotonic clock to wall-clock seconds for persistence.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    pub instant: Instant,
    pub system: SystemTime,
}

impl WallClock {
    pub fn unix(&self, at: Instant) -> u64 {
        let base = self
            .system
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match at.checked_duration_since(self.instant) {
            Some(d) => base + d.as_secs(),
            None => base.saturating_sub(self.instant.duration_since(at).as_secs()),
        }
    }

    pub fn instant(&self, unix: u64) -> Instant {
        let base = self
            .system
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if unix >= base {
            self.instant + Duration::from_secs(unix - base)
        } else {
            self.instant
                .checked_sub(Duration::from_secs(base - unix))
                .unwrap_or(self.instant)
        }
    }
}

/// One Contact of a REGISTER, validated.
#[derive(Debug)]
struct ContactChange {
    contact: String,
    /// 0 removes the binding.
    expires: u32,
    instance: Option<String>,
    reg_id: Option<u32>,
}

/// The registrar owner: the bindings and the rules of RFC 3261 section 10.3 that change them.
/// Every change to persistent state is appended to the `writes` the caller passes.
#[derive(Debug)]
pub struct Registrar {
    bindings: Bindings,
    settings: RegistrarSettings,
    clock: WallClock,
    /// This gateway's `[cluster] peer_uri`, stored with the bindings it holds.
    own: Option<String>,
    /// The peer URIs of the gateways connected to the shared store; `None` when unknown
    /// (one gateway alone): every holder counts as live.
    peers: Option<HashSet<String>>,
}

impl Registrar {
    /// A registrar holding the persisted bindings of the start snapshot; `own` is this
    /// gateway's `[cluster] peer_uri`.
    pub fn new(
        settings: RegistrarSettings,
        clock: WallClock,
        records: Vec<BindingRecord>,
        own: Option<String>,
    ) -> Self {
        let mut r = Registrar {
            bindings: Bindings::default(),
            settings,
            clock,
            own,
            peers: None,
        };
        for rec in records {
            r.load(rec);
        }
        tracing::info!(bindings = r.bindings.count(), "registrar bindings loaded");
        r
    }

    /// Takes a stored binding in, without a write.
    fn load(&mut self, rec: BindingRecord) {
        let (Some(transport), Ok(remote)) =
            (Transport::from_token(&rec.transport), rec.remote.parse())
        else {
            return;
        };
        let holder = rec
            .holder
            .filter(|h| Some(h) != self.own.as_ref())
            .map(String::into_boxed_str);
        let b = Binding {
            contact: rec.contact,
            transport,
            remote,
            expires: self.clock.instant(rec.expires_at),
            instance: rec.instance,
            reg_id: rec.reg_id,
            holder,
            refreshed: None,
        };
        // The store holds what the registrars accepted: over the limit only when the limit
        // was lowered since, and then the surplus is simply not loaded.
        let _ = self
            .bindings
            .upsert(&rec.aor, b, self.settings.max_bindings_per_aor);
    }

    /// The bindings of `aor` as the shared store holds them now (another gateway changed
    /// them): they replace the AOR's, except a binding this gateway refreshed less than
    /// [`FRESH`] ago (its write may not have landed when the store was read).
    pub fn replace(&mut self, aor: &str, records: Vec<BindingRecord>, now: Instant) {
        let kept: Vec<Binding> = self
            .bindings
            .clear(aor)
            .into_iter()
            .filter(|b| b.refreshed.is_some_and(|at| now < at + FRESH))
            .collect();
        for rec in records {
            self.load(rec);
        }
        for b in kept {
            let _ = self
                .bindings
                .upsert(aor, b, self.settings.max_bindings_per_aor);
        }
    }

    /// Every binding the shared store holds, by AOR (after the listener reconnected): AORs
    /// it no longer has are cleared, the others replaced ([`Registrar::replace`]). One pass
    /// over the registrations, after a reconnection only.
    pub fn replace_all(&mut self, mut stored: BTreeMap<String, Vec<BindingRecord>>, now: Instant) {
        let held: Vec<String> = self.bindings.aors().cloned().collect();
        for aor in held {
            let records = stored.remove(&aor).unwrap_or_default();
            self.replace(&aor, records, now);
        }
        for (aor, records) in stored {
            self.replace(&aor, records, now);
        }
    }

    /// The gateways connected to the shared store now.
    pub fn set_peers(&mut self, peers: HashSet<String>) {
        self.peers = Some(peers);
    }

    /// Whether the gateway holding `b` (if another) is connected to the shared store.
    fn holder_live(&self, b: &Binding) -> bool {
        match (&b.holder, &self.peers) {
            (Some(h), Some(peers)) => peers.contains(&**h),
            _ => true,
        }
    }

    /// The bindings a request for `aor` goes to: one flow per device (RFC 5626 section
    /// 5.2: of an instance's flows, the one through this gateway, else the most recent one
    /// through a live gateway, else the most recent), and every binding without an instance
    /// except those through a gateway that is gone (unless nothing else is left).
    pub fn targets(&self, aor: &str, now: Instant) -> Vec<Binding> {
        let live = self.bindings.live(aor, now);
        // Indices into `live` of the chosen bindings (nothing cloned twice).
        let mut chosen: Vec<usize> = Vec::with_capacity(live.len());
        let mut instances: Vec<&str> = Vec::new();
        for (n, b) in live.iter().enumerate() {
            match b.instance.as_deref() {
                None => {
                    if self.holder_live(b) {
                        chosen.push(n);
                    }
                }
                Some(i) if !instances.contains(&i) => {
                    instances.push(i);
                    let flows = || {
                        live.iter()
                            .enumerate()
                            .filter(|(_, x)| x.instance.as_deref() == Some(i))
                    };
                    let pick = flows()
                        .find(|(_, x)| x.holder.is_none())
                        .or_else(|| flows().find(|(_, x)| self.holder_live(x)))
                        .map_or(n, |(k, _)| k);
                    chosen.push(pick);
                }
                Some(_) => {}
            }
        }
        if chosen.is_empty() {
            // Only bindings through gone gateways: try them rather than refuse.
            return live;
        }
        live.into_iter()
            .enumerate()
            .filter(|(n, _)| chosen.contains(n))
            .map(|(_, b)| b)
            .collect()
    }

    /// New limits (reload): bindings already held keep their expiry.
    pub fn set_settings(&mut self, settings: RegistrarSettings) {
        self.settings = settings;
    }

    /// Bindings held.
    pub fn count(&self) -> usize {
        self.bindings.count()
    }

    /// Live bindings of an AOR key, most recently refreshed first.
    pub fn live(&self, aor: &str, now: Instant) -> Vec<Binding> {
        self.bindings.live(aor, now)
    }

    /// A page of live bindings ([`Bindings::page`]).
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        now: Instant,
    ) -> (Vec<(String, Binding)>, Option<String>) {
        self.bindings.page(after, limit, now)
    }

    /// Removes every binding of an AOR; returns how many went.
    pub fn clear(&mut self, aor: &str, writes: &mut Vec<StoreWrite>) -> usize {
        let gone = self.bindings.clear(aor);
        let n = gone.len();
        for b in gone {
            writes.push(StoreWrite::RemoveBinding {
                aor: aor.to_owned(),
                contact: b.contact,
            });
        }
        n
    }

    /// Forgets bindings that expired (at most `limit` per call), in the store too when this
    /// gateway holds them (another's may have been refreshed meanwhile: its holder removes it).
    pub fn expire(&mut self, now: Instant, limit: usize, writes: &mut Vec<StoreWrite>) {
        for (aor, b) in self.bindings.sweep(now, limit) {
            if b.holder.is_none() {
                writes.push(StoreWrite::RemoveBinding {
                    aor,
                    contact: b.contact,
                });
            }
        }
    }

    /// Applies the Contact list of an authenticated REGISTER for `aor` (RFC 3261 10.3 steps
    /// 6-8): `*` with expiry 0 removes all, `expires=0` removes one, others are added or
    /// refreshed through `flow`. Every Contact is validated before anything changes, so a
    /// refused REGISTER changes nothing. Returns the live bindings with their remaining
    /// seconds for the 200.
    pub fn register(
        &mut self,
        aor: &str,
        msg: &Message,
        flow: &Flow,
        identity: &str,
        now: Instant,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<Vec<(String, u64)>, Reject> {
        let set = self.settings;
        let default_expires = msg
            .value_of(HeaderName::Expires)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(set.default_expires);
        let contacts: Vec<String> = msg.list_values(HeaderName::Contact);
        let bad_contact =
            || Reject::Malformed(crate::sip::ParseError::Malformed(HeaderName::Contact));
        let wildcard = contacts.iter().any(|c| c == "*");
        if wildcard && (contacts.len() != 1 || default_expires != 0) {
            return Err(bad_contact());
        }
        let mut changes = Vec::with_capacity(contacts.len());
        for c in contacts.iter().filter(|c| *c != "*") {
            let na = NameAddr::parse(c).ok_or_else(bad_contact)?;
            crate::sip::Uri::parse(na.uri).map_err(|_| bad_contact())?;
            let expires = na
                .param("expires")
                .map(|e| e.parse::<u32>().map_err(|_| bad_contact()))
                .transpose()?
                .unwrap_or(default_expires);
            if expires != 0 && expires < set.min_expires {
                return Err(Reject::IntervalTooBrief(set.min_expires));
            }
            changes.push(ContactChange {
                contact: na.uri.to_owned(),
                expires: expires.min(set.max_expires),
                instance: na
                    .param("+sip.instance")
                    .map(|s| s.trim_matches('"').to_owned()),
                reg_id: na
                    .param("reg-id")
                    .map(|r| r.parse::<u32>().map_err(|_| bad_contact()))
                    .transpose()?,
            });
        }
        if !self.fits(aor, &changes) {
            return Err(Reject::Forbidden(
                "Forbidden (too many bindings for this AOR)",
            ));
        }
        if wildcard {
            self.clear(aor, writes);
        }
        for ch in changes {
            if ch.expires == 0 {
                self.bindings.remove(aor, &ch.contact);
                writes.push(StoreWrite::RemoveBinding {
                    aor: aor.to_owned(),
                    contact: ch.contact,
                });
                continue;
            }
            let binding = Binding {
                contact: ch.contact,
                transport: flow.transport,
                remote: flow.remote,
                expires: now + Duration::from_secs(ch.expires.into()),
                instance: ch.instance,
                reg_id: ch.reg_id,
                holder: None,
                refreshed: Some(now),
            };
            let record = BindingRecord {
                aor: aor.to_owned(),
                contact: binding.contact.clone(),
                transport: flow.transport.token().to_owned(),
                remote: flow.remote.to_string(),
                expires_at: self.clock.unix(binding.expires),
                instance: binding.instance.clone(),
                identity: identity.to_owned(),
                reg_id: binding.reg_id,
                holder: self.own.clone(),
            };
            // `fits` said there is room: `Full` cannot happen here.
            if let Upsert::Stored { replaced } =
                self.bindings.upsert(aor, binding, set.max_bindings_per_aor)
            {
                for contact in replaced {
                    writes.push(StoreWrite::RemoveBinding {
                        aor: aor.to_owned(),
                        contact,
                    });
                }
            }
            writes.push(StoreWrite::SaveBinding(record));
        }
        Ok(self
            .bindings
            .live(aor, now)
            .into_iter()
            .map(|b| {
                let left = b.expires.saturating_duration_since(now).as_secs();
                (b.contact, left)
            })
            .collect())
    }

    /// True when the AOR has room for every new binding of `changes` (a contact already
    /// bound, or an instance flow already bound, takes no new place; removals free one).
    fn fits(&self, aor: &str, changes: &[ContactChange]) -> bool {
        let held = self.bindings.by_aor.get(aor).map_or(&[][..], Vec::as_slice);
        let mut places: Vec<(&str, Option<&str>, Option<u32>)> = held
            .iter()
            .map(|b| (b.contact.as_str(), b.instance.as_deref(), b.reg_id))
            .collect();
        for ch in changes {
            places.retain(|p| {
                let same_contact = p.0 == ch.contact;
                let same_flow =
                    ch.instance.is_some() && p.1 == ch.instance.as_deref() && p.2 == ch.reg_id;
                !(same_contact || same_flow)
            });
            if ch.expires != 0 {
                places.push((&ch.contact, ch.instance.as_deref(), ch.reg_id));
            }
        }
        places.len() <= self.settings.max_bindings_per_aor
    }
}

impl Proxy {
    /// REGISTER after its SASL exchange (run statelessly by the admit stage): the To AOR must
    /// be of our domains and owned by the identity; the [`Registrar`] applies the Contacts.
    pub(super) fn register(
        &mut self,
        id: TxId,
        msg: Message,
        flow: Flow,
        auth: Authenticated,
        now: Instant,
    ) -> Result<(), Reject> {
        let aor = header_aor(&msg, HeaderName::To).ok_or(Reject::Malformed(
            crate::sip::ParseError::Malformed(HeaderName::To),
        ))?;
        let host = aor.rsplit('@').next().unwrap_or("");
        if !self.router.is_our_domain(host) {
            return Err(Reject::Forbidden(
                "Forbidden (not a domain of this registrar)",
            ));
        }
        if !may_present(&auth, &aor) {
            return Err(Reject::IdentityNotAllowed);
        }
        // An AOR the policy lets receive tunnels gets PSKs: its bindings come from the inside
        // only (unless listed in `tunnels.register_from_outside`), so that credentials used
        // from outside can neither take its tunnels nor break them.
        if !self.is_inside(flow.remote.ip())
            && self.policy.receives_tunnels(&aor)
            && !self.cfg.tunnels.register_from_outside.contains(&aor)
        {
            tracing::warn!(%aor, remote = %flow.remote, identity = auth.identity(), "registration of a tunnel target from outside refused");
            return Err(Reject::Forbidden(
                "Forbidden (this AOR registers from the internal networks only)",
            ));
        }
        let live =
            self.registrar
                .register(&aor, &msg, &flow, auth.identity(), now, &mut self.writes)?;
        // 200 OK lists every current binding with its remaining time.
        let mut extra: Vec<(&str, String)> = live
            .into_iter()
            .map(|(contact, left)| ("Contact", format!("<{contact}>;expires={left}")))
            .collect();
        if let Some(info) = self.auth_info(id) {
            extra.push(info);
        }
        let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let tag = self.new_tag();
        let resp = build_response(&msg, 200, "OK", Some(&tag), &extra);
        self.finish(id, 200, resp, now);
        tracing::info!(%aor, identity = auth.identity(), bindings = self.registrar.count(), "registered");
        Ok(())
    }

    /// A page of live registrations (admin API; see [`Bindings::page`]).
    pub fn registration_page(
        &self,
        after: Option<&str>,
        limit: usize,
        now: Instant,
    ) -> (Vec<(String, Binding)>, Option<String>) {
        self.registrar.page(after, limit, now)
    }

    /// Removes every binding of an AOR (admin API); returns how many went.
    pub fn remove_registration(&mut self, aor: &str) -> usize {
        self.registrar.clear(aor, &mut self.writes)
    }

    /// The bindings a request for a Request-URI's AOR goes to ([`Registrar::targets`]).
    pub(super) fn bindings_for(&self, ruri: &str, now: Instant) -> Vec<Binding> {
        match aor_key(ruri) {
            Some(aor) => self.registrar.targets(&aor, now),
            None => Vec::new(),
        }
    }

    /// Another gateway (or a CLI) changed these bindings in the shared store.
    pub fn stored_bindings(&mut self, aor: &str, records: Vec<BindingRecord>, now: Instant) {
        self.registrar.replace(aor, records, now);
    }

    /// Every stored binding, after the store's listener reconnected.
    pub fn all_stored_bindings(
        &mut self,
        stored: BTreeMap<String, Vec<BindingRecord>>,
        now: Instant,
    ) {
        self.registrar.replace_all(stored, now);
        tracing::info!(
            bindings = self.registrar.count(),
            "registrar bindings resynchronised with the store"
        );
    }

    /// The gateways connected to the shared store now (a binding through one that is gone is
    /// passed over while its device has another flow).
    pub fn set_live_peers(&mut self, peers: HashSet<String>) {
        self.registrar.set_peers(peers);
    }
}

// Tests start their clock somewhere real; the code under test only takes `now` as input.
#[allow(clippy::disallowed_methods)]
#[cfg(test)]
mod tests {
    use super::*;

    fn binding(contact: &str, at: Instant, instance: Option<&str>, reg_id: Option<u32>) -> Binding {
        Binding {
            contact: contact.into(),
            transport: Transport::Udp,
            remote: "192.0.2.1:5060".parse().unwrap(),
            expires: at,
            instance: instance.map(str::to_owned),
            reg_id,
            holder: None,
            refreshed: None,
        }
    }

    #[test]
    fn count_limit_refresh_and_sweep_order() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Bindings::default();
        assert_eq!(
            b.upsert("sip:a@x", binding("sip:1", t0 + s(30), None, None), 2),
            Upsert::Stored { replaced: vec![] }
        );
        b.upsert("sip:a@x", binding("sip:2", t0 + s(10), None, None), 2);
        assert_eq!(
            b.upsert("sip:a@x", binding("sip:3", t0 + s(10), None, None), 2),
            Upsert::Full
        );
        b.upsert("sip:b@x", binding("sip:4", t0 + s(20), None, None), 2);
        assert_eq!(b.count(), 3);
        // A refresh moves the binding in the expiry order; no duplicate is counted.
        b.upsert("sip:a@x", binding("sip:2", t0 + s(40), None, None), 2);
        assert_eq!(b.count(), 3);
        assert_eq!(
            b.live("sip:a@x", t0)[0].contact,
            "sip:2",
            "most recent first"
        );
        // Sweeping is bounded and goes earliest first.
        let swept = |b: &mut Bindings, n| -> Vec<(String, String)> {
            b.sweep(t0 + s(35), n)
                .into_iter()
                .map(|(aor, x)| (aor, x.contact))
                .collect()
        };
        assert_eq!(swept(&mut b, 1), vec![("sip:b@x".into(), "sip:4".into())]);
        assert_eq!(swept(&mut b, 10), vec![("sip:a@x".into(), "sip:1".into())]);
        assert_eq!(b.count(), 1);
        assert!(b.sweep(t0 + s(35), 10).is_empty());
        assert!(b.remove("sip:a@x", "sip:2").is_some());
        assert!(b.remove("sip:a@x", "sip:2").is_none());
        assert_eq!((b.count(), b.expiry.len(), b.by_aor.len()), (0, 0, 0));
    }

    #[test]
    fn pages_go_by_aor_and_skip_expired_bindings() {
        let t0 = Instant::now();
        let mut b = Bindings::default();
        for n in 0..5 {
            let aor = format!("sip:u{n}@x");
            b.upsert(
                &aor,
                binding("sip:1", t0 + Duration::from_secs(60), None, None),
                4,
            );
            b.upsert(
                &aor,
                binding("sip:2", t0 + Duration::from_secs(5), None, None),
                4,
            );
        }
        let later = t0 + Duration::from_secs(10);
        let (rows, next) = b.page(None, 2, later);
        let aors: Vec<&str> = rows.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(
            aors,
            ["sip:u0@x", "sip:u1@x"],
            "expired bindings not listed"
        );
        assert_eq!(next.as_deref(), Some("sip:u1@x"));
        let (rows, next) = b.page(next.as_deref(), 10, t0);
        assert_eq!(rows.len(), 6, "both bindings of three AORs");
        assert_eq!(next, None);
    }

    #[test]
    fn an_instance_replaces_its_old_flow_but_not_another_reg_id() {
        let t0 = Instant::now() + Duration::from_secs(60);
        let mut b = Bindings::default();
        let i = Some("<urn:uuid:1>");
        b.upsert("sip:a@x", binding("sip:old", t0, i, Some(1)), 5);
        b.upsert("sip:a@x", binding("sip:other", t0, i, Some(2)), 5);
        b.upsert("sip:a@x", binding("sip:plain", t0, None, None), 5);
        assert_eq!(
            b.upsert("sip:a@x", binding("sip:new", t0, i, Some(1)), 5),
            Upsert::Stored {
                replaced: vec!["sip:old".into()]
            }
        );
        let mut left: Vec<String> = b
            .live("sip:a@x", Instant::now())
            .into_iter()
            .map(|x| x.contact)
            .collect();
        left.sort();
        assert_eq!(left, ["sip:new", "sip:other", "sip:plain"]);
        assert_eq!((b.count(), b.expiry.len()), (3, 3));
        // A full AOR still takes the replacement of one of its own instances.
        assert_eq!(
            b.upsert("sip:a@x", binding("sip:newer", t0, i, Some(1)), 3),
            Upsert::Stored {
                replaced: vec!["sip:new".into()]
            }
        );
        assert_eq!(b.clear("sip:a@x").len(), 3);
        assert_eq!((b.count(), b.expiry.len()), (0, 0));
    }

    fn settings(max: usize) -> RegistrarSettings {
        RegistrarSettings {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 600,
            max_bindings_per_aor: max,
        }
    }

    fn register_msg(contacts: &str) -> Message {
        let text = format!(
            "REGISTER sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
From: <sip:a@x>;tag=1\r\nTo: <sip:a@x>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n\
Contact: {contacts}\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(bytes::Bytes::from(text), &crate::sip::Limits::default()).unwrap()
    }

    #[test]
    fn a_refused_register_changes_nothing() {
        let clock = WallClock {
            instant: Instant::now(),
            system: SystemTime::now(),
        };
        let now = clock.instant;
        let flow = Flow {
            transport: Transport::Udp,
            remote: "192.0.2.1:5060".parse().unwrap(),
            local: "192.0.2.2:5060".parse().unwrap(),
            conn: None,
        };
        let mut r = Registrar::new(settings(2), clock, Vec::new(), None);
        let mut writes = Vec::new();
        let ok = r
            .register(
                "sip:a@x",
                &register_msg("<sip:1@h>"),
                &flow,
                "a",
                now,
                &mut writes,
            )
            .unwrap();
        assert_eq!(ok, vec![("sip:1@h".to_owned(), 600)]);
        // The second Contact is too brief: the first is not applied either (RFC 3261 10.3).
        let e = r.register(
            "sip:a@x",
            &register_msg("<sip:2@h>, <sip:3@h>;expires=5"),
            &flow,
            "a",
            now,
            &mut writes,
        );
        assert!(matches!(e, Err(Reject::IntervalTooBrief(60))));
        // Two new Contacts where one place is left: refused whole.
        let e = r.register(
            "sip:a@x",
            &register_msg("<sip:2@h>, <sip:3@h>"),
            &flow,
            "a",
            now,
            &mut writes,
        );
        assert!(matches!(e, Err(Reject::Forbidden(_))));
        assert_eq!(r.count(), 1);
        assert_eq!(writes.len(), 1, "only the first REGISTER wrote");
        // Removing one and adding another in the same request fits.
        r.register(
            "sip:a@x",
            &register_msg("<sip:1@h>;expires=0, <sip:2@h>, <sip:3@h>"),
            &flow,
            "a",
            now,
            &mut writes,
        )
        .unwrap();
        assert_eq!(r.count(), 2);
        // `*` needs Expires: 0 and to be alone.
        let e = r.register("sip:a@x", &register_msg("*"), &flow, "a", now, &mut writes);
        assert!(matches!(e, Err(Reject::Malformed(_))));
        assert_eq!(r.count(), 2);
    }
}
