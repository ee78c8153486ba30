//! The datasets of the four bundled trainers, all generated in memory and deterministic given
//! a seed (only an optional text file is read from disk):
//!
//! - [`corpus`] and [`text`]: an English-like corpus, a byte-level BPE [`tokenizer`], and
//!   next-token batches for the MoE and early-exit language models;
//! - [`listops`]: nested list-operation trees for the Tree-LSTM;
//! - [`protein`]: MSAs and distograms of synthetic folded chains for the Evoformer-lite.
//!
//! `listops` and `protein` each have a `batch` function, so they are used through their
//! module paths (`data::listops::batch`, `data::protein::batch`).

pub mod corpus;
pub mod listops;
pub mod protein;
pub mod text;
pub mod tokenizer;

pub use corpus::{generated_corpus, load_corpus};
pub use listops::{ListOpsBatch, ListOpsConfig, Node, Tree};
pub use protein::{ProteinConfig, ProteinSample};
pub use text::{Split, TextDataset};
pub use tokenizer::BpeTokenizer;
