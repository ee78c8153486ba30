//! Layer normalization and RMS normalization over the last dim, each one fused kernel
//! forward and one fused kernel backward.
//!
//! Forward outputs the normalized tensor and, as small extra outputs, the per-row statistics
//! the backward needs (mean and 1/std for layer norm, 1/rms for RMS norm; in the accumulator
//! dtype: f64 for f64 inputs, f32 otherwise). Backward (`layer_norm_backward`,
//! `rms_norm_backward`) produces dx, dweight and dbias in one op. The weight and bias
//! gradients are sums over rows: each fixed chunk of rows (the chunking depends only on the
//! shape) produces a partial sum, and the partials are added in chunk order, so the result
//! never depends on thread timing.

use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::float_dispatch;
use crate::math::FastMath;
use crate::ops::softmax::{
    RowKernel, RowKernels, RowPlan, Rows, WARPS_PER_BLOCK, acc_dtype, boxed, row_kernels, run_rows,
    sum_map, sum_map2, vec_ok,
};
use crate::registry::OpInfo;
use cudarc::driver::LaunchConfig;
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, Error, FloatElement, Idioms, InputGrads, KernelArg,
    Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec, execute,
    smallvec::SmallVec, smallvec::smallvec,
};
use std::mem::MaybeUninit;

/// Which normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) · w + b`.
    Layer,
    /// `x / sqrt(mean(x²) + eps) · w`.
    Rms,
}

/// A normalization over the last dim. Inputs: `x`, then the weight when `has_weight`, then
/// the bias when `has_bias` (both of shape `(C,)`, C the last dim of x, same dtype as x).
/// Outputs: `y`, then (layer norm only) the per-row mean, then the per-row 1/std.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    /// Which normalization.
    pub kind: NormKind,
    /// Added to the variance (mean square) before the square root.
    pub eps: f64,
    /// Whether a weight (scale) input follows x.
    pub has_weight: bool,
    /// Whether a bias input follows (layer norm only).
    pub has_bias: bool,
}

impl Norm {
    /// Idioms of layer norm: two row reductions (mean, variance) and one element-wise map
    /// (normalize, scale, shift). The paper's table has only batch norm
    /// (`[0,1,1,1,1,0]`, in place with running stats); dynn's norms write fresh outputs.
    pub const LAYER_IDIOMS: Idioms = Idioms([0, 0, 0, 2, 1, 0]);
    /// Idioms of layer norm backward: two row reductions (Σ dxhat, Σ dxhat·xhat), the
    /// column reduction for dweight/dbias, and one map.
    pub const LAYER_BACKWARD_IDIOMS: Idioms = Idioms([0, 0, 0, 3, 1, 0]);
    /// Idioms of RMS norm: one row reduction (mean square) and one map.
    pub const RMS_IDIOMS: Idioms = Idioms([0, 0, 0, 1, 1, 0]);
    /// Idioms of RMS norm backward: one row reduction, the column reduction for dweight, one map.
    pub const RMS_BACKWARD_IDIOMS: Idioms = Idioms([0, 0, 0, 2, 1, 0]);

    fn stats(&self) -> usize {
        match self.kind {
            NormKind::Layer => 2,
            NormKind::Rms => 1,
        }
    }
}

/// The shape of the per-row statistics: x's shape without its last dim.
fn stat_shape(x: &Shape) -> Shape {
    let d = x.dims();
    Shape::new(&d[..d.len().saturating_sub(1)])
}

/// Checks x (float, rank ≥ 1, non-empty last dim) and a `(C,)` parameter of x's dtype.
fn check_x(op: &'static str, x: &Tensor) -> Result<usize> {
    if !x.dtype().is_float() {
        return Err(Error::unsupported_dtype(op, x.dtype()));
    }
    let c = match x.dims().last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(Error::invalid(
                op,
                format!(
                    "normalizes the last dim, which must be non-empty; got shape {}",
                    x.shape()
                ),
            ));
        }
    };
    Ok(c)
}

fn check_param(op: &'static str, what: &str, x: &Tensor, p: &Tensor, c: usize) -> Result<()> {
    if p.dims() != [c] {
        return Err(Error::invalid(
            op,
            format!(
                "{what} must have shape [{c}] (the last dim of x {}), got {}",
                x.shape(),
                p.shape()
            ),
        ));
    }
    if p.dtype() != x.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            expected: x.dtype(),
            got: p.dtype(),
        });
    }
    Ok(())
}

/// A `(C,)` parameter as accumulator values, or `fill` when absent.
fn param_acc<T: FloatElement + CpuElement>(
    op: &'static str,
    p: Option<&KernelArg<'_>>,
    c: usize,
    fill: f64,
) -> Result<Vec<T::Acc>> {
    match p {
        None => Ok(vec![<T::Acc as AccFloat>::of(fill); c]),
        Some(a) => {
            let s = a.cpu(op)?.as_slice::<T>(op)?;
            Ok(a.layout.indices().map(|i| s[i].to_acc()).collect())
        }
    }
}

// ----- forward -----

