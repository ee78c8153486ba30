//! One step's access order by buffer key, as the pilot records it: the previous step replayed
//! tells where a key was used next from the same position (exact while the graph repeats).

use crate::keyindex::KeyIndex;

/// A map keyed by buffer ids or keys.
pub type KeyMap<V> = dynn_mm::KeyMap<u64, V>;

/// Where a key's uses sit in a sealed [`StepProfile`]'s index: looked up once and kept by
/// whoever asks about the same key often (empty: the step did not use it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UseRange {
    start: u32,
    len: u32,
}

/// The ops (one-hot slots) and key uses of one step. The queries by key answer for the ops
/// pushed before the last [`StepProfile::seal`].
#[derive(Debug, Clone, Default)]
pub struct StepProfile {
    /// The one-hot slot of each op, in order (to tell whether a step repeats this one).
    slots: Vec<u16>,
    /// The phase code of each op.
    phases: Vec<u8>,
    /// Keys touched, op after op.
    keys: Vec<u64>,
    /// `keys[starts[i]..starts[i + 1]]` are the keys of op `i`.
    starts: Vec<u32>,
    /// Key → `(start, len)` of its ops in `use_ops`, built by [`StepProfile::seal`].
    uses: KeyIndex<(u32, u32)>,
    /// The sorted indices of the ops that touch each key, key after key.
    use_ops: Vec<u32>,
    /// Per phase code, the index of its first op and one past its last (a step's phases run
    /// one after the other).
    phase_range: [(u32, u32); 3],
}

impl StepProfile {
    /// Appends op number `self.len()`, with its slot, phase and the keys it reads and writes.
    pub fn push(&mut self, slot: u16, phase: u8, keys: impl IntoIterator<Item = u64>) {
        let index = self.slots.len() as u32;
        if self.starts.is_empty() {
            self.starts.push(0);
        }
        self.slots.push(slot);
        self.phases.push(phase);
        if let Some(r) = self.phase_range.get_mut(phase as usize) {
            if r.1 == 0 {
                r.0 = index;
            }
            r.1 = index + 1;
        }
        let first = self.keys.len();
        for k in keys {
            if !self.keys[first..].contains(&k) {
                self.keys.push(k);
            }
        }
        self.starts.push(self.keys.len() as u32);
    }

    /// Indexes the ops pushed so far by key, for the queries ([`StepProfile::next_use`],
    /// [`StepProfile::gap`], [`StepProfile::nth_use_in_phase`]). Done once, when the step
    /// ends: building the index in one pass over the step touches memory in order, where
    /// updating it on every op would miss the cache the op's kernel just flushed.
    pub fn seal(&mut self) {
        self.uses.clear_for(self.keys.len());
        for &k in &self.keys {
            self.uses.entry(k).1 += 1;
        }
        let mut start = 0;
        for u in self.uses.values_mut() {
            let count = u.1;
            *u = (start, 0);
            start += count;
        }
        self.use_ops.clear();
        self.use_ops.resize(self.keys.len(), 0);
        for (op, w) in self.starts.windows(2).enumerate() {
            for k in &self.keys[w[0] as usize..w[1] as usize] {
                let u = self.uses.entry(*k);
                if let Some(slot) = self.use_ops.get_mut((u.0 + u.1) as usize) {
                    *slot = op as u32;
                }
                u.1 += 1;
            }
        }
    }

    /// Where the uses of `key` sit in the index (sealed ops only).
    pub fn range_of(&self, key: u64) -> UseRange {
        self.uses
            .get(key)
            .map_or(UseRange::default(), |(start, len)| UseRange { start, len })
    }

    /// Asks the CPU to fetch what [`StepProfile::range_of`] reads for `key`, without waiting.
    pub(crate) fn prefetch_range_of(&self, key: u64) {
        self.uses.prefetch(key);
    }

    /// The sorted indices of the ops in `range`.
    fn uses_in(&self, range: UseRange) -> &[u32] {
        let (start, len) = (range.start as usize, range.len as usize);
        self.use_ops.get(start..start + len).unwrap_or(&[])
    }

    /// Ops recorded.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no op is recorded.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot of op `index`.
    pub fn slot(&self, index: usize) -> Option<u16> {
        self.slots.get(index).copied()
    }

