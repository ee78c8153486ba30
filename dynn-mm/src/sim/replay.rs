//! One replay of recorded ops: the buffers, device memory and clocks, and what the policy's
//! choices cost on them (copies, stalls, recomputations).

mod recompute;
mod room;

use super::{DeviceProfile, PREFETCH_HORIZON, SimMemory, SimResult};
use crate::keymap::KeyMap;
use crate::policy::{Candidate, Eviction, Now, Policy};
use crate::pool::{Block, DevicePool};
use crate::trace::{Access, OpRecord, kind_of};
use dynn_core::{BufferId, BufferKind, Error, Result};
use recompute::{Clusters, Recipe};

/// Device memory during a replay: the live bytes, and the pool under [`SimMemory::Pool`].
struct Memory {
    used: usize,
    budget: usize,
    pool: Option<DevicePool>,
}

impl Memory {
    fn new(model: SimMemory, budget: usize) -> Self {
        let pool = match model {
            SimMemory::Bytes => None,
            SimMemory::Pool(small, large) => {
                Some(DevicePool::with_segments(Some(budget), small, large))
            }
        };
        Memory {
            used: 0,
            budget,
            pool,
        }
    }

    /// Takes `bytes` if they fit as things stand; `Err` when room must be made first.
    fn take(&mut self, bytes: usize) -> std::result::Result<Option<Block>, ()> {
        let block = match &mut self.pool {
            None if self.used + bytes > self.budget => return Err(()),
            None => None,
            Some(pool) => Some(pool.allocate(bytes).map_err(|_| ())?),
        };
        self.used += bytes;
        Ok(block)
    }

    /// Gives back `bytes` (and their block).
    fn give(&mut self, bytes: usize, block: Option<Block>) {
        self.used -= bytes;
        if let (Some(pool), Some(b)) = (&mut self.pool, block) {
            pool.release(b);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Device,
    Host,
    /// Arriving on the device at this time.
    Arriving(f64),
    Dropped,
}

struct Buf {
    bytes: usize,
    /// Its pool block while on the device (under [`SimMemory::Pool`]).
    block: Option<Block>,
    key: u64,
    kind: u8,
    place: Place,
    last_use: u64,
    uses: u32,
    /// How to compute it again (kept only under a policy that drops, as the memory manager
    /// keeps an op's recipe only then); `None` once written in place. It holds the op's
    /// inputs alive only while this buffer is dropped.
    recipe: Option<Recipe>,
    /// Times written in place: a recipe that read an older version no longer reproduces
    /// what was computed from it.
    version: u32,
    /// Recipes of live buffers that read it: while any does, it lives on.
    holders: u32,
    /// The run released it while recipes still held it: it is freed with the last of them.
    released: bool,
    /// The host tier holds a current copy (fetched or written back, and not written since):
    /// evicting it copies nothing, as [`dynn_core::Buffer::offload`] does.
    clean: bool,
    /// When its write-back's copy has left the device (an eviction before waits for it).
    clean_at: f64,
}

impl Buf {
    fn new(a: &Access, block: Option<Block>, seq: u64, recipe: Option<Recipe>) -> Self {
        Buf {
            bytes: a.1 as usize,
            block,
            key: a.3,
            kind: a.2,
            place: Place::Device,
            last_use: seq,
            uses: 0,
            recipe,
            version: 0,
            holders: 0,
            released: false,
            clean: false,
            clean_at: 0.0,
        }
    }
}

/// [`simulate`](super::simulate) with device memory accounted as `memory` says, after replaying `warmup` (the
/// step before `ops`, or nothing) untimed, so that `ops` starts from the device memory that
/// step left: the buffers that outlive a step (parameters, optimizer state) are then where a
/// real run has them, on the device until evicted, rather than placed at first use. The
/// policy sees `warmup`, then a step boundary, then `ops`.
pub fn simulate_with(
    warmup: &[OpRecord],
    ops: &[OpRecord],
    policy: &mut dyn Policy,
    budget: Option<usize>,
    profile: &DeviceProfile,
    memory: SimMemory,
) -> Result<SimResult> {
    let budget = budget.unwrap_or(usize::MAX);
    let all: Vec<&OpRecord> = warmup.iter().chain(ops).collect();
    // A trace that recorded releases frees buffers when the run did; otherwise at last access.
    let frees_recorded = all.iter().any(|o| !o.freed.is_empty());
    let mut last_access: KeyMap<u64, usize> = KeyMap::default();
    for (g, op) in all.iter().enumerate() {
        for a in op.inputs.iter().chain(&op.outputs) {
            last_access.insert(a.0, g);
        }
    }
    let mut replay = Replay {
        drops: policy.drops(),
        policy,
        profile,
        budget,
        bufs: KeyMap::default(),
        by_key: KeyMap::default(),
        dependents: KeyMap::default(),
        dropped: 0,
        mem: Memory::new(memory, budget),
        now: 0.0,
        h2d_free: 0.0,
        d2h_free: 0.0,
        r: SimResult::default(),
        clock: Now::default(),
        pinned: Vec::new(),
        writing: Vec::new(),
        leaving: Vec::new(),
        ahead_ranking: Vec::new(),
        ahead_ranked_at: 0,
    };
    let mut upcoming = Vec::new();
    for (g, &op) in all.iter().enumerate() {
        if g == warmup.len() && g > 0 {
            replay.restart(op.step);
        }
        let index = if g < warmup.len() {
            g
        } else {
            g - warmup.len()
        };
        replay.clock = Now {
            seq: g as u64,
            step: op.step,
            index: index as u32,
        };
        op.announce_to(replay.policy);
        replay.run_op(op)?;
        // Free what the run released after this op, or (without release records) what the
        // trace never touches again; parameters and optimizer state outlive the step (they
        // stay where they are, evictable).
        if frees_recorded {
            for &id in &op.freed {
                replay.release(id);
            }
        } else {
            for a in op.inputs.iter().chain(&op.outputs) {
                if last_access.get(&a.0) == Some(&g)
                    && !matches!(
                        kind_of(a.2),
                        BufferKind::Parameter | BufferKind::OptimizerState
                    )
                {
                    replay.release(a.0);
                }
            }
        }
        replay.write_back();
        replay.land_leaving();
        replay.prefetch(&mut upcoming);
    }
    replay.r.step_ms = replay.now * 1e3;
    Ok(replay.r)
}

/// The state of a replay.
struct Replay<'a> {
    policy: &'a mut dyn Policy,
    profile: &'a DeviceProfile,
    budget: usize,
    /// The policy drops buffers to recompute them: outputs keep recipes.
    drops: bool,
    bufs: KeyMap<u64, Buf>,
    by_key: KeyMap<u64, u64>,
    /// Buffer → dropped buffers whose recipes read it (recomputed before it is overwritten).
    dependents: KeyMap<u64, Vec<u64>>,
    /// Buffers dropped now.
    dropped: usize,
    mem: Memory,
    /// The compute stream's clock, and when each copy stream is next free, seconds.
    now: f64,
    h2d_free: f64,
    d2h_free: f64,
    r: SimResult,
    clock: Now,
    /// Never evicted now: the op's own buffers, then the inputs of each recomputation in
    /// progress, outermost first.
    pinned: Vec<u64>,
    /// The op's outputs that exist already (written in place).
    writing: Vec<u64>,
    /// Victims written back ahead of need: evicted once their copy has left, unless used again.
    leaving: Vec<(u64, u64)>,
    /// The last ranking made to evict ahead, and the op when it was made.
    ahead_ranking: Vec<Candidate>,
    ahead_ranked_at: u64,
}

impl Replay<'_> {
    /// The timed step begins: copies have landed, buffers from before are named by id (as the
    /// memory manager renames them at a step boundary), clocks restart.
    fn restart(&mut self, step: u64) {
        self.policy.step_boundary(step);
        self.by_key.clear();
        for (&id, b) in self.bufs.iter_mut() {
            b.key = id;
            if let Place::Arriving(_) = b.place {
                b.place = Place::Device;
            }
            // So have write-backs: their completion times belong to the old clock.
            b.clean_at = 0.0;
            self.by_key.insert(id, id);
        }
        (self.now, self.h2d_free, self.d2h_free) = (0.0, 0.0, 0.0);
        self.ahead_ranking.clear();
        self.r = SimResult {
            peak_device_bytes: self.mem.used,
            ..SimResult::default()
        };
    }

