//! The pre-norm transformer block.

use super::{
    AttentionMask, Dropout, Forward, LayerNorm, Mlp, Module, MultiHeadAttention, Param,
    ParamBuilder, SwiGlu,
};
use crate::rng::SeedStream;
use dynn_core::{Result, Tensor};
use dynn_ops::prelude::*;

/// The feed-forward half of a [`TransformerBlock`].
#[derive(Clone, Debug)]
pub enum FeedForward {
    /// Linear → GELU → Linear.
    Mlp(Mlp),
    /// SwiGLU (no biases).
    SwiGlu(SwiGlu),
}

impl Module for FeedForward {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        match self {
            FeedForward::Mlp(m) => m.visit_params(f),
            FeedForward::SwiGlu(m) => m.visit_params(f),
        }
    }
    fn set_train(&mut self, train: bool) {
        match self {
            FeedForward::Mlp(m) => m.set_train(train),
            FeedForward::SwiGlu(m) => m.set_train(train),
        }
    }
}

impl FeedForward {
    /// `residual + forward(x)` (the same bits), the sum made by the last projection.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Mlp(m) => m.forward_residual(x, residual),
            FeedForward::SwiGlu(m) => m.forward_residual(x, residual),
        }
    }
}

impl Forward for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Mlp(m) => m.forward(x),
            FeedForward::SwiGlu(m) => m.forward(x),
        }
    }
}

/// A pre-norm transformer block: `x + attn(ln1(x))`, then `+ ff(ln2(·))`, with optional
/// dropout on both residual branches. The fields are public so a model can replace the
/// feed-forward half (e.g. with a Mixture-of-Experts layer): call [`TransformerBlock::attend`]
/// and apply its own layer to `ln2` of the result.
#[derive(Clone, Debug)]
pub struct TransformerBlock {
    /// Norm before attention.
    pub ln1: LayerNorm,
    /// Self-attention.
    pub attn: MultiHeadAttention,
    /// Norm before the feed-forward.
    pub ln2: LayerNorm,
    /// The feed-forward.
    pub ff: FeedForward,
    /// Dropout on each branch's output before the residual add (none by default).
    pub dropout: Option<Dropout>,
}

impl TransformerBlock {
    /// A block of width `dim` with `heads` heads and a GELU [`Mlp`] of width `ff_hidden`;
    /// parameters under `ln1`, `attn`, `ln2`, `ff`.
    pub fn new(b: &ParamBuilder, dim: usize, heads: usize, ff_hidden: usize) -> Result<Self> {
        let ff = FeedForward::Mlp(Mlp::new(&b.pp("ff"), dim, ff_hidden)?);
        Self::with_feed_forward(b, dim, heads, ff)
    }

    /// The same block with a [`SwiGlu`] feed-forward of width `ff_hidden`.
    pub fn swiglu(b: &ParamBuilder, dim: usize, heads: usize, ff_hidden: usize) -> Result<Self> {
        let ff = FeedForward::SwiGlu(SwiGlu::new(&b.pp("ff"), dim, ff_hidden)?);
        Self::with_feed_forward(b, dim, heads, ff)
    }

    /// A block around a feed-forward built by the caller (under `b.pp("ff")` by convention).
    pub fn with_feed_forward(
        b: &ParamBuilder,
        dim: usize,
        heads: usize,
        ff: FeedForward,
    ) -> Result<Self> {
        Ok(TransformerBlock {
            ln1: LayerNorm::new(&b.pp("ln1"), dim)?,
            attn: MultiHeadAttention::new(&b.pp("attn"), dim, heads)?,
            ln2: LayerNorm::new(&b.pp("ln2"), dim)?,
            ff,
            dropout: None,
        })
    }

    /// The same block with residual dropout `p` (in training mode).
    pub fn with_dropout(mut self, p: f64, seeds: SeedStream) -> Result<Self> {
        self.dropout = Some(Dropout::new(p, seeds)?);
        Ok(self)
    }

    /// The model width.
    pub fn dim(&self) -> usize {
        self.attn.dim()
    }

    /// `x + dropout(attn(ln1(x), mask))` for `x` of shape `(batch, seq, dim)`. Without
    /// dropout, the sum is made by the attention's output projection (one op the memory
    /// manager can recompute; the same bits as the separate sum).
    pub fn attend(&self, x: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let h = self.ln1.forward(x)?;
        if self.dropout.is_none() {
            return self.attn.forward_residual(&h, mask, x);
        }
        x.add(&self.drop(&self.attn.forward(&h, mask)?)?)
    }

    /// `x + dropout(ff(ln2(x)))`, the sum made as in [`TransformerBlock::attend`].
    pub fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln2.forward(x)?;
        if self.dropout.is_none() {
            return self.ff.forward_residual(&h, x);
        }
        x.add(&self.drop(&self.ff.forward(&h)?)?)
    }

    /// The whole block: [`TransformerBlock::attend`] then [`TransformerBlock::feed_forward`].
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        self.feed_forward(&self.attend(x, mask)?)
    }

    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        match &self.dropout {
            Some(d) => d.forward(x),
            None => Ok(x.clone()),
        }
    }
}

impl Module for TransformerBlock {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.ln1.visit_params(f);
        self.attn.visit_params(f);
        self.ln2.visit_params(f);
        self.ff.visit_params(f);
    }
    fn set_train(&mut self, train: bool) {
        self.attn.set_train(train);
        self.ff.set_train(train);
        self.dropout.set_train(train);
    }
}
