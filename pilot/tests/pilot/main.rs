//! The pilot crate's tests: labels, encoder, model, predictor, policy.

mod common;
mod encoder;
mod labels;
mod model;
mod policy;
mod predictor;