    /// Brings `op`'s inputs to the device, makes room for its outputs and runs its kernel.
    fn run_op(&mut self, op: &OpRecord) -> Result<()> {
        let seq = self.clock.seq;
        let stall_before = self.r.stall_ms;
        self.pinned.clear();
        self.pinned
            .extend(op.inputs.iter().chain(&op.outputs).map(|a| a.0));
        self.writing.clear();
        for a in &op.outputs {
            if self.bufs.contains_key(&a.0) {
                self.writing.push(a.0);
            }
        }
        if self.drops {
            // Dropped buffers computed from the old values of a buffer this op writes in
            // place are recomputed now, while they can be.
            for w in self.writing.clone() {
                self.recompute_dependents(w)?;
            }
        }
        // Inputs: resident, arriving, in the host tier, dropped, or first seen (made outside ops).
        for a in &op.inputs {
            let (start, issued) = (self.now, self.r.host_ms());
            if self.bufs.contains_key(&a.0) {
                self.make_resident(a.0)?;
            } else {
                self.first_seen(a, seq)?;
            }
            self.r.stall_ms += (self.now - start) * 1e3 - (self.r.host_ms() - issued);
        }
        // The recipe of the fresh outputs, read before this op writes anything in place.
        let recipe = self.drops.then(|| Recipe::of(op, &self.bufs));
        let mut stale = Vec::new();
        for a in &op.outputs {
            if let Some(b) = self.bufs.get_mut(&a.0) {
                // Written in place: the host copy is stale, and so is its recipe.
                b.clean = false;
                b.version += 1;
                let holding = b.place == Place::Dropped;
                stale.extend(b.recipe.take().filter(|_| holding));
                continue;
            }
            let (start, issued) = (self.now, self.r.host_ms());
            let block = self.alloc(a.1 as usize)?;
            self.r.stall_ms += (self.now - start) * 1e3 - (self.r.host_ms() - issued);
            self.bufs
                .insert(a.0, Buf::new(a, block, seq, recipe.clone()));
            self.by_key.insert(a.3, a.0);
        }
        self.r.peak_device_bytes = self.r.peak_device_bytes.max(self.mem.used);
        let t = self
            .profile
            .kernel_s(op.flops, op.bytes_read + op.bytes_written);
        self.now += t;
        self.r.compute_ms += t * 1e3;
        self.policy.observe(op);
        self.r.stall_ms_by_phase[usize::from(op.phase.min(2))] += self.r.stall_ms - stall_before;
        for a in op.inputs.iter().chain(&op.outputs) {
            if let Some(b) = self.bufs.get_mut(&a.0) {
                b.last_use = seq;
                b.uses += 1;
            }
        }
        for recipe in stale {
            self.unhold(recipe);
        }
        Ok(())
    }

