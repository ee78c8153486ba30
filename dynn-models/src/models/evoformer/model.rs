//! The Evoformer-lite: input embeddings, recycling embeddings, the block stack and the
//! distogram head, with the recycling loop around them.

use super::{EvoformerBlock, EvoformerConfig};
use crate::data::protein::MSA_VOCAB;
use crate::nn::{Embedding, Forward, LayerNorm, Linear, Module, Param, ParamBuilder};
use dynn_core::{DType, Error, Result, Tensor, no_grad};
use dynn_ops::prelude::*;

/// What one iteration hands to the next: the first MSA row and the pair representation.
#[derive(Clone, Debug)]
pub struct Recycled {
    /// The first row of the MSA representation, `(batch, 1, len, msa_dim)`.
    pub msa_first: Tensor,
    /// The pair representation, `(batch, len, len, pair_dim)`.
    pub pair: Tensor,
}

impl Recycled {
    /// The same tensors cut from the graph (no gradient flows back through them).
    pub fn detach(&self) -> Recycled {
        Recycled {
            msa_first: self.msa_first.detach(),
            pair: self.pair.detach(),
        }
    }
}

/// An AlphaFold-style Evoformer-lite predicting a distogram from an MSA.
#[derive(Clone, Debug)]
pub struct Evoformer {
    /// The sizes.
    pub cfg: EvoformerConfig,
    /// MSA token embedding `2·MSA_VOCAB → msa_dim`: a token and whether it differs from the
    /// target's at its column (the mutation pattern the outer-product mean correlates).
    pub msa_emb: Embedding,
    /// Embedding of the target (first-row) token, added to every MSA row.
    pub target_emb: Embedding,
    /// Left target embedding of the outer sum `z_ij = left_i + right_j`.
    pub left_emb: Embedding,
    /// Right target embedding of the outer sum.
    pub right_emb: Embedding,
    /// Relative-position embedding: `clip(j - i, ±max_rel)` → `pair_dim`.
    pub relpos: Embedding,
    /// Layer norm of the recycled first MSA row.
    pub recycle_msa: LayerNorm,
    /// Layer norm of the recycled pair representation.
    pub recycle_pair: LayerNorm,
    /// The Evoformer blocks.
    pub blocks: Vec<EvoformerBlock>,
    /// Layer norm before the distogram head.
    pub head_norm: LayerNorm,
    /// The distogram head `pair_dim → bins`.
    pub head: Linear,
}

impl Evoformer {
    /// A model of the sizes in `cfg` (validated), with parameters from `b`.
    pub fn new(b: &ParamBuilder, cfg: &EvoformerConfig) -> Result<Self> {
        cfg.validate()?;
        let (cm, cz) = (cfg.msa_dim, cfg.pair_dim);
        let emb = |name: &str, n: usize, d: usize| Embedding::with_std(&b.pp(name), n, d, 0.5);
        Ok(Evoformer {
            cfg: cfg.clone(),
            msa_emb: emb("msa_emb", 2 * MSA_VOCAB, cm)?,
            target_emb: emb("target_emb", MSA_VOCAB, cm)?,
            left_emb: emb("left_emb", MSA_VOCAB, cz)?,
            right_emb: emb("right_emb", MSA_VOCAB, cz)?,
            relpos: emb("relpos", 2 * cfg.max_rel + 1, cz)?,
            recycle_msa: LayerNorm::new(&b.pp("recycle_msa"), cm)?,
            recycle_pair: LayerNorm::new(&b.pp("recycle_pair"), cz)?,
            blocks: (0..cfg.blocks)
                .map(|i| EvoformerBlock::new(&b.pp("blocks").pp(i), cfg))
                .collect::<Result<_>>()?,
            head_norm: LayerNorm::new(&b.pp("head_norm"), cz)?,
            head: Linear::new(&b.pp("head"), cz, cfg.bins)?,
        })
    }

