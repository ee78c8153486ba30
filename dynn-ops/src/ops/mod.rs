//! One file per op family: kernels, backward rule, idioms and cost in one place.

pub mod binary;
pub mod matmul;
pub mod reduce;
pub mod unary;
pub mod update;
pub mod views;
