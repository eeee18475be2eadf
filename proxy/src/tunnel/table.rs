//! The dialogs the gateway authorised as tunnels: who, between which AORs, which prefixes
//! and pskmth, since when, in which state. Limits are counted here; the store keeps a copy
//! so that the table is complete after a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

/// Where a tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TunnelState {
    /// INVITE forwarded, no 2xx yet.
    Proposed,
    /// 2xx relayed: the tunnel is up.
    Established,
}

impl TunnelState {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelState::Proposed => "proposed",
            TunnelState::Established => "established",
        }
    }

    pub fn parse(s: &str) -> TunnelState {
        if s == "established" {
            TunnelState::Established
        } else {
            TunnelState::Proposed
        }
    }
}

/// One authorised tunnel dialog.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tunnel {
    pub call_id: String,
    /// From tag of the INVITE (the caller's dialog tag).
    pub caller_tag: String,
    /// To tag of the 2xx (the endpoint's dialog tag).
    pub callee_tag: Option<String>,
    /// Authenticated identity, or `trusted`.
    pub identity: String,
    pub from: String,
    pub to: String,
    /// Offered prefixes, as written.
    pub prefixes: String,
    /// The caller's WireGuard public key (base64, as offered): claimed like the prefixes
    /// (`claims`); empty in rows written before it was kept.
    #[serde(default)]
    pub pubkey: String,
    pub pskmth: String,
    pub created_unix: u64,
    pub state: TunnelState,
    /// Where to reach each party to end the dialog: `(contact URI, transport, address)`.
    pub caller: Option<Party>,
    pub callee: Option<Party>,
}

/// A dialog party as the gateway reaches it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Party {
    pub contact: String,
    pub transport: crate::flow::Transport,
    pub addr: std::net::SocketAddr,
    /// AOR and tag of this party.
    pub aor: String,
    pub tag: String,
    /// The route set towards this party (a `Route` value: the Record-Route entries of the
    /// proxies between it and the gateway, e.g. a load balancer), empty when direct.
    pub route: String,
}

impl Party {
    /// `transport|addr|contact|aor|tag[|route]` for the store (`|` is in neither a URI nor a
    /// tag; records written before the route set have five fields).
    pub fn encode(&self) -> String {
        let mut s = format!(
            "{}|{}|{}|{}|{}",
            self.transport, self.addr, self.contact, self.aor, self.tag
        );
        if !self.route.is_empty() {
            s.push('|');
            s.push_str(&self.route);
        }
        s
    }

    pub fn decode(s: &str) -> Option<Party> {
        let mut it = s.splitn(6, '|');
        Some(Party {
            transport: crate::flow::Transport::from_token(it.next()?)?,
            addr: it.next()?.parse().ok()?,
            contact: it.next()?.to_owned(),
            aor: it.next()?.to_owned(),
            tag: it.next()?.to_owned(),
            route: it.next().unwrap_or_default().to_owned(),
        })
    }
}

/// How the gateway reaches one party of a tunnel (the compact form of [`Party`]; the tag is
/// the record's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hop {
    contact: Box<str>,
    transport: crate::flow::Transport,
    addr: std::net::SocketAddr,
    aor: Arc<str>,
    /// Route set towards the party; `None` (no allocation) when direct, as almost always.
    route: Option<Box<str>>,
}

/// One tunnel as the table holds it: identities, AORs, prefixes and pskmth interned (shared by
/// every tunnel that names them), tags and contacts in boxes of their exact size, the Call-ID
/// only as the table's key. [`Tunnel`] is the owned, self-contained form (store, admin API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    caller_tag: Box<str>,
    callee_tag: Option<Box<str>>,
    identity: Arc<str>,
    from: Arc<str>,
    to: Arc<str>,
    prefixes: Arc<str>,
    pubkey: Box<str>,
    pskmth: Arc<str>,
    created_unix: u64,
    state: TunnelState,
    /// The store has (or the next write batch gives it) this tunnel's row.
    stored: bool,
    caller: Option<Hop>,
    callee: Option<Hop>,
}

