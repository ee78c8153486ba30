//! Reductions over dims with `keepdim`: sum (any set of dims), max and min (one dim at a
//! time; several dims reduce in turn), argmax, and the composites mean, var and `sum_to`.
//! Summation order depends only on the shape, never on thread timing.

use crate::cpu::{PAR_MIN, SimdTask, gather_layout, simd_task};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::binary::BinaryOps;
use crate::ops::cast::CastOps;
use crate::ops::softmax::acc_dtype;
use crate::ops::unary::UnaryOps;
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use cudarc::driver::LaunchConfig;
use dynn_core::{
    AccFloat, BackwardCtx, CpuElement, DType, DeviceStorage, Dim, Error, FloatElement, Idioms,
    InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec,
    execute1, smallvec::SmallVec, smallvec::smallvec, vec_from_fill,
};
use rayon::prelude::*;

/// Which reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceKind {
    /// Σ
    Sum,
    /// max
    Max,
    /// min
    Min,
}

/// A reduction over `dims` (sorted, unique).
#[derive(Debug, Clone)]
pub struct Reduce {
    /// Which reduction.
    pub kind: ReduceKind,
    /// The reduced dims.
    pub dims: SmallVec<[usize; 4]>,
    /// Keep reduced dims as size 1.
    pub keepdim: bool,
}

fn out_shape(shape: &Shape, dims: &[usize], keepdim: bool) -> Shape {
    let d: Vec<usize> = shape
        .dims()
        .iter()
        .enumerate()
        .filter_map(|(i, &s)| {
            if dims.contains(&i) {
                keepdim.then_some(1)
            } else {
                Some(s)
            }
        })
        .collect();
    Shape::from(d)
}

/// The input as a contiguous `(outer, red, inner)` block: copies (permuting reduced dims last)
/// unless the input is contiguous and the reduced dims are one run.
fn as_blocks<'a, T: Copy + Send + Sync>(
    src: &'a [T],
    layout: &Layout,
    dims: &[usize],
) -> Result<(std::borrow::Cow<'a, [T]>, usize, usize, usize)> {
    let d = layout.dims();
    let run = dims.windows(2).all(|w| w[1] == w[0] + 1);
    let (first, last) = (
        dims.first().copied().unwrap_or(0),
        dims.last().map_or(0, |l| l + 1),
    );
    if run && let Some((a, b)) = layout.contiguous_range() {
        let outer = d[..first].iter().product();
        let red = d[first..last].iter().product();
        let inner = d[last..].iter().product();
        return Ok((std::borrow::Cow::Borrowed(&src[a..b]), outer, red, inner));
    }
    if run {
        let outer = d[..first].iter().product();
        let red = d[first..last].iter().product();
        let inner = d[last..].iter().product();
        return Ok((
            std::borrow::Cow::Owned(gather_layout(src, layout)),
            outer,
            red,
            inner,
        ));
    }
    let kept: Vec<usize> = (0..d.len()).filter(|i| !dims.contains(i)).collect();
    let perm: Vec<usize> = kept.iter().chain(dims.iter()).copied().collect();
    let p = layout.permute(&perm)?;
    let outer = kept.iter().map(|&i| d[i]).product();
    let red = dims.iter().map(|&i| d[i]).product();
    Ok((
        std::borrow::Cow::Owned(gather_layout(src, &p)),
        outer,
        red,
        1,
    ))
}

#[inline(always)]
fn combine<A: AccFloat>(kind: ReduceKind, a: A, b: A) -> A {
    match kind {
        ReduceKind::Sum => a + b,
        ReduceKind::Max => {
            if b > a || b.is_nan() {
                b
            } else {
                a
            }
        }
        ReduceKind::Min => {
            if b < a || b.is_nan() {
                b
            } else {
                a
            }
        }
    }
}

fn init<A: AccFloat>(kind: ReduceKind) -> A {
    match kind {
        ReduceKind::Sum => A::ZERO,
        ReduceKind::Max => A::NEG_INFINITY,
        ReduceKind::Min => A::INFINITY,
    }
}

/// Reduces a contiguous row with 16 independent lanes (vectorizes; fixed order).
#[inline(always)]
pub(crate) fn reduce_row<T: FloatElement>(kind: ReduceKind, row: &[T]) -> T::Acc {
    // One loop per kind, the kind a constant in each: a loop that matched on it per element
    // stayed scalar for the 16-bit types.
    match kind {
        ReduceKind::Sum => reduce_row_as::<T>(ReduceKind::Sum, row),
        ReduceKind::Max => reduce_row_as::<T>(ReduceKind::Max, row),
        ReduceKind::Min => reduce_row_as::<T>(ReduceKind::Min, row),
    }
}

#[inline(always)]
fn reduce_row_as<T: FloatElement>(kind: ReduceKind, row: &[T]) -> T::Acc {
    let mut acc = [init::<T::Acc>(kind); 16];
    let chunks = row.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for k in 0..16 {
            acc[k] = combine(kind, acc[k], c[k].to_acc());
        }
    }
    let mut w = 8;
    while w > 0 {
        for k in 0..w {
            acc[k] = combine(kind, acc[k], acc[k + w]);
        }
        w /= 2;
    }
    rem.iter()
        .fold(acc[0], |a, &x| combine(kind, a, x.to_acc()))
}

