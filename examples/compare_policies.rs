//! Records the access traces of the bundled workloads — the four DyNN trainers of
//! `dynn-models` (MoE, early exit, Tree-LSTM, Evoformer) and a static transformer — and replays
//! them in the simulator under every policy at 100, 50, 25 and 12.5% of the unlimited peak.
//!
//! ```sh
//! cargo run --release --example compare_policies -- --json
//! cargo run --release --example compare_policies -- --max-size --json
//! cargo run --release --example compare_policies -- --json --holdout evoformer --plot /tmp/p.svg
//! ```
//!
//! Each workload trains a few steps with no budget while the memory manager records the trace;
//! the simulator then replays the last step on a device profile. `static` is first shown the
//! step before (its profiling step); `belady` gets the replayed step's own access order;
//! `pilot` is the learned policy of `dynn::pilot` with a snapshot trained (a few epochs, no
//! online training) on the workload's recorded steps other than the replayed one, shown the
//! step before like `static`, and given the profile's costs, so it drops an activation for
//! recomputation where that costs less than copying it out; `pilot-offload` is the same
//! pilot offloading every victim. The
//! last line with `--json` is `{"rows":[{"model","policy","budget_frac","profile","step_ms",
//! "compute_ms","stall_ms","stall_ms_by_phase","bytes_h2d","bytes_d2h","peak_device_bytes",
//! "slowdown"}]}`
//! (slowdown = step time / unlimited step time); a replay that runs out of memory (`none`
//! below the peak) has `"oom": true`, its report in `"oom_report"` and null figures.
//!
//! The JSON line also has `"pilot":{"accuracy_replayed":{model: accuracy}}`: each workload's
//! pilot scored on its replayed step. `--holdout evoformer` also trains a pilot on the traces
//! of the other three DyNNs only and scores its next-use bucket accuracy on the held-out one,
//! with idiom features and with one-hot op names; `"pilot"` then also has
//! `"accuracy_trained","accuracy_holdout","accuracy_holdout_onehot","predict_us_p50",
//! "overhead_frac",...` (`overhead_frac` is null: measured by `pilot/examples/overhead.rs`).
//! `--seeds N` trains every pilot with network seeds 0..N and reports the accuracies as means
//! (per seed in `accuracy_holdout_by_seed`); the table replays seed 0's pilot. `--plot FILE.svg`
//! draws slowdown against budget, one panel per model and one line per policy.
//!
//! `--max-size` fixes the budget at what `none` needs at each workload's base size and finds,
//! per policy, the largest batch (and, for the language models, width) whose step runs at a
//! slowdown of at most 1.25 against the same size unlimited; its JSON line is
//! `{"max_size":[{"model","policy","dim","max","multiple_of_none",...}]}`.

mod compare;
mod workloads;

use clap::Parser;
use compare::record::{Recorded, STEPS};
use compare::replay::{self, Row, replay};
use compare::search::{self, CAP, Dim, MAX_SLOWDOWN};
use compare::workload::{ALL, Shared, Workload};
use dynn::mm::{DeviceProfile, SimMemory};
use dynn::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