    /// `(batch, depth, len)` of an MSA of tokens, or an error.
    fn check_msa(&self, msa: &Tensor) -> Result<(usize, usize, usize)> {
        match *msa.dims() {
            [b, s, l]
                if b > 0 && s > 0 && l > 0 && matches!(msa.dtype(), DType::U32 | DType::I64) =>
            {
                Ok((b, s, l))
            }
            _ => Err(Error::invalid(
                "Evoformer",
                format!(
                    "expected MSA tokens (batch, depth, len) of u32 or i64, got {} {:?}",
                    msa.shape(),
                    msa.dtype()
                ),
            )),
        }
    }

    /// `(len, len)` u32 ids of the clipped relative positions `j - i`.
    fn relpos_ids(&self, l: usize) -> Result<Tensor> {
        let r = self.cfg.max_rel as i64;
        let ids: Vec<u32> = (0..l as i64)
            .flat_map(|i| (0..l as i64).map(move |j| ((j - i).clamp(-r, r) + r) as u32))
            .collect();
        Tensor::from_vec(ids, (l, l), self.head.weight.device())
    }

    /// One pass of the network over `msa` (`(batch, depth, len)` tokens), with the previous
    /// pass's output added through the recycling embeddings when given. Returns the final
    /// representations (not detached).
    pub fn iteration(&self, msa: &Tensor, prev: Option<&Recycled>) -> Result<Recycled> {
        let (b, s, l) = self.check_msa(msa)?;
        let target = msa.narrow(1, 0, 1)?.contiguous()?;
        let mut m = self
            .msa_emb
            .forward(&msa_features(msa, s, l)?)?
            .add(&self.target_emb.forward(&target)?)?;
        let t = target.reshape((b, l))?;
        let mut z = self
            .left_emb
            .forward(&t)?
            .unsqueeze(2)?
            .add(&self.right_emb.forward(&t)?.unsqueeze(1)?)?
            .add(&self.relpos.forward(&self.relpos_ids(l)?)?)?;
        if let Some(p) = prev {
            z = z.add(&self.recycle_pair.forward(&p.pair)?)?;
            let first = m
                .narrow(1, 0, 1)?
                .add(&self.recycle_msa.forward(&p.msa_first)?)?;
            m = if s > 1 {
                first.cat_with(&[&m.narrow(1, 1, s - 1)?], 1)?
            } else {
                first
            };
        }
        for block in &self.blocks {
            (m, z) = block.forward(&m, &z)?;
        }
        Ok(Recycled {
            msa_first: m.narrow(1, 0, 1)?,
            pair: z,
        })
    }

    /// Symmetrised distogram logits `(batch, len, len, bins)` of a pair representation.
    pub fn distogram(&self, pair: &Tensor) -> Result<Tensor> {
        let logits = self.head.forward(&self.head_norm.forward(pair)?)?;
        logits.add(&logits.transpose(1, 2)?)?.scale(0.5)
    }

    /// The distogram logits after `recycles` iterations (at least 1): the first
    /// `recycles - 1` run under no-grad and feed their detached output to the next, so
    /// gradients flow through the last iteration only.
    pub fn forward_with_recycles(&self, msa: &Tensor, recycles: usize) -> Result<Tensor> {
        if recycles == 0 {
            return Err(Error::invalid(
                "Evoformer::forward_with_recycles",
                "need at least one iteration",
            ));
        }
        let mut prev: Option<Recycled> = None;
        for _ in 1..recycles {
            let _g = no_grad();
            prev = Some(self.iteration(msa, prev.as_ref())?.detach());
        }
        self.distogram(&self.iteration(msa, prev.as_ref())?.pair)
    }