/// Each row of `red` elements of `x` reduced into one element of `out`, as a [`SimdTask`].
struct Rows<'a, T> {
    kind: ReduceKind,
    out: &'a mut [std::mem::MaybeUninit<T>],
    x: &'a [T],
    red: usize,
}

impl<T: FloatElement> SimdTask for Rows<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        for (o, row) in self.out.iter_mut().zip(self.x.chunks(self.red)) {
            o.write(T::from_acc(reduce_row(self.kind, row)));
        }
    }
}

/// `red` rows of a block (`inner` apart), columns `c0..c0 + acc.len()`, folded into `acc`
/// row after row, as a [`SimdTask`].
struct Columns<'a, T: FloatElement> {
    kind: ReduceKind,
    acc: &'a mut [T::Acc],
    block: &'a [T],
    red: usize,
    inner: usize,
    c0: usize,
}

impl<T: FloatElement> SimdTask for Columns<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let n = self.acc.len();
        for r in 0..self.red {
            let from = r * self.inner + self.c0;
            for (a, &v) in self.acc.iter_mut().zip(&self.block[from..from + n]) {
                *a = combine(self.kind, *a, v.to_acc());
            }
        }
    }
}

fn reduce_blocks<T: FloatElement + CpuElement>(
    kind: ReduceKind,
    x: &[T],
    outer: usize,
    red: usize,
    inner: usize,
) -> Vec<T> {
    let n_out = outer * inner;
    if red == 0 || n_out == 0 {
        // An empty reduced dim gives the identity; an empty output has nothing to compute
        // (and `chunks(0)` below would panic).
        return vec![T::from_acc(init(kind)); n_out];
    }
    if inner == 1 {
        return vec_from_fill(n_out, |out| {
            if outer * red < PAR_MIN {
                simd_task(Rows { kind, out, x, red });
            } else {
                let rows = (PAR_MIN / red).max(1);
                out.par_chunks_mut(rows)
                    .zip(x.par_chunks(rows * red))
                    .for_each(|(out, x)| simd_task(Rows { kind, out, x, red }));
            }
        });
    }
    // Column-style: accumulate whole rows of `inner` elements.
    let mut out = vec![init::<T::Acc>(kind); n_out];
    let columns = |acc: &mut [T::Acc], block: &[T], c0: usize| {
        simd_task(Columns {
            kind,
            acc,
            block,
            red,
            inner,
            c0,
        })
    };
    if outer * red * inner < PAR_MIN {
        out.chunks_mut(inner)
            .zip(x.chunks(red * inner))
            .for_each(|(acc, block)| columns(acc, block, 0));
    } else if outer >= rayon::current_num_threads() * 2 {
        out.par_chunks_mut(inner)
            .zip(x.par_chunks(red * inner))
            .for_each(|(acc, block)| columns(acc, block, 0));
    } else {
        // Few outer blocks: split each block's columns across threads instead.
        let cols = 256.min(inner);
        for (o, block) in out.chunks_mut(inner).zip(x.chunks(red * inner)) {
            o.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(ci, acc)| columns(acc, block, ci * cols));
        }
    }
    out.into_iter().map(T::from_acc).collect()
}

// ----- CUDA -----

