//! `Linear`: `y = x W + b`.

use super::{Forward, Init, Module, Param, ParamBuilder};
use dynn_core::{Result, Tensor};
use dynn_ops::prelude::*;

/// A dense layer with weight `(in, out)` (so `x W` needs no transpose) and optional bias.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Weight, `(in, out)`.
    pub weight: Param,
    /// Bias, `(out,)`.
    pub bias: Option<Param>,
}

impl Linear {
    /// A layer `in_dim → out_dim` with PyTorch's default init (uniform ±1/√in) and a bias.
    pub fn new(b: &ParamBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::with_init(b, in_dim, out_dim, Init::KaimingUniform, true)
    }

    /// A layer without bias.
    pub fn no_bias(b: &ParamBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::with_init(b, in_dim, out_dim, Init::KaimingUniform, false)
    }

    /// A layer with the weight drawn from `init` and an optional zero bias.
    pub fn with_init(
        b: &ParamBuilder,
        in_dim: usize,
        out_dim: usize,
        init: Init,
        bias: bool,
    ) -> Result<Self> {
        let weight = b.param("weight", (in_dim, out_dim), init)?;
        let bias = bias
            .then(|| b.param("bias", out_dim, Init::Const(0.0)))
            .transpose()?;
        Ok(Linear { weight, bias })
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[1]
    }
}

impl Module for Linear {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        f(&self.weight);
        self.bias.visit_params(f);
    }
}

impl Linear {
    /// `act(x W + b)`: with a bias, one op whose output the memory manager can drop and
    /// compute again ([`LinearOps::linear_act`]); the same bits as the forward then `act`.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        by_rows(x, |x| match &self.bias {
            Some(b) => x.linear_act(&self.weight, b, act),
            None => activate(&x.matmul(&self.weight)?, act),
        })
    }

    /// `residual + x W + b`: with a bias, one op ([`LinearOps::add_linear`]), droppable as
    /// [`Self::forward_act`]'s; the same bits as `residual.add(&self.forward(x)?)`.
    /// `residual` has the output's shape.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let residual = match x.rank() {
            1 => residual.unsqueeze(0)?,
            _ => residual.clone(),
        };
        by_rows(x, |x| match &self.bias {
            Some(b) => residual.add_linear(x, &self.weight, b),
            None => residual.add(&x.matmul(&self.weight)?),
        })
    }
}

/// `f` on `x` as a batch of rows: a vector `(in,)` is one row, and its result a vector again.
fn by_rows(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.rank() {
        1 => f(&x.unsqueeze(0)?)?.squeeze(0),
        _ => f(x),
    }
}

/// `act(x)` as the separate element-wise op.
fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Relu => x.relu(),
        Activation::Sigmoid => x.sigmoid(),
        Activation::Tanh => x.tanh(),
    }
}

impl Forward for Linear {
    /// `x W + b` over the last dim of `x` (a vector `(in,)` gives `(out,)`); with a bias, one
    /// fused kernel ([`LinearOps::linear`]), whose output the memory manager can recompute from
    /// the layer's input and parameters.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        by_rows(x, |x| match &self.bias {
            Some(b) => x.linear(&self.weight, b),
            None => x.matmul(&self.weight),
        })
    }
}
