//! Replaying a recorded step under one policy and budget, and the rows that report it.

use super::record::Recorded;
use dynn::mm::policy::{self, Belady, Profile};
use dynn::mm::{DeviceProfile, OpRecord, Policy, Prediction, SimMemory, SimResult, simulate_with};
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

/// The simulator's prediction of a real run's step time from the trace it wrote
/// (`--trace-out`): each training step replayed under the built-in policy `name` (`belady`
/// reads each replayed step's own access order) and `budget` on `prof`, device memory
/// accounted as `memory` says.
pub fn predict(
    trace: &dynn::mm::Trace,
    name: &str,
    budget: Option<usize>,
    prof: &DeviceProfile,
    memory: SimMemory,
) -> Result<Prediction> {
    if super::pilot::PILOTS.contains(&name) {
        return Err(Error::invalid(
            "--policy",
            "a run's trace is replayed under a built-in policy; the pilot needs a trained snapshot",
        ));
    }
    let mut make = |step: &[OpRecord]| -> Result<Box<dyn Policy>> {
        match name {
            "belady" => Ok(Box::new(Belady::with_profile(Profile::from_ops(step)))),
            other => policy::by_name(other),
        }
    };
    dynn::mm::predict::predict(trace, &mut make, budget, prof, memory)
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
