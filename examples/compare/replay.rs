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

/// The last complete training step of `trace`: the last one a step boundary closed. Ops after
/// it (a trainer's evaluation pass) are not a training step.
fn last_training_step(trace: &dynn::mm::Trace) -> Result<u64> {
    trace
        .steps
        .iter()
        .filter(|s| s.ops > 0)
        .map(|s| s.step)
        .max()
        .or_else(|| trace.ops.iter().map(|o| o.step).max())
        .ok_or_else(|| Error::Msg("the trace has no ops".into()))
}

/// The last training step of a trace a trainer wrote (`--trace-out`) replayed under `policy` and
/// `budget` on `prof`, device memory accounted as `memory` says: the simulator's prediction for
/// a real run's step time.
pub fn predict(
    trace: &dynn::mm::Trace,
    policy: &str,
    budget: Option<usize>,
    prof: &DeviceProfile,
    memory: SimMemory,
) -> Result<SimResult> {
    let last = last_training_step(trace)?;
    let (warmup, step) = (trace.step_ops(last.saturating_sub(1)), trace.step_ops(last));
    replay_ops(&warmup, &step, policy, budget, prof, None, memory)?.map_err(Error::Msg)
}

/// The per-op cost (seconds) that makes the unlimited replay of `trace`'s last step take
/// `unlimited_ms` on `prof`: what the measured time leaves after the kernels' roofline time,
/// spread over the step's ops (0 when the kernels alone take longer).
pub fn per_op_cost(
    trace: &dynn::mm::Trace,
    prof: &DeviceProfile,
    unlimited_ms: f64,
) -> Result<f64> {
    let bare = DeviceProfile {
        launch_s: 0.0,
        ..prof.clone()
    };
    let ops = trace.step_ops(last_training_step(trace)?).len().max(1);
    let kernels_ms = predict(trace, "none", None, &bare, SimMemory::Bytes)?.compute_ms;
    Ok(((unlimited_ms - kernels_ms) * 1e-3 / ops as f64).max(0.0))
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
