//! The sizes and routing settings of the Mixture-of-Experts language model.

use dynn_core::{Error, Result};

/// Sizes and routing settings of [`MoeLm`](super::MoeLm).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Vocabulary size (for [`MoeTask`](super::MoeTask): the BPE vocabulary to train, at
    /// least 256; the model then uses the tokenizer's actual size).
    pub vocab: usize,
    /// Model width.
    pub dim: usize,
    /// Attention heads (`dim % heads == 0`).
    pub heads: usize,
    /// Transformer blocks, each with a Mixture-of-Experts feed-forward.
    pub layers: usize,
    /// Experts per layer (typically 8–64).
    pub experts: usize,
    /// Experts each token is routed to: 1 (Switch) or 2.
    pub top_k: usize,
    /// Hidden width of one expert's MLP.
    pub expert_hidden: usize,
    /// Capacity per expert is `ceil(capacity_factor · tokens · top_k / experts)`; tokens
    /// routed to a full expert are dropped (they pass through the residual only).
    pub capacity_factor: f64,
    /// Weight of the Switch load-balancing loss added to the cross-entropy.
    pub aux_loss_weight: f64,
    /// Tokens per sequence (also the number of learned positions).
    pub seq: usize,
    /// Dropout on attention weights and residual branches (training only).
    pub dropout: f64,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            vocab: 512,
            dim: 64,
            heads: 4,
            layers: 2,
            experts: 8,
            top_k: 2,
            expert_hidden: 128,
            capacity_factor: 1.25,
            aux_loss_weight: 0.01,
            seq: 64,
            dropout: 0.0,
        }
    }
}

impl MoeConfig {
    /// Checks every field: positive sizes, `dim` a multiple of `heads`, `top_k` 1 or 2 and
    /// at most `experts`, a positive finite capacity factor, a non-negative finite aux
    /// weight and dropout in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("MoeConfig", msg));
        for (name, v) in [
            ("vocab", self.vocab),
            ("dim", self.dim),
            ("heads", self.heads),
            ("layers", self.layers),
            ("experts", self.experts),
            ("expert_hidden", self.expert_hidden),
            ("seq", self.seq),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.vocab < 2 {
            return bad(format!("vocab must be at least 2, got {}", self.vocab));
        }
        if self.dim % self.heads != 0 {
            return bad(format!(
                "dim {} is not a multiple of heads {}",
                self.dim, self.heads
            ));
        }
        if !(1..=2).contains(&self.top_k) {
            return bad(format!("top_k must be 1 or 2, got {}", self.top_k));
        }
        if self.top_k > self.experts {
            return bad(format!(
                "top_k {} exceeds the number of experts {}",
                self.top_k, self.experts
            ));
        }
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            return bad(format!(
                "capacity_factor must be positive and finite, got {}",
                self.capacity_factor
            ));
        }
        if !(self.aux_loss_weight.is_finite() && self.aux_loss_weight >= 0.0) {
            return bad(format!(
                "aux_loss_weight must be non-negative and finite, got {}",
                self.aux_loss_weight
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is outside [0, 1)", self.dropout));
        }
        Ok(())
    }
}
