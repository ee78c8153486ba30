//! The workloads the comparison records: the four DyNN trainers of `dynn-models` (through
//! the shared training loop) and a static stack of the one-block transformer of
//! `examples/workloads`, at a batch size and a width that can both be scaled.

use super::record::{Recorded, record_loop, record_task};
use crate::workloads::{Rng, Transformer, sgd};
use dynn::core::Device;
use dynn::models::data::{TextDataset, load_corpus};
use dynn::models::models::early_exit::{EarlyExitConfig, EarlyExitTask};
use dynn::models::models::evoformer::{EvoformerConfig, EvoformerTask};
use dynn::models::models::moe::{MoeConfig, MoeTask};
use dynn::models::models::tree_lstm::{
    DEFAULTS as TREE_LSTM_DEFAULTS, TreeLstmConfig, TreeLstmTask,
};
use dynn::prelude::*;
use std::cell::OnceCell;
use std::sync::Arc;

/// Parameter, data and dropout seed of every workload.
const SEED: u64 = 0;
/// BPE vocabulary of the two language models.
const VOCAB: usize = 512;

/// A workload's scalable sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Size {
    /// Samples (sequences, trees, proteins) per step.
    pub batch: usize,
    /// The model's hidden width.
    pub width: usize,
}

/// One of the bundled workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Mixture-of-Experts transformer LM (`dynn-models`).
    Moe,
    /// Early-exit transformer LM (`dynn-models`).
    EarlyExit,
    /// Child-sum Tree-LSTM on ListOps (`dynn-models`).
    TreeLstm,
    /// Evoformer-lite with recycling (`dynn-models`).
    Evoformer,
    /// A stack of the one-block transformer of `examples/workloads`: a static graph.
    Transformer,
}

/// Every workload, in table order.
pub const ALL: [Workload; 5] = [
    Workload::Moe,
    Workload::EarlyExit,
    Workload::TreeLstm,
    Workload::Evoformer,
    Workload::Transformer,
];

/// Data shared by the workloads of one run (the tokenized corpus is built once).
#[derive(Default)]
pub struct Shared {
    text: OnceCell<Arc<TextDataset>>,
}

impl Shared {
    fn text(&self) -> Result<Arc<TextDataset>> {
        if let Some(t) = self.text.get() {
            return Ok(t.clone());
        }
        let corpus = load_corpus(None, SEED)?;
        let t = Arc::new(TextDataset::new(&corpus, VOCAB)?);
        Ok(self.text.get_or_init(|| t).clone())
    }
}

/// Static transformer: blocks and tokens per sequence.
const TF_LAYERS: usize = 8;
const TF_SEQ: usize = 32;

impl Workload {
    /// The name used in the table, the JSON and `--models`.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Moe => "moe",
            Workload::EarlyExit => "early_exit",
            Workload::TreeLstm => "tree_lstm",
            Workload::Evoformer => "evoformer",
            Workload::Transformer => "transformer",
        }
    }

    /// The workload called `name`.
    pub fn parse(name: &str) -> Result<Workload> {
        ALL.into_iter().find(|w| w.name() == name).ok_or_else(|| {
            let names: Vec<_> = ALL.iter().map(|w| w.name()).collect();
            Error::invalid(
                "--models",
                format!("unknown model {name:?}: choose from {}", names.join(", ")),
            )
        })
    }

    /// The size the default table replays (and the base of the size search).
    pub fn base(self) -> Size {
        let (batch, width) = match self {
            Workload::Moe => (4, 64),
            Workload::EarlyExit => (4, 64),
            Workload::TreeLstm => (32, 128),
            Workload::Evoformer => (2, 32),
            Workload::Transformer => (8, 64),
        };
        Size { batch, width }
    }

    /// Widths must be multiples of this (attention heads divide the width).
    pub fn width_unit(self) -> usize {
        8
    }

    /// What the width is and the fixed sizes, for the output.
    pub fn describe(self, s: Size) -> String {
        let Size { batch, width } = s;
        match self {
            Workload::Moe => {
                let c = moe_cfg(width);
                format!(
                    "batch {batch} x {} tokens, dim {width}, {} layers, {} experts top-{}, expert hidden {}",
                    c.seq, c.layers, c.experts, c.top_k, c.expert_hidden
                )
            }
            Workload::EarlyExit => {
                let c = early_exit_cfg(width);
                format!(
                    "batch {batch} x {} tokens, dim {width}, {} layers, exit threshold {}",
                    c.seq, c.layers, c.threshold
                )
            }
            Workload::TreeLstm => {
                let c = tree_lstm_cfg(width);
                format!(
                    "batch {batch} trees, hidden {width}, embed {}, depth <= {}, <= {} nodes",
                    c.embed, c.max_depth, c.max_nodes
                )
            }
            Workload::Evoformer => {
                let c = evoformer_cfg(width);
                format!(
                    "batch {batch} proteins of {} residues x {} sequences, msa/pair dim {width}, {} blocks, 1..={} recycles",
                    c.len, c.msa_depth, c.blocks, c.max_recycles
                )
            }
            Workload::Transformer => {
                format!("batch {batch} x {TF_SEQ} tokens, dim {width}, {TF_LAYERS} blocks, SGD")
            }
        }
    }

    /// Trains `STEPS` steps at `size` with no budget and keeps the trace.
    pub fn record(self, shared: &Shared, size: Size) -> Result<Recorded> {
        let Size { batch, width } = size;
        match self {
            Workload::Moe => {
                let (cfg, text) = (moe_cfg(width), shared.text()?);
                record_task(batch, 3e-3, || {
                    MoeTask::with_data(&cfg, (*text).clone(), SEED, Device::Cpu)
                })
            }
            Workload::EarlyExit => {
                let (cfg, text) = (early_exit_cfg(width), shared.text()?);
                record_task(batch, 3e-3, || {
                    EarlyExitTask::with_data(&cfg, text.clone(), SEED, DType::F32, Device::Cpu)
                })
            }
            Workload::TreeLstm => {
                let cfg = tree_lstm_cfg(width);
                record_task(batch, TREE_LSTM_DEFAULTS.lr, || {
                    TreeLstmTask::new(cfg.clone(), SEED, Device::Cpu)
                })
            }
            Workload::Evoformer => {
                let cfg = evoformer_cfg(width);
                record_task(batch, 3e-3, || {
                    EvoformerTask::new(cfg.clone(), SEED, Device::Cpu)
                })
            }
            Workload::Transformer => record_transformer(batch, width),
        }
    }
}

