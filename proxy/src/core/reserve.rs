//! Tunnel limits over the whole cluster (a shared store): a set-up the policy permitted on
//! this gateway's own counts waits — its server transaction open, 100 Trying sent — until the
//! store has counted it against the cluster's (`StoreWrite::ReserveTunnel`, evaluated in the
//! transaction that inserts its row, so two gateways cannot both take the last place). Within
//! the limits it is relayed; over them its row is gone and it is refused with the policy's
//! 403. When the store does not answer within [`WAIT`] (an outage), the gateway goes ahead on
//! its own counts, and says so in a metric and the log: a database outage must not stop new
//! tunnels.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use gatehouse_policy::{Denied, Limits};

use super::persist::StoreWrite;
use super::{Clearance, Proxy, Reject};
use crate::flow::Flow;
use crate::sip::Message;
use crate::transaction::TxId;

/// How long a set-up waits for the store's count before going ahead on the gateway's own.
pub const WAIT: Duration = Duration::from_secs(2);

/// A set-up waiting for the store's count: everything the relay stage needs.
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) id: TxId,
    pub(super) msg: Message,
    pub(super) flow: Flow,
    pub(super) loop_hash: u32,
    pub(super) clearance: Clearance,
}

/// How cluster-wide limit checks ended (metrics: `gatehouse_tunnel_limit_checks_total`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LimitChecks {
    pub granted: u64,
    pub refused: u64,
    /// The store did not answer in time: the gateway's own counts decided.
    pub unverified: u64,
}

/// The parked set-ups, by tunnel key, and their deadlines in order.
#[derive(Debug, Default)]
pub(super) struct Reservations {
    parked: HashMap<(String, String), (Parked, Instant)>,
    /// Deadlines are `now + WAIT` with a monotonic `now`: arrival order is deadline order.
    order: VecDeque<(Instant, (String, String))>,
    /// `ReserveTunnel` writes not yet taken (they go after the batch's tunnel rows).
    writes: Vec<StoreWrite>,
    pub(super) checks: LimitChecks,
}

impl Reservations {
    pub(super) fn park(
        &mut self,
        key: (String, String),
        parked: Parked,
        write: StoreWrite,
        now: Instant,
    ) {
        let deadline = now + WAIT;
        self.order.push_back((deadline, key.clone()));
        self.parked.insert(key, (parked, deadline));
        self.writes.push(write);
    }

    pub(super) fn take(&mut self, key: &(String, String)) -> Option<Parked> {
        self.parked.remove(key).map(|(p, _)| p)
    }

    /// Parked set-ups whose wait is over (at most `limit`).
    pub(super) fn expired(&mut self, now: Instant, limit: usize) -> Vec<Parked> {
        let mut out = Vec::new();
        while out.len() < limit {
            match self.order.front() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            let Some((at, key)) = self.order.pop_front() else {
                break;
            };
            // Answered meanwhile (or parked again under the same key with a later deadline).
            if self.parked.get(&key).is_some_and(|(_, d)| *d == at) {
                if let Some((p, _)) = self.parked.remove(&key) {
                    out.push(p);
                }
            }
        }
        out
    }

    pub(super) fn take_writes(&mut self) -> Vec<StoreWrite> {
        std::mem::take(&mut self.writes)
    }

    pub(super) fn len(&self) -> usize {
        self.parked.len()
    }
}

impl Proxy {
    /// Parks a tunnel set-up until the store has counted it against the cluster's `limits`.
    pub(super) fn park_for_limits(
        &mut self,
        parked: Parked,
        limits: Limits,
        (call_id, caller_tag): (String, String),
        identity: String,
        to: String,
        now: Instant,
    ) {
        self.send_trying(parked.id, now);
        let write = StoreWrite::ReserveTunnel {
            call_id: call_id.clone(),
            caller_tag: caller_tag.clone(),
            identity,
            to,
            max_total: limits.total,
            max_per_identity: limits.per_identity,
            max_per_target: limits.per_target,
            wait_until_unix: self.clock.unix(now + WAIT),
        };
        self.reserving
            .park((call_id, caller_tag), parked, write, now);
    }

    /// The store counted a parked set-up: relayed within the limits, refused over them.
    pub fn reservation_outcome(
        &mut self,
        call_id: &str,
        caller_tag: &str,
        refused: Option<Denied>,
        now: Instant,
    ) {
        let key = (call_id.to_owned(), caller_tag.to_owned());
        let Some(parked) = self.reserving.take(&key) else {
            // Gone ahead already (the wait was over), or not ours.
            return;
        };
        match refused {
            None => {
                self.reserving.checks.granted += 1;
                self.resume(parked, now);
            }
            Some(denied) => {
                self.reserving.checks.refused += 1;
                tracing::info!(%denied, "tunnel refused: the cluster's limit is reached");
                *self.policy_denials.entry(denied.label()).or_default() += 1;
                self.tunnels.remove(call_id, caller_tag);
                self.fail_parked(parked, Reject::PolicyDenied(denied), now);
            }
        }
    }

    /// Set-ups whose wait for the store is over go ahead on this gateway's counts.
    pub(super) fn expire_reservations(&mut self, now: Instant) {
        for parked in self.reserving.expired(now, 4096) {
            self.reserving.checks.unverified += 1;
            tracing::warn!(
                "the store did not count a tunnel against the cluster's limits in time; this gateway's own counts decided"
            );
            self.resume(parked, now);
        }
    }

    /// Relays a parked set-up, unless its transaction ended meanwhile (CANCEL).
    fn resume(&mut self, p: Parked, now: Instant) {
        let open = self
            .fwd
            .context(p.id)
            .is_some_and(|c| !c.cancelled && !c.final_sent);
        if !open {
            let key = (
                p.msg.call_id().into_owned(),
                p.msg.tag(crate::sip::HeaderName::From).unwrap_or_default(),
            );
            self.tunnels.remove(&key.0, &key.1);
            return;
        }
        let id = p.id;
        if let Err(reject) = self.relay(id, p.msg, p.flow, p.loop_hash, p.clearance, now) {
            if let Some(req) = self.fwd.context(id).map(|c| c.request.clone()) {
                self.reply(id, &req, reject, now);
            }
        }
    }

    fn fail_parked(&mut self, p: Parked, reject: Reject, now: Instant) {
        if self.fwd.context(p.id).is_some_and(|c| !c.final_sent) {
            if let Some(req) = self.fwd.context(p.id).map(|c| c.request.clone()) {
                self.reply(p.id, &req, reject, now);
            }
        }
    }

    /// Cluster-wide limit checks so far.
    pub fn limit_checks(&self) -> LimitChecks {
        self.reserving.checks
    }

    /// Set-ups waiting for the store's count.
    pub fn parked_setups(&self) -> usize {
        self.reserving.len()
    }
}