/// Normalizes one row; returns `(mean, rstd)` (mean is 0 for RMS norm).
#[inline(always)]
fn norm_row<T: FloatElement>(
    kind: NormKind,
    eps: T::Acc,
    x: &[T],
    w: &[T::Acc],
    b: &[T::Acc],
    out: &mut [MaybeUninit<T>],
) -> (T::Acc, T::Acc)
where
    T::Acc: FastMath,
{
    {
        let c = <T::Acc as AccFloat>::of(x.len() as f64);
        let one = <T::Acc as AccFloat>::ONE;
        match kind {
            NormKind::Layer => {
                let mean = sum_map(x, |v: T| v.to_acc()) / c;
                let var = sum_map(x, |v: T| {
                    let d = v.to_acc() - mean;
                    d * d
                }) / c;
                let rstd = one / (var + eps).sqrt();
                for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                    o.write(T::from_acc((v.to_acc() - mean) * rstd * w + b));
                }
                (mean, rstd)
            }
            NormKind::Rms => {
                let ms = sum_map(x, |v: T| {
                    let a = v.to_acc();
                    a * a
                }) / c;
                let rstd = one / (ms + eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                    o.write(T::from_acc(v.to_acc() * rstd * w));
                }
                (<T::Acc as AccFloat>::ZERO, rstd)
            }
        }
    }
}

type NormOut<T, A> = (Vec<T>, Vec<A>, Vec<A>);

/// The forward over rows; each chunk's state collects its rows' `(mean, rstd)`.
struct NormRows<'r, 'a, T: FloatElement> {
    kind: NormKind,
    eps: T::Acc,
    x: &'r Rows<'a, T>,
    w: &'r [T::Acc],
    b: &'r [T::Acc],
}

impl<T: FloatElement> RowKernel for NormRows<'_, '_, T>
where
    T::Acc: FastMath,
{
    type Out = T;
    type State = Vec<(T::Acc, T::Acc)>;
    fn out_len(&self) -> usize {
        self.x.len
    }
    fn work_len(&self) -> usize {
        self.x.len
    }
    fn state(&self) -> Self::State {
        Vec::new()
    }
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], stats: &mut Self::State) {
        stats.push(norm_row(
            self.kind,
            self.eps,
            self.x.row(r),
            self.w,
            self.b,
            out,
        ));
    }
}

fn norm_fwd<T: FloatElement + CpuElement>(
    norm: &Norm,
    x: &[T],
    xl: &Layout,
    w: &[T::Acc],
    b: &[T::Acc],
) -> Result<NormOut<T, T::Acc>>
where
    T::Acc: FastMath,
{
    let x = Rows::last(x, xl)?;
    let k = NormRows {
        kind: norm.kind,
        eps: <T::Acc as AccFloat>::of(norm.eps),
        x: &x,
        w,
        b,
    };
    let (y, stats) = run_rows(&k, x.rows());
    let (mean, rstd) = stats.into_iter().flatten().unzip();
    Ok((y, mean, rstd))
}

fn fwd_kernel<T: FloatElement + CpuElement>(
    norm: &Norm,
    v: &[T],
    xl: &Layout,
    wa: Option<&KernelArg<'_>>,
    ba: Option<&KernelArg<'_>>,
    c: usize,
) -> Result<Outputs>
where
    T::Acc: FastMath + CpuElement,
{
    let name = norm.name();
    let w = param_acc::<T>(name, wa, c, 1.0)?;
    let b = param_acc::<T>(name, ba, c, 0.0)?;
    let (y, mean, rstd) = norm_fwd(norm, v, xl, &w, &b)?;
    Ok(match norm.kind {
        NormKind::Layer => smallvec![boxed(y), boxed(mean), boxed(rstd)],
        NormKind::Rms => smallvec![boxed(y), boxed(rstd)],
    })
}

// ----- CUDA -----

/// Layer and RMS norm over the last dim. Forward: one warp per row with the row in registers
/// (rows up to 1024 f32 / 512 f64 elements with 16-byte loads, 256 otherwise), else one block
/// per row; mean and variance in two passes over the row, as on the CPU. Backward: dx per row
/// the same way; dweight and dbias without atomics: the warp plan sums each block's rows (a
/// fixed chunk) in registers and then across its warps in warp order; the block plan sums
/// fixed chunks of rows per column; a last kernel adds the chunks' partials in chunk order.
pub const CUDA: CudaSource = CudaSource {
    name: "norm",
    code: concat!(
        crate::ops::softmax::cuda_row_helpers!(),
        r#"
#define NORM_WARPS 4

// ---- forward: y = (x - mean)·rstd·w + b (RMS: mean = 0, no bias) ----

#define NORM_FWD_PARAMS (int layer, double eps, const scalar* x, Strided xs, const scalar* w, \
    Strided ws, int has_w, const scalar* b, Strided bs, int has_b, scalar* y, acc* mean, \
    acc* rstd, i64 rows, i64 len)
#define NORM_FWD_ARGS (layer, eps, x, xs, w, ws, has_w, b, bs, has_b, y, mean, rstd, rows, len)

template <int V, int IT>
__device__ __forceinline__ void norm_fwd_warp NORM_FWD_PARAMS {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const i64 base = row * len;
    const acc c = (acc)len;
    acc v[IT][V];
    acc s = 0;
#pragma unroll
    for (int k = 0; k < IT; ++k) {
        ld<V>(v[k], x, xs, base, ((i64)k * 32 + lane) * V, len, (acc)0);
#pragma unroll
        for (int e = 0; e < V; ++e) s += v[k][e];
    }
    acc mu = 0;
    if (layer) mu = warp_sum(s) / c;
    acc q = 0;
#pragma unroll
    for (int k = 0; k < IT; ++k) {
        if (((i64)k * 32 + lane) * V < len) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const acc d = v[k][e] - mu;
                q += d * d;
            }
        }
    }
    const acc r = (acc)1 / sqrt(warp_sum(q) / c + (acc)eps);
