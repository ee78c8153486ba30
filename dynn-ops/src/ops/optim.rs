//! Fused optimizer updates: one pass over each state tensor per step instead of the five or
//! six temporaries the same update would need as separate ops.
//!
//! - `adam_moments`: `m = β₁m + (1-β₁)g` and `v = β₂v + (1-β₂)g²` — the target is `m`,
//!   `v` is updated through a second in-place op sharing the kernel (`ema_sq`).
//! - `adam_step`: `p = p·(1 - lr·wd) - lr_t · m / (√v + eps_t)`, the bias-corrected Adam(W)
//!   step.
//!
//! In-place ops are never recorded on the tape: wrap optimizer steps in
//! [`dynn_core::no_grad`].

use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, CpuElement, CpuStorage, DeviceStorage, Error, FloatElement, Idioms, InplaceOp,
    KernelArg, Layout, Result, Tensor, execute_inplace,
};
use rayon::prelude::*;

/// An element-wise in-place update: `[0,1,0,0,1,0]` (in-place, element-wise map).
const IDIOMS: Idioms = Idioms([0, 1, 0, 0, 1, 0]);

/// Which fused update a kernel runs, with its constants.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// `t = β·t + (1-β)·x` (first moment).
    Ema { beta: f64 },
    /// `t = β·t + (1-β)·x²` (second moment).
    EmaSq { beta: f64 },
    /// `t = t·decay - lr_t · m / (√v + eps)` with inputs `[m, v]`.
    Step { decay: f64, lr_t: f64, eps: f64 },
}

/// The in-place op running one [`Rule`].
#[derive(Debug, Clone, Copy)]
struct Fused(Rule);

fn apply<T: FloatElement + CpuElement>(t: &mut [T], a: &[T], b: &[T], rule: Rule) {
    let of = <T::Acc as AccFloat>::of;
    match rule {
        Rule::Ema { beta } => {
            let (k, j) = (of(beta), of(1.0 - beta));
            t.iter_mut()
                .zip(a)
                .for_each(|(t, &g)| *t = T::from_acc(k * t.to_acc() + j * g.to_acc()));
        }
        Rule::EmaSq { beta } => {
            let (k, j) = (of(beta), of(1.0 - beta));
            t.iter_mut().zip(a).for_each(|(t, &g)| {
                let g = g.to_acc();
                *t = T::from_acc(k * t.to_acc() + j * g * g)
            });
        }
        Rule::Step { decay, lr_t, eps } => {
            let (d, lr, e) = (of(decay), of(lr_t), of(eps));
            t.iter_mut().zip(a).zip(b).for_each(|((p, &m), &v)| {
                *p = T::from_acc(d * p.to_acc() - lr * m.to_acc() / (v.to_acc().sqrt() + e))
            });
        }
    }
}

/// The elements of `s` in `l`'s order, borrowed when contiguous.
fn slice<'a, T: Copy>(s: &'a [T], l: &Layout) -> std::borrow::Cow<'a, [T]> {
    match l.contiguous_range() {
        Some((a, b)) => std::borrow::Cow::Borrowed(&s[a..b]),
        None => std::borrow::Cow::Owned(l.indices().map(|i| s[i]).collect()),
    }
}

fn run<T: FloatElement + CpuElement>(
    dst: &mut [T],
    layout: &Layout,
    inputs: &[(&[T], &Layout)],
    rule: Rule,
) -> Result<()> {
    let a = slice(inputs[0].0, inputs[0].1);
    let b = inputs.get(1).map(|&(s, l)| slice(s, l)).unwrap_or_default();
    const CHUNK: usize = 1 << 14;
    match layout.contiguous_range() {
        Some((d0, d1)) => {
            let t = &mut dst[d0..d1];
            if b.is_empty() {
                t.par_chunks_mut(CHUNK)
                    .zip(a.par_chunks(CHUNK))
                    .for_each(|(t, a)| crate::math::simd(|| apply(t, a, &[], rule)));
            } else {
                t.par_chunks_mut(CHUNK)
                    .zip(a.par_chunks(CHUNK))
                    .zip(b.par_chunks(CHUNK))
                    .for_each(|((t, a), b)| crate::math::simd(|| apply(t, a, b, rule)));
            }
        }
        None => {
            let idx: Vec<usize> = layout.indices().collect();
            let mut t: Vec<T> = idx.iter().map(|&i| dst[i]).collect();
            apply(&mut t, &a, &b, rule);
            for (&i, v) in idx.iter().zip(t) {
                dst[i] = v;
            }
        }
    }
    Ok(())
}

