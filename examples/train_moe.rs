//! Trains the Mixture-of-Experts transformer LM: each token is routed to its top-k experts,
//! experts over capacity drop tokens, and only the experts that receive tokens run, so the
//! graph follows the data.
//!
//! ```text
//! cargo run --release --example train_moe -- --experts 16 --device-budget 50% --json
//! ```

use clap::Parser;
use dynn::core::Device;
use dynn::models::models::moe::{MoeConfig, MoeTask};
use dynn::models::train::{Defaults, TrainArgs, main as train_main};
use std::path::PathBuf;

/// Train the Mixture-of-Experts transformer language model.
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
    /// Transformer blocks (each with a Mixture-of-Experts feed-forward).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Experts per block.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token: 1 (Switch) or 2.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Hidden width of each expert.
    #[arg(long, default_value_t = 128)]
    expert_hidden: usize,
    /// Expert capacity as a multiple of an even share of the tokens.
    #[arg(long, default_value_t = 1.25)]
    capacity_factor: f64,
    /// Weight of the load-balancing loss.
    #[arg(long, default_value_t = 0.01)]
    aux_loss_weight: f64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Attention and residual dropout.
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
    let cfg = MoeConfig {
        vocab: cli.vocab,
        dim: cli.dim,
        heads: cli.heads,
        layers: cli.layers,
        experts: cli.experts,
        top_k: cli.top_k,
        expert_hidden: cli.expert_hidden,
        capacity_factor: cli.capacity_factor,
        aux_loss_weight: cli.aux_loss_weight,
        seq: cli.seq,
        dropout: cli.dropout,
    };
    let defaults = Defaults {
        steps: 300,
        batch: 16,
        lr: 3e-3,
    };
    let seed = cli.train.seed;
    train_main(&cli.train, defaults, || {
        let device: Device = cli.train.device.parse()?;
        MoeTask::new(&cfg, cli.data.as_deref(), seed, device)
    });
}
