//! The Mixture-of-Experts transformer language model.

use super::config::MoeConfig;
use super::layer::MoeLayer;
use super::stats::MoeStats;
use crate::nn::{
    AttentionMask, Dropout, Embedding, Forward, LayerNorm, Linear, Module, MultiHeadAttention,
    Param, ParamBuilder,
};
use crate::rng::SeedStream;
use dynn_core::{Error, Result, Tensor};
use dynn_ops::prelude::*;

/// A pre-norm transformer block whose feed-forward is a [`MoeLayer`]:
/// `h = x + attn(ln1(x))`, then `h + moe(ln2(h))`.
#[derive(Clone, Debug)]
pub struct MoeBlock {
    /// Norm before attention.
    pub ln1: LayerNorm,
    /// Causal self-attention.
    pub attn: MultiHeadAttention,
    /// Norm before the experts.
    pub ln2: LayerNorm,
    /// The Mixture-of-Experts feed-forward.
    pub moe: MoeLayer,
    /// Dropout on both residual branches (training only).
    pub dropout: Option<Dropout>,
}

impl MoeBlock {
    /// A block under `b` (`ln1`, `attn`, `ln2`, `moe`).
    pub fn new(b: &ParamBuilder, cfg: &MoeConfig, seeds: &SeedStream) -> Result<Self> {
        let mut attn = MultiHeadAttention::new(&b.pp("attn"), cfg.dim, cfg.heads)?;
        let mut dropout = None;
        if cfg.dropout > 0.0 {
            attn = attn.with_dropout(cfg.dropout, seeds.clone())?;
            dropout = Some(Dropout::new(cfg.dropout, seeds.clone())?);
        }
        Ok(MoeBlock {
            ln1: LayerNorm::new(&b.pp("ln1"), cfg.dim)?,
            attn,
            ln2: LayerNorm::new(&b.pp("ln2"), cfg.dim)?,
            moe: MoeLayer::new(
                &b.pp("moe"),
                cfg.dim,
                cfg.experts,
                cfg.expert_hidden,
                cfg.top_k,
                cfg.capacity_factor,
            )?,
            dropout,
        })
    }

    /// The block on `x` `(batch, seq, dim)` under attention mask `mask` (causal in [`MoeLm`],
    /// built once per forward pass with [`AttentionMask::prepared`]): the output, the layer's
    /// load-balancing loss and its routing recorded into `stats`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &AttentionMask,
        stats: &mut MoeStats,
    ) -> Result<(Tensor, Tensor)> {
        let (b, s, d) = match *x.dims() {
            [b, s, d] => (b, s, d),
            _ => return Err(Error::invalid("MoeBlock", "expected (batch, seq, dim)")),
        };
        let xn = self.ln1.forward(x)?;
        // Without dropout the residual sum is made by the attention's output projection.
        let h = match &self.dropout {
            None => self.attn.forward_residual(&xn, mask, x)?,
            Some(_) => x.add(&self.drop(&self.attn.forward(&xn, mask)?)?)?,
        };
        let tokens = self.ln2.forward(&h)?.reshape((b * s, d))?;
        let out = self.moe.forward(&tokens)?;
        stats.push(&out.routing, b * s, self.moe.top_k);
        let y = out.y.reshape((b, s, d))?;
        Ok((h.add(&self.drop(&y)?)?, out.aux))
    }

    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        match &self.dropout {
            Some(d) => d.forward(x),
            None => Ok(x.clone()),
        }
    }
}

impl Module for MoeBlock {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.ln1.visit_params(f);
        self.attn.visit_params(f);
        self.ln2.visit_params(f);
        self.moe.visit_params(f);
    }
    fn set_train(&mut self, train: bool) {
        self.attn.set_train(train);
        self.dropout.set_train(train);
    }
}

/// What a forward pass of [`MoeLm`] produced.
#[derive(Clone, Debug)]
pub struct MoeOutput {
    /// Next-token logits `(batch, seq, vocab)`.
    pub logits: Tensor,
    /// The load-balancing loss summed over layers (a scalar, unweighted).
    pub aux: Tensor,
    /// The routing statistics.
    pub stats: MoeStats,
}

