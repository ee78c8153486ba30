//! Replaying a recorded step under one policy and budget, and the rows that report it.

use super::record::Recorded;
use dynn::mm::policy::{self, Belady, Profile};
use dynn::mm::{DeviceProfile, OpRecord, Policy, SimMemory, SimResult, simulate_with};
use dynn::pilot::Snapshot;
use dynn::prelude::*;
use serde_json::{Value, json};

/// Simulates the replayed step of `rec` under policy `name` and `budget` (`None`:
/// unlimited). `static` is first shown the step before; `belady` reads the replayed step's own
/// access order; `pilot` runs `pilot` (a snapshot trained on the other recorded steps) and,
/// like `static`, is shown the step before. `Ok(Err(report))` is an out-of-memory in the
/// simulation.
pub fn replay(
    rec: &Recorded,
    name: &str,
    budget: Option<usize>,
    prof: &DeviceProfile,
    pilot: Option<&Snapshot>,
) -> Result<std::result::Result<SimResult, String>> {
    replay_ops(
        &rec.warmup,
        &rec.step,
        name,
        budget,
        prof,
        pilot,
        SimMemory::Bytes,
    )
}

/// [`replay`] on any step (`step`) and the step before it (`warmup`), with device memory
/// accounted as `memory` says.
pub fn replay_ops(
    warmup: &[OpRecord],
    step: &[OpRecord],
    name: &str,
    budget: Option<usize>,
    prof: &DeviceProfile,
    pilot: Option<&Snapshot>,
    memory: SimMemory,
) -> Result<std::result::Result<SimResult, String>> {
    let mut p: Box<dyn Policy> = match (name, pilot) {
        ("belady", _) => Box::new(Belady::with_profile(Profile::from_ops(step))),
        (pilot, Some(s)) if super::pilot::PILOTS.contains(&pilot) => {
            Box::new(super::pilot::policy(pilot, s, prof))
        }
        (pilot, None) if super::pilot::PILOTS.contains(&pilot) => {
            return Err(Error::Msg(
                "the pilot replay needs a trained snapshot".into(),
            ));
        }
        (other, _) => policy::by_name(other)?,
    };
    // Policies that learn from a profiling step see the step before: shown it, or (modelling
    // the memory manager's pool) replayed through it, so the step starts from the device
    // memory it left.
    let result = if let SimMemory::Pool(..) = memory {
        simulate_with(warmup, step, p.as_mut(), budget, prof, memory)
    } else {
        for op in warmup {
            op.announce_to(p.as_mut());
            p.observe(op);
        }
        p.step_boundary(step.first().map_or(1, |o| o.step));
        simulate_with(&[], step, p.as_mut(), budget, prof, memory)
    };
    match result {
        Ok(r) => Ok(Ok(r)),
        Err(e @ Error::OutOfMemory { .. }) => Ok(Err(e.to_string())),
        Err(e) => Err(e),
    }
}

/// The training steps of `trace` a prediction covers: those a step boundary closed (ops after
/// the last one, a trainer's evaluation pass, are not a training step), less the first, as a
/// trainer's `step_ms_median` leaves out the first step's one-off work, unless it is the only
/// one.
fn training_steps(trace: &dynn::mm::Trace) -> Result<Vec<u64>> {
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

/// Each training step of `trace` (see [`training_steps`]) replayed, after the step before it,
/// under `policy` and `budget` on `prof`, device memory accounted as `memory` says.
fn replay_steps(
    trace: &dynn::mm::Trace,
    policy: &str,
    budget: Option<usize>,
    prof: &DeviceProfile,
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
            let r = replay_ops(&warmup, &step, policy, budget, prof, None, memory)?
                .map_err(Error::Msg)?;
            Ok((step.len(), r))
        })
        .collect()
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A real run's step time as the simulator predicts it from the trace the run wrote
/// (`--trace-out`): each training step replayed under `policy` and `budget` on `prof`.
pub struct Prediction {
    /// The median of the replayed steps' times, ms: what the run's `step_ms_median` measures.
    pub step_ms: f64,
    /// The replayed step whose time is the median (the upper of the middle two): its
    /// compute, stalls and traffic.
    pub median_step: SimResult,
    /// Every replayed step's time, ms, in step order.
    pub steps_ms: Vec<f64>,
}

/// The simulator's prediction of a real run's step time from the trace it wrote, device memory
/// accounted as `memory` says.
pub fn predict(
    trace: &dynn::mm::Trace,
    policy: &str,
    budget: Option<usize>,
    prof: &DeviceProfile,
    memory: SimMemory,
) -> Result<Prediction> {
    let results: Vec<SimResult> = replay_steps(trace, policy, budget, prof, memory)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let steps_ms: Vec<f64> = results.iter().map(|r| r.step_ms).collect();
    let mut order: Vec<usize> = (0..results.len()).collect();
    order.sort_by(|&a, &b| steps_ms[a].total_cmp(&steps_ms[b]));
    // `training_steps` returns at least one step, so `order` is not empty.
    let median_step = results[order[order.len() / 2]].clone();
    Ok(Prediction {
        step_ms: median(steps_ms.clone()),
        median_step,
        steps_ms,
    })
}

