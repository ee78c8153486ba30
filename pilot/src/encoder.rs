//! The encoder: an op → a fixed-size feature vector, a candidate buffer → a fixed-size
//! feature vector. Two encodings of an op's identity: its six idiom counts (the point of the
//! pilot: small, and shared by ops and networks never seen) or a one-hot over the op table
//! (the ablation). Everything is written into caller-owned slices: nothing allocates.

use crate::bucket::{BUCKETS, bucket};
use crate::plan::PlanDistance;
use dynn_core::OpEvent;
use dynn_mm::OpRecord;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::OnceLock;

/// A map keyed by op names, hashed like buffer keys.
use dynn_mm::KeyMap;

/// Idiom counts per op.
pub const IDIOMS: usize = 6;
/// Phases: forward, backward, optimizer.
pub const PHASES: usize = 3;
/// Buffer kinds: parameter, gradient, optimizer state, activation, temporary.
pub const KINDS: usize = 5;
/// One-hot slots of the op-name encoding: every op of the table, the last slot for unknown
/// names.
pub const OP_SLOTS: usize = 160;

/// Op features both encodings share: log sizes of inputs and outputs, arities, phase
/// one-hot, position in the step, progress through its phase.
const OP_COMMON: usize = OP_PHASE + PHASES + 2;
/// Where the phase one-hot starts in an op's features.
const OP_PHASE: usize = 4;
/// Op features with the idiom encoding.
pub const OP_DIM_IDIOMS: usize = OP_COMMON + IDIOMS;
/// Op features with the one-hot encoding.
pub const OP_DIM_ONEHOT: usize = OP_COMMON + OP_SLOTS;
/// Candidate features both encodings share: kind one-hot, log size, age, uses this step,
/// uses in past steps, created this step, touched this step, where in the step it was last
/// used, whether the step so far repeats the previous one, the previous step's next-use
/// bucket, the tape-mirror estimate's bucket and the access site's last gap (each plus
/// "unknown"), and the producer's phase.
/// Then where the announced plan puts it (its bucket, "beyond the plan", "made since the
/// plan", "no plan", and whether the plan is the step's last).
const CAND_COMMON: usize = KINDS + 8 + 3 * (BUCKETS + 1) + PHASES + PLAN;

/// Plan features: a bucket, "beyond the plan", "made since the plan", "no plan", "the step's
/// last plan".
const PLAN: usize = BUCKETS + 4;
/// Candidate features with the idiom encoding (the producer op's idioms).
pub const CAND_DIM_IDIOMS: usize = CAND_COMMON + IDIOMS;
/// Candidate features with the one-hot encoding (the producer op's one-hot name).
pub const CAND_DIM_ONEHOT: usize = CAND_COMMON + OP_SLOTS;

/// Idiom-encoded op features, as a fixed-size array.
pub type OpFeatures = [f32; OP_DIM_IDIOMS];
/// Idiom-encoded candidate features, as a fixed-size array.
pub type CandidateFeatures = [f32; CAND_DIM_IDIOMS];

/// How an op's identity is described.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// Six memory-access idiom counts.
    #[default]
    Idioms,
    /// One-hot over the op table's names.
    OneHot,
}

impl Encoding {
    /// Width of one op's features.
    pub fn op_dim(self) -> usize {
        match self {
            Encoding::Idioms => OP_DIM_IDIOMS,
            Encoding::OneHot => OP_DIM_ONEHOT,
        }
    }
    /// Width of one candidate's features.
    pub fn cand_dim(self) -> usize {
        match self {
            Encoding::Idioms => CAND_DIM_IDIOMS,
            Encoding::OneHot => CAND_DIM_ONEHOT,
        }
    }
    /// The name used in saved pilots and reports (`idioms`, `onehot`).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Idioms => "idioms",
            Encoding::OneHot => "onehot",
        }
    }
    /// The encoding named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "idioms" => Some(Encoding::Idioms),
            "onehot" => Some(Encoding::OneHot),
            _ => None,
        }
    }
}

/// What the model reads: the encoding, how many recent ops, and whether the previous step's
/// next use (a replayed profile) is a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureConfig {
    /// How ops are described.
    pub encoding: Encoding,
    /// Recent ops in the window (the newest last).
    pub window: usize,
    /// Give the previous step's next-use bucket of the candidate's key as a feature.
    pub hint: bool,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            encoding: Encoding::Idioms,
            window: 6,
            hint: true,
        }
    }
}

