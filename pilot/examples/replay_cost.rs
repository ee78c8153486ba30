//! What following the ops costs the pilot's tracker, per op, apart from the kernels: a
//! recorded trace replayed into a fresh tracker, in batches as the policy queues them, with
//! caches warm, and with a buffer the size of the kernels' traffic swept between batches (as
//! a training step does). The difference is the tracker's cache misses.
//!
//! ```text
//! cargo run --release -p dynn-pilot --example replay_cost -- [workload] [steps] [sweep MiB] [batch]
//! ```

use dynn_core::Result;
use dynn_pilot::encoder::FeatureConfig;
use dynn_pilot::tracker::Tracker;
use std::time::Instant;

fn main() -> Result<()> {
    // Kernels run partly on this thread (see `init_threads`).
    dynn_ops::cpu::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map(String::as_str).unwrap_or("moe");
    let steps: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(6);
    let sweep_mib: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    // Ops replayed together, as the policy queues them (`PilotConfig::batch_ops`).
    let batch: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4);
    let trace = dynn_pilot::eval::record(name, steps)?.trace;
    let ops = &trace.ops;
    let mut sweep = vec![1u64; sweep_mib << 17];
    for (label, between) in [("warm caches", 0usize), ("caches swept", sweep.len())] {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let mut tracker = Tracker::new(FeatureConfig::default());
            let (mut busy, mut sink) = (0u128, 0u64);
            let (mut accesses, mut spans) = (Vec::new(), Vec::new());
            for chunk in ops.chunks(batch.max(1)) {
                if between > 0 {
                    // Stands in for the kernels of the chunk: they evict the tracker.
                    for x in sweep[..between].iter_mut().step_by(8) {
                        *x = x.wrapping_add(1);
                    }
                    sink = sink.wrapping_add(sweep[between / 2]);
                }
                // The chunk queued as the policy queues it: every op's buffers in one list.
                accesses.clear();
                spans.clear();
                for op in chunk {
                    let from = accesses.len();
                    accesses.extend(op.inputs.iter().chain(&op.outputs));
                    spans.push((op.phase, from, accesses.len()));
                }
                let t = Instant::now();
                // As the policy does before replaying its queue.
                tracker.prefetch_ops(spans.iter().map(|&(p, a, b)| (p, &accesses[a..b])));
                for op in chunk {
                    if op.step != tracker.step() {
                        tracker.step_boundary(op.step);
                    }
                    tracker.announce(op);
                    tracker.observe(op);
                }
                busy += t.elapsed().as_nanos();
            }
            std::hint::black_box(sink);
            best = best.min(busy as f64 / ops.len() as f64);
        }
        println!(
            "{name}: {} ops in batches of {batch}, {label}: {best:.0} ns per op (best of 5)",
            ops.len()
        );
    }
    Ok(())
}
