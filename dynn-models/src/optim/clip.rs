//! Gradient clipping by global norm.

use crate::nn::Param;
use dynn_core::{BufferId, DType, GradHookHandle, Phase, Result, Tensor, enter_phase, no_grad};
use dynn_ops::prelude::*;
use std::sync::{Arc, Mutex};

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
        sq += square_sum(g)?.to_scalar_f64()?;
    }
    Ok(sq.sqrt())
}

/// Σg² of one gradient as a (1, 1) tensor on its device.
fn square_sum(g: &Tensor) -> Result<Tensor> {
    // The product (1, n)·(n, 1): one kernel that reads the gradient once, and no temporary of
    // its size (squaring first would allocate one). Half-precision squares sum past f16's
    // range: those are summed in f32.
    let g = match g.dtype() {
        DType::F16 | DType::BF16 => g.to_dtype(DType::F32)?,
        _ => g.contiguous()?,
    };
    let row = g.reshape((1, g.elem_count()))?;
    row.matmul(&row.t()?)
}

/// Per parameter, in the watched list's order: the gradient buffer its ready hook read, and
/// its Σg².
type Squares = Arc<Mutex<Vec<Option<(BufferId, f64)>>>>;

/// The global gradient norm of [`grad_norm`], taken during the backward pass: each
/// parameter's Σg² is computed and read as soon as backward has finished its gradient
/// ([`Tensor::on_grad_ready`]), while that gradient is still on the device. Under a memory
/// budget this saves a pass that brings every evicted gradient back before the optimizer
/// step. [`GradNormWatch::norm`] gives the same value as [`grad_norm`], bit for bit: the same
/// kernel on the same gradients, summed in the same order.
///
/// With gradient accumulation, each backward pass takes the sums again and the last one
/// counts. It reads each gradient as the backward pass left it: replacing a gradient
/// ([`Tensor::set_grad`]) is noticed and that gradient is read again, but changing one in place
/// between the backward pass and [`GradNormWatch::norm`] is not.
pub struct GradNormWatch {
    params: Vec<Param>,
    squares: Squares,
    _hooks: Vec<GradHookHandle>,
}

impl GradNormWatch {
    /// Watches `params`' gradients from now until the watch is dropped.
    pub fn new(params: &[Param]) -> Result<Self> {
        let squares: Squares = Arc::new(Mutex::new(vec![None; params.len()]));
        let hooks = params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.requires_grad())
            .map(|(i, p)| {
                let squares = squares.clone();
                p.on_grad_ready(move |g| {
                    // Read at once (as `grad_norm` reads each sum): no tensor per parameter
                    // waits for the step, where a policy would move it out and back.
                    let sq = square_sum(g)?.to_scalar_f64()?;
                    squares.lock().unwrap_or_else(|e| e.into_inner())[i] =
                        Some((g.buffer().id(), sq));
                    Ok(())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GradNormWatch {
            params: params.to_vec(),
            squares,
            _hooks: hooks,
        })
    }

    /// The global L2 norm of the current gradients (as [`grad_norm`]), from the sums the
    /// backward passes since the last call took; a gradient they did not see is read now.
    /// Starts the next count afresh.
    pub fn norm(&self) -> Result<f64> {
        let _g = no_grad();
        let _p = enter_phase(Phase::Optimizer);
        let taken: Vec<_> = {
            let mut s = self.squares.lock().unwrap_or_else(|e| e.into_inner());
            s.iter_mut().map(Option::take).collect()
        };
        let mut sq = 0.0;
        for (p, seen) in self.params.iter().zip(taken) {
            let Some(g) = p.grad() else { continue };
            sq += match seen {
                Some((id, s)) if id == g.buffer().id() => s,
                _ => square_sum(&g)?.to_scalar_f64()?,
            };
        }
        Ok(sq.sqrt())
    }
}

impl std::fmt::Debug for GradNormWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradNormWatch")
            .field("params", &self.params.len())
            .finish()
    }
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
