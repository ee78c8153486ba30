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

/// The network and its training: the pilot crate's defaults (64 wide, two hidden layers,
/// 8 epochs), about a second per workload on two cores.
pub fn model_config() -> ModelConfig {
    ModelConfig::default()
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

/// Trains a pilot on every recorded step of `rec` but the replayed one (the last), scoring it
/// on the replayed step's rows (never trained on).
pub fn train_own(rec: &Recorded) -> Result<Trained> {
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
    let (snapshot, report) = train(&tr, &va, labels.features, &model_config())?;
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

/// The held-out evaluation: idiom features first, then one-hot op names.
pub struct HoldoutRun {
    /// Idioms, one-hot.
    pub runs: Vec<Holdout>,
    /// Seconds the labelling and both trainings took.
    pub seconds: f64,
}

/// Trains on the DyNN traces in `traces` other than `held`, scores on `held`'s, for both
/// encodings (`pilot::eval::holdout`; a third of each trained workload's steps validate).
pub fn holdout(traces: &[(&'static str, &Recorded)], held: &str) -> Result<HoldoutRun> {
    let start = std::time::Instant::now();
    let workloads: Vec<eval::Workload> = traces
        .iter()
        .map(|&(name, rec)| eval::Workload {
            name,
            trace: rec.trace.clone(),
        })
        .collect();
    let runs = eval::ablation(FeatureConfig::default())
        .into_iter()
        .map(|f| eval::holdout(&workloads, held, &label_config(f), &model_config(), 0.34))
        .collect::<Result<Vec<_>>>()?;
    Ok(HoldoutRun {
        runs,
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl HoldoutRun {
    /// The table lines.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for h in &self.runs {
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
        out.push(
            "  overhead_frac: not measured here (a simulated step has no host time to compare \
             with); measured on real training by `cargo run --release -p dynn-pilot --example overhead`"
                .to_string(),
        );
        out
    }

    /// The JSON object: accuracies with idiom features (`_onehot`: one-hot op names).
    pub fn json(&self) -> Value {
        let get = |i: usize| self.runs.get(i);
        json!({
            "holdout": get(0).map(|h| h.holdout),
            "accuracy_trained": get(0).map(|h| h.trained.accuracy_valid),
            "accuracy_holdout": get(0).map(|h| h.accuracy_holdout),
            "accuracy_trained_onehot": get(1).map(|h| h.trained.accuracy_valid),
            "accuracy_holdout_onehot": get(1).map(|h| h.accuracy_holdout),
            "majority_holdout": get(0).map(|h| h.majority_holdout),
            "predict_us_p50": get(0).map(|h| h.predict_us_p50),
            // Simulated replays carry no host time: see pilot/examples/overhead.rs.
            "overhead_frac": null,
        })
    }
}
