//! The JSON line a trainer prints last.

use serde::Serialize;

/// What a training run did, printed as one JSON object with `--json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    /// The model's name.
    pub model: String,
    /// Optimizer steps run in total.
    pub steps: u64,
    /// Mean loss over the first tenth of the run's steps.
    pub loss_first: f64,
    /// Mean loss over the last tenth.
    pub loss_last: f64,
    /// The evaluation metric's name.
    pub eval_metric: String,
    /// Its value.
    pub eval_value: f64,
    /// Mean wall time per optimizer step, milliseconds.
    pub step_ms_mean: f64,
    /// Peak device bytes the pool reserved.
    pub peak_device_bytes: usize,
    /// Distinct op-sequence signatures seen over the run.
    pub distinct_graphs: usize,
    /// The memory policy.
    pub policy: String,
    /// The device budget in bytes (`None`: unlimited).
    pub budget_bytes: Option<usize>,
    /// Units (tokens, samples) per second.
    pub units_per_sec: f64,
}
