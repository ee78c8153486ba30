//! The training loop behind every bundled trainer: memory manager, optimizer and schedule,
//! progress bar, checkpoints, evaluation, memory report and JSON summary.

use super::{Defaults, Eval, Summary, Task, TrainArgs};
use crate::checkpoint::Checkpoint;
use crate::optim::{
    Adam, AdamConfig, GradNormWatch, LrSchedule, Optimizer, WarmupCosine, clip_scale,
};
use crate::rng::Rng;
use dynn_core::{Device, Error, Result, install_memory_hooks, mark_step, no_grad};
use dynn_mm::predict::median;
use dynn_mm::{Budget, ManagerConfig, MemoryManager, MemoryReport, human_bytes, policy};
use dynn_ops::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::Arc;
use std::time::Instant;

/// The memory manager's pool segments `(small, large)` in the bundled trainers, sized for the
/// bundled models (a few MiB each): fine enough that a budget given as a share of the peak is
/// honoured closely.
pub const SEGMENTS: (usize, usize) = (64 << 10, 2 << 20);

/// Steps profiled without a budget to resolve a budget given as a share of the peak.
const PROFILE_STEPS: u64 = 3;

/// The outcome of [`train`]: the summary and the final memory report.
pub struct Outcome {
    /// The JSON summary.
    pub summary: Summary,
    /// The memory report at the end of the run.
    pub report: MemoryReport,
    /// Mean loss per step, in order (steps before a resume are not included).
    pub losses: Vec<f64>,
    /// The trained parameters.
    pub params: Vec<crate::nn::Param>,
    /// The access trace (empty unless `--trace-out` or `record_trace` asked for it).
    pub trace: dynn_mm::Trace,
}

/// The data stream of a run: one RNG for batches, checkpointed.
const DATA_RNG: &str = "data";
/// The dropout seed stream's position.
const DROPOUT_RNG: &str = "dropout";

fn manager_config(policy: &str, budget: Option<usize>, args: &TrainArgs) -> Result<ManagerConfig> {
    let mut cfg = ManagerConfig::new(policy::by_name(policy)?, budget);
    cfg.segments = SEGMENTS;
    cfg.record_trace = args.trace_out.is_some() || args.record_trace;
    cfg.record_timeline = args.plot.is_some();
    cfg.write_back = args.write_back;
    cfg.evict_ahead = !args.no_evict_ahead;
    Ok(cfg)
}

/// Peak device bytes of the first steps without a budget (for budgets given as a share).
fn unlimited_peak<T: Task>(
    make: &dyn Fn() -> Result<T>,
    device: Device,
    args: &TrainArgs,
    d: &Defaults,
) -> Result<usize> {
    let mm = MemoryManager::new(manager_config("none", None, &TrainArgs::default())?);
    let _hooks = install_memory_hooks(mm.clone());
    let mut task = make()?;
    check_device(&task, device)?;
    let mut opt = Adam::new(AdamConfig::adamw(0.0))?;
    let mut rng = Rng::new(args.seed);
    let batch = args.batch.unwrap_or(d.batch);
    for step in 0..PROFILE_STEPS {
        let out = task.step(&mut rng, batch)?;
        out.loss.backward()?;
        opt.step(&task.params())?;
        mark_step(step + 1);
    }
    Ok(mm.stats().peak_device_bytes)
}

/// An error unless every parameter of `task` lives on `device` (the `make` closure must build
/// the task on the device `--device` names).
fn check_device<T: Task>(task: &T, device: Device) -> Result<()> {
    match task.params().iter().find(|p| p.device() != device) {
        Some(p) => Err(Error::Device {
            op: "train",
            msg: format!(
                "{}: parameter `{}` is on {}, but the run's device is {device}: build the task \
                 on the device `--device` names",
                task.name(),
                p.path(),
                p.device()
            ),
        }),
        None => Ok(()),
    }
}

