//! The early-exit transformer language model: an exit head after every block, and each
//! sequence leaves the network at the first block whose prediction is confident enough, so
//! the depth (and the batch each deeper block sees) follows the data.
//!
//! Training uses the joint loss over every exit a sequence passes (the mean next-token cross
//! entropy per sequence and exit); a sequence stops at block `i` when the mean over its tokens
//! of the top softmax probability at exit `i` reaches `threshold`. The blocks after an exit
//! run on the remaining sequences only (`index_select` of the batch), so the op sizes and the
//! number of blocks differ from batch to batch.

use crate::data::{Split, TextDataset, load_corpus};
use crate::nn::{
    AttentionMask, Embedding, Forward, Init, LayerNorm, Linear, Module, Param, ParamBuilder,
    TransformerBlock,
};
use crate::rng::{Rng, SeedStream};
use crate::train::{Eval, StepOut, Task};
use dynn_core::{DType, Device, Error, Result, Tensor, no_grad};
use dynn_ops::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// Sizes and exit rule of the early-exit transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct EarlyExitConfig {
    /// Vocabulary size (set from the tokenizer by [`EarlyExitTask`]).
    pub vocab: usize,
    /// Model width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Blocks, each followed by an exit.
    pub layers: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Exit when the mean top-token probability of a sequence reaches this.
    pub threshold: f64,
    /// Residual dropout.
    pub dropout: f64,
}

impl Default for EarlyExitConfig {
    fn default() -> Self {
        EarlyExitConfig {
            vocab: 512,
            dim: 64,
            heads: 4,
            layers: 6,
            seq: 32,
            threshold: 0.4,
            dropout: 0.0,
        }
    }
}

impl EarlyExitConfig {
    /// Checks the settings fit together.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "EarlyExitConfig";
        if self.vocab < 2 || self.dim == 0 || self.layers == 0 || self.seq == 0 {
            return Err(Error::invalid(
                OP,
                format!("vocab ≥ 2, dim, layers and seq ≥ 1 needed, got {self:?}"),
            ));
        }
        if self.heads == 0 || self.dim % self.heads != 0 {
            return Err(Error::invalid(
                OP,
                format!("dim {} is not a multiple of heads {}", self.dim, self.heads),
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold) || !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                OP,
                format!(
                    "threshold {} must be in [0, 1] and dropout {} in [0, 1)",
                    self.threshold, self.dropout
                ),
            ));
        }
        Ok(())
    }
}

/// What one forward pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExitStats {
    /// Sequences that left at each block (the last block takes every remaining one).
    pub exits: Vec<usize>,
    /// Mean cross entropy of each sequence at the exit it took, averaged over sequences.
    pub exit_loss: f64,
}

impl ExitStats {
    /// The mean number of blocks a sequence ran.
    pub fn mean_depth(&self) -> f64 {
        let n: usize = self.exits.iter().sum();
        let d: usize = self
            .exits
            .iter()
            .enumerate()
            .map(|(i, c)| (i + 1) * c)
            .sum();
        d as f64 / n.max(1) as f64
    }
}

/// The model: token and position embeddings, `layers` pre-norm blocks, a norm per exit and
/// one LM head shared by every exit.
#[derive(Clone, Debug)]
pub struct EarlyExitLm {
    cfg: EarlyExitConfig,
    tok: Embedding,
    pos: Param,
    blocks: Vec<TransformerBlock>,
    exit_norms: Vec<LayerNorm>,
    head: Linear,
}

