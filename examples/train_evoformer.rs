//! Trains the AlphaFold-style Evoformer-lite to predict distograms of synthetic proteins from
//! their MSAs. Each step draws 1..=max-recycles iterations of the whole network: all but the
//! last run without gradients and feed their pair representation (and first MSA row) back,
//! so the graph changes from step to step.
//!
//! ```text
//! cargo run --release --example train_evoformer -- --json
//! cargo run --release --example train_evoformer -- --max-recycles 6 --device-budget 50% --policy lru
//! ```

use clap::Parser;
use dynn::models::models::evoformer::{EvoformerConfig, EvoformerTask};
use dynn::models::train::{Defaults, TrainArgs, main as train_main};

/// Train the Evoformer-lite with recycling on synthetic protein distograms.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    train: TrainArgs,
    /// Width of the MSA representation.
    #[arg(long, default_value_t = EvoformerConfig::default().msa_dim)]
    msa_dim: usize,
    /// Width of the pair representation.
    #[arg(long, default_value_t = EvoformerConfig::default().pair_dim)]
    pair_dim: usize,
    /// Attention heads (must divide --msa-dim).
    #[arg(long, default_value_t = EvoformerConfig::default().heads)]
    heads: usize,
    /// Evoformer blocks.
    #[arg(long, default_value_t = EvoformerConfig::default().blocks)]
    blocks: usize,
    /// The most iterations a step draws (evaluation uses this many).
    #[arg(long, default_value_t = EvoformerConfig::default().max_recycles)]
    max_recycles: usize,
    /// Residues per chain.
    #[arg(long, default_value_t = EvoformerConfig::default().len)]
    len: usize,
    /// Sequences per MSA.
    #[arg(long, default_value_t = EvoformerConfig::default().msa_depth)]
    msa_depth: usize,
    /// Distogram bins.
    #[arg(long, default_value_t = EvoformerConfig::default().bins)]
    bins: usize,
}

fn main() {
    let cli = Cli::parse();
    if std::env::var("EVO_FLOOR").is_ok() {
        prof::floors(EvoformerConfig::default());
        return;
    }
    if std::env::var("EVO_PROF").is_ok() {
        let c = EvoformerConfig {
            msa_dim: cli.msa_dim,
            pair_dim: cli.pair_dim,
            ..EvoformerConfig::default()
        };
        prof::run(c, cli.train.batch.unwrap_or(8));
        return;
    }
    let cfg = EvoformerConfig {
        msa_dim: cli.msa_dim,
        pair_dim: cli.pair_dim,
        heads: cli.heads,
        blocks: cli.blocks,
        max_recycles: cli.max_recycles,
        len: cli.len,
        msa_depth: cli.msa_depth,
        bins: cli.bins,
        ..EvoformerConfig::default()
    };
    let defaults = Defaults {
        steps: 300,
        batch: 8,
        lr: 3e-3,
    };
    let seed = cli.train.seed;
    train_main(&cli.train, defaults, || {
        EvoformerTask::new(cfg.clone(), seed)
    });
}

mod prof {
    use dynn::core::{MemoryHooks, OpEvent, install_memory_hooks};
    use dynn::models::Rng;
    use dynn::models::models::evoformer::{EvoformerConfig, EvoformerTask};
    use dynn::models::train::Task;
    use dynn::ops::prelude::Backward;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    #[derive(Default)]
    struct P {
        cur: Mutex<Option<(Instant, String)>>,
        tot: Mutex<HashMap<String, (f64, usize)>>,
    }
    impl MemoryHooks for P {
        fn before_op(&self, e: &OpEvent<'_>) -> dynn::Result<()> {
            *self.cur.lock().unwrap() = Some((Instant::now(), format!("{:?}:{}", e.phase, e.op)));
            Ok(())
        }
        fn after_op(&self, _e: &OpEvent<'_>) -> dynn::Result<()> {
            if let Some((t, n)) = self.cur.lock().unwrap().take() {
                let mut m = self.tot.lock().unwrap();
                let x = m.entry(n).or_default();
                x.0 += t.elapsed().as_secs_f64();
                x.1 += 1;
            }
            Ok(())
        }
    }
    pub fn floors(cfg: EvoformerConfig) {
        use dynn::models::data::protein;
        let pc = cfg.protein();
        let (l, s, nb) = (pc.len, pc.msa_depth, pc.bins);
        let mut rng = Rng::new(5);
        // key -> histogram
        let mut h1: HashMap<usize, Vec<f64>> = HashMap::new();
        let mut h2: HashMap<(usize, bool), Vec<f64>> = HashMap::new();
        let mut h3: HashMap<(usize, u8), Vec<f64>> = HashMap::new();
        for _ in 0..3000 {
            let smp = protein::sample(&mut rng, &pc);
            let mutp = |c: usize| -> Vec<bool> {
                (1..s).map(|r| smp.msa[r * l + c] != smp.msa[c]).collect()
            };
            for i in 0..l {
                for j in 0..l {
                    if i == j {
                        continue;
                    }
                    let sep = i.abs_diff(j);
                    let b = smp.distogram[i * l + j] as usize;
                    let (mi, mj) = (mutp(i), mutp(j));
                    let co = mi == mj && mi.iter().any(|&x| x);
                    let nmut = (mi.iter().filter(|&&x| x).count()
                        + mj.iter().filter(|&&x| x).count()) as u8;
                    h1.entry(sep).or_insert(vec![0.0; nb])[b] += 1.0;
                    h2.entry((sep, co)).or_insert(vec![0.0; nb])[b] += 1.0;
                    h3.entry((sep, if co { 255 } else { nmut.min(14) }))
                        .or_insert(vec![0.0; nb])[b] += 1.0;
                }
            }
        }
        fn ent<K>(h: &HashMap<K, Vec<f64>>) -> f64 {
            let tot: f64 = h.values().flat_map(|v| v.iter()).sum();
            let mut e = 0.0;
            for v in h.values() {
                let n: f64 = v.iter().sum();
                for &c in v {
                    if c > 0.0 {
                        e -= c / tot * (c / n).ln();
                    }
                }
            }
            e
        }
        println!(
            "H(bin|sep) {:.4}  H(bin|sep,co) {:.4}  H(bin|sep,co,nmut) {:.4}",
            ent(&h1),
            ent(&h2),
            ent(&h3)
        );
    }
    pub fn run(cfg: EvoformerConfig, batch: usize) {
        let p = Arc::new(P::default());
        let _g = install_memory_hooks(p.clone());
        let mut task = EvoformerTask::new(cfg, 0).unwrap();
        let mut rng = Rng::new(1);
        let t0 = Instant::now();
        let mut tdata = 0.0;
        for _ in 0..10 {
            let t = Instant::now();
            let _ = dynn::models::data::protein::batch(
                &mut rng.clone(),
                &task.model().cfg.protein(),
                batch,
            );
            tdata += t.elapsed().as_secs_f64();
            let out = task.step(&mut rng, batch).unwrap();
            out.loss.backward().unwrap();
            for q in task.params() {
                q.zero_grad();
            }
        }
        let total = t0.elapsed().as_secs_f64();
        let m = p.tot.lock().unwrap();
        let mut v: Vec<_> = m.iter().collect();
        v.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
        let ops: f64 = v.iter().map(|x| x.1.0).sum();
        let n: usize = v.iter().map(|x| x.1.1).sum();
        println!("total {total:.3}s ops {ops:.3}s nops {n} data(extra) {tdata:.3}");
        for (k, (t, c)) in v.iter().take(30) {
            println!("{k:40} {t:.4} {c}");
        }
    }
}
