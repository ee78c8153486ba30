//! The command-line interface every bundled trainer shares.

use clap::Args;
use std::path::PathBuf;

/// Flags common to every trainer (flatten them into a trainer's own `clap` parser beside its
/// model-size flags). Unset numbers take the trainer's defaults.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct TrainArgs {
    /// Optimizer steps to run (in total, counting steps before a resume).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Samples (sequences, trees, proteins) per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate (AdamW, warmup then cosine decay).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the parameters, the data and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Device memory budget: bytes (`512MiB`), a share of an unlimited step's peak (`25%`),
    /// or `unlimited`.
    #[arg(long, default_value = "unlimited")]
    pub device_budget: String,
    /// Memory policy: none, lru, static, recompute, belady, or a registered one (`pilot` in
    /// the bundled trainers). Defaults to `lru` under a budget and `none` without one.
    #[arg(long)]
    pub policy: Option<String>,
    /// Write a checkpoint (safetensors) here at the end; with `--checkpoint-every N`, also
    /// `<name>-step<k>.safetensors` every N steps.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Steps between checkpoints (with `--checkpoint`; 0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Resume from this checkpoint (parameters, optimizer, step, RNG state).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Record the memory access trace (dynn-trace JSON lines) to this file.
    #[arg(long)]
    pub trace_out: Option<PathBuf>,
    /// Write the memory timeline as an SVG plot to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip gradients to this global norm (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Under a budget, write stale buffers back to the host in the background while the
    /// download side is idle (evicting them later then copies nothing).
    #[arg(long)]
    pub write_back: bool,
    /// Do not evict ahead of need: evict only when an op needs the room, waiting for each
    /// copy on the executor's thread (see `ManagerConfig::evict_ahead`).
    #[arg(long)]
    pub no_evict_ahead: bool,
    /// Print one JSON summary as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Keep the access trace in [`Outcome::trace`](super::Outcome::trace) (for harnesses
    /// that replay it; not a command-line flag).
    #[arg(skip)]
    pub record_trace: bool,
}

impl Default for TrainArgs {
    /// The values the command line gives when no flag is passed.
    fn default() -> Self {
        TrainArgs {
            steps: None,
            batch: None,
            lr: None,
            seed: 0,
            device: "cpu".into(),
            device_budget: "unlimited".into(),
            policy: None,
            checkpoint: None,
            checkpoint_every: 0,
            resume: None,
            trace_out: None,
            plot: None,
            grad_accum: 1,
            clip: 1.0,
            write_back: false,
            no_evict_ahead: false,
            json: false,
            quiet: false,
            record_trace: false,
        }
    }
}

/// Defaults a trainer picks for the flags the user left unset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Defaults {
    /// Optimizer steps.
    pub steps: u64,
    /// Micro-batch size.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn default_is_what_an_empty_command_line_gives() {
        assert_eq!(Cli::parse_from(["trainer"]).args, TrainArgs::default());
    }
}
