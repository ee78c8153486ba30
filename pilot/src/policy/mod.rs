//! The `pilot` memory policy: evicts the resident buffer with the farthest predicted next use
//! and prefetches the soonest. Until a trained snapshot is available it behaves like `lru`
//! while recording steps for the trainer. While the current step repeats the previous one op
//! for op, the previous step's access order gives exact distances (as `static`/`belady` replay
//! a profile); after the graph diverges the pilot's predictions take over. A misprediction
//! costs time, never correctness: the manager still fetches on demand whatever was evicted.

use crate::bucket::{lower_bound, representative};
use crate::history::KeyMap;
use crate::online::{OnlineConfig, OnlineTrainer, SnapshotCell, StepRecording};
use crate::plan::PlanDistance;
use crate::predictor::{Scratch, Snapshot};
use crate::replay::{Replayer, TrackerGuard, lock, try_lock};
use crate::tracker::{Query, Tracker};
use dynn_core::{BufferId, BufferKind};
use dynn_mm::trace::kind_code;
use dynn_mm::{Announced, Candidate, Eviction, Now, OpRecord, Policy};
use std::sync::Arc;
use std::time::Instant;

mod config;

pub use config::{PilotConfig, PilotStats, RecomputeCosts, StatsSink};

/// Buffers ranked first in recent evictions whose return the policy watches for prefetching.
const SUSPECTS: usize = 16;

/// Buffers reused by every prediction.
#[derive(Debug, Default)]
struct Hot {
    scratch: Scratch,
    /// The window part of the model input.
    window: Vec<f32>,
    /// The first layer's sums over `window`, as of tracker clock `sums_at`.
    sums: Vec<f32>,
    sums_at: Option<u64>,
    /// The candidate part of the model input.
    cand: Vec<f32>,
    soon: Vec<(u64, u64)>,
    /// The latest prediction per buffer id: `(tracker clock, latest, earliest)`.
    recent: KeyMap<(u64, u64, u64)>,
}

/// The keys [`Policy::upcoming`] computed at the last replay, given again until a replay, a
/// ranking, a plan or the step boundary makes them stale.
#[derive(Debug, Default)]
struct PrefetchList {
    keys: Vec<u64>,
    current: bool,
    /// [`Replayer::replayed`] when the keys were computed.
    at: u64,
}

/// The learned policy.
pub struct PilotPolicy {
    cfg: PilotConfig,
    /// The tracker, and where observed ops are replayed into it.
    replay: Replayer,
    cell: Arc<SnapshotCell>,
    version: u64,
    snapshot: Option<Arc<Snapshot>>,
    trainer: Option<OnlineTrainer>,
    recording: Option<StepRecording>,
    steps_seen: u64,
    /// Scratch space of the predictor.
    hot: Hot,
    /// The prefetch list of the last replay.
    prefetch: PrefetchList,
    /// `(latest distance reversed, earliest distance, last use, id, index)` per candidate.
    order: Vec<(std::cmp::Reverse<u64>, u64, u64, BufferId, usize)>,
    sorted: Vec<Candidate>,
    /// Likely-evicted buffers `(id, key, tracker clock when due back)`.
    suspects: Vec<(u64, u64, u64)>,
    stats: PilotStats,
    /// Plans and plan reads announced since the last op, for that op's recorded copy.
    announced: Announced,
    /// Where the counters go when the policy is dropped (see [`PilotPolicy::report_to`]).
    sink: Option<StatsSink>,
}

impl Drop for PilotPolicy {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.stats());
        }
    }
}

