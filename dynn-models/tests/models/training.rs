//! The shared training loop: a checkpointed and resumed run ends bit-identical to an
//! uninterrupted one; bad checkpoint files are rejected with an error naming the problem;
//! offloading under every policy and budget changes no bit.

use crate::early_exit::{tiny, tiny_data};
use dynn_core::{DType, Device, Error, Result};
use dynn_models::checkpoint::Checkpoint;
use dynn_models::models::early_exit::{EarlyExitConfig, EarlyExitTask};
use dynn_models::models::evoformer::{EvoformerConfig, EvoformerTask};
use dynn_models::models::moe::{MoeConfig, MoeTask};
use dynn_models::models::tree_lstm::{TreeLstmConfig, TreeLstmTask};
use dynn_models::nn::Param;
use dynn_models::train::{Defaults, Outcome, Task, TrainArgs, periodic_path, train};
use std::path::PathBuf;

const DEFAULTS: Defaults = Defaults {
    steps: 6,
    batch: 4,
    lr: 1e-2,
};

fn cfg() -> EarlyExitConfig {
    // Exits vary, and dropout is on: the dropout stream must resume where it stopped. Wide
    // enough that parameters, not one op's working set, dominate the peak (so 25% is
    // feasible).
    EarlyExitConfig {
        dim: 32,
        threshold: 0.012,
        dropout: 0.1,
        ..tiny()
    }
}

fn run(args: TrainArgs) -> Result<Outcome> {
    let cfg = cfg();
    let data = tiny_data();
    train(&args, DEFAULTS, move || {
        EarlyExitTask::with_data(&cfg, data.clone(), 7, DType::F32, Device::Cpu)
    })
}

fn quiet() -> TrainArgs {
    TrainArgs {
        quiet: true,
        ..Default::default()
    }
}

fn values(params: &[Param]) -> Result<Vec<(String, Vec<u32>)>> {
    params
        .iter()
        .map(|p| {
            let bits = p
                .to_vec::<f32>()
                .map_err(|e| Error::Msg(format!("{}: {e}", p.path())))?
                .iter()
                .map(|v| v.to_bits())
                .collect();
            Ok((p.path().to_string(), bits))
        })
        .collect()
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "dynn-test-{}-{name}.safetensors",
        std::process::id()
    ))
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() -> Result<()> {
    let path = temp("resume");
    let whole = run(TrainArgs {
        checkpoint: Some(path.clone()),
        checkpoint_every: 3,
        ..quiet()
    })?;
    let at3 = periodic_path(&path, 3);
    let rest = run(TrainArgs {
        resume: Some(at3.clone()),
        ..quiet()
    })?;
    std::fs::remove_file(&path)?;
    std::fs::remove_file(&at3)?;
    let resumed: Vec<u64> = rest.losses.iter().map(|l| l.to_bits()).collect();
    let straight: Vec<u64> = whole.losses[3..].iter().map(|l| l.to_bits()).collect();
    assert_eq!(resumed, straight, "losses after the resume");
    assert_eq!(values(&rest.params)?, values(&whole.params)?);
    Ok(())
}

fn expect_checkpoint_error(r: Result<Outcome>, needle: &str) {
    match r {
        Err(Error::Checkpoint { msg, .. }) => {
            assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}")
        }
        Err(e) => panic!("expected a checkpoint error about {needle:?}, got {e}"),
        Ok(_) => panic!("a bad checkpoint ({needle}) was accepted"),
    }
}

#[test]
fn a_run_on_another_device_than_the_task_is_an_error() {
    // Without a CUDA driver `--device cuda` stops at the driver; with one, the task built on
    // the CPU is refused. Either way a device error, never a panic or a silent CPU run.
    let args = TrainArgs {
        device: "cuda".into(),
        steps: Some(1),
        ..quiet()
    };
    match run(args) {
        Err(Error::Device { msg, .. }) => {
            assert!(msg.contains("CUDA") || msg.contains("cuda"), "{msg}")
        }
        Err(e) => panic!("expected a device error, got {e}"),
        Ok(_) => panic!("a CPU-built task trained under --device cuda"),
    }
}

