//! # dynn-ops
//!
//! Every operator of dynn. An op is defined in one place, its family's file under `ops/`:
//! output inference, CPU kernel, backward rule, idiom signature and cost. Tensor methods come
//! from one extension trait per family, all re-exported by [`prelude`].

#![warn(missing_docs)]

pub mod cpu;
pub mod cuda;
pub mod grad;
pub mod math;
pub mod ops;
pub mod registry;

pub use registry::{OpInfo, cuda_sources, idioms_markdown, op_table};

/// The tensor methods of every op family, and the core types.
pub mod prelude {
    pub use crate::grad::Backward;
    pub use crate::ops::addcmul::AddCMulOps;
    pub use crate::ops::attention::AttentionOps;
    pub use crate::ops::binary::BinaryOps;
    pub use crate::ops::cast::CastOps;
    pub use crate::ops::compare::{CmpOp, CompareOps};
    pub use crate::ops::concat::{ConcatOps, cat, stack};
    pub use crate::ops::cross_entropy::{CrossEntropyOps, CrossEntropyOpts, LossReduction};
    pub use crate::ops::dropout::DropoutOps;
    pub use crate::ops::indexing::IndexingOps;
    pub use crate::ops::linear::{Activation, LinearOps};
    pub use crate::ops::logical::{Logic, LogicalOps};
    pub use crate::ops::matmul::MatmulOps;
    pub use crate::ops::norm::NormOps;
    pub use crate::ops::optim::OptimOps;
    pub use crate::ops::random::{RandomOps, rand_normal, rand_uniform};
    pub use crate::ops::reduce::ReduceOps;
    pub use crate::ops::softmax::SoftmaxOps;
    pub use crate::ops::topk::TopKOps;
    pub use crate::ops::unary::UnaryOps;
    pub use crate::ops::update::UpdateOps;
    pub use crate::ops::views::ViewOps;
    pub use dynn_core::{BufferKind, DType, Device, Error, Result, Shape, Tensor, no_grad};
}