impl FeatureConfig {
    /// Width of the model's input: `window` ops, then the candidate.
    pub fn input_dim(&self) -> usize {
        self.window_dim() + self.encoding.cand_dim()
    }

    /// Width of the input's window part: the recent ops' features, before the candidate's.
    pub fn window_dim(&self) -> usize {
        self.window * self.encoding.op_dim()
    }

    /// The bucket the announced plan gives the candidate of model input `row`, when the plan
    /// reads it or the previous step places its use past the plan (`PlanDistance::Within`,
    /// `After`; `None`: beyond the plan or made since it with nothing to tell, no plan, or
    /// the step so far repeats the previous one op for op, whose exact order the network reads
    /// from the hint). The pilot answers such a candidate from the plan, not the network: the
    /// backward pass is known from the tape.
    pub fn planned_bucket(&self, row: &[f32]) -> Option<u8> {
        self.planned_bucket_of_candidate(row.get(self.window_dim()..)?)
    }

    /// The phase code of the op just run (the window's newest) in model input `row` (`None`
    /// without a window, or before the first op).
    pub fn phase_of(&self, row: &[f32]) -> Option<u8> {
        let newest = self.window.checked_sub(1)? * self.encoding.op_dim();
        let phases = row.get(newest + OP_PHASE..newest + OP_PHASE + PHASES)?;
        phases.iter().position(|&f| f == 1.0).map(|p| p as u8)
    }

    /// [`FeatureConfig::planned_bucket`] of the candidate part `cand` of a model input.
    pub fn planned_bucket_of_candidate(&self, cand: &[f32]) -> Option<u8> {
        if cand.get(KINDS + 7).is_none_or(|&matching| matching != 0.0) {
            return None;
        }
        let at = KINDS + 8 + 3 * (BUCKETS + 1);
        let plan = cand.get(at..at + PLAN)?;
        if plan[BUCKETS..BUCKETS + 3].iter().any(|&f| f != 0.0) {
            return None;
        }
        plan[..BUCKETS]
            .iter()
            .position(|&f| f == 1.0)
            .map(|b| b as u8)
    }
}

/// The slot of op `name` in the one-hot encoding (the op table is sorted by name; unknown
/// names share the last slot).
pub fn op_slot(name: &str) -> u16 {
    static SLOTS: OnceLock<KeyMap<&'static str, u16>> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        let mut v: Vec<&'static str> = dynn_ops::op_table().iter().map(|o| o.name).collect();
        v.sort_unstable();
        v.truncate(OP_SLOTS - 1);
        v.into_iter()
            .enumerate()
            .map(|(i, n)| (n, i as u16))
            .collect()
    });
    slots.get(name).copied().unwrap_or(OP_SLOTS as u16 - 1)
}

/// [`op_slot`] of a name with a static address, as the executor's events and records carry:
/// looked up in a small per-thread cache keyed by that address, so the hot path neither
/// hashes nor compares the name (a static address holds the same text for the whole run).
pub fn static_op_slot(name: &'static str) -> u16 {
    thread_local! {
        static CACHE: RefCell<[(usize, usize, u16); 64]> = const { RefCell::new([(0, 0, 0); 64]) };
    }
    let (ptr, len) = (name.as_ptr() as usize, name.len());
    let i = ((ptr >> 3) ^ (ptr >> 9)) & 63;
    CACHE.with_borrow_mut(|cache| {
        let e = &mut cache[i];
        if (e.0, e.1) != (ptr, len) {
            *e = (ptr, len, op_slot(name));
        }
        e.2
    })
}

/// One op as the encoder reads it, from an [`OpRecord`] or a live [`OpEvent`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpView {
    /// Slot in the one-hot encoding.
    pub slot: u16,
    /// The six idiom counts.
    pub idioms: [u8; IDIOMS],
    /// 0 forward, 1 backward, 2 optimizer.
    pub phase: u8,
    /// Bytes of the buffers read.
    pub in_bytes: u64,
    /// Bytes of the buffers written.
    pub out_bytes: u64,
    /// Buffers read.
    pub inputs: usize,
    /// Buffers written.
    pub outputs: usize,
}

