//! `Dropout` with a reproducible stream of seeds.

use super::{Forward, Module, Param};
use crate::rng::SeedStream;
use dynn_core::{Error, Result, Tensor};
use dynn_ops::prelude::*;

/// Zeroes each element with probability `p` in training mode (scaling the rest by
/// `1/(1-p)`); the identity in evaluation mode. Each call draws a fresh seed from the model's
/// [`SeedStream`], so a run (and a resumed run) drops the same elements.
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f64,
    train: bool,
    seeds: SeedStream,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1)`, drawing seeds from `seeds`.
    pub fn new(p: f64, seeds: SeedStream) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(
                "Dropout::new",
                format!("probability {p} is outside [0, 1)"),
            ));
        }
        Ok(Dropout {
            p,
            train: true,
            seeds,
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl Module for Dropout {
    fn visit_params(&self, _: &mut dyn FnMut(&Param)) {}
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}

impl Forward for Dropout {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.train || self.p == 0.0 {
            return Ok(x.clone());
        }
        x.dropout(self.p, self.seeds.next(), true)
    }
}
