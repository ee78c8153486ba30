//! Train the child-sum Tree-LSTM on ListOps: nested list operations (`[MAX 2 9 [MIN 4 7 ] 0 ]`)
//! evaluated bottom-up, one batched cell call per tree level. Every batch has its own trees, so
//! every step has its own graph.
//!
//! ```sh
//! cargo run --release --example train_treelstm -- --json
//! cargo run --release --example train_treelstm -- --max-depth 5 --device-budget 50%
//! ```

use clap::Parser;
use dynn_core::Device;
use dynn_models::models::tree_lstm::{DEFAULTS, TreeLstmConfig, TreeLstmTask};
use dynn_models::train::{self, TrainArgs};

/// Train a Tree-LSTM on ListOps expression trees; reports held-out accuracy.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// Token embedding width.
    #[arg(long, default_value_t = TreeLstmConfig::default().embed)]
    embed: usize,
    /// Hidden state width.
    #[arg(long, default_value_t = TreeLstmConfig::default().hidden)]
    hidden: usize,
    /// Deepest tree, in operator levels.
    #[arg(long, default_value_t = TreeLstmConfig::default().max_depth)]
    max_depth: usize,
    /// Most arguments of one operator.
    #[arg(long, default_value_t = TreeLstmConfig::default().max_args)]
    max_args: usize,
    /// Most nodes in one tree.
    #[arg(long, default_value_t = TreeLstmConfig::default().max_nodes)]
    max_nodes: usize,
    /// Nodes of one tree level computed together (smaller: smaller ops, so tighter budgets
    /// run).
    #[arg(long, default_value_t = TreeLstmConfig::default().level_chunk)]
    level_chunk: usize,
}

fn main() {
    dynn::pilot::register(); // `--policy pilot`
    let args = Args::parse();
    let cfg = TreeLstmConfig {
        embed: args.embed,
        hidden: args.hidden,
        max_depth: args.max_depth,
        max_args: args.max_args,
        max_nodes: args.max_nodes,
        level_chunk: args.level_chunk,
        ..TreeLstmConfig::default()
    };
    let seed = args.train.seed;
    let device = args.train.device.clone();
    train::main(&args.train, DEFAULTS, move || {
        let device: Device = device.parse()?;
        TreeLstmTask::new(cfg.clone(), seed, device)
    });
}
