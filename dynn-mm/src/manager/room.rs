//! Making room on the device: the pool's blocks, the policy's victims, evicting ahead of need.

use super::*;

impl MemoryManager {
    /// Repacks every device-resident block so scattered free space becomes one range of at
    /// least `room` bytes, timing it. The blocks are the pool's accounting on every backend
    /// (the bytes live in host memory, the CUDA arena or the driver's pool), so nothing moves.
    /// Returns false when repacking would not fit (nothing changes then).
    pub(super) fn compact(&self, st: &mut State, room: usize) -> bool {
        let start = Instant::now();
        let done = self.repack(st, room);
        st.stats.compact_time += start.elapsed();
        done
    }

    /// [`Self::compact`]'s work.
    pub(super) fn repack(&self, st: &mut State, room: usize) -> bool {
        let mut live: Vec<(BufferId, Block)> = st
            .table
            .iter()
            .filter_map(|(&id, e)| match e.res {
                Residency::Device(b) => Some((id, b)),
                _ => None,
            })
            .collect();
        // The table is a hash map: a fixed order places blocks the same way in every run.
        live.sort_by_key(|l| l.0);
        let blocks: Vec<Block> = live.iter().map(|l| l.1).collect();
        match st.pool.compact(&blocks, room) {
            Ok(moved) => {
                for ((id, _), b) in live.iter().zip(moved) {
                    if let Some(e) = st.table.get_mut(id) {
                        e.res = Residency::Device(b);
                    }
                }
                st.stats.compactions += 1;
                st.stats.repacked_blocks += live.len() as u64;
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn note_peak(&self, st: &mut State) {
        let used = st.pool.in_use();
        if used > st.stats.peak_in_use {
            st.stats.peak_in_use = used;
            st.stats.peak_by_kind = st.device_by_kind;
        }
    }

    /// A pool block of `bytes`, evicting what the policy chooses when over budget.
    pub(super) fn reserve(&self, st: &mut State, bytes: usize, op: &'static str) -> Result<Block> {
        let need = DevicePool::rounded(bytes);
        loop {
            self.sync(st);
            let err = match st.pool.allocate(bytes) {
                Ok(b) => return Ok(b),
                Err(e) => e,
            };
            if !st.policy.evicts() {
                return Err(self.oom(
                    st,
                    bytes,
                    op,
                    &err,
                    Some("the `none` policy never offloads"),
                ));
            }
            // The budget has room but no free block is large enough (free space is scattered
            // over segments, between live blocks): repack rather than evict what need not go.
            // A successful repack leaves a block of `need` free, so the next allocation fits.
            if st.pool.available() >= need && self.compact(st, need) {
                continue;
            }
            if st.clusters.stale {
                st.clusters = DroppedClusters::rebuild(&st.table);
            }
            let choosing = Instant::now();
            let mut cands = self.candidates(st);
            if cands.is_empty() {
                // Copies in flight hold blocks: once they land those buffers can be evicted.
                if st
                    .table
                    .values()
                    .any(|e| matches!(e.res, Residency::InFlight(..)))
                {
                    let start = Instant::now();
                    if let Some(c) = self.engine.wait() {
                        self.complete(st, c);
                    }
                    stalled(st, start);
                    continue;
                }
                if self.offload_held(st, need)? {
                    continue;
                }
                return Err(self.oom(st, bytes, op, &err, None));
            }
            let now = st.now;
            // Candidates come from a hash map: give policies a fixed order, so ties break the same way
            // in every run.
            cands.sort_by_key(|c| c.id);
            st.policy.rank_victims(now, &mut cands);
            st.stats.choose_time += choosing.elapsed();
            let mut freed = 0;
            for c in cands {
                let how = st.policy.eviction(&c);
                self.evict(st, c.id, how)?;
                freed += DevicePool::rounded(c.bytes);
                if freed >= need {
                    break;
                }
            }
        }
    }

    /// Every unpinned device-resident buffer, as the policy sees it. An activation that can be
    /// dropped is priced as DTR prices it: its own recomputation plus that of the dropped
    /// buffers around it (the dropped inputs its recomputation would recompute first, and the
    /// dropped buffers whose recomputation would need it), so dropping the next link of a
    /// chain of dropped activations gets dearer with the chain's length instead of building
    /// one that a single access must recompute end to end.
    pub(super) fn candidates(&self, st: &State) -> Vec<Candidate> {
        let clusters = &st.clusters;
        st.table
            .iter()
            .filter(|(_, e)| e.pins == 0 && e.held == 0 && matches!(e.res, Residency::Device(_)))
            .map(|(&id, e)| Candidate {
                id,
                key: e.key,
                bytes: e.bytes,
                kind: e.kind,
                last_use: e.last_use,
                uses: e.uses,
                recompute_flops: e
                    .recipe
                    .as_ref()
                    .filter(|r| r.is_fresh() && !r.input_ids().any(|i| st.writing.contains(&i)))
                    .map(|r| {
                        let around = r
                            .input_ids()
                            .chain(st.dependents.get(&id).into_iter().flatten().copied());
                        e.flops.saturating_add(clusters.cost_around(around))
                    }),
            })
            .collect()
    }

    pub(super) fn evict(&self, st: &mut State, id: BufferId, how: Eviction) -> Result<()> {
        let Some(e) = st.table.get_mut(&id) else {
            return Ok(());
        };
        let Residency::Device(block) = e.res else {
            return Ok(());
        };
        let Some(buf) = e.buf.upgrade() else {
            // Released but not yet reported: its block is free.
            let (kind, bytes) = (e.kind as usize, e.bytes);
            st.table.remove(&id);
            st.pool.release(block);
            st.device_by_kind[kind] -= bytes;
            return Ok(());
        };
        let (kind, bytes) = (e.kind as usize, e.bytes);
        // Only a buffer whose recipe's inputs all live can be dropped: otherwise its bytes
        // would be lost. The recipe holds them while it is dropped.
        let held = match how {
            Eviction::Drop => e.recipe.as_ref().and_then(|r| r.upgrade()),
            Eviction::Offload => None,
        };
        let how = match how {
            Eviction::Drop if held.is_none() => Eviction::Offload,
            how => how,
        };
        match how {
            Eviction::Drop => {
                buf.drop_data();
                e.res = Residency::Dropped;
                e.held_recipe = held.map(Arc::new);
                let inputs: Vec<BufferId> = e.recipe.iter().flat_map(|r| r.input_ids()).collect();
                let flops = e.flops;
                st.stats.drops += 1;
                for &i in &inputs {
                    let deps = st.dependents.entry(i).or_default();
                    if !deps.contains(&id) {
                        deps.push(id);
                    }
                }
                // Its neighbourhood: the dropped inputs of its recipe and the dropped buffers
                // whose recipes read it.
                let beside = inputs
                    .iter()
                    .chain(st.dependents.get(&id).into_iter().flatten())
                    .copied();
                st.clusters.drop(id, flops, beside);
            }
            Eviction::Offload => {
                let start = Instant::now();
                let moved = buf.offload()?;
                st.stats.copy_call_time += start.elapsed();
                e.res = Residency::Host;
                st.stats.bytes_d2h += moved as u64;
                st.stats.evictions += 1;
                st.stats.clean_evictions += u64::from(moved == 0 && bytes > 0);
                stalled(st, start);
            }
        }
        st.pool.release(block);
        st.device_by_kind[kind] -= bytes;
        st.evicted_this_op = true;
        Ok(())
    }

    /// The last resort when nothing can be evicted: offloads held buffers (see
    /// [`MemoryManager::gather`]) until `need` bytes are freed, those of the outermost gathering
    /// first (its kernel runs last). Returns false when none was held.
    pub(super) fn offload_held(&self, st: &mut State, need: usize) -> Result<bool> {
        let depth = |st: &State, id: &BufferId| {
            st.recomputing
                .iter()
                .position(|r| r.inputs.contains(id))
                .map_or(0, |i| i + 1)
        };
        let mut held: Vec<(usize, BufferId, usize)> = st
            .table
            .iter()
            .filter(|(_, e)| e.pins == 0 && e.held > 0 && matches!(e.res, Residency::Device(_)))
            .map(|(id, e)| (depth(st, id), *id, e.bytes))
            .collect();
        held.sort();
        let mut freed = 0;
        for &(_, id, bytes) in &held {
            self.evict(st, id, Eviction::Offload)?;
            freed += DevicePool::rounded(bytes);
            if freed >= need {
                break;
            }
        }
        Ok(!held.is_empty())
    }

    /// Under a budget, while no write-back is in flight, copies one resident buffer to the
    /// host tier in the background (keeping it on the device), so that evicting it later
    /// costs no copy on the executor's thread: the policy's next victim under memory pressure
    /// ([`ManagerConfig::evict_ahead`], evicted when the copy completes unless used since),
    /// else, where asked ([`ManagerConfig::write_back`]), the least recently used buffer whose
    /// host copy is stale.
    pub(super) fn write_back(&self, st: &mut State) {
        let budget = st.pool.budget();
        if st.writing_back || budget == usize::MAX {
            return;
        }
        let ahead = if st.evict_ahead {
            self.next_victim(st)
        } else {
            None
        };
        let is_ahead = ahead.is_some();
        let pick = match ahead {
            Some(buf) => Some(buf),
            None if st.write_back => st
                .table
                .iter()
                .filter(|(_, e)| {
                    e.pins == 0
                        && e.held == 0
                        && crate::transfer::write_back_fits(e.bytes, budget)
                        && matches!(e.res, Residency::Device(_))
                })
                .filter_map(|(&id, e)| Some((e.last_use, id, e.buf.upgrade()?)))
                .filter(|(_, _, b)| !b.host_copy_is_current())
                .min_by_key(|(last_use, id, _)| (*last_use, id.0))
                .map(|(_, _, buf)| buf),
            None => None,
        };
        if let Some(buf) = pick
            && self.engine.submit(&buf, Direction::WriteBack)
        {
            st.writing_back = true;
            if is_ahead && let Some(e) = st.table.get(&buf.id()) {
                st.leaving.push((buf.id(), e.last_use));
            }
        }
    }

    /// Under memory pressure (less than `budget / EVICT_AHEAD_SHARE` free), the next victim
    /// to write back ahead of need: among the policy's first victims for that much room, the
    /// first whose host copy is stale, small enough to write back, and not one the policy
    /// would drop instead (dropping needs no copy).
    pub(super) fn next_victim(&self, st: &mut State) -> Option<Arc<Buffer>> {
        let budget = st.pool.budget();
        let low = budget / crate::transfer::EVICT_AHEAD_SHARE;
        let free = st.pool.available();
        if !st.policy.evicts() || free >= low {
            return None;
        }
        let clock = st.stats.ops;
        if st.ahead_ranking.is_empty()
            || clock >= st.ahead_ranked_at + crate::transfer::AHEAD_RANKING_OPS
        {
            let mut cands = self.candidates(st);
            let choosing = Instant::now();
            st.policy.rank_victims(st.now, &mut cands);
            st.stats.choose_time += choosing.elapsed();
            (st.ahead_ranking, st.ahead_ranked_at) = (cands, clock);
        }
        let mut room = free;
        for c in &st.ahead_ranking {
            if room >= low {
                break;
            }
            // Skip what was used, moved or pinned since the ranking.
            let Some(e) = st.table.get(&c.id) else {
                continue;
            };
            if !e.untouched_since(c.last_use) {
                continue;
            }
            room += c.bytes;
            let drops = c.recompute_flops.is_some() && st.policy.eviction(c) == Eviction::Drop;
            if drops || !crate::transfer::write_back_fits(c.bytes, budget) {
                continue;
            }
            if let Some(buf) = e.buf.upgrade()
                && !buf.host_copy_is_current()
            {
                return Some(buf);
            }
        }
        None
    }
}
