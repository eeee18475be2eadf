//! Lockout of password guessers, with a table an attacker can neither switch off nor turn
//! against legitimate users.
//!
//! Failures are counted under four keys, each a decaying counter (half-life
//! `failure_window`): the pair (user, subscriber), the subscriber alone (an IPv4 address or
//! an IPv6 /64), the subscriber's aggregate (IPv4 /24, IPv6 /48), and the user alone. With
//! `N = failures_before_lockout`:
//!
//! | key | locks after | refuses |
//! |---|---|---|
//! | (user, subscriber) | N | that user from that subscriber |
//! | subscriber | 4 N | everything from that subscriber |
//! | aggregate | 16 N | everything from that aggregate |
//! | user | 20 N | that user from every subscriber that has not authenticated as the user in the last 24 h, except REGISTERs from the inside |
//!
//! So one source cannot lock a user out anywhere but at that source; a distributed guesser
//! is slowed for everyone except the places the user really uses (and trusted sources,
//! which never run SASL). A lock lasts `lockout`.
//!
//! The table is bounded (`capacity` entries). When it is full, a new key takes the place of
//! the weakest of 8 sampled entries: the one with the lowest current score, locked entries
//! last. One-shot failures from many addresses (score about 1) therefore make room among
//! themselves, and a guesser's record, which grows with every guess, is not what goes. The
//! table of recent successes is bounded by the number of real users (only a success adds to
//! it) times [`SUCCESS_MEMORY`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub use gatehouse_auth::Subscriber;

use super::sampled::SampledTable;

/// Subscribers remembered per user as "authenticated here recently".
pub const SUCCESS_MEMORY: usize = 8;
/// How long a success exempts its subscriber from the user-wide lock.
pub const SUCCESS_TTL: Duration = Duration::from_secs(24 * 3600);

/// An IPv4 /24 or an IPv6 /48: a subscriber's neighbourhood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    V4(u32),
    V6(u64),
}

fn aggregate(sub: Subscriber) -> Aggregate {
    match sub {
        Subscriber::V4(a) => Aggregate::V4(a >> 8),
        Subscriber::V6(p) => Aggregate::V6(p >> 16),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Pair(String, Subscriber),
    Subscriber(Subscriber),
    Aggregate(Aggregate),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Decayed failure count as of `at`.
    score: f64,
    at: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|until| now < until)
    }

    /// The score now, decayed with half-life `half_life` seconds.
    fn decayed(&self, now: Instant, half_life: f64) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.score * (-dt / half_life).exp2()
    }
}

/// The lockout table.
#[derive(Debug)]
pub struct Lockout {
    threshold: f64,
    half_life: f64,
    duration: Duration,
    table: SampledTable<Key, Entry>,
    successes: HashMap<String, Vec<(Subscriber, Instant)>>,
    /// Lockouts started (metrics).
    pub lockouts: u64,
    /// Entries evicted to make room (metrics, tests).
    pub evicted: u64,
}

/// Why an attempt is refused before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locked {
    Pair,
    Subscriber,
    Aggregate,
    User,
}

impl Lockout {
    pub fn new(threshold: u32, window: Duration, duration: Duration, capacity: usize) -> Self {
        Lockout {
            threshold: f64::from(threshold.max(1)),
            half_life: window.as_secs_f64().max(0.001),
            duration,
            table: SampledTable::new(capacity, 0x9e37_79b9_7f4a_7c15),
            successes: HashMap::new(),
            lockouts: 0,
            evicted: 0,
        }
    }

