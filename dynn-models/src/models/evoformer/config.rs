//! The sizes of the Evoformer-lite and of its protein task.

use crate::data::ProteinConfig;
use dynn_core::{Error, Result};

/// The settings of an [`Evoformer`](super::Evoformer) and of the synthetic protein data it
/// trains on. The defaults learn in about a minute on two CPU cores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvoformerConfig {
    /// Width of the MSA representation (AlphaFold's `c_m`).
    pub msa_dim: usize,
    /// Width of the pair representation (`c_z`).
    pub pair_dim: usize,
    /// Attention heads of the MSA row and column attentions (must divide `msa_dim`).
    pub heads: usize,
    /// Evoformer blocks per iteration.
    pub blocks: usize,
    /// The most iterations of the whole network a training step draws (1 = no recycling).
    pub max_recycles: usize,
    /// Residues per chain.
    pub len: usize,
    /// Sequences per MSA.
    pub msa_depth: usize,
    /// Distogram bins.
    pub bins: usize,
    /// Channels of the outer-product mean's projections (its output has `opm_dim²` features
    /// per pair before the final projection).
    pub opm_dim: usize,
    /// Hidden channels of the triangle multiplicative updates.
    pub tri_dim: usize,
    /// Expansion factor of the MSA and pair transitions.
    pub transition: usize,
    /// Relative positions are clipped to `-max_rel..=max_rel` before their embedding.
    pub max_rel: usize,
    /// Held-out proteins the evaluation scores.
    pub eval_samples: usize,
    /// AlphaFold-style chunking: the outer-product mean and the transitions run on chunks of
    /// rows whose widest intermediate (the outer product, the expanded hidden layer) stays
    /// within this many bytes. `None`: one chunk.
    pub chunk_bytes: Option<usize>,
}

impl Default for EvoformerConfig {
    fn default() -> Self {
        EvoformerConfig {
            msa_dim: 16,
            pair_dim: 16,
            heads: 4,
            blocks: 2,
            max_recycles: 4,
            len: 24,
            msa_depth: 8,
            bins: 8,
            opm_dim: 8,
            tri_dim: 16,
            transition: 2,
            max_rel: 16,
            eval_samples: 64,
            chunk_bytes: None,
        }
    }
}

impl EvoformerConfig {
    /// An error naming the first setting out of range: every size must be positive,
    /// `msa_dim` a multiple of `heads`, `len >= 2` and `bins >= 2`.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("msa_dim", self.msa_dim),
            ("pair_dim", self.pair_dim),
            ("heads", self.heads),
            ("blocks", self.blocks),
            ("max_recycles", self.max_recycles),
            ("msa_depth", self.msa_depth),
            ("opm_dim", self.opm_dim),
            ("tri_dim", self.tri_dim),
            ("transition", self.transition),
            ("max_rel", self.max_rel),
            ("eval_samples", self.eval_samples),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::invalid(
                    "EvoformerConfig",
                    format!("{name} must be at least 1"),
                ));
            }
        }
        if self.msa_dim % self.heads != 0 {
            return Err(Error::invalid(
                "EvoformerConfig",
                format!(
                    "msa_dim {} is not a multiple of heads {}",
                    self.msa_dim, self.heads
                ),
            ));
        }
        if self.chunk_bytes == Some(0) {
            return Err(Error::invalid(
                "EvoformerConfig",
                "chunk_bytes must be at least 1 (None: no chunking)",
            ));
        }
        if self.len < 2 || self.bins < 2 {
            return Err(Error::invalid(
                "EvoformerConfig",
                format!(
                    "need len >= 2 and bins >= 2, got len {} and bins {}",
                    self.len, self.bins
                ),
            ));
        }
        Ok(())
    }

    /// The protein data of this size.
    pub fn protein(&self) -> ProteinConfig {
        ProteinConfig {
            len: self.len,
            msa_depth: self.msa_depth,
            bins: self.bins,
        }
    }
}
