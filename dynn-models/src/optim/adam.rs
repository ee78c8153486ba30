//! Adam and AdamW, with fused moment and step kernels.

use super::{Optimizer, restore, state_like};
use crate::nn::Param;
use dynn_core::{Phase, Result, Tensor, enter_phase, no_grad};
use dynn_ops::prelude::*;
use std::collections::BTreeMap;

/// Settings of [`Adam`] (PyTorch's `Adam` when `decoupled` is false, `AdamW` when true).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first and second moments.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay: an L2 term in the gradient (Adam) or a decoupled shrink (AdamW).
    pub weight_decay: f64,
    /// AdamW's decoupled weight decay.
    pub decoupled: bool,
}

impl AdamConfig {
    /// AdamW with PyTorch's defaults (`betas (0.9, 0.999)`, `eps 1e-8`, `weight_decay 0.01`).
    pub fn adamw(lr: f64) -> Self {
        AdamConfig {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
        }
    }
    /// Adam with PyTorch's defaults and no weight decay.
    pub fn adam(lr: f64) -> Self {
        AdamConfig {
            weight_decay: 0.0,
            decoupled: false,
            ..Self::adamw(lr)
        }
    }
}

/// One parameter's moments and step count.
#[derive(Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
    steps: u64,
}

/// Adam(W). Each parameter counts its own steps (a parameter skipped in a step, such as an
/// expert no token was routed to, does not advance its bias correction).
#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    state: BTreeMap<String, Moments>,
}

impl Adam {
    /// An optimizer with `cfg`; betas outside `[0, 1)` or a negative rate are errors.
    pub fn new(cfg: AdamConfig) -> Result<Self> {
        let (b1, b2) = cfg.betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) || cfg.lr < 0.0 || cfg.eps <= 0.0
        {
            return Err(dynn_core::Error::invalid(
                "Adam::new",
                format!("need betas in [0, 1), lr ≥ 0 and eps > 0, got {cfg:?}"),
            ));
        }
        Ok(Adam {
            cfg,
            state: BTreeMap::new(),
        })
    }
}

impl Optimizer for Adam {
    fn step(&mut self, params: &[Param]) -> Result<()> {
        self.step_scaled(params, 1.0)
    }
    /// The gradient scale is folded into the moment updates' constants: no pass of its own.
    fn step_scaled(&mut self, params: &[Param], scale: f64) -> Result<()> {
        let _g = no_grad();
        let _p = enter_phase(Phase::Optimizer);
        let c = self.cfg;
        let (b1, b2) = c.betas;
        super::announce_updates("adam", params, |p| {
            self.state
                .get(p.path())
                .map_or_else(Vec::new, |s| vec![&s.m, &s.v])
        });
        for p in params {
            let Some(mut g) = p.grad() else { continue };
            // Coupled weight decay adds to the scaled gradient: scale it here.
            let mut s_g = scale;
            if c.weight_decay != 0.0 && !c.decoupled {
                if scale != 1.0 {
                    g = g.scale(scale)?;
                    s_g = 1.0;
                }
                g = g.add(&p.scale(c.weight_decay)?)?;
            }
            let s = match self.state.entry(p.path().to_string()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(Moments {
                    m: state_like(p)?,
                    v: state_like(p)?,
                    steps: 0,
                }),
            };
            s.steps += 1;
            s.m.ema_scaled_(b1, s_g, &g)?;
            s.v.ema_sq_scaled_(b2, s_g, &g)?;
            let t = s.steps as i32;
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            // lr·m̂/(√v̂ + eps) = (lr/bc1)·m/(√v + eps·√bc2)·√bc2
            let lr_t = c.lr * bc2.sqrt() / bc1;
            let eps_t = c.eps * bc2.sqrt();
            let decay = if c.decoupled {
                1.0 - c.lr * c.weight_decay
            } else {
                1.0
            };
            p.adam_step_(decay, lr_t, eps_t, &s.m, &s.v)?;
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
        let mut out = Vec::new();
        for (k, s) in &self.state {
            out.push((format!("{k}.exp_avg"), s.m.clone()));
            out.push((format!("{k}.exp_avg_sq"), s.v.clone()));
            let steps = Tensor::from_vec(vec![s.steps as i64], 1, s.m.device());
            if let Ok(t) = steps {
                out.push((format!("{k}.step"), t));
            }
        }
        out
    }
    fn load_state(
        &mut self,
        params: &[Param],
        state: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<()> {
        self.state.clear();
        for p in params {
            let step_name = format!("{}.step", p.path());
            let Some(steps) = state(&step_name) else {
                continue;
            };
            let steps = steps.to_vec::<i64>()?.first().copied().unwrap_or(0).max(0) as u64;
            let m = restore(state, &format!("{}.exp_avg", p.path()), p)?;
            let v = restore(state, &format!("{}.exp_avg_sq", p.path()), p)?;
            self.state
                .insert(p.path().to_string(), Moments { m, v, steps });
        }
        Ok(())
    }
}
