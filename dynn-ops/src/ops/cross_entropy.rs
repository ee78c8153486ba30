//! Cross-entropy loss on logits with integer class targets, fused: the forward computes each
//! row's log-sum-exp and loss in one sweep over the logits from memory (in L1-sized blocks:
//! the block's max, then its Σ exp against the running max, an "online" log-sum-exp), with
//! label smoothing and an ignored target value; the backward writes
//! `(softmax - smoothed one-hot) · scale` in one pass from the saved log-sum-exp.
//!
//! Logits have shape `(..., C)`: every leading dim is flattened into rows (so `(N, C)` and
//! `(B, T, C)` both work), and the targets have the leading shape (`(N,)`, `(B, T)`), dtype
//! i64 or u32.

use crate::cpu::gather_layout;
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::float_dispatch;
use crate::ops::softmax::{
    RowKernel, RowPlan, Rows, VecExp, acc_dtype, boxed, max_row, run_rows, sum_map, vec_ok,
};
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, CpuStorage, DType, DeviceStorage, Error, FloatElement,
    Idioms, InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor,
    TensorSpec, execute, execute1, smallvec::smallvec,
};
use std::mem::MaybeUninit;

/// How per-row losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossReduction {
    /// The mean over rows whose target is not ignored (NaN when every row is ignored, as
    /// PyTorch).
    #[default]
    Mean,
    /// The sum over rows.
    Sum,
    /// No reduction: one loss per row, shaped like the targets (0 for ignored rows).
    None,
}

/// Options of [`CrossEntropyOps::cross_entropy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyOpts {
    /// Rows whose target equals this value contribute no loss and no gradient, and are not
    /// counted by the mean.
    pub ignore_index: Option<i64>,
    /// ε in [0, 1]: the target distribution is `(1 - ε)·onehot + ε/C` (PyTorch's
    /// `label_smoothing`).
    pub label_smoothing: f64,
    /// How per-row losses are combined.
    pub reduction: LossReduction,
}

impl Default for CrossEntropyOpts {
    fn default() -> Self {
        CrossEntropyOpts {
            ignore_index: None,
            label_smoothing: 0.0,
            reduction: LossReduction::Mean,
        }
    }
}

/// Fused cross-entropy. Inputs `(logits, targets)`; outputs the loss (logits' dtype) and the
/// per-row log-sum-exp (accumulator dtype, saved for the backward).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropy {
    /// The options.
    pub opts: CrossEntropyOpts,
}

impl CrossEntropy {
    /// Idioms of the forward: an indirect read (the target's logit), two row reductions (max,
    /// Σ exp; the reduction over rows rides on the second) and one map (exp).
    pub const IDIOMS: Idioms = Idioms([0, 0, 1, 2, 1, 0]);
    /// Idioms of the backward: the paper's "nll loss backward" row `[0,1,0,0,0,0]` (writing
    /// the one-hot gradient into a fresh buffer) plus the map that recomputes the softmax.
    pub const BACKWARD_IDIOMS: Idioms = Idioms([0, 1, 0, 0, 1, 0]);
}

/// Shapes of the rows: `(leading shape, C)`.
fn split_shape(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    opts: &CrossEntropyOpts,
) -> Result<(Shape, usize)> {
    if !logits.dtype().is_float() {
        return Err(Error::unsupported_dtype(op, logits.dtype()));
    }
    if !matches!(targets.dtype(), DType::I64 | DType::U32) {
        return Err(Error::UnsupportedDType {
            op,
            dtype: targets.dtype(),
            hint: " for targets (expected i64 or u32 class indices)".into(),
        });
    }
    let d = logits.dims();
    let Some((&c, lead)) = d.split_last() else {
        return Err(Error::invalid(
            op,
            "logits must have at least one dim (the classes)",
        ));
    };
    if c == 0 {
        return Err(Error::invalid(
            op,
            format!("logits of shape {} have no classes", logits.shape()),
        ));
    }
    let lead = Shape::new(lead);
    if targets.shape() != &lead {
        // Targets must have the logits' leading shape: lhs is what came, rhs what was expected.
        return Err(Error::shape_mismatch(op, targets.shape(), &lead));
    }
    if !(0.0..=1.0).contains(&opts.label_smoothing) {
        return Err(Error::invalid(
            op,
            format!(
                "label_smoothing must be in [0, 1], got {}",
                opts.label_smoothing
            ),
        ));
    }
    Ok((lead, c))
}

