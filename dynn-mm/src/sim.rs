//! The trace simulator: replays a recorded step under a policy, a budget and a device
//! profile on a virtual clock — one compute stream, one copy stream per direction — so stall
//! time, bytes moved and peak memory are reproducible numbers, not noisy timings.
//!
//! Model: an op's compute time is `launch + max(flops / peak_flops, bytes / mem_bw)`. An op
//! starts when its inputs are resident: a buffer in the host tier is fetched on the
//! host→device stream (a stall), a prefetched one is waited for. Outputs need room: the policy
//! ranks resident, unpinned buffers and victims are copied out on the device→host stream (or
//! dropped and, on next use, recomputed at their producer's cost). A buffer is freed where the
//! trace recorded its release, or (older traces) after its last access. Device memory is a
//! byte count under the budget or, to predict a measured run, the memory manager's own pool
//! replayed after the step before ([`SimMemory::Pool`], [`simulate_with`]). After each op the
//! inputs of the next [`PREFETCH_HORIZON`] ops that the policy expects are prefetched while
//! there is free room.

use crate::keymap::KeyMap;
use crate::policy::{Candidate, Eviction, Now, Policy};
use crate::pool::{Block, DevicePool};
use crate::trace::{OpRecord, kind_of};
use dynn_core::{BufferId, BufferKind, Error, Result};

/// How many ops ahead the simulator prefetches: inputs of the next few ops only, so that
/// prefetched bytes do not push out what is needed sooner.
pub const PREFETCH_HORIZON: usize = 4;

/// A device as the simulator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Name (`a100-pcie4`, `h100-pcie5`, `calibrated`).
    pub name: String,
    /// Host→device link bytes per second.
    pub h2d_bytes_per_sec: f64,
    /// Device→host link bytes per second.
    pub d2h_bytes_per_sec: f64,
    /// Peak FLOP/s of the compute stream.
    pub peak_flops: f64,
    /// Device memory bandwidth in bytes per second.
    pub mem_bytes_per_sec: f64,
    /// Fixed cost per op (kernel launch, or on a host-bound run the framework's own work per
    /// op), seconds.
    pub launch_s: f64,
    /// Fixed cost per copy (driver call, synchronisation, the transfer thread's hand-off),
    /// seconds; added to `bytes / bandwidth`.
    pub copy_latency_s: f64,
    /// Host time of one move made on the executor's thread (an eviction or a demand fetch:
    /// choosing victims, the driver calls that queue the copy, the bookkeeping), seconds. On a
    /// host-bound run it delays every later kernel launch; prefetches are issued by the
    /// transfer thread and cost none.
    pub move_host_s: f64,
    /// Host time to repack one live block of the memory manager's pool (a repack, when free
    /// space is too scattered for a request the budget has room for, places every live block
    /// again; [`crate::MemoryStats::repack_block_us`]), seconds. Charged where a replay under
    /// [`SimMemory::Pool`] repacks.
    pub repack_host_s: f64,
    /// Under a budget the run writes stale buffers back in the background while the download
    /// link is idle, as the memory manager does when asked ([`crate::ManagerConfig::write_back`];
    /// off by default in both).
    pub write_back: bool,
}

impl DeviceProfile {
    /// An A100 on PCIe 4 (25 GB/s each way, measured figure; 19.5 TFLOP/s fp32, 1.56 TB/s).
    pub fn a100_pcie4() -> Self {
        DeviceProfile {
            name: "a100-pcie4".into(),
            h2d_bytes_per_sec: 25e9,
            d2h_bytes_per_sec: 25e9,
            peak_flops: 19.5e12,
            mem_bytes_per_sec: 1.555e12,
            launch_s: 5e-6,
            copy_latency_s: 0.0,
            move_host_s: 0.0,
            repack_host_s: 0.0,
            write_back: false,
        }
    }

    /// An H100 on PCIe 5 (about 50 GB/s host→device; 51 TFLOP/s fp32, 2 TB/s).
    pub fn h100_pcie5() -> Self {
        DeviceProfile {
            name: "h100-pcie5".into(),
            h2d_bytes_per_sec: 50e9,
            d2h_bytes_per_sec: 50e9,
            peak_flops: 51e12,
            mem_bytes_per_sec: 2.0e12,
            launch_s: 4e-6,
            copy_latency_s: 0.0,
            move_host_s: 0.0,
            repack_host_s: 0.0,
            write_back: false,
        }
    }

