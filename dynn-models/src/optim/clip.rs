//! Gradient clipping by global norm.

use crate::nn::Param;
use dynn_core::{DType, Phase, Result, Tensor, enter_phase, no_grad};
use dynn_ops::prelude::*;

/// Scales every gradient by `max_norm / total_norm` when the global L2 norm over all
/// parameters' gradients exceeds `max_norm` (PyTorch's `clip_grad_norm_`). Returns the norm
/// before clipping. A non-finite norm is left unclipped and returned, for the caller to see.
///
/// Before an optimizer step, `opt.step_scaled(params, clip_scale(grad_norm(params)?, max))`
/// does the same with one pass less over the gradients where the optimizer folds the factor
/// into its update ([`Optimizer::step_scaled`](super::Optimizer::step_scaled)).
pub fn clip_grad_norm(params: &[Param], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(params)?;
    let scale = clip_scale(norm, max_norm);
    if scale != 1.0 {
        scale_grads(params, scale)?;
    }
    Ok(norm)
}

/// The global L2 norm over all parameters' gradients (parameters without one count zero).
pub fn grad_norm(params: &[Param]) -> Result<f64> {
    let _g = no_grad();
    let _p = enter_phase(Phase::Optimizer);
    let grads = grads(params);
    dynn_core::announce_plan("clip_grad_norm", || plan(&grads));
    let mut sq = 0.0;
    for (_, g) in &grads {
        // Σg² as the product (1, n)·(n, 1): one kernel that reads the gradient once, and no
        // temporary of its size (squaring first would allocate one).
        // Half-precision squares sum past f16's range: those are summed in f32.
        let g = match g.dtype() {
            DType::F16 | DType::BF16 => g.to_dtype(DType::F32)?,
            _ => g.contiguous()?,
        };
        let row = g.reshape((1, g.elem_count()))?;
        sq += row.matmul(&row.t()?)?.to_scalar_f64()?;
    }
    Ok(sq.sqrt())
}

/// The factor clipping to `max_norm` applies to gradients of global norm `norm`:
/// `max_norm / (norm + 1e-6)` above the limit, 1 at or below it or when `norm` is not finite.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Multiplies every gradient by `scale` (out of place: each parameter gets a new gradient).
pub(crate) fn scale_grads(params: &[Param], scale: f64) -> Result<()> {
    let _g = no_grad();
    let _p = enter_phase(Phase::Optimizer);
    let grads = grads(params);
    dynn_core::announce_plan("clip_grad_norm.scale", || plan(&grads));
    for (p, g) in &grads {
        p.set_grad(Some(g.scale(scale)?))?;
    }
    Ok(())
}

fn grads(params: &[Param]) -> Vec<(&Param, Tensor)> {
    params
        .iter()
        .filter_map(|p| p.grad().map(|g| (p, g)))
        .collect()
}

fn plan(grads: &[(&Param, Tensor)]) -> Vec<Vec<dynn_core::BufferId>> {
    grads.iter().map(|(_, g)| vec![g.buffer().id()]).collect()
}
