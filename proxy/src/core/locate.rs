//! Next hops named by host (RFC 3263): a branch whose destination is a name waits — its
//! server transaction open, 100 Trying sent for an INVITE — while the driver asks DNS
//! ([`Lookup`] out, [`Proxy::handle_located`] in, off the loop). The answer is an ordered list
//! of addresses with their transports (`gatehouse_sip::locate`): the branch goes to the first,
//! and a transport error or a timeout before any response moves it to the next (section 4.3:
//! a new client transaction, a new branch ID). A name that does not resolve, or a list that
//! runs out, ends the branch as a 503 would.
//!
//! A branch that has other addresses to go to also has a shorter patience than its
//! transaction: when it has heard nothing at all — not even a 100 Trying — `[timers]
//! failover_ms` after it was sent, it is abandoned (no CANCEL: RFC 3261 section 9.1 forbids one
//! before a provisional response, and its client transaction stops retransmitting) and the
//! request goes to the next address. Over UDP a dead server is otherwise noticed only by
//! Timer B/F, 64·T1 (32 s) later, while every caller waits.
//!
//! An address that failed that way (refused, unreachable, timed out, silent) is remembered
//! for `[timers] dead_address_ms` ([`DeadAddresses`], like Kamailio's `dst_blacklist`): later
//! answers naming it keep it, but last, so the next calls do not each wait for it again. Any
//! response from it, or the time running out, clears it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::relay::Prepared;
use super::{Proxy, Reject};
use crate::flow::{Destination, Transport};
use crate::sip::locate::Query;
use crate::transaction::TxId;

/// A DNS question for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub id: u64,
    pub query: Query,
}

/// Why a name gave no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocateError(pub String);

/// A branch waiting for DNS.
#[derive(Debug)]
struct Waiting {
    server: TxId,
    prepared: Prepared,
}

/// How lookups ended (metrics: `gatehouse_sip_dns_lookups_total`,
/// `gatehouse_sip_failovers_total`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocateStats {
    pub resolved: u64,
    pub failed: u64,
    /// Branches moved to the next address after a transport error or timeout, or after
    /// hearing nothing for `failover_ms`.
    pub failovers: u64,
}

/// The branches waiting for DNS and the questions not yet taken by the driver. Every entry
/// belongs to an open server transaction, so the table is bounded by the transaction budget;
/// the driver answers every question (its resolver has a deadline).
#[derive(Debug)]
pub(super) struct Lookups {
    next: u64,
    waiting: HashMap<u64, Waiting>,
    out: VecDeque<Lookup>,
    /// When each branch with addresses left gives up on a silent next hop, earliest first.
    /// One entry per such branch, removed when due (a branch answered meanwhile is passed
    /// over then): bounded by the branches, so by the transaction budget.
    silence: BinaryHeap<Reverse<(Instant, TxId)>>,
    pub(super) dead: DeadAddresses,
    pub(super) stats: LocateStats,
}

/// Addresses remembered as failed, at most.
const DEAD_CAPACITY: usize = 4096;

impl Default for Lookups {
    fn default() -> Self {
        Lookups {
            next: 0,
            waiting: HashMap::new(),
            out: VecDeque::new(),
            silence: BinaryHeap::new(),
            dead: DeadAddresses::new(DEAD_CAPACITY),
            stats: LocateStats::default(),
        }
    }
}

impl Lookups {
    fn ask(&mut self, server: TxId, prepared: Prepared, query: Query) {
        self.next += 1;
        self.waiting.insert(self.next, Waiting { server, prepared });
        self.out.push_back(Lookup {
            id: self.next,
            query,
        });
    }

    pub(super) fn poll(&mut self) -> Option<Lookup> {
        self.out.pop_front()
    }

    pub(super) fn shrink(&mut self) {
        super::shrink_idle(&mut self.waiting);
    }

