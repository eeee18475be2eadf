//! Who holds which WireGuard prefix and public key among the live tunnels.
//!
//! A prefix or a public key that a live (proposed or established) tunnel offered belongs to
//! that tunnel's identity until the tunnel ends: another identity's offer that overlaps one
//! of its prefixes (either contains the other, per family) or names its key is refused, so a
//! second tunnel can neither move an allowed-ip away from the first nor replace its peer at
//! the endpoint. The same identity may hold overlapping claims (a site's redundant tunnels
//! through two gateways, a set-up repeated before the old one ended).
//!
//! Indexed, never scanned: prefixes sit in an ordered map keyed by (family, first address,
//! length, identity). Two CIDR prefixes overlap exactly when one contains the other, so an
//! offer's prefix P conflicts when
//! - some held prefix contains P: one range look-up per length from 0 to P's (at most 129,
//!   whatever the table holds), or
//! - some held prefix lies inside P: the range of first addresses P covers, walked until the
//!   first entry of another identity; the entries walked before it are the offering
//!   identity's own prefixes inside P (bounded by its own tunnels, which policy limits).
//!
//! Keys are a hash map from key to holder.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use ipnet::IpNet;

/// Most prefixes one offer may claim (each costs up to 129 look-ups).
pub const MAX_PREFIXES: usize = 64;

/// Why an offer cannot be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// A prefix overlaps one another identity's live tunnel holds.
    Prefix,
    /// Another identity's live tunnel holds the public key.
    Key,
    /// More than [`MAX_PREFIXES`] prefixes.
    TooManyPrefixes,
}

/// (family: 4 or 6, first address, prefix length, holder).
type PrefixKey = (u8, u128, u8, Arc<str>);

/// The claims of the live tunnels (see the module documentation).
#[derive(Debug)]
pub struct Claims {
    /// Holders of each prefix, with how many of their tunnels claim it.
    prefixes: BTreeMap<PrefixKey, u32>,
    /// Holder of each public key (base64, as offered), with how many of its tunnels claim it.
    keys: HashMap<Box<str>, (Arc<str>, u32)>,
    /// The empty identity: the least key of a range (no allocation per look-up).
    floor: Arc<str>,
    /// How many entries have each prefix length, per family (IPv4, IPv6): the look-up of
    /// held prefixes around an offered one visits only the lengths in use.
    lengths: [[u32; 129]; 2],
}

impl Default for Claims {
    fn default() -> Self {
        Claims {
            prefixes: BTreeMap::new(),
            keys: HashMap::new(),
            floor: Arc::default(),
            lengths: [[0; 129]; 2],
        }
    }
}

fn family(fam: u8) -> usize {
    usize::from(fam == 6)
}

/// A prefix as (family, first address as u128, length), host bits cleared.
fn span(net: &IpNet) -> (u8, u128, u8) {
    let net = net.trunc();
    match net.network() {
        IpAddr::V4(a) => (4, u128::from(u32::from(a)), net.prefix_len()),
        IpAddr::V6(a) => (6, u128::from(a), net.prefix_len()),
    }
}

/// The last address of a prefix of `len` bits starting at `start` in family `fam`.
fn last(fam: u8, start: u128, len: u8) -> u128 {
    let bits = if fam == 4 { 32 } else { 128 };
    let host = u32::from(bits - len);
    if host >= 128 {
        return u128::MAX >> (128 - u32::from(bits));
    }
    start | ((1u128 << host) - 1)
}

/// `start` with all but the first `len` bits of a `fam` address cleared.
fn mask(fam: u8, start: u128, len: u8) -> u128 {
    let bits = if fam == 4 { 32u32 } else { 128 };
    let host = bits - u32::from(len);
    if host >= 128 {
        0
    } else {
        start & !((1u128 << host) - 1)
    }
}

/// Parses a stored prefix list (`a/n,b/m`, as offered); entries that do not parse are skipped
/// (the offer was validated when it was made).
pub fn parse_prefixes(text: &str) -> Vec<IpNet> {
    text.split(',')
        .filter_map(|p| p.trim().parse::<IpNet>().ok())
        .collect()
}

