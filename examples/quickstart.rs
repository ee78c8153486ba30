//! Quickstart: train a two-layer MLP on generated data with dynn's autograd and plain SGD.
//!
//! `cargo run --release --example quickstart -- --steps 200`

use clap::Parser;
use dynn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

/// Train a small MLP regressor on a synthetic nonlinear target.
#[derive(Parser, Debug)]
struct Args {
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// A tiny deterministic PRNG (splitmix64) for data and initial weights.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
    fn uniform(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.next_f32() * 2.0 - 1.0) * scale).collect()
    }
}

const IN: usize = 16;

fn batch(rng: &mut Rng, n: usize) -> Result<(Tensor, Tensor)> {
    let x = rng.uniform(n * IN, 1.0);
    // Target: a smooth nonlinear function of the inputs.
    let y: Vec<f32> = x.chunks(IN).map(|r| (r[0] * 2.0).sin() + r[1] * r[2] - 0.5 * r[3].abs()).collect();
    Ok((Tensor::from_vec(x, (n, IN), Device::Cpu)?, Tensor::from_vec(y, (n, 1), Device::Cpu)?))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let mut rng = Rng(args.seed);
    let h = args.hidden;
    let param = |v: Vec<f32>, shape: (usize, usize)| -> Result<Tensor> {
        let t = Tensor::from_vec(v, shape, Device::Cpu)?.set_requires_grad(true);
        t.set_kind(BufferKind::Parameter);
        Ok(t)
    };
    let w1 = param(rng.uniform(IN * h, (1.0 / IN as f32).sqrt()), (IN, h))?;
    let b1 = param(vec![0.0; h], (1, h))?;
    let w2 = param(rng.uniform(h, (1.0 / h as f32).sqrt()), (h, 1))?;
    let b2 = param(vec![0.0; 1], (1, 1))?;
    let params = [&w1, &b1, &w2, &b2];
    let n_params: usize = params.iter().map(|p| p.elem_count()).sum();
    tracing::info!(n_params, hidden = h, "model built");

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise}]").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let start = Instant::now();
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    let mut history = Vec::new();
    for step in 0..args.steps {
        let (x, y) = batch(&mut rng, args.batch)?;
        let pred = x.matmul(&w1)?.add(&b1)?.gelu()?.matmul(&w2)?.add(&b2)?;
        let loss = pred.sub(&y)?.sqr()?.mean_all()?;
        loss.backward()?;
        {
            let _g = no_grad();
            let _p = enter_phase(Phase::Optimizer);
            for p in params {
                if let Some(g) = p.grad() {
                    p.axpy_(-args.lr, &g)?;
                }
                p.zero_grad();
            }
        }
        let l = loss.to_scalar::<f32>()?;
        if step == 0 {
            first = l;
        }
        last = l;
        if step % (args.steps / 10).max(1) == 0 {
            history.push((step, l));
        }
        bar.set_message(format!("loss {l:.4}"));
        bar.inc(1);
    }
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    println!("step  loss");
    for (s, l) in &history {
        println!("{s:>4}  {l:.5}");
    }
    println!(
        "trained {} steps in {:.2}s ({:.2} ms/step): loss {:.4} -> {:.4} ({:.1}% of the first), {} parameters",
        args.steps,
        secs,
        secs * 1e3 / args.steps as f64,
        first,
        last,
        100.0 * last / first,
        n_params
    );
    Ok(())
}
