//! The pilot network — an MLP over the window of recent op features and the candidate's
//! features, giving one logit per next-use bucket — built from dynn-models' `Linear` and
//! trained with dynn's own autograd, cross entropy and Adam.

use crate::bucket::BUCKETS;
use crate::encoder::{FeatureConfig, PHASES};
use crate::labels::Dataset;
use crate::predictor::{Dense, Snapshot};
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_models::Rng;
use dynn_models::nn::{Forward, Linear, Module, Param, ParamBuilder};
use dynn_models::optim::{Adam, AdamConfig, Optimizer};
use dynn_ops::prelude::*;
use std::time::Instant;

/// Sizes and training settings of the pilot network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Hidden layers (ReLU after each).
    pub layers: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Rows per minibatch.
    pub batch: usize,
    /// Passes over the training rows.
    pub epochs: usize,
    /// Seed of the initial weights and of the shuffling.
    pub seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            hidden: 64,
            layers: 2,
            lr: 3e-3,
            batch: 64,
            epochs: 8,
            seed: 0,
        }
    }
}

/// The pilot network.
#[derive(Debug, Clone)]
pub struct PilotNet {
    /// Dense layers, input first; the last gives the bucket logits.
    pub layers: Vec<Linear>,
}

impl PilotNet {
    /// A freshly initialised network for `inputs` features.
    pub fn new(inputs: usize, cfg: &ModelConfig) -> Result<Self> {
        if inputs == 0 || cfg.hidden == 0 {
            return Err(Error::invalid(
                "PilotNet",
                format!(
                    "need inputs and hidden > 0, got {inputs} and {}",
                    cfg.hidden
                ),
            ));
        }
        let b = ParamBuilder::new(DType::F32, Device::Cpu, cfg.seed);
        let mut layers = Vec::with_capacity(cfg.layers + 1);
        let mut width = inputs;
        for i in 0..cfg.layers {
            layers.push(Linear::new(&b.pp(format!("layer{i}")), width, cfg.hidden)?);
            width = cfg.hidden;
        }
        layers.push(Linear::new(&b.pp("out"), width, BUCKETS)?);
        Ok(PilotNet { layers })
    }

    /// The frozen, tensor-free copy the hot path uses.
    pub fn snapshot(&self, features: FeatureConfig) -> Result<Snapshot> {
        let layers = self
            .layers
            .iter()
            .map(Dense::of_linear)
            .collect::<Result<Vec<_>>>()?;
        Snapshot::new(features, layers)
    }
}

impl Module for PilotNet {
    fn visit_params(&self, f: &mut dyn FnMut(&Param)) {
        self.layers.visit_params(f);
    }
}

impl Forward for PilotNet {
    /// `(rows, inputs)` → `(rows, 5)` logits.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// What a training run reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Accuracy on the training rows.
    pub accuracy_train: f64,
    /// Accuracy on the validation rows.
    pub accuracy_valid: f64,
    /// Accuracy of always answering the most frequent validation bucket.
    pub majority_valid: f64,
    /// Validation confusion: `confusion[true bucket][predicted bucket]`.
    pub confusion: [[u64; BUCKETS]; BUCKETS],
    /// Validation rows and misses by phase and by what answered them.
    pub sources: Sources,
    /// Training rows.
    pub rows_train: usize,
    /// Validation rows.
    pub rows_valid: usize,
    /// Mean loss of the last epoch.
    pub loss: f64,
    /// Wall time of the training, seconds.
    pub seconds: f64,
}

impl Report {
    /// Recall of each bucket on the validation rows (`NaN` for an absent bucket).
    pub fn recall(&self) -> [f64; BUCKETS] {
        let mut r = [f64::NAN; BUCKETS];
        for (t, row) in self.confusion.iter().enumerate() {
            let n: u64 = row.iter().sum();
            if n > 0 {
                r[t] = row[t] as f64 / n as f64;
            }
        }
        r
    }
}

/// Accuracy and confusion (`[true][predicted]`) of `snapshot` on `ds`.
pub fn evaluate(snapshot: &Snapshot, ds: &Dataset) -> (f64, [[u64; BUCKETS]; BUCKETS]) {
    let (accuracy, confusion, _) = score(snapshot, ds);
    (accuracy, confusion)
}

/// [`evaluate`] and [`Sources`] in one pass over `ds` (rows whose phase cannot be read, with
/// no op in the window, count as forward).
fn score(snapshot: &Snapshot, ds: &Dataset) -> (f64, [[u64; BUCKETS]; BUCKETS], Sources) {
    let f = snapshot.features;
    let mut confusion = [[0u64; BUCKETS]; BUCKETS];
    let mut sources = Sources::default();
    let mut scratch = snapshot.scratch();
    let mut hits = 0usize;
    for i in 0..ds.len() {
        let row = ds.row(i);
        let p = snapshot.predict(row, &mut scratch);
        let t = ds.y[i];
        hits += (p == t) as usize;
        confusion[t as usize][p as usize] += 1;
        // `phase_of` is a position in a PHASES-long slice, so below PHASES.
        let phase = f.phase_of(row).unwrap_or(0) as usize;
        let source = f.planned_bucket(row).is_some() as usize;
        sources.rows[phase][source] += 1;
        sources.misses[phase][source] += (p != t) as u64;
    }
    (hits as f64 / ds.len().max(1) as f64, confusion, sources)
}

