//! `LayerNorm` and `RMSNorm` over the last dim (fused kernels from dynn-ops).

use super::{Forward, Init, Module, Param, ParamBuilder};
use dynn_core::{Result, Tensor};
use dynn_ops::prelude::*;

/// Layer normalization with learned scale and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale, `(dim,)`, initialised to 1.
    pub weight: Param,
    /// Shift, `(dim,)`, initialised to 0.
    pub bias: Param,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// A layer norm over a last dim of `dim` with eps 1e-5.
    pub fn new(b: &ParamBuilder, dim: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: b.param("weight", dim, Init::Const(1.0))?,
            bias: b.param("bias", dim, Init::Const(0.0))?,
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        f(&self.weight);
        f(&self.bias);
    }
}

impl Forward for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// RMS normalization with a learned scale.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Scale, `(dim,)`, initialised to 1.
    pub weight: Param,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// An RMS norm over a last dim of `dim` with eps 1e-6.
    pub fn new(b: &ParamBuilder, dim: usize) -> Result<Self> {
        Ok(RmsNorm {
            weight: b.param("weight", dim, Init::Const(1.0))?,
            eps: 1e-6,
        })
    }
}

impl Module for RmsNorm {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        f(&self.weight);
    }
}

impl Forward for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(Some(&self.weight), self.eps)
    }
}
