//! The memory manager: implements [`MemoryHooks`], keeps every buffer's residency, serves
//! the device pool under its budget, evicts what the policy chooses, fetches on demand and
//! prefetches ahead, records the access trace and the memory timeline.

use crate::keymap::KeyMap;
use crate::policy::{Candidate, Eviction, Now, Policy};
use crate::pool::{Block, DevicePool, PoolExhausted};
use crate::report::{MemoryReport, TimelinePoint};
use crate::trace::{
    Access, Announced, FNV_START, OpRecord, StepRecord, Trace, fnv1a, kind_code, phase_code,
};
use crate::transfer::{Direction, TransferConfig, TransferEngine};
use dynn_core::{
    Buffer, BufferId, BufferKind, Error, MemoryHooks, OpEvent, Recipe, ReleaseSink, Result, Slot,
    WeakRecipe,
};
use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

mod clusters;
mod config;
mod fetch;
mod oom;
mod room;

use clusters::DroppedClusters;
pub use config::{ManagerConfig, MemoryStats};
use fetch::stalled;

/// Where a buffer is, as the manager tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// On the device, holding a pool block.
    Device(Block),
    /// In the host tier.
    Host,
    /// Being copied; the block is held until the copy completes.
    InFlight(Direction, Block),
    /// Released; recomputed from its recipe on next use.
    Dropped,
}

struct Entry {
    buf: Weak<Buffer>,
    bytes: usize,
    kind: BufferKind,
    key: u64,
    res: Residency,
    pins: u32,
    /// How many gatherings hold it: brought back for a kernel that has not started, while the
    /// kernel's other inputs are brought back (see `MemoryManager::gather`).
    held: u32,
    last_use: u64,
    uses: u32,
    producer: &'static str,
    /// How to compute it again, without keeping the op's inputs alive.
    recipe: Option<Arc<WeakRecipe>>,
    /// While it is dropped: the recipe upgraded, holding the inputs it is recomputed from.
    held_recipe: Option<Arc<Recipe>>,
    /// Which of the recipe's outputs this buffer is.
    output: usize,
    flops: u64,
}

impl Entry {
    /// Resident, unpinned, not held for a gathering, and not used since op `last_use`: what
    /// a victim chosen then must still be to leave now.
    fn untouched_since(&self, last_use: u64) -> bool {
        self.last_use == last_use
            && self.pins == 0
            && self.held == 0
            && matches!(self.res, Residency::Device(_))
    }
}

#[derive(Default)]
struct Releases(Mutex<Vec<BufferId>>);

impl ReleaseSink for Releases {
    fn released(&self, id: BufferId, _bytes: usize) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(id);
    }
}

struct State {
    pool: DevicePool,
    policy: Box<dyn Policy>,
    table: KeyMap<BufferId, Entry>,
    by_key: KeyMap<u64, BufferId>,
    /// Buffer → dropped buffers whose recipes read it (recomputed before it is overwritten).
    dependents: KeyMap<BufferId, Vec<BufferId>>,
    device_by_kind: [usize; 5],
    now: Now,
    created_in_step: u64,
    step_signature: u64,
    /// Signatures of the steps ended so far.
    graphs: std::collections::HashSet<u64>,
    stats: MemoryStats,
    trace: Option<Trace>,
    timeline: Option<Vec<TimelinePoint>>,
    stalled_this_op: bool,
    evicted_this_op: bool,
    horizon: usize,
    /// The policy's prefetch list, reused from op to op.
    upcoming: Vec<u64>,
    /// Buffers the current op writes in place: nothing computed from them may be dropped.
    writing: Vec<BufferId>,
    /// Inputs and outputs of the op being prepared (pinned for its kernel).
    op_buffers: Vec<BufferId>,
    /// Recomputations in progress, outermost first: each holds its recipe's inputs pinned.
    recomputing: Vec<Recomputing>,
    /// The dropped buffers' neighbourhoods, for the recompute policy's costs.
    clusters: DroppedClusters,
    /// Plans and plan reads announced since the last op, for that op's trace record.
    announced: Announced,
    /// The record of the op being finished, reused from op to op.
    record: OpRecord,
    /// A background write-back is queued or running (one at a time).
    writing_back: bool,
    /// Background write-backs are on ([`ManagerConfig::write_back`]).
    write_back: bool,
    /// Evicting ahead of need is on ([`ManagerConfig::evict_ahead`]).
    evict_ahead: bool,
    /// Victims written back ahead of need, with their `last_use` then: evicted when the copy
    /// completes unless used since.
    leaving: Vec<(BufferId, u64)>,
    /// The last ranking made to evict ahead, and the op count when it was made.
    ahead_ranking: Vec<Candidate>,
    ahead_ranked_at: u64,
}