/// The targets as i64 in row order.
fn targets_i64(op: &'static str, t: &KernelArg<'_>) -> Result<Vec<i64>> {
    targets_of(op, t.cpu(op)?, t.layout)
}

/// The targets in `s` seen through `layout`, as i64 in row order.
fn targets_of(op: &'static str, s: &CpuStorage, layout: &Layout) -> Result<Vec<i64>> {
    Ok(match s {
        CpuStorage::I64(v) => gather_layout(v, layout),
        CpuStorage::U32(v) => gather_layout(v, layout)
            .into_iter()
            .map(i64::from)
            .collect(),
        other => return Err(Error::unsupported_dtype(op, other.dtype())),
    })
}

/// Checks every non-ignored target is a class index; returns how many rows count.
fn check_targets(
    op: &'static str,
    targets: &[i64],
    c: usize,
    ignore: Option<i64>,
) -> Result<usize> {
    let mut count = 0;
    for (r, &t) in targets.iter().enumerate() {
        if Some(t) == ignore {
            continue;
        }
        if t < 0 || t as u64 >= c as u64 {
            return Err(Error::IndexOutOfRange {
                op,
                index: t,
                size: c,
                context: format!(" (target of row {r})"),
            });
        }
        count += 1;
    }
    Ok(count)
}

/// Elements per block of the forward's sweep: a block of logits (8 KiB in f32) stays in L1
/// between the block's two passes (its max, then its fused Σ exp).
const LSE_BLOCK: usize = 512;

/// The forward over rows: each row's `(lse, loss)`, `(0, 0)` for ignored rows.
struct CeRows<'r, 'a, T: FloatElement> {
    x: &'r Rows<'a, T>,
    targets: &'r [i64],
    ignore: Option<i64>,
    eps: f64,
    /// The logits are too large for the cache: each block of the next row is prefetched
    /// while this row's block is summed, so that memory stays busy during the arithmetic.
    prefetch: bool,
}

impl<T: FloatElement> RowKernel for CeRows<'_, '_, T>
where
    T::Acc: VecExp,
{
    type Out = (T::Acc, T::Acc);
    type State = ();
    fn out_len(&self) -> usize {
        1
    }
    fn work_len(&self) -> usize {
        self.x.len
    }
    fn state(&self) {}
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<(T::Acc, T::Acc)>], _: &mut ()) {
        let zero = <T::Acc as AccFloat>::ZERO;
        let t = self.targets[r];
        if Some(t) == self.ignore {
            out[0].write((zero, zero));
            return;
        }
        let x = self.x.row(r);
        // One sweep over the row in blocks that stay in L1: each block's max, then its Σ exp
        // against the running max, rescaling the running sum when the max grows (the
        // "online" log-sum-exp). Blocks are fixed, so the order is too.
        let (mut m, mut s, mut sx) = (
            <T::Acc as AccFloat>::NEG_INFINITY,
            <T::Acc as AccFloat>::ZERO,
            <T::Acc as AccFloat>::ZERO,
        );
        let next = (self.prefetch && r + 1 < self.x.rows()).then(|| self.x.row(r + 1));
        for (b, blk) in x.chunks(LSE_BLOCK).enumerate() {
            if let Some(next) = next {
                // In bounds: every row has the same length.
                crate::cpu::prefetch(&next[b * LSE_BLOCK..][..blk.len()]);
            }
            if self.eps > 0.0 {
                sx += sum_map(blk, |v: T| v.to_acc());
            }
            let mb = max_row(blk);
            if mb > m {
                s = s * (m - mb).vexp();
                m = mb;
            }
            if m == <T::Acc as AccFloat>::NEG_INFINITY {
                // Only -inf so far: those terms are 0 (and x - m would be NaN).
                continue;
            }
            s += sum_map(blk, |v: T| (v.to_acc() - m).vexp_term());
        }
        let ln_s = s.ln();
        // Targets are checked before the kernel runs: 0 <= t < C.
        let xt = x[t as usize].to_acc();
        // lse - x_t as ln Σ + (max - x_t): no rounding of lse when the max is large.
        let loss = if self.eps > 0.0 {
            let eps = <T::Acc as AccFloat>::of(self.eps);
            let mean_x = sx / <T::Acc as AccFloat>::of(x.len() as f64);
            ln_s + (<T::Acc as AccFloat>::ONE - eps) * (m - xt) + eps * (m - mean_x)
        } else {
            ln_s + (m - xt)
        };
        out[0].write((m + ln_s, loss));
    }
}

