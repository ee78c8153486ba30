//! The pilot's evaluation on the four DyNNs: record their access traces with the shared
//! training loop, train on some, and measure next-use bucket accuracy on the steps held out
//! and on a network never seen — with idiom features and with one-hot op names.

use crate::encoder::{Encoding, FeatureConfig};
use crate::labels::{Dataset, LabelConfig, label_trace};
use crate::model::{ModelConfig, Report, evaluate, train};
use dynn_core::{DType, Device, Error, Result};
use dynn_mm::Trace;
use dynn_models::data::{TextDataset, generated_corpus};
use dynn_models::models::early_exit::{EarlyExitConfig, EarlyExitTask};
use dynn_models::models::evoformer::{EvoformerConfig, EvoformerTask};
use dynn_models::models::moe::{MoeConfig, MoeTask};
use dynn_models::models::tree_lstm::{TreeLstmConfig, TreeLstmTask};
use dynn_models::train::{Defaults, Outcome, Task, TrainArgs, train as run_training};
use std::sync::Arc;

/// The four DyNNs, by the names [`record`] knows.
pub const WORKLOADS: [&str; 4] = ["early_exit", "moe", "tree_lstm", "evoformer"];

/// One workload's recorded access trace.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Its name.
    pub name: &'static str,
    /// The trace of its steps (steps with a step record, then the evaluation).
    pub trace: Trace,
}

fn outcome<T: Task>(
    args: &TrainArgs,
    batch: usize,
    make: impl Fn() -> Result<T>,
) -> Result<Outcome> {
    let args = TrainArgs {
        batch: Some(batch),
        ..args.clone()
    };
    let defaults = Defaults {
        steps: args.steps.unwrap_or(12),
        batch,
        lr: 3e-3,
    };
    run_training(&args, defaults, make)
}

/// Trains workload `name` at a small size (seconds) with `args` (steps, policy, budget...).
pub fn run(name: &str, args: &TrainArgs) -> Result<Outcome> {
    let text = || TextDataset::new(&generated_corpus(3, 20_000), 256);
    match name {
        "early_exit" => {
            let cfg = EarlyExitConfig {
                dim: 32,
                heads: 2,
                layers: 4,
                seq: 12,
                threshold: 0.02,
                ..Default::default()
            };
            let data = Arc::new(text()?);
            outcome(args, 8, move || {
                EarlyExitTask::with_data(&cfg, data.clone(), 7, DType::F32, Device::Cpu)
            })
        }
        "moe" => {
            let cfg = MoeConfig {
                dim: 32,
                heads: 2,
                layers: 2,
                experts: 8,
                top_k: 2,
                expert_hidden: 32,
                seq: 12,
                ..Default::default()
            };
            let data = text()?;
            outcome(args, 8, move || {
                MoeTask::with_data(&cfg, data.clone(), 7, Device::Cpu)
            })
        }
        "tree_lstm" => {
            let cfg = TreeLstmConfig {
                embed: 16,
                hidden: 32,
                eval_trees: 8,
                ..Default::default()
            };
            outcome(args, 8, move || {
                TreeLstmTask::new(cfg.clone(), 7, Device::Cpu)
            })
        }
        "evoformer" => {
            let cfg = EvoformerConfig {
                msa_dim: 8,
                pair_dim: 8,
                heads: 2,
                blocks: 1,
                max_recycles: 3,
                len: 8,
                msa_depth: 4,
                bins: 4,
                opm_dim: 2,
                tri_dim: 4,
                max_rel: 4,
                eval_samples: 4,
                ..Default::default()
            };
            outcome(args, 2, move || {
                EvoformerTask::new(cfg.clone(), 7, Device::Cpu)
            })
        }
        other => Err(Error::invalid(
            "pilot eval",
            format!(
                "unknown workload {other:?}: choose {}",
                WORKLOADS.join(", ")
            ),
        )),
    }
}

