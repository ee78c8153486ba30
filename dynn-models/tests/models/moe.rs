//! The Mixture-of-Experts LM: gradients, routing, dynamic graphs and config errors.

use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_models::data::generated_corpus;
use dynn_models::gradcheck::GradCheck;
use dynn_models::models::moe::{MoeConfig, MoeLayer, MoeLm, MoeTask};
use dynn_models::nn::{Module, ParamBuilder};
use dynn_models::rng::{Rng, SeedStream};
use dynn_models::train::{Defaults, TrainArgs, train};
use dynn_ops::prelude::*;

fn tiny() -> MoeConfig {
    MoeConfig {
        vocab: 13,
        dim: 8,
        heads: 2,
        layers: 2,
        experts: 4,
        top_k: 2,
        expert_hidden: 6,
        capacity_factor: 0.75,
        aux_loss_weight: 0.1,
        seq: 6,
        dropout: 0.0,
    }
}

fn ids(rng: &mut Rng, b: usize, s: usize, vocab: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * s).map(|_| rng.range(0, vocab) as u32).collect();
    Tensor::from_vec(v, (b, s), Device::Cpu)
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let cfg = tiny();
    let b = ParamBuilder::new(DType::F64, Device::Cpu, 3);
    let model = MoeLm::new(&b, &cfg, &SeedStream::new(0))?;
    let mut rng = Rng::new(5);
    let (x, y) = (ids(&mut rng, 2, 6, 13)?, ids(&mut rng, 2, 6, 13)?);
    let (_, base) = model.loss(&x, &y)?;
    // The drop path is exercised, and the routing is fixed: a perturbation that changed it
    // would be reported instead of silently differentiating a jump.
    assert!(base.dropped > 0, "{base:?}");
    let report = GradCheck {
        max_elems_per_param: 4,
        ..Default::default()
    }
    .check(&model.params(), || {
        let (loss, stats) = model.loss(&x, &y)?;
        if stats != base {
            return Err(Error::Msg(format!("routing changed: {stats:?}")));
        }
        Ok(loss)
    })?;
    assert!(report.checked > 100, "{report:?}");
    Ok(())
}

#[test]
fn only_routed_experts_get_gradients() -> Result<()> {
    let b = ParamBuilder::new(DType::F64, Device::Cpu, 1);
    let layer = MoeLayer::new(&b.pp("moe"), 4, 8, 5, 1, 1.0)?;
    assert_eq!(
        layer.experts[3].fc1.weight.path(),
        "moe.experts.3.fc1.weight"
    );
    let x = rand_normal((1, 4), 0.0, 1.0, DType::F64, 2, Device::Cpu)?;
    let out = layer.forward(&x)?;
    out.y.sum_all()?.add(&out.aux)?.backward()?;
    let used: Vec<usize> = (0..8)
        .filter(|&e| !out.routing.tokens[e].is_empty())
        .collect();
    assert_eq!(used.len(), 1);
    for (e, expert) in layer.experts.iter().enumerate() {
        for p in expert.params() {
            assert_eq!(p.grad().is_some(), used.contains(&e), "{}", p.path());
        }
    }
    assert!(layer.router.weight.grad().is_some());
    Ok(())
}

#[test]
fn graphs_differ_between_steps() -> Result<()> {
    let text = generated_corpus(1, 20_000);
    let cfg = MoeConfig {
        vocab: 300,
        dim: 16,
        heads: 2,
        layers: 1,
        experts: 8,
        top_k: 1,
        expert_hidden: 16,
        seq: 16,
        ..MoeConfig::default()
    };
    let args = TrainArgs {
        steps: Some(5),
        batch: Some(2),
        quiet: true,
        // `TrainArgs::default()` leaves these empty (not the clap defaults).
        device: "cpu".into(),
        device_budget: "unlimited".into(),
        grad_accum: 1,
        clip: 1.0,
        ..Default::default()
    };
    let defaults = Defaults {
        steps: 5,
        batch: 2,
        lr: 1e-3,
    };
    let outcome = train(&args, defaults, || {
        MoeTask::from_text(&cfg, &text, 0, Device::Cpu)
    })?;
    assert!(
        outcome.summary.distinct_graphs >= 2,
        "{:?}",
        outcome.summary
    );
    assert_eq!(outcome.summary.eval_metric, "valid_loss");
    assert!(outcome.summary.eval_value.is_finite());
    Ok(())
}

#[test]
fn bad_configs_are_errors() {
    let ok = MoeConfig::default();
    assert!(ok.validate().is_ok());
    for bad in [
        MoeConfig {
            top_k: 3,
            ..ok.clone()
        },
        MoeConfig {
            experts: 1,
            ..ok.clone()
        },
        MoeConfig {
            heads: 3,
            ..ok.clone()
        },
        MoeConfig {
            layers: 0,
            ..ok.clone()
        },
        MoeConfig {
            capacity_factor: 0.0,
            ..ok.clone()
        },
        MoeConfig {
            aux_loss_weight: f64::NAN,
            ..ok.clone()
        },
        MoeConfig {
            dropout: 1.0,
            ..ok.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
        let b = ParamBuilder::new(DType::F32, Device::Cpu, 0);
        assert!(MoeLm::new(&b, &bad, &SeedStream::new(0)).is_err());
    }
    // The BPE needs at least the 256 byte tokens.
    let text = generated_corpus(0, 5_000);
    assert!(
        MoeTask::from_text(
            &MoeConfig {
                vocab: 100,
                ..ok.clone()
            },
            &text,
            0,
            Device::Cpu
        )
        .is_err()
    );
    // Sequences longer than the learned positions.
    let b = ParamBuilder::new(DType::F32, Device::Cpu, 0);
    let m = MoeLm::new(&b, &tiny(), &SeedStream::new(0)).unwrap();
    let long = Tensor::zeros((1, 7), DType::U32, Device::Cpu).unwrap();
    assert!(m.forward(&long).is_err());
}
