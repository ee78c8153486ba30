//! Making room during a replay, as the memory manager does: the pool's blocks (repacked when
//! free space is scattered), the policy's victims (dropped or copied out), and evicting ahead
//! of need (the next victim written back in the background).

use super::*;

impl Replay<'_> {
    /// Under a budget, while the download link is idle, copies one buffer to the host in the
    /// background, keeping it on the device, as the memory manager does: the policy's next
    /// victim under memory pressure ([`DeviceProfile::evict_ahead`]; it is evicted once its
    /// copy has left, unless used again), else, where asked ([`DeviceProfile::write_back`]),
    /// the least recently used buffer whose host copy is stale. Evicting either later copies
    /// nothing, waiting at most for that copy.
    pub(super) fn write_back(&mut self) {
        if self.budget == usize::MAX || self.d2h_free > self.now {
            return;
        }
        let budget = self.budget;
        let ahead = self
            .profile
            .evict_ahead
            .then(|| self.next_victim())
            .flatten();
        let pick = ahead.or_else(|| {
            self.profile.write_back.then(|| {
                self.bufs
                    .iter()
                    .filter(|(_, b)| {
                        b.place == Place::Device
                            && !b.clean
                            && crate::transfer::write_back_fits(b.bytes, budget)
                    })
                    .min_by_key(|(id, b)| (b.last_use, **id))
                    .map(|(&id, _)| id)
            })?
        });
        let Some((id, b)) = pick.and_then(|id| Some((id, self.bufs.get_mut(&id)?))) else {
            return;
        };
        self.d2h_free = self.now + self.profile.d2h_s(b.bytes as u64);
        b.clean = true;
        b.clean_at = self.d2h_free;
        self.r.bytes_d2h += b.bytes as u64;
        self.r.write_backs += 1;
        if ahead.is_some() {
            self.leaving.push((id, b.last_use));
        }
    }

    /// Under memory pressure (less than `budget / EVICT_AHEAD_SHARE` free), the next victim
    /// to write back ahead of need: among the policy's first victims for that much room, the
    /// first whose host copy is stale, small enough to write back, and not one the policy
    /// would drop instead (dropping needs no copy).
    pub(super) fn next_victim(&mut self) -> Option<u64> {
        let low = self.budget / crate::transfer::EVICT_AHEAD_SHARE;
        let free = self.budget.saturating_sub(self.mem.used);
        if !self.policy.evicts() || free >= low {
            return None;
        }
        let clock = self.clock.seq;
        if self.ahead_ranking.is_empty()
            || clock >= self.ahead_ranked_at + crate::transfer::AHEAD_RANKING_OPS
        {
            let clusters = (self.drops && self.dropped > 0).then(|| Clusters::of(&self.bufs));
            let mut cands = self.candidates(clusters.as_ref());
            self.policy.rank_victims(self.clock, &mut cands);
            (self.ahead_ranking, self.ahead_ranked_at) = (cands, clock);
        }
        let mut room = free;
        for c in &self.ahead_ranking {
            if room >= low {
                break;
            }
            // Skip what was used, moved or pinned since the ranking.
            let Some(b) = self.bufs.get(&c.id.0) else {
                continue;
            };
            if b.last_use != c.last_use || b.place != Place::Device || self.pinned.contains(&c.id.0)
            {
                continue;
            }
            room += c.bytes;
            let drops = c.recompute_flops.is_some() && self.policy.eviction(c) == Eviction::Drop;
            if !b.clean && !drops && crate::transfer::write_back_fits(b.bytes, self.budget) {
                return Some(c.id.0);
            }
        }
        None
    }

    /// Evicts the victims written back ahead of need whose copies have left the device and
    /// which no op has used since (as the memory manager does when the write-back completes).
    pub(super) fn land_leaving(&mut self) {
        let now = self.now;
        let mut i = 0;
        while i < self.leaving.len() {
            let (id, used) = self.leaving[i];
            let Some(b) = self.bufs.get_mut(&id) else {
                self.leaving.swap_remove(i);
                continue;
            };
            if b.last_use != used || !b.clean || b.place != Place::Device {
                self.leaving.swap_remove(i);
                continue;
            }
            if b.clean_at > now {
                i += 1;
                continue;
            }
            b.place = Place::Host;
            self.r.clean_evictions += 1;
            self.r.evictions += 1;
            self.mem.give(b.bytes, b.block.take());
            self.leaving.swap_remove(i);
        }
    }

    /// The buffers an eviction may take now, in a fixed order.
    pub(super) fn candidates(&self, clusters: Option<&Clusters>) -> Vec<Candidate> {
        let mut cands: Vec<Candidate> = self
            .bufs
            .iter()
            .filter(|(id, b)| {
                matches!(b.place, Place::Device | Place::Arriving(_)) && !self.pinned.contains(id)
            })
            .map(|(&id, b)| Candidate {
                id: BufferId(id),
                key: b.key,
                bytes: b.bytes,
                kind: kind_of(b.kind),
                last_use: b.last_use,
                uses: b.uses,
                recompute_flops: self.recompute_flops(id, b, clusters),
            })
            .collect();
        // Candidates come from a hash map: give policies a fixed order, so ties break the same
        // way in every run.
        cands.sort_by_key(|c| c.id);
        cands
    }

    /// Takes `bytes` of device memory, evicting as the memory manager does when they do not
    /// fit: by byte count, until they fit; with a pool, by rounds (repack when the budget has
    /// room but no block is free, else evict the policy's first victims until a rounded
    /// `bytes` is freed, and try again), as `MemoryManager::reserve` does.
    pub(super) fn alloc(&mut self, bytes: usize) -> Result<Option<Block>> {
        if let Ok(block) = self.mem.take(bytes) {
            return Ok(block);
        }
        if !self.policy.evicts() {
            return Err(Error::OutOfMemory {
                requested: bytes,
                budget: self.mem.budget,
                msg: format!(
                    "simulated: {bytes} bytes needed with {used} of {budget} in use; the `none` policy never offloads",
                    used = self.mem.used,
                    budget = self.mem.budget
                ),
            });
        }
        if self.mem.pool.is_none() {
            let budget = self.mem.budget;
            self.evict_ranked(|mem, _| mem.used + bytes <= budget);
            return self.mem.take(bytes).map_err(|()| self.no_room(bytes));
        }
        let need = DevicePool::rounded(bytes);
        loop {
            if let Ok(block) = self.mem.take(bytes) {
                return Ok(block);
            }
            if self
                .mem
                .pool
                .as_ref()
                .is_some_and(|p| p.available() >= need)
                && let Some(blocks) = self.repack(need)
            {
                let host = self.profile.repack_host_s * blocks as f64;
                self.now += host;
                self.r.repacks += 1;
                self.r.repack_host_ms += host * 1e3;
                continue;
            }
            if self.evict_ranked(|_, freed| freed >= need) == 0 {
                return Err(self.no_room(bytes));
            }
        }
    }

    /// Ranks the evictable buffers and evicts them in order until `done(memory, bytes freed)`;
    /// returns how many were evicted.
    pub(super) fn evict_ranked(&mut self, done: impl Fn(&Memory, usize) -> bool) -> usize {
        let clusters = (self.drops && self.dropped > 0).then(|| Clusters::of(&self.bufs));
        let mut cands = self.candidates(clusters.as_ref());
        self.policy.rank_victims(self.clock, &mut cands);
        let (mut freed, mut evicted) = (0, 0);
        for c in cands {
            if done(&self.mem, freed) {
                break;
            }
            // Only a buffer with a usable recipe can be dropped: without one its bytes would
            // be lost.
            let how = match self.policy.eviction(&c) {
                Eviction::Drop if c.recompute_flops.is_none() => Eviction::Offload,
                how => how,
            };
            let Some(b) = self.bufs.get_mut(&c.id.0) else {
                continue;
            };
            // A dropped buffer's recipe holds its inputs until the buffer is back or freed.
            let held = match how {
                Eviction::Drop => b.recipe.clone(),
                Eviction::Offload => None,
            };
            if let Place::Arriving(t) = b.place {
                // A prefetch still in flight: it can leave once it has landed.
                self.now = self.now.max(t);
            }
            match how {
                Eviction::Drop => {
                    b.place = Place::Dropped;
                    b.clean = false;
                    self.dropped += 1;
                    let inputs = b.recipe.iter().flat_map(|r| r.inputs());
                    for i in inputs {
                        let deps = self.dependents.entry(i).or_default();
                        if !deps.contains(&c.id.0) {
                            deps.push(c.id.0);
                        }
                    }
                }
                // Its host copy is current: the device copy is released, nothing moves.
                Eviction::Offload if b.clean => {
                    self.now = self.now.max(b.clean_at);
                    b.place = Place::Host;
                    self.r.clean_evictions += 1;
                }
                Eviction::Offload => {
                    self.profile.issue_move(&mut self.now, &mut self.r);
                    let begin = self.now.max(self.d2h_free);
                    self.d2h_free = begin + self.profile.d2h_s(b.bytes as u64);
                    // The space is free once the copy has left the device.
                    self.now = self.d2h_free;
                    self.r.bytes_d2h += b.bytes as u64;
                    b.place = Place::Host;
                }
            }
            self.mem.give(b.bytes, b.block.take());
            freed += DevicePool::rounded(b.bytes);
            evicted += 1;
            self.r.evictions += 1;
            if let Some(recipe) = held {
                self.hold(&recipe);
            }
        }
        evicted
    }

    /// Repacks the live blocks as the memory manager does ([`DevicePool::compact`]) so that
    /// `room` bytes are free in one piece (the pool's accounting only: nothing is copied, as
    /// on the device). Returns how many live blocks were placed again, or `None` when they do
    /// not fit.
    pub(super) fn repack(&mut self, room: usize) -> Option<usize> {
        let pool = self.mem.pool.as_mut()?;
        let mut live: Vec<(u64, Block)> = self
            .bufs
            .iter()
            .filter_map(|(&id, b)| b.block.map(|block| (id, block)))
            .collect();
        live.sort_by_key(|l| l.0);
        let blocks: Vec<Block> = live.iter().map(|l| l.1).collect();
        match pool.compact(&blocks, room) {
            Ok(moved) => {
                for ((id, _), block) in live.iter().zip(moved) {
                    if let Some(b) = self.bufs.get_mut(id) {
                        b.block = Some(block);
                    }
                }
                Some(live.len())
            }
            Err(_) => None,
        }
    }

    pub(super) fn no_room(&self, bytes: usize) -> Error {
        Error::OutOfMemory {
            requested: bytes,
            budget: self.mem.budget,
            msg: format!(
                "simulated: {bytes} bytes do not fit beside the {pinned} buffers pinned for the op and its recomputations ({used} bytes in use)",
                pinned = self.pinned.len(),
                used = self.mem.used
            ),
        }
    }
}
