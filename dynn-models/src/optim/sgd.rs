//! Stochastic gradient descent with momentum, Nesterov and weight decay.

use super::{Optimizer, restore, state_like};
use crate::nn::Param;
use dynn_core::{Phase, Result, Tensor, enter_phase, no_grad};
use dynn_ops::prelude::*;
use std::collections::BTreeMap;

/// Settings of [`Sgd`], PyTorch's `torch.optim.SGD` semantics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 = plain SGD).
    pub momentum: f64,
    /// Nesterov momentum (needs `momentum > 0`).
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.01,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// SGD: `b = μ·b + g`, then `p -= lr·(g + μ·b)` (Nesterov) or `p -= lr·b`.
#[derive(Debug)]
pub struct Sgd {
    cfg: SgdConfig,
    velocity: BTreeMap<String, Tensor>,
}

impl Sgd {
    /// An optimizer with `cfg`; an invalid setting (negative rate, Nesterov without
    /// momentum) is an error.
    pub fn new(cfg: SgdConfig) -> Result<Self> {
        if cfg.lr < 0.0 || cfg.momentum < 0.0 || cfg.weight_decay < 0.0 {
            return Err(dynn_core::Error::invalid(
                "Sgd::new",
                format!("lr, momentum and weight decay must be ≥ 0, got {cfg:?}"),
            ));
        }
        if cfg.nesterov && cfg.momentum == 0.0 {
            return Err(dynn_core::Error::invalid(
                "Sgd::new",
                "Nesterov momentum needs momentum > 0",
            ));
        }
        Ok(Sgd {
            cfg,
            velocity: BTreeMap::new(),
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Param]) -> Result<()> {
        let _g = no_grad();
        let _p = enter_phase(Phase::Optimizer);
        let c = self.cfg;
        super::announce_updates("sgd", params, |p| {
            self.velocity.get(p.path()).into_iter().collect()
        });
        for p in params {
            let Some(mut g) = p.grad() else { continue };
            if c.weight_decay != 0.0 {
                g = g.add(&p.scale(c.weight_decay)?)?;
            }
            if c.momentum == 0.0 {
                p.axpy_(-c.lr, &g)?;
            } else {
                let b = match self.velocity.get(p.path()) {
                    Some(b) => {
                        b.scale_add_(c.momentum, 1.0, &g)?;
                        b.clone()
                    }
                    None => {
                        let b = state_like(p)?;
                        b.assign_(&g)?;
                        self.velocity.insert(p.path().to_string(), b.clone());
                        b
                    }
                };
                if c.nesterov {
                    p.axpy_(-c.lr, &g)?;
                    p.axpy_(-c.lr * c.momentum, &b)?;
                } else {
                    p.axpy_(-c.lr, &b)?;
                }
            }
            p.zero_grad();
        }
        Ok(())
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        self.velocity
            .iter()
            .map(|(k, v)| (format!("{k}.momentum_buffer"), v.clone()))
            .collect()
    }
    fn load_state(
        &mut self,
        params: &[Param],
        state: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<()> {
        self.velocity.clear();
        for p in params {
            let name = format!("{}.momentum_buffer", p.path());
            if state(&name).is_some() {
                self.velocity
                    .insert(p.path().to_string(), restore(state, &name, p)?);
            }
        }
        Ok(())
    }
}
