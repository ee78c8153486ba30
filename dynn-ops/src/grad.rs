//! `backward()` on tensors: runs the core's tape engine with dynn-ops' addition.

use crate::ops::binary::BinaryOps;
use dynn_core::{Error, Result, Tensor, run_backward};

/// Reverse-mode differentiation.
pub trait Backward {
    /// Accumulates d(self)/d(leaf) into every leaf that requires grad. `self` must be a scalar.
    fn backward(&self) -> Result<()>;
    /// Like [`Backward::backward`] with an explicit seed gradient of `self`'s shape.
    fn backward_with(&self, seed: Tensor) -> Result<()>;
}

impl Backward for Tensor {
    fn backward(&self) -> Result<()> {
        if self.elem_count() != 1 {
            return Err(Error::Autograd(format!(
                "backward() needs a scalar (one element), got shape {}; use backward_with(seed)",
                self.shape()
            )));
        }
        self.backward_with(self.ones_like()?)
    }
    fn backward_with(&self, seed: Tensor) -> Result<()> {
        run_backward(self, seed, &|a, b| a.add(b))
    }
}