impl Claims {
    /// Whether `identity` may claim `prefixes` and `key` now.
    pub fn check(&self, identity: &str, prefixes: &[IpNet], key: &str) -> Result<(), Conflict> {
        if prefixes.len() > MAX_PREFIXES {
            return Err(Conflict::TooManyPrefixes);
        }
        if let Some((holder, _)) = self.keys.get(key) {
            if &**holder != identity {
                return Err(Conflict::Key);
            }
        }
        for p in prefixes {
            if self.prefix_conflict(identity, p) {
                return Err(Conflict::Prefix);
            }
        }
        Ok(())
    }

    fn prefix_conflict(&self, identity: &str, p: &IpNet) -> bool {
        let (fam, start, len) = span(p);
        let other = |k: &PrefixKey| &*k.3 != identity;
        // Held prefixes that contain P (or equal it): one look-up per shorter-or-equal length
        // that some held prefix has.
        let in_use = &self.lengths[family(fam)];
        for l in (0..=len).filter(|&l| in_use[usize::from(l)] > 0) {
            let s = mask(fam, start, l);
            let lo: Bound<PrefixKey> = Bound::Included((fam, s, l, self.floor.clone()));
            let hi: Bound<PrefixKey> = Bound::Excluded((fam, s, l + 1, self.floor.clone()));
            if self.prefixes.range((lo, hi)).any(|(k, _)| other(k)) {
                return true;
            }
        }
        // Held prefixes inside P: first addresses in P's range, longer than P.
        let end = last(fam, start, len);
        self.prefixes
            .range((fam, start, 0, self.floor.clone())..=(fam, end, u8::MAX, self.floor.clone()))
            .filter(|(k, _)| k.2 > len)
            .any(|(k, _)| other(k))
    }

    /// Records a tunnel's claims (after [`Claims::check`], or a tunnel loaded from the store).
    pub fn claim(&mut self, identity: &Arc<str>, prefixes: &str, key: &str) {
        for p in parse_prefixes(prefixes).iter().take(MAX_PREFIXES) {
            let (fam, start, len) = span(p);
            let n = self
                .prefixes
                .entry((fam, start, len, Arc::clone(identity)))
                .or_default();
            if *n == 0 {
                self.lengths[family(fam)][usize::from(len)] += 1;
            }
            *n += 1;
        }
        if key.is_empty() {
            return;
        }
        match self.keys.get_mut(key) {
            Some((holder, n)) if holder == identity => *n += 1,
            // Another holder (only from stored rows that predate this check): the first keeps it.
            Some(_) => {}
            None => {
                self.keys.insert(key.into(), (Arc::clone(identity), 1));
            }
        }
    }