#pragma unroll
    for (int k = 0; k < IT; ++k) {
        const i64 j = ((i64)k * 32 + lane) * V;
        if (j < len) {
            acc wk[V], bk[V];
            if (has_w) ld<V>(wk, w, ws, 0, j, len, (acc)1);
            if (has_b) ld<V>(bk, b, bs, 0, j, len, (acc)0);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                acc t = (v[k][e] - mu) * r;
                if (has_w) t = t * wk[e];
                if (has_b) t = t + bk[e];
                v[k][e] = t;
            }
            st<V>(y, base + j, v[k]);
        }
    }
    if (lane == 0) {
        if (layer) mean[row] = mu;
        rstd[row] = r;
    }
}

template <int V>
__device__ __forceinline__ void norm_fwd_block NORM_FWD_PARAMS {
    const i64 row = blockIdx.x;
    if (row >= rows) return;
    const i64 base = row * len, step = (i64)blockDim.x * V;
    const acc c = (acc)len;
    acc d[V];
    acc mu = 0;
    if (layer) {
        acc s = 0;
        for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
            ld<V>(d, x, xs, base, j, len, (acc)0);
#pragma unroll
            for (int e = 0; e < V; ++e) s += d[e];
        }
        mu = block_sum(s) / c;
    }
    acc q = 0;
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(d, x, xs, base, j, len, (acc)0);
#pragma unroll
        for (int e = 0; e < V; ++e) q += (d[e] - mu) * (d[e] - mu);
    }
    const acc r = (acc)1 / sqrt(block_sum(q) / c + (acc)eps);
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        acc wk[V], bk[V];
        ld<V>(d, x, xs, base, j, len, (acc)0);
        if (has_w) ld<V>(wk, w, ws, 0, j, len, (acc)1);
        if (has_b) ld<V>(bk, b, bs, 0, j, len, (acc)0);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            acc t = (d[e] - mu) * r;
            if (has_w) t = t * wk[e];
            if (has_b) t = t + bk[e];
            d[e] = t;
        }
        st<V>(y, base + j, d);
    }
    if (threadIdx.x == 0) {
        if (layer) mean[row] = mu;
        rstd[row] = r;
    }
}

WARP_PLANS(norm_fwd, norm_fwd_warp, NORM_FWD_PARAMS, NORM_FWD_ARGS)
BLOCK_PLANS(norm_fwd, norm_fwd_block, NORM_FWD_PARAMS, NORM_FWD_ARGS)

// ---- backward: dx = rstd·(d - mean(d) - xhat·mean(d·xhat)), d = g·w, xhat = (x - mean)·rstd
// (RMS: no mean(d) term); dweight = Σ_rows g·xhat, dbias = Σ_rows g ----

#define NORM_BWD_PARAMS (int layer, const scalar* x, Strided xs, const scalar* w, Strided ws, \
    int has_w, const acc* mean, Strided ms, const acc* rstd, Strided rs, const scalar* g, \
    Strided gs, scalar* dx, acc* pdw, acc* pdb, int want_dw, int want_db, i64 rows, \
    i64 len, i64 rows_per_block)
#define NORM_BWD_ARGS (layer, x, xs, w, ws, has_w, mean, ms, rstd, rs, g, gs, dx, pdw, pdb, \
    want_dw, want_db, rows, len, rows_per_block)

// Block b takes rows [b·rows_per_block, (b+1)·rows_per_block), its warps one row at a time;
// each lane keeps the dweight/dbias partial sums of its columns, and the block writes the sum
// of its warps' partials (in warp order) as row b of pdw/pdb.
template <int V, int IT>
__device__ __forceinline__ void norm_bwd_warp NORM_BWD_PARAMS {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const acc c = (acc)len;
    acc adw[IT][V], adb[IT][V];
#pragma unroll
    for (int k = 0; k < IT; ++k) {
#pragma unroll
        for (int e = 0; e < V; ++e) adw[k][e] = adb[k][e] = 0;
    }
    const i64 r0 = (i64)blockIdx.x * rows_per_block;
    const i64 r1 = min(rows, r0 + rows_per_block);
    for (i64 row = r0 + warp; row < r1; row += NORM_WARPS) {
        const i64 base = row * len;
        const acc mu = layer ? mean[at(ms, row)] : (acc)0;
        const acc r = rstd[at(rs, row)];
        acc xh[IT][V], d[IT][V];
        acc s1 = 0, s2 = 0;
#pragma unroll
        for (int k = 0; k < IT; ++k) {
            const i64 j = ((i64)k * 32 + lane) * V;
            acc wk[V];
            ld<V>(xh[k], x, xs, base, j, len, (acc)0);
            ld<V>(d[k], g, gs, base, j, len, (acc)0);
            if (has_w) ld<V>(wk, w, ws, 0, j, len, (acc)1);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const acc gv = d[k][e], xv = (xh[k][e] - mu) * r;
                const acc dv = has_w ? gv * wk[e] : gv;
                xh[k][e] = xv;
                d[k][e] = dv;
                adw[k][e] += gv * xv;
                adb[k][e] += gv;
                s1 += dv;
                s2 += dv * xv;
            }
        }
        const acc m1 = layer ? warp_sum(s1) / c : (acc)0;
        const acc m2 = warp_sum(s2) / c;
#pragma unroll
        for (int k = 0; k < IT; ++k) {
            const i64 j = ((i64)k * 32 + lane) * V;
            if (j < len) {
#pragma unroll
                for (int e = 0; e < V; ++e) d[k][e] = r * (d[k][e] - m1 - xh[k][e] * m2);
                st<V>(dx, base + j, d[k]);
            }
        }
    }
    if (!want_dw && !want_db) return;
    __shared__ acc part[NORM_WARPS][IT * V * 32];
    for (int which = 0; which < 2; ++which) {
        if (which == 0 ? !want_dw : !want_db) continue;
        acc* out = which == 0 ? pdw : pdb;
#pragma unroll
        for (int k = 0; k < IT; ++k) {
#pragma unroll
            for (int e = 0; e < V; ++e)
                part[warp][(k * 32 + lane) * V + e] = which == 0 ? adw[k][e] : adb[k][e];
        }
        __syncthreads();
        for (i64 j = threadIdx.x; j < len; j += blockDim.x) {
            acc s = part[0][j];
#pragma unroll
            for (int q = 1; q < NORM_WARPS; ++q) s += part[q][j];
            out[(i64)blockIdx.x * len + j] = s;
        }
        __syncthreads();
    }
}