#[test]
fn bad_checkpoints_are_rejected_with_the_reason() -> Result<()> {
    let path = temp("bad");
    run(TrainArgs {
        steps: Some(1),
        checkpoint: Some(path.clone()),
        ..quiet()
    })?;
    let good = std::fs::read(&path)?;
    let resume = |bytes: &[u8]| -> Result<Outcome> {
        std::fs::write(&path, bytes)?;
        run(TrainArgs {
            resume: Some(path.clone()),
            ..quiet()
        })
    };
    // Truncated.
    expect_checkpoint_error(resume(&good[..good.len() - 100]), "truncated or corrupt");
    // One flipped bit in the last tensor's bytes.
    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x10;
    expect_checkpoint_error(resume(&flipped), "hash mismatch");
    // Not a checkpoint at all.
    expect_checkpoint_error(resume(b"hello, world"), "truncated or corrupt");

    // A tensor missing, and one of the wrong shape.
    std::fs::write(&path, &good)?;
    let ckpt = Checkpoint::load(&path)?;
    let victim = "model.blocks.1.attn.q.weight";
    let mut missing = Checkpoint::new();
    let mut reshaped = Checkpoint::new();
    for name in ckpt.names() {
        let t = ckpt.get(name).expect("listed").clone();
        if name != victim {
            missing.insert(name, t.clone());
            reshaped.insert(name, t);
        } else {
            reshaped.insert(
                name,
                dynn_core::Tensor::zeros((3, 3), DType::F32, dynn_core::Device::Cpu)?,
            );
        }
    }
    for key in ["step", "model", "config", "rng.data", "rng.dropout"] {
        let v = ckpt.meta(key).expect("written by the trainer").to_string();
        missing.set_meta(key, v.clone());
        reshaped.set_meta(key, v);
    }
    missing.save(&path)?;
    let r = run(TrainArgs {
        resume: Some(path.clone()),
        ..quiet()
    });
    expect_checkpoint_error(r, &format!("`{victim}` is missing"));
    reshaped.save(&path)?;
    let r = run(TrainArgs {
        resume: Some(path.clone()),
        ..quiet()
    });
    expect_checkpoint_error(r, victim);

    // Another model's settings.
    let data = tiny_data();
    let other = EarlyExitConfig { dim: 12, ..cfg() };
    let r = train(
        &TrainArgs {
            resume: Some(path.clone()),
            ..quiet()
        },
        DEFAULTS,
        move || EarlyExitTask::with_data(&other, data.clone(), 7, DType::F32, Device::Cpu),
    );
    expect_checkpoint_error(r, "settings differ");
    std::fs::remove_file(&path)?;
    Ok(())
}

/// Trains 3 steps unlimited, then under every offloading policy at each of `budgets` (shares
/// of the first steps' peak), and asserts every loss and parameter is bit-identical.
fn offload_is_exact<T: Task>(
    name: &str,
    batch: usize,
    budgets: &[&str],
    make: impl Fn() -> Result<T> + Clone,
) -> Result<()> {
    let run = |args: TrainArgs| train(&args, DEFAULTS, make.clone());
    let base = run(TrainArgs {
        steps: Some(3),
        batch: Some(batch),
        ..quiet()
    })?;
    for policy in ["lru", "static", "recompute", "belady"] {
        for budget in budgets {
            let what = format!("{name}: {policy} at {budget}");
            let out = run(TrainArgs {
                steps: Some(3),
                batch: Some(batch),
                policy: Some(policy.into()),
                device_budget: budget.to_string(),
                ..quiet()
            })
            .map_err(|e| Error::Msg(format!("{what}: {e}")))?;
            assert!(
                out.summary.peak_device_bytes < base.summary.peak_device_bytes,
                "{what}: the budget was not applied"
            );
            assert_eq!(out.losses, base.losses, "{what}: losses");
            let got = values(&out.params).map_err(|e| Error::Msg(format!("{what}: {e}")))?;
            assert_eq!(got, values(&base.params)?, "{what}: parameters");
        }
    }
    Ok(())
}

#[test]
fn offloading_the_early_exit_lm_changes_no_bit() -> Result<()> {
    // Big enough that a third of the peak holds every op's working set despite the pool's
    // 64 KiB segment granularity.
    let cfg = EarlyExitConfig {
        dim: 64,
        seq: 12,
        ..cfg()
    };
    let data = tiny_data();
    offload_is_exact("early_exit", 8, &["50%", "40%"], move || {
        EarlyExitTask::with_data(&cfg, data.clone(), 7, DType::F32, Device::Cpu)
    })
}

#[test]
fn offloading_the_moe_lm_changes_no_bit() -> Result<()> {
    let cfg = MoeConfig {
        dim: 64,
        heads: 4,
        layers: 2,
        experts: 8,
        top_k: 2,
        expert_hidden: 64,
        seq: 12,
        ..Default::default()
    };
    let data = (*tiny_data()).clone();
    offload_is_exact("moe", 8, &["50%", "35%"], move || {
        MoeTask::with_data(&cfg, data.clone(), 7, Device::Cpu)
    })
}

#[test]
fn offloading_the_tree_lstm_changes_no_bit() -> Result<()> {
    let cfg = TreeLstmConfig {
        embed: 32,
        hidden: 96,
        // Evaluation runs under the budget too: keep its batch near the training batch.
        eval_trees: 8,
        ..Default::default()
    };
    offload_is_exact("tree_lstm", 8, &["50%", "35%"], move || {
        TreeLstmTask::new(cfg.clone(), 7, Device::Cpu)
    })
}

#[test]
fn offloading_the_evoformer_changes_no_bit() -> Result<()> {
    let cfg = EvoformerConfig {
        len: 12,
        msa_depth: 4,
        max_recycles: 3,
        eval_samples: 2,
        ..Default::default()
    };
    offload_is_exact("evoformer", 2, &["50%", "35%"], move || {
        EvoformerTask::new(cfg.clone(), 7, Device::Cpu)
    })
}