    /// A profile from figures measured on this machine (e.g. by `benches/kernels.rs`):
    /// matmul FLOP/s, memory bandwidth, and a copy bandwidth for both directions.
    pub fn calibrated(peak_flops: f64, mem_bytes_per_sec: f64, copy_bytes_per_sec: f64) -> Self {
        DeviceProfile {
            name: "calibrated".into(),
            h2d_bytes_per_sec: copy_bytes_per_sec,
            d2h_bytes_per_sec: copy_bytes_per_sec,
            peak_flops,
            mem_bytes_per_sec,
            launch_s: 1e-6,
            copy_latency_s: 0.0,
            move_host_s: 0.0,
            repack_host_s: 0.0,
            write_back: false,
        }
    }

    /// A named profile: `a100-pcie4`, `h100-pcie5`, or
    /// `calibrated:FLOPS,MEM_BW,COPY_BW[,COPY_LATENCY_S[,OP_S]]` (rates per second; the
    /// optional fixed cost of one copy and of one op, in seconds).
    pub fn by_name(name: &str) -> Result<Self> {
        if let Some(figures) = name.strip_prefix("calibrated:") {
            let v: Vec<f64> = figures
                .split(',')
                .map(|f| f.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::invalid("profile", format!("{name:?}: {e}")))?;
            let bad = || {
                Error::invalid(
                    "profile",
                    format!(
                        "{name:?}: expected calibrated:FLOPS,MEM_BW,COPY_BW[,COPY_LATENCY_S[,OP_S]], rates positive, latencies not negative"
                    ),
                )
            };
            if !(3..=5).contains(&v.len())
                || v[..3].iter().any(|&rate| rate <= 0.0 || rate.is_nan())
                || v[3..].iter().any(|&fixed| fixed < 0.0 || fixed.is_nan())
            {
                return Err(bad());
            }
            let mut p = Self::calibrated(v[0], v[1], v[2]);
            if let Some(&latency) = v.get(3) {
                p.copy_latency_s = latency;
            }
            if let Some(&op) = v.get(4) {
                p.launch_s = op;
            }
            return Ok(p);
        }
        match name {
            "a100-pcie4" => Ok(Self::a100_pcie4()),
            "h100-pcie5" => Ok(Self::h100_pcie5()),
            other => Err(Error::invalid(
                "profile",
                format!("unknown device profile {other:?}: choose a100-pcie4 or h100-pcie5"),
            )),
        }
    }

    /// The executor's clock after it issues one move at `now`.
    fn issue_move(&self, now: &mut f64, r: &mut SimResult) {
        *now += self.move_host_s;
        r.move_host_ms += self.move_host_s * 1e3;
    }

    /// Seconds to copy `bytes` host→device.
    fn h2d_s(&self, bytes: u64) -> f64 {
        self.copy_latency_s + bytes as f64 / self.h2d_bytes_per_sec
    }

    /// Seconds to copy `bytes` device→host.
    fn d2h_s(&self, bytes: u64) -> f64 {
        self.copy_latency_s + bytes as f64 / self.d2h_bytes_per_sec
    }

    /// Seconds for a kernel of `flops` that moves `bytes`: launch plus the roofline bound.
    fn kernel_s(&self, flops: u64, bytes: u64) -> f64 {
        self.launch_s + (flops as f64 / self.peak_flops).max(bytes as f64 / self.mem_bytes_per_sec)
    }
}

/// What one simulated replay cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimResult {
    /// Virtual time of the whole replay, ms.
    pub step_ms: f64,
    /// Time the compute stream was busy (including recomputation), ms.
    pub compute_ms: f64,
    /// Time the compute stream waited for bytes, ms.
    pub stall_ms: f64,
    /// `stall_ms` split by the phase of the op that waited: forward, backward, optimizer.
    pub stall_ms_by_phase: [f64; 3],
    /// Host time the executor spent issuing moves ([`DeviceProfile::move_host_s`] each), ms.
    pub move_host_ms: f64,
    /// Repacks of the pool (under [`SimMemory::Pool`]).
    pub repacks: u64,
    /// Host time they took ([`DeviceProfile::repack_host_s`] per block repacked), ms.
    pub repack_host_ms: f64,
    /// Bytes copied host→device.
    pub bytes_h2d: u64,
    /// Bytes copied device→host.
    pub bytes_d2h: u64,
    /// Peak device bytes.
    pub peak_device_bytes: usize,
    /// Buffers evicted.
    pub evictions: u64,
    /// Of those, buffers whose host copy was current: released without a copy or a host
    /// move charge.
    pub clean_evictions: u64,
    /// Background write-backs (see [`MemoryStats::write_backs`](crate::MemoryStats)).
    pub write_backs: u64,
    /// Inputs fetched from the host tier when an op needed them (not prefetched).
    pub demand_fetches: u64,
    /// FLOPs spent recomputing dropped buffers.
    pub recomputed_flops: u64,
}