    /// Client transaction `client` fails over at `at` unless it has heard from its next hop.
    pub(super) fn watch(&mut self, at: Instant, client: TxId) {
        self.silence.push(Reverse((at, client)));
    }

    /// When the next silent branch is due.
    pub(super) fn next_silence(&self) -> Option<Instant> {
        self.silence.peek().map(|Reverse((at, _))| *at)
    }

    /// A branch due at `now`, if any.
    pub(super) fn silent_until(&mut self, now: Instant) -> Option<TxId> {
        match self.silence.peek() {
            Some(Reverse((at, _))) if *at <= now => self.silence.pop().map(|Reverse((_, c))| c),
            _ => None,
        }
    }
}

/// Addresses DNS gave that failed lately (no response: refused, unreachable, timed out,
/// silent for `failover_ms`), each until its time is up. Bounded: when full, the entry that
/// would expire first goes (the memory only reorders later answers, so losing an entry costs
/// a caller one failover, never a call). Every operation is O(1) but the ordering of one
/// answer (at most 16 addresses).
#[derive(Debug)]
pub(super) struct DeadAddresses {
    until: HashMap<(Transport, SocketAddr), Instant>,
    /// Insertion order, which is expiry order (one duration for all); an entry marked again
    /// or revived leaves a stale record here, skipped when it comes up.
    order: VecDeque<(Instant, (Transport, SocketAddr))>,
    capacity: usize,
}

impl DeadAddresses {
    pub(super) fn new(capacity: usize) -> Self {
        DeadAddresses {
            until: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.until.len()
    }

    /// `addr` failed at `now`: passed over until `now + ttl` (a zero `ttl` remembers nothing).
    pub(super) fn mark(&mut self, addr: (Transport, SocketAddr), now: Instant, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let until = now + ttl;
        if self.until.insert(addr, until).is_none() && self.until.len() > self.capacity {
            self.evict_one();
        }
        self.order.push_back((until, addr));
        // Stale records (re-marked or revived entries) cannot outgrow the live ones for long.
        if self.order.len() > 2 * self.capacity.max(self.until.len()) {
            let until = &self.until;
            self.order.retain(|(at, a)| until.get(a) == Some(at));
        }
    }

    fn evict_one(&mut self) {
        while let Some((at, a)) = self.order.pop_front() {
            if self.until.get(&a) == Some(&at) {
                self.until.remove(&a);
                return;
            }
        }
    }

    /// `addr` answered: it is alive.
    pub(super) fn revive(&mut self, addr: &(Transport, SocketAddr)) {
        if !self.until.is_empty() {
            self.until.remove(addr);
        }
    }

    /// Forgets what has expired at `now` (at most `budget` records: a tick stays short).
    pub(super) fn expire(&mut self, now: Instant, budget: usize) {
        for _ in 0..budget {
            match self.order.front() {
                Some((at, _)) if *at <= now => {
                    let (at, a) = self.order.pop_front().expect("front exists");
                    if self.until.get(&a) == Some(&at) {
                        self.until.remove(&a);
                    }
                }
                _ => break,
            }
        }
        super::shrink_idle(&mut self.until);
        if self.order.capacity() > 4096 && self.order.len() * 4 < self.order.capacity() {
            self.order.shrink_to_fit();
        }
    }

    /// Puts the addresses that failed lately after the others, each group in DNS's order.
    pub(super) fn order(&self, hops: &mut VecDeque<Destination>, now: Instant) {
        if self.until.is_empty() {
            return;
        }
        let dead = |d: &Destination| {
            dead_key(d)
                .and_then(|k| self.until.get(&k))
                .is_some_and(|&until| until > now)
        };
        if hops.iter().any(dead) {
            let (alive, failed): (VecDeque<_>, VecDeque<_>) =
                hops.drain(..).partition(|d| !dead(d));
            hops.extend(alive);
            hops.extend(failed);
        }
    }
}

/// The key of an address destination.
pub(super) fn dead_key(d: &Destination) -> Option<(Transport, SocketAddr)> {
    match d {
        Destination::Addr {
            transport, addr, ..
        } => Some((*transport, *addr)),
        _ => None,
    }
}

/// Where a failed branch goes next: the prepared request and the addresses not yet tried.
#[derive(Debug)]
pub(super) struct Retry {
    pub(super) prepared: Prepared,
    pub(super) rest: VecDeque<Destination>,
}

impl Proxy {
    /// A branch to a name: asks DNS, and counts the branch as open until the answer.
    pub(super) fn locate(&mut self, server: TxId, prepared: Prepared, query: Query) {
        if let Some(ctx) = self.fwd.context_mut(server) {
            ctx.resolving += 1;
            self.lookups.ask(server, prepared, query);
        }
    }

