//! A small model trained by hand with dynn-ops, used to check that offloading never changes
//! a bit.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use dynn_core::{BufferKind, Device, Phase, Result, Tensor, enter_phase, mark_step, no_grad};
use dynn_ops::prelude::*;

/// splitmix64.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// A deep residual MLP: x ← x + gelu(x W_i + b_i) W'_i, then a squared-error loss.
pub struct Mlp {
    pub params: Vec<Tensor>,
    pub width: usize,
    pub depth: usize,
}

impl Mlp {
    pub fn new(width: usize, depth: usize, seed: u64) -> Result<Self> {
        let mut rng = Rng(seed);
        let mut params = Vec::new();
        for _ in 0..depth {
            for (shape, scale) in [
                ((width, 2 * width), 0.5),
                ((1, 2 * width), 0.1),
                ((2 * width, width), 0.3),
            ] {
                let n = shape.0 * shape.1;
                let t = Tensor::from_vec(
                    rng.vec(n, scale / (shape.0 as f32).sqrt()),
                    shape,
                    Device::Cpu,
                )?
                .set_requires_grad(true);
                t.set_kind(BufferKind::Parameter);
                params.push(t);
            }
        }
        Ok(Mlp {
            params,
            width,
            depth,
        })
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in 0..self.depth {
            let (w1, b1, w2) = (
                &self.params[3 * l],
                &self.params[3 * l + 1],
                &self.params[3 * l + 2],
            );
            h = h.add(&h.matmul(w1)?.add(b1)?.gelu()?.matmul(w2)?)?;
        }
        h.sub(y)?.sqr()?.mean_all()
    }

    /// Runs `steps` SGD steps; returns each step's loss.
    pub fn train(&self, steps: usize, batch: usize, seed: u64) -> Result<Vec<f32>> {
        let mut rng = Rng(seed);
        let mut losses = Vec::new();
        for step in 0..steps {
            let x = Tensor::from_vec(
                rng.vec(batch * self.width, 1.0),
                (batch, self.width),
                Device::Cpu,
            )?;
            let y = Tensor::from_vec(
                rng.vec(batch * self.width, 1.0),
                (batch, self.width),
                Device::Cpu,
            )?;
            let loss = self.loss(&x, &y)?;
            loss.backward()?;
            {
                let _g = no_grad();
                let _p = enter_phase(Phase::Optimizer);
                for p in &self.params {
                    if let Some(g) = p.grad() {
                        p.axpy_(-0.05, &g)?;
                    }
                    p.zero_grad();
                }
            }
            losses.push(loss.to_scalar::<f32>()?);
            mark_step(step as u64 + 1);
        }
        Ok(losses)
    }

    /// One forward pass on random data without gradients (as a trainer's evaluation):
    /// returns the loss.
    pub fn forward_once(&self, batch: usize) -> Result<f32> {
        let _g = no_grad();
        let mut rng = Rng(0xE7A1);
        let mut data = || {
            Tensor::from_vec(
                rng.vec(batch * self.width, 1.0),
                (batch, self.width),
                Device::Cpu,
            )
        };
        let (x, y) = (data()?, data()?);
        self.loss(&x, &y)?.to_scalar::<f32>()
    }

    /// Every parameter's bits.
    pub fn bits(&self) -> Result<Vec<Vec<u32>>> {
        self.params
            .iter()
            .map(|p| Ok(p.to_vec::<f32>()?.into_iter().map(f32::to_bits).collect()))
            .collect()
    }
}
