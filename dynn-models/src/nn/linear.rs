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

impl Forward for Linear {
    /// `x W + b` over the last dim of `x` (a vector `(in,)` gives `(out,)`); with a bias, one
    /// fused kernel ([`MatmulOps::linear`]), whose output the memory manager can recompute from
    /// the layer's input and parameters.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 1 {
            return self.forward(&x.unsqueeze(0)?)?.squeeze(0);
        }
        match &self.bias {
            Some(b) => x.linear(&self.weight, b),
            None => x.matmul(&self.weight),
        }
    }
}
