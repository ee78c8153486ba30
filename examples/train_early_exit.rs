//! Trains the early-exit transformer LM: every block has an exit head, and each sequence
//! leaves at the first block confident enough in its next-token predictions, so the depth
//! follows the data.
//!
//! ```text
//! cargo run --release --example train_early_exit -- --device-budget 50% --json
//! ```

use clap::Parser;
use dynn::core::Device;
use dynn::models::models::early_exit::{EarlyExitConfig, EarlyExitTask, TextSource};
use dynn::models::train::{Defaults, TrainArgs, main as train_main};
use std::path::PathBuf;

/// Train the early-exit transformer language model.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    train: TrainArgs,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Blocks (each with an exit).
    #[arg(long, default_value_t = 6)]
    layers: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// Exit once a sequence's mean top-token probability reaches this.
    #[arg(long, default_value_t = 0.4)]
    threshold: f64,
    /// Residual dropout.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// BPE vocabulary size.
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    /// A text file to train on (default: the generated corpus).
    #[arg(long)]
    data: Option<PathBuf>,
}

fn main() {
    dynn::pilot::register(); // `--policy pilot`
    let cli = Cli::parse();
    let cfg = EarlyExitConfig {
        dim: cli.dim,
        heads: cli.heads,
        layers: cli.layers,
        seq: cli.seq,
        threshold: cli.threshold,
        dropout: cli.dropout,
        ..Default::default()
    };
    let text = TextSource {
        path: cli.data.clone(),
        vocab: cli.vocab,
    };
    let defaults = Defaults {
        steps: 300,
        batch: 16,
        lr: 3e-3,
    };
    let seed = cli.train.seed;
    train_main(&cli.train, defaults, || {
        let device: Device = cli.train.device.parse()?;
        EarlyExitTask::new(&cfg, &text, seed, device)
    });
}