impl std::fmt::Debug for PilotPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PilotPolicy")
            .field("cfg", &self.cfg)
            .field("trained", &self.snapshot.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl PilotPolicy {
    /// A pilot that starts untrained (LRU) and trains online when `cfg.online` says so. If
    /// the trainer thread cannot start it stays LRU.
    pub fn new(cfg: PilotConfig) -> Self {
        Self::start(cfg, None)
    }

    fn start(cfg: PilotConfig, snapshot: Option<Snapshot>) -> Self {
        let cell = SnapshotCell::new();
        if let Some(s) = &snapshot {
            cell.publish(s.clone());
        }
        let trainer = cfg.online.and_then(|o| {
            let o = OnlineConfig {
                labels: crate::labels::LabelConfig {
                    features: cfg.features,
                    ..o.labels
                },
                ..o
            };
            OnlineTrainer::spawn(o, cell.clone(), snapshot.clone()).ok()
        });
        let recording = trainer.as_ref().map(|_| StepRecording::default());
        PilotPolicy {
            cfg,
            replay: Replayer::new(Tracker::new(cfg.features), cfg.replay_thread),
            cell,
            version: 0,
            snapshot: None,
            trainer,
            recording,
            steps_seen: 0,
            prefetch: PrefetchList::default(),
            hot: Hot {
                scratch: Scratch::default(),
                window: vec![0.0; cfg.features.window_dim()],
                sums: Vec::new(),
                sums_at: None,
                cand: vec![0.0; cfg.features.encoding.cand_dim()],
                soon: Vec::with_capacity(SUSPECTS),
                recent: KeyMap::default(),
            },
            order: Vec::new(),
            sorted: Vec::new(),
            suspects: Vec::with_capacity(SUSPECTS),
            stats: PilotStats::default(),
            announced: Announced::default(),
            sink: None,
        }
    }

    /// A pilot that starts from a trained snapshot (loaded from a file, or trained on other
    /// workloads) and, when `cfg.online` says so, keeps fine-tuning it online. The features
    /// come from the snapshot.
    pub fn with_snapshot(snapshot: Snapshot, cfg: PilotConfig) -> Self {
        let cfg = PilotConfig {
            features: snapshot.features,
            ..cfg
        };
        Self::start(cfg, Some(snapshot))
    }

    /// Pushes this policy's counters into `sink` when it is dropped.
    pub fn report_to(mut self, sink: StatsSink) -> Self {
        self.sink = Some(sink);
        self
    }

    /// The snapshot in use.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Where the trainer publishes snapshots (also for callers that train elsewhere).
    pub fn cell(&self) -> Arc<SnapshotCell> {
        self.cell.clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> PilotStats {
        PilotStats {
            background_ns: self.replay.background_ns(),
            ..self.stats
        }
    }

    /// The tracker (features, history), with every op observed so far replayed into it.
    pub fn tracker(&mut self) -> TrackerGuard<'_> {
        self.catch_up();
        TrackerGuard(self.replay.shared())
    }

    /// Whether ops are replayed into the tracker on a thread of its own.
    pub fn replays_in_background(&self) -> bool {
        self.replay.threaded()
    }

    /// Replays every op observed so far into the tracker (waiting for the replay thread).
    fn catch_up(&mut self) {
        let t = Instant::now();
        if self.replay.catch_up() {
            self.prefetch.current = false;
        }
        self.stats.observe_ns += t.elapsed().as_nanos() as u64;
    }

    /// Swaps in a newer snapshot if one was published (allocates only then).
    fn refresh(&mut self) {
        let v = self.cell.version();
        if v == self.version {
            return;
        }
        self.version = v;
        if let Some(s) = self.cell.get().filter(|s| s.features == self.cfg.features) {
            let hot = &mut self.hot;
            hot.scratch = s.scratch();
            hot.sums_at = None;
            self.snapshot = Some(s);
            self.stats.swaps += 1;
        }
    }

    fn query(c: &Candidate) -> Query {
        Query {
            id: c.id.0,
            key: c.key,
            kind: kind_code(c.kind),
            bytes: c.bytes as u64,
        }
    }

    /// Predicted ops to the next use of `q`, as `(latest, earliest)`: exact from the replayed
    /// previous step while the step repeats it op for op; else read off the announced plan
    /// (the backward pass's tape, the optimizer's parameters) when it reads `q`, or past the
    /// plan's end where the previous step used `q` after the same plan; else the bounds of
    /// the snapshot's bucket — never nearer than the end of the plan for a buffer the plan
    /// does not read.
    fn distance(&mut self, tracker: &Tracker, q: &Query) -> (u64, u64) {
        if self.cfg.replay_when_matching
            && tracker.matching()
            && let Some(h) = tracker.hint_for(q)
        {
            let d = h.unwrap_or(u64::MAX);
            return (d, d);
        }
        let floor = match tracker.plan_distance(q) {
            Some(PlanDistance::Within(d) | PlanDistance::After(d)) => return (d, d),
            Some(PlanDistance::Beyond(d)) => d + 1,
            Some(PlanDistance::Unplanned) | None => 0,
        };
        let Some(s) = &self.snapshot else {
            return (u64::MAX, floor);
        };
        // A recent prediction for the same buffer still stands, moved on by the ops since,
        // unless an op used the buffer after it.
        let clock = tracker.clock();
        let last_use = tracker.last_use_of(q.id);
        let hot = &mut self.hot;
        if let Some(&(at, latest, earliest)) = hot.recent.get(&q.id)
            && clock - at <= self.cfg.reuse_prediction_ops
            && last_use.is_none_or(|u| u == u64::MAX || u < at)
        {
            let gone = clock - at;
            return (
                latest.saturating_sub(gone).max(floor),
                earliest.saturating_sub(gone).max(floor),
            );
        }
        // The window's share of the first layer is the same for every candidate at this op.
        // (A candidate the plan reads returned above, so the network answers here.)
        if hot.sums_at != Some(clock) {
            tracker.window_features(&mut hot.window);
            s.window_sums(&hot.window, &mut hot.sums);
            hot.sums_at = Some(clock);
        }
        tracker.candidate_features(q, &mut hot.cand);
        self.stats.predictions += 1;
        let b = s.predict_after(&hot.sums, &hot.cand, &mut hot.scratch);
        let (latest, earliest) = (representative(b), lower_bound(b));
        hot.recent.insert(q.id, (clock, latest, earliest));
        (latest.max(floor), earliest.max(floor))
    }

    /// Whether rankings and prefetches follow predictions (a snapshot, or an announced
    /// plan) rather than LRU order.
    fn guided(&self, tracker: &Tracker) -> bool {
        self.snapshot.is_some() || tracker.plan_cursor().active()
    }
}

impl Policy for PilotPolicy {
    fn name(&self) -> &'static str {
        "pilot"
    }

    fn observe(&mut self, op: &OpRecord) {
        let t = Instant::now();
        self.replay.queued().push(op);
        // A full batch goes to the tracker (on the replay thread, or here), whether or not
        // anything asks for prefetches (the manager does not while the pool is full).
        if self.replay.queued().ops() >= self.cfg.batch_ops.max(1) {
            self.replay.hand_off();
        }
        if let Some(r) = self.recording.as_mut() {
            r.push(op, &mut self.announced);
        }
        if !self.suspects.is_empty() {
            self.suspects
                .retain(|s| !op.inputs.iter().chain(&op.outputs).any(|a| a.0 == s.0));
        }
        self.stats.observe_ns += t.elapsed().as_nanos() as u64;
    }

    fn plan(&mut self, source: &str, groups: &[Vec<u64>]) {
        self.catch_up();
        // A plan changes what comes next: a new prefetch list.
        self.prefetch.current = false;
        let t = Instant::now();
        self.replay.shared().tracker.plan(source, groups);
        if self.recording.is_some() {
            self.announced.plan(source, groups);
        }
        self.stats.observe_ns += t.elapsed().as_nanos() as u64;
    }

    fn plan_read(&mut self, group: usize, id: u64) {
        let t = Instant::now();
        self.replay.queued().push_plan_read(group, id);
        if self.recording.is_some() {
            self.announced.read(group, id);
        }
        self.stats.observe_ns += t.elapsed().as_nanos() as u64;
    }

    fn step_boundary(&mut self, step: u64) {
        self.catch_up();
        self.prefetch.current = false;
        let t = Instant::now();
        if let (Some(r), Some(t)) = (self.recording.as_mut(), self.trainer.as_ref())
            && !r.is_empty()
        {
            let room = r.len();
            t.send_step(std::mem::replace(r, StepRecording::with_capacity(room)));
            if self.cfg.wait_for_training {
                t.flush();
            }
        }
        self.replay.shared().tracker.step_boundary(step);
        self.hot.recent.clear();
        self.steps_seen += 1;
        let online = self.cfg.online.filter(|_| self.trainer.is_some());
        self.recording = online
            .filter(|o| o.records(self.steps_seen))
            .map(|_| self.recording.take().unwrap_or_default());
        self.suspects.clear();
        self.refresh();
        self.stats.boundary_ns += t.elapsed().as_nanos() as u64;
    }

    fn rank_victims(&mut self, _now: Now, c: &mut [Candidate]) {
        self.catch_up();
        // The ranking may swap in a snapshot and changes the suspects: a new prefetch list.
        self.prefetch.current = false;
        let t = Instant::now();
        self.refresh();
        self.stats.offered += c.len() as u64;
        // LRU order: the fallback, and where the pilot looks for victims.
        c.sort_unstable_by_key(|c| (c.last_use, c.id));
        let cell = self.replay.cell();
        let shared = lock(&cell);
        let tracker = &shared.tracker;
        if !self.guided(tracker) {
            self.stats.lru_rankings += 1;
            self.stats.rank_ns += t.elapsed().as_nanos() as u64;
            return;
        }
        self.stats.pilot_rankings += 1;
        // The model ranks the least recently used candidates (a bounded cost per decision);
        // the rest follow in LRU order. A replayed order is cheap: it ranks them all.
        let replaying =
            (self.cfg.replay_when_matching && tracker.matching()) || tracker.plan_cursor().active();
        let n = match replaying {
            true => c.len().min(self.cfg.max_ranked_exact.max(1)),
            false => c.len().min(self.cfg.max_ranked.max(1)),
        };
        self.stats.candidates += n as u64;
        tracker.prefetch(c[..n].iter().map(|c| c.id.0));
        self.order.clear();
        for (i, cand) in c[..n].iter().copied().enumerate() {
            let (latest, earliest) = self.distance(tracker, &Self::query(&cand));
            self.order.push((
                std::cmp::Reverse(latest),
                earliest,
                cand.last_use,
                cand.id,
                i,
            ));
        }
        self.order.sort_unstable();
        self.sorted.clear();
        self.sorted.extend(self.order.iter().map(|o| c[o.4]));
        c[..n].copy_from_slice(&self.sorted);
        // The likely victims: remember when each is due back, for prefetching.
        let clock = tracker.clock();
        for o in self.order.iter().take(4) {
            let id = o.3.0;
            let Some(key) = tracker.key_of(id) else {
                continue;
            };
            let due = clock.saturating_add(o.1);
            match self.suspects.iter_mut().find(|s| s.0 == id) {
                Some(s) => s.2 = due,
                None => {
                    if self.suspects.len() == SUSPECTS {
                        self.suspects.remove(0);
                    }
                    self.suspects.push((id, key, due));
                }
            }
        }
        self.stats.rank_ns += t.elapsed().as_nanos() as u64;
    }

    fn drops(&self) -> bool {
        self.cfg.recompute.is_some()
    }

    fn eviction(&self, c: &Candidate) -> Eviction {
        match (self.cfg.recompute, c.recompute_flops) {
            (Some(costs), Some(flops))
                if c.kind == BufferKind::Activation
                    && costs.recompute_is_cheaper(flops, c.bytes) =>
            {
                Eviction::Drop
            }
            _ => Eviction::Offload,
        }
    }

    fn next_use(&mut self, _now: Now, key: u64) -> Option<u64> {
        self.catch_up();
        let shared = self.replay.shared();
        let tracker = &shared.tracker;
        tracker
            .hint(key)
            .filter(|_| self.cfg.replay_when_matching && tracker.matching())
            .flatten()
    }

    fn upcoming(&mut self, _now: Now, horizon: usize, out: &mut Vec<u64>) {
        if horizon == 0 {
            return;
        }
        // A new list after each replay, or when a ranking or a plan made the last one stale;
        // with a replay thread, only while it does not hold the lock (else the last list
        // stands: no waiting here).
        let fresh = self.prefetch.current && self.replay.replayed() == self.prefetch.at;
        if !fresh {
            if !self.replay.threaded() {
                // Without a replay thread the list sees every op observed, as a ranking does.
                self.catch_up();
            }
            let cell = self.replay.cell();
            if let Some(shared) = try_lock(&cell) {
                let t = Instant::now();
                let at = self.replay.replayed();
                let batch = self.cfg.batch_ops.max(1);
                // Far enough ahead to cover the ops until the next replay.
                let horizon = horizon.min(self.cfg.max_horizon).saturating_add(batch - 1);
                let mut list = std::mem::take(&mut self.prefetch.keys);
                list.clear();
                let tracker = &shared.tracker;
                let replaying = self.cfg.replay_when_matching && tracker.matching();
                if self.guided(tracker) && replaying {
                    tracker.upcoming_by_history(horizon, &mut list);
                } else if tracker.plan_cursor().active() {
                    tracker.upcoming_by_plan(horizon, &mut list);
                } else if self.guided(tracker) {
                    self.predicted_soon(tracker.clock(), horizon, &mut list);
                }
                self.prefetch = PrefetchList {
                    keys: list,
                    current: true,
                    at,
                };
                self.stats.upcoming_ns += t.elapsed().as_nanos() as u64;
            }
        }
        out.extend_from_slice(&self.prefetch.keys);
    }
}

impl PilotPolicy {
    /// Keys of the likely-evicted buffers due back within `horizon` ops, soonest first (from
    /// the distances predicted when they were ranked: no prediction here).
    fn predicted_soon(&mut self, clock: u64, horizon: usize, out: &mut Vec<u64>) {
        let soon = &mut self.hot.soon;
        soon.clear();
        for &(_, key, due) in &self.suspects {
            if due.saturating_sub(clock) < horizon as u64 {
                soon.push((due, key));
            }
        }
        soon.sort_unstable();
        out.extend(soon.iter().map(|s| s.1));
    }
}