impl SimResult {
    /// Host time of the memory manager's own work on the executor's thread: moves and
    /// repacks, ms (not stalls: the compute stream did not wait for bytes).
    fn host_ms(&self) -> f64 {
        self.move_host_ms + self.repack_host_ms
    }
}

/// How the simulator accounts device memory under the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimMemory {
    /// A byte count: anything fits while the live bytes stay within the budget.
    #[default]
    Bytes,
    /// The memory manager's own [`DevicePool`] with these `(small, large)` segment sizes:
    /// requests are rounded, placed in segments and can fail on fragmentation, so evictions
    /// happen where a real run's do (to predict a measured run).
    Pool(usize, usize),
}

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
    /// (flops, bytes) of the producing op, for recomputation.
    producer: Option<(u64, u64)>,
    /// The host tier holds a current copy (fetched or written back, and not written since):
    /// evicting it copies nothing, as [`dynn_core::Buffer::offload`] does.
    clean: bool,
    /// When its write-back's copy has left the device (an eviction before waits for it).
    clean_at: f64,
}

/// Replays `ops` (one step of a trace, in order) under `policy`, a `budget` in bytes (`None`:
/// unlimited) and `profile`, counting device memory in bytes ([`SimMemory::Bytes`]).
/// Deterministic: same inputs, same numbers.
pub fn simulate(
    ops: &[OpRecord],
    policy: &mut dyn Policy,
    budget: Option<usize>,
    profile: &DeviceProfile,
) -> Result<SimResult> {
    simulate_with(&[], ops, policy, budget, profile, SimMemory::Bytes)
}