fn ce_fwd<T: FloatElement + CpuElement>(
    op: &CrossEntropy,
    x: &[T],
    xl: &Layout,
    targets: &[i64],
    count: usize,
) -> Result<Outputs>
where
    T::Acc: VecExp + CpuElement,
{
    let x = Rows::last(x, xl)?;
    let k = CeRows {
        x: &x,
        targets,
        ignore: op.opts.ignore_index,
        eps: op.opts.label_smoothing,
        prefetch: std::mem::size_of_val(&x.data[..]) >= crate::cpu::STREAM_MIN_BYTES,
    };
    let (per_row, _) = run_rows(&k, targets.len());
    let lse: Vec<T::Acc> = per_row.iter().map(|p| p.0).collect();
    let loss: Vec<T> = match op.opts.reduction {
        LossReduction::None => per_row.iter().map(|p| T::from_acc(p.1)).collect(),
        red => {
            // Rows summed in order, in f64: deterministic and accurate.
            let total: f64 = per_row.iter().map(|p| p.1.f64()).sum();
            let v = if red == LossReduction::Mean {
                total / count as f64
            } else {
                total
            };
            vec![T::from_f64(v)]
        }
    };
    Ok(smallvec![boxed(loss), boxed(lse)])
}

// ----- CUDA -----

