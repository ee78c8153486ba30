//! Recording: a workload trains a few steps with no budget (policy `none`) while the memory
//! manager records every op; one steady-state step and the step before it are kept.

use dynn::core::{install_memory_hooks, mark_step};
use dynn::mm::{ManagerConfig, MemoryManager, OpRecord, Trace, policy};
use dynn::models::train::{Defaults, Task, TrainArgs, train};
use dynn::prelude::*;
use std::collections::HashSet;
use std::time::Instant;

/// Training steps recorded per trace. Step 0 creates the optimizer state, so the last step is
/// replayed and the one before it is the profiling step of `static`.
pub const STEPS: u64 = 4;

/// The replayed step and the one before it.
pub struct Recorded {
    /// The step before the replayed one (what `static` profiles).
    pub warmup: Vec<OpRecord>,
    /// The replayed step.
    pub step: Vec<OpRecord>,
    /// Distinct graph signatures over the recorded steps.
    pub distinct_graphs: usize,
    /// Whether the replayed step has the same graph as its profiling step.
    pub same_graph: bool,
    /// Seconds the recording took.
    pub record_s: f64,
    /// The memory manager's own peak over the recorded run (device pool bytes, with the
    /// parameters and optimizer state resident throughout).
    pub manager_peak: usize,
    /// The recorded steps (ops and step records of steps `0..STEPS`): what the pilot learns
    /// from (every step but the replayed one) and is scored on (the replayed one).
    pub trace: Trace,
}

impl Recorded {
    /// Keeps steps `STEPS - 2` and `STEPS - 1` of `trace`.
    fn from_trace(trace: &Trace, record_s: f64, manager_peak: usize) -> Result<Recorded> {
        let (warmup, step) = (trace.step_ops(STEPS - 2), trace.step_ops(STEPS - 1));
        if step.is_empty() || warmup.is_empty() {
            return Err(Error::Msg(format!(
                "the trace has no ops for steps {} and {} ({} ops recorded)",
                STEPS - 2,
                STEPS - 1,
                trace.ops.len()
            )));
        }
        let sig = |s: u64| {
            trace
                .steps
                .iter()
                .find(|r| r.step == s)
                .map(|r| r.signature)
        };
        let same_graph = sig(STEPS - 2).is_some() && sig(STEPS - 2) == sig(STEPS - 1);
        let distinct_graphs = trace
            .steps
            .iter()
            .filter(|r| r.step < STEPS)
            .map(|r| r.signature)
            .collect::<HashSet<_>>()
            .len();
        Ok(Recorded {
            warmup,
            step,
            distinct_graphs,
            same_graph,
            record_s,
            manager_peak,
            trace: Trace {
                meta: trace.meta.clone(),
                ops: trace
                    .ops
                    .iter()
                    .filter(|o| o.step < STEPS)
                    .cloned()
                    .collect(),
                steps: trace
                    .steps
                    .iter()
                    .filter(|r| r.step < STEPS)
                    .cloned()
                    .collect(),
            },
        })
    }

    /// Bytes of the distinct buffers the replayed step uses that existed before it
    /// (parameters, gradients, optimizer state): the simulator places each on the device at
    /// its first use, without a transfer, and frees it after its last use in the step.
    pub fn preexisting_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.step
            .iter()
            .flat_map(|op| op.inputs.iter().chain(&op.outputs))
            .filter(|a| a.3 < 1 << 63 && seen.insert(a.0))
            .map(|a| a.1)
            .sum()
    }

    /// The op of the replayed step that touches the most bytes (its distinct inputs and
    /// outputs), with that count: no policy can run a budget below it.
    pub fn largest_op(&self) -> (&str, u64) {
        self.step
            .iter()
            .map(|op| {
                let mut seen = HashSet::new();
                let bytes = op
                    .inputs
                    .iter()
                    .chain(&op.outputs)
                    .filter(|a| seen.insert(a.0))
                    .map(|a| a.1)
                    .sum::<u64>();
                (&*op.op, bytes)
            })
            .max_by_key(|&(_, b)| b)
            .unwrap_or(("none", 0))
    }
}

/// Records a [`Task`] through the shared training loop: `STEPS` steps of `batch`, unlimited,
/// policy `none`, no progress bar, trace kept.
pub fn record_task<T: Task>(
    batch: usize,
    lr: f64,
    make: impl Fn() -> Result<T>,
) -> Result<Recorded> {
    let args = TrainArgs {
        steps: Some(STEPS),
        batch: Some(batch),
        policy: Some("none".into()),
        quiet: true,
        record_trace: true,
        ..Default::default()
    };
    let defaults = Defaults {
        steps: STEPS,
        batch,
        lr,
    };
    let start = Instant::now();
    let out = train(&args, defaults, make)?;
    Recorded::from_trace(
        &out.trace,
        start.elapsed().as_secs_f64(),
        out.summary.peak_device_bytes,
    )
}

/// Records `STEPS` calls of a hand-written training step under an unlimited manager.
pub fn record_loop(mut train_step: impl FnMut(u64) -> Result<()>) -> Result<Recorded> {
    let mut cfg = ManagerConfig::new(policy::by_name("none")?, None);
    cfg.record_trace = true;
    let mm = MemoryManager::new(cfg);
    let start = Instant::now();
    {
        let _hooks = install_memory_hooks(mm.clone());
        for step in 0..STEPS {
            train_step(step)?;
            mark_step(step + 1);
        }
    }
    Recorded::from_trace(
        &mm.trace(),
        start.elapsed().as_secs_f64(),
        mm.stats().peak_device_bytes,
    )
}
