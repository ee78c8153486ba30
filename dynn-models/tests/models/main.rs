//! Tests of the four dynamic networks: finite-difference gradients at tiny f64 configs,
//! distinct graphs within a few steps, and training-loop behaviour (checkpoint resume).

mod early_exit;
mod evoformer;
mod moe;
mod training;
mod tree_lstm;