// One block per row: dx only (the partials come from norm_bwd_cols).
template <int V>
__device__ __forceinline__ void norm_bwd_block NORM_BWD_PARAMS {
    const i64 row = blockIdx.x;
    if (row >= rows) return;
    const i64 base = row * len, step = (i64)blockDim.x * V;
    const acc c = (acc)len;
    const acc mu = layer ? mean[at(ms, row)] : (acc)0;
    const acc r = rstd[at(rs, row)];
    acc xk[V], gk[V], wk[V];
    acc s1 = 0, s2 = 0;
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(xk, x, xs, base, j, len, (acc)0);
        ld<V>(gk, g, gs, base, j, len, (acc)0);
        if (has_w) ld<V>(wk, w, ws, 0, j, len, (acc)1);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const acc dv = has_w ? gk[e] * wk[e] : gk[e];
            s1 += dv;
            s2 += dv * ((xk[e] - mu) * r);
        }
    }
    const acc m1 = layer ? block_sum(s1) / c : (acc)0;
    const acc m2 = block_sum(s2) / c;
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(xk, x, xs, base, j, len, (acc)0);
        ld<V>(gk, g, gs, base, j, len, (acc)0);
        if (has_w) ld<V>(wk, w, ws, 0, j, len, (acc)1);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const acc dv = has_w ? gk[e] * wk[e] : gk[e];
            gk[e] = r * (dv - m1 - ((xk[e] - mu) * r) * m2);
        }
        st<V>(dx, base + j, gk);
    }
}

WARP_PLANS(norm_bwd, norm_bwd_warp, NORM_BWD_PARAMS, NORM_BWD_ARGS)
BLOCK_PLANS(norm_bwd, norm_bwd_block, NORM_BWD_PARAMS, NORM_BWD_ARGS)

// Partial dweight/dbias of the block plan: block (32, 8) sums columns blockIdx.x·32 + tx over
// the rows of chunk blockIdx.y (rows_per_chunk each), then over ty in order.
extern "C" __global__ void norm_bwd_cols(int layer, const scalar* x, Strided xs,
                                         const acc* mean, Strided ms, const acc* rstd,
                                         Strided rs, const scalar* g, Strided gs, acc* pdw,
                                         acc* pdb, int want_dw, int want_db, i64 rows, i64 len,
                                         i64 rows_per_chunk) {
    __shared__ acc sw[8][33], sb[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 col = (i64)blockIdx.x * 32 + tx, chunk = blockIdx.y;
    const i64 r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    acc adw = 0, adb = 0;
    if (col < len) {
        for (i64 row = r0 + ty; row < r1; row += 8) {
            const acc gv = ld(g[at(gs, row * len + col)]);
            const acc mu = layer ? mean[at(ms, row)] : (acc)0;
            adw += gv * ((ld(x[at(xs, row * len + col)]) - mu) * rstd[at(rs, row)]);
            adb += gv;
        }
    }
    sw[ty][tx] = adw;
    sb[ty][tx] = adb;
    __syncthreads();
    if (ty == 0 && col < len) {
        acc a = sw[0][tx], b = sb[0][tx];
#pragma unroll
        for (int q = 1; q < 8; ++q) {
            a += sw[q][tx];
            b += sb[q][tx];
        }
        if (want_dw) pdw[chunk * len + col] = a;
        if (want_db) pdb[chunk * len + col] = b;
    }
}

// dweight/dbias: the chunks' partials added in chunk order.
extern "C" __global__ void norm_bwd_final(const acc* pdw, const acc* pdb, scalar* dw,
                                          scalar* db, int want_dw, int want_db, i64 chunks,
                                          i64 len) {
    GRID_LOOP(j, len) {
        if (want_dw) {
            acc s = 0;
            for (i64 q = 0; q < chunks; ++q) s += pdw[q * len + j];
            dw[j] = st(s);
        }
        if (want_db) {
            acc s = 0;
            for (i64 q = 0; q < chunks; ++q) s += pdb[q * len + j];
            db[j] = st(s);
        }
    }
}
"#
    ),
    half: true,
};

const FWD_KERNELS: RowKernels = row_kernels!("norm_fwd");
const BWD_KERNELS: RowKernels = row_kernels!("norm_bwd");

/// At most this many row chunks carry partial dweight/dbias sums.
const MAX_CHUNKS: usize = 256;

/// Rows per chunk of the partial sums: a function of the shape only (deterministic).
fn rows_per_chunk(rows: usize, multiple: usize) -> usize {
    rows.div_ceil(MAX_CHUNKS * multiple).max(1) * multiple
}

/// The storage and view of an optional input, or x's as an unused placeholder.
fn opt_arg<'a>(
    op: &'static str,
    a: Option<&KernelArg<'a>>,
    x: &'a CudaStorage,
    xv: Strided,
) -> Result<(&'a CudaStorage, Strided, i32)> {
    match a {
        Some(a) => Ok((cuda::storage(op, a)?, Strided::of(op, a.layout)?, 1)),
        None => Ok((x, xv, 0)),
    }
}