/// [`simulate`] with device memory accounted as `memory` says, after replaying `warmup` (the
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
    let mut bufs: KeyMap<u64, Buf> = KeyMap::default();
    let mut by_key: KeyMap<u64, u64> = KeyMap::default();
    let (mut now, mut h2d_free, mut d2h_free) = (0.0f64, 0.0f64, 0.0f64);
    let mut mem = Memory::new(memory, budget);
    let mut r = SimResult::default();
    let mut upcoming = Vec::new();
    for (g, &op) in all.iter().enumerate() {
        if g == warmup.len() && g > 0 {
            // The timed step begins: copies have landed, buffers from before are named by
            // id (as the memory manager renames them at a step boundary), clocks restart.
            policy.step_boundary(op.step);
            by_key.clear();
            for (&id, b) in bufs.iter_mut() {
                b.key = id;
                if let Place::Arriving(_) = b.place {
                    b.place = Place::Device;
                }
                // So have write-backs: their completion times belong to the old clock.
                b.clean_at = 0.0;
                by_key.insert(id, id);
            }
            (now, h2d_free, d2h_free) = (0.0, 0.0, 0.0);
            r = SimResult {
                peak_device_bytes: mem.used,
                ..SimResult::default()
            };
        }
        let i = if g < warmup.len() {
            g
        } else {
            g - warmup.len()
        };
        let seq = g as u64;
        let stall_before = r.stall_ms;
        let clock = Now {
            seq,
            step: op.step,
            index: i as u32,
        };
        op.announce_to(policy);
        let pinned: Vec<u64> = op.inputs.iter().chain(&op.outputs).map(|a| a.0).collect();
        // Takes `bytes` of device memory, first evicting what the policy ranks first if they
        // do not fit.
        macro_rules! alloc {
            ($bytes:expr) => {{
                let mut room = RoomMaker {
                    bufs: &mut bufs,
                    mem: &mut mem,
                    pinned: &pinned,
                    policy: &mut *policy,
                    clock,
                    profile,
                    now: &mut now,
                    d2h_free: &mut d2h_free,
                    r: &mut r,
                };
                room.alloc($bytes)?
            }};
        }
        // Inputs: resident, arriving, in the host tier, dropped, or first seen (made outside ops).
        for a in &op.inputs {
            let place = bufs.get(&a.0).map(|b| b.place);
            let (start, issued) = (now, r.host_ms());
            let mut block = None;
            match place {
                Some(Place::Device) => {}
                Some(Place::Arriving(t)) => now = now.max(t),
                Some(Place::Host) => {
                    block = alloc!(a.1 as usize);
                    profile.issue_move(&mut now, &mut r);
                    let begin = now.max(h2d_free);
                    h2d_free = begin + profile.h2d_s(a.1);
                    now = h2d_free;
                    r.bytes_h2d += a.1;
                    r.demand_fetches += 1;
                    if let Some(b) = bufs.get_mut(&a.0) {
                        b.clean = true;
                    }
                }
                Some(Place::Dropped) => {
                    block = alloc!(a.1 as usize);
                    let (flops, bytes) =
                        bufs.get(&a.0).and_then(|b| b.producer).unwrap_or((0, a.1));
                    let t = profile.kernel_s(flops, bytes);
                    now += t;
                    r.compute_ms += t * 1e3;
                    r.recomputed_flops += flops;
                }
                None => {
                    // Made before the step (parameters, optimizer state, inputs): left on the
                    // device by the previous step if it still fits, else in the host tier.
                    let block = match mem.take(a.1 as usize) {
                        Ok(block) => block,
                        Err(()) => {
                            let block = alloc!(a.1 as usize);
                            profile.issue_move(&mut now, &mut r);
                            let begin = now.max(h2d_free);
                            h2d_free = begin + profile.h2d_s(a.1);
                            now = h2d_free;
                            r.bytes_h2d += a.1;
                            r.demand_fetches += 1;
                            block
                        }
                    };
                    bufs.insert(
                        a.0,
                        Buf {
                            bytes: a.1 as usize,
                            block,
                            key: a.3,
                            kind: a.2,
                            place: Place::Device,
                            last_use: seq,
                            uses: 0,
                            producer: None,
                            clean: false,
                            clean_at: 0.0,
                        },
                    );
                    by_key.insert(a.3, a.0);
                }
            }
            if let Some(b) = bufs.get_mut(&a.0) {
                b.place = Place::Device;
                if block.is_some() {
                    b.block = block;
                }
            }
            r.stall_ms += (now - start) * 1e3 - (r.host_ms() - issued);
        }
        for a in &op.outputs {
            if let Some(b) = bufs.get_mut(&a.0) {
                b.clean = false; // written in place: the host copy is stale
                continue;
            }
            let (start, issued) = (now, r.host_ms());
            let block = alloc!(a.1 as usize);
            r.stall_ms += (now - start) * 1e3 - (r.host_ms() - issued);
            bufs.insert(
                a.0,
                Buf {
                    bytes: a.1 as usize,
                    block,
                    key: a.3,
                    kind: a.2,
                    place: Place::Device,
                    last_use: seq,
                    uses: 0,
                    producer: Some((op.flops, op.bytes_read + op.bytes_written)),
                    clean: false,
                    clean_at: 0.0,
                },
            );
            by_key.insert(a.3, a.0);
        }
        r.peak_device_bytes = r.peak_device_bytes.max(mem.used);
        let t = profile.kernel_s(op.flops, op.bytes_read + op.bytes_written);
        now += t;
        r.compute_ms += t * 1e3;
        policy.observe(op);
        r.stall_ms_by_phase[usize::from(op.phase.min(2))] += r.stall_ms - stall_before;
        for a in op.inputs.iter().chain(&op.outputs) {
            if let Some(b) = bufs.get_mut(&a.0) {
                b.last_use = seq;
                b.uses += 1;
            }
        }
        // Free what the run released after this op, or (without release records) what the
        // trace never touches again; parameters and optimizer state outlive the step (they
        // stay where they are, evictable).
        let dead: Vec<u64> = if frees_recorded {
            op.freed.clone()
        } else {
            op.inputs
                .iter()
                .chain(&op.outputs)
                .filter(|a| {
                    last_access.get(&a.0) == Some(&g)
                        && !matches!(
                            kind_of(a.2),
                            BufferKind::Parameter | BufferKind::OptimizerState
                        )
                })
                .map(|a| a.0)
                .collect()
        };
        for id in dead {
            if let Some(b) = bufs.remove(&id) {
                if matches!(b.place, Place::Device | Place::Arriving(_)) {
                    mem.give(b.bytes, b.block);
                }
                by_key.remove(&b.key);
            }
        }
        // Under a budget, while the download link is idle, write the least recently used
        // resident buffer whose host copy is stale back to the host, keeping it on the device
        // (as the memory manager does): evicting it later waits for that copy at most.
        if profile.write_back && budget != usize::MAX && d2h_free <= now {
            let oldest = bufs
                .iter()
                .filter(|(_, b)| {
                    b.place == Place::Device
                        && !b.clean
                        && crate::transfer::write_back_fits(b.bytes, budget)
                })
                .min_by_key(|(id, b)| (b.last_use, **id))
                .map(|(&id, _)| id);
            if let Some(b) = oldest.and_then(|id| bufs.get_mut(&id)) {
                d2h_free = now + profile.d2h_s(b.bytes as u64);
                b.clean = true;
                b.clean_at = d2h_free;
                r.bytes_d2h += b.bytes as u64;
                r.write_backs += 1;
            }
        }
        // Prefetch what the policy expects soon, while there is free room.
        let next = Now {
            seq,
            step: op.step,
            index: i as u32,
        };
        upcoming.clear();
        policy.upcoming(next, PREFETCH_HORIZON, &mut upcoming);
        for &key in &upcoming {
            let Some(&id) = by_key.get(&key) else {
                continue;
            };
            let Some(b) = bufs.get_mut(&id) else { continue };
            if b.place != Place::Host {
                continue;
            }
            let Ok(block) = mem.take(b.bytes) else {
                break;
            };
            b.block = block;
            let begin = now.max(h2d_free);
            h2d_free = begin + profile.h2d_s(b.bytes as u64);
            b.place = Place::Arriving(h2d_free);
            b.clean = true;
            r.bytes_h2d += b.bytes as u64;
            r.peak_device_bytes = r.peak_device_bytes.max(mem.used);
        }
    }
    r.step_ms = now * 1e3;
    Ok(r)
}