    /// The next DNS question for the driver.
    pub fn poll_lookup(&mut self) -> Option<Lookup> {
        self.lookups.poll()
    }

    /// DNS answered question `id`: addresses in the order to try them (RFC 3263), or why there
    /// are none.
    pub fn handle_located(
        &mut self,
        id: u64,
        result: Result<Vec<Destination>, LocateError>,
        now: Instant,
    ) {
        let Some(Waiting { server, prepared }) = self.lookups.waiting.remove(&id) else {
            return;
        };
        let Some(ctx) = self.fwd.context_mut(server) else {
            return;
        };
        ctx.resolving = ctx.resolving.saturating_sub(1);
        let open = !ctx.final_sent && !ctx.cancelled && self.txl.server_awaits_final(server);
        let mut hops: VecDeque<Destination> = match result {
            Ok(hops) => {
                self.lookups.stats.resolved += 1;
                hops.into()
            }
            Err(LocateError(why)) => {
                self.lookups.stats.failed += 1;
                tracing::info!(%why, "next hop not found in DNS");
                VecDeque::new()
            }
        };
        if !open {
            self.maybe_send_best(server, now);
            return;
        }
        self.lookups.dead.order(&mut hops, now);
        match hops.pop_front() {
            Some(first) => self.start_branch(server, prepared, first, Some(hops), now),
            None => self.branch_unresolved(server, now),
        }
    }

    /// The failover of RFC 3263 section 4.3: when `client` failed (transport error, timeout)
    /// before any response and its name gave more addresses, the same request goes to the
    /// next as a new branch. False when there is nothing to fail over to.
    pub(super) fn fail_over(&mut self, server: TxId, client: TxId, now: Instant) -> bool {
        self.fail_over_if(server, client, now, |b| !b.provisional)
    }

    /// `[timers] failover_ms` after it was sent, a branch with addresses left that has heard
    /// nothing from its next hop is abandoned for the next address.
    pub(super) fn fail_over_silent(&mut self, client: TxId, now: Instant) {
        let Some(server) = self.fwd.server_of(client) else {
            return;
        };
        self.note_dead(server, client, now);
        if self.fail_over_if(server, client, now, |b| !b.heard) {
            tracing::debug!("next hop silent for failover_ms, trying the next address DNS gave");
            self.txl.abandon_client(client);
            self.fwd.forget_branch(client);
        }
    }

    fn fail_over_if(
        &mut self,
        server: TxId,
        client: TxId,
        now: Instant,
        eligible: impl Fn(&super::relay::Branch) -> bool,
    ) -> bool {
        let Some(ctx) = self.fwd.context_mut(server) else {
            return false;
        };
        if ctx.final_sent || ctx.cancelled {
            return false;
        }
        let Some(branch) = ctx
            .branches
            .iter_mut()
            .find(|b| b.client == client && !b.done && eligible(b))
        else {
            return false;
        };
        let Some(mut retry) = branch.retry.take() else {
            return false;
        };
        let Some(next) = retry.rest.pop_front() else {
            return false;
        };
        branch.done = true;
        self.lookups.stats.failovers += 1;
        tracing::debug!(?next, "next hop failed, trying the next address DNS gave");
        self.start_branch(server, retry.prepared, next, Some(retry.rest), now);
        true
    }

