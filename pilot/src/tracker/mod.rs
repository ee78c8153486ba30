//! The tracker: what the pilot remembers of the ops it has seen — a window of recent op
//! features, every buffer's use history, and the previous step's access order — and the
//! feature vector of a candidate buffer at this moment. Labels (offline) and the policy
//! (online) replay ops through the same tracker, so both see the same features.

use crate::buffers::{BufferTable, Cold, Hot, NO_FORWARD};
use crate::encoder::{
    CandidateView, Encoding, FeatureConfig, OpView, PHASES, Producer, StepPosition,
    encode_candidate, encode_op,
};
use crate::history::{KeyMap, StepProfile, UseRange};
use crate::plan::{PlanCursor, PlanDistance};
use dynn_mm::OpRecord;
use dynn_mm::trace::Access;

mod features;
mod hints;

/// Buffers unused for this many steps are forgotten.
const KEEP_STEPS: u64 = 4;

/// Ops (the newest included) whose identities make an access site's context.
const CONTEXT: usize = 3;

/// Access sites remembered at most (the table is cleared when it grows past this).
const MAX_SITES: usize = 1 << 16;

/// A site's recorded gap meaning "not accessed again in its step".
const NEVER: u32 = u32::MAX;

/// Mixes `x` into hash `h` (one multiply-rotate round).
fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31)
}

/// Keys from here on name buffers made in the current step (see [`dynn_mm::trace`]).
const PERSISTENT: u64 = 1 << 63;

/// The aligned key of the `rank`-th buffer made in phase `phase` of a step.
fn aligned_key(phase: u8, rank: u32) -> u64 {
    PERSISTENT | ((phase as u64) << 40) | rank as u64
}

/// What the tracker knows of one buffer (a copy, assembled by [`Tracker::state`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferState {
    /// Kind code.
    pub kind: u8,
    /// Size in bytes.
    pub bytes: u64,
    /// Its key now (renamed to its id at every step boundary, as the memory manager does).
    pub key: u64,
    /// The key the tracker's own history uses: the id for a buffer that existed before the
    /// step, else its creation rank within the phase that made it — so the same buffer of two
    /// steps whose earlier phases differ in length still shares a key.
    pub aligned: u64,
    /// Phase of its last use.
    pub last_phase: u8,
    /// Tracker clock of the op that used it last.
    pub last_use: u64,
    /// Index within its step of that op (0 unless that step is the current one).
    pub last_use_index: u32,
    /// Step of that op.
    pub last_step: u64,
    /// Step it was first seen in.
    pub first_step: u64,
    /// Index within that step of the op that first used it.
    pub first_index: u32,
    /// Forward position (index in the step) of its last forward use this step.
    pub last_forward: Option<u32>,
    /// Ops of each phase that used it this step.
    pub phase_uses: [u32; PHASES],
    /// Ops of the current step that used it.
    pub uses_step: u32,
    /// Ops of earlier steps that used it.
    pub uses_past: u32,
    /// The op that wrote it first, when an op did.
    pub producer: Option<Producer>,
    /// The access site of its last use (0: none this step).
    pub last_site: u64,
    /// Where the previous step's uses of its aligned key sit in that step's index (looked up
    /// wherever the aligned key is set, so queries about it skip the index's map).
    pub prev: UseRange,
}

/// A candidate as the tracker is asked about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// Buffer id.
    pub id: u64,
    /// Its key now.
    pub key: u64,
    /// Kind code.
    pub kind: u8,
    /// Size in bytes.
    pub bytes: u64,
}