/// Where an op stands in its step, relative to the previous step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepPosition {
    /// Its index in the step over the previous step's length (0 when unknown).
    pub position: f32,
    /// Ops of its phase before it over the previous step's ops of that phase (0 when
    /// unknown).
    pub progress: f32,
}

impl OpView {
    /// The view of a recorded op.
    pub fn of_record(r: &OpRecord) -> Self {
        OpView {
            slot: match &r.op {
                Cow::Borrowed(name) => static_op_slot(name),
                Cow::Owned(name) => op_slot(name),
            },
            idioms: r.idioms,
            phase: r.phase,
            in_bytes: r.inputs.iter().map(|a| a.1).sum(),
            out_bytes: r.outputs.iter().map(|a| a.1).sum(),
            inputs: r.inputs.len(),
            outputs: r.outputs.len(),
        }
    }

    /// The view of a live op event.
    pub fn of_event(e: &OpEvent<'_>) -> Self {
        OpView {
            slot: static_op_slot(e.op),
            idioms: e.idioms.0,
            phase: dynn_mm::trace::phase_code(e.phase),
            in_bytes: e.input_info().map(|i| i.1 as u64).sum(),
            out_bytes: e.output_info().map(|i| i.1 as u64).sum(),
            inputs: e.inputs.len(),
            outputs: e.outputs.len(),
        }
    }
}

/// `log2(1 + x) / scale`.
fn lg(x: u64, scale: f32) -> f32 {
    ((x as f32) + 1.0).log2() / scale
}

/// Writes the one-hot (or idiom) description of an op identity into `out`.
fn identity(enc: Encoding, idioms: [u8; IDIOMS], slot: u16, out: &mut [f32]) {
    match enc {
        Encoding::Idioms => {
            for (o, &c) in out.iter_mut().zip(&idioms) {
                *o = c as f32 / 2.0;
            }
        }
        Encoding::OneHot => {
            out.fill(0.0);
            if let Some(o) = out.get_mut(slot as usize) {
                *o = 1.0;
            }
        }
    }
}

/// Writes op `op`'s features into `out` (`enc.op_dim()` long).
pub fn encode_op(enc: Encoding, op: &OpView, at: StepPosition, out: &mut [f32]) {
    debug_assert_eq!(out.len(), enc.op_dim());
    let (common, id) = out.split_at_mut(OP_COMMON);
    common[0] = lg(op.in_bytes, 32.0);
    common[1] = lg(op.out_bytes, 32.0);
    common[2] = (op.inputs as f32 / 4.0).min(2.0);
    common[3] = (op.outputs as f32 / 4.0).min(2.0);
    for p in 0..PHASES {
        common[OP_PHASE + p] = (op.phase as usize == p) as u8 as f32;
    }
    common[OP_PHASE + PHASES] = at.position.clamp(0.0, 2.0);
    common[OP_PHASE + PHASES + 1] = at.progress.clamp(0.0, 2.0);
    identity(enc, op.idioms, op.slot, id);
}

/// Idiom-encoded features of `op` as an array.
pub fn op_features(op: &OpView, at: StepPosition) -> OpFeatures {
    let mut out = [0.0; OP_DIM_IDIOMS];
    encode_op(Encoding::Idioms, op, at, &mut out);
    out
}

/// The op that wrote a buffer first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Producer {
    /// Its idiom counts.
    pub idioms: [u8; IDIOMS],
    /// Its one-hot slot.
    pub slot: u16,
    /// Its phase code.
    pub phase: u8,
}