fn cuda_forward(
    norm: &Norm,
    x: &KernelArg<'_>,
    wa: Option<&KernelArg<'_>>,
    ba: Option<&KernelArg<'_>>,
) -> Result<Outputs> {
    let name = norm.name();
    let xs = cuda::storage(name, x)?;
    let dev = xs.dev();
    let dtype = x.dtype();
    let len = x.shape().dims().last().copied().unwrap_or(1);
    let n = x.layout.elem_count();
    let rows = n.checked_div(len).unwrap_or(0);
    let layer = norm.kind == NormKind::Layer;
    let mut layouts = vec![x.layout];
    layouts.extend(wa.map(|a| a.layout));
    layouts.extend(ba.map(|a| a.layout));
    let plan = RowPlan::new(dtype, len, vec_ok(dtype, len, &layouts));
    let f = dev.function(&CUDA, dtype, plan.kernel(name, dtype, &FWD_KERNELS)?)?;
    let mut y = CudaStorage::alloc(dev, dtype, n)?;
    let mut mean = CudaStorage::alloc(dev, acc_dtype(dtype), if layer { rows } else { 0 })?;
    let mut rstd = CudaStorage::alloc(dev, acc_dtype(dtype), rows)?;
    if rows > 0 {
        let xv = Strided::of(name, x.layout)?;
        let (ws, wv, has_w) = opt_arg(name, wa, xs, xv)?;
        let (bs, bv, has_b) = opt_arg(name, ba, xs, xv)?;
        let (layer32, eps, rows64, len64) = (layer as i32, norm.eps, rows as i64, len as i64);
        crate::cuda_launch!(
            dev,
            name,
            f,
            plan.cfg(rows),
            [
                &layer32,
                &eps,
                xs.slice(),
                &xv,
                ws.slice(),
                &wv,
                &has_w,
                bs.slice(),
                &bv,
                &has_b,
                y.slice_mut(),
                mean.slice_mut(),
                rstd.slice_mut(),
                &rows64,
                &len64
            ]
        )?;
    }
    Ok(if layer {
        smallvec![Box::new(y) as _, Box::new(mean) as _, Box::new(rstd) as _]
    } else {
        smallvec![Box::new(y) as _, Box::new(rstd) as _]
    })
}

