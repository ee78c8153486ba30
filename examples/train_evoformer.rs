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
use dynn::core::Device;
use dynn::models::models::evoformer::{EvoformerConfig, EvoformerTask};
use dynn::models::train::{Defaults, TrainArgs, main as train_main};

/// Train the Evoformer-lite with recycling on synthetic protein distograms.
#[derive(Parser, Debug)]
#[command(version)]
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
    /// Compute the outer-product mean in chunks of residue rows of at most this many bytes
    /// each (AlphaFold-style chunking; default: one chunk).
    #[arg(long)]
    chunk_bytes: Option<usize>,
}

fn main() {
    dynn::pilot::register(); // `--policy pilot`
    let cli = Cli::parse();
    let cfg = EvoformerConfig {
        msa_dim: cli.msa_dim,
        pair_dim: cli.pair_dim,
        heads: cli.heads,
        blocks: cli.blocks,
        max_recycles: cli.max_recycles,
        len: cli.len,
        msa_depth: cli.msa_depth,
        bins: cli.bins,
        chunk_bytes: cli.chunk_bytes,
        ..EvoformerConfig::default()
    };
    let defaults = Defaults {
        steps: 600,
        batch: 8,
        lr: 5e-3,
    };
    let seed = cli.train.seed;
    train_main(&cli.train, defaults, || {
        let device: Device = cli.train.device.parse()?;
        EvoformerTask::new(cfg.clone(), seed, device)
    });
}
