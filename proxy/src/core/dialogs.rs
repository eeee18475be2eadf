//! The dialogs this gateway record-routed and that still live (Kamailio's `dialog` module,
//! `is_known_dlg`): a signed Route entry is a capability for one direction of one dialog
//! ([`super::SignedDialog`]), and this table says whether that dialog still exists.
//!
//! A dialog enters when a dialog-creating request's answer with a To tag is relayed (early on a
//! provisional, confirmed on a 2xx), and leaves when a BYE of it is relayed, when its
//! INVITE fails (early dialogs), or when it has been idle for [`IDLE`] (calls; every
//! in-dialog request refreshes it). A tunnel's dialog lives as long as the tunnel: it is
//! pinned and leaves with its BYE or the admin API's teardown. Early dialogs that are never
//! confirmed leave after [`EARLY`].
//!
//! Bounded: at `capacity` the least recently used dialog that is not a tunnel's goes first
//! (only an authenticated, permitted request answered by its callee creates an entry, and
//! idle ones are what an attacker's would be). Costs are O(1) per message: a hash look-up,
//! and expiry from an ordered queue with lazy deletion.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A call's dialog with no in-dialog request for this long is forgotten (Kamailio's
/// `default_timeout`).
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// An early dialog (a provisional answer with a To tag) not confirmed in this long goes.
pub const EARLY: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Entry {
    /// Callee tags of this (Call-ID, caller tag): one per fork that answered.
    callees: Vec<Box<str>>,
    /// Confirmed by a 2xx.
    confirmed: bool,
    /// A tunnel's: never expires, never evicted.
    pinned: bool,
    expires: Instant,
    /// Which queue entry is current (lazy deletion).
    seq: u64,
}

/// The live dialogs (see the module documentation).
#[derive(Debug)]
pub struct Dialogs {
    /// Keyed by `Call-ID NUL caller-tag`.
    map: HashMap<Box<str>, Entry>,
    /// Early dialogs, then confirmed ones, each queue in expiry order (one lifetime each):
    /// (seq, key, the expiry the entry had when queued). Refreshes move an entry's expiry
    /// without requeueing it; `expire` moves such an entry to the back when it meets it.
    queues: [VecDeque<(u64, Box<str>, Instant)>; 2],
    /// The key of a look-up, built here (no allocation per request).
    scratch: String,
    next: u64,
    capacity: usize,
    /// Dialogs pushed out by newer ones at capacity (metrics).
    pub evicted: u64,
}

/// Whether an in-dialog request's dialog is known.
#[derive(Debug, PartialEq, Eq)]
pub enum Known {
    Yes,
    No,
}

