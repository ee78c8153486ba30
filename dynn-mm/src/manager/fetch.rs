//! Bringing buffers back: an op's inputs gathered, fetched or recomputed on demand, and
//! prefetched ahead.

use super::*;

impl MemoryManager {
    /// Makes every buffer of `bufs` (one kernel's inputs: an op's, or a recomputation's)
    /// resident and pins it once per appearance.
    ///
    /// The buffers that take the most work to bring back come first: dropped ones by how many
    /// dropped buffers their recomputation recomputes, then those on the host, then those
    /// already resident (as a compiler evaluates the operand needing the most registers
    /// first). Each is then only *held* until all are back: a held buffer is never dropped,
    /// and is evicted (to the host) only when nothing else can be, to be fetched again before
    /// the kernel. So bringing back one input — a recomputation that recurses through a chain
    /// of dropped activations — never fails because the inputs brought back before it, at
    /// every level of the chain, are pinned: each kernel needs room for its own inputs and
    /// outputs only.
    pub(super) fn gather(
        &self,
        st: &mut State,
        bufs: &[Arc<Buffer>],
        op: &'static str,
    ) -> Result<()> {
        let mut order: Vec<&Arc<Buffer>> = Vec::with_capacity(bufs.len());
        for b in bufs {
            if !order.iter().any(|o| Arc::ptr_eq(o, b)) {
                order.push(b);
            }
        }
        order.sort_by_cached_key(|b| {
            std::cmp::Reverse(match st.table.get(&b.id()).map(|e| e.res) {
                Some(Residency::Dropped) => 2 + dropped_ancestry(st, b.id()),
                Some(Residency::Host) => 1,
                _ => 0,
            })
        });
        let mut held = Vec::with_capacity(order.len());
        let mut result = Ok(());
        for b in order {
            if let Err(e) = self.make_resident(st, b, op) {
                result = Err(e);
                break;
            }
            if let Some(e) = st.table.get_mut(&b.id()) {
                e.pins = e.pins.saturating_sub(1);
                e.held += 1;
                held.push(b.id());
            }
        }
        // Every appearance pinned; a held buffer evicted meanwhile is fetched back (it was
        // offloaded, never dropped, so this recomputes nothing).
        let mut pinned = 0;
        if result.is_ok() {
            for b in bufs {
                if let Err(e) = self.make_resident(st, b, op) {
                    result = Err(e);
                    break;
                }
                pinned += 1;
            }
        }
        for id in held {
            if let Some(e) = st.table.get_mut(&id) {
                e.held = e.held.saturating_sub(1);
            }
        }
        if result.is_err() {
            for b in &bufs[..pinned] {
                self.unpin(st, b.id());
            }
        }
        result
    }

    /// Makes buffer `buf` resident on the device (fetching or recomputing it) and pins it.
    pub(super) fn make_resident(
        &self,
        st: &mut State,
        buf: &Arc<Buffer>,
        op: &'static str,
    ) -> Result<()> {
        self.register(st, buf, "external")?;
        self.settle(st, buf.id());
        let (res, bytes, kind) = {
            let e = st
                .table
                .get(&buf.id())
                .ok_or_else(|| Error::Msg("memory manager lost a buffer".into()))?;
            (e.res, e.bytes, e.kind)
        };
        match res {
            Residency::Device(_) | Residency::InFlight(..) => {}
            Residency::Host => {
                let start = Instant::now();
                let block = self.reserve(st, bytes, op)?;
                let call = Instant::now();
                let moved = buf.fetch()?;
                st.stats.copy_call_time += call.elapsed();
                st.stats.bytes_h2d += moved as u64;
                st.stats.demand_fetches += 1;
                stalled(st, start);
                st.stalled_this_op = true;
                self.set_device(st, buf.id(), block, kind, bytes);
            }
            Residency::Dropped => {
                let start = Instant::now();
                let (recipe, output) = st
                    .table
                    .get(&buf.id())
                    .and_then(|e| Some((e.held_recipe.clone()?, e.output)))
                    .ok_or_else(|| {
                        Error::Msg(format!(
                            "{op}: buffer {} was dropped without a recipe to recompute it",
                            buf.id()
                        ))
                    })?;
                let mut inputs: Vec<Arc<Buffer>> = Vec::with_capacity(recipe.inputs.len());
                for t in &recipe.inputs {
                    if !inputs.iter().any(|p| Arc::ptr_eq(p, t.buffer())) {
                        inputs.push(t.buffer().clone());
                    }
                }
                st.recomputing.push(Recomputing {
                    id: buf.id(),
                    producer: recipe.op.name(),
                    inputs: inputs.iter().map(|p| p.id()).collect(),
                });
                let result = self.gather(st, &inputs, op).and_then(|()| {
                    let block = self.reserve(st, bytes, op);
                    let result =
                        block.and_then(|block| match recompute_output(&recipe, output, buf, op) {
                            Ok(()) => Ok(block),
                            Err(e) => {
                                st.pool.release(block);
                                Err(e)
                            }
                        });
                    for p in &inputs {
                        self.unpin(st, p.id());
                    }
                    result
                });
                st.recomputing.pop();
                let block = result?;
                st.stats.recomputes += 1;
                st.stats.recompute_flops += recipe
                    .op
                    .cost(&recipe.inputs.iter().collect::<Vec<_>>(), &recipe.specs)
                    .flops;
                stalled(st, start);
                st.stalled_this_op = true;
                self.set_device(st, buf.id(), block, kind, bytes);
                // Back: its recipe no longer holds the inputs (those the run has released go).
                if let Some(e) = st.table.get_mut(&buf.id()) {
                    e.held_recipe = None;
                }
                // Its recipe's inputs are resident now: only buffers computed from it can still
                // be dropped beside it.
                let beside = st.dependents.get(&buf.id()).into_iter().flatten();
                let beside = beside
                    .filter(|d| st.table.get(d).is_some_and(|e| e.res == Residency::Dropped))
                    .count();
                if st.clusters.restore(buf.id(), beside) {
                    st.clusters = DroppedClusters::rebuild(&st.table);
                }
            }
        }
        if let Some(e) = st.table.get_mut(&buf.id()) {
            e.pins += 1;
            let now_kind = buf.kind();
            if e.kind != now_kind {
                // The buffer changed role (e.g. a leaf became a parameter).
                if matches!(e.res, Residency::Device(_) | Residency::InFlight(..)) {
                    st.device_by_kind[e.kind as usize] -= e.bytes;
                    st.device_by_kind[now_kind as usize] += e.bytes;
                }
                e.kind = now_kind;
            }
        }
        Ok(())
    }

