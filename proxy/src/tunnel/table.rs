//! The dialogs the gateway authorised as tunnels: who, between which AORs, which prefixes
//! and pskmth, since when, in which state. Limits are counted here; the store keeps a copy
//! so that the table is complete after a restart.

use std::collections::HashMap;

/// Where a tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Tunnels by (Call-ID, caller tag). Changes are remembered until the owner persists them
/// (write-behind: one store transaction per flush instead of a write per message).
#[derive(Debug, Default)]
pub struct TunnelTable {
    map: HashMap<(String, String), Tunnel>,
    dirty: std::collections::HashSet<(String, String)>,
}

impl TunnelTable {
    pub fn insert(&mut self, t: Tunnel) {
        let key = (t.call_id.clone(), t.caller_tag.clone());
        self.dirty.insert(key.clone());
        self.map.insert(key, t);
    }

    /// Loads a persisted entry (not dirty).
    pub fn load(&mut self, t: Tunnel) {
        self.map
            .insert((t.call_id.clone(), t.caller_tag.clone()), t);
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

    pub fn remove(&mut self, call_id: &str, caller_tag: &str) -> Option<Tunnel> {
        let key = (call_id.to_owned(), caller_tag.to_owned());
        let t = self.map.remove(&key)?;
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

    /// (tunnels of this identity, tunnels to this AOR, all tunnels).
    pub fn counts(&self, identity: &str, to: &str) -> (u32, u32, u32) {
        let by_identity = self.map.values().filter(|t| t.identity == identity).count() as u32;
        let by_target = self.map.values().filter(|t| t.to == to).count() as u32;
        (by_identity, by_target, self.map.len() as u32)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Tunnel> {
        self.map.values()
    }

    pub fn get_mut(&mut self, call_id: &str, caller_tag: &str) -> Option<&mut Tunnel> {
        let key = (call_id.to_owned(), caller_tag.to_owned());
        let t = self.map.get_mut(&key)?;
        self.dirty.insert(key);
        Some(t)
    }

    /// The tunnel of a Call-ID (the admin API names tunnels by Call-ID).
    pub fn by_call_id(&self, call_id: &str) -> Option<&Tunnel> {
        self.map.values().find(|t| t.call_id == call_id)
    }
}