impl Dialogs {
    pub fn new(capacity: usize) -> Dialogs {
        Dialogs {
            map: HashMap::new(),
            queues: [VecDeque::new(), VecDeque::new()],
            scratch: String::new(),
            next: 0,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The key of (Call-ID, caller tag) in `scratch`.
    fn key(&mut self, call_id: &str, caller_tag: &str) {
        self.scratch.clear();
        self.scratch.push_str(call_id);
        self.scratch.push('\0');
        self.scratch.push_str(caller_tag);
    }

    /// Queues a dialog (pinned ones are not queued: `u64::MAX` is no queue entry's number).
    fn touch(&mut self, key: Box<str>, expires: Instant, confirmed: bool) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.queues[usize::from(confirmed)].push_back((seq, key, expires));
        seq
    }

    /// An answer with To tag `callee_tag` to a dialog-creating request from `caller_tag`:
    /// `confirmed` for a 2xx, `pinned` for a tunnel.
    pub fn answered(
        &mut self,
        call_id: &str,
        caller_tag: &str,
        callee_tag: &str,
        confirmed: bool,
        pinned: bool,
        now: Instant,
    ) {
        self.key(call_id, caller_tag);
        let key: Box<str> = self.scratch.as_str().into();
        if !self.map.contains_key(&key) {
            self.make_room(now);
        }
        let was_confirmed = self.map.get(&key).is_some_and(|e| e.confirmed);
        let expires = now
            + if confirmed || was_confirmed {
                IDLE
            } else {
                EARLY
            };
        let pinned = pinned || self.map.get(&key).is_some_and(|e| e.pinned);
        let seq = if pinned {
            u64::MAX
        } else {
            self.touch(key.clone(), expires, confirmed || was_confirmed)
        };
        let entry = self.map.entry(key).or_insert_with(|| Entry {
            callees: Vec::with_capacity(1),
            confirmed: false,
            pinned: false,
            expires,
            seq,
        });
        if !entry.callees.iter().any(|t| &**t == callee_tag) {
            entry.callees.push(callee_tag.into());
        }
        entry.confirmed |= confirmed;
        entry.pinned |= pinned;
        entry.expires = expires;
        entry.seq = seq;
    }

    /// The dialog of an in-dialog request (either tag may be the caller's); a known dialog is
    /// refreshed.
    pub fn lookup(&mut self, call_id: &str, tag_a: &str, tag_b: &str, now: Instant) -> Known {
        for (caller, callee) in [(tag_a, tag_b), (tag_b, tag_a)] {
            self.key(call_id, caller);
            let Some(e) = self.map.get_mut(self.scratch.as_str()) else {
                continue;
            };
            if (!e.pinned && e.expires <= now) || !e.callees.iter().any(|t| &**t == callee) {
                continue;
            }
            // The queue entry stays where it is; `expire` requeues it when it meets it.
            e.expires = now + if e.confirmed { IDLE } else { EARLY };
            return Known::Yes;
        }
        Known::No
    }

    /// A BYE of the dialog was relayed: it is over (every fork of the caller's: a BYE ends
    /// the call the caller's tag names).
    pub fn ended(&mut self, call_id: &str, tag_a: &str, tag_b: &str) {
        for (caller, callee) in [(tag_a, tag_b), (tag_b, tag_a)] {
            self.key(call_id, caller);
            let Some(e) = self.map.get_mut(self.scratch.as_str()) else {
                continue;
            };
            if let Some(i) = e.callees.iter().position(|t| &**t == callee) {
                e.callees.swap_remove(i);
                if e.callees.is_empty() {
                    self.map.remove(self.scratch.as_str());
                }
                return;
            }
        }
    }

    /// The call of (Call-ID, caller tag) is over however it ended (its tunnel removed by
    /// another gateway, a resynchronisation): every dialog of it goes, pinned or not.
    pub fn end_call(&mut self, call_id: &str, caller_tag: &str) {
        self.key(call_id, caller_tag);
        self.map.remove(self.scratch.as_str());
    }

    /// A dialog-creating request failed (final non-2xx): its early dialogs go, unless a 2xx
    /// confirmed one.
    pub fn failed(&mut self, call_id: &str, caller_tag: &str) {
        self.key(call_id, caller_tag);
        if self
            .map
            .get(self.scratch.as_str())
            .is_some_and(|e| !e.confirmed)
        {
            self.map.remove(self.scratch.as_str());
        }
    }

    /// Drops expired dialogs, at most `budget` queue entries per queue and call.
    pub fn expire(&mut self, now: Instant, budget: usize) {
        for q in 0..2 {
            for _ in 0..budget {
                match self.step(q, Some(now)) {
                    Step::Stop => break,
                    Step::Removed | Step::Moved => {}
                }
            }
        }
        let map = &self.map;
        for q in &mut self.queues {
            if q.len() > 2 * map.len() + 64 {
                q.retain(|(seq, k, _)| map.get(k).is_some_and(|e| e.seq == *seq));
            }
        }
        if self.map.capacity() > 4096 && self.map.len() * 4 < self.map.capacity() {
            self.map.shrink_to_fit();
            for q in &mut self.queues {
                q.shrink_to_fit();
            }
        }
    }

    /// One queue entry from the front of queue `q`: a stale one is dropped, a pinned or
    /// refreshed one goes to the back of its queue, and the dialog it stands for goes when
    /// expired at `now` — or, with `now` `None`, in any case (eviction).
    fn step(&mut self, q: usize, now: Option<Instant>) -> Step {
        let Some((seq, key, queued)) = self.queues[q].pop_front() else {
            return Step::Stop;
        };
        let Some(e) = self.map.get_mut(&key).filter(|e| e.seq == seq) else {
            return Step::Moved;
        };
        if e.pinned {
            // A tunnel's dialog never expires nor is evicted: it leaves the queues for good.
            e.seq = u64::MAX;
            return Step::Moved;
        }
        if e.expires > queued {
            let expires = e.expires;
            e.seq = self.next;
            self.next += 1;
            self.queues[usize::from(e.confirmed)].push_back((e.seq, key, expires));
            return Step::Moved;
        }
        if now.is_some_and(|now| e.expires > now) {
            self.queues[q].push_front((seq, key, queued));
            return Step::Stop;
        }
        self.map.remove(&key);
        Step::Removed
    }

    /// At capacity: the least recently used unpinned dialog goes, confirmed ones before
    /// early ones (bounded steps; pinned and refreshed ones move to the back).
    fn make_room(&mut self, now: Instant) {
        self.expire(now, 64);
        for q in [1, 0] {
            let mut steps = self.queues[q].len();
            while self.map.len() >= self.capacity && steps > 0 {
                steps -= 1;
                if self.step(q, None) == Step::Removed {
                    self.evicted += 1;
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Stop,
    Moved,
    Removed,
}

#[cfg(test)]
// A test chooses where its manual clock starts.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn a_dialog_lives_from_its_answer_to_its_bye() {
        let t0 = Instant::now();
        let mut d = Dialogs::new(10);
        assert_eq!(d.lookup("c", "a", "b", t0), Known::No);
        d.answered("c", "a", "b", true, false, t0);
        assert_eq!(d.lookup("c", "a", "b", t0), Known::Yes);
        assert_eq!(d.lookup("c", "b", "a", t0), Known::Yes, "either direction");
        assert_eq!(d.lookup("c", "a", "x", t0), Known::No, "both tags");
        d.ended("c", "b", "a");
        assert_eq!(d.lookup("c", "a", "b", t0), Known::No, "over after BYE");
        assert!(d.is_empty());
        // A tunnel's dialog ended elsewhere goes too, pinned as it is.
        d.answered("t", "a", "b", true, true, t0);
        d.end_call("t", "a");
        assert!(d.is_empty());
    }

    #[test]
    fn idle_calls_expire_tunnels_do_not() {
        let t0 = Instant::now();
        let mut d = Dialogs::new(10);
        d.answered("call", "a", "b", true, false, t0);
        d.answered("tunnel", "a", "b", true, true, t0);
        d.answered("early", "a", "b", false, false, t0);
        d.expire(t0 + EARLY + Duration::from_secs(1), 100);
        assert_eq!(d.len(), 2, "the early dialog went");
        // Refreshed by a request half-way: lives on.
        assert_eq!(d.lookup("call", "a", "b", t0 + IDLE / 2), Known::Yes);
        d.expire(t0 + IDLE + Duration::from_secs(1), 100);
        assert_eq!(d.lookup("call", "a", "b", t0 + IDLE), Known::Yes);
        d.expire(t0 + IDLE * 2, 100);
        assert_eq!(d.lookup("call", "a", "b", t0 + IDLE * 2), Known::No);
        assert_eq!(d.lookup("tunnel", "a", "b", t0 + IDLE * 3), Known::Yes);
    }

    #[test]
    fn failure_ends_early_dialogs_not_confirmed_ones() {
        let t0 = Instant::now();
        let mut d = Dialogs::new(10);
        d.answered("c", "a", "b1", false, false, t0);
        d.answered("c", "a", "b2", false, false, t0);
        d.failed("c", "a");
        assert_eq!(d.lookup("c", "a", "b1", t0), Known::No);
        d.answered("c2", "a", "b", true, false, t0);
        d.failed("c2", "a");
        assert_eq!(d.lookup("c2", "a", "b", t0), Known::Yes);
    }

    #[test]
    fn bounded_least_recently_used_call_goes_first_tunnels_stay() {
        let t0 = Instant::now();
        let mut d = Dialogs::new(3);
        d.answered("tunnel", "a", "b", true, true, t0);
        d.answered("old", "a", "b", true, false, t0);
        d.answered("used", "a", "b", true, false, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(d.lookup("old", "a", "b", t1), Known::Yes);
        d.answered("new", "a", "b", true, false, t1);
        assert_eq!(d.len(), 3);
        assert_eq!(
            d.lookup("used", "a", "b", t1),
            Known::No,
            "least recently used"
        );
        assert_eq!(d.lookup("tunnel", "a", "b", t1), Known::Yes);
        assert_eq!(d.lookup("old", "a", "b", t1), Known::Yes);
        assert_eq!(d.evicted, 1);
    }
}
