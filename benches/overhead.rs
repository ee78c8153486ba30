//! What the memory manager costs when it never has to move anything: a training step of the
//! one-block transformer with no hooks, and with `dynn-mm`'s manager (lru, unlimited budget)
//! installed. Samples alternate between the two; the figure is the ratio of medians.
//!
//! `cargo bench -p dynn --bench overhead` (the bar: at most 2% of a step).

#[path = "../examples/workloads/mod.rs"]
mod workloads;

use dynn::core::{install_memory_hooks, mark_step};
use dynn::mm::{ManagerConfig, MemoryManager, policy};
use dynn::prelude::*;
use std::time::Instant;
use workloads::{Rng, Transformer, sgd};

fn step(model: &Transformer, rng: &mut Rng) -> Result<()> {
    let (x, y) = model.batch(rng, 8, 64)?;
    let loss = model.loss(&x, &y)?;
    loss.backward()?;
    sgd(&model.params(), 0.01)
}

fn main() -> Result<()> {
    // Kernels run partly on this thread (see `init_threads`).
    dynn::init_threads();
    let model = Transformer::new(128, 3)?;
    let mut rng = Rng(5);
    let mm = MemoryManager::new(ManagerConfig::new(policy::by_name("lru")?, None));
    let (mut plain, mut hooked) = (Vec::new(), Vec::new());
    let mut ops_per_step = 0;
    for i in 0..60 {
        let t = Instant::now();
        step(&model, &mut rng)?;
        plain.push(t.elapsed().as_secs_f64() * 1e3);
        let _hooks = install_memory_hooks(mm.clone());
        let before = mm.stats().ops;
        let t = Instant::now();
        step(&model, &mut rng)?;
        mark_step(i + 1);
        hooked.push(t.elapsed().as_secs_f64() * 1e3);
        ops_per_step = mm.stats().ops - before;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, h) = (median(&mut plain), median(&mut hooked));
    println!(
        "transformer step (width 128, batch 8x64, {ops_per_step} ops): no hooks {p:.3} ms, memory manager {h:.3} ms, overhead {:+.2}%",
        (h / p - 1.0) * 100.0
    );
    Ok(())
}
