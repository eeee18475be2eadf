//! The dialogs the gateway authorised as tunnels: who, between which AORs, which prefixes
//! and pskmth, since when, in which state. Limits are counted here; the store keeps a copy
//! so that the table is complete after a restart.

use std::collections::HashMap;

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
}

impl Party {
    /// `transport|addr|contact|aor|tag` for the store.
    pub fn encode(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.transport, self.addr, self.contact, self.aor, self.tag
        )
    }

    pub fn decode(s: &str) -> Option<Party> {
        let mut it = s.splitn(5, '|');
        Some(Party {
            transport: crate::flow::Transport::from_token(it.next()?)?,
            addr: it.next()?.parse().ok()?,
            contact: it.next()?.to_owned(),
            aor: it.next()?.to_owned(),
            tag: it.next()?.to_owned(),
        })
    }
}

/// Tunnels by (Call-ID, caller tag), with the indexes the per-request questions need — counts
/// per identity and per target for the policy limits, tunnels per Call-ID for the admin API —
/// so no request costs work in proportion to the number of tunnels held. Changes are
/// remembered until the owner persists them (one store transaction per flush).
#[derive(Debug, Default)]
pub struct TunnelTable {
    map: HashMap<(String, String), Tunnel>,
    dirty: std::collections::HashSet<(String, String)>,
    per_identity: HashMap<String, u32>,
    per_target: HashMap<String, u32>,
    /// Call-ID -> caller tags of its tunnels (almost always one).
    per_call: HashMap<String, Vec<String>>,
}

fn count_up(map: &mut HashMap<String, u32>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

fn count_down(map: &mut HashMap<String, u32>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl TunnelTable {
    fn index(&mut self, t: &Tunnel) {
        count_up(&mut self.per_identity, &t.identity);
        count_up(&mut self.per_target, &t.to);
        self.per_call
            .entry(t.call_id.clone())
            .or_default()
            .push(t.caller_tag.clone());
    }

    fn unindex(&mut self, t: &Tunnel) {
        count_down(&mut self.per_identity, &t.identity);
        count_down(&mut self.per_target, &t.to);
        if let Some(tags) = self.per_call.get_mut(&t.call_id) {
            tags.retain(|tag| *tag != t.caller_tag);
            if tags.is_empty() {
                self.per_call.remove(&t.call_id);
            }
        }
    }

    fn put(&mut self, t: Tunnel) {
        let key = (t.call_id.clone(), t.caller_tag.clone());
        if let Some(old) = self.map.remove(&key) {
            self.unindex(&old);
        }
        self.index(&t);
        self.map.insert(key, t);
    }

    pub fn insert(&mut self, t: Tunnel) {
        self.dirty.insert((t.call_id.clone(), t.caller_tag.clone()));
        self.put(t);
    }

    /// Loads a persisted entry (not dirty).
    pub fn load(&mut self, t: Tunnel) {
        self.put(t);
    }

    /// The entries changed since the last call: `Ok(tunnel)` to save, `Err(key)` to delete.
    pub fn take_dirty(&mut self) -> Vec<Result<Tunnel, (String, String)>> {
        let keys: Vec<(String, String)> = self.dirty.drain().collect();
        keys.into_iter()
            .map(|k| match self.map.get(&k) {
                Some(t) => Ok(t.clone()),
                None => Err(k),
            })
            .collect()
    }

    /// Marks a tunnel established; returns it.
    pub fn establish(
        &mut self,
        call_id: &str,
        caller_tag: &str,
        callee_tag: Option<String>,
    ) -> Option<&Tunnel> {
        let key = (call_id.to_owned(), caller_tag.to_owned());
        let t = self.map.get_mut(&key)?;
        self.dirty.insert(key);
        t.state = TunnelState::Established;
        t.callee_tag = callee_tag;
        Some(t)
    }

    /// Records how to reach the callee (from its answer).
    pub fn set_callee(&mut self, call_id: &str, caller_tag: &str, callee: Option<Party>) {
        let key = (call_id.to_owned(), caller_tag.to_owned());
        if let Some(t) = self.map.get_mut(&key) {
            t.callee = callee;
            self.dirty.insert(key);
        }
    }

    pub fn remove(&mut self, call_id: &str, caller_tag: &str) -> Option<Tunnel> {
        let key = (call_id.to_owned(), caller_tag.to_owned());
        let t = self.map.remove(&key)?;
        self.unindex(&t);
        self.dirty.insert(key);
        Some(t)
    }

    /// The tunnel of an in-dialog request, whichever side sent it (either tag may be the caller's).
    pub fn remove_dialog(&mut self, call_id: &str, tag_a: &str, tag_b: &str) -> Option<Tunnel> {
        self.remove(call_id, tag_a)
            .or_else(|| self.remove(call_id, tag_b))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (tunnels of this identity, tunnels to this AOR, all tunnels), from the indexes.
    pub fn counts(&self, identity: &str, to: &str) -> (u32, u32, u32) {
        (
            self.per_identity.get(identity).copied().unwrap_or(0),
            self.per_target.get(to).copied().unwrap_or(0),
            self.map.len() as u32,
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = &Tunnel> {
        self.map.values()
    }

    /// The tunnel of a Call-ID (the admin API names tunnels by Call-ID).
    pub fn by_call_id(&self, call_id: &str) -> Option<&Tunnel> {
        let tag = self.per_call.get(call_id)?.first()?;
        self.map.get(&(call_id.to_owned(), tag.clone()))
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
            pskmth: "scram".into(),
            created_unix: 0,
            state: TunnelState::Proposed,
            caller: None,
            callee: None,
        }
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
                t.by_call_id(&x.call_id).map(|y| &y.caller_tag),
                Some(&x.caller_tag)
            );
        }
        assert!(t.by_call_id("nope").is_none());
    }
}
