//! `--max-size`: under a fixed device budget (what `none` needs at the base size), the
//! largest batch (or width) each policy trains at a bounded slowdown, as a multiple of what
//! `none` fits. The `pilot` is trained on each size's own recorded steps, as in the table.

use super::record::Recorded;
use super::replay::replay;
use super::workload::{Shared, Size, Workload};
use dynn::mm::policy::POLICIES;
use dynn::mm::{DeviceProfile, SimResult};
use dynn::pilot::Snapshot;
use dynn::prelude::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

/// The largest slowdown (budgeted step time over the same size's unlimited step time) that
/// still counts as "trains at this size".
pub const MAX_SLOWDOWN: f64 = 1.25;
/// The search stops at this multiple of the base size.
pub const CAP: usize = 32;
/// Steps per octave once doubling has bracketed the answer (4: quarter octaves).
const STEPS_PER_OCTAVE: usize = 4;

/// Which size is scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// Samples per step.
    Batch,
    /// The model's hidden width.
    Width,
}

impl Dim {
    /// `batch` or `width`.
    pub fn name(self) -> &'static str {
        match self {
            Dim::Batch => "batch",
            Dim::Width => "width",
        }
    }
}

/// The answer for one policy.
pub struct Found {
    /// Workload name.
    pub model: &'static str,
    /// Policy name.
    pub policy: &'static str,
    /// Scaled dimension.
    pub dim: Dim,
    /// The base value (where the budget comes from).
    pub base: usize,
    /// The largest value that ran within the slowdown bound (0: not even the base).
    pub max: usize,
    /// Its slowdown (at 0: the base size's).
    pub slowdown: f64,
    /// `max` over `none`'s max.
    pub multiple_of_none: f64,
    /// Whether `max` is the cap (the true maximum may be larger).
    pub capped: bool,
    /// What ended the search: the smallest failing size and why (`cap` when none failed).
    pub stopped_by: String,
    /// The device budget in bytes.
    pub budget: usize,
}

impl Found {
    /// The table line.
    pub fn line(&self) -> String {
        format!(
            "{:<12} {:<6} {:<13} {:>6} {:>7}{} {:>8.3} {:>9.2}x  {}",
            self.model,
            self.dim.name(),
            self.policy,
            self.base,
            self.max,
            if self.capped { "+" } else { " " },
            self.slowdown,
            self.multiple_of_none,
            self.stopped_by
        )
    }

    /// The JSON row.
    pub fn json(&self, prof: &str) -> Value {
        json!({
            "model": self.model,
            "policy": self.policy,
            "dim": self.dim.name(),
            "max": self.max,
            "multiple_of_none": self.multiple_of_none,
            "base": self.base,
            "budget_bytes": self.budget,
            "slowdown_at_max": self.slowdown,
            "capped": self.capped,
            "stopped_by": self.stopped_by,
            "profile": prof,
        })
    }
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:<12} {:<6} {:<13} {:>6} {:>8} {:>8} {:>10}  {}",
        "model", "dim", "policy", "base", "max", "slowdown", "x none", "stopped by"
    )
}

/// Recorded traces of one workload along one dimension, by value, each with its unlimited
/// replay; recorded once and shared by every policy.
struct Traces<'a> {
    workload: Workload,
    dim: Dim,
    shared: &'a Shared,
    prof: &'a DeviceProfile,
    cache: HashMap<usize, Rc<(Recorded, SimResult)>>,
    /// The pilot trained on each size's own recorded steps (as in the table).
    pilots: HashMap<usize, Rc<Snapshot>>,
    record_s: f64,
}

impl Traces<'_> {
    fn size(&self, value: usize) -> Size {
        let base = self.workload.base();
        match self.dim {
            Dim::Batch => Size {
                batch: value,
                ..base
            },
            Dim::Width => Size {
                width: value,
                ..base
            },
        }
    }

    fn get(&mut self, value: usize) -> Result<Rc<(Recorded, SimResult)>> {
        if let Some(t) = self.cache.get(&value) {
            return Ok(t.clone());
        }
        let start = Instant::now();
        let rec = self.workload.record(self.shared, self.size(value))?;
        let base = replay(&rec, "none", None, self.prof, None)?
            .map_err(|e| Error::Msg(format!("unlimited replay failed: {e}")))?;
        self.record_s += start.elapsed().as_secs_f64();
        eprintln!(
            "  recorded {} {}={value}: {} ops, unlimited peak {} bytes ({:.1}s)",
            self.workload.name(),
            self.dim.name(),
            rec.step.len(),
            base.peak_device_bytes,
            start.elapsed().as_secs_f64()
        );
        let t = Rc::new((rec, base));
        self.cache.insert(value, t.clone());
        Ok(t)
    }

    /// The pilot trained on the recorded steps at `value`.
    fn pilot(&mut self, value: usize) -> Result<Rc<Snapshot>> {
        if let Some(s) = self.pilots.get(&value) {
            return Ok(s.clone());
        }
        let t = self.get(value)?;
        let snapshot = Rc::new(super::pilot::train_own(&t.0, 0)?.snapshot);
        self.pilots.insert(value, snapshot.clone());
        Ok(snapshot)
    }

    /// How `policy` does at `value` under `budget`.
    fn trial(&mut self, policy: &str, value: usize, budget: usize) -> Result<Trial> {
        let t = self.get(value)?;
        let pilot = match super::pilot::PILOTS.contains(&policy) {
            true => Some(self.pilot(value)?),
            false => None,
        };
        let (rec, base) = (&t.0, &t.1);
        Ok(
            match replay(rec, policy, Some(budget), self.prof, pilot.as_deref())? {
                Ok(r) if r.step_ms / base.step_ms <= MAX_SLOWDOWN => {
                    Trial::Ran(r.step_ms / base.step_ms)
                }
                Ok(r) => Trial::Slow(r.step_ms / base.step_ms),
                Err(report) => {
                    let why = report.to_string();
                    let why = why.strip_prefix("out of memory: ").unwrap_or(&why);
                    Trial::OutOfMemory(why.strip_prefix("simulated: ").unwrap_or(why).into())
                }
            },
        )
    }
}

