//! Multi-head attention, its masks, and the scaled dot-product kernel it is built on.

use super::{Dropout, Forward, Linear, Module, Param, ParamBuilder};
use crate::rng::SeedStream;
use dynn_core::{DType, Device, Error, Result, Shape, Tensor};
use dynn_ops::prelude::*;

/// The additive bias a masked score receives: large enough that `exp` underflows to exactly 0
/// after the softmax's max subtraction, small enough to stay finite in the dtype (so a row
/// whose keys are all masked gives a uniform distribution, not NaN).
pub fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -3.0e4,
        _ => -1.0e9,
    }
}

/// Which keys each query may attend to.
#[derive(Clone, Debug, Default)]
pub enum AttentionMask {
    /// Every query sees every key.
    #[default]
    None,
    /// Query `i` sees keys `j <= i` (for cross-attention with `seq_k > seq_q`, bottom-right
    /// aligned: keys `j <= i + seq_k - seq_q`).
    Causal,
    /// A `(batch, seq_k)` tensor (any dtype, usually U32): nonzero marks a real token, 0 a
    /// padding token. Padding keys are hidden from every query; padding queries still produce
    /// an output (over the real keys), which the caller ignores or masks in its loss.
    Padding(Tensor),
    /// [`AttentionMask::Causal`] and [`AttentionMask::Padding`] together.
    CausalPadding(Tensor),
    /// An additive bias built already, which must broadcast to the scores `(batch, heads,
    /// seq_q, seq_k)`: what [`AttentionMask::prepared`] makes once per forward pass for every
    /// layer to share.
    Bias(Tensor),
}

impl AttentionMask {
    /// The additive bias for scores of shape `(batch, heads, seq_q, seq_k)`: 0 where attending
    /// is allowed, [`mask_value`] where not. Shaped `(batch or 1, 1, seq_q or 1, seq_k)` so it
    /// broadcasts; `None` for [`AttentionMask::None`]. Errors when a padding tensor is not
    /// `(batch, seq_k)` or a causal mask has more queries than keys.
    pub fn bias(
        &self,
        batch: usize,
        seq_q: usize,
        seq_k: usize,
        dtype: DType,
        device: Device,
    ) -> Result<Option<Tensor>> {
        let causal = match self {
            AttentionMask::None => return Ok(None),
            AttentionMask::Bias(t) => return Ok(Some(t.clone())),
            AttentionMask::Causal | AttentionMask::CausalPadding(_) => {
                Some(causal_bias(seq_q, seq_k, dtype, device)?)
            }
            AttentionMask::Padding(_) => None,
        };
        let padding = match self {
            AttentionMask::Padding(p) | AttentionMask::CausalPadding(p) => {
                Some(padding_bias(p, batch, seq_k, dtype)?)
            }
            _ => None,
        };
        Ok(match (causal, padding) {
            (Some(c), Some(p)) => Some(c.add(&p)?),
            (c, p) => c.or(p),
        })
    }

    /// The same mask with its bias built once ([`AttentionMask::Bias`]), to pass to every layer
    /// of a forward pass: the layers then share one bias instead of building one each, and
    /// each layer's attention weights stay recomputable from it (a bias built per layer is
    /// released right after its layer, and with it the weights' recipe).
    pub fn prepared(
        &self,
        batch: usize,
        seq_q: usize,
        seq_k: usize,
        dtype: DType,
        device: Device,
    ) -> Result<AttentionMask> {
        Ok(match self.bias(batch, seq_q, seq_k, dtype, device)? {
            Some(t) => AttentionMask::Bias(t),
            None => AttentionMask::None,
        })
    }
}

/// `(1, 1, seq_q, seq_k)`: [`mask_value`] where key `j > i + seq_k - seq_q`.
fn causal_bias(seq_q: usize, seq_k: usize, dtype: DType, device: Device) -> Result<Tensor> {
    if seq_q > seq_k {
        return Err(Error::invalid(
            "AttentionMask::Causal",
            format!(
                "a causal mask needs at least as many keys as queries, got {seq_q} queries and {seq_k} keys"
            ),
        ));
    }
    let shift = seq_k - seq_q;
    let hidden: Vec<u8> = (0..seq_q)
        .flat_map(|i| (0..seq_k).map(move |j| u8::from(j > i + shift)))
        .collect();
    let hidden = Tensor::from_vec(hidden, (1, 1, seq_q, seq_k), device)?;
    Tensor::zeros((1, 1, seq_q, seq_k), dtype, device)?.masked_fill(&hidden, mask_value(dtype))
}

/// `(batch, 1, 1, seq_k)`: [`mask_value`] where `pad` is 0.
fn padding_bias(pad: &Tensor, batch: usize, seq_k: usize, dtype: DType) -> Result<Tensor> {
    if pad.dims() != [batch, seq_k] {
        return Err(Error::shape_mismatch(
            "AttentionMask::Padding (mask vs (batch, seq_k))",
            pad.shape(),
            &Shape::from(vec![batch, seq_k]),
        ));
    }
    let hidden = pad
        .compare_scalar(0.0, CmpOp::Eq)?
        .reshape((batch, 1, 1, seq_k))?;
    Tensor::zeros((batch, 1, 1, seq_k), dtype, pad.device())?
        .masked_fill(&hidden, mask_value(dtype))
}

/// `softmax(q kᵀ / √d + bias) v` over the last two dims, batch dims broadcasting.
///
/// `q` is `(..., seq_q, d)`, `k` is `(..., seq_k, d)`, `v` is `(..., seq_k, d_v)`; `bias`
/// (e.g. from [`AttentionMask::bias`], or an Evoformer pair bias) must broadcast to the
/// scores `(..., seq_q, seq_k)`. Returns `(..., seq_q, d_v)`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    attention_probs(q, k, bias, None)?.matmul(v)
}

