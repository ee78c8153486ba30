//! How the pilot policy is configured ([`PilotConfig`], [`RecomputeCosts`]) and what it
//! counts ([`PilotStats`], [`StatsSink`]).

use crate::encoder::FeatureConfig;
use crate::online::OnlineConfig;
use std::sync::Arc;

/// How the pilot policy runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PilotConfig {
    /// The features (must match the snapshot's).
    pub features: FeatureConfig,
    /// Train online on a background thread (`None`: only a given snapshot is used).
    pub online: Option<OnlineConfig>,
    /// Wait at each step boundary until the trainer has processed the step (deterministic
    /// timing of the hot swap, for tests; costs the training time on the critical path).
    pub wait_for_training: bool,
    /// Use the previous step's exact order while the current step repeats it.
    pub replay_when_matching: bool,
    /// The most candidates (least recently used first) ranked per eviction decision: bounds
    /// the predictions on the critical path.
    pub max_ranked: usize,
    /// The same bound where distances are read off the plan or the replayed step (cheaper
    /// than a prediction, so more candidates are ranked).
    pub max_ranked_exact: usize,
    /// The farthest ahead (in ops) prefetching looks, whatever horizon the caller offers.
    pub max_horizon: usize,
    /// A buffer's prediction is reused, less the ops since, for this many ops unless the
    /// buffer was used meanwhile (0: predict at every ranking): rankings come every few ops
    /// and rank mostly the same candidates.
    pub reuse_prediction_ops: u64,
    /// The device's costs, when known: an activation that can be recomputed is then dropped
    /// rather than offloaded where recomputing it costs less than copying it out (`None`:
    /// every victim is offloaded).
    pub recompute: Option<RecomputeCosts>,
    /// Ops observed are queued and replayed into the tracker in batches of up to this many
    /// (sooner when a ranking, a plan or the step boundary needs the tracker); between
    /// batches the prefetch list of the last replay stands, computed `batch_ops − 1` ops
    /// further ahead. Between two ops a training kernel evicts the tracker's state from the
    /// caches: a batch pays those misses once. 1 (or 0): each op as it comes.
    pub batch_ops: usize,
    /// Replay the batches on a thread of the pilot's own: the executor then only queues ops,
    /// and waits for the replays only where a ranking, a plan or the step boundary needs the
    /// tracker current. Prefetch lists are then computed once a replay is done rather than at
    /// a fixed op, so which buffers are prefetched when depends on timing (results never do).
    /// Off by default: decisions are then deterministic, as the simulator needs, and on a
    /// machine whose cores are all busy with kernels the thread only waits for one (the
    /// trainers turn it on with [`crate::REPLAY_THREAD_ENV`]).
    pub replay_thread: bool,
}

/// What a device charges for copying a buffer over the host link and for recomputing it,
/// for choosing how a victim leaves the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecomputeCosts {
    /// FLOP/s of the compute stream.
    pub flops_per_sec: f64,
    /// Device→host link bytes per second.
    pub link_bytes_per_sec: f64,
    /// Fixed seconds per copy over the link (driver call, synchronisation).
    pub copy_latency_s: f64,
    /// Fixed seconds per recomputing kernel (its launch).
    pub launch_s: f64,
}

impl RecomputeCosts {
    /// The costs of a simulated device.
    pub fn of_profile(p: &dynn_mm::DeviceProfile) -> Self {
        RecomputeCosts {
            flops_per_sec: p.peak_flops,
            link_bytes_per_sec: p.d2h_bytes_per_sec,
            copy_latency_s: p.copy_latency_s,
            launch_s: p.launch_s,
        }
    }

    /// Whether recomputing `flops` costs less than copying `bytes` off the device: the copy
    /// must finish before its room is free, while a dropped buffer costs nothing until it is
    /// used again. The recomputation is priced by its FLOPs alone (a candidate does not carry
    /// the bytes its producer reads), so a memory-bound producer looks cheaper than it is.
    pub fn recompute_is_cheaper(&self, flops: u64, bytes: usize) -> bool {
        self.launch_s + flops as f64 / self.flops_per_sec
            < self.copy_latency_s + bytes as f64 / self.link_bytes_per_sec
    }
}

impl Default for PilotConfig {
    fn default() -> Self {
        PilotConfig {
            features: FeatureConfig::default(),
            online: Some(OnlineConfig::default()),
            wait_for_training: false,
            replay_when_matching: true,
            max_ranked: 32,
            max_ranked_exact: 128,
            max_horizon: 32,
            reuse_prediction_ops: 8,
            recompute: None,
            batch_ops: 4,
            replay_thread: false,
        }
    }
}

/// Counters of what the pilot did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PilotStats {
    /// Model predictions made.
    pub predictions: u64,
    /// Rankings decided by LRU (no snapshot yet).
    pub lru_rankings: u64,
    /// Rankings decided with the snapshot or the replayed order.
    pub pilot_rankings: u64,
    /// Snapshots swapped in.
    pub swaps: u64,
    /// Candidates ranked, over all rankings.
    pub candidates: u64,
    /// Candidates offered (every resident, unpinned buffer), over all rankings.
    pub offered: u64,
    /// Time on the executor's thread queueing ops, replaying them (whichever call replays
    /// them) and, with a replay thread, waiting for its lock, nanoseconds.
    pub observe_ns: u64,
    /// Time in `rank_victims`, nanoseconds.
    pub rank_ns: u64,
    /// Time in `upcoming`, nanoseconds.
    pub upcoming_ns: u64,
    /// Time in `step_boundary` (handing the step to the trainer, swapping), nanoseconds.
    pub boundary_ns: u64,
    /// Time the replay thread spent replaying batches, nanoseconds (0 without one): off the
    /// executor's thread, except where the executor waits for it (counted in
    /// `observe_ns`).
    pub background_ns: u64,
}

impl PilotStats {
    /// Time the pilot spent on the critical path, seconds.
    pub fn critical_seconds(&self) -> f64 {
        (self.observe_ns + self.rank_ns + self.upcoming_ns + self.boundary_ns) as f64 * 1e-9
    }
}

/// Receives a pilot's final counters when the policy is dropped: the memory manager owns its
/// policy, so this is how a caller reads them after a run.
pub type StatsSink = Arc<std::sync::Mutex<Vec<PilotStats>>>;
