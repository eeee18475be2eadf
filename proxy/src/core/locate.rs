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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

use super::relay::Prepared;
use super::{Proxy, Reject};
use crate::flow::Destination;
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
#[derive(Debug, Default)]
pub(super) struct Lookups {
    next: u64,
    waiting: HashMap<u64, Waiting>,
    out: VecDeque<Lookup>,
    /// When each branch with addresses left gives up on a silent next hop, earliest first.
    /// One entry per such branch, removed when due (a branch answered meanwhile is passed
    /// over then): bounded by the branches, so by the transaction budget.
    silence: BinaryHeap<Reverse<(Instant, TxId)>>,
    pub(super) stats: LocateStats,
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
        match hops.pop_front() {
            Some(first) => self.start_branch(server, prepared, first, hops, now),
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
        self.start_branch(server, retry.prepared, next, retry.rest, now);
        true
    }

    /// A branch whose name gave no address: as if it had answered 503 (16.9).
    fn branch_unresolved(&mut self, server: TxId, now: Instant) {
        if let Some((code, resp)) = self.synthesised(server, &Reject::Unresolvable) {
            self.offer_final(server, code, resp, now);
        }
    }
}