/// Reductions on the GPU. The input is seen as `(outer, red, inner)` blocks through its layout
/// (reduced dims permuted last when they are not one run, as on the CPU), never copied. With
/// `inner == 1` a warp (short rows) or a block (long rows) reduces each row; otherwise blocks
/// of 32 columns × 8 row-slices reduce columns, coalesced. Long reductions over few outputs
/// are split into fixed chunks (a function of the shape only) whose partials a second launch
/// reduces: every order is fixed, so results are deterministic. NaN propagates through max and
/// min as on the CPU; argmax takes the first NaN, else the first maximum.
pub const CUDA: CudaSource = CudaSource {
    name: "reduce",
    code: r#"
#define RED_INF ((acc)__longlong_as_double(0x7ff0000000000000LL))

__device__ __forceinline__ acc red_init(int kind) {
    if (kind == 0) return (acc)0;
    return kind == 1 ? -RED_INF : RED_INF;
}

// 0 sum, 1 max, 2 min (b replaces a when it is more extreme or NaN).
__device__ __forceinline__ acc red_combine(int kind, acc a, acc b) {
    if (kind == 0) return a + b;
    if (kind == 1) return (b > a || isnan(b)) ? b : a;
    return (b < a || isnan(b)) ? b : a;
}

__device__ __forceinline__ acc red_warp(int kind, acc a) {
    for (int o = 16; o > 0; o >>= 1) a = red_combine(kind, a, __shfl_xor_sync(0xffffffffu, a, o));
    return a;
}

// Group g = (row, chunk) of `chunks` per row reduces elements [chunk·chunk_len, …) of its row
// into out[g]. BLOCK: one block per group; else one warp per group, 8 per block. `In` and `Out`
// are `scalar` or `acc` (a 16-bit reduction's partials stay in f32 between passes).
template <bool BLOCK, typename In, typename Out>
__device__ __forceinline__ void reduce_rows_t(int kind, const In* x, Strided xs, Out* out,
                                              i64 groups, i64 red, i64 chunks, i64 chunk_len) {
    const i64 g = BLOCK ? (i64)blockIdx.x : (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (g >= groups) return;
    const i64 row = g / chunks, c = g - row * chunks;
    const i64 j0 = c * chunk_len, j1 = min(red, j0 + chunk_len);
    const int lane = BLOCK ? threadIdx.x : (threadIdx.x & 31);
    const int step = BLOCK ? blockDim.x : 32;
    const i64 base = row * red;
    acc a = red_init(kind);
    if (xs.contiguous) {
        const In* p = x + xs.offset + base;
        for (i64 j = j0 + lane; j < j1; j += step) a = red_combine(kind, a, ld(p[j]));
    } else {
        for (i64 j = j0 + lane; j < j1; j += step)
            a = red_combine(kind, a, ld(x[at(xs, base + j)]));
    }
    a = red_warp(kind, a);
    if (BLOCK) {
        __shared__ acc sh[32];
        const int w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
        if ((threadIdx.x & 31) == 0) sh[w] = a;
        __syncthreads();
        if (w == 0) {
            a = (threadIdx.x & 31) < nw ? sh[threadIdx.x & 31] : red_init(kind);
            a = red_warp(kind, a);
        }
    }
    if (lane == 0) out[g] = to_elem(a, (Out*)0);
}

// Block (32, 8): columns (blockIdx.x % ncb)·32 + tx of outer block blockIdx.x / ncb, rows of
// chunk blockIdx.y stepped by 8 per ty, then the 8 partials in ty order; out is
// (outer, chunks, inner).
template <typename In, typename Out>
__device__ __forceinline__ void reduce_cols_t(int kind, const In* x, Strided xs, Out* out,
                                              i64 outer, i64 red, i64 inner, i64 chunks,
                                              i64 chunk_len) {
    __shared__ acc sh[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 ncb = (inner + 31) / 32;
    const i64 o = blockIdx.x / ncb, i = (blockIdx.x - o * ncb) * 32 + tx, c = blockIdx.y;
    const i64 r0 = c * chunk_len, r1 = min(red, r0 + chunk_len);
    acc a = red_init(kind);
    if (i < inner) {
        for (i64 r = r0 + ty; r < r1; r += 8)
            a = red_combine(kind, a, ld(x[at(xs, (o * red + r) * inner + i)]));
    }
    sh[ty][tx] = a;
    __syncthreads();
    if (ty == 0 && i < inner) {
#pragma unroll
        for (int q = 1; q < 8; ++q) a = red_combine(kind, a, sh[q][tx]);
        out[(o * chunks + c) * inner + i] = to_elem(a, (Out*)0);
    }
}

// Entry points: `reduce_{rows_warp,rows_block,cols}` read and write `scalar`; with 16-bit
// data, the `_part` (scalar in, f32 partials out), `_mid` (f32 to f32) and `_fin` (f32 to
// scalar) variants carry a split reduction's partials in f32.
#define REDUCE_ENTRIES(SUF, In, Out) \
extern "C" __global__ void reduce_rows_warp##SUF(int kind, const In* x, Strided xs, Out* out, \
                                                 i64 groups, i64 red, i64 chunks, \
                                                 i64 chunk_len) { \
    reduce_rows_t<false, In, Out>(kind, x, xs, out, groups, red, chunks, chunk_len); \
} \
extern "C" __global__ void reduce_rows_block##SUF(int kind, const In* x, Strided xs, Out* out, \
                                                  i64 groups, i64 red, i64 chunks, \
                                                  i64 chunk_len) { \
    reduce_rows_t<true, In, Out>(kind, x, xs, out, groups, red, chunks, chunk_len); \
} \
extern "C" __global__ void reduce_cols##SUF(int kind, const In* x, Strided xs, Out* out, \
                                            i64 outer, i64 red, i64 inner, i64 chunks, \
                                            i64 chunk_len) { \
    reduce_cols_t<In, Out>(kind, x, xs, out, outer, red, inner, chunks, chunk_len); \
}
REDUCE_ENTRIES(, scalar, scalar)
#ifdef DYNN_HALF
REDUCE_ENTRIES(_part, scalar, acc)
REDUCE_ENTRIES(_mid, acc, acc)
REDUCE_ENTRIES(_fin, acc, scalar)
#endif

// ---- max/min backward: the gradient split evenly between the elements equal to y ----

// inner == 1: one warp per row, 8 per block.
extern "C" __global__ void extremum_bwd_rows(const scalar* x, Strided xs, const scalar* y,
                                             Strided ys, const scalar* g, Strided gs,
                                             scalar* out, i64 rows, i64 red) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const i64 base = row * red;
    const acc yy = ld(y[at(ys, row)]);
    i64 n = 0;
    for (i64 j = lane; j < red; j += 32) n += ld(x[at(xs, base + j)]) == yy;
    n = warp_sum(n);
    const scalar share = st(ld(g[at(gs, row)]) / (acc)(n > 0 ? n : 1)), zero = st((acc)0);
    for (i64 j = lane; j < red; j += 32)
        out[base + j] = ld(x[at(xs, base + j)]) == yy ? share : zero;
}

// inner > 1: one thread per (outer, inner) column.
extern "C" __global__ void extremum_bwd_cols(const scalar* x, Strided xs, const scalar* y,
                                             Strided ys, const scalar* g, Strided gs,
                                             scalar* out, i64 outer, i64 red, i64 inner) {
    GRID_LOOP(t, outer * inner) {
        const i64 o = t / inner, i = t - o * inner, base = o * red * inner + i;
        const acc yy = ld(y[at(ys, t)]);
        i64 n = 0;
        for (i64 r = 0; r < red; ++r) n += ld(x[at(xs, base + r * inner)]) == yy;
        const scalar share = st(ld(g[at(gs, t)]) / (acc)(n > 0 ? n : 1)), zero = st((acc)0);
        for (i64 r = 0; r < red; ++r) {
            const i64 l = base + r * inner;
            out[l] = ld(x[at(xs, l)]) == yy ? share : zero;
        }
    }
}