#[allow(clippy::too_many_arguments)]
fn cuda_backward(
    op: &NormBackward,
    x: &KernelArg<'_>,
    wa: Option<&KernelArg<'_>>,
    mean: Option<&KernelArg<'_>>,
    rstd: &KernelArg<'_>,
    g: &KernelArg<'_>,
) -> Result<Outputs> {
    let name = op.name();
    let xs = cuda::storage(name, x)?;
    let dev = xs.dev();
    let dtype = x.dtype();
    let len = x.shape().dims().last().copied().unwrap_or(1);
    let n = x.layout.elem_count();
    let rows = n.checked_div(len).unwrap_or(0);
    let layer = op.kind == NormKind::Layer;
    let mut layouts = vec![x.layout, g.layout];
    layouts.extend(wa.map(|a| a.layout));
    let plan = RowPlan::new(dtype, len, vec_ok(dtype, len, &layouts));
    let f = dev.function(&CUDA, dtype, plan.kernel(name, dtype, &BWD_KERNELS)?)?;
    let (want_dw, want_db) = (op.want_dw, op.want_db);
    let mut dx = CudaStorage::alloc(dev, dtype, n)?;
    let mut dw = CudaStorage::alloc(dev, dtype, if want_dw { len } else { 0 })?;
    let mut db = CudaStorage::alloc(dev, dtype, if want_db { len } else { 0 })?;
    let per = match plan {
        RowPlan::Warp { .. } => rows_per_chunk(rows, WARPS_PER_BLOCK),
        RowPlan::Block { .. } => rows_per_chunk(rows, 32),
    };
    let chunks = rows.div_ceil(per);
    // Partial sums stay in the accumulator type (f32 for 16-bit data).
    let partial =
        |on: bool| CudaStorage::alloc(dev, acc_dtype(dtype), if on { chunks * len } else { 0 });
    let (mut pdw, mut pdb) = (partial(want_dw)?, partial(want_db)?);
    let xv = Strided::of(name, x.layout)?;
    let (ws, wv, has_w) = opt_arg(name, wa, xs, xv)?;
    let (ms, mv, _) = opt_arg(name, mean, xs, xv)?;
    let (rs, rv) = (cuda::storage(name, rstd)?, Strided::of(name, rstd.layout)?);
    let (gs, gv) = (cuda::storage(name, g)?, Strided::of(name, g.layout)?);
    let (layer32, dw32, db32) = (layer as i32, want_dw as i32, want_db as i32);
    let (rows64, len64, chunks64) = (rows as i64, len as i64, chunks as i64);
    if rows > 0 {
        let (cfg, per64) = match plan {
            RowPlan::Warp { .. } => (
                LaunchConfig {
                    grid_dim: (chunks as u32, 1, 1),
                    block_dim: (32 * WARPS_PER_BLOCK as u32, 1, 1),
                    shared_mem_bytes: 0,
                },
                per as i64,
            ),
            RowPlan::Block { .. } => (plan.cfg(rows), 1),
        };
        crate::cuda_launch!(
            dev,
            name,
            f,
            cfg,
            [
                &layer32,
                xs.slice(),
                &xv,
                ws.slice(),
                &wv,
                &has_w,
                ms.slice(),
                &mv,
                rs.slice(),
                &rv,
                gs.slice(),
                &gv,
                dx.slice_mut(),
                pdw.slice_mut(),
                pdb.slice_mut(),
                &dw32,
                &db32,
                &rows64,
                &len64,
                &per64
            ]
        )?;
        if matches!(plan, RowPlan::Block { .. }) && (want_dw || want_db) {
            let f = dev.function(&CUDA, dtype, "norm_bwd_cols")?;
            let cfg = LaunchConfig {
                grid_dim: (len.div_ceil(32) as u32, chunks as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            let per64 = per as i64;
            crate::cuda_launch!(
                dev,
                name,
                f,
                cfg,
                [
                    &layer32,
                    xs.slice(),
                    &xv,
                    ms.slice(),
                    &mv,
                    rs.slice(),
                    &rv,
                    gs.slice(),
                    &gv,
                    pdw.slice_mut(),
                    pdb.slice_mut(),
                    &dw32,
                    &db32,
                    &rows64,
                    &len64,
                    &per64
                ]
            )?;
        }
    }
    if want_dw || want_db {
        if rows == 0 {
            // No rows: the sums are empty.
            let zeros = |on: bool| CudaStorage::zeros(dev, dtype, if on { len } else { 0 });
            (dw, db) = (zeros(want_dw)?, zeros(want_db)?);
        } else {
            let f = dev.function(&CUDA, dtype, "norm_bwd_final")?;
            crate::cuda_launch!(
                dev,
                name,
                f,
                cuda::grid(len),
                [
                    pdw.slice(),
                    pdb.slice(),
                    dw.slice_mut(),
                    db.slice_mut(),
                    &dw32,
                    &db32,
                    &chunks64,
                    &len64
                ]
            )?;
        }
    }
    let mut o: Outputs = smallvec![Box::new(dx) as _];
    if want_dw {
        o.push(Box::new(dw));
    }
    if want_db {
        o.push(Box::new(db));
    }
    Ok(o)
}

impl Op for Norm {
    fn name(&self) -> &'static str {
        match self.kind {
            NormKind::Layer => "layer_norm",
            NormKind::Rms => "rms_norm",
        }
    }
    fn idioms(&self) -> Idioms {
        match self.kind {
            NormKind::Layer => Self::LAYER_IDIOMS,
            NormKind::Rms => Self::RMS_IDIOMS,
        }
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = self.name();
        let want = 1 + self.has_weight as usize + self.has_bias as usize;
        if inputs.len() != want {
            return Err(Error::invalid(
                name,
                format!("expects {want} inputs, got {}", inputs.len()),
            ));
        }
        if self.kind == NormKind::Rms && self.has_bias {
            return Err(Error::invalid(name, "RMS norm takes no bias"));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(
                name,
                format!("eps must be finite and >= 0, got {}", self.eps),
            ));
        }
        let x = inputs[0];
        let c = check_x(name, x)?;
        let mut i = 1;
        if self.has_weight {
            check_param(name, "weight", x, inputs[i], c)?;
            i += 1;
        }
        if self.has_bias {
            check_param(name, "bias", x, inputs[i], c)?;
        }
        let st = TensorSpec::new(stat_shape(x.shape()), acc_dtype(x.dtype()));
        let mut specs: Specs = smallvec![TensorSpec::new(x.shape().clone(), x.dtype())];
        for _ in 0..self.stats() {
            specs.push(st.clone());
        }
        Ok(specs)
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        // Layer: mean (1), variance (3), normalize + affine (4). RMS: square-sum (2), scale (2).
        let per = if self.kind == NormKind::Layer { 8 } else { 4 };
        Cost::streaming(inputs, outputs, per * n)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let x = inputs[0];
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let wa = self.has_weight.then(|| &inputs[1]);
        let ba = self.has_bias.then(|| &inputs[1 + self.has_weight as usize]);
        if cuda::on_cuda(inputs) {
            return cuda_forward(self, &x, wa, ba);
        }
        Ok(float_dispatch!(name, x.cpu(name)?, |v| fwd_kernel(
            self, v, x.layout, wa, ba, c
        )?))
    }
    fn save(&self) -> Save {
        let inputs = if self.has_weight { 0b11 } else { 0b1 };
        let outputs = match self.kind {
            NormKind::Layer => 0b110,
            NormKind::Rms => 0b10,
        };
        Save { inputs, outputs }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let x = ctx.input(0)?;
        let mut ins: SmallVec<[&Tensor; 5]> = smallvec![x];
        if self.has_weight {
            ins.push(ctx.input(1)?);
        }
        for i in 0..self.stats() {
            ins.push(ctx.output(1 + i)?);
        }
        ins.push(ctx.grad(0)?);
        let wi = 1;
        let bi = 1 + self.has_weight as usize;
        let op = NormBackward {
            kind: self.kind,
            has_weight: self.has_weight,
            want_dw: self.has_weight && ctx.needs(wi),
            want_db: self.has_bias && ctx.needs(bi),
        };
        let mut outs = execute(op, &ins)?.into_iter();
        let dx = outs.next();
        let dw = if op.want_dw { outs.next() } else { None };
        let db = if op.want_db { outs.next() } else { None };
        let mut grads: InputGrads = smallvec![if ctx.needs(0) { dx } else { None }];
        if self.has_weight {
            grads.push(dw);
        }
        if self.has_bias {
            grads.push(db);
        }
        Ok(grads)
    }
}

// ----- backward -----

/// The fused backward of [`Norm`]. Inputs: `x`, the weight (when `has_weight`), the saved
/// statistics (mean and rstd for layer norm, rstd for RMS norm), the gradient of y.
/// Outputs: dx, then dweight when `want_dw`, then dbias when `want_db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormBackward {
    /// Which normalization.
    pub kind: NormKind,
    /// Whether the weight is an input.
    pub has_weight: bool,
    /// Whether to output the weight gradient.
    pub want_dw: bool,
    /// Whether to output the bias gradient.
    pub want_db: bool,
}

