//! The MoE language model on a BPE-tokenized text, as a [`Task`] for the shared loop.

use super::config::MoeConfig;
use super::model::MoeLm;
use crate::data::{Split, TextDataset, load_corpus};
use crate::nn::{Module, Param, ParamBuilder};
use crate::rng::{Rng, SeedStream};
use crate::train::{Eval, StepOut, Task};
use dynn_core::{DType, Device, Error, Result};
use dynn_ops::prelude::*;
use std::path::Path;

/// Validation batches averaged by [`MoeTask::evaluate`](Task::evaluate).
const EVAL_BATCHES: usize = 8;
/// Sequences per validation batch.
const EVAL_BATCH: usize = 16;

/// Trains a [`MoeLm`] on next-token prediction over a [`TextDataset`] (the generated corpus
/// or a text file); evaluates the mean next-token cross-entropy on the validation split.
pub struct MoeTask {
    model: MoeLm,
    data: TextDataset,
    seeds: SeedStream,
    device: Device,
}

impl MoeTask {
    /// The task on the text of `data` (the generated corpus when `None`), tokenized with a
    /// BPE of `cfg.vocab` tokens; parameters, corpus and dropout drawn from `seed`; the
    /// parameters and every batch on `device`.
    pub fn new(cfg: &MoeConfig, data: Option<&Path>, seed: u64, device: Device) -> Result<Self> {
        cfg.validate()?;
        let text = load_corpus(data, seed)?;
        Self::from_text(cfg, &text, seed, device)
    }

    /// The task on `text` (F32 parameters on `device`).
    pub fn from_text(cfg: &MoeConfig, text: &str, seed: u64, device: Device) -> Result<Self> {
        cfg.validate()?;
        let data = TextDataset::new(text, cfg.vocab)?;
        Self::with_data(cfg, data, seed, device)
    }

    /// The task on an already tokenized dataset; the model's vocabulary is the tokenizer's.
    /// F32 parameters and every batch on `device`.
    pub fn with_data(
        cfg: &MoeConfig,
        data: TextDataset,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let cfg = MoeConfig {
            vocab: data.vocab_size(),
            ..cfg.clone()
        };
        cfg.validate()?;
        for split in [Split::Train, Split::Valid] {
            if data.tokens(split).len() <= cfg.seq {
                return Err(Error::invalid(
                    "MoeTask",
                    format!(
                        "the {split:?} split has {} tokens, too few for seq {}",
                        data.tokens(split).len(),
                        cfg.seq
                    ),
                ));
            }
        }
        let seeds = SeedStream::new(seed ^ 0xD80F);
        let b = ParamBuilder::new(DType::F32, device, seed);
        let model = MoeLm::new(&b, &cfg, &seeds)?;
        Ok(MoeTask {
            model,
            data,
            seeds,
            device,
        })
    }

    /// The model.
    pub fn model(&self) -> &MoeLm {
        &self.model
    }

    /// The dataset.
    pub fn data(&self) -> &TextDataset {
        &self.data
    }

    /// The device of the parameters and batches.
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Task for MoeTask {
    fn name(&self) -> &'static str {
        "moe"
    }
    fn config(&self) -> String {
        format!("{:?}", self.model.config())
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
        let seq = self.model.config().seq;
        let (ids, targets) = self
            .data
            .batch(rng, batch, seq, Split::Train, self.device)?;
        let (loss, stats) = self.model.loss(&ids, &targets)?;
        Ok(StepOut {
            loss,
            units: batch * seq,
            note: stats.note(),
        })
    }
    fn evaluate(&mut self, rng: &mut Rng) -> Result<Eval> {
        let seq = self.model.config().seq;
        let mut total = 0.0;
        for _ in 0..EVAL_BATCHES {
            let (ids, targets) =
                self.data
                    .batch(rng, EVAL_BATCH, seq, Split::Valid, self.device)?;
            let logits = self.model.forward(&ids)?;
            total += logits
                .cross_entropy(&targets, CrossEntropyOpts::default())?
                .to_scalar_f64()?;
        }
        Ok(Eval {
            metric: "valid_loss",
            value: total / EVAL_BATCHES as f64,
        })
    }
    fn seeds(&self) -> Option<SeedStream> {
        Some(self.seeds.clone())
    }
}
