//! The early-exit transformer: gradients, dynamic depth, config errors.

use dynn_core::{DType, Device, Result};
use dynn_models::data::Split;
use dynn_models::data::{TextDataset, generated_corpus};
use dynn_models::gradcheck::GradCheck;
use dynn_models::models::early_exit::{EarlyExitConfig, EarlyExitTask};
use dynn_models::nn::Module;
use dynn_models::rng::Rng;
use dynn_models::train::{Defaults, TrainArgs, train};
use std::sync::Arc;

pub fn tiny_data() -> Arc<TextDataset> {
    Arc::new(
        TextDataset::new(&generated_corpus(3, 20_000), 256).expect("corpus trains a tokenizer"),
    )
}

pub fn tiny() -> EarlyExitConfig {
    EarlyExitConfig {
        dim: 8,
        heads: 2,
        layers: 3,
        seq: 6,
        threshold: 0.05,
        ..Default::default()
    }
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let task = EarlyExitTask::with_data(&tiny(), tiny_data(), 1, DType::F64, Device::Cpu)?;
    let model = task.model();
    let (ids, tgt) = tiny_data().batch(&mut Rng::new(5), 3, 6, Split::Train, Device::Cpu)?;
    // Every block runs (no exit can flip under a perturbation).
    let report = GradCheck {
        max_elems_per_param: 3,
        ..Default::default()
    }
    .check(&model.params(), || {
        Ok(model.loss(&ids, &tgt, f64::INFINITY)?.0)
    })?;
    assert!(report.checked > 50, "{report:?}");
    Ok(())
}

#[test]
fn sequences_leave_at_different_depths() -> Result<()> {
    let task = EarlyExitTask::with_data(&tiny(), tiny_data(), 1, DType::F32, Device::Cpu)?;
    let (ids, tgt) = tiny_data().batch(&mut Rng::new(5), 16, 6, Split::Train, Device::Cpu)?;
    let (_, all) = task.model().loss(&ids, &tgt, f64::INFINITY)?;
    assert_eq!(all.exits, vec![0, 0, 16]);
    let (_, none) = task.model().loss(&ids, &tgt, 0.0)?;
    assert_eq!(none.exits, vec![16, 0, 0]);
    Ok(())
}

#[test]
fn graphs_differ_within_five_steps() -> Result<()> {
    let data = tiny_data();
    let args = TrainArgs {
        steps: Some(5),
        batch: Some(8),
        quiet: true,
        ..Default::default()
    };
    let defaults = Defaults {
        steps: 5,
        batch: 8,
        lr: 1e-2,
    };
    let cfg = EarlyExitConfig {
        threshold: 0.012,
        ..tiny()
    };
    let out = train(&args, defaults, || {
        EarlyExitTask::with_data(&cfg, data.clone(), 2, DType::F32, Device::Cpu)
    })?;
    assert!(out.summary.distinct_graphs >= 2, "{:?}", out.summary);
    Ok(())
}

#[test]
fn bad_configs_are_errors() {
    let data = tiny_data();
    for cfg in [
        EarlyExitConfig { heads: 3, ..tiny() },
        EarlyExitConfig {
            layers: 0,
            ..tiny()
        },
        EarlyExitConfig {
            threshold: 1.5,
            ..tiny()
        },
    ] {
        assert!(
            EarlyExitTask::with_data(&cfg, data.clone(), 0, DType::F32, Device::Cpu).is_err(),
            "{cfg:?}"
        );
    }
}
