//! What a trainer plugs into the shared loop: a model with its data.

use crate::nn::Param;
use crate::rng::{Rng, SeedStream};
use dynn_core::{Result, Tensor};

/// One micro-batch's result.
pub struct StepOut {
    /// The scalar to differentiate.
    pub loss: Tensor,
    /// Tokens, samples or trees in the micro-batch (for the throughput figure).
    pub units: usize,
    /// A short note for the progress bar (e.g. `exit 3/6`, `4 recycles`).
    pub note: String,
}

/// An evaluation figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Eval {
    /// What was measured (e.g. `valid_loss`, `accuracy`).
    pub metric: &'static str,
    /// Its value.
    pub value: f64,
}

/// A model and its data, as the shared training loop sees them.
pub trait Task {
    /// Short name used in JSON output and checkpoints (e.g. `moe`).
    fn name(&self) -> &'static str;
    /// The model's settings, stored in checkpoints and compared on resume.
    fn config(&self) -> String;
    /// What `units` counts (e.g. `tokens`).
    fn unit(&self) -> &'static str;
    /// Every trainable parameter.
    fn params(&self) -> Vec<Param>;
    /// Training (dropout on) or evaluation mode.
    fn set_train(&mut self, train: bool);
    /// Draws a micro-batch from `rng` and builds its graph up to the loss.
    fn step(&mut self, rng: &mut Rng, batch: usize) -> Result<StepOut>;
    /// Evaluates the trained model on held-out data drawn from `rng` (called under no-grad,
    /// in evaluation mode).
    fn evaluate(&mut self, rng: &mut Rng) -> Result<Eval>;
    /// The model's dropout seed stream, if it has one (its position is checkpointed).
    fn seeds(&self) -> Option<SeedStream> {
        None
    }
}