/// Cross-entropy forward and backward. Forward: one warp (rows up to 1024 classes) or one
/// block per row; each thread keeps an online log-sum-exp (running max, Σ exp against it) and
/// Σ x over its elements in one pass over the logits, merged across the warp and block in a
/// fixed order; the loss reduction is one block summing the row losses in f64 in a fixed
/// order. Backward: one block per row. Targets are i64 or u32 (`_i64` / `_u32` kernels).
pub const CUDA: CudaSource = CudaSource {
    name: "cross_entropy",
    code: concat!(
        crate::ops::softmax::cuda_row_helpers!(),
        r#"
// Online log-sum-exp state of a run of elements: max m, Σ e^(x - m), Σ x.
struct Lse {
    acc m, s, sx;
};

__device__ __forceinline__ void lse_add(Lse& a, acc v) {
    if (v > a.m) {
        a.s = a.s * dexp(a.m - v) + (acc)1;
        a.m = v;
    } else if (!(v == neg_inf<acc>())) {
        a.s += dexp(v - a.m);  // a NaN poisons the sum, as on the CPU
    }
    a.sx += v;
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
    const acc m = max(a.m, b.m);
    const acc ea = a.m == m ? (acc)1 : dexp(a.m - m);
    const acc eb = b.m == m ? (acc)1 : dexp(b.m - m);
    return Lse{m, a.s * ea + b.s * eb, a.sx + b.sx};
}

__device__ __forceinline__ Lse lse_warp(Lse a) {
    for (int o = 16; o > 0; o >>= 1) {
        Lse b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        b.sx = __shfl_xor_sync(0xffffffffu, a.sx, o);
        a = lse_merge(a, b);
    }
    return a;
}

// The whole block's state, valid in thread 0.
__device__ __forceinline__ Lse lse_block(Lse a) {
    __shared__ acc sm[32], ss[32], sx[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    a = lse_warp(a);
    if (lane == 0) {
        sm[warp] = a.m;
        ss[warp] = a.s;
        sx[warp] = a.sx;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < nw ? Lse{sm[lane], ss[lane], sx[lane]} : Lse{neg_inf<acc>(), 0, 0};
        a = lse_warp(a);
    }
    return a;
}

// One row: BLOCK = one block per row, else one warp per row (4 warps per block).
template <typename L, int V, bool BLOCK>
__device__ __forceinline__ void ce_fwd(const scalar* x, Strided xs, const L* t, Strided ts,
                                       i64 ignore, int has_ignore, double eps, acc* lse,
                                       acc* loss, i64 rows, i64 len) {
    const i64 row = BLOCK ? (i64)blockIdx.x
                          : (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const i64 tgt = (i64)t[at(ts, row)];
    if (has_ignore && tgt == ignore) {
        if (BLOCK ? threadIdx.x == 0 : (threadIdx.x & 31) == 0) {
            lse[row] = 0;
            loss[row] = 0;
        }
        return;
    }
    const i64 base = row * len;
    const int lane = BLOCK ? threadIdx.x : (threadIdx.x & 31);
    const i64 step = (BLOCK ? (i64)blockDim.x : 32) * V;
    Lse a{neg_inf<acc>(), 0, 0};
    for (i64 j = (i64)lane * V; j < len; j += step) {
        acc d[V];
        ld<V>(d, x, xs, base, j, len, (acc)0);
#pragma unroll
        for (int e = 0; e < V; ++e) lse_add(a, d[e]);
    }
    a = BLOCK ? lse_block(a) : lse_warp(a);
    if (lane != 0) return;
    const acc ln_s = log(a.s);
    acc l;
    if (tgt < 0 || tgt >= len) {
        l = ln_s * (acc)__longlong_as_double(0x7ff8000000000000LL);  // NaN (the host checks)
    } else {
        const acc xt = ld(x[at(xs, base + tgt)]);
        if (eps > 0) {
            const acc ep = (acc)eps;
            const acc mean_x = a.sx / (acc)len;
            l = ln_s + ((acc)1 - ep) * (a.m - xt) + ep * (a.m - mean_x);
        } else {
            l = ln_s + (a.m - xt);
        }
    }
    lse[row] = a.m + ln_s;
    loss[row] = l;
}

#define CE_FWD(NAME, L, V, BLOCK) \
    extern "C" __global__ void NAME(const scalar* x, Strided xs, const L* t, Strided ts, \
                                    i64 ignore, int has_ignore, double eps, acc* lse, \
                                    acc* loss, i64 rows, i64 len) { \
        ce_fwd<L, V, BLOCK>(x, xs, t, ts, ignore, has_ignore, eps, lse, loss, rows, len); \
    }
CE_FWD(ce_fwd_wv_i64, i64, VEC, false)
CE_FWD(ce_fwd_ws_i64, i64, 1, false)
CE_FWD(ce_fwd_bv_i64, i64, VEC, true)
CE_FWD(ce_fwd_bs_i64, i64, 1, true)
CE_FWD(ce_fwd_wv_u32, u32, VEC, false)
CE_FWD(ce_fwd_ws_u32, u32, 1, false)
CE_FWD(ce_fwd_bv_u32, u32, VEC, true)
CE_FWD(ce_fwd_bs_u32, u32, 1, true)

// The reduced loss: Σ of the row losses in f64 (fixed order: strided per thread, then the
// block tree), divided by `div` (the count of rows for the mean, 1 for the sum). One block.
extern "C" __global__ void ce_reduce(const acc* loss, i64 rows, double div, scalar* out) {
    double s = 0;
    for (i64 r = threadIdx.x; r < rows; r += blockDim.x) s += (double)loss[r];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = to_elem(s / div, (scalar*)0);  // rounded once from f64
}

// The gradient of row blockIdx.x: (e^(x - lse) - ε/C - (1-ε)·[j = t])·scale, 0 if ignored.
// red: 0 none (scale g[row]), 1 sum (g[0]), 2 mean (g[0] / count).
template <typename L>
__device__ __forceinline__ void ce_bwd(const scalar* x, Strided xs, const L* t, Strided ts,
                                       i64 ignore, int has_ignore, const acc* lse,
                                       Strided ls, const scalar* g, Strided gs, int red,
                                       double count, double off, double one_minus_eps,
                                       scalar* out, i64 rows, i64 len) {
    const i64 row = blockIdx.x;
    if (row >= rows) return;
    const i64 base = row * len;
    const i64 tgt = (i64)t[at(ts, row)];
    if (has_ignore && tgt == ignore) {
        for (i64 j = threadIdx.x; j < len; j += blockDim.x) out[base + j] = st((acc)0);
        return;
    }
    acc scale;
    if (red == 0) scale = ld(g[at(gs, row)]);
    else if (red == 1) scale = ld(g[at(gs, 0)]);
    else scale = (acc)((double)ld(g[at(gs, 0)]) / count);
    if (tgt < 0 || tgt >= len) scale = (acc)__longlong_as_double(0x7ff8000000000000LL);
    const acc l = lse[at(ls, row)], o = (acc)off, ome = (acc)one_minus_eps;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) {
        const acc p = dexp(ld(x[at(xs, base + j)]) - l) - o;
        out[base + j] = st((j == tgt ? p - ome : p) * scale);
    }
}

#define CE_BWD(NAME, L) \
    extern "C" __global__ void NAME(const scalar* x, Strided xs, const L* t, Strided ts, \
                                    i64 ignore, int has_ignore, const acc* lse, Strided ls, \
                                    const scalar* g, Strided gs, int red, double count, \
                                    double off, double one_minus_eps, scalar* out, i64 rows, \
                                    i64 len) { \
        ce_bwd<L>(x, xs, t, ts, ignore, has_ignore, lse, ls, g, gs, red, count, off, \
                  one_minus_eps, out, rows, len); \
    }
CE_BWD(ce_bwd_i64, i64)
CE_BWD(ce_bwd_u32, u32)
"#
    ),
    half: true,
};

/// The forward kernel: `[warp, block][vec, scalar][i64, u32]`.
const FWD_KERNELS: [[[&str; 2]; 2]; 2] = [
    [
        ["ce_fwd_wv_i64", "ce_fwd_wv_u32"],
        ["ce_fwd_ws_i64", "ce_fwd_ws_u32"],
    ],
    [
        ["ce_fwd_bv_i64", "ce_fwd_bv_u32"],
        ["ce_fwd_bs_i64", "ce_fwd_bs_u32"],
    ],
];

/// Index of the targets' dtype among the kernels' label types.
fn label_index(op: &'static str, t: &KernelArg<'_>) -> Result<usize> {
    match t.dtype() {
        DType::I64 => Ok(0),
        DType::U32 => Ok(1),
        other => Err(Error::UnsupportedDType {
            op,
            dtype: other,
            hint: " for targets (expected i64 or u32 class indices)".into(),
        }),
    }
}

/// The targets of GPU storage, copied to the host in row order (for the same checks as on
/// the CPU: a bad target is an error, and the mean needs the count of rows that count).
fn gpu_targets(op: &'static str, t: &KernelArg<'_>) -> Result<Vec<i64>> {
    let host = dynn_core::DeviceStorage::to_host(cuda::storage(op, t)?)?;
    targets_of(op, &host, t.layout)
}

fn cuda_forward(op: &CrossEntropy, x: &KernelArg<'_>, t: &KernelArg<'_>) -> Result<Outputs> {
    let name = "cross_entropy";
    let (xs, ts) = (cuda::storage(name, x)?, cuda::storage(name, t)?);
    let dev = xs.dev();
    let dtype = x.dtype();
    let len = x.shape().dims().last().copied().unwrap_or(1);
    let targets = gpu_targets(name, t)?;
    let count = check_targets(name, &targets, len, op.opts.ignore_index)?;
    let rows = targets.len();
    let li = label_index(name, t)?;
    let warp = len <= 1024;
    let vec = vec_ok(dtype, len, &[x.layout]);
    let f = dev.function(&CUDA, dtype, FWD_KERNELS[!warp as usize][!vec as usize][li])?;
    let none = op.opts.reduction == LossReduction::None;
    let mut lse = CudaStorage::alloc(dev, acc_dtype(dtype), rows)?;
    // Row losses in the accumulator type: the reduction sums them unrounded, as on the CPU.
    let mut per_row = CudaStorage::alloc(dev, acc_dtype(dtype), rows)?;
    if rows > 0 {
        let (xv, tv) = (Strided::of(name, x.layout)?, Strided::of(name, t.layout)?);
        let ignore = op.opts.ignore_index.unwrap_or(0);
        let has_ignore = op.opts.ignore_index.is_some() as i32;
        let (eps, rows64, len64) = (op.opts.label_smoothing, rows as i64, len as i64);
        let cfg = if warp {
            RowPlan::Warp { vec, it: 1 }.cfg(rows)
        } else {
            cuda::rows(rows, cuda::row_threads(len))
        };
        crate::cuda_launch!(
            dev,
            name,
            f,
            cfg,
            [
                xs.slice(),
                &xv,
                ts.slice(),
                &tv,
                &ignore,
                &has_ignore,
                &eps,
                lse.slice_mut(),
                per_row.slice_mut(),
                &rows64,
                &len64
            ]
        )?;
    }
    if none {
        if acc_dtype(dtype) == dtype {
            return Ok(smallvec![Box::new(per_row) as _, Box::new(lse) as _]);
        }
        // 16-bit data: the f32 row losses rounded to the output, as the CPU rounds them.
        let layout = Layout::contiguous(rows);
        let losses = KernelArg {
            storage: &per_row,
            layout: &layout,
        };
        let loss = crate::ops::cast::cuda_cast(&losses, dtype)?;
        return Ok(smallvec![loss, Box::new(lse) as _]);
    }
    let mut loss = CudaStorage::alloc(dev, dtype, 1)?;
    let div = if op.opts.reduction == LossReduction::Mean {
        count as f64
    } else {
        1.0
    };
    let f = dev.function(&CUDA, dtype, "ce_reduce")?;
    let rows64 = rows as i64;
    crate::cuda_launch!(
        dev,
        name,
        f,
        cuda::rows(1, 1024),
        [per_row.slice(), &rows64, &div, loss.slice_mut()]
    )?;
    Ok(smallvec![Box::new(loss) as _, Box::new(lse) as _])
}

fn cuda_backward(
    op: &CrossEntropyBackward,
    x: &KernelArg<'_>,
    t: &KernelArg<'_>,
    l: &KernelArg<'_>,
    g: &KernelArg<'_>,
) -> Result<Box<dyn DeviceStorage>> {
    let name = "cross_entropy_backward";
    let (xs, ts) = (cuda::storage(name, x)?, cuda::storage(name, t)?);
    let (ls, gs) = (cuda::storage(name, l)?, cuda::storage(name, g)?);
    let dev = xs.dev();
    let dtype = x.dtype();
    if g.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            op: name,
            expected: dtype,
            got: g.dtype(),
        });
    }
    let len = x.shape().dims().last().copied().unwrap_or(1);
    let targets = gpu_targets(name, t)?;
    let count = check_targets(name, &targets, len, op.opts.ignore_index)?;
    let rows = targets.len();
    let kernel = ["ce_bwd_i64", "ce_bwd_u32"][label_index(name, t)?];
    let f = dev.function(&CUDA, dtype, kernel)?;
    let mut out = CudaStorage::alloc(dev, dtype, rows * len)?;
    if rows == 0 {
        return Ok(Box::new(out));
    }
    let (xv, tv) = (Strided::of(name, x.layout)?, Strided::of(name, t.layout)?);
    let (lv, gv) = (Strided::of(name, l.layout)?, Strided::of(name, g.layout)?);
    let ignore = op.opts.ignore_index.unwrap_or(0);
    let has_ignore = op.opts.ignore_index.is_some() as i32;
    let red: i32 = match op.opts.reduction {
        LossReduction::None => 0,
        LossReduction::Sum => 1,
        LossReduction::Mean => 2,
    };
    let eps = op.opts.label_smoothing;
    let (count, off, one_minus_eps) = (count as f64, eps / len as f64, 1.0 - eps);
    let (rows64, len64) = (rows as i64, len as i64);
    let threads = len.next_power_of_two().clamp(32, 256) as u32;
    crate::cuda_launch!(
        dev,
        name,
        f,
        cuda::rows(rows, threads),
        [
            xs.slice(),
            &xv,
            ts.slice(),
            &tv,
            &ignore,
            &has_ignore,
            ls.slice(),
            &lv,
            gs.slice(),
            &gv,
            &red,
            &count,
            &off,
            &one_minus_eps,
            out.slice_mut(),
            &rows64,
            &len64
        ]
    )?;
    Ok(Box::new(out))
}

