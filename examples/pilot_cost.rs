//! The pilot's host time per op, measured on the recorded steps of `compare_policies`'s
//! workloads: each is replayed in the simulator at 25% of its unlimited peak under the pilot
//! (trained on its own recorded steps, with the profile's costs), and the policy's own timers
//! (`PilotStats`) are divided by the ops replayed.
//!
//! ```sh
//! cargo run --release --example pilot_cost                  # warm caches
//! cargo run --release --example pilot_cost -- --cold        # caches flushed between ops
//! cargo run --release --example pilot_cost -- --models moe,evoformer
//! ```
//!
//! `--cold` writes 6 MiB before every op the policy observes, outside its timers, as a
//! training kernel would between two ops. That evicts the pilot's state from L1 and L2 (not
//! from a large L3): the figures then include the cache misses it pays during training.
//! `observe` is divided by every op observed (the step before and the replayed one), the
//! rest by the replayed step's ops.

#![allow(dead_code)]

mod compare;
mod workloads;

use clap::Parser;
use compare::workload::{ALL, Shared};
use dynn::mm::{Candidate, DeviceProfile, Now, OpRecord, Policy, policy::Lru, simulate};
use dynn::pilot::{PilotStats, StatsSink};
use dynn::prelude::*;

#[derive(Parser)]
#[command(about = "The pilot's host time per op, in the simulator")]
struct Args {
    /// Write 6 MiB before every op the pilot observes (evicting L1 and L2).
    #[arg(long)]
    cold: bool,
    /// Comma-separated workloads (default: all).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Replays per workload.
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

/// Forwards every call to the pilot; with `flush` non-empty, writes it before each op.
struct Flushing<P> {
    inner: P,
    flush: Vec<u64>,
}

impl<P: Policy> Policy for Flushing<P> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn drops(&self) -> bool {
        self.inner.drops()
    }
    fn observe(&mut self, op: &OpRecord) {
        for (i, x) in self.flush.iter_mut().enumerate() {
            *x = x.wrapping_add(i as u64);
        }
        std::hint::black_box(&self.flush);
        self.inner.observe(op)
    }
    fn step_boundary(&mut self, step: u64) {
        self.inner.step_boundary(step)
    }
    fn plan(&mut self, source: &str, groups: &[Vec<u64>]) {
        self.inner.plan(source, groups)
    }
    fn plan_read(&mut self, group: usize, id: u64) {
        self.inner.plan_read(group, id)
    }
    fn rank_victims(&mut self, now: Now, c: &mut [Candidate]) {
        self.inner.rank_victims(now, c)
    }
    fn eviction(&self, c: &Candidate) -> dynn::mm::Eviction {
        self.inner.eviction(c)
    }
    fn next_use(&mut self, now: Now, key: u64) -> Option<u64> {
        self.inner.next_use(now, key)
    }
    fn upcoming(&mut self, now: Now, horizon: usize, out: &mut Vec<u64>) {
        self.inner.upcoming(now, horizon, out)
    }
}

fn main() -> Result<()> {
    // Kernels run partly on this thread (see `init_threads`).
    dynn::init_threads();
    let args = Args::parse();
    let prof = DeviceProfile::a100_pcie4();
    let shared = Shared::default();
    println!(
        "pilot host time per op, replayed at 25% on {} ({}, {} replays each)",
        prof.name,
        if args.cold {
            "6 MiB written before every op"
        } else {
            "warm caches"
        },
        args.reps
    );
    for w in ALL {
        if !args.models.is_empty() && !args.models.iter().any(|m| m == w.name()) {
            continue;
        }
        let rec = w.record(&shared, w.base())?;
        let peak = simulate(&rec.step, &mut Lru, None, &prof)?.peak_device_bytes;
        let budget = peak / 4;
        let trained = compare::pilot::train_own(&rec, 0)?;
        let sink = StatsSink::default();
        for _ in 0..args.reps {
            let pilot =
                compare::pilot::policy("pilot", &trained.snapshot, &prof).report_to(sink.clone());
            let mut p = Flushing {
                inner: pilot,
                flush: vec![0; if args.cold { (6 << 20) / 8 } else { 0 }],
            };
            for op in &rec.warmup {
                op.announce_to(&mut p);
                p.observe(op);
            }
            p.step_boundary(rec.step.first().map_or(1, |o| o.step));
            simulate(&rec.step, &mut p, Some(budget), &prof)?;
        }
        let stats = sink
            .lock()
            .map_err(|_| Error::Msg("stats sink poisoned".into()))?;
        let ops = ((rec.warmup.len() + rec.step.len()) * args.reps) as f64;
        let replayed = (rec.step.len() * args.reps) as f64;
        let sum = |f: fn(&PilotStats) -> u64| stats.iter().map(f).sum::<u64>() as f64;
        println!(
            "{:<12} observe {:>5.0} ns/op; on the replayed step: rank {:>5.0} ns/op ({:.3} rankings/op, {:.2} network predictions/op), upcoming {:>4.0} ns/op",
            w.name(),
            sum(|s| s.observe_ns) / ops,
            sum(|s| s.rank_ns) / replayed,
            sum(|s| s.pilot_rankings + s.lru_rankings) / replayed,
            sum(|s| s.predictions) / replayed,
            sum(|s| s.upcoming_ns) / replayed,
        );
    }
    Ok(())
}
