//! The four dynamic networks dynn ships, each with the [`Task`](crate::train::Task) that
//! trains it on its data:
//!
//! - [`moe`]: a Mixture-of-Experts transformer LM (top-k routing, capacity, load balancing);
//! - [`early_exit`]: a transformer with an exit head after every block and confident exits;
//! - [`tree_lstm`]: a child-sum Tree-LSTM over ListOps parse trees, batched by tree level;
//! - [`evoformer`]: an AlphaFold-style Evoformer-lite with a random number of recycles.

pub mod early_exit;
pub mod evoformer;
pub mod moe;
pub mod tree_lstm;
