//! Recomputation as the memory manager does it: an output keeps its op's recipe; dropping it
//! needs every input of the recipe alive (not yet released by the run), and the recipe then
//! holds them until the buffer is recomputed or released; recomputing needs them resident
//! first (recomputing dropped ones in turn); a recipe whose input was written in place since
//! no longer reproduces the buffer; and a candidate is priced with the dropped buffers around
//! it, as DTR prices evicted neighbourhoods.

use super::{Buf, Place, Replay};
use crate::keymap::KeyMap;
use crate::pool::Block;
use crate::trace::OpRecord;
use dynn_core::{Error, Result};

/// How to compute a buffer again: its op's inputs (each with the version it had) and cost.
#[derive(Debug, Clone)]
pub(super) struct Recipe {
    inputs: Vec<(u64, u32)>,
    flops: u64,
    bytes: u64,
}

impl Recipe {
    /// The recipe of `op`'s outputs, its inputs as they are now.
    pub(super) fn of(op: &OpRecord, bufs: &KeyMap<u64, Buf>) -> Self {
        let mut inputs: Vec<(u64, u32)> = Vec::with_capacity(op.inputs.len());
        for a in &op.inputs {
            if !inputs.iter().any(|i| i.0 == a.0) {
                inputs.push((a.0, bufs.get(&a.0).map_or(0, |b| b.version)));
            }
        }
        Recipe {
            inputs,
            flops: op.flops,
            bytes: op.bytes_read + op.bytes_written,
        }
    }

    /// The buffers it reads.
    pub(super) fn inputs(&self) -> impl Iterator<Item = u64> + '_ {
        self.inputs.iter().map(|i| i.0)
    }

    /// No input was written in place since: running it again gives the same bytes.
    fn is_fresh(&self, bufs: &KeyMap<u64, Buf>) -> bool {
        self.inputs
            .iter()
            .all(|&(id, version)| bufs.get(&id).is_some_and(|b| b.version == version))
    }
}

/// The dropped buffers grouped into clusters joined by recipe edges, each with the FLOPs to
/// recompute its members (the memory manager's `DroppedClusters`, built afresh per round of
/// evictions).
pub(super) struct Clusters {
    /// Dropped buffer → its cluster.
    cluster: KeyMap<u64, usize>,
    /// FLOPs per cluster.
    flops: Vec<u64>,
}

impl Clusters {
    /// The clusters of the dropped buffers in `bufs`.
    pub(super) fn of(bufs: &KeyMap<u64, Buf>) -> Self {
        let dropped: Vec<(u64, &Buf)> = bufs
            .iter()
            .filter(|(_, b)| b.place == Place::Dropped)
            .map(|(&id, b)| (id, b))
            .collect();
        let index: KeyMap<u64, usize> = dropped
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        let mut parent: Vec<usize> = (0..dropped.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for (i, (_, b)) in dropped.iter().enumerate() {
            for input in b.recipe.iter().flat_map(|r| r.inputs()) {
                if let Some(&j) = index.get(&input) {
                    let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                    parent[ri] = rj;
                }
            }
        }
        let mut flops = vec![0u64; dropped.len()];
        let mut cluster = KeyMap::default();
        for (i, (id, b)) in dropped.iter().enumerate() {
            let r = root(&mut parent, i);
            let own = b.recipe.as_ref().map_or(0, |recipe| recipe.flops);
            flops[r] = flops[r].saturating_add(own);
            cluster.insert(*id, r);
        }
        Clusters { cluster, flops }
    }

    /// FLOPs to recompute every distinct cluster that one of `ids` belongs to.
    fn cost_around(&self, ids: impl Iterator<Item = u64>) -> u64 {
        let mut seen: Vec<usize> = Vec::new();
        let mut total = 0u64;
        for id in ids {
            if let Some(&c) = self.cluster.get(&id)
                && !seen.contains(&c)
            {
                seen.push(c);
                total = total.saturating_add(self.flops[c]);
            }
        }
        total
    }
}

impl Replay<'_> {
    /// Its inputs are read by one more live recipe.
    pub(super) fn hold(&mut self, recipe: &Recipe) {
        for id in recipe.inputs() {
            if let Some(b) = self.bufs.get_mut(&id) {
                b.holders += 1;
            }
        }
    }

    /// A recipe is gone: its inputs are read by one recipe fewer, and those the run released
    /// that no recipe reads now are freed.
    pub(super) fn unhold(&mut self, recipe: Recipe) {
        for id in self.unheld(&recipe) {
            self.free(id);
        }
    }

    /// [`Self::unhold`]'s count; returns the buffers to free.
    pub(super) fn unheld(&mut self, recipe: &Recipe) -> Vec<u64> {
        let mut free = Vec::new();
        for id in recipe.inputs() {
            if let Some(b) = self.bufs.get_mut(&id) {
                b.holders = b.holders.saturating_sub(1);
                if b.holders == 0 && b.released {
                    free.push(id);
                }
            }
        }
        free
    }

    /// Recomputes the dropped buffer `id`: its recipe's inputs are made resident (and pinned
    /// while it runs), then room is made for it and its kernel runs. Returns its block.
    pub(super) fn recompute(&mut self, id: u64) -> Result<Option<Block>> {
        let Some((recipe, bytes)) = self
            .bufs
            .get(&id)
            .and_then(|b| Some((b.recipe.clone()?, b.bytes)))
        else {
            return Err(Error::Msg(format!(
                "simulated: buffer {id} was dropped without a recipe to recompute it"
            )));
        };
        let mark = self.pinned.len();
        self.pinned.extend(recipe.inputs());
        let block = self.gather_and_alloc(&recipe, bytes);
        self.pinned.truncate(mark);
        let block = block?;
        let t = self.profile.kernel_s(recipe.flops, recipe.bytes);
        self.now += t;
        self.r.compute_ms += t * 1e3;
        self.r.recomputed_flops += recipe.flops;
        self.dropped -= 1;
        // Back: its recipe no longer holds the inputs (those the run released go).
        self.unhold(recipe);
        Ok(block)
    }

    fn gather_and_alloc(&mut self, recipe: &Recipe, bytes: usize) -> Result<Option<Block>> {
        for input in recipe.inputs() {
            self.make_resident(input)?;
        }
        self.alloc(bytes)
    }

    /// Recomputes the dropped buffers whose recipes read `id`, before an op writes it in place.
    pub(super) fn recompute_dependents(&mut self, id: u64) -> Result<()> {
        for d in self.dependents.remove(&id).unwrap_or_default() {
            if self.bufs.get(&d).is_some_and(|b| b.place == Place::Dropped) {
                self.make_resident(d)?;
            }
        }
        Ok(())
    }

    /// What dropping buffer `id` would cost to undo, as the policy sees it: its own FLOPs and
    /// those of the dropped clusters around it (its recipe's dropped inputs and the dropped
    /// buffers whose recipes read it). `None` when it cannot be dropped: no recipe (the policy
    /// does not drop, it was made outside ops or written in place), a stale one, or one that
    /// reads a buffer the op writes in place.
    pub(super) fn recompute_flops(
        &self,
        id: u64,
        b: &Buf,
        clusters: Option<&Clusters>,
    ) -> Option<u64> {
        let recipe = b.recipe.as_ref()?;
        if !recipe.is_fresh(&self.bufs) || recipe.inputs().any(|i| self.writing.contains(&i)) {
            return None;
        }
        let around = clusters.map_or(0, |c| {
            let dependents = self.dependents.get(&id).into_iter().flatten().copied();
            c.cost_around(recipe.inputs().chain(dependents))
        });
        Some(recipe.flops.saturating_add(around))
    }
}
