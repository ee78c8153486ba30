//! The tracker's per-buffer state, kept dense and found through a small index. What every
//! op updates ([`Hot`]) fills one cache line, what only insertion, step boundaries and
//! predictions read ([`Cold`]) a second one, and an id's index entry shares its line with
//! three others: following an op costs about two lines per buffer it touches, where a hash
//! map of whole states spread each over three. A training kernel evicts the tracker from the
//! caches between two ops; an entry's place is plain arithmetic on the id, so a batch of ops
//! (or a ranking's candidates) has its lines requested together
//! ([`BufferTable::prefetch_entry`], then [`BufferTable::prefetch`]) and the misses overlap,
//! where lookups one after another would wait for each in turn.

use crate::encoder::{PHASES, Producer};
use crate::history::UseRange;
use crate::keyindex::KeyIndex;
use dynn_ops::cpu::prefetch_l1;

/// `last_forward` of a buffer not used in the forward pass this step.
pub(crate) const NO_FORWARD: u32 = u32::MAX;

/// What observing an op reads and writes of each buffer it touches: one cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Hot {
    /// Buffer id.
    pub id: u64,
    /// The key the tracker's own history uses (see [`crate::tracker::BufferState::aligned`]).
    pub aligned: u64,
    /// Tracker clock of the op that used it last.
    pub last_use: u64,
    /// Step of that op.
    pub last_step: u64,
    /// The access site of its last use (0: none this step).
    pub last_site: u64,
    /// Ops of the current step that used it.
    pub uses_step: u32,
    /// Index in the step of its last forward use this step ([`NO_FORWARD`]: none).
    pub last_forward: u32,
    /// Ops of each phase that used it this step.
    pub phase_uses: [u32; PHASES],
    /// Phase of its last use.
    pub last_phase: u8,
    /// Kind code of its last use.
    pub kind: u8,
}

/// What is set when a buffer is first seen and at step boundaries, and read by predictions.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
pub(crate) struct Cold {
    /// Its memory manager key (which changes only at step boundaries).
    pub key: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Step it was first seen in.
    pub first_step: u64,
    /// Where the previous step's uses of its aligned key sit in that step's index.
    pub prev: UseRange,
    /// Index within that step of the op that first used it.
    pub first_index: u32,
    /// Ops of earlier steps that used it.
    pub uses_past: u32,
    /// The op that wrote it first, when an op did.
    pub producer: Option<Producer>,
}

const _: () = assert!(std::mem::size_of::<Hot>() == 64 && std::mem::size_of::<Cold>() == 64);

impl Hot {
    /// Whether an op of step `step` (the current one) used it.
    pub fn used_in(&self, step: u64) -> bool {
        self.uses_step > 0 && self.last_step == step
    }

    /// Index within its step of the op that used it last, for a step whose first op had
    /// tracker clock `step_start` (meaningful when that is the step of its last use).
    pub fn last_use_index(&self, step_start: u64) -> u32 {
        self.last_use.saturating_sub(step_start) as u32
    }
}

/// Buffer id → ([`Hot`], [`Cold`]): the states sit densely in two parallel vectors, found
/// through a [`KeyIndex`].
#[derive(Debug, Clone, Default)]
pub(crate) struct BufferTable {
    index: KeyIndex<u32>,
    hot: Vec<Hot>,
    cold: Vec<Cold>,
}

impl BufferTable {
    /// Buffers held.
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    /// Where buffer `id`'s state sits.
    #[inline]
    pub fn find(&self, id: u64) -> Option<usize> {
        self.index.get(id).map(|at| at as usize)
    }

    /// Buffer `id`'s state.
    pub fn get(&self, id: u64) -> Option<(&Hot, &Cold)> {
        self.find(id).map(|i| (&self.hot[i], &self.cold[i]))
    }

    /// Buffer `id`'s hot part.
    pub fn hot(&self, id: u64) -> Option<&Hot> {
        self.find(id).map(|i| &self.hot[i])
    }

    /// The state at `at` (from [`BufferTable::find`] or [`BufferTable::insert`]).
    pub fn at_mut(&mut self, at: usize) -> (&mut Hot, &mut Cold) {
        (&mut self.hot[at], &mut self.cold[at])
    }

    /// Adds a buffer the table does not hold (`hot.id`); returns where its state sits.
    pub fn insert(&mut self, hot: Hot, cold: Cold) -> usize {
        debug_assert!(self.find(hot.id).is_none());
        let at = self.hot.len();
        self.hot.push(hot);
        self.cold.push(cold);
        self.index.insert(hot.id, at as u32);
        at
    }

    /// Keeps the buffers for which `keep` (which may update them) says so, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut Hot, &mut Cold) -> bool) {
        let mut kept = 0;
        for at in 0..self.hot.len() {
            if keep(&mut self.hot[at], &mut self.cold[at]) {
                self.hot.swap(kept, at);
                self.cold.swap(kept, at);
                kept += 1;
            }
        }
        self.hot.truncate(kept);
        self.cold.truncate(kept);
        self.index.clear_for(kept);
        for (at, h) in self.hot.iter().enumerate() {
            self.index.insert(h.id, at as u32);
        }
    }

    /// Asks the CPU to bring the index entry of buffer `id` into the cache without waiting
    /// for it: the first of the two steps of [`BufferTable::prefetch`], for a batch of ids
    /// at once.
    #[inline]
    pub fn prefetch_entry(&self, id: u64) {
        self.index.prefetch(id);
    }

    /// Asks the CPU to bring buffer `id`'s state into the cache (both lines when `cold`),
    /// without waiting for it; looks the id up, so its index entry should have been asked
    /// for first ([`BufferTable::prefetch_entry`]). Returns whether the table holds `id`.
    #[inline]
    pub fn prefetch(&self, id: u64, cold: bool) -> bool {
        let Some(at) = self.find(id) else {
            return false;
        };
        prefetch_l1(&self.hot[at]);
        if cold {
            prefetch_l1(&self.cold[at]);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn hot(id: u64, x: u64) -> Hot {
        Hot {
            id,
            last_use: x,
            aligned: 0,
            last_step: 0,
            last_site: 0,
            uses_step: 0,
            last_forward: NO_FORWARD,
            phase_uses: [0; PHASES],
            last_phase: 0,
            kind: 0,
        }
    }

    fn cold(x: u64) -> Cold {
        Cold {
            key: x,
            ..Cold::default()
        }
    }

    #[test]
    fn it_holds_what_a_map_holds_through_inserts_updates_and_retains() {
        let mut t = BufferTable::default();
        let mut m: HashMap<u64, u64> = HashMap::new();
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..40u64 {
            // New ids in a run (as a step makes them), a few old ones touched again.
            for k in 0..300 {
                let id = round * 200 + k;
                let x = next();
                match t.find(id) {
                    Some(i) => {
                        let (h, c) = t.at_mut(i);
                        h.last_use = x;
                        c.key = x;
                    }
                    None => {
                        t.insert(hot(id, x), cold(x));
                    }
                }
                m.insert(id, x);
            }
            let cut = next() % 4;
            t.retain(|h, _| h.last_use % 4 != cut);
            m.retain(|_, x| *x % 4 != cut);
            assert_eq!(t.len(), m.len());
            for (&id, &x) in &m {
                let (h, c) = t.get(id).expect("kept");
                assert_eq!((h.id, h.last_use, c.key), (id, x, x));
            }
            for id in [round * 200 + 300, 7 << 50, 1 << 40] {
                assert!(t.find(id).is_none() || m.contains_key(&id));
            }
            assert_eq!(t.index.len(), t.len());
        }
    }
}