impl Op for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn idioms(&self) -> Idioms {
        Self::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let [logits, targets] = inputs else {
            return Err(Error::invalid(
                "cross_entropy",
                format!("expects 2 inputs (logits, targets), got {}", inputs.len()),
            ));
        };
        let (lead, _) = split_shape("cross_entropy", logits, targets, &self.opts)?;
        let loss_shape = if self.opts.reduction == LossReduction::None {
            lead.clone()
        } else {
            Shape::scalar()
        };
        Ok(smallvec![
            TensorSpec::new(loss_shape, logits.dtype()),
            TensorSpec::new(lead, acc_dtype(logits.dtype()))
        ])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        // max, subtract, exp, add (plus a sum for label smoothing).
        Cost::streaming(inputs, outputs, 5 * n)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = "cross_entropy";
        let (x, t) = (inputs[0], inputs[1]);
        if cuda::on_cuda(inputs) {
            return cuda_forward(self, &x, &t);
        }
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let targets = targets_i64(name, &t)?;
        let count = check_targets(name, &targets, c, self.opts.ignore_index)?;
        Ok(float_dispatch!(name, x.cpu(name)?, |v| ce_fwd(
            self, v, x.layout, &targets, count
        )?))
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0b11,
            outputs: 0b10,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        if !ctx.needs(0) {
            return Ok(smallvec![None, None]);
        }
        let g = execute1(
            CrossEntropyBackward { opts: self.opts },
            &[ctx.input(0)?, ctx.input(1)?, ctx.output(1)?, ctx.grad(0)?],
        )?;
        Ok(smallvec![Some(g), None])
    }
}

