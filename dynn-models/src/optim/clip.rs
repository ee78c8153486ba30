//! Gradient clipping by global norm.

use crate::nn::Param;
use dynn_core::{Phase, Result, enter_phase, no_grad};
use dynn_ops::prelude::*;

/// Scales every gradient by `max_norm / total_norm` when the global L2 norm over all
/// parameters' gradients exceeds `max_norm` (PyTorch's `clip_grad_norm_`). Returns the norm
/// before clipping. A non-finite norm is left unclipped and returned, for the caller to see.
pub fn clip_grad_norm(params: &[Param], max_norm: f64) -> Result<f64> {
    let _g = no_grad();
    let _p = enter_phase(Phase::Optimizer);
    let grads: Vec<_> = params
        .iter()
        .filter_map(|p| p.grad().map(|g| (p, g)))
        .collect();
    let plan = || -> Vec<Vec<dynn_core::BufferId>> {
        grads.iter().map(|(_, g)| vec![g.buffer().id()]).collect()
    };
    dynn_core::announce_plan("clip_grad_norm", plan);
    let mut sq = 0.0;
    for (_, g) in &grads {
        sq += g.sqr()?.sum_all()?.to_scalar_f64()?;
    }
    let norm = sq.sqrt();
    if norm.is_finite() && norm > max_norm {
        dynn_core::announce_plan("clip_grad_norm.scale", plan);
        let f = max_norm / (norm + 1e-6);
        for (p, g) in &grads {
            p.set_grad(Some(g.scale(f)?))?;
        }
    }
    Ok(norm)
}
