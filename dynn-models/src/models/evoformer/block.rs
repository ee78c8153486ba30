//! One Evoformer block: the MSA stack (row attention with pair bias, column attention,
//! transition), the outer-product mean into the pair representation, and the pair stack
//! (outgoing and incoming triangle multiplications, transition).

use super::EvoformerConfig;
use super::layers::{GatedAttention, Transition};
use super::pair::{OuterProductMean, Triangle, TriangleMultiplication};
use crate::nn::{Forward, LayerNorm, Linear, Module, Param, ParamBuilder};
use dynn_core::Result;
use dynn_core::Tensor;
use dynn_ops::prelude::*;

/// One Evoformer block; every sub-layer is a residual update.
#[derive(Clone, Debug)]
pub struct EvoformerBlock {
    /// Layer norm of the pair representation before its projection to head biases.
    pub bias_norm: LayerNorm,
    /// The pair bias `pair_dim → heads` (no bias term).
    pub pair_bias: Linear,
    /// MSA row attention (over residues, within each sequence), biased by the pair.
    pub row_attn: GatedAttention,
    /// MSA column attention (over sequences, within each residue).
    pub col_attn: GatedAttention,
    /// MSA transition.
    pub msa_transition: Transition,
    /// MSA → pair.
    pub opm: OuterProductMean,
    /// Triangle update over outgoing edges.
    pub tri_out: TriangleMultiplication,
    /// Triangle update over incoming edges.
    pub tri_in: TriangleMultiplication,
    /// Pair transition.
    pub pair_transition: Transition,
}

impl EvoformerBlock {
    /// A block of the sizes in `cfg`.
    pub fn new(b: &ParamBuilder, cfg: &EvoformerConfig) -> Result<Self> {
        let (cm, cz) = (cfg.msa_dim, cfg.pair_dim);
        Ok(EvoformerBlock {
            bias_norm: LayerNorm::new(&b.pp("bias_norm"), cz)?,
            pair_bias: Linear::no_bias(&b.pp("pair_bias"), cz, cfg.heads)?,
            row_attn: GatedAttention::new(&b.pp("row_attn"), cm, cfg.heads)?,
            col_attn: GatedAttention::new(&b.pp("col_attn"), cm, cfg.heads)?,
            msa_transition: Transition::new(&b.pp("msa_transition"), cm, cfg.transition)?
                .chunked(cfg.chunk_bytes),
            opm: OuterProductMean::new(&b.pp("opm"), cm, cz, cfg.opm_dim)?.chunked(cfg.chunk_bytes),
            tri_out: TriangleMultiplication::new(
                &b.pp("tri_out"),
                Triangle::Outgoing,
                cz,
                cfg.tri_dim,
            )?,
            tri_in: TriangleMultiplication::new(
                &b.pp("tri_in"),
                Triangle::Incoming,
                cz,
                cfg.tri_dim,
            )?,
            pair_transition: Transition::new(&b.pp("pair_transition"), cz, cfg.transition)?
                .chunked(cfg.chunk_bytes),
        })
    }

    /// Updates the MSA `m` `(batch, depth, len, msa_dim)` and the pair `z`
    /// `(batch, len, len, pair_dim)`.
    pub fn forward(&self, m: &Tensor, z: &Tensor) -> Result<(Tensor, Tensor)> {
        // (b, i, j, h) → (b, 1, h, i, j): one bias per head, shared by every sequence.
        let bias = self
            .pair_bias
            .forward(&self.bias_norm.forward(z)?)?
            .permute(&[0, 3, 1, 2])?
            .unsqueeze(1)?;
        // Residual updates added by the layers' last projections where they end in one (the
        // sums are then ops the memory manager can recompute; see `Linear::forward_residual`).
        let m = self.row_attn.forward_residual(m, Some(&bias))?;
        let mt = m.transpose(1, 2)?;
        let m = m.add(&self.col_attn.forward(&mt, None)?.transpose(1, 2)?)?;
        let m = self.msa_transition.forward_residual(&m)?;
        let z = self.opm.forward_residual(&m, z)?;
        let z = self.tri_out.forward_residual(&z)?;
        let z = self.tri_in.forward_residual(&z)?;
        let z = self.pair_transition.forward_residual(&z)?;
        Ok((m, z))
    }
}

impl Module for EvoformerBlock {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.bias_norm.visit_params(f);
        self.pair_bias.visit_params(f);
        self.row_attn.visit_params(f);
        self.col_attn.visit_params(f);
        self.msa_transition.visit_params(f);
        self.opm.visit_params(f);
        self.tri_out.visit_params(f);
        self.tri_in.visit_params(f);
        self.pair_transition.visit_params(f);
    }
}