    /// Ops from op `after` (`None`: before the first op) to the next use of `key` within the
    /// step; `None` when the step does not use it again.
    pub fn next_use(&self, after: Option<u32>, key: u64) -> Option<u64> {
        self.next_use_in(after, self.range_of(key))
    }

    /// [`StepProfile::next_use`] of the key whose uses are `range`.
    pub fn next_use_in(&self, after: Option<u32>, range: UseRange) -> Option<u64> {
        let uses = self.uses_in(range);
        let from = after.map_or(-1, |a| a as i64);
        let pos = uses.partition_point(|&u| (u as i64) <= from);
        uses.get(pos).map(|&u| (u as i64 - from) as u64)
    }

    /// The gap in ops between the `k`-th and `k+1`-th ops that use `key` (`k ≥ 1`; `None`
    /// when the step used it at most `k` times).
    pub fn gap(&self, key: u64, k: u32) -> Option<u64> {
        let uses = self.uses_in(self.range_of(key));
        let k = k as usize;
        match (k.checked_sub(1).and_then(|i| uses.get(i)), uses.get(k)) {
            (Some(&a), Some(&b)) => Some((b - a) as u64),
            _ => None,
        }
    }

    /// The index of the `rank`-th op (from 1) of phase `phase` that uses `key`.
    pub fn nth_use_in_phase(&self, key: u64, phase: u8, rank: u32) -> Option<u32> {
        self.nth_use_in_phase_in(self.range_of(key), phase, rank)
    }

    /// [`StepProfile::nth_use_in_phase`] of the key whose uses are `range`.
    pub fn nth_use_in_phase_in(&self, range: UseRange, phase: u8, rank: u32) -> Option<u32> {
        let uses = self.uses_in(range);
        let (start, end) = *self.phase_range.get(phase as usize)?;
        let first = uses.partition_point(|&u| u < start);
        let at = *uses.get(first + (rank as usize).checked_sub(1)?)?;
        (at < end && self.phases.get(at as usize) == Some(&phase)).then_some(at)
    }

    /// Appends to `out` the keys used by the `horizon` ops after op `after`, soonest first
    /// (a key used by several of them repeats: callers skip what is already coming).
    pub fn upcoming(&self, after: Option<u32>, horizon: usize, out: &mut Vec<u64>) {
        let first = after.map_or(0, |a| a as usize + 1);
        let last = (first + horizon).min(self.slots.len());
        if first >= last {
            return;
        }
        let (a, b) = (self.starts[first] as usize, self.starts[last] as usize);
        out.extend_from_slice(&self.keys[a..b]);
    }

    /// Forgets everything, keeping the allocations.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.phases.clear();
        self.keys.clear();
        self.starts.clear();
        self.uses.clear_for(0);
        self.use_ops.clear();
        self.phase_range = [(0, 0); 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_use_and_upcoming_follow_the_recorded_order() {
        let mut p = StepProfile::default();
        p.push(1, 0, [10, 11]);
        p.push(2, 0, [11, 11, 12]);
        p.push(3, 1, [10]);
        p.seal();
        assert_eq!(p.len(), 3);
        assert_eq!(p.next_use(None, 10), Some(1));
        assert_eq!(p.next_use(Some(0), 10), Some(2));
        assert_eq!(p.next_use(Some(2), 10), None);
        assert_eq!(p.next_use(Some(0), 99), None);
        assert_eq!(p.gap(10, 1), Some(2));
        assert_eq!(p.gap(10, 2), None);
        assert_eq!(p.gap(11, 1), Some(1));
        assert_eq!(p.nth_use_in_phase(10, 0, 1), Some(0));
        assert_eq!(p.nth_use_in_phase(10, 1, 1), Some(2));
        assert_eq!(p.nth_use_in_phase(10, 1, 2), None);
        let mut out = Vec::new();
        p.upcoming(Some(0), 5, &mut out);
        assert_eq!(out, [11, 12, 10]);
        out.clear();
        p.upcoming(None, 3, &mut out);
        assert_eq!(out, [10, 11, 11, 12, 10]);
        out.clear();
        p.upcoming(None, 1, &mut out);
        assert_eq!(out, [10, 11]);
    }
}