fn bar(total: u64, start: u64, hidden: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if hidden {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {bar:30.cyan/blue} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The steady-state step times: every step after the first (whose one-off work, kernel
/// compilation and allocator warm-up, is not the steady state), or the one step of a
/// one-step run.
fn steady(step_ms: &mut [f64]) -> &mut [f64] {
    match step_ms.len() {
        0 | 1 => step_ms,
        _ => &mut step_ms[1..],
    }
}

/// Trains the task `make` builds, as `args` say, with the trainer's `defaults` for unset
/// flags. Prints nothing to stdout (the caller prints the report and summary).
///
/// `make` must build the task on the device `args.device` names (checked: a parameter
/// elsewhere is an error); a CUDA device is initialised here, before `make` runs.
pub fn train<T: Task>(
    args: &TrainArgs,
    defaults: Defaults,
    make: impl Fn() -> Result<T>,
) -> Result<Outcome> {
    let device: Device = args.device.parse()?;
    if let Device::Cuda(ordinal) = device {
        // Opens the GPU and registers its backend (a clear error without a CUDA driver).
        dynn_ops::cuda::init(ordinal)?;
    }
    device.backend()?;
    if args.grad_accum == 0 {
        return Err(Error::invalid("train", "--grad-accum must be at least 1"));
    }
    let steps = args.steps.unwrap_or(defaults.steps);
    let batch = args.batch.unwrap_or(defaults.batch);
    let peak_lr = args.lr.unwrap_or(defaults.lr);
    let budget: Budget = args.device_budget.parse()?;
    let policy_name = match (&args.policy, budget) {
        (Some(p), _) => p.clone(),
        (None, Budget::Unlimited) => "none".to_string(),
        (None, _) => "lru".to_string(),
    };
    let peak = match budget {
        Budget::FractionOfPeak(_) => Some(unlimited_peak(&make, device, args, &defaults)?),
        _ => None,
    };
    let budget_bytes = budget.resolve(peak)?;
    if let (Device::Cuda(ordinal), Some(bytes)) = (device, budget_bytes)
        && dynn_ops::cuda::arena_request()? == dynn_ops::cuda::ArenaRequest::Budget
    {
        // The buffers' device memory as a few large allocations (`DYNN_CUDA_ARENA=budget`).
        dynn_ops::cuda::device(ordinal)?.reserve(dynn_ops::cuda::arena_for_budget(bytes))?;
    }
    if let Device::Cuda(ordinal) = device
        && let Err(e) = dynn_ops::cuda::device(ordinal).and_then(|d| d.reset_memory_high())
    {
        // Only the closing log line depends on it (the mark then covers the profiling too).
        tracing::warn!(error = %e, "could not reset the CUDA memory high-water mark");
    }
    let mm: Arc<MemoryManager> =
        MemoryManager::new(manager_config(&policy_name, budget_bytes, args)?);
    let _hooks = install_memory_hooks(mm.clone());
    tracing::info!(
        policy = %policy_name,
        budget = ?budget_bytes.map(human_bytes),
        unlimited_peak = ?peak.map(human_bytes),
        "memory manager installed"
    );

    let mut task = make()?;
    check_device(&task, device)?;
    task.set_train(true);
    let params = task.params();
    let n_params: usize = params.iter().map(|p| p.elem_count()).sum();
    tracing::info!(model = task.name(), parameters = n_params, "model built");
    let mut opt = Adam::new(AdamConfig::adamw(peak_lr))?;
    let schedule = WarmupCosine {
        peak: peak_lr,
        min_lr: peak_lr * 0.1,
        warmup: (steps / 10).max(1),
        total: steps,
    };
    let mut rng = Rng::new(args.seed ^ 0xDA7A);
    let mut start_step = 0;
    if let Some(path) = &args.resume {
        let ckpt = Checkpoint::load(path)?;
        let resumed = ckpt
            .restore_training(&params, &mut opt, task.name(), &task.config())
            .map_err(|e| match e {
                Error::Checkpoint { msg, .. } => Error::Checkpoint {
                    path: path.display().to_string(),
                    msg,
                },
                e => e,
            })?;
        start_step = resumed.step;
        if let Some(&s) = resumed.rngs.get(DATA_RNG) {
            rng = Rng::from_state(s);
        }
        if let (Some(seeds), Some(&pos)) = (task.seeds(), resumed.rngs.get(DROPOUT_RNG)) {
            seeds.set_position(pos);
        }
        tracing::info!(step = start_step, path = %path.display(), "resumed");
    }

    let save = |task: &T, opt: &Adam, rng: &Rng, step: u64| -> Result<()> {
        let Some(last) = &args.checkpoint else {
            return Ok(());
        };
        let path = if step < steps {
            &periodic_path(last, step)
        } else {
            last
        };
        let mut rngs = vec![(DATA_RNG, rng.state())];
        if let Some(s) = task.seeds() {
            rngs.push((DROPOUT_RNG, s.position()));
        }
        Checkpoint::from_training(&params, opt, step, &rngs, task.name(), &task.config())
            .save(path)?;
        tracing::info!(step, path = %path.display(), "checkpoint written");
        Ok(())
    };

    let pb = bar(
        steps,
        start_step,
        args.quiet || args.json && !console_is_tty(),
    );
    let norm_watch = match args.clip > 0.0 {
        true => Some(GradNormWatch::new(&params)?),
        false => None,
    };
    let started = Instant::now();
    let mut losses = Vec::new();
    let mut units = 0usize;
    let mut smooth = None;
    let mut step_ms = Vec::new();
    let mut host_ref_us = Vec::new();
    // Time spent on the host-speed probe: left out of the run's time and throughput.
    let mut probe_secs = 0.0;
    for step in start_step..steps {
        let step_started = Instant::now();
        opt.set_lr(schedule.lr_at(step));
        let mut step_loss = 0.0;
        let mut note = String::new();
        for _ in 0..args.grad_accum {
            let out = task.step(&mut rng, batch)?;
            let scaled = if args.grad_accum == 1 {
                out.loss.clone()
            } else {
                out.loss.scale(1.0 / args.grad_accum as f64)?
            };
            scaled.backward()?;
            step_loss += out.loss.to_scalar_f64()? / args.grad_accum as f64;
            units += out.units;
            note = out.note;
        }
        if !step_loss.is_finite() {
            return Err(Error::Msg(format!(
                "{}: the loss became {step_loss} at step {step}; lower --lr",
                task.name()
            )));
        }
        // Clipping's factor goes into the update (Adam folds it into its moments); the norm
        // was taken during the backward pass.
        let scale = match &norm_watch {
            Some(w) => clip_scale(w.norm()?, args.clip),
            None => 1.0,
        };
        opt.step_scaled(&params, scale)?;
        mark_step(step + 1);
        step_ms.push(step_started.elapsed().as_secs_f64() * 1e3);
        let probe_started = Instant::now();
        host_ref_us.push(super::host_reference_us());
        probe_secs += probe_started.elapsed().as_secs_f64();
        losses.push(step_loss);
        let s = smooth.map_or(step_loss, |m: f64| 0.9 * m + 0.1 * step_loss);
        smooth = Some(s);
        let secs = (started.elapsed().as_secs_f64() - probe_secs).max(1e-9);
        pb.set_message(format!(
            "loss {s:.4}  {:.0} {}/s  device {}  {note}",
            units as f64 / secs,
            task.unit(),
            human_bytes(mm.device_in_use())
        ));
        pb.inc(1);
        if args.checkpoint_every > 0 && (step + 1) % args.checkpoint_every == 0 && step + 1 < steps
        {
            save(&task, &opt, &rng, step + 1)?;
        }
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64() - probe_secs;
    save(&task, &opt, &rng, steps)?;

    task.set_train(false);
    let mut eval_rng = Rng::new(args.seed ^ 0xE7A1);
    let eval = {
        let _g = no_grad();
        task.evaluate(&mut eval_rng)?
    };
    task.set_train(true);
    let Eval { metric, value } = eval;

    // The manager goes away with this function: bring back any parameter it dropped (a
    // recompute policy may drop one no step has updated yet), so the caller can read them.
    for p in &params {
        if p.buffer().residency() == dynn_core::Residency::Dropped {
            dynn_core::MemoryHooks::materialize(mm.as_ref(), p.buffer())?;
        }
    }
    let report = mm.report();
    if let Device::Cuda(ordinal) = device
        && let Ok(high) = dynn_ops::cuda::device(ordinal).and_then(|d| d.memory_high())
    {
        tracing::info!(
            memory_high = %human_bytes(high),
            budget = ?budget_bytes.map(human_bytes),
            "CUDA memory: the most the driver's pool held at once (frees still queued included)"
        );
        let arena = dynn_ops::cuda::device(ordinal)?.arena_stats();
        if arena.reserved > 0 {
            tracing::info!(
                reserved = %human_bytes(arena.reserved),
                peak_in_use = %human_bytes(arena.peak_in_use),
                allocations = arena.allocations,
                misses = arena.misses,
                "CUDA arena: buffers carved from the reserved regions (misses came from the driver's pool)"
            );
        }
    }
    let window = (losses.len() / 10).max(1);
    let run_steps = losses.len().max(1) as f64;
    let summary = Summary {
        model: task.name().to_string(),
        steps,
        loss_first: mean(&losses[..window.min(losses.len())]),
        loss_last: mean(&losses[losses.len().saturating_sub(window)..]),
        eval_metric: metric.to_string(),
        eval_value: value,
        step_ms_mean: secs * 1e3 / run_steps,
        step_ms_median: median(steady(&mut step_ms)),
        peak_device_bytes: report.stats.peak_device_bytes,
        moves: report.stats.evictions + report.stats.demand_fetches,
        move_host_us: report.stats.move_host_us(),
        repacks: report.stats.compactions,
        repack_block_us: report.stats.repack_block_us(),
        host_ref_us: median(steady(&mut host_ref_us)),
        distinct_graphs: report.stats.distinct_graphs,
        policy: policy_name,
        budget_bytes,
        units_per_sec: units as f64 / secs.max(1e-9),
        params_fnv: super::summary::params_fnv(&params)?,
    };
    if let Some(path) = &args.plot {
        let title = format!(
            "{}, policy {}, budget {}",
            task.name(),
            summary.policy,
            args.device_budget
        );
        std::fs::write(path, report.timeline_svg(&title))?;
        tracing::info!(path = %path.display(), "memory timeline written");
    }
    if let Some(path) = &args.trace_out {
        mm.trace().save(path)?;
        tracing::info!(path = %path.display(), "access trace written");
    }
    Ok(Outcome {
        summary,
        report,
        losses,
        params,
        trace: mm.trace(),
    })
}

/// Where the checkpoint of `step` goes when `--checkpoint-every` writes one before the end:
/// `run.safetensors` → `run-step200.safetensors` (the final one keeps the given name).
pub fn periodic_path(last: &std::path::Path, step: u64) -> std::path::PathBuf {
    let stem = last
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("checkpoint");
    let ext = last
        .extension()
        .and_then(|s| s.to_str())
        .unwrap_or("safetensors");
    last.with_file_name(format!("{stem}-step{step}.{ext}"))
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Sets up `tracing` (RUST_LOG, default `info`, to stderr), trains, prints the loss curve,
/// the memory report and (with `--json`) the summary as the last line; exits non-zero with
/// the error's message on failure. A trainer's `main` is one call to this.
pub fn main<T: Task>(args: &TrainArgs, defaults: Defaults, make: impl Fn() -> Result<T>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    // The kernels run partly on this thread (see `init_threads`).
    dynn_ops::cpu::init_threads();
    match train(args, defaults, make) {
        Ok(out) => print_outcome(&out, args.json),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// Prints the loss curve (ten points), the evaluation, the memory report and, with `json`,
/// the summary as the last line.
pub fn print_outcome(out: &Outcome, json: bool) {
    let s = &out.summary;
    let n = out.losses.len();
    if n > 0 {
        println!("step   mean loss");
        let chunk = n.div_ceil(10);
        let first = s.steps as usize - n;
        for (i, c) in out.losses.chunks(chunk).enumerate() {
            println!("{:>5}  {:.4}", first + i * chunk, mean(c));
        }
    }
    println!(
        "{}: {} steps, {:.1} ms/step, {:.0} units/s; loss {:.4} -> {:.4}; {} = {:.4}; {} distinct graphs",
        s.model,
        s.steps,
        s.step_ms_mean,
        s.units_per_sec,
        s.loss_first,
        s.loss_last,
        s.eval_metric,
        s.eval_value,
        s.distinct_graphs
    );
    println!("{}", out.report);
    if json {
        match serde_json::to_string(s) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("error: cannot serialise the summary: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{median, steady};

    #[test]
    fn the_steady_state_leaves_out_the_first_step() {
        // A first step ten times slower than the rest does not move the median.
        let mut steps = [100.0, 10.0, 12.0, 11.0];
        assert_eq!(median(steady(&mut steps)), 11.0);
        assert_eq!(median(steady(&mut [7.0])), 7.0);
    }
}