impl InplaceOp for Fused {
    fn name(&self) -> &'static str {
        match self.0 {
            Rule::Ema { .. } => "ema",
            Rule::EmaSq { .. } => "ema_sq",
            Rule::Step { .. } => "adam_step",
        }
    }
    fn idioms(&self) -> Idioms {
        IDIOMS
    }
    fn check(&self, target: &Tensor, inputs: &[&Tensor]) -> Result<()> {
        if !target.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name(), target.dtype()));
        }
        for x in inputs {
            if x.dtype() != target.dtype() {
                return Err(Error::DTypeMismatch {
                    op: self.name(),
                    expected: target.dtype(),
                    got: x.dtype(),
                });
            }
            if x.shape() != target.shape() {
                return Err(Error::shape_mismatch(
                    self.name(),
                    target.shape(),
                    x.shape(),
                ));
            }
        }
        Ok(())
    }
    fn forward(
        &self,
        target: &mut dyn DeviceStorage,
        layout: &Layout,
        inputs: &[KernelArg<'_>],
    ) -> Result<()> {
        let name = self.name();
        macro_rules! go {
            ($variant:ident) => {{
                let mut src = Vec::with_capacity(inputs.len());
                for x in inputs {
                    match x.cpu(name)? {
                        CpuStorage::$variant(s) => src.push((s.as_slice(), x.layout)),
                        s => return Err(Error::unsupported_dtype(name, s.dtype())),
                    }
                }
                match target.cpu_mut(name)? {
                    CpuStorage::$variant(d) => run(d, layout, &src, self.0),
                    d => Err(Error::unsupported_dtype(name, d.dtype())),
                }
            }};
        }
        match target.dtype() {
            dynn_core::DType::F32 => go!(F32),
            dynn_core::DType::F64 => go!(F64),
            dynn_core::DType::F16 => go!(F16),
            dynn_core::DType::BF16 => go!(BF16),
            d => Err(Error::unsupported_dtype(name, d)),
        }
    }
}

/// Fused optimizer updates on state tensors (never on the tape: call them under
/// [`dynn_core::no_grad`]).
pub trait OptimOps {
    /// `self = β·self + (1-β)·g`: an exponential moving average (Adam's first moment).
    fn ema_(&self, beta: f64, g: &Tensor) -> Result<()>;
    /// `self = β·self + (1-β)·g²` (Adam's second moment).
    fn ema_sq_(&self, beta: f64, g: &Tensor) -> Result<()>;
    /// `self = self·decay - lr_t·m/(√v + eps)`: the Adam(W) parameter step, with the bias
    /// corrections folded into `lr_t` and `eps` by the caller.
    fn adam_step_(&self, decay: f64, lr_t: f64, eps: f64, m: &Tensor, v: &Tensor) -> Result<()>;
}

impl OptimOps for Tensor {
    fn ema_(&self, beta: f64, g: &Tensor) -> Result<()> {
        execute_inplace(Fused(Rule::Ema { beta }), self, &[g])
    }
    fn ema_sq_(&self, beta: f64, g: &Tensor) -> Result<()> {
        execute_inplace(Fused(Rule::EmaSq { beta }), self, &[g])
    }
    fn adam_step_(&self, decay: f64, lr_t: f64, eps: f64, m: &Tensor, v: &Tensor) -> Result<()> {
        execute_inplace(Fused(Rule::Step { decay, lr_t, eps }), self, &[m, v])
    }
}

/// This file's entries in the op table (in-place ops have no backward).
pub(crate) fn ops() -> Vec<OpInfo> {
    ["ema", "ema_sq", "adam_step"]
        .into_iter()
        .map(|name| OpInfo {
            name,
            idioms: IDIOMS,
            differentiable: false,
            family: "optim",
        })
        .collect()
}
