//! Optimizers, gradient clipping and learning-rate schedules.
//!
//! Optimizer state tensors are [`BufferKind::OptimizerState`](dynn_core::BufferKind) buffers,
//! so the memory manager can offload them like any other tensor. Every update runs through
//! the executor as an in-place op in the optimizer phase.

mod adam;
mod clip;
mod schedule;
mod sgd;

pub use adam::{Adam, AdamConfig};
use clip::scale_grads;
pub use clip::{GradNormWatch, clip_grad_norm, clip_scale, grad_norm};
pub use schedule::{LrSchedule, WarmupCosine};
pub use sgd::{Sgd, SgdConfig};

use crate::nn::Param;
use dynn_core::{BufferKind, Result, Tensor};

/// Announces an optimizer step's reads to the memory hooks before it runs
/// ([`dynn_core::announce_plan`], as `source`): one group per parameter with a gradient, in
/// update order — the parameter, its gradient, then the state tensors `state` gives for it.
fn announce_updates<'a>(
    source: &'static str,
    params: &'a [Param],
    state: impl Fn(&Param) -> Vec<&'a Tensor>,
) {
    dynn_core::announce_plan(source, || {
        params
            .iter()
            .filter_map(|p| {
                let g = p.grad()?;
                let mut ids = vec![p.buffer().id(), g.buffer().id()];
                ids.extend(state(p).into_iter().map(|t| t.buffer().id()));
                Some(ids)
            })
            .collect()
    });
}

/// An optimizer: updates parameters from their accumulated gradients.
pub trait Optimizer {
    /// Applies one update to every parameter that has a gradient, then clears the gradients.
    /// Parameters without a gradient (e.g. experts no token was routed to) are left as they
    /// are, state included, as PyTorch does.
    fn step(&mut self, params: &[Param]) -> Result<()>;

    /// [`Optimizer::step`] with every gradient first multiplied by `scale` (gradient
    /// clipping's factor, see [`clip_scale`]). This default scales the gradients in a pass of
    /// their own; an optimizer that can fold the factor into its update (Adam) overrides it,
    /// which saves a read and a write of every gradient — under a memory budget, a round
    /// trip of each over the host link.
    fn step_scaled(&mut self, params: &[Param], scale: f64) -> Result<()> {
        if scale != 1.0 {
            scale_grads(params, scale)?;
        }
        self.step(params)
    }

    /// The learning rate of the next step.
    fn lr(&self) -> f64;

    /// Sets the learning rate (for schedules).
    fn set_lr(&mut self, lr: f64);

    /// The state tensors by name (e.g. `blocks.0.w.exp_avg`), for checkpoints.
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Restores state saved by [`Optimizer::state`] for the given parameters. A missing or
    /// misshapen entry is an error naming it.
    fn load_state(
        &mut self,
        params: &[Param],
        state: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<()>;
}

/// Zeros shaped like `p`, marked as optimizer state.
pub(crate) fn state_like(p: &Tensor) -> Result<Tensor> {
    let t = p.zeros_like()?;
    t.set_kind(BufferKind::OptimizerState);
    Ok(t)
}

/// Looks up `name` in a loaded state and checks it has `like`'s shape and dtype; the copy is
/// a fresh optimizer-state buffer on `like`'s device.
pub(crate) fn restore(
    state: &dyn Fn(&str) -> Option<Tensor>,
    name: &str,
    like: &Tensor,
) -> Result<Tensor> {
    use dynn_ops::prelude::*;
    let t = state(name).ok_or_else(|| dynn_core::Error::Checkpoint {
        path: String::new(),
        msg: format!("optimizer state `{name}` is missing"),
    })?;
    if t.shape() != like.shape() || t.dtype() != like.dtype() {
        return Err(dynn_core::Error::Checkpoint {
            path: String::new(),
            msg: format!(
                "optimizer state `{name}` is {:?} {}, the parameter is {:?} {}",
                t.dtype(),
                t.shape(),
                like.dtype(),
                like.shape()
            ),
        });
    }
    let out = state_like(like)?;
    let _g = dynn_core::no_grad();
    // A loaded state is on the CPU: copy it onto the parameter's device.
    out.assign_(&t.to_device(like.device())?)?;
    Ok(out)
}