    /// Branch `client` ended or is abandoned without a word from its next hop: when DNS gave
    /// that address, later answers put it last for a while.
    pub(super) fn note_dead(&mut self, server: TxId, client: TxId, now: Instant) {
        let Some(b) = self.fwd.branch_mut(server, client) else {
            return;
        };
        if let (Some(addr), false) = (b.located, b.heard) {
            tracing::debug!(transport = ?addr.0, addr = %addr.1, "next hop address failed; tried last for a while");
            self.lookups.dead.mark(addr, now, self.cfg.dead_address);
        }
    }

    /// A branch whose name gave no address: as if it had answered 503 (16.9).
    fn branch_unresolved(&mut self, server: TxId, now: Instant) {
        if let Some((code, resp)) = self.synthesised(server, &Reject::Unresolvable) {
            self.offer_final(server, code, resp, now);
        }
    }
}

#[cfg(test)]
mod tests {
    // A test chooses where its manual clock starts.
    #![allow(clippy::disallowed_methods)]

    use super::*;

    fn udp(port: u16) -> Destination {
        Destination::Addr {
            transport: Transport::Udp,
            addr: SocketAddr::from(([198, 51, 100, 30], port)),
            server_name: Some("partner.example".into()),
        }
    }

    fn key(port: u16) -> (Transport, SocketAddr) {
        dead_key(&udp(port)).unwrap()
    }

    fn ports(hops: &VecDeque<Destination>) -> Vec<u16> {
        hops.iter().map(|d| dead_key(d).unwrap().1.port()).collect()
    }

    #[test]
    fn failed_addresses_go_last_until_their_time_is_up_or_they_answer() {
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut dead = DeadAddresses::new(16);
        let answer = || VecDeque::from([udp(1), udp(2), udp(3), udp(4)]);
        dead.mark(key(1), now, ttl);
        dead.mark(key(3), now, ttl);
        let mut hops = answer();
        dead.order(&mut hops, now);
        // Each group keeps DNS's order.
        assert_eq!(ports(&hops), [2, 4, 1, 3]);
        dead.revive(&key(3));
        let mut hops = answer();
        dead.order(&mut hops, now);
        assert_eq!(ports(&hops), [2, 3, 4, 1]);
        // Time up: DNS's order again, and the entry is gone at the next sweep.
        let later = now + ttl;
        let mut hops = answer();
        dead.order(&mut hops, later);
        assert_eq!(ports(&hops), [1, 2, 3, 4]);
        dead.expire(later, 100);
        assert_eq!(dead.len(), 0);
        // A zero duration remembers nothing.
        dead.mark(key(2), now, Duration::ZERO);
        assert_eq!(dead.len(), 0);
    }

    #[test]
    fn the_memory_is_bounded_and_marking_again_extends() {
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut dead = DeadAddresses::new(8);
        for port in 0..1000 {
            dead.mark(key(port), now + Duration::from_millis(port.into()), ttl);
            assert!(dead.len() <= 8);
            assert!(dead.order.len() <= 16);
        }
        // The newest are kept.
        let mut hops = VecDeque::from([udp(999), udp(5)]);
        dead.order(&mut hops, now + Duration::from_secs(1));
        assert_eq!(ports(&hops), [5, 999]);
        // Marked again later: the first record is stale and does not expire it.
        let mut dead = DeadAddresses::new(8);
        dead.mark(key(1), now, ttl);
        dead.mark(key(1), now + Duration::from_secs(30), ttl);
        dead.expire(now + ttl, 100);
        assert_eq!(dead.len(), 1);
        dead.expire(now + ttl + Duration::from_secs(30), 100);
        assert_eq!(dead.len(), 0);
    }
}