/// Compare memory policies on recorded traces of the bundled workloads.
#[derive(Parser, Debug)]
struct Args {
    /// Device profile: a100-pcie4, h100-pcie5, or `calibrated:FLOPS,MEM_BW,COPY_BW` (per
    /// second, e.g. from `benches/gpu.rs` on the GPU in question).
    #[arg(long, default_value = "a100-pcie4")]
    profile: String,
    /// Workloads to run, comma-separated: moe, early_exit, tree_lstm, evoformer, transformer.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Find the largest batch (and width) each policy trains under a fixed budget instead.
    #[arg(long)]
    max_size: bool,
    /// Also train a pilot on the other three DyNNs and score it on this one (e.g. evoformer).
    #[arg(long)]
    holdout: Option<String>,
    /// Write an SVG of slowdown against budget (one panel per model) to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Train each pilot with network seeds 0..N and report accuracies as means (with their
    /// range); the table replays seed 0's pilot. A pilot's accuracy moves by about ±0.01
    /// from seed to seed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=32))]
    seeds: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Instead of the workloads: predict the step time of a real run from the trace it wrote
    /// (a trainer's `--trace-out`): each training step after the first replayed under
    /// `--policy` and `--budget`, the median step time printed.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// With `--trace`: the run's policy.
    #[arg(long, default_value = "lru")]
    policy: String,
    /// With `--trace`: the run's device budget in bytes (the summary's `budget_bytes`).
    #[arg(long)]
    budget: Option<usize>,
    /// With `--trace`: the measured step time of the same run without a budget (its summary's
    /// `step_ms_median`). Sets the profile's per-op cost so that the unlimited replay takes
    /// this long (the framework's host work per op, which a host-bound run is made of); the
    /// budgeted prediction then adds what offloading costs.
    #[arg(long)]
    unlimited_ms: Option<f64>,
    /// With `--trace`: the host time of one move made on the executor's thread (an eviction or
    /// a demand fetch), in microseconds, e.g. the `move_host_us` of a budgeted run's summary.
    /// Each such move then delays the replay's later ops by this much.
    #[arg(long)]
    move_host_us: Option<f64>,
    /// With `--trace`: the host time to place one live block again when the pool is repacked,
    /// in microseconds (a budgeted run's `repack_block_us`). Each repack the replay makes then
    /// delays later ops by this much per live block.
    #[arg(long)]
    repack_host_us: Option<f64>,
    /// Replay runs that write stale buffers back in the background (a trainer's
    /// `--write-back`).
    #[arg(long)]
    write_back: bool,
    /// Replay runs that evict only when an op needs the room (a trainer's
    /// `--no-evict-ahead`).
    #[arg(long)]
    no_evict_ahead: bool,
    /// With `--trace`: count device memory in bytes instead of replaying the memory manager's
    /// own pool (with the trainers' segment sizes, so evictions fall where the run's did).
    #[arg(long)]
    count_bytes: bool,
}

/// Budgets, as shares of the unlimited replay's peak.
const FRACS: [f64; 4] = [1.0, 0.5, 0.25, 0.125];
/// Policies of the table: dynn-mm's built-ins and the learned pilot.
const TABLE_POLICIES: [&str; 7] = [
    "none",
    "lru",
    "static",
    "recompute",
    "belady",
    "pilot",
    "pilot-offload",
];
/// The DyNNs `--holdout` trains on and holds out (not the static transformer).
const DYNNS: [Workload; 4] = [
    Workload::Moe,
    Workload::EarlyExit,
    Workload::TreeLstm,
    Workload::Evoformer,
];
/// Workloads whose width `--max-size` also scales (not the early-exit model: at the start of
/// training its exits follow the width, so a wider model would also be a shallower one).
const WIDTH_MODELS: [Workload; 2] = [Workload::Moe, Workload::Transformer];

