//! The learned `pilot` policy in the comparison: a snapshot trained offline on a workload's
//! own recorded steps other than the replayed one, and `--holdout`: trained on the other
//! DyNNs only and scored on the held-out one, idiom features against one-hot op names.

use super::record::{Recorded, STEPS};
use dynn::mm::DeviceProfile;
use dynn::pilot::eval::{self, Holdout};
use dynn::pilot::{FeatureConfig, LabelConfig, ModelConfig, PilotConfig, PilotPolicy, Report};
use dynn::pilot::{RecomputeCosts, Snapshot, label_trace, train};
use dynn::prelude::*;
use serde_json::{Value, json};

/// Live buffers sampled per op when labelling (the pilot crate's default).
const PER_OP: usize = 4;
/// Share of ops sampled (all: the rows of a few steps train in about a second).
const OP_FRACTION: f64 = 1.0;

/// The network and its training with `seed`: the pilot crate's defaults otherwise (64 wide,
/// two hidden layers, 8 epochs), about a second per workload on two cores.
pub fn model_config(seed: u64) -> ModelConfig {
    ModelConfig {
        seed,
        ..ModelConfig::default()
    }
}

/// The mean, least and greatest of `xs` (all 0 when empty).
pub fn spread(xs: &[f64]) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, lo, hi)
}

/// How the recorded traces become rows, for `features`.
pub fn label_config(features: FeatureConfig) -> LabelConfig {
    LabelConfig {
        features,
        per_op: PER_OP,
        op_fraction: OP_FRACTION,
        seed: 0,
    }
}

/// A trained pilot for one workload and how it scored.
pub struct Trained {
    /// The frozen network.
    pub snapshot: Snapshot,
    /// `accuracy_train` on steps `0..STEPS-1`, `accuracy_valid` on the replayed step.
    pub report: Report,
}

/// Trains a pilot (network seed `seed`) on every recorded step of `rec` but the replayed one
/// (the last), scoring it on the replayed step's rows (never trained on).
pub fn train_own(rec: &Recorded, seed: u64) -> Result<Trained> {
    let labels = label_config(FeatureConfig::default());
    let ds = label_trace(&rec.trace, &labels);
    // With `STEPS` steps, a quarter of them is the last one: the replayed step validates.
    let (tr, va) = ds.split_by_step(1.0 / STEPS as f64);
    if tr.is_empty() {
        return Err(Error::Msg(format!(
            "pilot: no training rows in the {} recorded ops",
            rec.trace.ops.len()
        )));
    }
    let (snapshot, report) = train(&tr, &va, labels.features, &model_config(seed))?;
    Ok(Trained { snapshot, report })
}

/// The policy replayed as `name`: the trained snapshot, with no online training (the simulator
/// replays one step; nothing would be trained in time to matter). `pilot` is given the
/// profile's costs, so it drops an activation for recomputation where that is cheaper than
/// copying it out; `pilot-offload` offloads every victim (DyNN-Offload's policy alone).
pub fn policy(name: &str, snapshot: &Snapshot, prof: &DeviceProfile) -> PilotPolicy {
    PilotPolicy::with_snapshot(
        snapshot.clone(),
        PilotConfig {
            online: None,
            recompute: (name == "pilot").then(|| RecomputeCosts::of_profile(prof)),
            ..Default::default()
        },
    )
}

/// The policies that run a trained pilot.
pub const PILOTS: [&str; 2] = ["pilot", "pilot-offload"];

/// The held-out evaluation: idiom features first, then one-hot op names, for each network
/// seed.
pub struct HoldoutRun {
    /// Per seed (0, 1, ...): idioms, one-hot.
    pub by_seed: Vec<Vec<Holdout>>,
    /// Seconds the labelling and all trainings took.
    pub seconds: f64,
}

