//! `Embedding`: a lookup table of rows.

use super::{Init, Module, Param, ParamBuilder};
use dynn_core::{Result, Tensor};
use dynn_ops::prelude::*;

/// A `(vocab, dim)` table; `forward(ids)` gathers rows (ids of any shape, i64 or u32).
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The table.
    pub weight: Param,
}

impl Embedding {
    /// A table with entries drawn from N(0, 1), as PyTorch's `nn.Embedding`.
    pub fn new(b: &ParamBuilder, vocab: usize, dim: usize) -> Result<Self> {
        Self::with_std(b, vocab, dim, 1.0)
    }

    /// A table with entries drawn from N(0, std²).
    pub fn with_std(b: &ParamBuilder, vocab: usize, dim: usize, std: f64) -> Result<Self> {
        let weight = b.param("weight", (vocab, dim), Init::Normal { mean: 0.0, std })?;
        Ok(Embedding { weight })
    }

    /// Rows of `ids`: the output has `ids`' shape plus `dim`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.embedding(ids)
    }
}

impl Module for Embedding {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        f(&self.weight)
    }
}
