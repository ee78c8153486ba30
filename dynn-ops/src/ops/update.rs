//! In-place updates for optimizers and gradient accumulation: `axpy_` (target += alpha·x) and
//! `assign_` (target = x). They run through the executor as in-place ops, so the memory
//! manager sees the target as both read and written.

use crate::cpu::{SimdTask, simd_task};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::binary::{coalesce, cuda_elementwise_helpers, elementwise_grid, index32};
use crate::registry::OpInfo;
use dynn_core::{
    CpuStorage, DeviceStorage, Error, FloatElement, Idioms, InplaceOp, KernelArg, Layout, Result,
    Tensor, execute_inplace,
};
use rayon::prelude::*;

/// PyTorch's table: in-place add is `[0,1,0,0,0,0]`.
const IDIOMS: Idioms = Idioms([0, 1, 0, 0, 0, 0]);

/// `target = target·beta + alpha·x` (element-wise, `x` broadcast to the target's shape).
#[derive(Debug, Clone, Copy)]
pub struct Axpy {
    /// Scale of `x`.
    pub alpha: f64,
    /// Scale of the old target (1 for a plain accumulate, 0 for an assignment).
    pub beta: f64,
}

/// `f(dst[i], src[i])` over one chunk, as a [`SimdTask`].
struct Update<'a, 'f, T, F> {
    dst: &'a mut [T],
    src: &'a [T],
    f: &'f F,
}

impl<T: Copy, F: Fn(&mut T, T)> SimdTask for Update<'_, '_, T, F> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let f = self.f;
        for (d, &s) in self.dst.iter_mut().zip(self.src) {
            f(d, s);
        }
    }
}

fn update<T: FloatElement + dynn_core::CpuElement>(
    dst: &mut [T],
    layout: &Layout,
    src: &[T],
    src_layout: &Layout,
    alpha: f64,
    beta: f64,
) {
    let (a, b) = (
        <T::Acc as dynn_core::AccFloat>::of(alpha),
        <T::Acc as dynn_core::AccFloat>::of(beta),
    );
    let f = |d: &mut T, s: T| {
        *d = if beta == 0.0 {
            T::from_acc(a * s.to_acc())
        } else {
            T::from_acc(b * d.to_acc() + a * s.to_acc())
        };
    };
    match (layout.contiguous_range(), src_layout.contiguous_range()) {
        (Some((d0, d1)), Some((s0, s1))) => {
            let f = &f;
            dst[d0..d1]
                .par_chunks_mut(1 << 14)
                .zip(src[s0..s1].par_chunks(1 << 14))
                .for_each(|(dst, src)| simd_task(Update { dst, src, f }));
        }
        _ => {
            for (di, si) in layout.indices().zip(src_layout.indices()) {
                f(&mut dst[di], src[si]);
            }
        }
    }
}

/// The CUDA kernel: `t = beta·t + alpha·x` (or `alpha·x` when `beta` is 0, as on the CPU,
/// so an assignment never reads the old values), computed in `acc` (f32 for 16-bit data) and
/// rounded once, with `x` broadcast to the target's (possibly strided) layout.
pub const CUDA: CudaSource = CudaSource {
    name: "update",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
// UNROLL elements per thread and step: every load first, then every store (the target is
// read and written, so the compiler could not move a later element's loads above a store).
template <typename I>
__device__ void axpy_t(scalar* __restrict__ t, const Strided& ts, const scalar* __restrict__ x,
                       const Strided& xs, acc a, acc b, bool assign, I n) {
    I step = (I)blockDim.x * gridDim.x;
    for (I base = (I)blockIdx.x * blockDim.x + threadIdx.x; base < n; base += UNROLL * step) {
        I o[UNROLL];
        acc xv[UNROLL], tv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            I i = base + (I)u * step;
            if (i < n) {
                o[u] = sat<I>(ts, i);
                xv[u] = ld(x[sat<I>(xs, i)]);
                tv[u] = assign ? (acc)0 : ld(t[o[u]]);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (base + (I)u * step < n)
                t[o[u]] = st(assign ? a * xv[u] : b * tv[u] + a * xv[u]);
        }
    }
}

extern "C" __global__ void axpy(scalar* t, Strided ts, const scalar* x, Strided xs, double alpha,
                                double beta, i64 n, int small) {
    bool assign = beta == 0.0;
    if (small) axpy_t<u32>(t, ts, x, xs, (acc)alpha, (acc)beta, assign, (u32)n);
    else axpy_t<u64>(t, ts, x, xs, (acc)alpha, (acc)beta, assign, (u64)n);
}
"#
    ),
    half: true,
};

/// The GPU storage of an in-place op's target, if it lives on a GPU.
pub(crate) fn cuda_target(target: &mut dyn DeviceStorage) -> Option<&mut CudaStorage> {
    target.as_any_mut().downcast_mut::<CudaStorage>()
}