/// What making room touches: the replay's buffers and clocks, for one op.
struct RoomMaker<'a> {
    bufs: &'a mut KeyMap<u64, Buf>,
    mem: &'a mut Memory,
    /// The op's own buffers, never evicted for it.
    pinned: &'a [u64],
    policy: &'a mut dyn Policy,
    clock: Now,
    profile: &'a DeviceProfile,
    now: &'a mut f64,
    d2h_free: &'a mut f64,
    r: &'a mut SimResult,
}

impl RoomMaker<'_> {
    /// Takes `bytes` of device memory, evicting as the memory manager does when they do not
    /// fit: by byte count, until they fit; with a pool, by rounds (repack when the budget has
    /// room but no block is free, else evict the policy's first victims until a rounded
    /// `bytes` is freed, and try again), as `MemoryManager::reserve` does.
    fn alloc(&mut self, bytes: usize) -> Result<Option<Block>> {
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
                *self.now += host;
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
    fn evict_ranked(&mut self, done: impl Fn(&Memory, usize) -> bool) -> usize {
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
                recompute_flops: b.producer.map(|p| p.0),
            })
            .collect();
        // Candidates come from a hash map: give policies a fixed order, so ties break the same
        // way in every run.
        cands.sort_by_key(|c| c.id);
        self.policy.rank_victims(self.clock, &mut cands);
        let (mut freed, mut evicted) = (0, 0);
        for c in cands {
            if done(self.mem, freed) {
                break;
            }
            let how = self.policy.eviction(&c);
            let Some(b) = self.bufs.get_mut(&c.id.0) else {
                continue;
            };
            if let Place::Arriving(t) = b.place {
                // A prefetch still in flight: it can leave once it has landed.
                *self.now = self.now.max(t);
            }
            match how {
                Eviction::Drop => {
                    b.place = Place::Dropped;
                    b.clean = false;
                }
                // Its host copy is current: the device copy is released, nothing moves.
                Eviction::Offload if b.clean => {
                    *self.now = self.now.max(b.clean_at);
                    b.place = Place::Host;
                    self.r.clean_evictions += 1;
                }
                Eviction::Offload => {
                    self.profile.issue_move(self.now, self.r);
                    let begin = self.now.max(*self.d2h_free);
                    *self.d2h_free = begin + self.profile.d2h_s(b.bytes as u64);
                    // The space is free once the copy has left the device.
                    *self.now = *self.d2h_free;
                    self.r.bytes_d2h += b.bytes as u64;
                    b.place = Place::Host;
                }
            }
            self.mem.give(b.bytes, b.block.take());
            freed += DevicePool::rounded(b.bytes);
            evicted += 1;
            self.r.evictions += 1;
        }
        evicted
    }

    /// Repacks the live blocks as the memory manager does ([`DevicePool::compact`]) so that
    /// `room` bytes are free in one piece (the pool's accounting only: nothing is copied, as
    /// on the device). Returns how many live blocks were placed again, or `None` when they do
    /// not fit.
    fn repack(&mut self, room: usize) -> Option<usize> {
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

    fn no_room(&self, bytes: usize) -> Error {
        Error::OutOfMemory {
            requested: bytes,
            budget: self.mem.budget,
            msg: format!(
                "simulated: {bytes} bytes do not fit beside the op's own {used} bytes",
                used = self.mem.used
            ),
        }
    }
}