/// Records `steps` training steps of workload `name` (unlimited memory).
pub fn record(name: &str, steps: u64) -> Result<Workload> {
    let args = TrainArgs {
        steps: Some(steps),
        record_trace: true,
        quiet: true,
        ..Default::default()
    };
    let trace = run(name, &args)?.trace;
    let name = WORKLOADS
        .iter()
        .copied()
        .find(|w| *w == name)
        .unwrap_or("workload");
    Ok(Workload { name, trace })
}

/// Trains workload `name` for `steps` under `policy` and a device `budget` (e.g. `25%`).
pub fn train_under(name: &str, steps: u64, policy: &str, budget: &str) -> Result<Outcome> {
    let args = TrainArgs {
        steps: Some(steps),
        policy: Some(policy.to_string()),
        device_budget: budget.to_string(),
        quiet: true,
        ..Default::default()
    };
    run(name, &args)
}

/// Accuracy on steps held out of trained workloads and on a workload never trained on.
#[derive(Debug, Clone)]
pub struct Holdout {
    /// The encoding measured.
    pub encoding: Encoding,
    /// The held-out workload.
    pub holdout: &'static str,
    /// Training report: `accuracy_valid` is on the last steps of the trained workloads.
    pub trained: Report,
    /// Accuracy on every labelled step of the held-out workload.
    pub accuracy_holdout: f64,
    /// The majority-bucket rate on the held-out workload.
    pub majority_holdout: f64,
    /// Held-out confusion, `[true][predicted]`.
    pub confusion_holdout: [[u64; crate::BUCKETS]; crate::BUCKETS],
    /// Held-out rows.
    pub rows_holdout: usize,
    /// Median wall time of one [`Snapshot::predict`](crate::Snapshot::predict) over the
    /// held-out rows, microseconds.
    pub predict_us_p50: f64,
    /// The trained pilot.
    pub snapshot: crate::Snapshot,
}

/// The median time of one prediction over the rows of `ds`, microseconds.
pub fn predict_p50(snapshot: &crate::Snapshot, ds: &Dataset) -> f64 {
    let mut scratch = snapshot.scratch();
    let mut times: Vec<f64> = Vec::with_capacity(ds.len());
    let mut sink = 0u64;
    for i in 0..ds.len() {
        let t = std::time::Instant::now();
        sink += snapshot.predict(ds.row(i), &mut scratch) as u64;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    std::hint::black_box(sink);
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(0.0)
}

/// Trains on every workload but `holdout` (the last `valid_frac` of each one's steps
/// validate) and evaluates on all of `holdout`'s steps.
pub fn holdout(
    workloads: &[Workload],
    holdout: &str,
    labels: &LabelConfig,
    model: &ModelConfig,
    valid_frac: f64,
) -> Result<Holdout> {
    let dim = labels.features.input_dim();
    let (mut tr, mut va, mut held) = (Dataset::new(dim), Dataset::new(dim), None);
    let mut held_name = None;
    for w in workloads {
        let ds = label_trace(&w.trace, labels);
        if w.name == holdout {
            held = Some(ds);
            held_name = Some(w.name);
        } else {
            let (a, b) = ds.split_by_step(valid_frac);
            tr.extend(&a)?;
            va.extend(&b)?;
        }
    }
    let (Some(held), Some(held_name)) = (held, held_name) else {
        return Err(Error::invalid(
            "pilot eval",
            format!("no workload {holdout:?} to hold out"),
        ));
    };
    let (snapshot, trained) = train(&tr, &va, labels.features, model)?;
    let (accuracy_holdout, confusion_holdout) = evaluate(&snapshot, &held);
    let predict_us_p50 = predict_p50(&snapshot, &held);
    Ok(Holdout {
        predict_us_p50,
        snapshot,
        encoding: labels.features.encoding,
        holdout: held_name,
        trained,
        accuracy_holdout,
        majority_holdout: held.majority_rate(),
        confusion_holdout,
        rows_holdout: held.len(),
    })
}

/// The feature configs of the ablation: idioms, then one-hot op names, otherwise equal.
pub fn ablation(base: FeatureConfig) -> [FeatureConfig; 2] {
    [
        FeatureConfig {
            encoding: Encoding::Idioms,
            ..base
        },
        FeatureConfig {
            encoding: Encoding::OneHot,
            ..base
        },
    ]
}
