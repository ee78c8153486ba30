//! Workloads shared by the examples: the early-exit MLP (a dynamic network: its depth follows
//! the data) and a one-block transformer (a static graph), with their data and a plain SGD step.

#![allow(dead_code)] // each example uses part of this module

use dynn::ops::ops::random::rand_normal;
use dynn::prelude::*;

/// Sizes and exit rule of the early-exit MLP.
pub struct MlpConfig {
    /// Hidden width.
    pub hidden: usize,
    /// Residual blocks (each with an exit head).
    pub depth: usize,
    /// Parameter seed.
    pub seed: u64,
}

pub const IN: usize = 16;
pub const CLASSES: usize = 4;

/// splitmix64 for the data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// A batch of points labelled by which quadrant of a rotated, warped plane they fall in.
pub fn batch(rng: &mut Rng, n: usize) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..n * IN).map(|_| rng.next_f32()).collect();
    let y: Vec<u32> = x
        .chunks(IN)
        .map(|r| {
            let (a, b) = (r[0] + 0.5 * (3.0 * r[2]).sin(), r[1] - 0.3 * r[3] * r[4]);
            (a > 0.0) as u32 * 2 + (b > 0.0) as u32
        })
        .collect();
    Ok((
        Tensor::from_vec(x, (n, IN), Device::Cpu)?,
        Tensor::from_vec(y, n, Device::Cpu)?,
    ))
}

pub struct Model {
    stem: (Tensor, Tensor),
    blocks: Vec<(Tensor, Tensor)>,
    heads: Vec<Tensor>,
}

impl Model {
    pub fn new(cfg: &MlpConfig) -> Result<Self> {
        let h = cfg.hidden;
        let mut seed = cfg.seed * 1000;
        let mut param = |shape: (usize, usize), std: f64| -> Result<Tensor> {
            seed += 1;
            let t = rand_normal(shape, 0.0, std, DType::F32, seed, Device::Cpu)?
                .set_requires_grad(true);
            t.set_kind(BufferKind::Parameter);
            Ok(t)
        };
        let stem = (
            param((IN, h), (1.0 / IN as f64).sqrt())?,
            param((1, h), 0.0)?,
        );
        let mut blocks = Vec::new();
        let mut heads = Vec::new();
        for _ in 0..cfg.depth {
            blocks.push((param((h, h), (1.0 / h as f64).sqrt())?, param((1, h), 0.0)?));
            heads.push(param((h, CLASSES), (1.0 / h as f64).sqrt())?);
        }
        Ok(Model {
            stem,
            blocks,
            heads,
        })
    }

    pub fn params(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.stem.0, &self.stem.1];
        for (b, h) in self.blocks.iter().zip(&self.heads) {
            v.extend([&b.0, &b.1, h]);
        }
        v
    }

    /// Forward until an exit is confident; returns the joint loss and the exit taken.
    pub fn loss(&self, x: &Tensor, y: &Tensor, confidence: f64) -> Result<(Tensor, usize)> {
        let mut h = x.matmul(&self.stem.0)?.add(&self.stem.1)?.gelu()?;
        let mut total: Option<Tensor> = None;
        for (i, ((w, b), head)) in self.blocks.iter().zip(&self.heads).enumerate() {
            h = h.add(&h.matmul(w)?.add(b)?.gelu()?)?;
            let logits = h.matmul(head)?;
            let l = logits.cross_entropy(y, Default::default())?;
            total = Some(match total {
                Some(t) => t.add(&l)?,
                None => l,
            });
            let conf = {
                let _g = no_grad();
                logits
                    .softmax(-1)?
                    .max_dims(&[-1], false)?
                    .mean_all()?
                    .to_scalar_f64()?
            };
            if conf >= confidence || i + 1 == self.blocks.len() {
                let loss = total.ok_or_else(|| Error::Msg("no block ran".into()))?;
                return Ok((loss, i + 1));
            }
        }
        Err(Error::invalid(
            "quickstart",
            "the model has no blocks (--depth 0)",
        ))
    }
}

/// One step of plain SGD on every parameter.
pub fn sgd(params: &[&Tensor], lr: f64) -> Result<()> {
    let _g = no_grad();
    let _p = enter_phase(Phase::Optimizer);
    for p in params {
        if let Some(g) = p.grad() {
            p.axpy_(-lr, &g)?;
        }
        p.zero_grad();
    }
    Ok(())
}

/// A one-block transformer regressor on random sequences: attention, residual, layer norm,
/// GELU MLP, squared error. Its graph is the same every step.
pub struct Transformer {
    /// Wq, Wk, Wv, Wo, W1, W2.
    pub w: Vec<Tensor>,
    /// Model width.
    pub dim: usize,
}

impl Transformer {
    /// A block of width `dim` (MLP 4×), parameters from `seed`.
    pub fn new(dim: usize, seed: u64) -> Result<Self> {
        let shapes = [
            (dim, dim),
            (dim, dim),
            (dim, dim),
            (dim, dim),
            (dim, 4 * dim),
            (4 * dim, dim),
        ];
        let w = shapes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let t = rand_normal(
                    s,
                    0.0,
                    (1.0 / s.0 as f64).sqrt(),
                    DType::F32,
                    seed * 100 + i as u64,
                    Device::Cpu,
                )?
                .set_requires_grad(true);
                t.set_kind(BufferKind::Parameter);
                Ok(t)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer { w, dim })
    }

    /// Every parameter.
    pub fn params(&self) -> Vec<&Tensor> {
        self.w.iter().collect()
    }

    /// Loss on `x` of shape (batch, seq, dim) against target `y` of the same shape.
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.forward(x)?.sub(y)?.sqr()?.mean_all()
    }

    /// The block's output for `x` of shape (batch, seq, dim): attention, residual, layer norm,
    /// then a residual GELU MLP.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [wq, wk, wv, wo, w1, w2] = &self.w[..] else {
            return Err(Error::invalid("transformer", "needs six weight matrices"));
        };
        let (q, k, v) = (x.matmul(wq)?, x.matmul(wk)?, x.matmul(wv)?);
        let att = q
            .matmul(&k.transpose(1, 2)?)?
            .scale(1.0 / (self.dim as f64).sqrt())?
            .softmax(-1)?;
        let h = x
            .add(&att.matmul(&v)?.matmul(wo)?)?
            .layer_norm(None, None, 1e-5)?;
        h.add(&h.matmul(w1)?.gelu()?.matmul(w2)?)
    }

    /// A random batch and target of shape (batch, seq, dim).
    pub fn batch(&self, rng: &mut Rng, batch: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let n = batch * seq * self.dim;
        let x: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
        let y: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
        Ok((
            Tensor::from_vec(x, (batch, seq, self.dim), Device::Cpu)?,
            Tensor::from_vec(y, (batch, seq, self.dim), Device::Cpu)?,
        ))
    }
}
