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

/// Counters of what the manager did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryStats {
    /// Ops seen.
    pub ops: u64,
    /// Inputs that were not on the device when an op needed them (each one a stall).
    pub demand_fetches: u64,
    /// Time ops waited for bytes (demand fetches, in-flight copies, recomputation).
    pub stall_time: Duration,
    /// Host time spent choosing victims: collecting the evictable buffers and the policy's
    /// ranking of them.
    pub choose_time: Duration,
    /// Host time in the calls that move bytes on the calling thread (demand fetches and
    /// offloads; on a GPU they only queue the copies and their events).
    pub copy_call_time: Duration,
    /// Bytes copied host → device.
    pub bytes_h2d: u64,
    /// Bytes copied device → host.
    pub bytes_d2h: u64,
    /// Buffers offloaded to make room.
    pub evictions: u64,
    /// Of those, buffers whose host copy was current (fetched or written back, and not
    /// written since): released without a copy.
    pub clean_evictions: u64,
    /// Background write-backs: resident buffers copied to the host tier while the link was
    /// idle, so that evicting them later is free.
    pub write_backs: u64,
    /// Activations dropped to be recomputed.
    pub drops: u64,
    /// Recomputations.
    pub recomputes: u64,
    /// FLOPs spent recomputing.
    pub recompute_flops: u64,
    /// Prefetches issued.
    pub prefetches: u64,
    /// Times the device pool was repacked because free space was too scattered.
    pub compactions: u64,
    /// Live blocks those repacks placed again.
    pub repacked_blocks: u64,
    /// Host time spent repacking the pool (its accounting: no bytes move).
    pub compact_time: Duration,
    /// Peak device bytes reserved by the pool: what the device must hold (never above the
    /// budget). A budget of this many bytes runs the same steps without evicting.
    pub peak_device_bytes: usize,
    /// Peak device bytes in live blocks.
    pub peak_in_use: usize,
    /// Device bytes per kind at the peak of live blocks.
    pub peak_by_kind: [usize; 5],
    /// Distinct graph signatures (op sequences with output sizes) over the steps ended so far:
    /// 1 for a static network, more for a dynamic one.
    pub distinct_graphs: usize,
}

impl MemoryStats {
    /// Host time per block placed again by the pool's repacks, microseconds; 0 without
    /// repacks. (A repack's time grows with the live blocks it places.)
    pub fn repack_block_us(&self) -> f64 {
        match self.repacked_blocks {
            0 => 0.0,
            n => self.compact_time.as_secs_f64() * 1e6 / n as f64,
        }
    }

    /// Host time per move made on the executor's thread (an eviction or a demand fetch):
    /// choosing victims plus the copy calls, in microseconds; 0 without moves. (Under a policy
    /// that drops buffers, choosing for the drops counts too, so the figure reads high.)
    pub fn move_host_us(&self) -> f64 {
        let moves = self.evictions + self.demand_fetches;
        match moves {
            0 => 0.0,
            n => (self.choose_time + self.copy_call_time).as_secs_f64() * 1e6 / n as f64,
        }
    }
}

/// How to build a manager.
pub struct ManagerConfig {
    /// Device budget in bytes (`None`: unlimited).
    pub budget: Option<usize>,
    /// The policy.
    pub policy: Box<dyn Policy>,
    /// Transfer engine settings.
    pub transfer: TransferConfig,
    /// How many ops ahead prefetching looks.
    pub prefetch_horizon: usize,
    /// Record every op into a [`Trace`].
    pub record_trace: bool,
    /// Record the memory timeline (for the plot).
    pub record_timeline: bool,
    /// Pool segment sizes `(small, large)` in bytes.
    pub segments: (usize, usize),
    /// Under a budget, write stale buffers back to the host in the background while the
    /// download side is idle, so that evicting them later moves nothing. Off by default: on an
    /// H100 it cost the bundled trainers more step time than it saved (docs/PERFORMANCE.md,
    /// GPU runs 9–10), and on the CPU the Evoformer's too.
    pub write_back: bool,
    /// Under a budget, when less than `budget / EVICT_AHEAD_SHARE` bytes are free
    /// ([`crate::transfer::EVICT_AHEAD_SHARE`]), write the policy's next victim back in the
    /// background and evict it once the copy has left, unless an op used it meanwhile: an
    /// eviction then rarely waits for a copy on the executor's thread, and the room it frees
    /// is there for prefetches before an op needs it. On by default.
    pub evict_ahead: bool,
}