// ---- argmax: the first NaN, else the first maximum (a total order: any tree gives it) ----

__device__ __forceinline__ bool am_better(acc bv, i64 bi, acc av, i64 ai) {
    const bool an = isnan(av), bn = isnan(bv);
    if (an || bn) return (an && bn) ? bi < ai : bn;
    if (bv != av) return bv > av;
    return bi < ai;
}

// inner == 1: one warp per row (8 per block), or one block per row (BLOCK).
template <bool BLOCK>
__device__ __forceinline__ void argmax_rows_t(const scalar* x, Strided xs, i64* out, i64 rows,
                                              i64 red) {
    const i64 row = BLOCK ? (i64)blockIdx.x : (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = BLOCK ? threadIdx.x : (threadIdx.x & 31);
    const int step = BLOCK ? blockDim.x : 32;
    const i64 base = row * red;
    acc bv = -RED_INF;
    i64 bi = 0x7fffffffffffffffLL;
    for (i64 j = lane; j < red; j += step) {
        const acc v = ld(x[at(xs, base + j)]);
        if (am_better(v, j, bv, bi)) {
            bv = v;
            bi = j;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const acc ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const i64 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (am_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (BLOCK) {
        __shared__ acc sv[32];
        __shared__ i64 si[32];
        const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
        if (l == 0) {
            sv[w] = bv;
            si[w] = bi;
        }
        __syncthreads();
        if (w == 0) {
            bv = l < nw ? sv[l] : -RED_INF;
            bi = l < nw ? si[l] : 0x7fffffffffffffffLL;
            for (int o = 16; o > 0; o >>= 1) {
                const acc ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const i64 oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (am_better(ov, oi, bv, bi)) {
                    bv = ov;
                    bi = oi;
                }
            }
        }
    }
    if (lane == 0) out[row] = bi < red ? bi : 0;
}

extern "C" __global__ void argmax_rows_warp(const scalar* x, Strided xs, i64* out, i64 rows, i64 red) {
    argmax_rows_t<false>(x, xs, out, rows, red);
}
extern "C" __global__ void argmax_rows_block(const scalar* x, Strided xs, i64* out, i64 rows, i64 red) {
    argmax_rows_t<true>(x, xs, out, rows, red);
}

// inner > 1: one thread per (outer, inner) column, in order.
extern "C" __global__ void argmax_cols(const scalar* x, Strided xs, i64* out, i64 outer, i64 red,
                                       i64 inner) {
    GRID_LOOP(t, outer * inner) {
        const i64 o = t / inner, i = t - o * inner, base = o * red * inner + i;
        acc bv = -RED_INF;
        i64 bi = 0;
        for (i64 r = 0; r < red; ++r) {
            const acc v = ld(x[at(xs, base + r * inner)]);
            if (r == 0 || am_better(v, r, bv, bi)) {
                bv = v;
                bi = r;
            }
        }
        out[t] = bi;
    }
}
"#,
    half: true,
};

/// Warps per block of the warp-per-row kernels.
const ROW_WARPS: usize = 8;

/// Threads per block of the block-per-row kernels.
const ROW_BLOCK: u32 = 256;

/// Rows up to this long get a warp each.
const WARP_ROW: usize = 1024;

/// The input as `(outer, red, inner)` blocks over its own buffer: the view (the layout, with
/// the reduced dims permuted last when they are not one run) and the three sizes, as
/// [`as_blocks`] sees them.
fn block_view(
    op: &'static str,
    layout: &Layout,
    dims: &[usize],
) -> Result<(Strided, usize, usize, usize)> {
    let d = layout.dims();
    if dims.windows(2).all(|w| w[1] == w[0] + 1) {
        let (first, last) = (
            dims.first().copied().unwrap_or(0),
            dims.last().map_or(0, |l| l + 1),
        );
        let outer = d[..first].iter().product();
        let red = d[first..last].iter().product();
        let inner = d[last..].iter().product();
        return Ok((Strided::of(op, layout)?, outer, red, inner));
    }
    let kept: Vec<usize> = (0..d.len()).filter(|i| !dims.contains(i)).collect();
    let perm: Vec<usize> = kept.iter().chain(dims.iter()).copied().collect();
    let p = layout.permute(&perm)?;
    let outer = kept.iter().map(|&i| d[i]).product();
    let red = dims.iter().map(|&i| d[i]).product();
    Ok((Strided::of(op, &p)?, outer, red, 1))
}

fn grid_x(op: &'static str, blocks: usize) -> Result<u32> {
    u32::try_from(blocks.max(1))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::invalid(op, format!("too many CUDA blocks ({blocks})")))
}

/// Of a kernel's four entry points (`names`: data to result, data to partials, partials to
/// partials, partials to result), the one for reading partials (`from_partials`) or the data
/// and writing partials (`to_partials`) or the result. Only 16-bit data keeps its partials in
/// another type (f32); the others use the first entry point throughout.
fn partial_kernel(
    dtype: DType,
    names: [&'static str; 4],
    from_partials: bool,
    to_partials: bool,
) -> &'static str {
    if acc_dtype(dtype) == dtype {
        return names[0];
    }
    match (from_partials, to_partials) {
        (false, false) => names[0],
        (false, true) => names[1],
        (true, true) => names[2],
        (true, false) => names[3],
    }
}

/// Reduces `(outer, red, inner)` blocks of `src` seen through `view` into a new contiguous
/// `(outer, inner)` buffer of `dtype` (the data's); splits long reductions into chunks and
/// reduces the partials again. `src` holds partials when `from_partials`.
#[allow(clippy::too_many_arguments)]
fn cuda_reduce_blocks(
    op: &'static str,
    dev: &std::sync::Arc<cuda::CudaDevice>,
    dtype: DType,
    kind: i32,
    src: &CudaStorage,
    view: &Strided,
    (outer, red, inner): (usize, usize, usize),
    from_partials: bool,
) -> Result<CudaStorage> {
    let n_out = outer * inner;
    if n_out == 0 {
        return CudaStorage::alloc(dev, dtype, 0);
    }
    if inner == 1 {
        let rows = outer;
        let (chunks, block) = if red <= WARP_ROW {
            (1, false)
        } else if rows >= 256 {
            (1, true)
        } else {
            (red.div_ceil(8192).min(512usize.div_ceil(rows)).max(1), true)
        };
        let chunk_len = red.div_ceil(chunks).max(1);
        let groups = rows * chunks;
        let names = if block {
            [
                "reduce_rows_block",
                "reduce_rows_block_part",
                "reduce_rows_block_mid",
                "reduce_rows_block_fin",
            ]
        } else {
            [
                "reduce_rows_warp",
                "reduce_rows_warp_part",
                "reduce_rows_warp_mid",
                "reduce_rows_warp_fin",
            ]
        };
        let cfg = if block {
            cuda::rows(groups, ROW_BLOCK)
        } else {
            LaunchConfig {
                grid_dim: (grid_x(op, groups.div_ceil(ROW_WARPS))?, 1, 1),
                block_dim: (32 * ROW_WARPS as u32, 1, 1),
                shared_mem_bytes: 0,
            }
        };
        let name = partial_kernel(dtype, names, from_partials, chunks > 1);
        let f = dev.function(&CUDA, dtype, name)?;
        let mut dst = if chunks > 1 {
            CudaStorage::alloc(dev, acc_dtype(dtype), groups)?
        } else {
            CudaStorage::alloc(dev, dtype, n_out)?
        };
        let (g64, red64, c64, cl64) = (groups as i64, red as i64, chunks as i64, chunk_len as i64);
        crate::cuda_launch!(
            dev,
            op,
            f,
            cfg,
            [
                &kind,
                src.slice(),
                view,
                dst.slice_mut(),
                &g64,
                &red64,
                &c64,
                &cl64
            ]
        )?;
        if chunks == 1 {
            return Ok(dst);
        }
        let pv = Strided::of(op, &Layout::contiguous([rows, chunks]))?;
        return cuda_reduce_blocks(op, dev, dtype, kind, &dst, &pv, (rows, chunks, 1), true);
    }
    let ncb = inner.div_ceil(32);
    let blocks = outer * ncb;
    let chunks = if blocks >= 256 || red <= 256 {
        1
    } else {
        red.div_ceil(256).min(512usize.div_ceil(blocks)).max(1)
    };
    let chunk_len = red.div_ceil(chunks).max(1);
    let names = [
        "reduce_cols",
        "reduce_cols_part",
        "reduce_cols_mid",
        "reduce_cols_fin",
    ];
    let f = dev.function(
        &CUDA,
        dtype,
        partial_kernel(dtype, names, from_partials, chunks > 1),
    )?;
    let cfg = LaunchConfig {
        grid_dim: (grid_x(op, blocks)?, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let mut out = if chunks > 1 {
        CudaStorage::alloc(dev, acc_dtype(dtype), outer * chunks * inner)?
    } else {
        CudaStorage::alloc(dev, dtype, n_out)?
    };
    let (o64, red64, in64, c64, cl64) = (
        outer as i64,
        red as i64,
        inner as i64,
        chunks as i64,
        chunk_len as i64,
    );
    crate::cuda_launch!(
        dev,
        op,
        f,
        cfg,
        [
            &kind,
            src.slice(),
            view,
            out.slice_mut(),
            &o64,
            &red64,
            &in64,
            &c64,
            &cl64
        ]
    )?;
    if chunks == 1 {
        return Ok(out);
    }
    let pv = Strided::of(op, &Layout::contiguous([outer, chunks, inner]))?;
    cuda_reduce_blocks(
        op,
        dev,
        dtype,
        kind,
        &out,
        &pv,
        (outer, chunks, inner),
        true,
    )
}

fn cuda_reduce(op: &Reduce, x: &KernelArg<'_>) -> Result<Box<dyn DeviceStorage>> {
    let name = op.name();
    let xs = cuda::storage(name, x)?;
    let (view, outer, red, inner) = block_view(name, x.layout, &op.dims)?;
    let kind = match op.kind {
        ReduceKind::Sum => 0,
        ReduceKind::Max => 1,
        ReduceKind::Min => 2,
    };
    let out = cuda_reduce_blocks(
        name,
        xs.dev(),
        x.dtype(),
        kind,
        xs,
        &view,
        (outer, red, inner),
        false,
    )?;
    Ok(Box::new(out))
}

fn cuda_extremum_backward(
    op: &ExtremumBackward,
    x: &KernelArg<'_>,
    y: &KernelArg<'_>,
    g: &KernelArg<'_>,
) -> Result<Box<dyn DeviceStorage>> {
    let name = op.name();
    let (xs, ys, gs) = (
        cuda::storage(name, x)?,
        cuda::storage(name, y)?,
        cuda::storage(name, g)?,
    );
    let dev = xs.dev();
    let dtype = x.dtype();
    let (xv, outer, red, inner) = block_view(name, x.layout, &[op.dim])?;
    let (yv, gv) = (Strided::of(name, y.layout)?, Strided::of(name, g.layout)?);
    let n = outer * red * inner;
    let mut out = CudaStorage::alloc(dev, dtype, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let (o64, red64, in64) = (outer as i64, red as i64, inner as i64);
    if inner == 1 {
        let f = dev.function(&CUDA, dtype, "extremum_bwd_rows")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_x(name, outer.div_ceil(ROW_WARPS))?, 1, 1),
            block_dim: (32 * ROW_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        crate::cuda_launch!(
            dev,
            name,
            f,
            cfg,
            [
                xs.slice(),
                &xv,
                ys.slice(),
                &yv,
                gs.slice(),
                &gv,
                out.slice_mut(),
                &o64,
                &red64
            ]
        )?;
    } else {
        let f = dev.function(&CUDA, dtype, "extremum_bwd_cols")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            cuda::grid(outer * inner),
            [
                xs.slice(),
                &xv,
                ys.slice(),
                &yv,
                gs.slice(),
                &gv,
                out.slice_mut(),
                &o64,
                &red64,
                &in64
            ]
        )?;
    }
    Ok(Box::new(out))
}

fn cuda_argmax(op: &Argmax, x: &KernelArg<'_>) -> Result<Box<dyn DeviceStorage>> {
    let name = "argmax";
    let xs = cuda::storage(name, x)?;
    let dev = xs.dev();
    let dtype = x.dtype();
    let (xv, outer, red, inner) = block_view(name, x.layout, &[op.dim])?;
    let n_out = outer * inner;
    if n_out == 0 || red == 0 {
        // No elements to compare: index 0 everywhere, as on the CPU.
        cuda::family_scalar(&CUDA, name, dtype)?;
        return Ok(Box::new(CudaStorage::zeros(dev, DType::I64, n_out)?));
    }
    let mut out = CudaStorage::alloc(dev, DType::I64, n_out)?;
    let (o64, red64, in64) = (outer as i64, red as i64, inner as i64);
    if inner == 1 {
        let (kernel, cfg) = if red <= 4 * WARP_ROW || outer >= 1024 {
            (
                "argmax_rows_warp",
                LaunchConfig {
                    grid_dim: (grid_x(name, outer.div_ceil(ROW_WARPS))?, 1, 1),
                    block_dim: (32 * ROW_WARPS as u32, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        } else {
            ("argmax_rows_block", cuda::rows(outer, ROW_BLOCK))
        };
        let f = dev.function(&CUDA, dtype, kernel)?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            cfg,
            [xs.slice(), &xv, out.slice_mut(), &o64, &red64]
        )?;
    } else {
        let f = dev.function(&CUDA, dtype, "argmax_cols")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            cuda::grid(n_out),
            [xs.slice(), &xv, out.slice_mut(), &o64, &red64, &in64]
        )?;
    }
    Ok(Box::new(out))
}

impl Op for Reduce {
    fn name(&self) -> &'static str {
        match self.kind {
            ReduceKind::Sum => "sum",
            ReduceKind::Max => "max",
            ReduceKind::Min => "min",
        }
    }
    fn idioms(&self) -> Idioms {
        Idioms::REDUCE
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        if !x.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name(), x.dtype()));
        }
        if self.kind != ReduceKind::Sum && self.dims.len() != 1 {
            return Err(Error::invalid(
                self.name(),
                "max/min kernels reduce exactly one dim",
            ));
        }
        Ok(smallvec![TensorSpec::new(
            out_shape(x.shape(), &self.dims, self.keepdim),
            x.dtype()
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_reduce(self, &x)?]);
        }
        let name = self.name();
        let kind = self.kind;
        let out = crate::float_dispatch!(name, x.cpu(name)?, |v| {
            let (data, outer, red, inner) = as_blocks(v, x.layout, &self.dims)?;
            Box::new(CpuElement::wrap(reduce_blocks(
                kind, &data, outer, red, inner,
            ))) as Box<dyn dynn_core::DeviceStorage>
        });
        Ok(smallvec![out])
    }
    fn save(&self) -> Save {
        match self.kind {
            ReduceKind::Sum => Save::NONE,
            _ => Save {
                inputs: 1,
                outputs: 1,
            },
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let in_shape = &ctx.input_specs[0].shape;
        let keep = out_shape(in_shape, &self.dims, true);
        let g = ctx.grad(0)?.reshape(keep.clone())?;
        match self.kind {
            ReduceKind::Sum => Ok(smallvec![Some(g.broadcast_as(in_shape.clone())?)]),
            _ => {
                let y = ctx.output(0)?.reshape(keep)?;
                let gx = execute1(
                    ExtremumBackward {
                        dim: self.dims[0],
                        kind: self.kind,
                    },
                    &[ctx.input(0)?, &y, &g],
                )?;
                Ok(smallvec![Some(gx)])
            }
        }
    }
}

/// Backward of max/min over one dim: the gradient goes to the extreme elements, split evenly
/// between ties. Inputs `(x, y_keepdim, grad_keepdim)`.
#[derive(Debug, Clone, Copy)]
struct ExtremumBackward {
    dim: usize,
    kind: ReduceKind,
}

impl Op for ExtremumBackward {
    fn name(&self) -> &'static str {
        if self.kind == ReduceKind::Min {
            "min_backward"
        } else {
            "max_backward"
        }
    }
    fn idioms(&self) -> Idioms {
        Idioms([0, 0, 1, 1, 1, 0])
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        for t in &inputs[1..] {
            if t.dtype() != x.dtype() {
                return Err(Error::DTypeMismatch {
                    op: self.name(),
                    expected: x.dtype(),
                    got: t.dtype(),
                });
            }
        }
        Ok(smallvec![TensorSpec::new(x.shape().clone(), x.dtype())])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let (x, y, g) = (inputs[0], inputs[1], inputs[2]);
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_extremum_backward(self, &x, &y, &g)?]);
        }
        let (ys, gs) = (y.cpu(name)?, g.cpu(name)?);
        let dim = self.dim;
        let out = crate::float_dispatch!(name, x.cpu(name)?, |xv| {
            let yv = gather_layout(ys.as_slice(name)?, y.layout);
            let gv = gather_layout(gs.as_slice(name)?, g.layout);
            Box::new(CpuElement::wrap(extremum_grad(
                xv,
                x.layout,
                &yv,
                &gv,
                dim,
                specs[0].shape.elem_count(),
            )?)) as Box<dyn dynn_core::DeviceStorage>
        });
        Ok(smallvec![out])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

