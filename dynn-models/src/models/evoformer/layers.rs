//! The two layers the MSA and pair stacks share: gated multi-head attention along one axis
//! of a 2-D grid of embeddings (with an optional additive bias), and the transition MLP.

use super::chunk::{map_chunks, rows_per_chunk};
use crate::nn::{
    Forward, LayerNorm, Linear, Module, Param, ParamBuilder, scaled_dot_product_attention,
};
use dynn_core::{Error, Result, Tensor};
use dynn_ops::prelude::*;

/// AlphaFold's gated self-attention over the third axis of `(batch, rows, cols, dim)`: every
/// row attends over its columns independently. Layer-normed input; query, key and value
/// projections; a sigmoid gate on each head's output; an output projection.
#[derive(Clone, Debug)]
pub struct GatedAttention {
    /// Input layer norm.
    pub norm: LayerNorm,
    /// Query projection (no bias).
    pub q: Linear,
    /// Key projection (no bias).
    pub k: Linear,
    /// Value projection (no bias).
    pub v: Linear,
    /// Gate projection (sigmoid applied).
    pub gate: Linear,
    /// Output projection `dim → dim`.
    pub out: Linear,
    /// Number of heads.
    pub heads: usize,
}

impl GatedAttention {
    /// Attention of width `dim` in `heads` heads (`dim % heads` must be 0).
    pub fn new(b: &ParamBuilder, dim: usize, heads: usize) -> Result<Self> {
        if heads == 0 || dim % heads != 0 {
            return Err(Error::invalid(
                "GatedAttention::new",
                format!("dim {dim} is not a positive multiple of heads {heads}"),
            ));
        }
        Ok(GatedAttention {
            norm: LayerNorm::new(&b.pp("norm"), dim)?,
            q: Linear::no_bias(&b.pp("q"), dim, dim)?,
            k: Linear::no_bias(&b.pp("k"), dim, dim)?,
            v: Linear::no_bias(&b.pp("v"), dim, dim)?,
            gate: Linear::new(&b.pp("gate"), dim, dim)?,
            out: Linear::new(&b.pp("out"), dim, dim)?,
            heads,
        })
    }

    /// The update for `x` of shape `(batch, rows, cols, dim)`: attention over `cols` within
    /// each row. `bias`, when given, is added to the logits `(batch, rows, heads, cols, cols)`
    /// and must broadcast to them (the pair bias is `(batch, 1, heads, cols, cols)`).
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.out.forward(&self.gated_context(x, bias)?)
    }

    /// `x` plus its update (`x + forward(x, bias)`, the same bits), the residual added by the
    /// output projection itself: one op whose output the memory manager can drop and compute
    /// again from tensors the backward pass keeps.
    pub fn forward_residual(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.out.forward_residual(&self.gated_context(x, bias)?, x)
    }

    /// The heads' gated outputs, `(batch, rows, cols, dim)`, before the output projection.
    fn gated_context(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let &[b, r, c, d] = x.dims() else {
            return Err(Error::invalid(
                "GatedAttention",
                format!("expected (batch, rows, cols, dim), got {}", x.shape()),
            ));
        };
        let (h, hd) = (self.heads, d / self.heads);
        let xn = self.norm.forward(x)?;
        let heads = |lin: &Linear| {
            lin.forward(&xn)?
                .reshape(vec![b, r, c, h, hd])?
                .permute(&[0, 1, 3, 2, 4])
        };
        let g = self
            .gate
            .forward_act(&xn, Activation::Sigmoid)?
            .reshape(vec![b, r, c, h, hd])?;
        // The heads' outputs seen in (batch, rows, cols, heads, head_dim) order and gated
        // there: the product comes out contiguous in that order, so merging the heads is a
        // view, and no copy of the heads' outputs (whose recipe would read the attention's
        // released output) is made.
        scaled_dot_product_attention(&heads(&self.q)?, &heads(&self.k)?, &heads(&self.v)?, bias)?
            .permute(&[0, 1, 3, 2, 4])?
            .mul(&g)?
            .reshape((b, r, c, d))
    }
}

impl Module for GatedAttention {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.norm.visit_params(f);
        self.q.visit_params(f);
        self.k.visit_params(f);
        self.v.visit_params(f);
        self.gate.visit_params(f);
        self.out.visit_params(f);
    }
}

/// The transition: layer norm, `dim → n·dim`, ReLU, `n·dim → dim`.
#[derive(Clone, Debug)]
pub struct Transition {
    /// Input layer norm.
    pub norm: LayerNorm,
    /// The expansion.
    pub up: Linear,
    /// The projection back.
    pub down: Linear,
    /// The most bytes one chunk's expanded hidden layer may take (`None`: one chunk).
    pub chunk_bytes: Option<usize>,
}

impl Transition {
    /// A transition of width `dim` expanded `n` times.
    pub fn new(b: &ParamBuilder, dim: usize, n: usize) -> Result<Self> {
        Ok(Transition {
            norm: LayerNorm::new(&b.pp("norm"), dim)?,
            up: Linear::new(&b.pp("up"), dim, n * dim)?,
            down: Linear::new(&b.pp("down"), n * dim, dim)?,
            chunk_bytes: None,
        })
    }

    /// The same layer applied to chunks of rows (the second axis) whose expanded hidden
    /// layer takes at most `chunk_bytes` each (`None`: one chunk).
    pub fn chunked(mut self, chunk_bytes: Option<usize>) -> Self {
        self.chunk_bytes = chunk_bytes;
        self
    }

    /// The expanded hidden layer `relu(up(norm(x)))`, one op after the norm.
    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        self.up
            .forward_act(&self.norm.forward(x)?, Activation::Relu)
    }

    /// `x` plus its update (`x + forward(x)`, the same bits), the residual added by the
    /// projection back itself (see [`GatedAttention::forward_residual`]).
    pub fn forward_residual(&self, x: &Tensor) -> Result<Tensor> {
        self.by_chunks(x, |x| self.down.forward_residual(&self.hidden(x)?, x))
    }

    /// `f` over chunks of rows (the second axis of a tensor of rank 3 or more) whose hidden
    /// layer takes at most `chunk_bytes` each, concatenated.
    fn by_chunks(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dims = x.dims();
        if self.chunk_bytes.is_none() || dims.len() < 3 {
            return f(x);
        }
        let rows = dims[1];
        let hidden = self.up.weight.dims().get(1).copied().unwrap_or(0);
        let row_bytes = x.elem_count() / rows.max(1) / dims[dims.len() - 1].max(1)
            * hidden
            * x.dtype().size_in_bytes();
        let chunk = rows_per_chunk(self.chunk_bytes, row_bytes, rows);
        map_chunks(rows, chunk, 1, |i0, r| f(&x.narrow(1, i0, r)?))
    }
}

impl Module for Transition {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.norm.visit_params(f);
        self.up.visit_params(f);
        self.down.visit_params(f);
    }
}

impl Forward for Transition {
    /// The update for `x` (any leading shape; chunked along the second axis of a tensor of
    /// rank 3 or more).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.by_chunks(x, |x| self.down.forward(&self.hidden(x)?))
    }
}
