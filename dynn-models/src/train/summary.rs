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
    /// Median wall time of one optimizer step, milliseconds: the steady state, without the
    /// first step's one-off work (kernel compilation, allocator warm-up).
    pub step_ms_median: f64,
    /// Peak device bytes the pool reserved.
    pub peak_device_bytes: usize,
    /// Moves made on the executor's thread over the run: evictions and demand fetches.
    pub moves: u64,
    /// Host time per such move, microseconds: choosing victims and the calls that move or
    /// queue the bytes (0 without moves). `compare_policies --move-host-us` takes it.
    pub move_host_us: f64,
    /// Repacks of the device pool over the run (free space too scattered for a request the
    /// budget has room for).
    pub repacks: u64,
    /// Host time per live block a repack placed again, microseconds (0 without repacks).
    /// `compare_policies --repack-host-us` takes it.
    pub repack_block_us: f64,
    /// The host's speed over the same steps as `step_ms_median`: the median time of a fixed
    /// piece of host work ([`host_reference_us`](super::host_reference_us)) timed after each
    /// step, microseconds. Runs of host-bound steps made at different host speeds compare
    /// after dividing by it.
    pub host_ref_us: f64,
    /// Distinct op-sequence signatures seen over the run.
    pub distinct_graphs: usize,
    /// The memory policy.
    pub policy: String,
    /// The device budget in bytes (`None`: unlimited).
    pub budget_bytes: Option<usize>,
    /// Units (tokens, samples) per second.
    pub units_per_sec: f64,
    /// FNV-1a of every trained parameter's path and bytes, in order (hex): equal exactly when
    /// two runs end with bit-identical weights (e.g. under different budgets and policies).
    pub params_fnv: String,
}

/// The [`Summary::params_fnv`] of `params`.
pub fn params_fnv(params: &[crate::nn::Param]) -> dynn_core::Result<String> {
    use dynn_mm::trace::{FNV_START, fnv1a};
    let mut h = FNV_START;
    for p in params {
        h = fnv1a(h, p.path().as_bytes());
        for v in p.tensor().to_f64_vec()? {
            h = fnv1a(h, &v.to_bits().to_le_bytes());
        }
    }
    Ok(format!("{h:016x}"))
}
