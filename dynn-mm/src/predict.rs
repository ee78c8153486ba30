//! Predicting a real run's step time from the trace it recorded: each training step replayed
//! on the simulator after the step before it, the median taken, as a trainer reports the
//! median of its steps.

use crate::policy::Policy;
use crate::sim::{DeviceProfile, SimMemory, SimResult, simulate_with};
use crate::trace::{OpRecord, Trace};
use dynn_core::{Error, Result};

/// Makes the policy a step is replayed under, given that step's ops (which an offline
/// policy such as belady reads).
pub type PolicyForStep<'a> = dyn FnMut(&[OpRecord]) -> Result<Box<dyn Policy>> + 'a;

/// The simulator's prediction of a run's step time.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The median of the replayed steps' times, ms (the mean of the middle two for an even
    /// count): what a trainer's `step_ms_median` measures.
    pub step_ms: f64,
    /// The replayed step whose time is the median (the upper of the middle two): its compute,
    /// stalls and traffic.
    pub median_step: SimResult,
    /// Every replayed step's time, ms, in step order.
    pub steps_ms: Vec<f64>,
}

/// The training steps of `trace` a prediction covers: those a step boundary closed (ops after
/// the last one, a trainer's evaluation pass, are not a training step), less the first, whose
/// one-off work a trainer's median leaves out, unless it is the only one.
pub fn training_steps(trace: &Trace) -> Result<Vec<u64>> {
    let mut steps: Vec<u64> = trace
        .steps
        .iter()
        .filter(|s| s.ops > 0)
        .map(|s| s.step)
        .collect();
    if steps.is_empty() {
        steps.extend(trace.ops.iter().map(|o| o.step).max());
    }
    steps.sort_unstable();
    steps.dedup();
    if steps.len() > 1 {
        steps.remove(0);
    }
    match steps.is_empty() {
        true => Err(Error::Msg("the trace has no ops".into())),
        false => Ok(steps),
    }
}

/// Each training step of `trace` replayed after the step before it, under a policy from
/// `policy` (given the step it will replay) and `budget` on `profile`, device memory
/// accounted as `memory` says: each step's op count and result.
pub fn replay_steps(
    trace: &Trace,
    policy: &mut PolicyForStep<'_>,
    budget: Option<usize>,
    profile: &DeviceProfile,
    memory: SimMemory,
) -> Result<Vec<(usize, SimResult)>> {
    training_steps(trace)?
        .into_iter()
        .map(|s| {
            let warmup = match s {
                0 => Vec::new(),
                s => trace.step_ops(s - 1),
            };
            let step = trace.step_ops(s);
            let mut p = policy(&step)?;
            let r = simulate_with(&warmup, &step, p.as_mut(), budget, profile, memory)?;
            Ok((step.len(), r))
        })
        .collect()
}

/// The median of `v`, sorting it (the mean of the middle two for an even count; 0 when
/// empty): the statistic of a trainer's `step_ms_median`, and so of a prediction.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The prediction for a run that recorded `trace`: [`replay_steps`], their median.
pub fn predict(
    trace: &Trace,
    policy: &mut PolicyForStep<'_>,
    budget: Option<usize>,
    profile: &DeviceProfile,
    memory: SimMemory,
) -> Result<Prediction> {
    let results: Vec<SimResult> = replay_steps(trace, policy, budget, profile, memory)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let steps_ms: Vec<f64> = results.iter().map(|r| r.step_ms).collect();
    let mut order: Vec<usize> = (0..results.len()).collect();
    order.sort_by(|&a, &b| steps_ms[a].total_cmp(&steps_ms[b]));
    let median_step = order
        .get(order.len() / 2)
        .map(|&i| results[i].clone())
        .ok_or_else(|| Error::Msg("the trace has no training step".into()))?;
    Ok(Prediction {
        step_ms: median(&mut steps_ms.clone()),
        median_step,
        steps_ms,
    })
}

/// The per-op cost (seconds) that makes the unlimited replay of `trace`'s training steps take
/// `unlimited_ms` (a run's median step) on `profile`: what that time leaves after the median
/// step's kernels (their roofline time), spread over the median step's ops; 0 when the
/// kernels alone take longer. On a host-bound run this is the framework's own work per op.
pub fn per_op_cost(trace: &Trace, profile: &DeviceProfile, unlimited_ms: f64) -> Result<f64> {
    let bare = DeviceProfile {
        launch_s: 0.0,
        ..profile.clone()
    };
    let mut none = |_: &[OpRecord]| crate::policy::by_name("none");
    let steps = replay_steps(trace, &mut none, None, &bare, SimMemory::Bytes)?;
    let kernels_ms = median(&mut steps.iter().map(|(_, r)| r.compute_ms).collect::<Vec<_>>());
    let ops = median(&mut steps.iter().map(|(n, _)| *n as f64).collect::<Vec<_>>()).max(1.0);
    Ok(((unlimited_ms - kernels_ms) * 1e-3 / ops).max(0.0))
}
