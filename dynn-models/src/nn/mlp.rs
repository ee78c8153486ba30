//! Feed-forward blocks: `Mlp` (Linear → GELU → Linear) and `SwiGlu`.

use super::{Forward, Linear, Module, Param, ParamBuilder};
use dynn_core::{Result, Tensor};
use dynn_ops::prelude::*;

/// `fc2(gelu(fc1(x)))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    /// `dim → hidden`.
    pub fc1: Linear,
    /// `hidden → dim`.
    pub fc2: Linear,
}

impl Mlp {
    /// An MLP `dim → hidden → dim`.
    pub fn new(b: &ParamBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new(&b.pp("fc1"), dim, hidden)?,
            fc2: Linear::new(&b.pp("fc2"), hidden, dim)?,
        })
    }
}

impl Module for Mlp {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.fc1.visit_params(f);
        self.fc2.visit_params(f);
    }
}

impl Mlp {
    /// `residual + forward(x)` (the same bits), the sum made by `fc2` itself (see
    /// [`Linear::forward_residual`]).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward_residual(&self.fc1.forward(x)?.gelu()?, residual)
    }
}

impl Forward for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu()?)
    }
}

/// `w2(silu(w1 x) ⊙ w3 x)` (no biases), the feed-forward of LLaMA-style models.
#[derive(Clone, Debug)]
pub struct SwiGlu {
    /// Gate projection `dim → hidden`.
    pub w1: Linear,
    /// Down projection `hidden → dim`.
    pub w2: Linear,
    /// Up projection `dim → hidden`.
    pub w3: Linear,
}

impl SwiGlu {
    /// A SwiGLU block `dim → hidden → dim`.
    pub fn new(b: &ParamBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(SwiGlu {
            w1: Linear::no_bias(&b.pp("w1"), dim, hidden)?,
            w2: Linear::no_bias(&b.pp("w2"), hidden, dim)?,
            w3: Linear::no_bias(&b.pp("w3"), dim, hidden)?,
        })
    }
}

impl Module for SwiGlu {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.w1.visit_params(f);
        self.w2.visit_params(f);
        self.w3.visit_params(f);
    }
}

impl SwiGlu {
    /// `w1 x`'s SiLU times `w3 x`: the input of `w2`.
    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        self.w1.forward(x)?.silu()?.mul(&self.w3.forward(x)?)
    }

    /// `residual + forward(x)` (the same bits; `w2` has no bias, so a separate sum).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.w2.forward_residual(&self.hidden(x)?, residual)
    }
}

impl Forward for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.w2.forward(&self.hidden(x)?)
    }
}
