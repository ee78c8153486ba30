//! Exact next-use labels from a recorded trace, and the datasets the pilot trains on.
//!
//! A buffer is *live* after op `g` when it was accessed at or before `g` and is accessed
//! again later in the trace (a buffer never touched again is freed, as the simulator frees
//! it). Its label is the bucket of the ops from `g` to its next access, or "later" when that
//! access falls in another step.

use crate::bucket::{BUCKETS, LATER, bucket};
use crate::encoder::FeatureConfig;
use crate::tracker::Tracker;
use dynn_core::{Error, Result};
use dynn_mm::{OpRecord, Trace};
use dynn_models::Rng;
use std::collections::{BTreeSet, HashMap};

/// How a trace becomes a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelConfig {
    /// The features.
    pub features: FeatureConfig,
    /// Live buffers sampled after each op (all of them when fewer are live).
    pub per_op: usize,
    /// Share of ops sampled at all.
    pub op_fraction: f64,
    /// Seed of the sampling.
    pub seed: u64,
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig {
            features: FeatureConfig::default(),
            per_op: 4,
            op_fraction: 1.0,
            seed: 0,
        }
    }
}

/// Feature rows with their next-use buckets and the step each came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// Features per row.
    pub dim: usize,
    /// Rows, one after the other (`len() × dim`).
    pub x: Vec<f32>,
    /// Bucket of each row.
    pub y: Vec<u8>,
    /// Step of each row.
    pub step: Vec<u64>,
}

impl Dataset {
    /// An empty dataset of `dim` features.
    pub fn new(dim: usize) -> Self {
        Dataset {
            dim,
            ..Default::default()
        }
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The features of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }

    /// Appends a row.
    pub fn push(&mut self, features: &[f32], label: u8, step: u64) {
        debug_assert_eq!(features.len(), self.dim);
        self.x.extend_from_slice(features);
        self.y.push(label);
        self.step.push(step);
    }

    /// Appends every row of `other` (of the same width).
    pub fn extend(&mut self, other: &Dataset) -> Result<()> {
        if other.dim != self.dim && !other.is_empty() {
            return Err(Error::invalid(
                "Dataset::extend",
                format!(
                    "rows of {} features into a dataset of {}",
                    other.dim, self.dim
                ),
            ));
        }
        self.x.extend_from_slice(&other.x);
        self.y.extend_from_slice(&other.y);
        self.step.extend_from_slice(&other.step);
        Ok(())
    }

    /// Rows per bucket.
    pub fn class_counts(&self) -> [u64; BUCKETS] {
        let mut c = [0; BUCKETS];
        for &y in &self.y {
            c[y as usize] += 1;
        }
        c
    }

    /// Accuracy of always answering the most frequent bucket.
    pub fn majority_rate(&self) -> f64 {
        let c = self.class_counts();
        c.iter().copied().max().unwrap_or(0) as f64 / self.len().max(1) as f64
    }

    /// Splits by step: the last `valid_frac` of the distinct steps (at least one, and at
    /// least one left for training when there are two or more) validate, the rest train.
    pub fn split_by_step(&self, valid_frac: f64) -> (Dataset, Dataset) {
        let steps: BTreeSet<u64> = self.step.iter().copied().collect();
        let n = steps.len();
        let mut k = ((n as f64) * valid_frac).ceil() as usize;
        k = k.clamp(1.min(n), n.saturating_sub(1).max(1.min(n)));
        let first_valid = steps.iter().nth(n - k).copied().unwrap_or(u64::MAX);
        let (mut train, mut valid) = (Dataset::new(self.dim), Dataset::new(self.dim));
        for i in 0..self.len() {
            let to = if self.step[i] >= first_valid {
                &mut valid
            } else {
                &mut train
            };
            to.push(self.row(i), self.y[i], self.step[i]);
        }
        (train, valid)
    }
}