/// A decoder-only transformer LM whose feed-forwards are Mixture-of-Experts layers: token
/// embedding plus learned positions, `layers` [`MoeBlock`]s with causal attention, a final
/// norm and a linear head.
#[derive(Clone, Debug)]
pub struct MoeLm {
    cfg: MoeConfig,
    /// Token embedding `(vocab, dim)`.
    pub tok: Embedding,
    /// Learned positions `(seq, dim)`.
    pub pos: Embedding,
    /// The blocks.
    pub blocks: Vec<MoeBlock>,
    /// Final norm.
    pub ln_f: LayerNorm,
    /// Head `dim → vocab`.
    pub head: Linear,
}

impl MoeLm {
    /// A model of `cfg` (validated) with parameters from `b` (`tok`, `pos`, `blocks.<i>`,
    /// `ln_f`, `head`) and dropout seeds from `seeds`.
    pub fn new(b: &ParamBuilder, cfg: &MoeConfig, seeds: &SeedStream) -> Result<Self> {
        cfg.validate()?;
        let bb = b.pp("blocks");
        Ok(MoeLm {
            cfg: cfg.clone(),
            tok: Embedding::with_std(&b.pp("tok"), cfg.vocab, cfg.dim, 0.02)?,
            pos: Embedding::with_std(&b.pp("pos"), cfg.seq, cfg.dim, 0.02)?,
            blocks: (0..cfg.layers)
                .map(|i| MoeBlock::new(&bb.pp(i), cfg, seeds))
                .collect::<Result<_>>()?,
            ln_f: LayerNorm::new(&b.pp("ln_f"), cfg.dim)?,
            head: Linear::new(&b.pp("head"), cfg.dim, cfg.vocab)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// Logits, load-balancing loss and routing statistics for token ids `(batch, seq)` (U32
    /// or I64, `seq` at most the configured length).
    pub fn forward_full(&self, ids: &Tensor) -> Result<MoeOutput> {
        let s = match *ids.dims() {
            [b, s] if b > 0 && s > 0 && s <= self.cfg.seq => s,
            _ => {
                return Err(Error::invalid(
                    "MoeLm::forward",
                    format!(
                        "expected ids of shape (batch, seq <= {}), got {}",
                        self.cfg.seq,
                        ids.shape()
                    ),
                ));
            }
        };
        let pos = self.pos.weight.narrow(0, 0, s)?;
        let mut x = self.tok.forward(ids)?.add(&pos)?;
        let mut stats = MoeStats::default();
        let mut aux: Option<Tensor> = None;
        let mask = AttentionMask::Causal.prepared(1, s, s, x.dtype(), x.device())?;
        for block in &self.blocks {
            let (y, a) = block.forward(&x, &mask, &mut stats)?;
            x = y;
            aux = Some(match aux {
                Some(t) => t.add(&a)?,
                None => a,
            });
        }
        let aux = match aux {
            Some(a) => a,
            None => Tensor::zeros((), x.dtype(), x.device())?,
        };
        let logits = self.head.forward(&self.ln_f.forward(&x)?)?;
        Ok(MoeOutput { logits, aux, stats })
    }

    /// Next-token logits `(batch, seq, vocab)` for `ids` `(batch, seq)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_full(ids)?.logits)
    }

    /// The training loss: mean next-token cross-entropy against `targets` `(batch, seq)`
    /// plus `aux_loss_weight` times the load-balancing loss; with the routing statistics.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<(Tensor, MoeStats)> {
        let out = self.forward_full(ids)?;
        let ce = out
            .logits
            .cross_entropy(targets, CrossEntropyOpts::default())?;
        let loss = if self.cfg.aux_loss_weight > 0.0 {
            ce.add(&out.aux.scale(self.cfg.aux_loss_weight)?)?
        } else {
            ce
        };
        Ok((loss, out.stats))
    }
}

impl Module for MoeLm {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.tok.visit_params(f);
        self.pos.visit_params(f);
        self.blocks.visit_params(f);
        self.ln_f.visit_params(f);
        self.head.visit_params(f);
    }
    fn set_train(&mut self, train: bool) {
        self.blocks.set_train(train);
    }
}