impl ManagerConfig {
    /// A config with `policy` and `budget`, recording nothing.
    pub fn new(policy: Box<dyn Policy>, budget: Option<usize>) -> Self {
        ManagerConfig {
            budget,
            policy,
            transfer: TransferConfig::default(),
            prefetch_horizon: 64,
            record_trace: false,
            record_timeline: false,
            segments: (crate::pool::SMALL_SEGMENT, crate::pool::LARGE_SEGMENT),
            write_back: false,
            evict_ahead: true,
        }
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

/// The dropped buffers grouped into clusters joined by recipe edges (a dropped buffer and the
/// dropped inputs of its recipe), each with the FLOPs to recompute its members: DTR's evicted
/// neighbourhoods. Recomputing any member on access recomputes the members it reads first.
///
/// A union-find over the dropped buffers: dropping a buffer joins the clusters around it. A
/// member that comes back leaves its cluster's cost; when it joined two or more dropped
/// buffers its cluster may have split, and the clusters are rebuilt before they are next
/// used. (Chains come back from the resident end, one end member at a time, so that is rare.)
#[derive(Default)]
struct DroppedClusters {
    /// Union-find nodes: parent, and for a root the size of its tree and the FLOPs of its
    /// members still dropped. Nodes of members that came back stay as links.
    nodes: Vec<(u32, u32, u64)>,
    /// Dropped buffer → its node and its FLOPs.
    member: KeyMap<BufferId, (u32, u64)>,
    /// A member came back whose leaving may have split its cluster.
    stale: bool,
}

impl DroppedClusters {
    /// The clusters of the dropped buffers in `table`.
    fn rebuild(table: &KeyMap<BufferId, Entry>) -> Self {
        let mut c = DroppedClusters::default();
        let dropped = || table.iter().filter(|(_, e)| e.res == Residency::Dropped);
        for (&id, e) in dropped() {
            c.drop(id, e.flops, std::iter::empty());
        }
        for (&id, e) in dropped() {
            for input in e.recipe.iter().flat_map(|r| r.input_ids()) {
                c.join(id, input);
            }
        }
        c
    }

    fn root(&self, mut i: u32) -> u32 {
        while self.nodes[i as usize].0 != i {
            i = self.nodes[i as usize].0;
        }
        i
    }

    /// Joins the clusters of two dropped buffers (nothing when either is not dropped).
    fn join(&mut self, a: BufferId, b: BufferId) {
        let (Some(&(a, _)), Some(&(b, _))) = (self.member.get(&a), self.member.get(&b)) else {
            return;
        };
        let (ra, rb) = (self.root(a), self.root(b));
        if ra == rb {
            return;
        }
        // Union by size keeps every path short (roots are found without compressing paths).
        let (big, small) = if self.nodes[ra as usize].1 >= self.nodes[rb as usize].1 {
            (ra, rb)
        } else {
            (rb, ra)
        };
        let (_, size, cost) = self.nodes[small as usize];
        self.nodes[small as usize].0 = big;
        let root = &mut self.nodes[big as usize];
        root.1 += size;
        root.2 = root.2.saturating_add(cost);
    }

    /// `x`, recomputed with `flops`, was dropped; `neighbours` are buffers beside it (the
    /// inputs of its recipe, and the buffers whose recipes read it).
    fn drop(&mut self, x: BufferId, flops: u64, neighbours: impl Iterator<Item = BufferId>) {
        if self.member.contains_key(&x) {
            return;
        }
        let i = self.nodes.len() as u32;
        self.nodes.push((i, 1, flops));
        self.member.insert(x, (i, flops));
        for n in neighbours {
            self.join(x, n);
        }
    }

    /// `x` is no longer dropped (recomputed, or released); `neighbours` dropped buffers were
    /// beside it. Returns true when the clusters should be rebuilt now: dead links outnumber
    /// the members.
    fn restore(&mut self, x: BufferId, neighbours: usize) -> bool {
        let Some((i, flops)) = self.member.remove(&x) else {
            return false;
        };
        let root = self.root(i);
        let cost = &mut self.nodes[root as usize].2;
        *cost = cost.saturating_sub(flops);
        if neighbours >= 2 {
            self.stale = true;
        }
        self.nodes.len() > 2 * self.member.len() + 64
    }

    /// FLOPs to recompute every distinct cluster that one of `ids` belongs to.
    fn cost_around(&self, ids: impl Iterator<Item = BufferId>) -> u64 {
        if self.member.is_empty() {
            return 0;
        }
        let mut seen: Vec<u32> = Vec::new();
        let mut total = 0u64;
        for id in ids {
            if let Some(&(i, _)) = self.member.get(&id) {
                let root = self.root(i);
                if !seen.contains(&root) {
                    seen.push(root);
                    total = total.saturating_add(self.nodes[root as usize].2);
                }
            }
        }
        total
    }
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
                    e.last_use == used
                        && e.pins == 0
                        && e.held == 0
                        && matches!(e.res, Residency::Device(_))
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

    /// Repacks every device-resident block so scattered free space becomes one range of at
    /// least `room` bytes, timing it. The blocks are the pool's accounting on every backend
    /// (the bytes live in host memory, the CUDA arena or the driver's pool), so nothing moves.
    /// Returns false when repacking would not fit (nothing changes then).
    fn compact(&self, st: &mut State, room: usize) -> bool {
        let start = Instant::now();
        let done = self.repack(st, room);
        st.stats.compact_time += start.elapsed();
        done
    }

    /// [`Self::compact`]'s work.
    fn repack(&self, st: &mut State, room: usize) -> bool {
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

    fn note_peak(&self, st: &mut State) {
        let used = st.pool.in_use();
        if used > st.stats.peak_in_use {
            st.stats.peak_in_use = used;
            st.stats.peak_by_kind = st.device_by_kind;
        }
    }

    /// A pool block of `bytes`, evicting what the policy chooses when over budget.
    fn reserve(&self, st: &mut State, bytes: usize, op: &'static str) -> Result<Block> {
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
    fn candidates(&self, st: &State) -> Vec<Candidate> {
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

    fn evict(&self, st: &mut State, id: BufferId, how: Eviction) -> Result<()> {
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
    fn gather(&self, st: &mut State, bufs: &[Arc<Buffer>], op: &'static str) -> Result<()> {
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

    /// The last resort when nothing can be evicted: offloads held buffers (see
    /// [`MemoryManager::gather`]) until `need` bytes are freed, those of the outermost gathering
    /// first (its kernel runs last). Returns false when none was held.
    fn offload_held(&self, st: &mut State, need: usize) -> Result<bool> {
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

    /// Makes buffer `buf` resident on the device (fetching or recomputing it) and pins it.
    fn make_resident(&self, st: &mut State, buf: &Arc<Buffer>, op: &'static str) -> Result<()> {
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

    fn set_device(
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

    fn unpin(&self, st: &mut State, id: BufferId) {
        if let Some(e) = st.table.get_mut(&id) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// The out-of-memory error: what was asked for and by whom, why nothing more could be
    /// evicted (`why`, or — for an evicting policy — worked out from what holds the device),
    /// and what is resident.
    fn oom(
        &self,
        st: &State,
        requested: usize,
        op: &'static str,
        err: &PoolExhausted,
        why: Option<&str>,
    ) -> Error {
        let h = crate::human_bytes;
        // Kinds are read from the live buffers: a leaf may have become a parameter since.
        let live_kind = |e: &Entry| e.buf.upgrade().map_or(e.kind, |b| b.kind());
        let mut resident = [0usize; 5];
        let mut top: Vec<(BufferId, usize, BufferKind, &'static str)> = Vec::new();
        for (&id, e) in st
            .table
            .iter()
            .filter(|(_, e)| matches!(e.res, Residency::Device(_) | Residency::InFlight(..)))
        {
            let kind = live_kind(e);
            resident[kind as usize] += e.bytes;
            top.push((id, e.bytes, kind, e.producer));
        }
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut by_kind = String::new();
        for k in BufferKind::ALL {
            by_kind.push_str(&format!(
                "\n    {:<16} {}",
                k.as_str(),
                h(resident[k as usize])
            ));
        }
        let mut holders = String::new();
        for (id, bytes, kind, producer) in top.iter().take(10) {
            holders.push_str(&format!(
                "\n    {id:>8} {:>12} {:<16} made by {producer}",
                h(*bytes),
                kind.as_str()
            ));
        }
        // Who asked: the op itself, or the recomputation of a dropped buffer it needs.
        let who = match st.recomputing.last() {
            Some(r) => format!(
                "{op} needs {} to recompute {} (made by {}; {} recomputation{} deep)",
                h(requested),
                r.id,
                r.producer,
                st.recomputing.len(),
                if st.recomputing.len() == 1 { "" } else { "s" }
            ),
            None => format!("{op} needs {}", h(requested)),
        };
        let why = match why {
            Some(w) => w.to_string(),
            None => self.why_nothing_evicts(st, requested, op, err),
        };
        let hint = if st.policy.evicts() {
            "hint: a larger --device-budget"
        } else {
            "hint: pick an offloading policy (--policy lru|static|recompute|belady) or a larger --device-budget"
        };
        let msg = format!(
            "{who} but the device budget is {} with {} in use ({} reserved, largest free block {}); {why}.\n  resident by kind:{by_kind}\n  largest resident buffers:{holders}\n  {hint}",
            h(err.budget),
            h(err.in_use),
            h(err.reserved),
            h(err.largest_free),
        );
        Error::OutOfMemory {
            requested,
            budget: err.budget,
            msg,
        }
    }

    /// Why an evicting policy found nothing to evict: what pins the resident buffers, and
    /// whether the budget's free bytes would have sufficed had they not been scattered.
    fn why_nothing_evicts(
        &self,
        st: &State,
        requested: usize,
        op: &'static str,
        err: &PoolExhausted,
    ) -> String {
        let h = crate::human_bytes;
        let held_by_recompute =
            |id: &BufferId| st.recomputing.iter().any(|r| r.inputs.contains(id));
        let (mut n, mut bytes) = (0usize, 0usize);
        let (mut by_op, mut by_recompute, mut in_flight, mut other) = (0, 0, 0, 0);
        for (id, e) in st
            .table
            .iter()
            .filter(|(_, e)| matches!(e.res, Residency::Device(_) | Residency::InFlight(..)))
        {
            n += 1;
            bytes += e.bytes;
            if matches!(e.res, Residency::InFlight(..)) {
                in_flight += 1;
            } else if st.op_buffers.contains(id) {
                by_op += 1;
            } else if held_by_recompute(id) {
                by_recompute += 1;
            } else {
                other += 1;
            }
        }
        let mut parts = Vec::new();
        if by_op > 0 {
            parts.push(format!("{by_op} as inputs or outputs of {op}"));
        }
        if by_recompute > 0 {
            parts.push(format!(
                "{by_recompute} as inputs of the {} dropped buffer{} being recomputed for it",
                st.recomputing.len(),
                if st.recomputing.len() == 1 { "" } else { "s" }
            ));
        }
        if in_flight > 0 {
            parts.push(format!("{in_flight} with a copy in flight"));
        }
        if other > 0 {
            parts.push(format!("{other} by an enclosing operation"));
        }
        let mut why = match n {
            0 => "nothing is resident to evict".to_string(),
            1 => format!(
                "nothing can be evicted: the one resident buffer ({}) is pinned, {}",
                h(bytes),
                parts.join(", ")
            ),
            _ => format!(
                "nothing can be evicted: all {n} resident buffers ({}) are pinned, {}",
                h(bytes),
                parts.join(", ")
            ),
        };
        let need = DevicePool::rounded(requested);
        let free = err.budget.saturating_sub(err.in_use);
        if free >= need {
            why.push_str(&format!(
                "; {} of the budget is free in total, but scattered (largest free block {}) and repacking the resident buffers could not make a {} block",
                h(free),
                h(err.largest_free),
                h(need)
            ));
        } else {
            why.push_str(&format!("; only {} of the budget is free", h(free)));
        }
        why
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

    /// Under a budget, while no write-back is in flight, copies one resident buffer to the
    /// host tier in the background (keeping it on the device), so that evicting it later
    /// costs no copy on the executor's thread: the policy's next victim under memory pressure
    /// ([`ManagerConfig::evict_ahead`], evicted when the copy completes unless used since),
    /// else, where asked ([`ManagerConfig::write_back`]), the least recently used buffer whose
    /// host copy is stale.
    fn write_back(&self, st: &mut State) {
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
    fn next_victim(&self, st: &mut State) -> Option<Arc<Buffer>> {
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
            if e.pins > 0
                || e.held > 0
                || e.last_use != c.last_use
                || !matches!(e.res, Residency::Device(_))
            {
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

    /// Issues prefetches for buffers the policy expects soon, without evicting anything the
    /// policy expects sooner.
    fn prefetch(&self, st: &mut State) {
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
fn stalled(st: &mut State, start: Instant) {
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

#[cfg(test)]
mod tests {
    use super::DroppedClusters;
    use dynn_core::BufferId;

    /// Cluster costs kept incrementally equal those of the connected components of the dropped
    /// buffers, over random drops and returns on a random recipe graph.
    #[test]
    fn clusters_follow_the_dropped_subgraph() {
        const N: usize = 40;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        // Buffer i's recipe reads up to two earlier buffers.
        let inputs: Vec<Vec<usize>> = (0..N)
            .map(|i| (0..2).filter(|_| i > 0).map(|_| rand(i.max(1))).collect())
            .collect();
        let flops = |i: usize| 10 + i as u64;
        let id = |i: usize| BufferId(i as u64);
        let beside = |i: usize| -> Vec<usize> {
            let mut b = inputs[i].clone();
            b.extend((0..N).filter(|&j| inputs[j].contains(&i)));
            b
        };
        let mut dropped = [false; N];
        let mut c = DroppedClusters::default();
        for _ in 0..2000 {
            let x = rand(N);
            if dropped[x] {
                dropped[x] = false;
                let n = beside(x).into_iter().filter(|&j| dropped[j]).count();
                let _ = c.restore(id(x), n);
            } else {
                dropped[x] = true;
                let near: Vec<BufferId> = beside(x).into_iter().map(id).collect();
                c.drop(id(x), flops(x), near.into_iter());
            }
            if c.stale {
                c = DroppedClusters::default();
                for i in (0..N).filter(|&i| dropped[i]) {
                    c.drop(id(i), flops(i), std::iter::empty());
                }
                for i in (0..N).filter(|&i| dropped[i]) {
                    for &j in &inputs[i] {
                        c.join(id(i), id(j));
                    }
                }
            }
            // Brute force: each dropped buffer's component and its cost.
            for start in (0..N).filter(|&i| dropped[i]) {
                let mut seen = vec![start];
                let mut stack = vec![start];
                while let Some(i) = stack.pop() {
                    for j in beside(i) {
                        if dropped[j] && !seen.contains(&j) {
                            seen.push(j);
                            stack.push(j);
                        }
                    }
                }
                let want: u64 = seen.iter().map(|&i| flops(i)).sum();
                assert_eq!(
                    c.cost_around(std::iter::once(id(start))),
                    want,
                    "buffer {start}"
                );
            }
        }
    }
}