/// Replays ops and step boundaries; encodes candidates.
#[derive(Debug, Clone)]
pub struct Tracker {
    cfg: FeatureConfig,
    /// The last `window` ops as the encoder reads them, with where each stood in its step
    /// (`None`: none yet); entry `next` is the oldest. Encoded only when a prediction reads
    /// the window, which is far rarer than an op.
    ring: Vec<Option<(OpView, StepPosition)>>,
    next: usize,
    clock: u64,
    index: u32,
    expected: u32,
    step: u64,
    /// Ops per phase in this step so far, and in the previous step.
    phase_ops: [u32; PHASES],
    prev_phase_ops: [u32; PHASES],
    /// Index of each phase's first op in this step and in the previous step.
    phase_start: [u32; PHASES],
    prev_phase_start: [u32; PHASES],
    /// Phase of the op just observed.
    phase: u8,
    /// The last op anchored to the previous step: `(its index there, its index here)`.
    anchor: Option<(u32, u32)>,
    /// Buffers made so far this step, per phase (for aligned keys).
    made: [u32; PHASES],
    /// Aligned key → buffer id, for buffers made this step.
    by_aligned: KeyMap<u64>,
    /// Aligned keys of the op being observed.
    op_keys: Vec<u64>,
    bufs: BufferTable,
    /// Tracker clock of the current step's first op.
    step_start: u64,
    current: StepProfile,
    previous: StepProfile,
    matching: bool,
    /// Identities of the newest [`CONTEXT`] ops, newest last.
    context: [u64; CONTEXT],
    /// Access site → ops to the next access that followed it last time ([`NEVER`]: none in
    /// its step).
    sites: KeyMap<u32>,
    /// The announced plan being followed.
    plan: PlanCursor,
}

impl Tracker {
    /// An empty tracker for features `cfg`.
    pub fn new(cfg: FeatureConfig) -> Self {
        Tracker {
            cfg,
            ring: vec![None; cfg.window],
            next: 0,
            clock: 0,
            index: 0,
            expected: 0,
            step: 0,
            phase_ops: [0; PHASES],
            prev_phase_ops: [0; PHASES],
            phase_start: [0; PHASES],
            prev_phase_start: [0; PHASES],
            phase: 0,
            anchor: None,
            made: [0; PHASES],
            by_aligned: KeyMap::default(),
            op_keys: Vec::new(),
            bufs: BufferTable::default(),
            step_start: 0,
            current: StepProfile::default(),
            previous: StepProfile::default(),
            matching: false,
            context: [0; CONTEXT],
            sites: KeyMap::default(),
            plan: PlanCursor::default(),
        }
    }

    /// The features this tracker encodes.
    pub fn config(&self) -> FeatureConfig {
        self.cfg
    }

    /// Ops observed so far.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// Ops observed in the current step.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The current step.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Whether the ops of this step so far repeat the previous step's.
    pub fn matching(&self) -> bool {
        self.matching
    }

    /// The previous step's access order (empty before the first boundary).
    pub fn previous(&self) -> &StepProfile {
        &self.previous
    }

    /// What is known of buffer `id`.
    pub fn state(&self, id: u64) -> Option<BufferState> {
        let (h, c) = self.bufs.get(id)?;
        Some(BufferState {
            kind: h.kind,
            bytes: c.bytes,
            key: c.key,
            aligned: h.aligned,
            last_phase: h.last_phase,
            last_use: h.last_use,
            last_use_index: if h.last_step == self.step {
                h.last_use_index(self.step_start)
            } else {
                0
            },
            last_step: h.last_step,
            first_step: c.first_step,
            first_index: c.first_index,
            last_forward: (h.last_forward != NO_FORWARD).then_some(h.last_forward),
            phase_uses: h.phase_uses,
            uses_step: h.uses_step,
            uses_past: c.uses_past,
            producer: c.producer,
            last_site: h.last_site,
            prev: c.prev,
        })
    }

    /// Buffer `id`'s memory manager key now.
    pub fn key_of(&self, id: u64) -> Option<u64> {
        self.bufs.get(id).map(|(_, c)| c.key)
    }

    /// Tracker clock of the op that used buffer `id` last.
    pub fn last_use_of(&self, id: u64) -> Option<u64> {
        self.bufs.hot(id).map(|h| h.last_use)
    }

    /// Asks the CPU to fetch the state of buffers `ids` into its caches, all at once, ahead
    /// of queries about them ([`Tracker::candidate`], [`Tracker::hint_for`], ...).
    pub fn prefetch(&self, ids: impl Iterator<Item = u64> + Clone) {
        for id in ids.clone() {
            self.bufs.prefetch_entry(id);
        }
        for id in ids {
            self.bufs.prefetch(id, true);
        }
    }