/// The per-op cost (seconds) that makes the unlimited replay of `trace`'s training steps take
/// `unlimited_ms` (a median step) on `prof`: what the measured time leaves after the median
/// step's kernels' roofline time, spread over the median step's ops (0 when the kernels alone
/// take longer).
pub fn per_op_cost(
    trace: &dynn::mm::Trace,
    prof: &DeviceProfile,
    unlimited_ms: f64,
) -> Result<f64> {
    let bare = DeviceProfile {
        launch_s: 0.0,
        ..prof.clone()
    };
    let steps = replay_steps(trace, "none", None, &bare, SimMemory::Bytes)?;
    let kernels_ms = median(steps.iter().map(|(_, r)| r.compute_ms).collect());
    let ops = median(steps.iter().map(|(n, _)| *n as f64).collect()).max(1.0);
    Ok(((unlimited_ms - kernels_ms) * 1e-3 / ops).max(0.0))
}

/// One replay, as reported.
pub struct Row {
    /// Workload name.
    pub model: &'static str,
    /// Policy name.
    pub policy: &'static str,
    /// Budget as a share of the unlimited replay's peak.
    pub budget_frac: f64,
    /// Device profile name.
    pub profile: String,
    /// The simulation, or the out-of-memory report.
    pub result: std::result::Result<SimResult, String>,
    /// Step time over the unlimited step time.
    pub slowdown: Option<f64>,
}

impl Row {
    /// Replays `rec` under `policy` at `frac` of `base`'s peak.
    pub fn run(
        model: &'static str,
        policy: &'static str,
        frac: f64,
        rec: &Recorded,
        base: &SimResult,
        prof: &DeviceProfile,
        pilot: Option<&Snapshot>,
    ) -> Result<Row> {
        let budget = (base.peak_device_bytes as f64 * frac) as usize;
        let result = replay(rec, policy, Some(budget), prof, pilot)?;
        let slowdown = result.as_ref().ok().map(|r| r.step_ms / base.step_ms);
        Ok(Row {
            model,
            policy,
            budget_frac: frac,
            profile: prof.name.clone(),
            result,
            slowdown,
        })
    }

    /// The table line.
    pub fn line(&self) -> String {
        let head = format!(
            "{:<12} {:<13} {:>6}",
            self.model,
            self.policy,
            format!("{}%", self.budget_frac * 100.0)
        );
        match &self.result {
            Ok(r) => format!(
                "{head} {:>9.4} {:>9.4} {:>9.4} {:>12} {:>12} {:>12} {:>8.3}",
                r.step_ms,
                r.compute_ms,
                r.stall_ms,
                r.bytes_h2d,
                r.bytes_d2h,
                r.peak_device_bytes,
                self.slowdown.unwrap_or(f64::NAN)
            ),
            Err(report) => format!("{head} out of memory: {report}"),
        }
    }

    /// The JSON row; an out-of-memory row has `"oom": true`, the report and null figures.
    pub fn json(&self) -> Value {
        match &self.result {
            Ok(r) => json!({
                "model": self.model,
                "policy": self.policy,
                "budget_frac": self.budget_frac,
                "profile": self.profile,
                "step_ms": r.step_ms,
                "compute_ms": r.compute_ms,
                "stall_ms": r.stall_ms,
                "stall_ms_by_phase": by_phase(r),
                "bytes_h2d": r.bytes_h2d,
                "bytes_d2h": r.bytes_d2h,
                "peak_device_bytes": r.peak_device_bytes,
                "slowdown": self.slowdown,
                "oom": false,
            }),
            Err(report) => json!({
                "model": self.model,
                "policy": self.policy,
                "budget_frac": self.budget_frac,
                "profile": self.profile,
                "step_ms": null,
                "compute_ms": null,
                "stall_ms": null,
                "bytes_h2d": null,
                "bytes_d2h": null,
                "peak_device_bytes": null,
                "slowdown": null,
                "oom": true,
                "oom_report": report,
            }),
        }
    }
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:<12} {:<13} {:>6} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12} {:>8}",
        "model",
        "policy",
        "budget",
        "step ms",
        "comp ms",
        "stall ms",
        "h2d bytes",
        "d2h bytes",
        "peak bytes",
        "slowdown"
    )
}

/// `stall_ms` by the phase of the op that waited, as a JSON object.
pub fn by_phase(r: &SimResult) -> Value {
    let [forward, backward, optimizer] = r.stall_ms_by_phase;
    json!({"forward": forward, "backward": backward, "optimizer": optimizer})
}
