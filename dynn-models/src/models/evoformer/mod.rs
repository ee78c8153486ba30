//! An AlphaFold-style Evoformer-lite with recycling, trained to predict distograms of
//! synthetic proteins ([`crate::data::protein`]) from their MSAs.
//!
//! The MSA representation `(batch, depth, len, msa_dim)` embeds the MSA tokens plus the
//! target (first-row) token; the pair representation `(batch, len, len, pair_dim)` starts as
//! an outer sum of target embeddings plus a relative-position embedding. Each
//! [`EvoformerBlock`] runs MSA row attention with a pair bias, MSA column attention, an MSA
//! transition, the outer-product mean into the pair, outgoing and incoming triangle
//! multiplicative updates and a pair transition. A symmetrised distogram head reads the pair.
//!
//! **Recycling** is the dynamic part: a training step draws `1..=max_recycles` iterations;
//! all but the last run under no-grad, and their first MSA row and pair representation come
//! back, detached and layer-normed, as additions to the next iteration's inputs. The graph
//! (and the memory it needs) changes with every draw.
//!
//! **Chunking** (`EvoformerConfig::chunk_bytes`), as AlphaFold does at inference: the
//! outer-product mean and both transitions run on slices of rows, so their widest
//! intermediates stay under a bound however large the batch; results and gradients are the
//! unchunked ones.

mod block;
mod chunk;
mod config;
mod layers;
mod model;
mod pair;
mod task;

pub use block::EvoformerBlock;
pub use config::EvoformerConfig;
pub use layers::{GatedAttention, Transition};
pub use model::{Evoformer, Recycled, distogram_hits};
pub use pair::{OuterProductMean, Triangle, TriangleMultiplication};
pub use task::EvoformerTask;
