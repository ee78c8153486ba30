//! # dynn-models
//!
//! What a training script is made of: [`nn`] modules with named parameters, [`optim`]izers
//! and schedules, [`checkpoint`]s as safetensors, [`data`] generators, the four dynamic
//! networks in [`models`] (Mixture-of-Experts, early exit, Tree-LSTM, Evoformer-lite) and the
//! shared [`train`] loop behind the bundled trainers.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod gradcheck;
pub mod models;
pub mod nn;
pub mod optim;
pub mod rng;
pub mod train;

pub use rng::{Rng, SeedStream};
