//! Quickstart: train a small **dynamic** network — an early-exit MLP classifier whose depth
//! changes with every batch — under a device memory budget, and print the memory report.
//!
//! ```sh
//! cargo run --release --example quickstart                       # 50% of the unlimited peak, lru
//! cargo run --release --example quickstart -- --device-budget 25% --policy belady --plot mem.svg
//! ```
//!
//! The forward pass runs residual blocks until the current exit head is confident enough
//! (or the last block), so the op sequence — the graph — differs from batch to batch. The loss
//! is the sum of the cross entropies of the exits taken. The same training under any budget
//! and policy gives bit-identical weights; only the memory traffic differs.

mod workloads;

use clap::Parser;
use dynn::core::{install_memory_hooks, mark_step};
use dynn::mm::{Budget, ManagerConfig, MemoryManager, human_bytes, policy};
use dynn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::time::Instant;
use workloads::{MlpConfig, Model, Rng, batch, sgd};

/// Train an early-exit MLP on generated data under a device memory budget.
#[derive(Parser, Debug)]
struct Args {
    /// Training steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Residual blocks (each with an exit head).
    #[arg(long, default_value_t = 6)]
    depth: usize,
    /// Exit when the mean max-probability of a head reaches this.
    #[arg(long, default_value_t = 0.8)]
    exit_confidence: f64,
    /// Learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device budget: bytes (512MiB, 2MB) or a share of the unlimited peak (25%), or unlimited.
    #[arg(long, default_value = "50%")]
    device_budget: String,
    /// Memory policy: none, lru, static, recompute, belady.
    #[arg(long, default_value = "lru")]
    policy: String,
    /// Write the memory timeline as an SVG.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Write the access trace.
    #[arg(long)]
    trace_out: Option<std::path::PathBuf>,
    /// Print one JSON summary as the last line.
    #[arg(long)]
    json: bool,
}

fn mlp_config(args: &Args) -> MlpConfig {
    MlpConfig {
        hidden: args.hidden,
        depth: args.depth,
        seed: args.seed,
    }
}

/// The manager's settings: segments sized for a model of a few hundred KiB, so that the
/// unlimited peak (and budgets as a share of it) are measured finely.
fn config(policy: Box<dyn dynn::mm::Policy>, budget: Option<usize>) -> ManagerConfig {
    let mut cfg = ManagerConfig::new(policy, budget);
    cfg.segments = (64 << 10, 1 << 20);
    cfg
}

/// Peak device bytes of one unlimited step (for budgets given as a percentage).
fn unlimited_peak(args: &Args) -> Result<usize> {
    let mm = MemoryManager::new(config(policy::by_name("none")?, None));
    let _hooks = install_memory_hooks(mm.clone());
    let model = Model::new(&mlp_config(args))?;
    let mut rng = Rng(args.seed);
    // The deepest graph bounds the peak: run every block.
    let (x, y) = batch(&mut rng, args.batch)?;
    let (loss, _) = model.loss(&x, &y, f64::INFINITY)?;
    loss.backward()?;
    sgd(&model.params(), 0.0)?;
    Ok(mm.stats().peak_device_bytes)
}

fn main() {
    // Kernels run partly on this thread (see `init_threads`).
    dynn::init_threads();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let budget: Budget = args.device_budget.parse()?;
    let peak = match budget {
        Budget::FractionOfPeak(_) => Some(unlimited_peak(&args)?),
        _ => None,
    };
    let budget_bytes = budget.resolve(peak)?;
    let mut cfg = config(policy::by_name(&args.policy)?, budget_bytes);
    cfg.record_timeline = args.plot.is_some();
    cfg.record_trace = args.trace_out.is_some();
    let mm = MemoryManager::new(cfg);
    let _hooks = install_memory_hooks(mm.clone());
    tracing::info!(policy = %args.policy, budget = ?budget_bytes.map(human_bytes), unlimited_peak = ?peak.map(human_bytes), "memory manager installed");

    let model = Model::new(&mlp_config(&args))?;
    let n_params: usize = model.params().iter().map(|p| p.elem_count()).sum();
    let mut rng = Rng(args.seed);
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:32} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut losses = Vec::new();
    let mut exits: BTreeMap<usize, usize> = BTreeMap::new();
    for step in 0..args.steps {
        let (x, y) = batch(&mut rng, args.batch)?;
        let (loss, exit) = model.loss(&x, &y, args.exit_confidence)?;
        loss.backward()?;
        sgd(&model.params(), args.lr)?;
        mark_step(step as u64 + 1);
        let l = loss.to_scalar::<f32>()? / exit as f32;
        losses.push(l);
        *exits.entry(exit).or_default() += 1;
        let resident = mm.report().pool.in_use;
        bar.set_message(format!(
            "loss/exit {l:.3}  exit {exit}  device {}",
            human_bytes(resident)
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let avg = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
    let window = (args.steps / 10).max(1);
    let (first, last) = (
        avg(&losses[..window.min(losses.len())]),
        avg(&losses[losses.len().saturating_sub(window)..]),
    );
    println!("step   mean loss per exit");
    for chunk_start in (0..losses.len()).step_by(window) {
        println!(
            "{chunk_start:>4}   {:.4}",
            avg(&losses[chunk_start..(chunk_start + window).min(losses.len())])
        );
    }
    println!("exits taken (block: steps): {exits:?}");
    println!(
        "trained {} steps in {:.2}s ({:.2} ms/step), {} parameters; loss {:.4} -> {:.4}",
        args.steps,
        secs,
        secs * 1e3 / args.steps.max(1) as f64,
        n_params,
        first,
        last
    );
    let report = mm.report();
    println!("{report}");
    if let Some(path) = &args.plot {
        let title = format!(
            "early-exit MLP, policy {}, budget {}",
            args.policy, args.device_budget
        );
        std::fs::write(path, report.timeline_svg(&title))?;
        println!("memory timeline written to {}", path.display());
    }
    if let Some(path) = &args.trace_out {
        mm.trace().save(path)?;
        println!("access trace written to {}", path.display());
    }
    if args.json {
        let trace_graphs = exits.len();
        println!(
            "{{\"model\":\"early_exit_mlp\",\"steps\":{},\"loss_first\":{first:.5},\"loss_last\":{last:.5},\"step_ms_mean\":{:.3},\"peak_device_bytes\":{},\"budget_bytes\":{},\"policy\":\"{}\",\"distinct_graphs\":{trace_graphs}}}",
            args.steps,
            secs * 1e3 / args.steps.max(1) as f64,
            report.stats.peak_device_bytes,
            budget_bytes.map_or("null".to_string(), |b| b.to_string()),
            args.policy
        );
    }
    Ok(())
}