    /// Gives a tunnel's claims back (its last tunnel gone, a prefix or key is free again).
    pub fn release(&mut self, identity: &Arc<str>, prefixes: &str, key: &str) {
        for p in parse_prefixes(prefixes).iter().take(MAX_PREFIXES) {
            let (fam, start, len) = span(p);
            let k = (fam, start, len, Arc::clone(identity));
            if let Some(n) = self.prefixes.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.prefixes.remove(&k);
                    self.lengths[family(fam)][usize::from(len)] -= 1;
                }
            }
        }
        if let Some((holder, n)) = self.keys.get_mut(key) {
            if holder == identity {
                *n -= 1;
                if *n == 0 {
                    self.keys.remove(key);
                }
            }
        }
    }

    /// Distinct (prefix, holder) entries and keys held (tests, metrics).
    pub fn len(&self) -> (usize, usize) {
        (self.prefixes.len(), self.keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &str) -> Vec<IpNet> {
        parse_prefixes(s)
    }

    #[test]
    fn another_identity_cannot_overlap_a_held_prefix_in_either_direction() {
        let mut c = Claims::default();
        let alice: Arc<str> = Arc::from("alice@org.example");
        c.claim(&alice, "2001:db8:456:1::/64,10.1.0.0/16", "KEYA");
        let bob = "bob@org.example";
        // Bob's /48 contains alice's /64; a /96 inside it; the same /64; an IPv4 /8 around hers.
        for p in [
            "2001:db8:456::/48",
            "2001:db8:456:1:2::/96",
            "2001:db8:456:1::/64",
            "10.0.0.0/8",
            "10.1.2.0/24",
            "::/0",
            "0.0.0.0/0",
        ] {
            assert_eq!(c.check(bob, &nets(p), "KEYB"), Err(Conflict::Prefix), "{p}");
        }
        // Beside it: fine.
        for p in ["2001:db8:456:2::/64", "10.2.0.0/16", "2001:db8:457::/48"] {
            assert_eq!(c.check(bob, &nets(p), "KEYB"), Ok(()), "{p}");
        }
        // Her own further claims inside or around her prefix are hers to make.
        assert_eq!(c.check(&alice, &nets("2001:db8:456::/48"), "KEYA"), Ok(()));
        // Her key is hers.
        assert_eq!(
            c.check(bob, &nets("2001:db8:999::/48"), "KEYA"),
            Err(Conflict::Key)
        );
        // Released: free for anyone.
        c.release(&alice, "2001:db8:456:1::/64,10.1.0.0/16", "KEYA");
        assert_eq!(c.len(), (0, 0));
        assert_eq!(
            c.check(bob, &nets("2001:db8:456::/48,10.0.0.0/8"), "KEYA"),
            Ok(())
        );
    }

    #[test]
    fn claims_are_counted_per_tunnel() {
        let mut c = Claims::default();
        let alice: Arc<str> = Arc::from("alice");
        c.claim(&alice, "192.0.2.0/24", "K");
        c.claim(&alice, "192.0.2.0/24", "K");
        c.release(&alice, "192.0.2.0/24", "K");
        assert_eq!(
            c.check("bob", &nets("192.0.2.128/25"), "X"),
            Err(Conflict::Prefix)
        );
        assert_eq!(
            c.check("bob", &nets("198.51.100.0/24"), "K"),
            Err(Conflict::Key)
        );
        c.release(&alice, "192.0.2.0/24", "K");
        assert_eq!(c.check("bob", &nets("192.0.2.128/25"), "K"), Ok(()));
    }

    #[test]
    fn families_do_not_mix_and_host_bits_are_ignored() {
        let mut c = Claims::default();
        let alice: Arc<str> = Arc::from("alice");
        c.claim(&alice, "10.0.0.7/8", "");
        assert_eq!(
            c.check("bob", &nets("::a00:0/104"), ""),
            Ok(()),
            "IPv6 is not IPv4"
        );
        assert_eq!(
            c.check("bob", &nets("10.9.9.9/32"), ""),
            Err(Conflict::Prefix)
        );
        assert_eq!(
            c.check("bob", &nets("0.0.0.0/0"), ""),
            Err(Conflict::Prefix)
        );
    }

    #[test]
    fn too_many_prefixes_are_refused() {
        let c = Claims::default();
        let many: Vec<IpNet> = (0..=MAX_PREFIXES as u32)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap())
            .collect();
        assert_eq!(c.check("a", &many, ""), Err(Conflict::TooManyPrefixes));
    }

    /// The index agrees with a plain scan over random claims (the reference definition of
    /// overlap: either contains the other, same family).
    #[test]
    fn the_index_agrees_with_a_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = Claims::default();
        let mut held: Vec<(String, IpNet)> = Vec::new();
        let ids: Vec<Arc<str>> = ["a", "b", "c"].iter().map(|s| Arc::from(*s)).collect();
        let random_net = |rng: &mut rand::rngs::StdRng| -> IpNet {
            let len = rng.random_range(0..=12u8) + 20;
            let addr =
                std::net::Ipv4Addr::from(0x0a00_0000u32 | rng.random_range(0..1u32 << 20) << 4);
            IpNet::new(IpAddr::V4(addr), len).unwrap().trunc()
        };
        for _ in 0..400 {
            let id = &ids[rng.random_range(0..3)];
            let p = random_net(&mut rng);
            let expected = held
                .iter()
                .any(|(h, q)| h != &**id && gatehouse_policy::overlaps(q, &p));
            let got = c.check(id, &[p], "").is_err();
            assert_eq!(got, expected, "{id} {p} vs {held:?}");
            if !got {
                c.claim(id, &p.to_string(), "");
                held.push((id.to_string(), p));
            }
        }
    }
}