/// The fused backward of [`CrossEntropy`]. Inputs `(logits, targets, lse, grad of the loss)`;
/// output the logits' gradient `(softmax - (1-ε)·onehot - ε/C) · scale` per row, where the
/// scale is the loss gradient (divided by the count of non-ignored rows for the mean), and
/// zero on ignored rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyBackward {
    /// The forward's options.
    pub opts: CrossEntropyOpts,
}

/// The backward over rows: `(e^(x - lse) - ε/C - (1-ε)·[j = t]) · scale`, zero on ignored
/// rows.
struct CeGradRows<'r, 'a, T: FloatElement> {
    x: &'r Rows<'a, T>,
    targets: &'r [i64],
    lse: &'r [T::Acc],
    /// Per-row scale of the gradient.
    scale: &'r [T::Acc],
    ignore: Option<i64>,
    eps: f64,
}

impl<T: FloatElement> RowKernel for CeGradRows<'_, '_, T>
where
    T::Acc: VecExp,
{
    type Out = T;
    type State = ();
    fn out_len(&self) -> usize {
        self.x.len
    }
    fn work_len(&self) -> usize {
        self.x.len
    }
    fn state(&self) {}
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], _: &mut ()) {
        let t = self.targets[r];
        if Some(t) == self.ignore {
            for o in out.iter_mut() {
                o.write(T::zero());
            }
            return;
        }
        let x = self.x.row(r);
        let (lse, scale) = (self.lse[r], self.scale[r]);
        let off = <T::Acc as AccFloat>::of(self.eps / x.len() as f64);
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(T::from_acc(((v.to_acc() - lse).vexp() - off) * scale));
        }
        // Targets were checked before the kernel runs: 0 <= t < C.
        let ti = t as usize;
        let p = (x[ti].to_acc() - lse).vexp() - off - <T::Acc as AccFloat>::of(1.0 - self.eps);
        out[ti].write(T::from_acc(p * scale));
    }
}

