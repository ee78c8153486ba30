//! The recompute policy under tight budgets, where activations are dropped in chains: reading
//! one recomputes the chain behind it, each link needing its recipe's inputs on the device at
//! once. Before the fix, every input brought back stayed pinned down the whole chain, and
//! DTR's cost ignored the dropped buffers around a candidate, so long chains formed, their
//! pinned links filled the budget and training stopped with an out-of-memory error that
//! blamed the op's own inputs (Evoformer at 25% of its peak, Tree-LSTM in `adam_step`).

mod common;

use common::Rng;
use dynn_core::{
    BufferKind, Device, Error, Phase, Result, Tensor, enter_phase, install_memory_hooks, mark_step,
    no_grad,
};
use dynn_mm::{ManagerConfig, MemoryManager, MemoryStats, policy};
use dynn_ops::prelude::*;

const WIDTH: usize = 16;
const ROWS: usize = 256;
const DEPTH: usize = 16;
const STEPS: usize = 2;

/// A residual chain: x ← tanh(x W_i) + x, then the mean square. Every link is a cheap add of
/// two activations, so the recompute policy drops links in runs.
struct Chain {
    params: Vec<Tensor>,
}

impl Chain {
    fn new() -> Result<Self> {
        let mut rng = Rng(7);
        let params = (0..DEPTH)
            .map(|_| {
                let w = Tensor::from_vec(
                    rng.vec(WIDTH * WIDTH, 0.5 / (WIDTH as f32).sqrt()),
                    (WIDTH, WIDTH),
                    Device::Cpu,
                )?
                .set_requires_grad(true);
                w.set_kind(BufferKind::Parameter);
                Ok(w)
            })
            .collect::<Result<_>>()?;
        Ok(Chain { params })
    }

    /// Trains `STEPS` SGD steps; returns the bits of every loss, then of every parameter.
    fn train(&self) -> Result<Vec<u32>> {
        let mut rng = Rng(3);
        let mut bits = Vec::new();
        for step in 0..STEPS {
            let mut x = Tensor::from_vec(rng.vec(ROWS * WIDTH, 1.0), (ROWS, WIDTH), Device::Cpu)?;
            for w in &self.params {
                x = x.matmul(w)?.tanh()?.add(&x)?;
            }
            let loss = x.sqr()?.mean_all()?;
            loss.backward()?;
            {
                let _g = no_grad();
                let _p = enter_phase(Phase::Optimizer);
                for p in &self.params {
                    if let Some(g) = p.grad() {
                        p.axpy_(-0.01, &g)?;
                    }
                    p.zero_grad();
                }
            }
            bits.push(loss.to_scalar::<f32>()?.to_bits());
            mark_step(step as u64 + 1);
        }
        for p in &self.params {
            bits.extend(p.to_vec::<f32>()?.into_iter().map(f32::to_bits));
        }
        Ok(bits)
    }
}

fn config(policy_name: &str, budget: Option<usize>) -> ManagerConfig {
    let mut cfg = ManagerConfig::new(policy::by_name(policy_name).unwrap(), budget);
    // Segments sized for buffers of 16 KiB.
    cfg.segments = (16 << 10, 64 << 10);
    cfg
}

fn run(policy_name: &str, budget: Option<usize>) -> (Result<Vec<u32>>, MemoryStats) {
    let mm = MemoryManager::new(config(policy_name, budget));
    let bits = {
        let _g = install_memory_hooks(mm.clone());
        Chain::new().and_then(|c| c.train())
    };
    (bits, mm.stats())
}

#[test]
fn chains_of_dropped_activations_are_recomputed_within_the_budget() {
    let reference = Chain::new().unwrap().train().unwrap();
    let (bits, stats) = run("none", None);
    assert_eq!(bits.unwrap(), reference);
    let peak = stats.peak_device_bytes;
    for pct in [10, 15, 20, 25, 30, 40] {
        let budget = peak * pct / 100;
        let (bits, stats) = run("recompute", Some(budget));
        let bits = bits.unwrap_or_else(|e| panic!("recompute at {pct}% of the peak: {e}"));
        assert_eq!(bits, reference, "recompute at {pct}%: results differ");
        assert!(
            stats.peak_device_bytes <= budget,
            "recompute at {pct}%: peak {} over budget {budget}",
            stats.peak_device_bytes
        );
        assert!(
            stats.drops > 0 && stats.recomputes > 0,
            "recompute at {pct}%: nothing was recomputed"
        );
    }
}

#[test]
fn an_op_too_large_for_the_budget_says_what_pins_the_device() {
    // add needs its two 16 KiB inputs and a 16 KiB output: 48 KiB under a 40 KiB budget.
    let mm = MemoryManager::new(config("recompute", Some(40 << 10)));
    let err = {
        let _g = install_memory_hooks(mm.clone());
        let n = 4096;
        let a = Tensor::from_vec(vec![1.0f32; n], (64, 64), Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![2.0f32; n], (64, 64), Device::Cpu).unwrap();
        a.add(&b).unwrap_err()
    };
    let Error::OutOfMemory { msg, .. } = &err else {
        panic!("expected OutOfMemory, got {err}")
    };
    assert!(
        msg.contains("add needs 16.00 KiB")
            && msg.contains(
                "all 2 resident buffers (32.00 KiB) are pinned, 2 as inputs or outputs of add"
            )
            && msg.contains("only 8.00 KiB of the budget is free"),
        "{msg}"
    );
    assert!(
        !msg.contains("recompute"),
        "no recomputation was involved: {msg}"
    );
}

#[test]
fn an_outputs_recipe_does_not_keep_its_released_inputs_alive() {
    let mm = MemoryManager::new(config("recompute", None));
    let _g = install_memory_hooks(mm.clone());
    let a = Tensor::from_vec(vec![0.5f32; 4096], (64, 64), Device::Cpu).unwrap();
    let b = a.exp().unwrap();
    let a_buffer = std::sync::Arc::downgrade(a.buffer());
    drop(a);
    // Only b's recipe could still reach a's bytes; it holds them only once b is dropped.
    assert!(
        a_buffer.upgrade().is_none(),
        "b's recipe kept a released input alive"
    );
    assert_eq!(b.to_vec::<f32>().unwrap()[0], 0.5f32.exp());
}