    /// Asks the CPU to fetch, all at once, what observing a batch of ops will read of the
    /// buffers they touch (before replaying the batch): `ops` gives each op's phase code and
    /// its buffers (inputs, then outputs), in order. For a buffer the tracker has not seen,
    /// that is where the previous step's index holds its aligned key.
    pub fn prefetch_ops<'a>(&self, ops: impl Iterator<Item = (u8, &'a [Access])> + Clone) {
        for (_, accesses) in ops.clone() {
            for a in accesses {
                self.bufs.prefetch_entry(a.0);
            }
        }
        // New buffers take the next ranks of their phase, as `observe_view` gives them.
        let (mut made, mut new, mut n_new) = (self.made, [0u64; 16], 0);
        for (phase, accesses) in ops {
            // The op's anchor is looked for from its first buffer living across steps, whose
            // use range is in the cold line.
            let mut anchor = true;
            for a in accesses {
                let lasting = a.3 < PERSISTENT;
                if self.bufs.prefetch(a.0, lasting && anchor) {
                    anchor &= !lasting;
                    continue;
                }
                if new[..n_new].contains(&a.0) {
                    continue;
                }
                if n_new < new.len() {
                    new[n_new] = a.0;
                    n_new += 1;
                }
                let aligned = if a.3 < PERSISTENT {
                    a.3
                } else {
                    let p = (phase as usize).min(PHASES - 1);
                    made[p] += 1;
                    aligned_key(phase, made[p])
                };
                self.previous.prefetch_range_of(aligned);
            }
        }
    }

    /// Buffers tracked now.
    pub fn tracked(&self) -> usize {
        self.bufs.len()
    }

    /// The previous step's op corresponding to the op just observed, as `after` for
    /// [`StepProfile`] queries: counted from the last op that used a buffer living across
    /// steps (its `r`-th use in this phase ↔ its `r`-th use in that phase of the previous
    /// step), else the same progress through the same phase (so a longer or shorter forward
    /// pass does not shift the backward and optimizer passes), else the same index.
    fn after(&self) -> Option<u32> {
        let last = self.index.checked_sub(1)?;
        if let Some((prev, here)) = self.anchor {
            let at = prev + (last - here);
            if (at as usize) < self.previous.len() {
                return Some(at);
            }
        }
        let p = (self.phase as usize).min(PHASES - 1);
        let (k, n) = (self.phase_ops[p], self.prev_phase_ops[p]);
        if k == 0 || n == 0 {
            return Some(last);
        }
        Some(self.prev_phase_start[p] + k.min(n) - 1)
    }

    fn position(&self, index: u32) -> f32 {
        match self.expected {
            0 => 0.0,
            n => index as f32 / n as f32,
        }
    }

    /// Where the next op of phase `phase` stands.
    fn step_position(&self, phase: u8) -> StepPosition {
        let p = (phase as usize).min(PHASES - 1);
        StepPosition {
            position: self.position(self.index),
            progress: match self.prev_phase_ops[p] {
                0 => 0.0,
                n => self.phase_ops[p] as f32 / n as f32,
            },
        }
    }

    /// Records that op `op` ran.
    pub fn observe(&mut self, op: &OpRecord) {
        self.observe_view(&OpView::of_record(op), &op.inputs, &op.outputs);
    }

    /// Records that the op seen as `view` ran, reading `inputs` and writing `outputs`.
    pub fn observe_view(&mut self, view: &OpView, inputs: &[Access], outputs: &[Access]) {
        let view = *view;
        if self.cfg.window > 0 {
            self.ring[self.next] = Some((view, self.step_position(view.phase)));
            self.next = (self.next + 1) % self.cfg.window;
        }
        let producer = Producer {
            idioms: view.idioms,
            slot: view.slot,
            phase: view.phase,
        };
        let (clock, index, step) = (self.clock, self.index, self.step);
        let phase = (view.phase as usize).min(PHASES - 1);
        let context = self.push_context(&view);
        if self.sites.len() > MAX_SITES {
            self.sites.clear();
        }
        let mut anchor = None;
        self.op_keys.clear();
        for (j, a) in inputs.iter().chain(outputs).enumerate() {
            let written = j >= inputs.len();
            let slot = match self.bufs.find(a.0) {
                Some(slot) => slot,
                None => {
                    let aligned = if a.3 < PERSISTENT {
                        a.3
                    } else {
                        self.made[phase] += 1;
                        let k = aligned_key(view.phase, self.made[phase]);
                        self.by_aligned.insert(k, a.0);
                        k
                    };
                    let hot = Hot {
                        id: a.0,
                        aligned,
                        last_use: u64::MAX,
                        last_step: step,
                        last_site: 0,
                        uses_step: 0,
                        last_forward: NO_FORWARD,
                        phase_uses: [0; PHASES],
                        last_phase: view.phase,
                        kind: a.2,
                    };
                    let cold = Cold {
                        key: a.3,
                        bytes: a.1,
                        first_step: step,
                        prev: self.previous.range_of(aligned),
                        first_index: index,
                        uses_past: 0,
                        producer: written.then_some(producer),
                    };
                    self.bufs.insert(hot, cold)
                }
            };
            let step_start = self.step_start;
            let (b, cold) = self.bufs.at_mut(slot);
            let fresh_use = b.last_use != clock;
            if fresh_use {
                // What followed the access site of its previous use this step.
                if b.used_in(step) && b.last_site != 0 {
                    let gap = index
                        .saturating_sub(b.last_use_index(step_start))
                        .min(NEVER - 1);
                    self.sites.insert(b.last_site, gap);
                }
                b.last_site = mix(context, (j as u64) << 1 | written as u64) | 1;
                b.uses_step += 1;
                b.phase_uses[phase] += 1;
            }
            // A buffer's kind may change (an activation that becomes a parameter); its size
            // never does, and its key only at step boundaries, where the tracker renames it
            // as the memory manager does.
            b.kind = a.2;
            b.last_use = clock;
            b.last_step = step;
            b.last_phase = view.phase;
            self.op_keys.push(b.aligned);
            if view.phase == 0 {
                b.last_forward = index;
            }
            // Anchor this op on a buffer's same use (its `r`-th in this phase) in the
            // previous step: one that lives across steps, whose key is its id in both.
            if fresh_use && anchor.is_none() && b.aligned < PERSISTENT {
                anchor =
                    self.previous
                        .nth_use_in_phase_in(cold.prev, view.phase, b.phase_uses[phase]);
            }
        }
        self.anchor = anchor.map(|prev| (prev, index));
        self.plan.observe(inputs, index);
        self.current
            .push(view.slot, view.phase, self.op_keys.iter().copied());
        self.matching = self.matching && self.previous.slot(index as usize) == Some(view.slot);
        self.clock += 1;
        self.index += 1;
        self.phase = view.phase;
        let p = (view.phase as usize).min(PHASES - 1);
        if self.phase_ops[p] == 0 {
            self.phase_start[p] = index;
        }
        self.phase_ops[p] += 1;
    }

    /// Step `step` begins: this step's order becomes the previous one, keys are renamed to
    /// ids, use counts roll over, long-unused buffers are forgotten.
    pub fn step_boundary(&mut self, step: u64) {
        let swapped = self.index > 0;
        if swapped {
            self.plan.step_boundary(self.index);
            self.expected = self.index;
            self.prev_phase_ops = self.phase_ops;
            self.prev_phase_start = self.phase_start;
            self.current.seal();
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        } else {
            // A step without ops leaves the previous step (its index and its plans) standing.
            self.plan.abandon();
        }
        let (previous, sites) = (&self.previous, &mut self.sites);
        self.bufs.retain(|b, c| {
            let id = b.id;
            if b.uses_step == 0 && swapped {
                // Unused in the step that ended: every per-step field is already reset and its
                // key is its id, which that step's index cannot hold (ids made in a step are
                // indexed under aligned keys, which have the top bit set).
                c.prev = UseRange::default();
            } else if b.uses_step == 0 {
                // An empty step: the previous step's index stands.
                c.prev = previous.range_of(id);
            } else {
                if b.last_site != 0 {
                    sites.insert(b.last_site, NEVER);
                }
                b.last_site = 0;
                c.uses_past = c.uses_past.saturating_add(b.uses_step);
                b.uses_step = 0;
                c.key = id;
                b.aligned = id;
                c.prev = previous.range_of(id);
                b.last_forward = NO_FORWARD;
                b.phase_uses = [0; PHASES];
            }
            b.last_step.saturating_add(KEEP_STEPS) >= step
        });
        self.step = step;
        self.step_start = self.clock;
        self.index = 0;
        self.phase_ops = [0; PHASES];
        self.phase_start = [0; PHASES];
        self.phase = 0;
        self.anchor = None;
        self.made = [0; PHASES];
        self.by_aligned.clear();
        self.matching = !self.previous.is_empty();
        self.context = [0; CONTEXT];
    }

    /// The coming ops will read `groups` (buffer ids, one group per unit of work, in order):
    /// the backward pass's tape or the optimizer's parameters (see [`dynn_mm::Policy::plan`]).
    pub fn plan(&mut self, source: &str, groups: &[Vec<u64>]) {
        let bufs = &self.bufs;
        self.plan.announce(source, groups, self.index, |id| {
            bufs.get(id).map(|(_, c)| c.key)
        });
    }

    /// Buffer `id` will be read by the plan's group `group` (see
    /// [`dynn_mm::Policy::plan_read`]).
    pub fn plan_read(&mut self, group: usize, id: u64) {
        self.plan.add(group, id);
    }

    /// What was announced before op `op` ran: its plan, then the plan's new reads.
    pub fn announce(&mut self, op: &OpRecord) {
        if !op.plan.is_empty() {
            self.plan(&op.plan_source, &op.plan);
        }
        for &(group, id) in &op.plan_reads {
            self.plan_read(group as usize, id);
        }
    }

    /// The announced plan being followed.
    pub fn plan_cursor(&self) -> &PlanCursor {
        &self.plan
    }

    /// Where the announced plan puts candidate `q`'s next read (`None`: no plan).
    pub fn plan_distance(&self, q: &Query) -> Option<PlanDistance> {
        let b = self.bufs.get(q.id);
        let made = b
            .filter(|(_, c)| c.first_step == self.step)
            .map(|(_, c)| c.first_index);
        let last_use = b
            .filter(|(h, _)| h.used_in(self.step))
            .map(|(h, _)| h.last_use_index(self.step_start));
        let d = self.plan.distance(q.id, made, last_use, self.index)?;
        if !matches!(d, PlanDistance::Beyond(_) | PlanDistance::Unplanned) {
            return Some(d);
        }
        // Past the plan: where the previous step used it after its same plan ended — unless
        // that step used it again before the end, from the op corresponding to this one.
        let Some(end) = self.plan.previous_end() else {
            return Some(d);
        };
        let range = b.map_or_else(|| self.previous.range_of(q.key), |(_, c)| c.prev);
        let Some(gap) = self.previous.next_use_in(end.checked_sub(1), range) else {
            return Some(d);
        };
        let rest = match d {
            PlanDistance::Beyond(rest) => rest,
            _ => {
                let here = self.after();
                let next_there = self.previous.next_use_in(here, range);
                let from = here.map_or(0, |h| h as u64 + 1);
                if next_there.is_some_and(|g| from + g - 1 < end as u64) {
                    return Some(d);
                }
                self.plan.rest(self.index)?
            }
        };
        Some(PlanDistance::After(rest + gap - 1))
    }

    /// Appends the memory manager keys of the buffers the announced plan reads within about
    /// `horizon` ops, soonest first. Where the plan ends within `horizon`, what follows is what
    /// followed the same plan in the previous step (see [`PlanDistance::After`]).
    pub fn upcoming_by_plan(&self, horizon: usize, out: &mut Vec<u64>) {
        self.plan.upcoming(horizon, self.index, out);
        let (Some(rest), Some(end)) = (self.plan.rest(self.index), self.plan.previous_end()) else {
            return;
        };
        // The previous step's op `end` stands `rest` ops ahead: look `horizon` ops ahead.
        if let Some(beyond) = (horizon + 1).checked_sub(rest as usize).filter(|&h| h > 0) {
            self.upcoming_in_previous(end.checked_sub(1), beyond, out);
        }
    }

    /// Shifts op `view` into the context and returns the context's hash. An op's identity is
    /// what the encoding reads of it: its idiom counts (or its name's slot), phase and arity.
    fn push_context(&mut self, view: &OpView) -> u64 {
        let what = match self.cfg.encoding {
            Encoding::Idioms => view.idioms.iter().fold(0u64, |h, &c| h << 8 | c as u64),
            Encoding::OneHot => 1 << 63 | view.slot as u64,
        };
        let identity = mix(
            mix(what, view.phase as u64),
            (view.inputs as u64) << 8 | view.outputs as u64,
        );
        self.context.rotate_left(1);
        self.context[CONTEXT - 1] = identity;
        self.context.iter().fold(0, |h, &x| mix(h, x))
    }

    /// Ops run since `b`'s last use this step (0 right after it).
    fn age(&self, b: &Hot) -> u64 {
        self.index
            .saturating_sub(1 + b.last_use_index(self.step_start)) as u64
    }
}