/// Trains on the DyNN traces in `traces` other than `held`, scores on `held`'s, for both
/// encodings (`pilot::eval::holdout`; a third of each trained workload's steps validate),
/// with network seeds `0..seeds`.
pub fn holdout(traces: &[(&'static str, &Recorded)], held: &str, seeds: u64) -> Result<HoldoutRun> {
    let start = std::time::Instant::now();
    let workloads: Vec<eval::Workload> = traces
        .iter()
        .map(|&(name, rec)| eval::Workload {
            name,
            trace: rec.trace.clone(),
        })
        .collect();
    let by_seed = (0..seeds.max(1))
        .map(|seed| {
            eval::ablation(FeatureConfig::default())
                .into_iter()
                .map(|f| {
                    let labels = label_config(f);
                    eval::holdout(&workloads, held, &labels, &model_config(seed), 0.34)
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(HoldoutRun {
        by_seed,
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl HoldoutRun {
    /// Seed 0's runs (idioms, one-hot).
    fn first(&self) -> &[Holdout] {
        self.by_seed.first().map_or(&[], Vec::as_slice)
    }

    /// `f` of encoding `i`'s run, for every seed.
    fn each(&self, i: usize, f: impl Fn(&Holdout) -> f64) -> Vec<f64> {
        self.by_seed
            .iter()
            .filter_map(|r| r.get(i))
            .map(f)
            .collect()
    }

    /// The table lines.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for h in self.first() {
            let t = &h.trained;
            out.push(format!(
                "  {:<7} trained-DyNN valid {:.3} (majority {:.3}, {} rows); {} {:.3} (majority {:.3}, {} rows); trained in {:.1}s; predict p50 {:.2} µs",
                h.encoding.as_str(),
                t.accuracy_valid,
                t.majority_valid,
                t.rows_valid,
                h.holdout,
                h.accuracy_holdout,
                h.majority_holdout,
                h.rows_holdout,
                t.seconds,
                h.predict_us_p50
            ));
        }
        if self.by_seed.len() > 1 {
            for (i, h) in self.first().iter().enumerate() {
                let (t, tl, th) = spread(&self.each(i, |h| h.trained.accuracy_valid));
                let (a, al, ah) = spread(&self.each(i, |h| h.accuracy_holdout));
                out.push(format!(
                    "  {:<7} over seeds 0..{}: trained-DyNN valid {t:.3} ({tl:.3}–{th:.3}); {} {a:.3} ({al:.3}–{ah:.3})",
                    h.encoding.as_str(),
                    self.by_seed.len(),
                    h.holdout,
                ));
            }
        }
        out.push(
            "  overhead_frac: not measured here (a simulated step has no host time to compare \
             with); measured on real training by `cargo run --release -p dynn-pilot --example overhead`"
                .to_string(),
        );
        out
    }

    /// The JSON object: accuracies with idiom features (`_onehot`: one-hot op names), means
    /// over the seeds (each seed's in `_by_seed`).
    pub fn json(&self) -> Value {
        let get = |i: usize| self.first().get(i);
        let mean = |i: usize, f: fn(&Holdout) -> f64| get(i).map(|_| spread(&self.each(i, f)).0);
        let trained = |h: &Holdout| h.trained.accuracy_valid;
        let held = |h: &Holdout| h.accuracy_holdout;
        json!({
            "holdout": get(0).map(|h| h.holdout),
            "seeds": self.by_seed.len(),
            "accuracy_trained": mean(0, trained),
            "accuracy_holdout": mean(0, held),
            "accuracy_trained_onehot": mean(1, trained),
            "accuracy_holdout_onehot": mean(1, held),
            "accuracy_holdout_by_seed": self.each(0, held),
            "accuracy_holdout_onehot_by_seed": self.each(1, held),
            "majority_holdout": get(0).map(|h| h.majority_holdout),
            "predict_us_p50": get(0).map(|h| h.predict_us_p50),
            // Simulated replays carry no host time: see pilot/examples/overhead.rs.
            "overhead_frac": null,
        })
    }
}