impl Record {
    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn to(&self) -> &str {
        &self.to
    }

    pub fn pskmth(&self) -> &str {
        &self.pskmth
    }

    pub fn state(&self) -> TunnelState {
        self.state
    }

    /// The self-contained form.
    pub fn to_tunnel(&self, call_id: &str) -> Tunnel {
        let party = |h: &Option<Hop>, tag: Option<&str>| {
            h.as_ref().map(|h| Party {
                contact: h.contact.to_string(),
                transport: h.transport,
                addr: h.addr,
                aor: h.aor.to_string(),
                tag: tag.unwrap_or_default().to_owned(),
                route: h.route.as_deref().unwrap_or_default().to_owned(),
            })
        };
        Tunnel {
            call_id: call_id.to_owned(),
            caller_tag: self.caller_tag.to_string(),
            callee_tag: self.callee_tag.as_deref().map(str::to_owned),
            identity: self.identity.to_string(),
            from: self.from.to_string(),
            to: self.to.to_string(),
            prefixes: self.prefixes.to_string(),
            pubkey: self.pubkey.to_string(),
            pskmth: self.pskmth.to_string(),
            created_unix: self.created_unix,
            state: self.state,
            caller: party(&self.caller, Some(&self.caller_tag)),
            callee: party(&self.callee, self.callee_tag.as_deref()),
        }
    }
}

/// What a removed tunnel was (for the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    pub identity: String,
    pub to: String,
}

/// Shared strings: one allocation per distinct identity, AOR, prefix list or pskmth, however
/// many tunnels name it; a string goes when its last tunnel goes.
#[derive(Debug, Default)]
struct Interner {
    set: HashSet<Arc<str>>,
}

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(Arc::clone(&a));
        a
    }

    /// A string a record gives up (by value, so the count is exact): the interner's copy goes
    /// when this was the last other one.
    fn release(&mut self, a: Arc<str>) {
        if Arc::strong_count(&a) <= 2 {
            self.set.remove(&*a);
        }
    }
}

/// Tunnels by Call-ID (then caller tag: almost always one per Call-ID), with the counters the
/// per-request questions need — per identity and per target for the policy limits — kept
/// incrementally, so no request costs work in proportion to the number of tunnels held.
/// Ordered by Call-ID (O(log n) per look-up) so that the admin listing pages from a cursor
/// instead of copying the whole table on the loop.
/// Changes are remembered until the owner takes them (`take_dirty`: one store batch).
/// A tunnel only proposed (its INVITE relayed, no 2xx yet) has a row only when the store is
/// shared (`store_proposed`): there its row counts against the cluster's limits; a gateway of
/// its own would write and delete a row that no restart could use.
#[derive(Debug, Default)]
pub struct TunnelTable {
    map: BTreeMap<Box<str>, Vec<Record>>,
    len: usize,
    dirty: HashSet<(Box<str>, Box<str>)>,
    store_proposed: bool,
    per_identity: HashMap<Arc<str>, u32>,
    per_target: HashMap<Arc<str>, u32>,
    strings: Interner,
    /// Prefixes and public keys held by the live tunnels, per identity.
    claims: super::claims::Claims,
    /// Keys (Call-ID, caller tag) of the tunnels removed since the owner last asked
    /// (`take_gone`): their dialogs end too.
    gone: Vec<(Box<str>, Box<str>)>,
}

fn count_up(map: &mut HashMap<Arc<str>, u32>, key: &Arc<str>) {
    *map.entry(Arc::clone(key)).or_default() += 1;
}