impl EarlyExitLm {
    /// A model with `cfg`, parameters from `b`, dropout seeds from `seeds`.
    pub fn new(b: &ParamBuilder, cfg: &EarlyExitConfig, seeds: &SeedStream) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.dim;
        let mut blocks = Vec::with_capacity(cfg.layers);
        let mut exit_norms = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut blk = TransformerBlock::new(&b.pp("blocks").pp(i), d, cfg.heads, 4 * d)?;
            if cfg.dropout > 0.0 {
                blk = blk.with_dropout(cfg.dropout, seeds.clone())?;
            }
            blocks.push(blk);
            exit_norms.push(LayerNorm::new(&b.pp("exits").pp(i), d)?);
        }
        Ok(EarlyExitLm {
            cfg: cfg.clone(),
            tok: Embedding::with_std(&b.pp("tok"), cfg.vocab, d, 0.02)?,
            pos: b.param(
                "pos",
                (cfg.seq, d),
                Init::Normal {
                    mean: 0.0,
                    std: 0.02,
                },
            )?,
            blocks,
            exit_norms,
            head: Linear::no_bias(&b.pp("head"), d, cfg.vocab)?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &EarlyExitConfig {
        &self.cfg
    }

    /// The joint loss on `ids` → `targets` (both `(batch, seq)` U32) with exits at
    /// `threshold` (`f64::INFINITY` runs every block): the mean cross entropy over every
    /// (sequence, exit) pair evaluated, and what the exits did.
    pub fn loss(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        threshold: f64,
    ) -> Result<(Tensor, ExitStats)> {
        let (batch, seq) = ids.dims2()?;
        if seq > self.cfg.seq || targets.dims() != ids.dims() {
            return Err(Error::invalid(
                "EarlyExitLm::loss",
                format!(
                    "ids {:?} and targets {:?} must match, with at most {} tokens",
                    ids.dims(),
                    targets.dims(),
                    self.cfg.seq
                ),
            ));
        }
        let pos = self.pos.narrow(0, 0, seq)?;
        let mut x = self.tok.forward(ids)?.add(&pos)?;
        let mut tgt = targets.clone();
        let mut total: Option<Tensor> = None;
        let mut pairs = 0usize;
        let mut stats = ExitStats {
            exits: vec![0; self.blocks.len()],
            exit_loss: 0.0,
        };
        let v = self.cfg.vocab;
        // One causal bias for every block (it does not depend on the batch, which shrinks).
        let mask = AttentionMask::Causal.prepared(1, seq, seq, x.dtype(), x.device())?;
        for (i, (blk, norm)) in self.blocks.iter().zip(&self.exit_norms).enumerate() {
            let b = x.dims()[0];
            x = blk.forward(&x, &mask)?;
            let logits = self.head.forward(&norm.forward(&x)?)?;
            let per_token = logits.reshape((b * seq, v))?.cross_entropy(
                &tgt.reshape(b * seq)?,
                CrossEntropyOpts {
                    reduction: LossReduction::None,
                    ..Default::default()
                },
            )?;
            let per_seq = per_token.reshape((b, seq))?.mean_dims(&[1], false)?;
            let sum = per_seq.sum_all()?;
            total = Some(match total {
                Some(t) => t.add(&sum)?,
                None => sum,
            });
            pairs += b;
            let last = i + 1 == self.blocks.len();
            let (conf, losses) = {
                let _g = no_grad();
                let conf = logits
                    .softmax(-1)?
                    .max_dims(&[-1], false)?
                    .mean_dims(&[1], false)?
                    .to_f64_vec()?;
                (conf, per_seq.to_f64_vec()?)
            };
            let keep: Vec<u32> = (0..b as u32)
                .filter(|&r| !last && conf[r as usize] < threshold)
                .collect();
            for (r, l) in losses.iter().enumerate() {
                if last || conf[r] >= threshold {
                    stats.exits[i] += 1;
                    stats.exit_loss += l;
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() < b {
                let rows = Tensor::from_vec(keep.clone(), keep.len(), ids.device())?;
                x = x.index_select(0, &rows)?;
                tgt = tgt.index_select(0, &rows)?;
            }
        }
        stats.exit_loss /= batch.max(1) as f64;
        let total = total.ok_or_else(|| Error::invalid("EarlyExitLm::loss", "no block ran"))?;
        Ok((total.scale(1.0 / pairs.max(1) as f64)?, stats))
    }
}

impl Module for EarlyExitLm {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.tok.visit_params(f);
        f(&self.pos);
        self.blocks.visit_params(f);
        self.exit_norms.visit_params(f);
        self.head.visit_params(f);
    }
    fn set_train(&mut self, train: bool) {
        self.blocks.set_train(train);
    }
}

/// The early-exit LM on a BPE-tokenized corpus (the generated one unless a file is given).
pub struct EarlyExitTask {
    model: EarlyExitLm,
    data: Arc<TextDataset>,
    seeds: SeedStream,
    device: Device,
}

/// Where the text comes from and how many BPE tokens to learn.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextSource {
    /// A text file (`None`: the generated corpus).
    pub path: Option<PathBuf>,
    /// BPE vocabulary size.
    pub vocab: usize,
}

impl EarlyExitTask {
    /// Loads (or generates) the corpus, trains the tokenizer, and builds the model from `seed`
    /// (F32 parameters and every batch on `device`).
    pub fn new(
        cfg: &EarlyExitConfig,
        text: &TextSource,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let corpus = load_corpus(text.path.as_deref(), seed)?;
        let data = Arc::new(TextDataset::new(&corpus, text.vocab)?);
        Self::with_data(cfg, data, seed, DType::F32, device)
    }

    /// A task over an already tokenized dataset (the model's vocabulary follows it), with
    /// parameters of `dtype` and every batch on `device`.
    pub fn with_data(
        cfg: &EarlyExitConfig,
        data: Arc<TextDataset>,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let cfg = EarlyExitConfig {
            vocab: data.vocab_size(),
            ..cfg.clone()
        };
        let seeds = SeedStream::new(seed ^ 0xD20F);
        let model = EarlyExitLm::new(&ParamBuilder::new(dtype, device, seed), &cfg, &seeds)?;
        Ok(EarlyExitTask {
            model,
            data,
            seeds,
            device,
        })
    }

    /// The model.
    pub fn model(&self) -> &EarlyExitLm {
        &self.model
    }

    /// The device of the parameters and batches.
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Task for EarlyExitTask {
    fn name(&self) -> &'static str {
        "early_exit"
    }
    fn config(&self) -> String {
        format!("{:?}", self.model.cfg)
    }
    fn unit(&self) -> &'static str {
        "tokens"
    }
    fn params(&self) -> Vec<Param> {
        self.model.params()
    }
    fn set_train(&mut self, train: bool) {
        self.model.set_train(train);
    }
    fn step(&mut self, rng: &mut Rng, batch: usize) -> Result<StepOut> {
        let seq = self.model.cfg.seq;
        let (ids, tgt) = self
            .data
            .batch(rng, batch, seq, Split::Train, self.device)?;
        let (loss, stats) = self.model.loss(&ids, &tgt, self.model.cfg.threshold)?;
        Ok(StepOut {
            loss,
            units: batch * seq,
            note: format!("depth {:.2}/{}", stats.mean_depth(), self.model.cfg.layers),
        })
    }
    fn evaluate(&mut self, rng: &mut Rng) -> Result<Eval> {
        let seq = self.model.cfg.seq;
        let mut sum = 0.0;
        const BATCHES: usize = 8;
        for _ in 0..BATCHES {
            let (ids, tgt) = self.data.batch(rng, 32, seq, Split::Valid, self.device)?;
            let (_, stats) = self.model.loss(&ids, &tgt, self.model.cfg.threshold)?;
            sum += stats.exit_loss;
        }
        Ok(Eval {
            metric: "valid_loss_at_exit",
            value: sum / BATCHES as f64,
        })
    }
    fn seeds(&self) -> Option<SeedStream> {
        Some(self.seeds.clone())
    }
}
