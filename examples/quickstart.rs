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

use clap::Parser;
use dynn::core::{install_memory_hooks, mark_step};
use dynn::mm::{Budget, ManagerConfig, MemoryManager, human_bytes, policy};
use dynn::ops::ops::random::rand_normal;
use dynn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::time::Instant;

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

const IN: usize = 16;
const CLASSES: usize = 4;

/// splitmix64 for the data.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// A batch of points labelled by which quadrant of a rotated, warped plane they fall in.
fn batch(rng: &mut Rng, n: usize) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..n * IN).map(|_| rng.next_f32()).collect();
    let y: Vec<u32> = x
        .chunks(IN)
        .map(|r| {
            let (a, b) = (r[0] + 0.5 * (3.0 * r[2]).sin(), r[1] - 0.3 * r[3] * r[4]);
            (a > 0.0) as u32 * 2 + (b > 0.0) as u32
        })
        .collect();
    Ok((
        Tensor::from_vec(x, (n, IN), Device::Cpu)?,
        Tensor::from_vec(y, n, Device::Cpu)?,
    ))
}

struct Model {
    stem: (Tensor, Tensor),
    blocks: Vec<(Tensor, Tensor)>,
    heads: Vec<Tensor>,
}

impl Model {
    fn new(args: &Args) -> Result<Self> {
        let h = args.hidden;
        let mut seed = args.seed * 1000;
        let mut param = |shape: (usize, usize), std: f64| -> Result<Tensor> {
            seed += 1;
            let t = rand_normal(shape, 0.0, std, DType::F32, seed, Device::Cpu)?
                .set_requires_grad(true);
            t.set_kind(BufferKind::Parameter);
            Ok(t)
        };
        let stem = (
            param((IN, h), (1.0 / IN as f64).sqrt())?,
            param((1, h), 0.0)?,
        );
        let mut blocks = Vec::new();
        let mut heads = Vec::new();
        for _ in 0..args.depth {
            blocks.push((param((h, h), (1.0 / h as f64).sqrt())?, param((1, h), 0.0)?));
            heads.push(param((h, CLASSES), (1.0 / h as f64).sqrt())?);
        }
        Ok(Model {
            stem,
            blocks,
            heads,
        })
    }

    fn params(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.stem.0, &self.stem.1];
        for (b, h) in self.blocks.iter().zip(&self.heads) {
            v.extend([&b.0, &b.1, h]);
        }
        v
    }

    /// Forward until an exit is confident; returns the joint loss and the exit taken.
    fn loss(&self, x: &Tensor, y: &Tensor, confidence: f64) -> Result<(Tensor, usize)> {
        let mut h = x.matmul(&self.stem.0)?.add(&self.stem.1)?.gelu()?;
        let mut total: Option<Tensor> = None;
        for (i, ((w, b), head)) in self.blocks.iter().zip(&self.heads).enumerate() {
            h = h.add(&h.matmul(w)?.add(b)?.gelu()?)?;
            let logits = h.matmul(head)?;
            let l = logits.cross_entropy(y, Default::default())?;
            total = Some(match total {
                Some(t) => t.add(&l)?,
                None => l,
            });
            let conf = {
                let _g = no_grad();
                logits
                    .softmax(-1)?
                    .max_dims(&[-1], false)?
                    .mean_all()?
                    .to_scalar_f64()?
            };
            if conf >= confidence || i + 1 == self.blocks.len() {
                let loss = total.ok_or_else(|| Error::Msg("no block ran".into()))?;
                return Ok((loss, i + 1));
            }
        }
        Err(Error::invalid(
            "quickstart",
            "the model has no blocks (--depth 0)",
        ))
    }
}

/// One step of plain SGD on every parameter.
fn sgd(model: &Model, lr: f64) -> Result<()> {
    let _g = no_grad();
    let _p = enter_phase(Phase::Optimizer);
    for p in model.params() {
        if let Some(g) = p.grad() {
            p.axpy_(-lr, &g)?;
        }
        p.zero_grad();
    }
    Ok(())
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
    let model = Model::new(args)?;
    let mut rng = Rng(args.seed);
    // The deepest graph bounds the peak: run every block.
    let (x, y) = batch(&mut rng, args.batch)?;
    let (loss, _) = model.loss(&x, &y, f64::INFINITY)?;
    loss.backward()?;
    sgd(&model, 0.0)?;
    Ok(mm.stats().peak_device_bytes)
}

fn main() {
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

    let model = Model::new(&args)?;
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
        sgd(&model, args.lr)?;
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