#[allow(clippy::too_many_arguments)]
fn ce_bwd<T: FloatElement + CpuElement>(
    op: &CrossEntropyBackward,
    x: &[T],
    xl: &Layout,
    targets: &[i64],
    lse: &[T::Acc],
    g: &[f64],
    count: usize,
) -> Result<Vec<T>>
where
    T::Acc: VecExp,
{
    let x = Rows::last(x, xl)?;
    let scale: Vec<T::Acc> = (0..targets.len())
        .map(|r| {
            <T::Acc as AccFloat>::of(match op.opts.reduction {
                LossReduction::None => g[r],
                LossReduction::Sum => g[0],
                LossReduction::Mean => g[0] / count as f64,
            })
        })
        .collect();
    let k = CeGradRows {
        x: &x,
        targets,
        lse,
        scale: &scale,
        ignore: op.opts.ignore_index,
        eps: op.opts.label_smoothing,
    };
    Ok(run_rows(&k, targets.len()).0)
}

impl Op for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy_backward"
    }
    fn idioms(&self) -> Idioms {
        CrossEntropy::BACKWARD_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = "cross_entropy_backward";
        let [logits, targets, lse, g] = inputs else {
            return Err(Error::invalid(
                name,
                format!(
                    "expects 4 inputs (logits, targets, lse, grad), got {}",
                    inputs.len()
                ),
            ));
        };
        let (lead, _) = split_shape(name, logits, targets, &self.opts)?;
        if lse.shape() != &lead || lse.dtype() != acc_dtype(logits.dtype()) {
            return Err(Error::invalid(
                name,
                format!(
                    "lse must be {} of shape {lead}, got {} of shape {}",
                    acc_dtype(logits.dtype()),
                    lse.dtype(),
                    lse.shape()
                ),
            ));
        }
        let g_shape = if self.opts.reduction == LossReduction::None {
            lead
        } else {
            Shape::scalar()
        };
        if g.shape() != &g_shape {
            return Err(Error::shape_mismatch(name, g.shape(), &g_shape));
        }
        if !g.dtype().is_float() {
            return Err(Error::unsupported_dtype(name, g.dtype()));
        }
        Ok(smallvec![TensorSpec::new(
            logits.shape().clone(),
            logits.dtype()
        )])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        // subtract, exp, subtract, scale.
        Cost::streaming(inputs, outputs, 4 * n)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = "cross_entropy_backward";
        let (x, t, l, g) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_backward(self, &x, &t, &l, &g)?]);
        }
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let targets = targets_i64(name, &t)?;
        let count = check_targets(name, &targets, c, self.opts.ignore_index)?;
        let gv: Vec<f64> = float_dispatch!(name, g.cpu(name)?, |v| g
            .layout
            .indices()
            .map(|i| dynn_core::Element::to_f64(v[i]))
            .collect());
        let ls = l.cpu(name)?;
        Ok(smallvec![float_dispatch!(name, x.cpu(name)?, |v| boxed(
            bwd_typed(self, v, x.layout, &targets, ls, l.layout, &gv, count)?
        ))])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