fn count_down(map: &mut HashMap<Arc<str>, u32>, key: &Arc<str>) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl TunnelTable {
    /// Whether proposed tunnels get rows (a store shared by a cluster).
    pub fn store_proposed(&mut self, yes: bool) {
        self.store_proposed = yes;
    }

    fn hop(&mut self, p: Option<Party>) -> Option<Hop> {
        p.map(|p| Hop {
            contact: p.contact.into_boxed_str(),
            transport: p.transport,
            addr: p.addr,
            aor: self.strings.get(&p.aor),
            route: (!p.route.is_empty()).then(|| p.route.into_boxed_str()),
        })
    }

    fn record(&mut self, t: Tunnel, stored: bool) -> (Box<str>, Record) {
        let r = Record {
            caller_tag: t.caller_tag.into_boxed_str(),
            callee_tag: t.callee_tag.map(String::into_boxed_str),
            identity: self.strings.get(&t.identity),
            from: self.strings.get(&t.from),
            to: self.strings.get(&t.to),
            prefixes: self.strings.get(&t.prefixes),
            pubkey: t.pubkey.into_boxed_str(),
            pskmth: self.strings.get(&t.pskmth),
            created_unix: t.created_unix,
            state: t.state,
            stored,
            caller: None,
            callee: None,
        };
        let r = Record {
            caller: self.hop(t.caller),
            callee: self.hop(t.callee),
            ..r
        };
        (t.call_id.into_boxed_str(), r)
    }

    /// Counters and interned strings of a record that leaves the table.
    fn forget(&mut self, r: Record) -> Gone {
        self.claims.release(&r.identity, &r.prefixes, &r.pubkey);
        count_down(&mut self.per_identity, &r.identity);
        count_down(&mut self.per_target, &r.to);
        self.len -= 1;
        let gone = Gone {
            identity: r.identity.to_string(),
            to: r.to.to_string(),
        };
        let Record {
            identity,
            from,
            to,
            prefixes,
            pskmth,
            caller,
            callee,
            ..
        } = r;
        let hops = [caller, callee].into_iter().flatten().map(|h| h.aor);
        for a in [identity, from, to, prefixes, pskmth]
            .into_iter()
            .chain(hops)
        {
            self.strings.release(a);
        }
        gone
    }

    fn put(&mut self, t: Tunnel, stored: bool) {
        let (call_id, r) = self.record(t, stored);
        self.take(&call_id, &r.caller_tag);
        self.claims.claim(&r.identity, &r.prefixes, &r.pubkey);
        count_up(&mut self.per_identity, &r.identity);
        count_up(&mut self.per_target, &r.to);
        self.len += 1;
        match self.map.entry(call_id) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut().push(r),
            // Exactly one record's room (`vec![r]`): `push` on an empty Vec would allocate
            // room for four (about 1 KiB).
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(vec![r]);
            }
        }
    }

    /// Removes a record (counters and strings released).
    fn take(&mut self, call_id: &str, caller_tag: &str) -> Option<Gone> {
        let list = self.map.get_mut(call_id)?;
        let i = list.iter().position(|r| &*r.caller_tag == caller_tag)?;
        let r = list.swap_remove(i);
        if list.is_empty() {
            self.map.remove(call_id);
        }
        Some(self.forget(r))
    }

    /// Whether a tunnel of this call and caller is in the table.
    pub fn contains(&self, call_id: &str, caller_tag: &str) -> bool {
        self.map
            .get(call_id)
            .is_some_and(|rs| rs.iter().any(|r| &*r.caller_tag == caller_tag))
    }

    fn get_mut(&mut self, call_id: &str, caller_tag: &str) -> Option<&mut Record> {
        self.map
            .get_mut(call_id)?
            .iter_mut()
            .find(|r| &*r.caller_tag == caller_tag)
    }

    fn mark(&mut self, call_id: &str, caller_tag: &str) {
        self.dirty.insert((call_id.into(), caller_tag.into()));
    }

    pub fn insert(&mut self, t: Tunnel) {
        // A record it replaces keeps its row: this one must then be written (or deleted).
        let replaces_row = || {
            self.map
                .get(t.call_id.as_str())
                .is_some_and(|l| l.iter().any(|r| *r.caller_tag == *t.caller_tag && r.stored))
        };
        let stored = self.store_proposed || t.state != TunnelState::Proposed || replaces_row();
        if stored {
            self.mark(&t.call_id, &t.caller_tag);
        }
        self.put(t, stored);
    }

    /// Loads a persisted entry (not dirty).
    pub fn load(&mut self, t: Tunnel) {
        self.put(t, true);
    }

    /// The entries changed since the last call: `Ok(tunnel)` to save, `Err(key)` to delete.
    pub fn take_dirty(&mut self) -> Vec<Result<Tunnel, (String, String)>> {
        let keys: Vec<(Box<str>, Box<str>)> = self.dirty.drain().collect();
        keys.into_iter()
            .map(|(call_id, tag)| {
                let found = self
                    .map
                    .get(&call_id)
                    .and_then(|l| l.iter().find(|r| r.caller_tag == tag));
                match found {
                    Some(r) => Ok(r.to_tunnel(&call_id)),
                    None => Err((call_id.into(), tag.into())),
                }
            })
            .collect()
    }

    /// Marks a tunnel established; returns it.
    pub fn establish(
        &mut self,
        call_id: &str,
        caller_tag: &str,
        callee_tag: Option<String>,
    ) -> Option<&Record> {
        let r = self
            .map
            .get_mut(call_id)?
            .iter_mut()
            .find(|r| &*r.caller_tag == caller_tag)?;
        r.state = TunnelState::Established;
        r.stored = true;
        r.callee_tag = callee_tag.map(String::into_boxed_str);
        self.dirty.insert((call_id.into(), caller_tag.into()));
        Some(r)
    }

    /// Records how to reach the callee (from its answer).
    pub fn set_callee(&mut self, call_id: &str, caller_tag: &str, callee: Option<Party>) {
        let hop = self.hop(callee);
        let Some(r) = self.get_mut(call_id, caller_tag) else {
            if let Some(h) = hop {
                self.strings.release(h.aor);
            }
            return;
        };
        let old = std::mem::replace(&mut r.callee, hop);
        if r.stored {
            self.mark(call_id, caller_tag);
        }
        if let Some(h) = old {
            self.strings.release(h.aor);
        }
    }

    pub fn remove(&mut self, call_id: &str, caller_tag: &str) -> Option<Gone> {
        let stored = self.get_mut(call_id, caller_tag)?.stored;
        let r = self.take(call_id, caller_tag)?;
        self.gone.push((call_id.into(), caller_tag.into()));
        if stored {
            self.mark(call_id, caller_tag);
        }
        Some(r)
    }

    /// Removes a tunnel whose row is already gone (another gateway ended it): no write.
    pub fn remove_ended_elsewhere(&mut self, call_id: &str, caller_tag: &str) -> Option<Gone> {
        let gone = self.take(call_id, caller_tag)?;
        self.gone.push((call_id.into(), caller_tag.into()));
        Some(gone)
    }

    /// The keys of the tunnels removed since the last call (whatever removed them).
    pub fn take_gone(&mut self) -> Vec<(Box<str>, Box<str>)> {
        std::mem::take(&mut self.gone)
    }

    /// The tunnel of an in-dialog request, whichever side sent it (either tag may be the caller's).
    pub fn remove_dialog(&mut self, call_id: &str, tag_a: &str, tag_b: &str) -> Option<Gone> {
        self.remove(call_id, tag_a)
            .or_else(|| self.remove(call_id, tag_b))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `identity` may offer `prefixes` and `pubkey` (base64): none of them may overlap
    /// or equal what another identity's live tunnel holds (indexed: `claims`).
    pub fn check_claims(
        &self,
        identity: &str,
        prefixes: &[ipnet::IpNet],
        pubkey: &str,
    ) -> Result<(), super::claims::Conflict> {
        self.claims.check(identity, prefixes, pubkey)
    }

    /// (tunnels of this identity, tunnels to this AOR, all tunnels), from the counters.
    pub fn counts(&self, identity: &str, to: &str) -> (u32, u32, u32) {
        (
            self.per_identity.get(identity).copied().unwrap_or(0),
            self.per_target.get(to).copied().unwrap_or(0),
            self.len as u32,
        )
    }

    /// Every tunnel, in the self-contained form, ordered by Call-ID (O(n): tests and tools;
    /// the admin API uses [`TunnelTable::page`]).
    pub fn iter(&self) -> impl Iterator<Item = Tunnel> + '_ {
        self.map
            .iter()
            .flat_map(|(call_id, l)| l.iter().map(move |r| r.to_tunnel(call_id)))
    }

    /// At most `limit` Call-IDs' tunnels after the Call-ID `after` (from the start when
    /// `None`), in order, and the cursor of the next page when there is more: O(log n +
    /// limit), whatever the table holds.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Tunnel>, Option<String>) {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = self
            .map
            .range::<str, _>((start, Bound::Unbounded))
            .peekable();
        let mut out = Vec::new();
        let mut last = None;
        for (call_id, list) in it.by_ref().take(limit) {
            out.extend(list.iter().map(|r| r.to_tunnel(call_id)));
            last = Some(call_id);
        }
        let next = match (it.peek(), last) {
            (Some(_), Some(last)) => Some(last.to_string()),
            _ => None,
        };
        (out, next)
    }

    /// One bounded step of a resynchronisation with the shared store: of at most `budget`
    /// Call-IDs after `cursor`, removes (without a write) the established tunnels created
    /// before `before_unix` whose key is not in `stored` — ended by another gateway while this
    /// one could not hear about it. Returns how many went and where to go on (`None`: done).
    /// Proposed tunnels, and tunnels younger than the read, are left alone: their rows may not
    /// have been written when the keys were read.
    pub fn remove_absent(
        &mut self,
        stored: &HashSet<(String, String)>,
        before_unix: u64,
        cursor: Option<&str>,
        budget: usize,
    ) -> (usize, Option<String>) {
        let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let mut last = None;
        let mut absent: Vec<(String, String)> = Vec::new();
        for (call_id, list) in self
            .map
            .range::<str, _>((start, Bound::Unbounded))
            .take(budget)
        {
            last = Some(call_id.to_string());
            for r in list {
                let key = (call_id.to_string(), r.caller_tag.to_string());
                if r.state == TunnelState::Established
                    && r.created_unix < before_unix
                    && !stored.contains(&key)
                {
                    absent.push(key);
                }
            }
        }
        let removed = absent
            .iter()
            .filter(|(call_id, tag)| self.remove_ended_elsewhere(call_id, tag).is_some())
            .count();
        let more = last.as_deref().is_some_and(|l| {
            self.map
                .range::<str, _>((Bound::Excluded(l), Bound::Unbounded))
                .next()
                .is_some()
        });
        (removed, if more { last } else { None })
    }

    /// The tunnel of a Call-ID (the admin API names tunnels by Call-ID).
    pub fn by_call_id(&self, call_id: &str) -> Option<Tunnel> {
        let r = self.map.get(call_id)?.first()?;
        Some(r.to_tunnel(call_id))
    }

    /// Distinct strings held by the interner (tests: it shrinks with the table).
    pub fn interned(&self) -> usize {
        self.strings.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(call_id: &str, tag: &str, identity: &str, to: &str) -> Tunnel {
        Tunnel {
            call_id: call_id.into(),
            caller_tag: tag.into(),
            callee_tag: None,
            identity: identity.into(),
            from: "sip:a@partner.example".into(),
            to: to.into(),
            prefixes: "2001:db8:1::/64".into(),
            pubkey: String::new(),
            pskmth: "scram".into(),
            created_unix: 0,
            state: TunnelState::Proposed,
            caller: None,
            callee: None,
        }
    }

    /// After lost notifications: established tunnels older than the read whose rows are gone
    /// leave, in bounded steps, without writes; proposals and younger tunnels stay.
    #[test]
    fn resynchronisation_removes_what_left_the_store() {
        let mut t = TunnelTable::default();
        for (id, state, created) in [
            ("c1", TunnelState::Established, 100),
            ("c2", TunnelState::Established, 100),
            ("c3", TunnelState::Established, 100),
            ("c4", TunnelState::Established, 100),
            ("c5", TunnelState::Established, 100),
            ("c6", TunnelState::Proposed, 100),
            ("c7", TunnelState::Established, 200),
        ] {
            let mut x = tunnel(id, "a", "alice", "sip:vpn@org.example");
            x.state = state;
            x.created_unix = created;
            t.load(x);
        }
        let stored: HashSet<(String, String)> = [("c1", "a"), ("c3", "a")]
            .iter()
            .map(|(c, g)| (c.to_string(), g.to_string()))
            .collect();
        let mut cursor = None;
        let mut steps = Vec::new();
        loop {
            let (removed, next) = t.remove_absent(&stored, 150, cursor.as_deref(), 2);
            steps.push(removed);
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(steps, [1, 1, 1, 0]);
        let left: Vec<String> = t.iter().map(|x| x.call_id).collect();
        assert_eq!(left, ["c1", "c3", "c6", "c7"]);
        assert_eq!(t.counts("alice", "sip:vpn@org.example"), (4, 4, 4));
        assert!(
            t.take_dirty().is_empty(),
            "nothing to write: the rows are gone"
        );
    }

    /// The indexes agree with a scan after any sequence of inserts, replacements and removals.
    #[test]
    fn indexes_agree_with_the_table() {
        let mut t = TunnelTable::default();
        for n in 0..200u32 {
            let who = format!("id{}", n % 7);
            let to = format!("sip:t{}@org.example", n % 5);
            t.insert(tunnel(&format!("c{}", n % 150), "x", &who, &to));
            if n % 3 == 0 {
                t.remove(&format!("c{}", n % 40), "x");
            }
        }
        for n in 0..7 {
            let who = format!("id{n}");
            for m in 0..5 {
                let to = format!("sip:t{m}@org.example");
                let scan_identity = t.iter().filter(|x| x.identity == who).count() as u32;
                let scan_target = t.iter().filter(|x| x.to == to).count() as u32;
                assert_eq!(
                    t.counts(&who, &to),
                    (scan_identity, scan_target, t.len() as u32)
                );
            }
        }
        for x in t.iter() {
            assert_eq!(
                t.by_call_id(&x.call_id).map(|y| y.caller_tag),
                Some(x.caller_tag)
            );
        }
        assert!(t.by_call_id("nope").is_none());
    }

    /// Pages cover the table once, in Call-ID order, whatever the page size; a Call-ID with
    /// two dialogs stays on one page; a cursor that is no longer in the table still works.
    #[test]
    fn pages_cover_the_table_once_in_order() {
        let mut t = TunnelTable::default();
        for n in 0..23u32 {
            t.insert(tunnel(
                &format!("c{n:02}"),
                "x",
                "alice",
                "sip:vpn@org.example",
            ));
        }
        t.insert(tunnel("c07", "y", "alice", "sip:vpn@org.example"));
        for limit in [1, 2, 5, 23, 100] {
            let mut after: Option<String> = None;
            let mut seen = Vec::new();
            loop {
                let (rows, next) = t.page(after.as_deref(), limit);
                let ids: std::collections::BTreeSet<&str> =
                    rows.iter().map(|r| r.call_id.as_str()).collect();
                assert!(ids.len() <= limit);
                seen.extend(rows.into_iter().map(|r| (r.call_id, r.caller_tag)));
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            let all: Vec<(String, String)> = t.iter().map(|r| (r.call_id, r.caller_tag)).collect();
            assert_eq!(seen, all, "limit {limit}");
            assert_eq!(seen.len(), 24);
        }
        t.remove("c10", "x");
        let (rows, _) = t.page(Some("c10"), 1);
        assert_eq!(rows[0].call_id, "c11");
        assert_eq!(t.page(Some("c22"), 5), (Vec::new(), None));
    }

    /// The compact record gives back exactly the tunnel that went in; interned strings go with
    /// the last tunnel that names them.
    #[test]
    fn records_round_trip_and_strings_are_released() {
        let mut t = TunnelTable::default();
        let mut full = tunnel("c1", "a", "alice", "sip:vpn@org.example");
        full.callee_tag = Some("b".into());
        full.state = TunnelState::Established;
        full.caller = Some(Party {
            contact: "sip:alice@192.0.2.1".into(),
            transport: crate::flow::Transport::Udp,
            addr: "192.0.2.1:5060".parse().unwrap(),
            aor: "sip:alice@partner.example".into(),
            tag: "a".into(),
            route: "<sip:192.0.2.10;lr>".into(),
        });
        full.callee = Some(Party {
            contact: "sip:vpn@198.51.100.2".into(),
            transport: crate::flow::Transport::Tls,
            addr: "[2001:db8::2]:5061".parse().unwrap(),
            aor: "sip:vpn@org.example".into(),
            tag: "b".into(),
            route: String::new(),
        });
        t.insert(full.clone());
        t.insert(tunnel("c2", "x", "alice", "sip:vpn@org.example"));
        assert_eq!(t.by_call_id("c1"), Some(full));
        let shared = t.interned();
        t.remove("c2", "x");
        assert_eq!(t.interned(), shared, "c1 still names every string c2 did");
        t.remove("c1", "a");
        assert_eq!((t.len(), t.interned()), (0, 0));
        // c1 was established (a row); c2 only proposed, on a store of its own (none).
        assert_eq!(t.take_dirty().len(), 1, "c1's removal is a write");
    }

    /// The writes a tunnel's life costs: on a store of its own, nothing until it is
    /// established (a proposal no restart could use), then its row, then its deletion; a
    /// proposal that fails costs nothing. On a shared store, the proposal too (it counts
    /// against the cluster's limits).
    #[test]
    fn proposals_have_rows_only_in_a_shared_store() {
        let keys = |t: &mut TunnelTable| -> Vec<(String, &'static str)> {
            let mut w: Vec<_> = t
                .take_dirty()
                .into_iter()
                .map(|w| match w {
                    Ok(x) => (x.call_id, x.state.as_str()),
                    Err((c, _)) => (c, "delete"),
                })
                .collect();
            w.sort();
            w
        };
        let mut own = TunnelTable::default();
        own.insert(tunnel("c1", "a", "alice", "sip:vpn@org.example"));
        own.insert(tunnel("c2", "a", "alice", "sip:vpn@org.example"));
        assert!(keys(&mut own).is_empty());
        own.set_callee("c1", "a", None);
        own.establish("c1", "a", Some("b".into()));
        own.remove("c2", "a");
        assert_eq!(keys(&mut own), [("c1".into(), "established")]);
        own.remove("c1", "a");
        assert_eq!(keys(&mut own), [("c1".into(), "delete")]);
        // A proposal replacing a tunnel that has a row is written (or its row would stay).
        own.insert(Tunnel {
            state: TunnelState::Established,
            ..tunnel("c3", "a", "alice", "sip:vpn@org.example")
        });
        keys(&mut own);
        own.insert(tunnel("c3", "a", "alice", "sip:vpn@org.example"));
        own.remove("c3", "a");
        assert_eq!(keys(&mut own), [("c3".into(), "delete")]);

        let mut shared = TunnelTable::default();
        shared.store_proposed(true);
        shared.insert(tunnel("c1", "a", "alice", "sip:vpn@org.example"));
        assert_eq!(keys(&mut shared), [("c1".into(), "proposed")]);
        shared.remove("c1", "a");
        assert_eq!(keys(&mut shared), [("c1".into(), "delete")]);
    }
}