/// Per-chunk state of the backward: partial sums of the weight and bias gradients (empty
/// when not wanted) and two scratch rows.
struct GradState<A> {
    dw: Vec<A>,
    db: Vec<A>,
    xhat: Vec<A>,
    dxhat: Vec<A>,
}

/// dx of one row; adds `g·xhat` and `g` into the partial dweight and dbias. Simple loops
/// over scratch rows in L1 (each vectorizes on its own) rather than one fused loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn norm_bwd_row<T: FloatElement>(
    kind: NormKind,
    x: &[T],
    g: &[T],
    w: &[T::Acc],
    mean: T::Acc,
    rstd: T::Acc,
    out: &mut [MaybeUninit<T>],
    st: &mut GradState<T::Acc>,
) {
    let c = <T::Acc as AccFloat>::of(x.len() as f64);
    let (xh, d) = (&mut st.xhat[..x.len()], &mut st.dxhat[..x.len()]);
    for (((xh, d), &v), (&gv, &wv)) in xh.iter_mut().zip(d.iter_mut()).zip(x).zip(g.iter().zip(w)) {
        *xh = (v.to_acc() - mean) * rstd;
        *d = gv.to_acc() * wv;
    }
    // Σ dxhat and Σ dxhat·xhat, 16 lanes in a fixed order.
    let m1 = match kind {
        NormKind::Layer => sum_map(d, |v: T::Acc| v) / c,
        NormKind::Rms => <T::Acc as AccFloat>::ZERO,
    };
    let m2 = sum_map2(d, xh, |a: T::Acc, b: T::Acc| a * b) / c;
    for ((o, &dv), &xv) in out.iter_mut().zip(d.iter()).zip(xh.iter()) {
        o.write(T::from_acc(rstd * (dv - m1 - xv * m2)));
    }
    for ((p, &xv), &gv) in st.dw.iter_mut().zip(xh.iter()).zip(g) {
        *p += gv.to_acc() * xv;
    }
    for (p, &gv) in st.db.iter_mut().zip(g) {
        *p += gv.to_acc();
    }
}

type GradOut<T> = (Vec<T>, Option<Vec<T>>, Option<Vec<T>>);

/// The backward over rows; each chunk's state holds its partial dweight and dbias.
struct NormGradRows<'r, 'a, T: FloatElement> {
    op: &'r NormBackward,
    x: &'r Rows<'a, T>,
    g: &'r Rows<'a, T>,
    w: &'r [T::Acc],
    mean: &'r [T::Acc],
    rstd: &'r [T::Acc],
}

