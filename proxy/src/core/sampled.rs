//! A bounded map whose eviction an attacker cannot aim: when it is full, the weakest of a
//! few randomly sampled entries makes room (the approximated-LFU idea of Redis' eviction).
//! An attacker's many weak entries are what the samples find; a strong entry (a guesser's
//! growing failure count, a ban in force) is almost never the weakest of eight.
//!
//! Entries live in a vector with an index, so sampling is O(1) and removal a swap. The
//! sampling RNG is a seeded xorshift: no global randomness in the core.

use std::collections::HashMap;
use std::hash::Hash;

/// Entries sampled per eviction.
const SAMPLE: usize = 8;

#[derive(Debug)]
pub struct SampledTable<K, V> {
    capacity: usize,
    slots: Vec<(K, V)>,
    index: HashMap<K, usize>,
    rng: u64,
}

impl<K: Hash + Eq + Clone, V> SampledTable<K, V> {
    /// A table of at most `capacity` entries (at least a few samples' worth).
    pub fn new(capacity: usize, seed: u64) -> Self {
        SampledTable {
            capacity: capacity.max(SAMPLE * 4),
            slots: Vec::new(),
            index: HashMap::new(),
            rng: seed | 1,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.index.get(key).map(|&i| &self.slots[i].1)
    }

    /// The entry of `key`, made by `make` if absent. A full table first evicts the sampled
    /// entry whose `rank` is lowest; returns whether it did.
    pub fn entry<R: PartialOrd>(
        &mut self,
        key: K,
        make: impl FnOnce() -> V,
        rank: impl Fn(&V) -> R,
    ) -> (&mut V, bool) {
        if let Some(&i) = self.index.get(&key) {
            return (&mut self.slots[i].1, false);
        }
        let evicted = self.slots.len() >= self.capacity;
        if evicted {
            self.evict_weakest(&rank);
        }
        self.slots.push((key.clone(), make()));
        let i = self.slots.len() - 1;
        self.index.insert(key, i);
        (&mut self.slots[i].1, evicted)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.index.remove(key)?;
        let (_, v) = self.slots.swap_remove(i);
        if let Some((moved, _)) = self.slots.get(i) {
            self.index.insert(moved.clone(), i);
        }
        Some(v)
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn sample(&mut self) -> usize {
        (self.next_random() % self.slots.len() as u64) as usize
    }

    fn evict_weakest<R: PartialOrd>(&mut self, rank: &impl Fn(&V) -> R) {
        let mut victim: Option<(usize, R)> = None;
        for _ in 0..SAMPLE {
            let i = self.sample();
            let r = rank(&self.slots[i].1);
            if victim.as_ref().is_none_or(|(_, best)| r < *best) {
                victim = Some((i, r));
            }
        }
        if let Some((i, _)) = victim {
            let key = self.slots[i].0.clone();
            self.remove(&key);
        }
    }

    /// Removes up to `budget` sampled entries that `idle` says are worth nothing (bounded
    /// work per call), then gives memory back once the table is a quarter full.
    pub fn sweep(&mut self, budget: usize, idle: impl Fn(&V) -> bool) {
        for _ in 0..budget.min(self.slots.len()) {
            if self.slots.is_empty() {
                break;
            }
            let i = self.sample();
            if idle(&self.slots[i].1) {
                let key = self.slots[i].0.clone();
                self.remove(&key);
            }
        }
        if self.slots.capacity() > 4096 && self.slots.len() * 4 < self.slots.capacity() {
            self.slots.shrink_to_fit();
            self.index.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_the_strong_survive_a_flood_of_weak_entries() {
        let mut t: SampledTable<u32, u32> = SampledTable::new(100, 7);
        t.entry(0, || 1000, |v| *v);
        for k in 1..100_000 {
            t.entry(k, || 1, |v| *v);
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.get(&0), Some(&1000));
        assert_eq!(t.remove(&0), Some(1000));
        t.sweep(10_000, |v| *v == 1);
        assert!(t.is_empty());
    }
}