/// One candidate buffer as the encoder reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateView {
    /// Kind code (0 parameter … 4 temporary).
    pub kind: u8,
    /// Size in bytes.
    pub bytes: u64,
    /// Ops since its last use (0: used by the op just run).
    pub age: u64,
    /// Uses so far this step.
    pub uses_step: u32,
    /// Uses in earlier steps.
    pub uses_past: u32,
    /// Made in this step.
    pub created_this_step: bool,
    /// Index of its last use within the current step over the expected step length (0 when
    /// not used yet this step).
    pub last_use_position: f32,
    /// Whether the ops of this step so far repeat the previous step's.
    pub matching: bool,
    /// Ops until its key's next use in the previous step, counted from the same position:
    /// `None` when there is no previous step to ask (or hints are off), `Some(None)` when the
    /// previous step did not use the key again.
    pub hint: Option<Option<u64>>,
    /// Ops until its use in the backward pass, estimated by mirroring its last forward use
    /// (the tape runs the forward in reverse): `None` when it has no forward use this step or
    /// the pass is over.
    pub mirror: Option<u64>,
    /// Ops until its next use as the same *access site* showed it last time — the gap that
    /// followed the latest access made by an op in the same context (the same recent ops,
    /// by idioms or by name, and the same operand slot), in this step or an earlier one,
    /// less the ops since its last use: `None` when no such access is on record,
    /// `Some(None)` when that access was not followed by another in its step.
    pub site: Option<Option<u64>>,
    /// Where the announced plan (the backward pass's tape, the optimizer's parameters) puts
    /// its next read (`None`: no plan is being followed).
    pub plan: Option<PlanDistance>,
    /// Whether that plan is the step's last (as in the previous step).
    pub plan_last: bool,
    /// The op that made it (`None`: made outside ops, e.g. a parameter or a batch).
    pub producer: Option<Producer>,
}

/// Writes candidate `c`'s features into `out` (`enc.cand_dim()` long).
pub fn encode_candidate(enc: Encoding, c: &CandidateView, out: &mut [f32]) {
    debug_assert_eq!(out.len(), enc.cand_dim());
    let (common, id) = out.split_at_mut(CAND_COMMON);
    common.fill(0.0);
    if let Some(k) = common
        .get_mut(c.kind as usize)
        .filter(|_| (c.kind as usize) < KINDS)
    {
        *k = 1.0;
    }
    let f = &mut common[KINDS..];
    f[0] = lg(c.bytes, 32.0);
    f[1] = lg(c.age, 16.0);
    f[2] = lg(c.uses_step as u64, 8.0);
    f[3] = lg(c.uses_past as u64, 8.0);
    f[4] = c.created_this_step as u8 as f32;
    f[5] = (c.uses_step > 0) as u8 as f32;
    f[6] = c.last_use_position.clamp(0.0, 2.0);
    f[7] = c.matching as u8 as f32;
    let hint = &mut f[8..8 + BUCKETS + 1];
    match c.hint {
        Some(d) => hint[bucket(d) as usize] = 1.0,
        None => hint[BUCKETS] = 1.0,
    }
    let mirror = &mut f[8 + BUCKETS + 1..8 + 2 * (BUCKETS + 1)];
    match c.mirror {
        Some(d) => mirror[bucket(Some(d)) as usize] = 1.0,
        None => mirror[BUCKETS] = 1.0,
    }
    let site = &mut f[8 + 2 * (BUCKETS + 1)..8 + 3 * (BUCKETS + 1)];
    match c.site {
        Some(d) => site[bucket(d) as usize] = 1.0,
        None => site[BUCKETS] = 1.0,
    }
    let plan = &mut f[8 + 3 * (BUCKETS + 1)..8 + 3 * (BUCKETS + 1) + PLAN];
    match c.plan {
        Some(PlanDistance::Within(d) | PlanDistance::After(d)) => {
            plan[bucket(Some(d)) as usize] = 1.0
        }
        Some(PlanDistance::Beyond(d)) => {
            plan[bucket(Some(d)) as usize] = 1.0;
            plan[BUCKETS] = 1.0;
        }
        Some(PlanDistance::Unplanned) => plan[BUCKETS + 1] = 1.0,
        None => plan[BUCKETS + 2] = 1.0,
    }
    plan[BUCKETS + 3] = c.plan_last as u8 as f32;
    let phase = &mut f[8 + 3 * (BUCKETS + 1) + PLAN..];
    match c.producer {
        Some(p) => {
            if let Some(x) = phase.get_mut(p.phase as usize) {
                *x = 1.0;
            }
            identity(enc, p.idioms, p.slot, id);
        }
        None => id.fill(0.0),
    }
}

/// Idiom-encoded features of candidate `c` as an array.
pub fn candidate_features(c: &CandidateView) -> CandidateFeatures {
    let mut out = [0.0; CAND_DIM_IDIOMS];
    encode_candidate(Encoding::Idioms, c, &mut out);
    out
}