// Sizes: each step has hundreds to thousands of ops and a peak of a few to tens of MB, the
// largest single op stays under the smallest budget (12.5% of the peak) where the model allows
// it, and four steps record in about a second.

/// The MoE LM, deeper and with more experts than the trainer's default (8 layers, 16 experts)
/// so that the LM head's backward is not a large share of the peak.
fn moe_cfg(width: usize) -> MoeConfig {
    MoeConfig {
        vocab: VOCAB,
        dim: width,
        heads: 4,
        layers: 8,
        experts: 16,
        top_k: 2,
        expert_hidden: 2 * width,
        seq: 64,
        ..MoeConfig::default()
    }
}

/// The early-exit LM. In the first steps of training a sequence's mean top-token probability
/// is near 1/vocab, so the trainer's threshold (0.4) would never exit; 0.025 makes sequences
/// leave at different blocks from the first step on (at width 64 — the exits follow the width).
fn early_exit_cfg(width: usize) -> EarlyExitConfig {
    EarlyExitConfig {
        vocab: VOCAB,
        dim: width,
        heads: 4,
        layers: 8,
        seq: 64,
        threshold: 0.025,
        dropout: 0.0,
    }
}

/// The Tree-LSTM with wider states and deeper trees than the trainer's default; it cannot get
/// its largest op much below a quarter of its peak (see `docs/PERFORMANCE.md`).
fn tree_lstm_cfg(width: usize) -> TreeLstmConfig {
    TreeLstmConfig {
        hidden: width,
        eval_trees: 8,
        max_depth: 6,
        max_nodes: 60,
        embed: 128,
        // Wide levels in chunks: one op's working set stays small beside the step's peak.
        level_chunk: 96,
        ..TreeLstmConfig::default()
    }
}

/// The Evoformer's chunk bound: its outer-product mean is chunked above this many bytes, which
/// leaves the base size (batch 2) one chunk and keeps large batches from being stopped by one
/// op's operands alone.
const EVOFORMER_CHUNK_BYTES: usize = 1 << 20;

/// The Evoformer-lite at the trainer's default sizes (both representations `width` wide).
fn evoformer_cfg(width: usize) -> EvoformerConfig {
    EvoformerConfig {
        msa_dim: width,
        pair_dim: width,
        eval_samples: 1,
        len: 24,
        blocks: 2,
        chunk_bytes: Some(EVOFORMER_CHUNK_BYTES),
        ..EvoformerConfig::default()
    }
}

/// `TF_LAYERS` one-block transformers in a row, trained by SGD to map random sequences to
/// random targets: the same graph every step.
fn record_transformer(batch: usize, width: usize) -> Result<Recorded> {
    let blocks = (0..TF_LAYERS as u64)
        .map(|i| Transformer::new(width, 1 + i))
        .collect::<Result<Vec<_>>>()?;
    let params: Vec<&Tensor> = blocks.iter().flat_map(|b| b.params()).collect();
    let mut rng = Rng(1);
    record_loop(|_| {
        let (x, y) = blocks[0].batch(&mut rng, batch, TF_SEQ)?;
        let mut h = x;
        for b in &blocks {
            h = b.forward(&h)?;
        }
        h.sub(&y)?.sqr()?.mean_all()?.backward()?;
        sgd(&params, 0.01)
    })
}