/// Where a pilot's answers come from and where it misses: rows and misses per phase of the
/// op just run (forward, backward, optimizer) and per answer source (`0`: the network, `1`:
/// the announced plan, see [`FeatureConfig::planned_bucket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sources {
    /// Rows, `[phase][source]`.
    pub rows: [[u64; 2]; PHASES],
    /// Wrong answers, `[phase][source]`.
    pub misses: [[u64; 2]; PHASES],
}

impl Sources {
    /// One line: `misses/rows` per phase and source, where there are rows.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (p, phase) in ["forward", "backward", "optimizer"].iter().enumerate() {
            for (s, source) in ["network", "plan"].iter().enumerate() {
                if self.rows[p][s] > 0 {
                    parts.push(format!(
                        "{phase} {source} {}/{}",
                        self.misses[p][s], self.rows[p][s]
                    ));
                }
            }
        }
        parts.join(", ")
    }
}

/// A network and its optimizer, kept between calls so the pilot can keep fine-tuning online.
pub struct Trainer {
    net: PilotNet,
    params: Vec<Param>,
    opt: Adam,
    cfg: ModelConfig,
    features: FeatureConfig,
    rng: Rng,
}

impl Trainer {
    /// A fresh network for `features`.
    pub fn new(features: FeatureConfig, cfg: ModelConfig) -> Result<Self> {
        let net = PilotNet::new(features.input_dim(), &cfg)?;
        Ok(Trainer {
            params: net.params(),
            net,
            opt: Adam::new(AdamConfig::adam(cfg.lr))?,
            cfg,
            features,
            rng: Rng::new(cfg.seed ^ 0x5EED),
        })
    }

    /// A trainer that continues from a snapshot's weights (its layer widths and features).
    pub fn from_snapshot(s: &Snapshot, cfg: ModelConfig) -> Result<Self> {
        let cfg = ModelConfig {
            hidden: s.layers.first().map_or(cfg.hidden, |l| l.outputs),
            layers: s.layers.len().saturating_sub(1),
            ..cfg
        };
        let t = Trainer::new(s.features, cfg)?;
        let _g = dynn_core::no_grad();
        for (l, d) in t.net.layers.iter().zip(&s.layers) {
            if l.in_dim() != d.inputs || l.out_dim() != d.outputs {
                return Err(Error::invalid(
                    "pilot training",
                    "the snapshot's hidden layers differ in width",
                ));
            }
            let w = Tensor::from_vec(d.w.clone(), (d.inputs, d.outputs), Device::Cpu)?;
            l.weight.assign_(&w)?;
            if let Some(b) = &l.bias {
                b.assign_(&Tensor::from_vec(d.b.clone(), d.outputs, Device::Cpu)?)?;
            }
        }
        Ok(t)
    }

    /// The network.
    pub fn net(&self) -> &PilotNet {
        &self.net
    }

    /// `epochs` passes over `ds` in shuffled minibatches; returns the last epoch's mean loss.
    /// Rows the announced plan answers ([`FeatureConfig::planned_bucket`]) are left out: the
    /// network learns the rest.
    pub fn fit(&mut self, ds: &Dataset, epochs: usize) -> Result<f64> {
        if ds.dim != self.features.input_dim() {
            return Err(Error::invalid(
                "pilot training",
                format!(
                    "rows of {} features for a pilot reading {}",
                    ds.dim,
                    self.features.input_dim()
                ),
            ));
        }
        let mut order: Vec<usize> = (0..ds.len())
            .filter(|&i| self.features.planned_bucket(ds.row(i)).is_none())
            .collect();
        let n = order.len();
        let mut last = f64::NAN;
        for _ in 0..epochs {
            for i in (1..n).rev() {
                order.swap(i, self.rng.range(0, i + 1));
            }
            let (mut sum, mut batches) = (0.0, 0);
            for chunk in order.chunks(self.cfg.batch.max(1)) {
                let mut x = Vec::with_capacity(chunk.len() * ds.dim);
                let mut y = Vec::with_capacity(chunk.len());
                for &i in chunk {
                    x.extend_from_slice(ds.row(i));
                    y.push(ds.y[i] as i64);
                }
                let x = Tensor::from_vec(x, (chunk.len(), ds.dim), Device::Cpu)?;
                let y = Tensor::from_vec(y, chunk.len(), Device::Cpu)?;
                let loss = self
                    .net
                    .forward(&x)?
                    .cross_entropy(&y, CrossEntropyOpts::default())?;
                loss.backward()?;
                self.opt.step(&self.params)?;
                sum += loss.to_scalar_f64()?;
                batches += 1;
            }
            last = sum / batches.max(1) as f64;
        }
        Ok(last)
    }

    /// The current weights, frozen for the hot path.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.net.snapshot(self.features)
    }
}

/// Trains a fresh pilot on `train` for `cfg.epochs` and reports accuracy on both sets and the
/// confusion on `valid`.
pub fn train(
    train: &Dataset,
    valid: &Dataset,
    features: FeatureConfig,
    cfg: &ModelConfig,
) -> Result<(Snapshot, Report)> {
    let started = Instant::now();
    let mut t = Trainer::new(features, *cfg)?;
    let loss = t.fit(train, cfg.epochs)?;
    let snapshot = t.snapshot()?;
    let seconds = started.elapsed().as_secs_f64();
    let (accuracy_train, _) = evaluate(&snapshot, train);
    let (accuracy_valid, confusion, sources) = score(&snapshot, valid);
    let report = Report {
        accuracy_train,
        accuracy_valid,
        majority_valid: valid.majority_rate(),
        confusion,
        sources,
        rows_train: train.len(),
        rows_valid: valid.len(),
        loss,
        seconds,
    };
    Ok((snapshot, report))
}
