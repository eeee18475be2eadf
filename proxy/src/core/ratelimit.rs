//! Per-source request rate limit, in the manner of Kamailio's `pike` module.
//!
//! Every message from a source that is not trusted is counted against its subscriber (an
//! IPv4 address or an IPv6 /64) in fixed windows of `window`; a subscriber that sends more
//! than `requests` in one window is banned for `ban`: its messages are dropped before they
//! are parsed, without an answer (an answer would be work, and traffic, for the flooder).
//! Trusted sources are never counted.
//!
//! The table is bounded (`max_sources`); when it is full, a new source takes the place of
//! the least busy of 8 sampled entries, banned entries last, so rotating addresses cannot
//! flush a ban. A ban is logged at most once a second (with the number of bans not logged).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use gatehouse_auth::Subscriber;

use super::sampled::SampledTable;

pub use crate::config::RateLimitSettings;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
}

impl Entry {
    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|u| now < u)
    }

    /// Messages in the window in force at `now`.
    fn current(&self, now: Instant, window: Duration) -> u32 {
        if now.saturating_duration_since(self.window_start) >= window {
            0
        } else {
            self.count
        }
    }
}

/// The rate limiter.
#[derive(Debug)]
pub struct RateLimit {
    settings: RateLimitSettings,
    table: SampledTable<Subscriber, Entry>,
    last_log: Option<Instant>,
    unlogged: u64,
    /// End of every ban started, in order (one ban length at a time).
    ban_ends: VecDeque<Instant>,
    /// Messages dropped (metrics).
    pub dropped: u64,
    /// Bans started (metrics).
    pub bans: u64,
}

impl RateLimit {
    pub fn new(settings: RateLimitSettings) -> RateLimit {
        RateLimit {
            settings,
            table: SampledTable::new(settings.max_sources, 0x2545_f491_4f6c_dd1d),
            last_log: None,
            unlogged: 0,
            ban_ends: VecDeque::new(),
            dropped: 0,
            bans: 0,
        }
    }

    /// New settings (reload); counts and bans in progress stay (the table keeps the size it
    /// was made with until a restart).
    pub fn set_settings(&mut self, settings: RateLimitSettings) {
        self.settings = settings;
    }

    /// Bans in force (O(expired) per call: ban ends are queued in order).
    pub fn banned(&mut self, now: Instant) -> usize {
        while self.ban_ends.front().is_some_and(|&end| end <= now) {
            self.ban_ends.pop_front();
        }
        self.ban_ends.len()
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Counts one message from `ip`; false when it must be dropped.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.settings.enabled {
            return true;
        }
        let RateLimitSettings {
            requests,
            window,
            ban,
            ..
        } = self.settings;
        // Eviction order: not banned before banned, then the least busy.
        let rank = move |e: &Entry| (e.banned(now), e.current(now, window));
        let fresh = || Entry {
            window_start: now,
            count: 0,
            banned_until: None,
        };
        let (e, _) = self.table.entry(Subscriber::of(ip), fresh, rank);
        if e.banned(now) {
            self.dropped += 1;
            return false;
        }
        if now.saturating_duration_since(e.window_start) >= window {
            e.window_start = now;
            e.count = 0;
        }
        e.count = e.count.saturating_add(1);
        if e.count <= requests {
            return true;
        }
        e.banned_until = Some(now + ban);
        if self.ban_ends.back().is_none_or(|&last| last <= now + ban) {
            self.ban_ends.push_back(now + ban);
        }
        self.bans += 1;
        self.dropped += 1;
        self.log_ban(ip, now);
        false
    }

    fn log_ban(&mut self, ip: IpAddr, now: Instant) {
        let due = self
            .last_log
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if due {
            tracing::warn!(
                source = %ip,
                not_logged = self.unlogged,
                ban_s = self.settings.ban.as_secs(),
                "rate limit exceeded: source banned"
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
    }

    /// Drops idle entries (window over, not banned): bounded work per call, memory given
    /// back after a flood.
    pub fn sweep(&mut self, now: Instant, budget: usize) {
        let window = self.settings.window;
        self.table
            .sweep(budget, |e| !e.banned(now) && e.current(now, window) == 0);
    }
}

#[cfg(test)]
// A test chooses where its manual clock starts.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn settings() -> RateLimitSettings {
        RateLimitSettings {
            enabled: true,
            requests: 10,
            window: Duration::from_secs(2),
            ban: Duration::from_secs(60),
            max_sources: 64,
        }
    }

    #[test]
    fn a_source_over_the_rate_is_banned_for_the_ban_time() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(settings());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert!(r.admit(a, t0));
        }
        assert!(!r.admit(a, t0), "the 11th in the window");
        assert!(!r.admit(a, t0 + Duration::from_secs(59)));
        assert!(r.admit(a, t0 + Duration::from_secs(60)));
        assert!(
            r.admit("192.0.2.2".parse().unwrap(), t0),
            "others unaffected"
        );
        assert_eq!(r.bans, 1);
        assert_eq!(r.banned(t0), 1);
        assert_eq!(r.banned(t0 + Duration::from_secs(61)), 0);
    }

    #[test]
    fn a_steady_source_under_the_rate_is_never_banned() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(settings());
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        for n in 0..1000u64 {
            assert!(r.admit(a, t0 + Duration::from_millis(n * 250)));
        }
    }

    #[test]
    fn rotating_addresses_cannot_flush_a_ban() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(settings());
        let a: IpAddr = "2001:db8:1:1::1".parse().unwrap();
        for _ in 0..11 {
            r.admit(a, t0);
        }
        for n in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            r.admit(ip, t0);
        }
        assert!(r.len() <= 64);
        assert!(
            !r.admit("2001:db8:1:1::2".parse().unwrap(), t0),
            "the /64 stays banned"
        );
    }
}
