//! What a manager is built with ([`ManagerConfig`]) and the counters it keeps ([`MemoryStats`]).

use super::*;

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