    /// Mean cross entropy of `logits` `(batch, len, len, bins)` against the distogram labels
    /// `(batch, len, len)` (u32), over the off-diagonal pairs.
    pub fn loss(&self, logits: &Tensor, distogram: &Tensor) -> Result<Tensor> {
        let targets = off_diagonal_targets(distogram, self.cfg.bins)?;
        logits.cross_entropy(
            &targets,
            CrossEntropyOpts {
                ignore_index: Some(self.cfg.bins as i64),
                ..CrossEntropyOpts::default()
            },
        )
    }
}

/// `(batch, depth, len)` u32 ids `token + MSA_VOCAB·[token != target token]`; an error when
/// a token is outside `0..MSA_VOCAB`.
fn msa_features(msa: &Tensor, s: usize, l: usize) -> Result<Tensor> {
    let raw = msa.to_dtype(DType::I64)?.to_vec::<i64>()?;
    if let Some(bad) = raw.iter().find(|&&t| !(0..MSA_VOCAB as i64).contains(&t)) {
        return Err(Error::invalid(
            "Evoformer",
            format!("MSA token {bad} is outside 0..{MSA_VOCAB}"),
        ));
    }
    let mut t: Vec<u32> = raw.into_iter().map(|x| x as u32).collect();
    for row in t.chunks_mut(s * l) {
        let (target, rest) = row.split_at_mut(l);
        for (k, tok) in rest.iter_mut().enumerate() {
            if *tok != target[k % l] {
                *tok += MSA_VOCAB as u32;
            }
        }
    }
    Tensor::from_vec(t, msa.shape().clone(), msa.device())
}

/// The labels with the diagonal replaced by `ignore` (the pair of a residue with itself says
/// nothing); an error unless `distogram` is `(batch, len, len)`.
fn off_diagonal_targets(distogram: &Tensor, ignore: usize) -> Result<Tensor> {
    let &[b, l, l2] = distogram.dims() else {
        return Err(Error::invalid(
            "Evoformer::loss",
            format!(
                "expected labels (batch, len, len), got {}",
                distogram.shape()
            ),
        ));
    };
    if l != l2 {
        return Err(Error::invalid(
            "Evoformer::loss",
            format!("expected square distograms, got {}", distogram.shape()),
        ));
    }
    let mut t = distogram.to_dtype(DType::U32)?.to_vec::<u32>()?;
    for n in 0..b {
        for i in 0..l {
            t[(n * l + i) * l + i] = ignore as u32;
        }
    }
    Tensor::from_vec(t, (b, l, l), distogram.device())
}

/// `(correct, total)` off-diagonal pairs whose most likely bin under `logits`
/// `(batch, len, len, bins)` is the label in `distogram` `(batch, len, len)`.
pub fn distogram_hits(logits: &Tensor, distogram: &Tensor) -> Result<(usize, usize)> {
    let &[b, l, _] = distogram.dims() else {
        return Err(Error::invalid(
            "distogram_hits",
            format!(
                "expected labels (batch, len, len), got {}",
                distogram.shape()
            ),
        ));
    };
    let pred = logits.argmax(-1, false)?.to_vec::<i64>()?;
    let labels = distogram.to_dtype(DType::I64)?.to_vec::<i64>()?;
    if pred.len() != labels.len() {
        return Err(Error::shape_mismatch(
            "distogram_hits (logits vs labels)",
            logits.shape(),
            distogram.shape(),
        ));
    }
    let mut hits = 0;
    for (k, (p, y)) in pred.iter().zip(&labels).enumerate() {
        let (i, j) = ((k / l) % l, k % l);
        if i != j && p == y {
            hits += 1;
        }
    }
    Ok((hits, b * l * l.saturating_sub(1)))
}

impl Module for Evoformer {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.msa_emb.visit_params(f);
        self.target_emb.visit_params(f);
        self.left_emb.visit_params(f);
        self.right_emb.visit_params(f);
        self.relpos.visit_params(f);
        self.recycle_msa.visit_params(f);
        self.recycle_pair.visit_params(f);
        self.blocks.visit_params(f);
        self.head_norm.visit_params(f);
        self.head.visit_params(f);
    }
}
