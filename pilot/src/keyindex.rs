//! [`KeyIndex`]: a map from `u64` keys (buffer ids, aligned keys) to small values, in one flat
//! array of 16-byte entries, four to a cache line. A key's first probe is plain arithmetic on
//! the key, so the tracker asks for the lines of a whole batch of lookups at once
//! ([`KeyIndex::prefetch`]) and their cache misses overlap — a training kernel evicts the
//! pilot's state between two ops, and a hash map whose buckets are found through control
//! bytes would take those misses one after another.

use dynn_ops::cpu::prefetch_l1;

/// The key of an empty entry (ids and keys never reach it).
const EMPTY: u64 = u64::MAX;

/// The smallest array, in entries.
const MIN_SLOTS: usize = 64;

/// `u64` key → `V`, open addressing with linear probing, at most half full.
#[derive(Debug, Clone)]
pub(crate) struct KeyIndex<V> {
    slots: Vec<(u64, V)>,
    len: usize,
    /// `64 − log2(slots.len())`: a key's home entry is the top bits of its Fibonacci hash.
    shift: u32,
}

impl<V: Copy + Default> Default for KeyIndex<V> {
    fn default() -> Self {
        Self::with_slots(MIN_SLOTS)
    }
}

impl<V: Copy + Default> KeyIndex<V> {
    fn with_slots(slots: usize) -> Self {
        KeyIndex {
            slots: vec![(EMPTY, V::default()); slots],
            len: 0,
            shift: 64 - slots.trailing_zeros(),
        }
    }

    /// Keys held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// Where `key` is, or the empty entry where it would go.
    #[inline]
    fn probe(&self, key: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        while self.slots[i].0 != key && self.slots[i].0 != EMPTY {
            i = (i + 1) & mask;
        }
        i
    }

    /// The value of `key` (`None` for the reserved key `u64::MAX`, which no id or key
    /// reaches).
    #[inline]
    pub fn get(&self, key: u64) -> Option<V> {
        let e = self.slots[self.probe(key)];
        (e.0 == key && key != EMPTY).then_some(e.1)
    }

    /// The value of `key`, inserted as `V::default()` when absent (for the reserved key
    /// `u64::MAX`, a scratch value that no lookup finds).
    pub fn entry(&mut self, key: u64) -> &mut V {
        let mut i = self.probe(key);
        if self.slots[i].0 != key {
            if (self.len + 1) * 2 > self.slots.len() {
                self.grow_to(self.len + 1);
                i = self.probe(key);
            }
            self.slots[i] = (key, V::default());
            self.len += 1;
        }
        &mut self.slots[i].1
    }

    /// Sets `key`'s value.
    pub fn insert(&mut self, key: u64, value: V) {
        *self.entry(key) = value;
    }

    /// Every value, in no particular order.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.slots
            .iter_mut()
            .filter(|e| e.0 != EMPTY)
            .map(|e| &mut e.1)
    }

    /// Forgets every key; the array shrinks to a quarter full for `room` keys (or stays).
    pub fn clear_for(&mut self, room: usize) {
        let slots = (room * 4).next_power_of_two().max(MIN_SLOTS);
        if slots < self.slots.len() / 4 || slots > self.slots.len() {
            *self = Self::with_slots(slots);
        } else {
            self.slots.fill((EMPTY, V::default()));
            self.len = 0;
        }
    }

    /// Rehashes into an array a quarter full for `room` keys.
    fn grow_to(&mut self, room: usize) {
        let old = std::mem::replace(self, Self::with_slots((room * 4).next_power_of_two()));
        for (k, v) in old.slots {
            if k != EMPTY {
                let i = self.probe(k);
                self.slots[i] = (k, v);
                self.len += 1;
            }
        }
    }

    /// Asks the CPU to bring `key`'s first entry into the cache, without waiting for it.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        prefetch_l1(&self.slots[self.home(key)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn it_holds_what_a_hash_map_holds() {
        let mut ix: KeyIndex<(u32, u32)> = KeyIndex::default();
        let mut m: HashMap<u64, (u32, u32)> = HashMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..30u32 {
            for _ in 0..500 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // Runs of nearby keys and scattered ones, as ids and aligned keys are.
                let key = if rng % 3 == 0 { rng >> 1 } else { rng % 700 };
                let e = ix.entry(key);
                e.0 += 1;
                e.1 = round;
                let f = m.entry(key).or_default();
                f.0 += 1;
                f.1 = round;
            }
            assert_eq!(ix.len(), m.len());
            for (&k, &v) in &m {
                assert_eq!(ix.get(k), Some(v));
            }
            assert_eq!(ix.get(701), None);
            assert_eq!(ix.get(u64::MAX), None);
            assert!(ix.len() * 2 <= ix.slots.len());
            if round % 7 == 6 {
                ix.clear_for(round as usize * 10);
                m.clear();
                assert_eq!(ix.get(3), None);
            }
        }
        ix.insert(5, (1, 2));
        assert_eq!(ix.get(5), Some((1, 2)));
        assert_eq!(ix.values_mut().count(), ix.len());
    }
}