/// The attention weights `softmax(q kᵀ / √d + bias)` (one op, [`AttentionOps::attention_probs`],
/// so that the memory manager can recompute them from `q`, `k` and the bias), dropout applied
/// when given.
fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    bias: Option<&Tensor>,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let d = *q.dims().last().ok_or_else(|| {
        Error::invalid(
            "scaled_dot_product_attention",
            "q must have rank >= 2, got a scalar",
        )
    })?;
    let probs = q.attention_probs(k, bias, 1.0 / (d.max(1) as f64).sqrt())?;
    match dropout {
        Some(dr) => dr.forward(&probs),
        None => Ok(probs),
    }
}

/// Multi-head attention: `o(concat_h softmax(q_h k_hᵀ / √d_h + mask) v_h)` with `q, k, v, o`
/// dense layers (with biases) of width `dim = heads · head_dim`.
#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    /// Query projection `dim → dim`.
    pub q: Linear,
    /// Key projection `dim → dim`.
    pub k: Linear,
    /// Value projection `dim → dim`.
    pub v: Linear,
    /// Output projection `dim → dim`.
    pub o: Linear,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Dropout on the attention weights (none by default).
    pub dropout: Option<Dropout>,
}

impl MultiHeadAttention {
    /// Attention of width `dim` split into `heads` heads (`dim % heads` must be 0); the
    /// projections are `q`, `k`, `v`, `o` under `b`.
    pub fn new(b: &ParamBuilder, dim: usize, heads: usize) -> Result<Self> {
        if heads == 0 || dim % heads != 0 {
            return Err(Error::invalid(
                "MultiHeadAttention::new",
                format!("dim {dim} is not a positive multiple of heads {heads}"),
            ));
        }
        Ok(MultiHeadAttention {
            q: Linear::new(&b.pp("q"), dim, dim)?,
            k: Linear::new(&b.pp("k"), dim, dim)?,
            v: Linear::new(&b.pp("v"), dim, dim)?,
            o: Linear::new(&b.pp("o"), dim, dim)?,
            heads,
            head_dim: dim / heads,
            dropout: None,
        })
    }

    /// The same attention with dropout `p` on the attention weights (in training mode).
    pub fn with_dropout(mut self, p: f64, seeds: SeedStream) -> Result<Self> {
        self.dropout = Some(Dropout::new(p, seeds)?);
        Ok(self)
    }

    /// The model width `heads · head_dim`.
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Self-attention over `x` of shape `(batch, seq, dim)`; returns `(batch, seq, dim)`.
    pub fn forward(&self, x: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        self.forward_kv(x, x, mask)
    }

    /// Cross-attention: queries from `q_in` `(batch, seq_q, dim)`, keys and values from
    /// `kv_in` `(batch, seq_k, dim)`; a padding mask is `(batch, seq_k)`. Returns
    /// `(batch, seq_q, dim)`.
    pub fn forward_kv(
        &self,
        q_in: &Tensor,
        kv_in: &Tensor,
        mask: &AttentionMask,
    ) -> Result<Tensor> {
        self.o.forward(&self.context(q_in, kv_in, mask)?)
    }

    /// `residual + forward(x, mask)` (the same bits), the sum made by the output projection
    /// itself: one op whose output the memory manager can drop and compute again
    /// (see [`Linear::forward_residual`]). `residual` is `(batch, seq, dim)`.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        mask: &AttentionMask,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.o
            .forward_residual(&self.context(x, x, mask)?, residual)
    }

    /// The heads' outputs merged, `(batch, seq_q, dim)`, before the output projection.
    fn context(&self, q_in: &Tensor, kv_in: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        let (b, sq) = self.check_input("MultiHeadAttention (query input)", q_in)?;
        let (bk, sk) = self.check_input("MultiHeadAttention (key/value input)", kv_in)?;
        if b != bk {
            return Err(Error::shape_mismatch(
                "MultiHeadAttention (query vs key/value batch)",
                q_in.shape(),
                kv_in.shape(),
            ));
        }
        let q = self.split_heads(&self.q.forward(q_in)?, b, sq)?;
        let k = self.split_heads(&self.k.forward(kv_in)?, b, sk)?;
        let v = self.split_heads(&self.v.forward(kv_in)?, b, sk)?;
        let bias = mask.bias(b, sq, sk, q_in.dtype(), q_in.device())?;
        let probs = attention_probs(&q, &k, bias.as_ref(), self.dropout.as_ref())?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, sq, self.dim()))
    }

    /// `(batch, seq)` of a `(batch, seq, dim)` input, or an error naming `op`.
    fn check_input(&self, op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
        match *x.dims() {
            [b, s, d] if d == self.dim() => Ok((b, s)),
            _ => Err(Error::invalid(
                op,
                format!(
                    "expected (batch, seq, {}), got shape {}",
                    self.dim(),
                    x.shape()
                ),
            )),
        }
    }

    /// `(b, s, dim)` → `(b, heads, s, head_dim)`.
    fn split_heads(&self, x: &Tensor, b: usize, s: usize) -> Result<Tensor> {
        x.reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)
    }
}

impl Module for MultiHeadAttention {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.q.visit_params(f);
        self.k.visit_params(f);
        self.v.visit_params(f);
        self.o.visit_params(f);
    }
    fn set_train(&mut self, train: bool) {
        self.dropout.set_train(train);
    }
}
