//! Fused optimizer updates: one pass over each state tensor per step instead of the five or
//! six temporaries the same update would need as separate ops.
//!
//! - `ema`: `m = β₁m + (1-β₁)·s·g` and `ema_sq`: `v = β₂v + (1-β₂)·s²·g²`, Adam's moments;
//!   `s` is a gradient scale (gradient clipping's factor, 1 otherwise) folded into the
//!   constant, so clipping needs no pass of its own over the gradients.
//! - `adam_step`: `p = p·(1 - lr·wd) - lr_t · m / (√v + eps_t)`, the bias-corrected Adam(W)
//!   step.
//!
//! In-place ops are never recorded on the tape: wrap optimizer steps in
//! [`dynn_core::no_grad`].

use crate::cpu::{SimdTask, simd_task};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::binary::{coalesce, cuda_elementwise_helpers, elementwise_grid, index32};
use crate::ops::update::{check_target, cuda_target};
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
    /// `t = β·t + gain·x` (first moment; `gain` is `(1-β)·s`).
    Ema { beta: f64, gain: f64 },
    /// `t = β·t + gain·x²` (second moment; `gain` is `(1-β)·s²`).
    EmaSq { beta: f64, gain: f64 },
    /// `t = t·decay - lr_t · m / (√v + eps)` with inputs `[m, v]`.
    Step { decay: f64, lr_t: f64, eps: f64 },
}

/// The in-place op running one [`Rule`].
#[derive(Debug, Clone, Copy)]
struct Fused(Rule);

/// One chunk of a rule's update, compiled by [`simd_task`] so that its loop vectorizes.
struct Chunk<'a, T> {
    t: &'a mut [T],
    a: &'a [T],
    b: &'a [T],
    rule: Rule,
}

impl<T: FloatElement + CpuElement> SimdTask for Chunk<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        apply(self.t, self.a, self.b, self.rule);
    }
}

