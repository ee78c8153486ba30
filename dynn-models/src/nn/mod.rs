//! Neural-network building blocks: the [`Module`] trait, named [`Param`]s created by a
//! [`ParamBuilder`], and the layers the bundled models are made of.

mod attention;
mod block;
mod dropout;
mod embedding;
mod linear;
mod lstm;
mod mlp;
mod module;
mod norm;

pub use attention::{AttentionMask, MultiHeadAttention, mask_value, scaled_dot_product_attention};
pub use block::{FeedForward, TransformerBlock};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use linear::Linear;
pub use lstm::{ChildStates, LstmCell, LstmState, TreeLstmCell};
pub use mlp::{Mlp, SwiGlu};
pub use module::{Forward, Init, Module, Param, ParamBuilder};
pub use norm::{LayerNorm, RmsNorm};
