//! Responses sent without a server transaction, and the small cache that answers their
//! retransmissions.
//!
//! The gateway creates a server transaction only for a request it is going to relay
//! (trusted, authenticated, or in a dialog it signed) or for a CANCEL of one. Everything it
//! refuses or challenges before that — the 407/401 rounds of SASL, 403, 400, 481, 483, 503,
//! OPTIONS to itself — is answered statelessly (RFC 3261 16.11 and 8.2.6: a proxy may
//! respond to a request without keeping state), so a flood of unauthenticated INVITEs costs
//! a parse and a response each and cannot fill the transaction table.
//!
//! Over UDP the caller retransmits a request until it sees the final response; those
//! retransmissions are answered from this cache (same bytes, same To tag, same `s2s`
//! handle), keyed like a server transaction (17.2.3: top Via branch, sent-by, method class).
//! The cache is bounded (`capacity`, oldest out first) and entries live 32 s (64·T1, the
//! longest a caller retransmits); an ACK for a cached response removes it. Under a flood a
//! legitimate caller's entry may be pushed out: its retransmission is then processed afresh,
//! which for a challenge gives the same answer.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use std::net::IpAddr;

use super::canonical_ip;
use crate::flow::Flow;
use crate::transaction::ServerKey;

/// How long a stateless response answers retransmissions (64·T1).
pub const TTL: Duration = Duration::from_secs(32);

#[derive(Debug)]
struct Cached {
    bytes: Bytes,
    flow: Flow,
    seq: u64,
}

/// The retransmission cache.
#[derive(Debug)]
pub struct StatelessCache {
    capacity: usize,
    map: HashMap<ServerKey, Cached>,
    order: VecDeque<(u64, ServerKey, Instant)>,
    next: u64,
}

impl StatelessCache {
    pub fn new(capacity: usize) -> StatelessCache {
        StatelessCache {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The response already sent for this request, if it is a retransmission from the same
    /// source (`source`, the address the datagram came from): a copy of someone else's
    /// request is not answered to that someone (a spoofed first request must not turn the
    /// cache into a reflector), it is processed afresh and answered to its own sender.
    pub fn lookup(&self, key: &ServerKey, source: IpAddr) -> Option<(Bytes, Flow)> {
        self.map
            .get(key)
            .filter(|c| canonical_ip(c.flow.remote.ip()) == canonical_ip(source))
            .map(|c| (c.bytes.clone(), c.flow))
    }

    /// Remembers a response sent statelessly.
    pub fn insert(&mut self, key: ServerKey, bytes: Bytes, flow: Flow, now: Instant) {
        self.expire(now);
        while self.map.len() >= self.capacity {
            let Some((seq, k, _)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|c| c.seq == seq) {
                self.map.remove(&k);
            }
        }
        let seq = self.next;
        self.next += 1;
        self.order.push_back((seq, key.clone(), now + TTL));
        self.map.insert(key, Cached { bytes, flow, seq });
    }

    /// The ACK for a cached (non-2xx) response: nothing more to answer.
    pub fn remove(&mut self, key: &ServerKey) {
        self.map.remove(key);
    }

    /// Drops expired entries (O(expired)) and gives memory back after a flood.
    pub fn expire(&mut self, now: Instant) {
        while let Some((seq, k, at)) = self.order.front() {
            if *at > now {
                break;
            }
            if self.map.get(k).is_some_and(|c| c.seq == *seq) {
                self.map.remove(k);
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(seq, k, _)| map.get(k).is_some_and(|c| c.seq == *seq));
        }
        if self.map.capacity() > 4096 && self.map.len() * 4 < self.map.capacity() {
            self.map.shrink_to_fit();
            self.order.shrink_to_fit();
        }
    }
}

#[cfg(test)]
// A test chooses where its manual clock starts.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::flow::Transport;
    use crate::transaction::KeyMethod;

    fn key(n: u32) -> ServerKey {
        ServerKey {
            branch: format!("z9hG4bK{n}").into(),
            sent_by: "192.0.2.1:5060".into(),
            method: KeyMethod::Invite,
        }
    }

    fn flow() -> Flow {
        Flow {
            transport: Transport::Udp,
            local: "192.0.2.9:5060".parse().unwrap(),
            remote: "192.0.2.1:5060".parse().unwrap(),
            conn: None,
        }
    }

    #[test]
    fn bounded_oldest_out_and_expiring() {
        let t0 = Instant::now();
        let mut c = StatelessCache::new(3);
        for n in 0..5 {
            c.insert(key(n), Bytes::from(format!("r{n}")), flow(), t0);
        }
        assert_eq!(c.len(), 3);
        let from = flow().remote.ip();
        assert!(c.lookup(&key(0), from).is_none());
        assert_eq!(c.lookup(&key(4), from).unwrap().0, Bytes::from("r4"));
        c.remove(&key(4));
        assert!(c.lookup(&key(4), from).is_none());
        c.expire(t0 + TTL);
        assert!(c.is_empty());
    }

    /// A copy of a request from another address is not answered to the first sender.
    #[test]
    fn only_the_sender_gets_a_retransmitted_answer() {
        let mut c = StatelessCache::new(3);
        c.insert(key(1), Bytes::from("r1"), flow(), Instant::now());
        assert!(c
            .lookup(&key(1), "198.51.100.66".parse().unwrap())
            .is_none());
        assert!(c
            .lookup(&key(1), "::ffff:192.0.2.1".parse().unwrap())
            .is_some());
    }
}
