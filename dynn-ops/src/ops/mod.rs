//! One file per op family: kernels, backward rule, idioms and cost in one place.

pub mod attention;
pub mod binary;
pub mod cast;
pub mod compare;
pub mod concat;
pub mod cross_entropy;
pub mod dropout;
pub mod indexing;
pub mod logical;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod random;
pub mod reduce;
pub mod softmax;
pub mod topk;
pub mod unary;
pub mod update;
pub mod views;