    pub(super) fn set_device(
        &self,
        st: &mut State,
        id: BufferId,
        block: Block,
        kind: BufferKind,
        bytes: usize,
    ) {
        if let Some(e) = st.table.get_mut(&id) {
            e.res = Residency::Device(block);
        }
        st.device_by_kind[kind as usize] += bytes;
        self.note_peak(st);
    }

    pub(super) fn unpin(&self, st: &mut State, id: BufferId) {
        if let Some(e) = st.table.get_mut(&id) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Issues prefetches for buffers the policy expects soon, without evicting anything the
    /// policy expects sooner.
    pub(super) fn prefetch(&self, st: &mut State) {
        // Nothing can come back early without free room: do not ask the policy.
        if st.pool.available() < DevicePool::rounded(1) {
            return;
        }
        let now = st.now;
        let mut upcoming = std::mem::take(&mut st.upcoming);
        upcoming.clear();
        st.policy.upcoming(now, st.horizon, &mut upcoming);
        for &key in &upcoming {
            let Some(&id) = st.by_key.get(&key) else {
                continue;
            };
            let Some(e) = st.table.get(&id) else { continue };
            if e.res != Residency::Host {
                continue;
            }
            let Some(buf) = e.buf.upgrade() else { continue };
            let bytes = e.bytes;
            let kind = e.kind;
            let Ok(block) = st.pool.allocate(bytes) else {
                // No free room: stop rather than evict (demand eviction handles the rest).
                break;
            };
            if self.engine.submit(&buf, Direction::ToDevice) {
                if let Some(e) = st.table.get_mut(&id) {
                    e.res = Residency::InFlight(Direction::ToDevice, block);
                }
                st.device_by_kind[kind as usize] += bytes;
                st.stats.prefetches += 1;
                self.note_peak(st);
            } else {
                st.pool.release(block);
            }
        }
        st.upcoming = upcoming;
    }
}

/// Counts the time since `start` as a stall, unless a recomputation is in progress: its own
/// time, counted when it ends, includes this.
pub(super) fn stalled(st: &mut State, start: Instant) {
    if st.recomputing.is_empty() {
        st.stats.stall_time += start.elapsed();
    }
}

/// How many dropped buffers recomputing the dropped buffer `id` recomputes (itself included),
/// counted up to a cap: enough to order a recipe's inputs.
fn dropped_ancestry(st: &State, id: BufferId) -> usize {
    const CAP: usize = 256;
    let mut seen = vec![id];
    let mut stack = vec![id];
    while let Some(b) = stack.pop() {
        let Some(recipe) = st.table.get(&b).and_then(|e| e.recipe.as_ref()) else {
            continue;
        };
        for i in recipe.input_ids() {
            if !seen.contains(&i)
                && st
                    .table
                    .get(&i)
                    .is_some_and(|e| e.res == Residency::Dropped)
            {
                if seen.len() == CAP {
                    return CAP;
                }
                seen.push(i);
                stack.push(i);
            }
        }
    }
    seen.len()
}

/// Runs `recipe` again and stores its output number `output` in `buf`.
fn recompute_output(recipe: &Recipe, output: usize, buf: &Buffer, op: &str) -> Result<()> {
    let outs = recipe.recompute()?;
    // The output this buffer was (outputs of one op may share size and dtype, e.g. a norm's
    // mean and inverse deviation).
    let out = outs
        .into_iter()
        .nth(output)
        .filter(|o| o.len() == buf.len() && o.dtype() == buf.dtype())
        .ok_or_else(|| {
            Error::Msg(format!(
                "{op}: recomputing {} gave no output {output} of {} {:?} elements",
                recipe.op.name(),
                buf.len(),
                buf.dtype()
            ))
        })?;
    buf.set_slot(Slot::Device(Arc::from(out)));
    Ok(())
}