/// Every buffer's accesses: op positions, in order, one per op.
fn accesses(ops: &[OpRecord]) -> HashMap<u64, Vec<u32>> {
    let mut at: HashMap<u64, Vec<u32>> = HashMap::new();
    for (g, op) in ops.iter().enumerate() {
        for a in op.inputs.iter().chain(&op.outputs) {
            let v = at.entry(a.0).or_default();
            if v.last() != Some(&(g as u32)) {
                v.push(g as u32);
            }
        }
    }
    at
}

/// The set of live buffers while sweeping the trace: swap-remove vector plus index.
#[derive(Default)]
struct Live {
    ids: Vec<u64>,
    at: HashMap<u64, usize>,
}

impl Live {
    fn insert(&mut self, id: u64) {
        if !self.at.contains_key(&id) {
            self.at.insert(id, self.ids.len());
            self.ids.push(id);
        }
    }
    fn remove(&mut self, id: u64) {
        if let Some(i) = self.at.remove(&id) {
            self.ids.swap_remove(i);
            if let Some(&moved) = self.ids.get(i) {
                self.at.insert(moved, i);
            }
        }
    }
}

/// Sweeps `ops`, calling `visit(g, live ids, next access of an id)` after op `g`.
fn sweep(ops: &[OpRecord], mut visit: impl FnMut(usize, &[u64], &dyn Fn(u64) -> u8)) {
    let at = accesses(ops);
    let mut live = Live::default();
    for (g, op) in ops.iter().enumerate() {
        for a in op.inputs.iter().chain(&op.outputs) {
            let Some(v) = at.get(&a.0) else { continue };
            if v.last() == Some(&(g as u32)) {
                live.remove(a.0);
            } else {
                live.insert(a.0);
            }
        }
        let label = |id: u64| -> u8 {
            let v = &at[&id];
            let pos = v.partition_point(|&u| u as usize <= g);
            match v.get(pos) {
                Some(&u) if ops[u as usize].step == op.step => {
                    bucket(Some((u as usize - g) as u64))
                }
                _ => LATER,
            }
        };
        visit(g, &live.ids, &label);
    }
}

/// Every live buffer after every op, with its exact bucket: `(buffer id, bucket)` sorted by
/// id, one list per op of `ops`.
pub fn exact_labels(ops: &[OpRecord]) -> Vec<Vec<(u64, u8)>> {
    let mut out = Vec::with_capacity(ops.len());
    sweep(ops, |_, live, label| {
        let mut v: Vec<(u64, u8)> = live.iter().map(|&id| (id, label(id))).collect();
        v.sort_unstable();
        out.push(v);
    });
    out
}

/// Replays `trace` through a [`Tracker`] and samples `(op, live buffer)` pairs into a
/// dataset of features and exact buckets. Only ops of completed steps (those with a step
/// record) are sampled when the trace has step records.
pub fn label_trace(trace: &Trace, cfg: &LabelConfig) -> Dataset {
    let complete: BTreeSet<u64> = trace.steps.iter().map(|s| s.step).collect();
    let mut tracker = Tracker::new(cfg.features);
    let mut rng = Rng::new(cfg.seed);
    let mut ds = Dataset::new(cfg.features.input_dim());
    let mut row = vec![0.0f32; ds.dim];
    let mut picked: Vec<usize> = Vec::with_capacity(cfg.per_op.min(64));
    let ops = &trace.ops;
    sweep(ops, |g, live, label| {
        let op = &ops[g];
        if op.step != tracker.step() {
            tracker.step_boundary(op.step);
        }
        tracker.announce(op);
        tracker.observe(op);
        if !complete.is_empty() && !complete.contains(&op.step) {
            return;
        }
        if cfg.op_fraction < 1.0 && !rng.bernoulli(cfg.op_fraction) {
            return;
        }
        picked.clear();
        if live.len() <= cfg.per_op {
            picked.extend(0..live.len());
        } else {
            while picked.len() < cfg.per_op {
                let i = rng.range(0, live.len());
                if !picked.contains(&i) {
                    picked.push(i);
                }
            }
        }
        for &i in &picked {
            let id = live[i];
            if let Some(q) = tracker.query(id) {
                tracker.features(&q, &mut row);
                ds.push(&row, label(id), op.step);
            }
        }
    });
    ds
}