    /// A buffer made before the step (parameters, optimizer state, inputs): left on the
    /// device by the previous step if it still fits, else in the host tier.
    fn first_seen(&mut self, a: &Access, seq: u64) -> Result<()> {
        let block = match self.mem.take(a.1 as usize) {
            Ok(block) => block,
            Err(()) => {
                let block = self.alloc(a.1 as usize)?;
                self.fetch(a.1);
                block
            }
        };
        self.bufs.insert(a.0, Buf::new(a, block, seq, None));
        self.by_key.insert(a.3, a.0);
        Ok(())
    }

    /// Makes buffer `id` resident: waits for its prefetch, fetches it or recomputes it.
    fn make_resident(&mut self, id: u64) -> Result<()> {
        let Some(b) = self.bufs.get(&id) else {
            return Ok(());
        };
        let (place, bytes) = (b.place, b.bytes);
        let mut block = None;
        match place {
            Place::Device => {}
            Place::Arriving(t) => self.now = self.now.max(t),
            Place::Host => {
                block = self.alloc(bytes)?;
                self.fetch(bytes as u64);
                if let Some(b) = self.bufs.get_mut(&id) {
                    b.clean = true;
                }
            }
            Place::Dropped => block = self.recompute(id)?,
        }
        if let Some(b) = self.bufs.get_mut(&id) {
            b.place = Place::Device;
            if block.is_some() {
                b.block = block;
            }
        }
        Ok(())
    }

    /// Copies `bytes` host→device on demand: the executor issues the move and waits for it.
    fn fetch(&mut self, bytes: u64) {
        self.profile.issue_move(&mut self.now, &mut self.r);
        let begin = self.now.max(self.h2d_free);
        self.h2d_free = begin + self.profile.h2d_s(bytes);
        self.now = self.h2d_free;
        self.r.bytes_h2d += bytes;
        self.r.demand_fetches += 1;
    }

    /// The run released buffer `id`: it is freed, unless recipes still read it.
    fn release(&mut self, id: u64) {
        let Some(b) = self.bufs.get_mut(&id) else {
            return;
        };
        if b.holders > 0 {
            b.released = true;
        } else {
            self.free(id);
        }
    }

    /// Frees buffer `id`, and with its recipe the released buffers only it still held.
    fn free(&mut self, id: u64) {
        let mut work = vec![id];
        while let Some(id) = work.pop() {
            let Some(b) = self.bufs.remove(&id) else {
                continue;
            };
            match b.place {
                Place::Device | Place::Arriving(_) => self.mem.give(b.bytes, b.block),
                Place::Dropped => self.dropped -= 1,
                Place::Host => {}
            }
            if self.by_key.get(&b.key) == Some(&id) {
                self.by_key.remove(&b.key);
            }
            self.dependents.remove(&id);
            // A dropped buffer's recipe held its inputs.
            if let Some(recipe) = b.recipe.filter(|_| b.place == Place::Dropped) {
                work.extend(self.unheld(&recipe));
            }
        }
    }

    /// Prefetches what the policy expects soon, while there is free room.
    fn prefetch(&mut self, upcoming: &mut Vec<u64>) {
        upcoming.clear();
        self.policy.upcoming(self.clock, PREFETCH_HORIZON, upcoming);
        for &key in upcoming.iter() {
            let Some(&id) = self.by_key.get(&key) else {
                continue;
            };
            let Some(b) = self.bufs.get_mut(&id) else {
                continue;
            };
            if b.place != Place::Host {
                continue;
            }
            let Ok(block) = self.mem.take(b.bytes) else {
                break;
            };
            b.block = block;
            let begin = self.now.max(self.h2d_free);
            self.h2d_free = begin + self.profile.h2d_s(b.bytes as u64);
            b.place = Place::Arriving(self.h2d_free);
            b.clean = true;
            self.r.bytes_h2d += b.bytes as u64;
            self.r.peak_device_bytes = self.r.peak_device_bytes.max(self.mem.used);
        }
    }
}