fn main() {
    // Kernels run partly on this thread (see `init_threads`).
    dynn::init_threads();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// A host time given in microseconds on the command line (`flag`), in seconds: finite and
/// not negative.
fn seconds_of_us(flag: &'static str, per: &str, us: f64) -> Result<f64> {
    if !us.is_finite() || us < 0.0 {
        return Err(Error::invalid(
            flag,
            format!("{us}: a host time {per} is a number of microseconds ≥ 0"),
        ));
    }
    Ok(us * 1e-6)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let mut prof = DeviceProfile::by_name(&args.profile)?;
    prof.write_back = args.write_back;
    prof.evict_ahead = !args.no_evict_ahead;
    let models = if args.models.is_empty() {
        ALL.to_vec()
    } else {
        args.models
            .iter()
            .map(|m| Workload::parse(m.trim()))
            .collect::<Result<Vec<_>>>()?
    };
    if let Some(path) = &args.trace {
        let trace = dynn::mm::Trace::load(path)?;
        if let Some(ms) = args.unlimited_ms {
            prof.launch_s = dynn::mm::predict::per_op_cost(&trace, &prof, ms)?;
            eprintln!(
                "per-op cost {:.2} µs, from the unlimited run's {ms:.3} ms",
                prof.launch_s * 1e6
            );
        }
        if let Some(us) = args.move_host_us {
            prof.move_host_s = seconds_of_us("--move-host-us", "per move", us)?;
        }
        if let Some(us) = args.repack_host_us {
            prof.repack_host_s = seconds_of_us("--repack-host-us", "per repacked block", us)?;
        }
        let memory = if args.count_bytes {
            SimMemory::Bytes
        } else {
            let (small, large) = dynn::models::train::SEGMENTS;
            SimMemory::Pool(small, large)
        };
        let p = compare::replay::predict(&trace, &args.policy, args.budget, &prof, memory)?;
        let r = &p.median_step;
        println!(
            "{}: predicted step {:.3} ms on {}, the median of {} steps ({}); the median step: compute {:.3} ms, stalls {:.3} ms (forward {:.3}, backward {:.3}, optimizer {:.3}), moves issued {:.3} ms, {} repacks {:.3} ms, {} B to the device, {} B to the host",
            path.display(),
            p.step_ms,
            prof.name,
            p.steps_ms.len(),
            p.steps_ms
                .iter()
                .map(|ms| format!("{ms:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            r.compute_ms,
            r.stall_ms,
            r.stall_ms_by_phase[0],
            r.stall_ms_by_phase[1],
            r.stall_ms_by_phase[2],
            r.move_host_ms,
            r.repacks,
            r.repack_host_ms,
            r.bytes_h2d,
            r.bytes_d2h
        );
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "profile": prof.name, "policy": args.policy, "budget": args.budget,
                    "op_s": prof.launch_s, "copy_latency_s": prof.copy_latency_s,
                    "move_host_s": prof.move_host_s, "move_host_ms": r.move_host_ms,
                    "repack_host_s": prof.repack_host_s, "repacks": r.repacks,
                    "repack_host_ms": r.repack_host_ms,
                    "step_ms": p.step_ms, "steps_ms": p.steps_ms,
                    "compute_ms": r.compute_ms, "stall_ms": r.stall_ms,
                    "stall_ms_by_phase": compare::replay::by_phase(r),
                    "bytes_h2d": r.bytes_h2d, "bytes_d2h": r.bytes_d2h,
                    "evictions": r.evictions, "demand_fetches": r.demand_fetches,
                    "pool": !args.count_bytes,
                })
            );
        }
        return Ok(());
    }
    let shared = Shared::default();
    let start = Instant::now();
    if args.max_size {
        max_size(&args, &models, &shared, &prof)?;
    } else {
        table(&args, &models, &shared, &prof)?;
    }
    eprintln!("total {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Replays every workload at every budget under every policy.
fn table(args: &Args, models: &[Workload], shared: &Shared, prof: &DeviceProfile) -> Result<()> {
    println!(
        "profile {}; {STEPS} steps recorded per workload, step {} replayed (static profiled on step {})",
        prof.name,
        STEPS - 1,
        STEPS - 2
    );
    let held = match &args.holdout {
        Some(name) => {
            let w = Workload::parse(name.trim())?;
            if !DYNNS.contains(&w) {
                return Err(Error::invalid(
                    "--holdout",
                    "hold out one of the four DyNNs: moe, early_exit, tree_lstm, evoformer",
                ));
            }
            Some(w)
        }
        None => None,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut largest_share = Vec::new();
    let mut recorded: Vec<(Workload, Recorded)> = Vec::new();
    // Each workload's pilot accuracy on its replayed step (mean over the seeds).
    let mut accuracy = serde_json::Map::new();
    for &w in models {
        let size = w.base();
        let rec = w.record(shared, size)?;
        let base = replay(&rec, "none", None, prof, None)?
            .map_err(|e| Error::Msg(format!("{}: unlimited replay failed: {e}", w.name())))?;
        println!();
        println!("{}: {}", w.name(), w.describe(size));
        println!(
            "  {} ops in the replayed step; {} distinct graphs in {STEPS} steps; replayed graph {} its profiling step's",
            rec.step.len(),
            rec.distinct_graphs,
            if rec.same_graph {
                "equals"
            } else {
                "differs from"
            }
        );
        let (op, largest) = rec.largest_op();
        println!(
            "  unlimited: {:.4} ms, peak {} bytes (the manager measured {} over the run); largest op ({op}) touches {} bytes ({:.1}% of the peak); recorded in {:.1}s",
            base.step_ms,
            base.peak_device_bytes,
            rec.manager_peak,
            largest,
            100.0 * largest as f64 / base.peak_device_bytes.max(1) as f64,
            rec.record_s
        );
        println!(
            "  {} bytes of buffers from before the step (parameters, optimizer state) are touched by it",
            rec.preexisting_bytes()
        );
        largest_share.push((
            w.name(),
            largest as f64 / base.peak_device_bytes.max(1) as f64,
        ));
        let pilots = (0..args.seeds)
            .map(|seed| compare::pilot::train_own(&rec, seed))
            .collect::<Result<Vec<_>>>()?;
        let pilot = &pilots[0];
        let r = &pilot.report;
        println!(
            "  pilot: trained on steps 0..{} ({} rows, {:.1}s): accuracy {:.3}; on the replayed step {:.3} (majority {:.3}, {} rows)",
            STEPS - 1,
            r.rows_train,
            r.seconds,
            r.accuracy_train,
            r.accuracy_valid,
            r.majority_valid,
            r.rows_valid
        );
        println!(
            "  pilot misses on the replayed step (by phase and answer): {}",
            r.sources.summary()
        );
        let valid: Vec<f64> = pilots.iter().map(|p| p.report.accuracy_valid).collect();
        let (mean, lo, hi) = compare::pilot::spread(&valid);
        if args.seeds > 1 {
            println!(
                "  pilot over seeds 0..{}: on the replayed step {mean:.3} ({lo:.3}–{hi:.3})",
                args.seeds
            );
        }
        accuracy.insert(w.name().to_string(), serde_json::json!(mean));
        println!("{}", replay::header());
        for frac in FRACS {
            for policy in TABLE_POLICIES {
                let row = Row::run(
                    w.name(),
                    policy,
                    frac,
                    &rec,
                    &base,
                    prof,
                    Some(&pilot.snapshot),
                )?;
                println!("{}", row.line());
                rows.push(row);
            }
        }
        recorded.push((w, rec));
    }
    println!();
    for line in checks(&rows, &largest_share) {
        println!("{line}");
    }
    let pilot = match held {
        Some(h) => {
            // The other DyNNs the table did not record are recorded now.
            for w in DYNNS {
                if !recorded.iter().any(|(r, _)| *r == w) {
                    recorded.push((w, w.record(shared, w.base())?));
                }
            }
            let traces: Vec<(&'static str, &Recorded)> = recorded
                .iter()
                .filter(|(w, _)| DYNNS.contains(w))
                .map(|(w, r)| (w.name(), r))
                .collect();
            let run = compare::pilot::holdout(&traces, h.name(), args.seeds)?;
            println!();
            println!(
                "pilot hold-out: trained on the other DyNNs' traces (a third of each one's steps validate), scored on every step of {} ({:.1}s)",
                h.name(),
                run.seconds
            );
            for line in run.lines() {
                println!("{line}");
            }
            Some(run.json())
        }
        None => None,
    };
    if let Some(path) = &args.plot {
        let svg = compare::plot::svg(&rows, &FRACS, &TABLE_POLICIES);
        std::fs::write(path, svg)
            .map_err(|e| Error::Msg(format!("--plot {}: {e}", path.display())))?;
        println!("plot written to {}", path.display());
    }
    if args.json {
        let rows: Vec<_> = rows.iter().map(Row::json).collect();
        let mut out = serde_json::json!({ "rows": rows });
        let mut p = pilot.unwrap_or_else(|| serde_json::json!({}));
        p["accuracy_replayed"] = serde_json::Value::Object(accuracy);
        out["pilot"] = p;
        println!("{out}");
    }
    Ok(())
}

/// The orderings the comparison is expected to show, checked on the rows; `largest` is each
/// model's largest op as a share of its peak (below it no policy can run).
fn checks(rows: &[Row], largest: &[(&str, f64)]) -> Vec<String> {
    let find = |m: &str, p: &str, f: f64| {
        rows.iter()
            .find(|r| r.model == m && r.policy == p && r.budget_frac == f)
    };
    let step = |r: Option<&Row>| r.and_then(|r| r.result.as_ref().ok()).map(|r| r.step_ms);
    let mut out = Vec::new();
    let mut models: Vec<&str> = rows.iter().map(|r| r.model).collect();
    models.dedup();
    for m in models {
        for f in FRACS.into_iter().filter(|&f| f < 1.0) {
            let none_oom = find(m, "none", f).is_some_and(|r| r.result.is_err());
            let (lru, bel, sta, pil) = (
                step(find(m, "lru", f)),
                step(find(m, "belady", f)),
                step(find(m, "static", f)),
                step(find(m, "pilot", f)),
            );
            let share = largest.iter().find(|(n, _)| *n == m).map_or(0.0, |l| l.1);
            let verdict = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if a < b * (1.0 - 1e-9) => "yes".to_string(),
                (Some(a), Some(b)) if a <= b * (1.0 + 1e-9) => "NO (equal)".to_string(),
                (Some(_), Some(_)) => "NO".to_string(),
                _ if share > f => format!(
                    "n/a (no policy runs: the largest op needs {:.1}% of the peak)",
                    share * 100.0
                ),
                _ => "NO (out of memory)".to_string(),
            };
            let mut line = format!(
                "check {m:<12} {:>5}%: none OOM {}; belady < lru {}; static < lru {}; pilot < lru {}",
                f * 100.0,
                if none_oom { "yes" } else { "NO" },
                verdict(bel, lru),
                verdict(sta, lru),
                verdict(pil, lru)
            );
            for p in TABLE_POLICIES {
                if let (Some(s), Some(b)) = (step(find(m, p, f)), bel)
                    && p != "belady"
                    && s < b
                {
                    line += &format!("; {p} beats belady ({s:.4} < {b:.4} ms)");
                }
            }
            out.push(line);
        }
    }
    out
}

/// Finds the largest sizes each policy trains under the budget `none` needs at the base size.
fn max_size(args: &Args, models: &[Workload], shared: &Shared, prof: &DeviceProfile) -> Result<()> {
    println!(
        "profile {}; budget = unlimited peak at the base size (what `none` fits); largest size with slowdown <= {MAX_SLOWDOWN} against the same size unlimited; doubling from the base, capped at {CAP}x the base (`+`: the cap ran, the true maximum may be larger), then bisected to a quarter octave",
        prof.name
    );
    let mut all = Vec::new();
    for &w in models {
        let dims: &[Dim] = if WIDTH_MODELS.contains(&w) {
            &[Dim::Batch, Dim::Width]
        } else {
            &[Dim::Batch]
        };
        for &dim in dims {
            let (found, secs) = search::search(w, dim, shared, prof)?;
            println!();
            println!(
                "{}: {}; budget {} bytes; traces recorded in {secs:.1}s",
                w.name(),
                w.describe(w.base()),
                found.first().map_or(0, |f| f.budget)
            );
            println!("{}", search::header());
            for f in &found {
                println!("{}", f.line());
            }
            all.extend(found);
        }
    }
    if args.json {
        let rows: Vec<_> = all.iter().map(|f| f.json(&prof.name)).collect();
        println!("{}", serde_json::json!({ "max_size": rows }));
    }
    Ok(())
}