#[inline(always)]
fn apply<T: FloatElement + CpuElement>(t: &mut [T], a: &[T], b: &[T], rule: Rule) {
    let of = <T::Acc as AccFloat>::of;
    match rule {
        Rule::Ema { beta, gain } => {
            let (k, j) = (of(beta), of(gain));
            t.iter_mut()
                .zip(a)
                .for_each(|(t, &g)| *t = T::from_acc(k * t.to_acc() + j * g.to_acc()));
        }
        Rule::EmaSq { beta, gain } => {
            let (k, j) = (of(beta), of(gain));
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
                    .for_each(|(t, a)| simd_task(Chunk { t, a, b: &[], rule }));
            } else {
                t.par_chunks_mut(CHUNK)
                    .zip(a.par_chunks(CHUNK))
                    .zip(b.par_chunks(CHUNK))
                    .for_each(|((t, a), b)| simd_task(Chunk { t, a, b, rule }));
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

/// The CUDA kernel: one fused pass per rule (`rule` numbered by `Rule::cuda`), inputs read
/// through their layouts in the target's index order, computed in `acc` (f32 for 16-bit data)
/// and rounded once.
pub const CUDA: CudaSource = CudaSource {
    name: "optim",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
template <int R, typename I>
__device__ void optim_t(scalar* __restrict__ t, const Strided& ts, const scalar* __restrict__ a,
                        const Strided& as, const scalar* __restrict__ b, const Strided& bs,
                        acc p0, acc p1, acc p2, I n) {
    // UNROLL elements per thread and step: every load first, then every store.
    I step = (I)blockDim.x * gridDim.x;
    for (I base = (I)blockIdx.x * blockDim.x + threadIdx.x; base < n; base += UNROLL * step) {
        I o[UNROLL];
        acc tv[UNROLL], xv[UNROLL], vv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            I i = base + (I)u * step;
            if (i < n) {
                o[u] = sat<I>(ts, i);
                tv[u] = ld(t[o[u]]);
                xv[u] = ld(a[sat<I>(as, i)]);
                if (R == 2) vv[u] = ld(b[sat<I>(bs, i)]);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (base + (I)u * step >= n) continue;
            acc r;
            if (R == 0) {
                r = p0 * tv[u] + p1 * xv[u];
            } else if (R == 1) {
                r = p0 * tv[u] + p1 * xv[u] * xv[u];
            } else {
                r = p0 * tv[u] - p1 * xv[u] / (sqrt(vv[u]) + p2);
            }
            t[o[u]] = st(r);
        }
    }
}

extern "C" __global__ void optim_update(int rule, scalar* t, Strided ts, const scalar* a,
                                        Strided as, const scalar* b, Strided bs, double p0,
                                        double p1, double p2, i64 n, int small) {
#define RUN(R) \
    if (small) optim_t<R, u32>(t, ts, a, as, b, bs, (acc)p0, (acc)p1, (acc)p2, (u32)n); \
    else optim_t<R, u64>(t, ts, a, as, b, bs, (acc)p0, (acc)p1, (acc)p2, (u64)n);
    switch (rule) {
    case 0: RUN(0) break;
    case 1: RUN(1) break;
    default: RUN(2) break;
    }
#undef RUN
}
"#
    ),
    half: true,
};

impl Rule {
    /// The rule's number in the CUDA kernel, its three constants (as the CPU computes them,
    /// in f64 before the cast to the scalar type) and how many inputs it reads.
    fn cuda(self) -> (i32, [f64; 3], usize) {
        match self {
            Rule::Ema { beta, gain } => (0, [beta, gain, 0.0], 1),
            Rule::EmaSq { beta, gain } => (1, [beta, gain, 0.0], 1),
            Rule::Step { decay, lr_t, eps } => (2, [decay, lr_t, eps], 2),
        }
    }
}

impl Fused {
    fn cuda_forward(
        &self,
        t: &mut CudaStorage,
        layout: &Layout,
        inputs: &[KernelArg<'_>],
    ) -> Result<()> {
        let name = self.name();
        let (rule, [p0, p1, p2], arity) = self.0.cuda();
        if inputs.len() != arity {
            return Err(Error::invalid(
                name,
                format!("expects {arity} input(s), got {}", inputs.len()),
            ));
        }
        check_target(name, layout)?;
        let shape = layout.shape();
        let mut layouts = vec![layout.clone()];
        let mut slices = Vec::with_capacity(arity);
        for x in inputs {
            if x.dtype() != t.dtype() {
                return Err(Error::DTypeMismatch {
                    op: name,
                    expected: t.dtype(),
                    got: x.dtype(),
                });
            }
            if x.shape() != shape {
                return Err(Error::shape_mismatch(name, shape, x.shape()));
            }
            slices.push(cuda::storage(name, x)?);
            layouts.push(x.layout.clone());
        }
        let n = shape.elem_count();
        if n == 0 {
            return Ok(());
        }
        let c = coalesce(shape, &layouts.iter().collect::<Vec<_>>());
        let small = index32(n, &c.iter().collect::<Vec<_>>());
        let views = c
            .iter()
            .map(|l| Strided::of(name, l))
            .collect::<Result<Vec<_>>>()?;
        // A one-input rule reads its `b` operand never: pass `a` again.
        let (sa, va) = (slices[0], &views[1]);
        let (sb, vb) = match slices.get(1) {
            Some(&s) => (s, &views[2]),
            None => (sa, va),
        };
        let dev = t.dev().clone();
        let f = dev.function(&CUDA, t.dtype(), "optim_update")?;
        let n64 = n as i64;
        crate::cuda_launch!(
            dev,
            name,
            f,
            elementwise_grid(n),
            [
                &rule,
                t.slice_mut(),
                &views[0],
                sa.slice(),
                va,
                sb.slice(),
                vb,
                &p0,
                &p1,
                &p2,
                &n64,
                &small
            ]
        )
    }
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
        if let Some(t) = cuda_target(target) {
            return self.cuda_forward(t, layout, inputs);
        }
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
    /// `self = β·self + (1-β)·(s·g)`: [`OptimOps::ema_`] of the gradient scaled by `s`, in the
    /// same pass (`(1-β)·s` is one constant).
    fn ema_scaled_(&self, beta: f64, s: f64, g: &Tensor) -> Result<()>;
    /// `self = β·self + (1-β)·(s·g)²`: [`OptimOps::ema_sq_`] of the gradient scaled by `s`.
    fn ema_sq_scaled_(&self, beta: f64, s: f64, g: &Tensor) -> Result<()>;
    /// `self = self·decay - lr_t·m/(√v + eps)`: the Adam(W) parameter step, with the bias
    /// corrections folded into `lr_t` and `eps` by the caller.
    fn adam_step_(&self, decay: f64, lr_t: f64, eps: f64, m: &Tensor, v: &Tensor) -> Result<()>;
}

impl OptimOps for Tensor {
    fn ema_(&self, beta: f64, g: &Tensor) -> Result<()> {
        self.ema_scaled_(beta, 1.0, g)
    }
    fn ema_sq_(&self, beta: f64, g: &Tensor) -> Result<()> {
        self.ema_sq_scaled_(beta, 1.0, g)
    }
    fn ema_scaled_(&self, beta: f64, s: f64, g: &Tensor) -> Result<()> {
        let gain = (1.0 - beta) * s;
        execute_inplace(Fused(Rule::Ema { beta, gain }), self, &[g])
    }
    fn ema_sq_scaled_(&self, beta: f64, s: f64, g: &Tensor) -> Result<()> {
        let gain = (1.0 - beta) * s * s;
        execute_inplace(Fused(Rule::EmaSq { beta, gain }), self, &[g])
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