#[allow(clippy::too_many_arguments)]
fn bwd_typed<T: FloatElement + CpuElement>(
    op: &CrossEntropyBackward,
    x: &[T],
    xl: &Layout,
    targets: &[i64],
    ls: &CpuStorage,
    ll: &Layout,
    g: &[f64],
    count: usize,
) -> Result<Vec<T>>
where
    T::Acc: VecExp + CpuElement,
{
    let lse = gather_layout(ls.as_slice::<T::Acc>("cross_entropy_backward")?, ll);
    ce_bwd(op, x, xl, targets, &lse, g, count)
}

/// Cross-entropy on logits.
pub trait CrossEntropyOps {
    /// Cross-entropy between `self`, logits of shape `(..., C)` (leading dims flattened into
    /// rows), and `targets`, class indices (i64 or u32) of the leading shape. With the default
    /// options this is the mean over rows of `logsumexp(x) - x[target]`. A target outside
    /// `0..C` (other than `ignore_index`) is an [`Error::IndexOutOfRange`] naming the row.
    fn cross_entropy(&self, targets: &Tensor, opts: CrossEntropyOpts) -> Result<Tensor>;
}

impl CrossEntropyOps for Tensor {
    fn cross_entropy(&self, targets: &Tensor, opts: CrossEntropyOpts) -> Result<Tensor> {
        execute(CrossEntropy { opts }, &[self, targets])?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Msg("cross_entropy produced no output".into()))
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![
        OpInfo {
            name: "cross_entropy",
            idioms: CrossEntropy::IDIOMS,
            differentiable: true,
            family: "cross_entropy",
        },
        OpInfo {
            name: "cross_entropy_backward",
            idioms: CrossEntropy::BACKWARD_IDIOMS,
            differentiable: false,
            family: "cross_entropy",
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetching_the_next_row_leaves_every_row_as_it_was() {
        // Rows of 1,300 (two full blocks and a short one), the last one ignored.
        let (rows, len) = (5, 1300);
        let x: Vec<f32> = (0..rows * len)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0)
            .collect();
        let layout = Layout::contiguous(Shape::from((rows, len)));
        let x = Rows::last(&x, &layout).unwrap();
        let targets = [3, 1299, 0, 640, 7];
        let run = |prefetch| {
            let k = CeRows {
                x: &x,
                targets: &targets,
                ignore: Some(7),
                eps: 0.1,
                prefetch,
            };
            run_rows(&k, rows).0
        };
        let (with, without) = (run(true), run(false));
        assert_eq!(with, without);
        assert!(
            with[..4]
                .iter()
                .all(|&(lse, loss)| lse.is_finite() && loss > 0.0)
        );
        assert_eq!(with[4], (0.0, 0.0));
    }
}