/// A dropped buffer being recomputed.
struct Recomputing {
    id: BufferId,
    producer: &'static str,
    inputs: Vec<BufferId>,
}

/// The memory manager. Install it with [`dynn_core::install_memory_hooks`].
pub struct MemoryManager {
    state: Mutex<State>,
    releases: Arc<Releases>,
    engine: TransferEngine,
    wants_recipes: bool,
}

const CREATED: u64 = 1 << 63;

impl MemoryManager {
    /// A manager with `config`.
    pub fn new(config: ManagerConfig) -> Arc<Self> {
        let wants_recipes = config.policy.drops();
        Arc::new(MemoryManager {
            state: Mutex::new(State {
                pool: DevicePool::with_segments(
                    config.budget,
                    config.segments.0,
                    config.segments.1,
                ),
                policy: config.policy,
                table: KeyMap::default(),
                by_key: KeyMap::default(),
                dependents: KeyMap::default(),
                device_by_kind: [0; 5],
                now: Now::default(),
                created_in_step: 0,
                step_signature: FNV_START,
                announced: Announced::default(),
                record: OpRecord::default(),
                writing_back: false,
                write_back: config.write_back,
                evict_ahead: config.evict_ahead,
                leaving: Vec::new(),
                ahead_ranking: Vec::new(),
                ahead_ranked_at: 0,
                graphs: Default::default(),
                stats: MemoryStats::default(),
                trace: config.record_trace.then(Trace::default),
                timeline: config.record_timeline.then(Vec::new),
                stalled_this_op: false,
                evicted_this_op: false,
                horizon: config.prefetch_horizon,
                upcoming: Vec::new(),
                writing: Vec::new(),
                op_buffers: Vec::new(),
                recomputing: Vec::new(),
                clusters: DroppedClusters::default(),
            }),
            releases: Arc::new(Releases::default()),
            engine: TransferEngine::start(config.transfer),
            wants_recipes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters possibly stale, never unsafe.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Device bytes in live blocks now (cheap: for progress bars; [`MemoryManager::report`]
    /// builds the whole summary).
    pub fn device_in_use(&self) -> usize {
        self.lock().pool.in_use()
    }

    /// Counters so far.
    pub fn stats(&self) -> MemoryStats {
        let st = self.lock();
        MemoryStats {
            peak_device_bytes: st.pool.stats().peak_reserved,
            distinct_graphs: st.graphs.len(),
            ..st.stats.clone()
        }
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.lock().policy.name()
    }

    /// The recorded trace so far (empty when not recording).
    pub fn trace(&self) -> Trace {
        self.lock().trace.clone().unwrap_or_default()
    }

    /// A report of peak and current memory, allocator statistics and the largest holders.
    pub fn report(&self) -> MemoryReport {
        let mut st = self.lock();
        self.sync(&mut st);
        let mut holders: Vec<(usize, BufferKind, &'static str, BufferId)> = st
            .table
            .iter()
            .filter(|(_, e)| matches!(e.res, Residency::Device(_) | Residency::InFlight(..)))
            .map(|(&id, e)| {
                (
                    e.bytes,
                    e.buf.upgrade().map_or(e.kind, |b| b.kind()),
                    e.producer,
                    id,
                )
            })
            .collect();
        holders.sort_by(|a, b| b.0.cmp(&a.0).then(a.3.cmp(&b.3)));
        holders.truncate(10);
        MemoryReport {
            policy: st.policy.name(),
            pool: st.pool.stats(),
            stats: MemoryStats {
                peak_device_bytes: st.pool.stats().peak_reserved,
                distinct_graphs: st.graphs.len(),
                ..st.stats.clone()
            },
            device_by_kind: st.device_by_kind,
            host_bytes: st
                .table
                .values()
                .filter(|e| {
                    e.res == Residency::Host
                        || e.buf.upgrade().is_some_and(|b| b.host_copy_is_current())
                })
                .map(|e| e.bytes)
                .sum(),
            top_holders: holders,
            timeline: st.timeline.clone().unwrap_or_default(),
        }
    }

    /// Applies releases and finished transfers. Dropping an entry drops its recipe, which may
    /// release more buffers: repeat until none are pending.
    fn sync(&self, st: &mut State) {
        loop {
            let released: Vec<BufferId> =
                std::mem::take(&mut *self.releases.0.lock().unwrap_or_else(|e| e.into_inner()));
            if released.is_empty() {
                break;
            }
            for id in released {
                let Some(e) = st.table.remove(&id) else {
                    continue;
                };
                if e.res == Residency::Dropped {
                    let inputs = e.recipe.iter().flat_map(|r| r.input_ids());
                    let beside = inputs
                        .chain(st.dependents.get(&id).into_iter().flatten().copied())
                        .filter(|i| st.table.get(i).is_some_and(|e| e.res == Residency::Dropped))
                        .count();
                    if st.clusters.restore(id, beside) {
                        st.clusters = DroppedClusters::rebuild(&st.table);
                    }
                }
                if let Some(op) = st.trace.as_mut().and_then(|t| t.ops.last_mut()) {
                    op.freed.push(id.0);
                }
                if let Residency::Device(b) | Residency::InFlight(_, b) = e.res {
                    st.pool.release(b);
                    st.device_by_kind[e.kind as usize] -= e.bytes;
                }
                if st.by_key.get(&e.key) == Some(&id) {
                    st.by_key.remove(&e.key);
                }
                st.dependents.remove(&id);
            }
        }
        for c in self.engine.poll() {
            self.complete(st, c);
        }
    }

    fn complete(&self, st: &mut State, c: crate::transfer::Completion) {
        if c.dir == Direction::WriteBack {
            // The buffer never left the device: only the counters change.
            st.writing_back = false;
            if c.result.is_ok() && c.bytes > 0 {
                st.stats.bytes_d2h += c.bytes as u64;
                st.stats.write_backs += 1;
            }
            if let Some(i) = st.leaving.iter().position(|l| l.0 == c.id) {
                let (id, used) = st.leaving.swap_remove(i);
                let unused = st.table.get(&id).is_some_and(|e| {
                    e.untouched_since(used)
                        && e.buf.upgrade().is_some_and(|b| b.host_copy_is_current())
                });
                // Its host copy is current: releasing the device copy moves nothing. Should
                // that fail, the buffer stays resident, as if it had been used again.
                if c.result.is_ok() && unused {
                    let _ = self.evict(st, id, Eviction::Offload);
                }
            }
            return;
        }
        let Some(e) = st.table.get_mut(&c.id) else {
            return;
        };
        let Residency::InFlight(dir, block) = e.res else {
            return;
        };
        match (dir, c.result.is_ok()) {
            (Direction::ToHost, true) => {
                e.res = Residency::Host;
                st.pool.release(block);
                st.device_by_kind[e.kind as usize] -= e.bytes;
                st.stats.bytes_d2h += c.bytes as u64;
            }
            (Direction::ToDevice, true) => {
                e.res = Residency::Device(block);
                st.stats.bytes_h2d += c.bytes as u64;
            }
            // A failed copy leaves the bytes where they were.
            (Direction::ToHost, false) => e.res = Residency::Device(block),
            (Direction::ToDevice, false) => {
                e.res = Residency::Host;
                st.pool.release(block);
                st.device_by_kind[e.kind as usize] -= e.bytes;
            }
            // Never in flight: a write-back leaves the buffer resident (handled above).
            (Direction::WriteBack, _) => e.res = Residency::Device(block),
        }
    }

    /// Waits until buffer `id` has no copy in flight.
    fn settle(&self, st: &mut State, id: BufferId) {
        while matches!(
            st.table.get(&id).map(|e| e.res),
            Some(Residency::InFlight(..))
        ) {
            let start = Instant::now();
            match self.engine.wait() {
                Some(c) => self.complete(st, c),
                None => break,
            }
            stalled(st, start);
            st.stalled_this_op = true;
        }
    }

    fn register(&self, st: &mut State, buf: &Arc<Buffer>, producer: &'static str) -> Result<()> {
        if st.table.contains_key(&buf.id()) {
            return Ok(());
        }
        buf.watch(self.releases.clone());
        let key = CREATED + st.created_in_step;
        st.created_in_step += 1;
        let res = match buf.slot() {
            Slot::Host(_) => Residency::Host,
            Slot::Dropped => Residency::Dropped,
            Slot::Device(_) | Slot::Unmaterialized => {
                let block = self.reserve(st, buf.size_in_bytes(), producer)?;
                st.device_by_kind[buf.kind() as usize] += buf.size_in_bytes();
                Residency::Device(block)
            }
        };
        st.by_key.insert(key, buf.id());
        st.table.insert(
            buf.id(),
            Entry {
                buf: Arc::downgrade(buf),
                bytes: buf.size_in_bytes(),
                kind: buf.kind(),
                key,
                res,
                pins: 0,
                held: 0,
                last_use: st.now.seq,
                uses: 0,
                producer,
                recipe: None,
                held_recipe: None,
                output: 0,
                flops: 0,
            },
        );
        self.note_peak(st);
        Ok(())
    }

    /// Writes op `ev`'s record into `st.record`, reusing its vectors: recording an op
    /// allocates nothing once they have grown.
    fn record(&self, st: &mut State, ev: &OpEvent<'_>) {
        let State {
            table,
            record: rec,
            announced,
            now,
            ..
        } = st;
        let access = |b: &Arc<Buffer>| -> Access {
            let key = table.get(&b.id()).map_or(b.id().0, |e| e.key);
            (b.id().0, b.size_in_bytes() as u64, kind_code(b.kind()), key)
        };
        rec.t = Cow::Borrowed("op");
        rec.seq = ev.seq;
        rec.step = now.step;
        rec.index = now.index;
        rec.phase = phase_code(ev.phase);
        rec.op = Cow::Borrowed(ev.op);
        rec.inputs.clear();
        rec.inputs.extend(ev.inputs.iter().map(access));
        rec.outputs.clear();
        rec.outputs.extend(ev.outputs.iter().map(access));
        rec.idioms = ev.idioms.0;
        rec.flops = ev.cost.flops;
        rec.bytes_read = ev.cost.bytes_read;
        rec.bytes_written = ev.cost.bytes_written;
        rec.freed.clear();
        rec.plan.clear();
        rec.plan_source.clear();
        rec.plan_reads.clear();
        announced.attach_to(rec);
    }
}

impl MemoryHooks for MemoryManager {
    fn before_op(&self, ev: &OpEvent<'_>) -> Result<()> {
        let mut st = self.lock();
        self.sync(&mut st);
        st.now.seq = ev.seq;
        st.stalled_this_op = false;
        st.evicted_this_op = false;
        st.writing = ev
            .outputs
            .iter()
            .filter(|b| ev.inputs.iter().any(|i| Arc::ptr_eq(i, b)))
            .map(|b| b.id())
            .collect();
        st.op_buffers = ev.inputs.iter().chain(ev.outputs).map(|b| b.id()).collect();
        let mut pinned: Vec<BufferId> = Vec::new();
        let result = (|| {
            // Dropped buffers computed from the old values of a buffer this op writes in place
            // are recomputed now, while they can be (and before this op holds anything).
            for b in ev.outputs {
                while let Some(deps) = st.dependents.remove(&b.id()) {
                    for d in deps {
                        let dep = st
                            .table
                            .get(&d)
                            .filter(|e| e.res == Residency::Dropped)
                            .and_then(|e| e.buf.upgrade());
                        if let Some(dep) = dep {
                            self.make_resident(&mut st, &dep, ev.op)?;
                            self.unpin(&mut st, d);
                        }
                    }
                }
            }
            self.gather(&mut st, ev.inputs, ev.op)?;
            pinned.extend(ev.inputs.iter().map(|b| b.id()));
            for b in ev.outputs {
                if let Some(e) = st.table.get_mut(&b.id()) {
                    // Written in place (resident and pinned as an input): its recipe (if any)
                    // no longer reproduces it.
                    e.recipe = None;
                    e.held_recipe = None;
                    continue;
                }
                self.register(&mut st, b, ev.op)?;
                if let Some(e) = st.table.get_mut(&b.id()) {
                    e.pins += 1;
                }
                pinned.push(b.id());
            }
            Ok(())
        })();
        if result.is_err() {
            for id in pinned {
                self.unpin(&mut st, id);
            }
        }
        result
    }

    fn after_op(&self, ev: &OpEvent<'_>) -> Result<()> {
        let mut st = self.lock();
        st.writing.clear();
        st.op_buffers.clear();
        let seq = ev.seq;
        // Each input was pinned once per appearance, each fresh output once; an output
        // written in place was pinned as an input.
        let fresh = ev
            .outputs
            .iter()
            .filter(|b| !ev.inputs.iter().any(|i| Arc::ptr_eq(i, b)));
        for b in ev.inputs.iter().chain(fresh) {
            if let Some(e) = st.table.get_mut(&b.id()) {
                e.pins = e.pins.saturating_sub(1);
                e.last_use = seq;
                e.uses += 1;
            }
        }
        if let Some(recipe) = ev.recipe {
            for (i, b) in ev.outputs.iter().enumerate() {
                if let Some(e) = st.table.get_mut(&b.id()) {
                    e.recipe = Some(recipe.clone());
                    e.output = i;
                    e.flops = ev.cost.flops;
                }
            }
        }
        {
            let s = &mut *st;
            self.record(s, ev);
            let mut sig = fnv1a(s.step_signature, ev.op.as_bytes());
            for o in &s.record.outputs {
                sig = fnv1a(sig, &o.1.to_le_bytes());
            }
            s.step_signature = sig;
            s.policy.observe(&s.record);
            if let Some(t) = s.trace.as_mut() {
                t.ops.push(s.record.clone());
            }
        }
        st.stats.ops += 1;
        if st.timeline.is_some() {
            let point = TimelinePoint {
                seq,
                by_kind: st.device_by_kind,
                stalled: st.stalled_this_op,
                evicted: st.evicted_this_op,
            };
            if let Some(t) = st.timeline.as_mut() {
                t.push(point);
            }
        }
        st.now.index += 1;
        self.prefetch(&mut st);
        self.write_back(&mut st);
        Ok(())
    }

    fn buffer_created(&self, buffer: &Arc<Buffer>) {
        let mut st = self.lock();
        self.sync(&mut st);
        // Over budget here surfaces on the buffer's first use instead.
        if self.register(&mut st, buffer, "external").is_err() {
            st.table.remove(&buffer.id());
        }
    }

    fn plan(&self, source: &'static str, groups: &[Vec<BufferId>]) {
        let mut st = self.lock();
        let groups: Vec<Vec<u64>> = groups
            .iter()
            .map(|g| g.iter().map(|id| id.0).collect())
            .collect();
        st.policy.plan(source, &groups);
        if st.trace.is_some() {
            st.announced.plan(source, &groups);
        }
    }

    fn plan_read(&self, group: usize, buffer: BufferId) {
        let mut st = self.lock();
        st.policy.plan_read(group, buffer.0);
        if st.trace.is_some() {
            st.announced.read(group, buffer.0);
        }
    }

    fn step_boundary(&self, step: u64) {
        let mut st = self.lock();
        self.sync(&mut st);
        let ended = StepRecord {
            t: "step".into(),
            step: st.now.step,
            ops: st.now.index,
            signature: st.step_signature,
        };
        if ended.ops > 0 {
            st.graphs.insert(ended.signature);
        }
        if let Some(t) = st.trace.as_mut() {
            t.steps.push(ended);
        }
        st.policy.step_boundary(step);
        st.now.step = step;
        st.now.index = 0;
        st.created_in_step = 0;
        st.step_signature = FNV_START;
        // Buffers that outlive a step are named by id from now on.
        let mut by_key = KeyMap::default();
        for (&id, e) in st.table.iter_mut() {
            e.key = id.0;
            by_key.insert(id.0, id);
        }
        st.by_key = by_key;
        st.clusters = DroppedClusters::rebuild(&st.table);
    }

    fn wants_recipes(&self) -> bool {
        self.wants_recipes
    }

    fn materialize(&self, buffer: &Arc<Buffer>) -> Result<()> {
        let mut st = self.lock();
        self.sync(&mut st);
        st.op_buffers = vec![buffer.id()];
        let result = self.make_resident(&mut st, buffer, "materialize");
        st.op_buffers.clear();
        result?;
        self.unpin(&mut st, buffer.id());
        Ok(())
    }

    fn uninstalled(&self) {
        let mut st = self.lock();
        self.sync(&mut st);
        let live: Vec<Arc<Buffer>> = st.table.values().filter_map(|e| e.buf.upgrade()).collect();
        // Dropped buffers first (recomputing one may evict others), then everything on the
        // host straight back: with the manager gone, no budget applies.
        for b in &live {
            if b.residency() == dynn_core::Residency::Dropped {
                if let Err(e) = self.make_resident(&mut st, b, "uninstall") {
                    tracing::warn!(buffer = %b.id(), error = %e, "not recomputed at uninstall");
                }
                self.unpin(&mut st, b.id());
            }
        }
        for b in &live {
            if b.residency() == dynn_core::Residency::Host
                && let Err(e) = b.fetch()
            {
                tracing::warn!(buffer = %b.id(), error = %e, "not fetched at uninstall");
            }
        }
    }
}