/// Refuses a target view that maps two indices to one element (a broadcast view): parallel
/// in-place writes to it would race.
pub(crate) fn check_target(op: &'static str, layout: &Layout) -> Result<()> {
    if layout
        .dims()
        .iter()
        .zip(layout.strides())
        .any(|(&d, &s)| d > 1 && s == 0)
    {
        return Err(Error::invalid(
            op,
            format!(
                "the in-place target is a broadcast view (layout {layout:?}): update the \
                 tensor it was broadcast from"
            ),
        ));
    }
    Ok(())
}

impl Axpy {
    fn cuda_forward(&self, t: &mut CudaStorage, layout: &Layout, x: &KernelArg<'_>) -> Result<()> {
        let name = self.name();
        let sx = cuda::storage(name, x)?;
        if x.dtype() != t.dtype() {
            return Err(Error::DTypeMismatch {
                op: name,
                expected: t.dtype(),
                got: x.dtype(),
            });
        }
        check_target(name, layout)?;
        let shape = layout.shape();
        let n = shape.elem_count();
        if n == 0 {
            return Ok(());
        }
        let xl = x.layout.broadcast_as(shape)?;
        let c = coalesce(shape, &[layout, &xl]);
        let small = index32(n, &[&c[0], &c[1]]);
        let (tv, xv) = (Strided::of(name, &c[0])?, Strided::of(name, &c[1])?);
        let dev = t.dev().clone();
        let f = dev.function(&CUDA, t.dtype(), "axpy")?;
        let (alpha, beta, n64) = (self.alpha, self.beta, n as i64);
        crate::cuda_launch!(
            dev,
            name,
            f,
            elementwise_grid(n),
            [
                t.slice_mut(),
                &tv,
                sx.slice(),
                &xv,
                &alpha,
                &beta,
                &n64,
                &small
            ]
        )
    }
}

impl InplaceOp for Axpy {
    fn name(&self) -> &'static str {
        if self.beta == 0.0 { "assign" } else { "axpy" }
    }
    fn idioms(&self) -> Idioms {
        IDIOMS
    }
    fn check(&self, target: &Tensor, inputs: &[&Tensor]) -> Result<()> {
        let x = inputs[0];
        if x.dtype() != target.dtype() {
            return Err(Error::DTypeMismatch {
                op: self.name(),
                expected: target.dtype(),
                got: x.dtype(),
            });
        }
        if !target.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name(), target.dtype()));
        }
        x.layout()
            .broadcast_as(target.shape())
            .map_err(|_| Error::shape_mismatch(self.name(), target.shape(), x.shape()))?;
        Ok(())
    }
    fn forward(
        &self,
        target: &mut dyn DeviceStorage,
        layout: &Layout,
        inputs: &[KernelArg<'_>],
    ) -> Result<()> {
        let name = self.name();
        let x = *inputs
            .first()
            .ok_or_else(|| Error::invalid(name, "expects one input"))?;
        if let Some(t) = cuda_target(target) {
            return self.cuda_forward(t, layout, &x);
        }
        let xl = x.layout.broadcast_as(layout.shape())?;
        let src = x.cpu(name)?;
        match (target.cpu_mut(name)?, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                update(d, layout, s, &xl, self.alpha, self.beta)
            }
            (CpuStorage::F64(d), CpuStorage::F64(s)) => {
                update(d, layout, s, &xl, self.alpha, self.beta)
            }
            (CpuStorage::F16(d), CpuStorage::F16(s)) => {
                update(d, layout, s, &xl, self.alpha, self.beta)
            }
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => {
                update(d, layout, s, &xl, self.alpha, self.beta)
            }
            (d, _) => return Err(Error::unsupported_dtype(name, d.dtype())),
        }
        Ok(())
    }
}

/// In-place updates (not recorded on the tape; refused on tensors that require grad while
/// the tape is on — wrap optimizer steps in [`dynn_core::no_grad`]).
pub trait UpdateOps {
    /// `self += alpha·x`.
    fn axpy_(&self, alpha: f64, x: &Tensor) -> Result<()>;
    /// `self = x` (copying the values into this tensor's buffer).
    fn assign_(&self, x: &Tensor) -> Result<()>;
    /// `self = self·beta + alpha·x`.
    fn scale_add_(&self, beta: f64, alpha: f64, x: &Tensor) -> Result<()>;
}

impl UpdateOps for Tensor {
    fn axpy_(&self, alpha: f64, x: &Tensor) -> Result<()> {
        execute_inplace(Axpy { alpha, beta: 1.0 }, self, &[x])
    }
    fn assign_(&self, x: &Tensor) -> Result<()> {
        execute_inplace(
            Axpy {
                alpha: 1.0,
                beta: 0.0,
            },
            self,
            &[x],
        )
    }
    fn scale_add_(&self, beta: f64, alpha: f64, x: &Tensor) -> Result<()> {
        execute_inplace(Axpy { alpha, beta }, self, &[x])
    }
}

/// This file's entries in the op table (in-place ops have no backward).
pub(crate) fn ops() -> Vec<OpInfo> {
    ["axpy", "assign"]
        .into_iter()
        .map(|name| OpInfo {
            name,
            idioms: IDIOMS,
            differentiable: false,
            family: "update",
        })
        .collect()
}