    /// New settings (a reload): the entries keep their scores, the next check uses the new
    /// threshold, decay and lockout duration.
    pub fn set_settings(&mut self, threshold: u32, window: Duration, duration: Duration) {
        self.threshold = f64::from(threshold.max(1));
        self.half_life = window.as_secs_f64().max(0.001);
        self.duration = duration;
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn limit(&self, key: &Key) -> f64 {
        self.threshold
            * match key {
                Key::Pair(..) => 1.0,
                Key::Subscriber(_) => 4.0,
                Key::Aggregate(_) => 16.0,
                Key::User(_) => 20.0,
            }
    }

    fn is_locked(&self, key: &Key, now: Instant) -> bool {
        self.table.get(key).is_some_and(|e| e.locked(now))
    }

    /// Checks made before anything else (even a challenge): the source itself.
    pub fn source_locked(&self, ip: IpAddr, now: Instant) -> Option<Locked> {
        let sub = Subscriber::of(ip);
        if self.is_locked(&Key::Subscriber(sub), now) {
            return Some(Locked::Subscriber);
        }
        if self.is_locked(&Key::Aggregate(aggregate(sub)), now) {
            return Some(Locked::Aggregate);
        }
        None
    }

    /// Checks for a claimed user from a source. `inside_registration`: a REGISTER from the
    /// inside (an internal endpoint keeping its binding), which the user-wide lock spares.
    pub fn user_locked(
        &self,
        user: &str,
        ip: IpAddr,
        inside_registration: bool,
        now: Instant,
    ) -> Option<Locked> {
        let sub = Subscriber::of(ip);
        if self.is_locked(&Key::Pair(user.to_owned(), sub), now) {
            return Some(Locked::Pair);
        }
        let spared = inside_registration || self.succeeded_here(user, sub, now);
        if self.is_locked(&Key::User(user.to_owned()), now) && !spared {
            return Some(Locked::User);
        }
        None
    }

    fn succeeded_here(&self, user: &str, sub: Subscriber, now: Instant) -> bool {
        self.successes.get(user).is_some_and(|list| {
            list.iter()
                .any(|&(s, at)| s == sub && now.saturating_duration_since(at) < SUCCESS_TTL)
        })
    }

    /// Counts one failed attempt (`user` when the attempt named one).
    pub fn failure(&mut self, user: Option<&str>, ip: IpAddr, now: Instant) {
        let sub = Subscriber::of(ip);
        if let Some(u) = user {
            self.bump(Key::Pair(u.to_owned(), sub), now);
            self.bump(Key::User(u.to_owned()), now);
        }
        self.bump(Key::Subscriber(sub), now);
        self.bump(Key::Aggregate(aggregate(sub)), now);
    }

    /// A successful authentication of `user` from `ip`: the pair starts afresh and the
    /// subscriber is remembered as one the user really uses.
    pub fn success(&mut self, user: &str, ip: IpAddr, now: Instant) {
        let sub = Subscriber::of(ip);
        self.table.remove(&Key::Pair(user.to_owned(), sub));
        let list = self.successes.entry(user.to_owned()).or_default();
        list.retain(|&(s, at)| s != sub && now.saturating_duration_since(at) < SUCCESS_TTL);
        if list.len() >= SUCCESS_MEMORY {
            list.remove(0);
        }
        list.push((sub, now));
    }

    fn bump(&mut self, key: Key, now: Instant) {
        let limit = self.limit(&key);
        let (half_life, duration) = (self.half_life, self.duration);
        // Eviction order: unlocked before locked, then the lowest current score.
        let rank = move |e: &Entry| (e.locked(now), e.decayed(now, half_life));
        let fresh = || Entry {
            score: 0.0,
            at: now,
            locked_until: None,
        };
        let (e, evicted) = self.table.entry(key, fresh, rank);
        e.score = e.decayed(now, half_life) + 1.0;
        e.at = now;
        // N failures in quick succession lock: each has decayed a little by the N-th, so
        // the score is compared rounded (N failures spread over the window still count less).
        let locks = e.score + 0.5 >= limit && !e.locked(now);
        if locks {
            e.locked_until = Some(now + duration);
            e.score = 0.0;
        }
        self.lockouts += u64::from(locks);
        self.evicted += u64::from(evicted);
    }

    /// Drops entries that are neither locked nor worth keeping (score below 0.05) and gives
    /// memory back; the driver calls it from its tick. Bounded work per call.
    pub fn sweep(&mut self, now: Instant, budget: usize) {
        let half_life = self.half_life;
        self.table.sweep(budget, |e| {
            !e.locked(now) && e.decayed(now, half_life) < 0.05
        });
    }
}

#[cfg(test)]
// A test chooses where its manual clock starts.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn lockout(capacity: usize) -> Lockout {
        Lockout::new(
            5,
            Duration::from_secs(60),
            Duration::from_secs(300),
            capacity,
        )
    }

    #[test]
    fn a_pair_locks_after_n_and_unlocks_after_the_duration() {
        let t0 = Instant::now();
        let mut l = lockout(1000);
        let a = ip("192.0.2.1");
        for _ in 0..4 {
            l.failure(Some("bob"), a, t0);
        }
        assert_eq!(l.user_locked("bob", a, false, t0), None);
        l.failure(Some("bob"), a, t0);
        assert_eq!(l.user_locked("bob", a, false, t0), Some(Locked::Pair));
        assert_eq!(
            l.user_locked("bob", a, false, t0 + Duration::from_secs(299)),
            Some(Locked::Pair)
        );
        assert_eq!(
            l.user_locked("bob", a, false, t0 + Duration::from_secs(300)),
            None
        );
        // N failures a second apart lock too (the decay of the first ones does not save the
        // N-th).
        let mut t = t0 + Duration::from_secs(1000);
        for _ in 0..5 {
            l.failure(Some("dave"), a, t);
            t += Duration::from_secs(1);
        }
        assert_eq!(l.user_locked("dave", a, false, t), Some(Locked::Pair));
        // Slow guessing decays away.
        let mut t = t0 + Duration::from_secs(400);
        for _ in 0..20 {
            l.failure(Some("carol"), a, t);
            t += Duration::from_secs(120);
        }
        assert_eq!(l.user_locked("carol", a, false, t), None);
    }

    /// Issue 9, defect 6: five failures for `vpn` from one place do not lock `vpn` anywhere
    /// else.
    #[test]
    fn nobody_can_lock_a_user_out_from_elsewhere() {
        let t0 = Instant::now();
        let mut l = lockout(1000);
        for _ in 0..50 {
            l.failure(Some("vpn"), ip("198.51.100.7"), t0);
        }
        assert!(l
            .user_locked("vpn", ip("198.51.100.7"), false, t0)
            .is_some());
        assert_eq!(l.user_locked("vpn", ip("10.1.2.3"), false, t0), None);
        assert_eq!(l.source_locked(ip("10.1.2.3"), t0), None);
    }

    #[test]
    fn a_distributed_guesser_is_stopped_except_where_the_user_really_is() {
        let t0 = Instant::now();
        let mut l = lockout(100_000);
        l.success("vpn", ip("10.9.9.9"), t0);
        for n in 0..100u32 {
            let src = IpAddr::from(std::net::Ipv4Addr::from(0xc000_0000 + n * 256));
            l.failure(Some("vpn"), src, t0);
        }
        assert_eq!(
            l.user_locked("vpn", ip("203.0.113.50"), false, t0),
            Some(Locked::User)
        );
        assert_eq!(
            l.user_locked("vpn", ip("10.9.9.9"), false, t0),
            None,
            "its own place"
        );
        assert_eq!(
            l.user_locked("vpn", ip("10.7.7.7"), true, t0),
            None,
            "a registration from inside"
        );
    }

    #[test]
    fn a_spraying_source_locks_itself() {
        let t0 = Instant::now();
        let mut l = lockout(1000);
        let a = ip("2001:db8:1:2::77");
        for n in 0..20 {
            l.failure(Some(&format!("user{n}")), a, t0);
        }
        assert_eq!(l.source_locked(a, t0), Some(Locked::Subscriber));
        assert_eq!(
            l.source_locked(ip("2001:db8:1:2::99"), t0),
            Some(Locked::Subscriber),
            "the whole /64"
        );
        assert_eq!(l.source_locked(ip("2001:db8:1:3::1"), t0), None);
    }

    /// Issue 9, defect 3: 100k one-datagram failures from 20k addresses, then one source
    /// guesses: it is locked after N guesses all the same.
    #[test]
    fn a_flooded_table_still_locks_a_single_source_guesser() {
        let t0 = Instant::now();
        let mut l = lockout(100_000);
        for n in 0..100_000u32 {
            let src = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (n % 20_000) * 7));
            l.failure(Some(&format!("u{n}")), src, t0);
        }
        assert!(l.len() <= 100_000);
        assert!(l.evicted > 0, "the table was full");
        let guesser = ip("203.0.113.9");
        let mut allowed = 0;
        for _ in 0..48 {
            if l.user_locked("alice", guesser, false, t0).is_some()
                || l.source_locked(guesser, t0).is_some()
            {
                break;
            }
            allowed += 1;
            l.failure(Some("alice"), guesser, t0);
        }
        assert_eq!(allowed, 5, "guesses allowed before the lock");
        // And the guesser's lock survives another flood.
        for n in 0..100_000u32 {
            let src = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + (n % 20_000) * 7));
            l.failure(Some(&format!("v{n}")), src, t0);
        }
        assert_eq!(
            l.user_locked("alice", guesser, false, t0),
            Some(Locked::Pair)
        );
    }
}