impl<T: FloatElement> RowKernel for NormGradRows<'_, '_, T> {
    type Out = T;
    type State = GradState<T::Acc>;
    fn out_len(&self) -> usize {
        self.x.len
    }
    fn work_len(&self) -> usize {
        2 * self.x.len
    }
    fn state(&self) -> Self::State {
        let zeros = |on: bool| vec![<T::Acc as AccFloat>::ZERO; if on { self.x.len } else { 0 }];
        GradState {
            dw: zeros(self.op.want_dw),
            db: zeros(self.op.want_db),
            xhat: zeros(true),
            dxhat: zeros(true),
        }
    }
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], part: &mut Self::State) {
        let m = match self.op.kind {
            NormKind::Layer => self.mean[r],
            NormKind::Rms => <T::Acc as AccFloat>::ZERO,
        };
        norm_bwd_row(
            self.op.kind,
            self.x.row(r),
            self.g.row(r),
            self.w,
            m,
            self.rstd[r],
            out,
            part,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn norm_bwd<T: FloatElement + CpuElement>(
    op: &NormBackward,
    x: &[T],
    xl: &Layout,
    w: &[T::Acc],
    mean: &[T::Acc],
    rstd: &[T::Acc],
    g: &[T],
    gl: &Layout,
) -> Result<GradOut<T>> {
    let (xr, gr) = (Rows::last(x, xl)?, Rows::last(g, gl)?);
    let len = xr.len;
    let zero = <T::Acc as AccFloat>::ZERO;
    let k = NormGradRows {
        op,
        x: &xr,
        g: &gr,
        w,
        mean,
        rstd,
    };
    let (dx, parts) = run_rows(&k, xr.rows());
    // Partials combined in chunk order: deterministic.
    let combine = |pick: fn(&GradState<T::Acc>) -> &Vec<T::Acc>| -> Vec<T> {
        let mut acc = vec![zero; len];
        for p in &parts {
            for (a, &v) in acc.iter_mut().zip(pick(p)) {
                *a += v;
            }
        }
        acc.into_iter().map(T::from_acc).collect()
    };
    let dw = op.want_dw.then(|| combine(|p| &p.dw));
    let db = op.want_db.then(|| combine(|p| &p.db));
    Ok((dx, dw, db))
}

/// Reads a per-row statistic input as accumulator values.
fn stat_acc<A: CpuElement + Copy>(op: &'static str, a: &KernelArg<'_>) -> Result<Vec<A>> {
    let s = a.cpu(op)?.as_slice::<A>(op)?;
    Ok(match a.layout.contiguous_range() {
        Some((lo, hi)) => s[lo..hi].to_vec(),
        None => a.layout.indices().map(|i| s[i]).collect(),
    })
}

#[allow(clippy::too_many_arguments)]
fn bwd_kernel<T: FloatElement + CpuElement>(
    op: &NormBackward,
    v: &[T],
    xl: &Layout,
    wa: Option<&KernelArg<'_>>,
    mean: Option<&KernelArg<'_>>,
    rstd: &KernelArg<'_>,
    gs: &dynn_core::CpuStorage,
    gl: &Layout,
    c: usize,
) -> Result<Outputs>
where
    T::Acc: CpuElement,
{
    let name = op.name();
    let w = param_acc::<T>(name, wa, c, 1.0)?;
    let mean = match mean {
        Some(m) => stat_acc::<T::Acc>(name, m)?,
        None => Vec::new(),
    };
    let rstd = stat_acc::<T::Acc>(name, rstd)?;
    let (dx, dw, db) = norm_bwd(op, v, xl, &w, &mean, &rstd, gs.as_slice::<T>(name)?, gl)?;
    let mut o: Outputs = smallvec![boxed(dx)];
    o.extend(dw.map(boxed));
    o.extend(db.map(boxed));
    Ok(o)
}

impl Op for NormBackward {
    fn name(&self) -> &'static str {
        match self.kind {
            NormKind::Layer => "layer_norm_backward",
            NormKind::Rms => "rms_norm_backward",
        }
    }
    fn idioms(&self) -> Idioms {
        match self.kind {
            NormKind::Layer => Norm::LAYER_BACKWARD_IDIOMS,
            NormKind::Rms => Norm::RMS_BACKWARD_IDIOMS,
        }
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = self.name();
        let stats = if self.kind == NormKind::Layer { 2 } else { 1 };
        let want = 2 + self.has_weight as usize + stats;
        if inputs.len() != want {
            return Err(Error::invalid(
                name,
                format!("expects {want} inputs, got {}", inputs.len()),
            ));
        }
        if (self.want_dw && !self.has_weight) || (self.want_db && self.kind == NormKind::Rms) {
            return Err(Error::invalid(
                name,
                "asked for a gradient of a parameter the norm does not have",
            ));
        }
        let x = inputs[0];
        let c = check_x(name, x)?;
        if self.has_weight {
            check_param(name, "weight", x, inputs[1], c)?;
        }
        let s0 = 1 + self.has_weight as usize;
        let st = stat_shape(x.shape());
        for s in &inputs[s0..s0 + stats] {
            if s.shape() != &st {
                return Err(Error::shape_mismatch(name, s.shape(), &st));
            }
            if s.dtype() != acc_dtype(x.dtype()) {
                return Err(Error::DTypeMismatch {
                    op: name,
                    expected: acc_dtype(x.dtype()),
                    got: s.dtype(),
                });
            }
        }
        let g = inputs[want - 1];
        if g.shape() != x.shape() {
            return Err(Error::shape_mismatch(name, g.shape(), x.shape()));
        }
        if g.dtype() != x.dtype() {
            return Err(Error::DTypeMismatch {
                op: name,
                expected: x.dtype(),
                got: g.dtype(),
            });
        }
        let mut specs: Specs = smallvec![TensorSpec::new(x.shape().clone(), x.dtype())];
        for _ in 0..(self.want_dw as usize + self.want_db as usize) {
            specs.push(TensorSpec::new([c], x.dtype()));
        }
        Ok(specs)
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        // xhat (2), dxhat (1), two row sums (3), dx (4), dweight/dbias sums (3).
        Cost::streaming(inputs, outputs, 13 * n)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let x = inputs[0];
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let wa = self.has_weight.then(|| &inputs[1]);
        let s0 = 1 + self.has_weight as usize;
        let layer = self.kind == NormKind::Layer;
        let g = inputs[inputs.len() - 1];
        let mean = layer.then(|| &inputs[s0]);
        let rstd = &inputs[s0 + layer as usize];
        if cuda::on_cuda(inputs) {
            return cuda_backward(self, &x, wa, mean, rstd, &g);
        }
        let gs = g.cpu(name)?;
        Ok(float_dispatch!(name, x.cpu(name)?, |v| bwd_kernel(
            self, v, x.layout, wa, mean, rstd, gs, g.layout, c
        )?))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// Layer and RMS normalization on tensors.
pub trait NormOps {
    /// Layer normalization over the last dim: `(x - mean) / sqrt(var + eps) · weight + bias`
    /// (biased variance, as PyTorch). `weight` and `bias`, when given, have shape `(C,)` for
    /// a last dim of size C and x's dtype. One fused kernel forward and backward.
    fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor>;
    /// RMS normalization over the last dim: `x / sqrt(mean(x²) + eps) · weight`.
    fn rms_norm(&self, weight: Option<&Tensor>, eps: f64) -> Result<Tensor>;
}

fn first(op: &'static str, outs: dynn_core::Tensors) -> Result<Tensor> {
    outs.into_iter()
        .next()
        .ok_or_else(|| Error::Msg(format!("{op} produced no output")))
}

impl NormOps for Tensor {
    fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let op = Norm {
            kind: NormKind::Layer,
            eps,
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
        };
        let ins: SmallVec<[&Tensor; 3]> = std::iter::once(self).chain(weight).chain(bias).collect();
        first("layer_norm", execute(op, &ins)?)
    }
    fn rms_norm(&self, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let op = Norm {
            kind: NormKind::Rms,
            eps,
            has_weight: weight.is_some(),
            has_bias: false,
        };
        let ins: SmallVec<[&Tensor; 3]> = std::iter::once(self).chain(weight).collect();
        first("rms_norm", execute(op, &ins)?)
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name, idioms, differentiable| OpInfo {
        name,
        idioms,
        differentiable,
        family: "norm",
    };
    vec![
        f("layer_norm", Norm::LAYER_IDIOMS, true),
        f("rms_norm", Norm::RMS_IDIOMS, true),
        f("layer_norm_backward", Norm::LAYER_BACKWARD_IDIOMS, false),
        f("rms_norm_backward", Norm::RMS_BACKWARD_IDIOMS, false),
    ]
}
