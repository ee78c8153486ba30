//! The Evoformer-lite with its synthetic protein data, as the shared training loop sees it.

use super::{Evoformer, EvoformerConfig, distogram_hits};
use crate::data::protein;
use crate::nn::{Module, Param, ParamBuilder};
use crate::rng::Rng;
use crate::train::{Eval, StepOut, Task};
use dynn_core::{DType, Device, Result};

/// Proteins per evaluation micro-batch.
const EVAL_BATCH: usize = 16;

/// Trains an [`Evoformer`] to predict distograms from MSAs: each step draws a batch of
/// proteins and a number of iterations `1..=max_recycles`; evaluation scores the distogram
/// accuracy on held-out proteins after `max_recycles` iterations.
pub struct EvoformerTask {
    model: Evoformer,
    device: Device,
}

impl EvoformerTask {
    /// An f32 model on `device` with parameters drawn from `seed` (its batches go there too).
    pub fn new(cfg: EvoformerConfig, seed: u64, device: Device) -> Result<Self> {
        Self::with_builder(cfg, &ParamBuilder::new(DType::F32, device, seed))
    }

    /// A model with parameters from `b` (its dtype and device; the batches go to that
    /// device).
    pub fn with_builder(cfg: EvoformerConfig, b: &ParamBuilder) -> Result<Self> {
        Ok(EvoformerTask {
            model: Evoformer::new(b, &cfg)?,
            device: b.device(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Evoformer {
        &self.model
    }

    /// The device of the parameters and batches.
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Task for EvoformerTask {
    fn name(&self) -> &'static str {
        "evoformer"
    }

    fn config(&self) -> String {
        format!("{:?}", self.model.cfg)
    }

    fn unit(&self) -> &'static str {
        "proteins"
    }

    fn params(&self) -> Vec<Param> {
        self.model.params()
    }

    fn set_train(&mut self, train: bool) {
        self.model.set_train(train);
    }

    fn step(&mut self, rng: &mut Rng, batch: usize) -> Result<StepOut> {
        let cfg = &self.model.cfg;
        let (msa, dist) = protein::batch(rng, &cfg.protein(), batch, self.device)?;
        let recycles = rng.range(1, cfg.max_recycles + 1);
        let logits = self.model.forward_with_recycles(&msa, recycles)?;
        Ok(StepOut {
            loss: self.model.loss(&logits, &dist)?,
            units: batch,
            note: format!("{recycles} recycles"),
        })
    }

    fn evaluate(&mut self, rng: &mut Rng) -> Result<Eval> {
        let cfg = self.model.cfg.clone();
        let (mut hits, mut total) = (0, 0);
        let mut left = cfg.eval_samples;
        while left > 0 {
            let n = left.min(EVAL_BATCH);
            let (msa, dist) = protein::batch(rng, &cfg.protein(), n, self.device)?;
            let logits = self.model.forward_with_recycles(&msa, cfg.max_recycles)?;
            let (h, t) = distogram_hits(&logits, &dist)?;
            hits += h;
            total += t;
            left -= n;
        }
        Ok(Eval {
            metric: "distogram_accuracy",
            value: hits as f64 / total.max(1) as f64,
        })
    }
}