fn extremum_grad<T: FloatElement + CpuElement>(
    xv: &[T],
    layout: &Layout,
    yv: &[T],
    gv: &[T],
    dim: usize,
    n: usize,
) -> Result<Vec<T>> {
    let (xb, outer, red, inner) = as_blocks(xv, layout, &[dim])?;
    let mut out = vec![T::from_acc(AccFloat::ZERO); n];
    for o in 0..outer {
        for i in 0..inner {
            let yy = yv[o * inner + i].to_acc();
            let idx = |r: usize| o * red * inner + r * inner + i;
            let ties = (0..red)
                .filter(|&r| xb[idx(r)].to_acc() == yy)
                .count()
                .max(1);
            let share = gv[o * inner + i].to_acc() / AccFloat::of(ties as f64);
            for r in 0..red {
                if xb[idx(r)].to_acc() == yy {
                    out[idx(r)] = T::from_acc(share);
                }
            }
        }
    }
    Ok(out)
}

/// Index of the largest element along one dim, as i64 (first on ties).
#[derive(Debug, Clone, Copy)]
pub struct Argmax {
    /// The dim.
    pub dim: usize,
    /// Keep the dim as size 1.
    pub keepdim: bool,
}

impl Op for Argmax {
    fn name(&self) -> &'static str {
        "argmax"
    }
    fn idioms(&self) -> Idioms {
        Idioms::REDUCE
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        if !x.dtype().is_float() {
            return Err(Error::unsupported_dtype("argmax", x.dtype()));
        }
        Ok(smallvec![TensorSpec::new(
            out_shape(x.shape(), &[self.dim], self.keepdim),
            DType::I64
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_argmax(self, &x)?]);
        }
        let out = crate::float_dispatch!("argmax", x.cpu("argmax")?, |v| {
            let (b, outer, red, inner) = as_blocks(v, x.layout, &[self.dim])?;
            let mut out = vec![0i64; outer * inner];
            for o in 0..outer {
                for i in 0..inner {
                    let mut best = 0;
                    for r in 1..red {
                        let (c, m) = (
                            b[o * red * inner + r * inner + i].to_acc(),
                            b[o * red * inner + best * inner + i].to_acc(),
                        );
                        if c > m || (c.is_nan() && !m.is_nan()) {
                            best = r;
                        }
                    }
                    out[o * inner + i] = best as i64;
                }
            }
            dynn_core::CpuStorage::I64(out)
        });
        Ok(crate::cpu::one(out))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

fn resolve_dims<D: Dim>(x: &Tensor, dims: &[D], op: &'static str) -> Result<SmallVec<[usize; 4]>> {
    let mut v: SmallVec<[usize; 4]> = dims
        .iter()
        .map(|d| d.index(x.shape(), op))
        .collect::<Result<_>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Reductions over dims.
pub trait ReduceOps {
    /// Σ over `dims`. Integer tensors (masks, indices) sum exactly into I64, as PyTorch's
    /// integer sums do (through f64: exact while every partial sum stays under 2^53).
    fn sum_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Σ over one dim, keeping it as size 1.
    fn sum_keepdim<D: Dim>(&self, dim: D) -> Result<Tensor>;
    /// Σ of all elements (a scalar).
    fn sum_all(&self) -> Result<Tensor>;
    /// Mean over `dims`.
    fn mean_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Mean of all elements (a scalar).
    fn mean_all(&self) -> Result<Tensor>;
    /// Max over `dims` (reduced one dim at a time).
    fn max_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Min over `dims`.
    fn min_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Index of the max along `dim` (i64).
    fn argmax<D: Dim>(&self, dim: D, keepdim: bool) -> Result<Tensor>;
    /// Variance over `dims` with Bessel's correction when `unbiased`.
    fn var_dims<D: Dim>(&self, dims: &[D], keepdim: bool, unbiased: bool) -> Result<Tensor>;
    /// Sums broadcast dims away so the result has `shape` (the backward of broadcasting).
    fn sum_to(&self, shape: &Shape) -> Result<Tensor>;
}

fn extremum<D: Dim>(
    x: &Tensor,
    dims: &[D],
    keepdim: bool,
    kind: ReduceKind,
    op: &'static str,
) -> Result<Tensor> {
    let dims = resolve_dims(x, dims, op)?;
    let mut t = x.clone();
    for &d in dims.iter().rev() {
        t = execute1(
            Reduce {
                kind,
                dims: smallvec![d],
                keepdim: true,
            },
            &[&t],
        )?;
    }
    if keepdim {
        Ok(t)
    } else {
        t.reshape(out_shape(x.shape(), &dims, false))
    }
}

impl ReduceOps for Tensor {
    fn sum_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        let dims = resolve_dims(self, dims, "sum")?;
        if !self.dtype().is_float() {
            let wide = self.to_dtype(DType::F64)?;
            return wide.sum_dims(&dims, keepdim)?.to_dtype(DType::I64);
        }
        execute1(
            Reduce {
                kind: ReduceKind::Sum,
                dims,
                keepdim,
            },
            &[self],
        )
    }
    fn sum_keepdim<D: Dim>(&self, dim: D) -> Result<Tensor> {
        self.sum_dims(&[dim], true)
    }
    fn sum_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.sum_dims(&dims, false)
    }
    fn mean_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        let r = resolve_dims(self, dims, "mean")?;
        let n: usize = r.iter().map(|&d| self.dims()[d]).product();
        self.sum_dims(&r, keepdim)?.scale(1.0 / n.max(1) as f64)
    }
    fn mean_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.mean_dims(&dims, false)
    }
    fn max_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        extremum(self, dims, keepdim, ReduceKind::Max, "max")
    }
    fn min_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        extremum(self, dims, keepdim, ReduceKind::Min, "min")
    }
    fn argmax<D: Dim>(&self, dim: D, keepdim: bool) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "argmax")?;
        execute1(Argmax { dim, keepdim }, &[self])
    }
    fn var_dims<D: Dim>(&self, dims: &[D], keepdim: bool, unbiased: bool) -> Result<Tensor> {
        let r = resolve_dims(self, dims, "var")?;
        let n: usize = r.iter().map(|&d| self.dims()[d]).product();
        let dev = self.sub(&self.mean_dims(&r, true)?)?;
        let denom = if unbiased {
            n.saturating_sub(1).max(1)
        } else {
            n.max(1)
        };
        dev.sqr()?.sum_dims(&r, keepdim)?.scale(1.0 / denom as f64)
    }
    fn sum_to(&self, shape: &Shape) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let (src, dst) = (self.dims(), shape.dims());
        if dst.len() > src.len() {
            return Err(Error::shape_mismatch("sum_to", self.shape(), shape));
        }
        let lead = src.len() - dst.len();
        let mut dims: Vec<usize> = (0..lead).collect();
        for (i, &d) in dst.iter().enumerate() {
            if d == 1 && src[lead + i] != 1 {
                dims.push(lead + i);
            } else if d != src[lead + i] {
                return Err(Error::shape_mismatch("sum_to", self.shape(), shape));
            }
        }
        self.sum_dims(&dims, true)?.reshape(shape.clone())
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name, idioms, differentiable| OpInfo {
        name,
        idioms,
        differentiable,
        family: "reduce",
    };
    vec![
        f("sum", Idioms::REDUCE, true),
        f("max", Idioms::REDUCE, true),
        f("min", Idioms::REDUCE, true),
        f("max_backward", Idioms([0, 0, 1, 1, 1, 0]), false),
        f("min_backward", Idioms([0, 0, 1, 1, 1, 0]), false),
        f("argmax", Idioms::REDUCE, false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reductions computed in vector code (`SimdTask`s, serial and parallel) give the bits of
    /// the same summation order in this test's baseline code.
    #[test]
    fn vector_reductions_give_the_scalar_bits() {
        let x: Vec<f32> = (0..4 * PAR_MIN + 77)
            .map(|i| (i as f32 * 0.731).sin() * 3.0 + (i % 7) as f32)
            .collect();
        for kind in [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Min] {
            // Rows (inner 1), serial and parallel; then columns, many and few blocks.
            for (outer, red, inner) in [
                (9, 37, 1),
                (300, 257, 1),
                (3, 5, 40),
                (40, 50, 64),
                (1, 40, 2000),
            ] {
                let x = &x[..outer * red * inner];
                let got = reduce_blocks(kind, x, outer, red, inner);
                let want: Vec<f32> = if inner == 1 {
                    x.chunks(red).map(|r| reduce_row(kind, r)).collect()
                } else {
                    let mut acc = vec![init::<f32>(kind); outer * inner];
                    for o in 0..outer {
                        for r in 0..red {
                            for i in 0..inner {
                                let a = &mut acc[o * inner + i];
                                *a = combine(kind, *a, x[(o * red + r) * inner + i]);
                            }
                        }
                    }
                    acc
                };
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{kind:?} {outer}×{red}×{inner}");
            }
        }
    }
}