/// One size tried under one policy.
#[derive(Clone, Debug, PartialEq)]
enum Trial {
    /// Ran within the slowdown bound (this slowdown).
    Ran(f64),
    /// Ran, too slowly.
    Slow(f64),
    /// Did not fit (the simulator's reason).
    OutOfMemory(String),
}

/// What ended a search: the smallest size tried that failed, and how.
fn stop_reason(stop: Option<(usize, Trial)>) -> String {
    match stop {
        Some((v, Trial::Slow(s))) => format!("slowdown {s:.3} at {v}"),
        Some((v, Trial::OutOfMemory(why))) => format!("out of memory at {v}: {why}"),
        Some((v, Trial::Ran(_))) => format!("ran at {v}"),
        None => "cap".to_string(),
    }
}

/// Rounds `v` down to a multiple of `unit` (at least `unit`).
fn round(v: f64, unit: usize) -> usize {
    ((v / unit as f64).floor() as usize).max(1) * unit
}

/// Searches every policy for `workload` along `dim`: doubling from the base value up to
/// `CAP`× it, then bisecting the last octave to a quarter octave.
pub fn search(
    workload: Workload,
    dim: Dim,
    shared: &Shared,
    prof: &DeviceProfile,
) -> Result<(Vec<Found>, f64)> {
    let base_size = workload.base();
    let (base, unit) = match dim {
        Dim::Batch => (base_size.batch, 1),
        Dim::Width => (base_size.width, workload.width_unit()),
    };
    let mut traces = Traces {
        workload,
        dim,
        shared,
        prof,
        cache: HashMap::new(),
        pilots: HashMap::new(),
        record_s: 0.0,
    };
    let budget = traces.get(base)?.1.peak_device_bytes;
    let mut found = Vec::new();
    for policy in POLICIES.into_iter().chain(super::pilot::PILOTS) {
        let mut trial = |v: usize| traces.trial(policy, v, budget);
        let found_at = |max: usize, slowdown: f64, stop: Option<(usize, Trial)>| Found {
            model: workload.name(),
            policy,
            dim,
            base,
            max,
            slowdown,
            multiple_of_none: 0.0,
            capped: max >= CAP * base,
            stopped_by: stop_reason(stop),
            budget,
        };
        let mut best = match trial(base)? {
            Trial::Ran(slowdown) => slowdown,
            // Not even the base size runs within the bound under the budget `none` needs.
            fail => {
                let slowdown = match fail {
                    Trial::Slow(s) => s,
                    _ => f64::INFINITY,
                };
                found.push(found_at(0, slowdown, Some((base, fail))));
                continue;
            }
        };
        // Double while it runs.
        let (mut lo, mut stop) = (base, None);
        while lo < CAP * base {
            let next = (2 * lo).min(CAP * base);
            match trial(next)? {
                Trial::Ran(s) => {
                    lo = next;
                    best = s;
                }
                fail => {
                    stop = Some((next, fail));
                    break;
                }
            }
        }
        // Bisect the octave [lo, hi) on a grid of quarter octaves.
        if let Some((hi, _)) = stop {
            let step = (lo as f64 / STEPS_PER_OCTAVE as f64).max(unit as f64);
            let grid: Vec<usize> = (1..)
                .map(|k| round(lo as f64 + k as f64 * step, unit))
                .take_while(|&v| v < hi)
                .filter(|&v| v > lo)
                .collect();
            let (mut a, mut b) = (0usize, grid.len()); // grid[..a] ran, grid[b..] did not
            while a < b {
                let mid = (a + b) / 2;
                match trial(grid[mid])? {
                    Trial::Ran(s) => {
                        a = mid + 1;
                        lo = grid[mid];
                        best = s;
                    }
                    fail => {
                        b = mid;
                        stop = Some((grid[mid], fail));
                    }
                }
            }
        }
        found.push(found_at(lo, best, stop));
    }
    let none = found
        .iter()
        .find(|f| f.policy == "none")
        .map_or(base, |f| f.max);
    for f in &mut found {
        f.multiple_of_none = f.max as f64 / none.max(1) as f64;
    }
    Ok((found, traces.record_s))
}
