//! Softmax and log-softmax along any dim, with fused backward kernels
//! (`softmax_backward`: `(g - Σ g·y) · y`; `log_softmax_backward`: `g - e^y · Σ g`).
//!
//! The kernels work on rows: the reduced dim made innermost and contiguous. A contiguous input
//! reduced over its last dim is used in place; anything else is gathered into rows first (and
//! the output permuted back). Each row is processed while it sits in cache: one pass for the
//! max, one writing `exp(x - max)` to a scratch row, one summing it, one that scales; each is
//! a simple loop that vectorizes (AVX2 + FMA when the CPU has them, with a polynomial `exp`
//! that vectorizes). Rows are split into fixed-size chunks processed in parallel; every sum
//! runs over 16 lanes in a fixed order, so results depend only on the shape, never on thread
//! timing.
//!
//! This file also holds the row machinery (`Rows`, `RowKernel`, `run_rows`, `VecExp`) that
//! the other row-wise families (norms, cross-entropy, dropout) reuse.

use crate::cpu::{PAR_MIN, SimdTask, gather_layout, simd_task};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::float_dispatch;
use crate::math::FastMath;
use crate::registry::OpInfo;
use cudarc::driver::LaunchConfig;
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, DType, DeviceStorage, Dim, Error, FloatElement,
    Idioms, InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor,
    TensorSpec, execute1, smallvec::smallvec, vec_from_fill,
};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

// ----- row machinery shared by the row-wise families -----

/// Elements per parallel task in row kernels. The chunking depends only on the shape, so
/// per-chunk partial results (e.g. the weight gradient of a norm) combine in a fixed order.
pub(crate) const ROW_CHUNK: usize = 1 << 16;

/// Rows per task for rows of `len` elements.
pub(crate) fn rows_per_chunk(len: usize) -> usize {
    (ROW_CHUNK / len.max(1)).max(1)
}

/// Runs `f(chunk_index, chunk)` over `out` in chunks of `chunk` elements, in parallel when
/// `parallel`, returning the results in chunk order.
pub(crate) fn for_chunks<U: Send, R: Send>(
    out: &mut [U],
    chunk: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [U]) -> R + Sync,
) -> Vec<R> {
    if out.is_empty() || chunk == 0 {
        return Vec::new();
    }
    if parallel {
        out.par_chunks_mut(chunk)
            .enumerate()
            .map(|(i, o)| f(i, o))
            .collect()
    } else {
        out.chunks_mut(chunk)
            .enumerate()
            .map(|(i, o)| f(i, o))
            .collect()
    }
}

/// A row-wise kernel: [`run_rows`] calls `row` for every row, in fixed chunks of rows run in
/// parallel, each chunk with its own state.
pub(crate) trait RowKernel: Sync {
    /// The output element.
    type Out: Copy + Send;
    /// Per-chunk state (scratch space, partial sums), returned in chunk order.
    type State: Send;
    /// Output elements per row.
    fn out_len(&self) -> usize;
    /// Input elements each row reads (sizes the chunks).
    fn work_len(&self) -> usize;
    /// Fresh state for a chunk.
    fn state(&self) -> Self::State;
    /// Processes row `r` into `out` (`out_len` elements, all of which it must write).
    /// Implementations mark this `#[inline(always)]` so it compiles into the AVX2 path.
    fn row(&self, r: usize, out: &mut [MaybeUninit<Self::Out>], state: &mut Self::State);
}

/// One chunk of rows as a [`SimdTask`].
struct RowChunk<'k, 'o, K: RowKernel> {
    kernel: &'k K,
    first: usize,
    out: &'o mut [MaybeUninit<K::Out>],
    state: K::State,
}

impl<K: RowKernel> SimdTask for RowChunk<'_, '_, K> {
    type Out = K::State;
    #[inline(always)]
    fn run(mut self) -> K::State {
        let n = self.kernel.out_len();
        for (i, o) in self.out.chunks_mut(n).enumerate() {
            self.kernel.row(self.first + i, o, &mut self.state);
        }
        self.state
    }
}

/// Runs `kernel` over `rows` rows: returns the outputs (`rows · out_len`, row-major) and
/// each chunk's final state in chunk order. Chunks are [`rows_per_chunk`] rows, a function
/// of the shape only.
pub(crate) fn run_rows<K: RowKernel>(kernel: &K, rows: usize) -> (Vec<K::Out>, Vec<K::State>) {
    let n = kernel.out_len();
    let per = rows_per_chunk(kernel.work_len());
    let parallel = rows * kernel.work_len() >= PAR_MIN;
    let mut states = Vec::new();
    let out = vec_from_fill(rows * n, |out| {
        states = for_chunks(out, per * n, parallel, |c, o| {
            simd_task(RowChunk {
                kernel,
                first: c * per,
                out: o,
                state: kernel.state(),
            })
        });
    });
    (out, states)
}

/// e^x for the accumulator types, written so that loops over it vectorize.
pub(crate) trait VecExp: FastMath {
    /// e^x.
    fn vexp(self) -> Self;
    /// e^x for x <= 0 (or NaN), as a term of a sum whose largest term is 1: below -87.3 it
    /// may give e^-87.3 (1.2e-38) instead of 0, which no such sum can see. Fewer
    /// instructions than [`VecExp::vexp`] (no upper clamp, no final select).
    #[inline(always)]
    fn vexp_term(self) -> Self {
        self.vexp()
    }
}

/// e^x for f32 on an argument already clamped to [-87.3, 88.37] (or NaN).
/// Range reduction `x = n·ln2 + r`, |r| <= ln2/2 (two-constant Cody–Waite with fused
/// multiply-adds), a degree-6 minimax polynomial for e^r (relative error 1.9e-9, fitted by
/// Remez exchange), and 2^n built with integer operations on the rounding constant's bits
/// (a float-to-int conversion would not vectorize). Within 1 ulp of e^x. On x86 CPUs
/// without FMA, `mul_add` is a library call: correct, slower.
#[inline(always)]
fn exp_f32_clamped(xc: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer.
    let t = xc.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.383_684_6e-3f32;
    p = p.mul_add(r, 8.374_816e-3);
    p = p.mul_add(r, 4.166_822_5e-2);
    p = p.mul_add(r, 1.666_642e-1);
    p = p.mul_add(r, 4.999_999e-1);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // t's low mantissa bits hold n in two's complement: 2^n has bits (n + 127) << 23.
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23)
}

impl VecExp for f32 {
    /// Within 1 ulp of e^x for -87.3 <= x <= 88.3; 0 below -87.33, NaN for NaN, saturating at
    /// e^88.37 above (see `exp_f32_clamped`).
    #[inline(always)]
    fn vexp(self) -> f32 {
        let x = self;
        // Comparisons rather than max/min, so NaN passes through.
        let xc = if x < -87.3 { -87.3 } else { x };
        let xc = if xc > 88.37 { 88.37 } else { xc };
        let v = exp_f32_clamped(xc);
        if x < -87.33 { 0.0 } else { v }
    }

    #[inline(always)]
    fn vexp_term(self) -> f32 {
        // Comparison rather than max, so NaN passes through.
        exp_f32_clamped(if self < -87.3 { -87.3 } else { self })
    }
}

impl VecExp for f64 {
    #[inline(always)]
    fn vexp(self) -> f64 {
        self.exp()
    }
}

/// Sums 16 lanes pairwise (a fixed order).
#[inline(always)]
pub(crate) fn sum16<A: AccFloat>(acc: [A; 16]) -> A {
    sum_lanes(acc)
}

/// Sums `L` (a power of two) lanes pairwise, a fixed order.
#[inline(always)]
fn sum_lanes<A: AccFloat, const L: usize>(mut acc: [A; L]) -> A {
    let mut w = L / 2;
    while w > 0 {
        for k in 0..w {
            let v = acc[k + w];
            acc[k] += v;
        }
        w /= 2;
    }
    acc[0]
}

/// Σ f(x_i) over a row with `L` independent lanes (vectorizes; the order depends only on
/// the length).
#[inline(always)]
fn sum_map_lanes<T: Copy, A: AccFloat, const L: usize>(row: &[T], f: impl Fn(T) -> A) -> A {
    let mut acc = [A::ZERO; L];
    let chunks = row.chunks_exact(L);
    let rem = chunks.remainder();
    for c in chunks {
        for k in 0..L {
            acc[k] += f(c[k]);
        }
    }
    let mut s = sum_lanes(acc);
    for &x in rem {
        s += f(x);
    }
    s
}

/// Σ f(x_i) over a row with 16 independent lanes (vectorizes; fixed order).
#[inline(always)]
pub(crate) fn sum_map<T: Copy, A: AccFloat>(row: &[T], f: impl Fn(T) -> A) -> A {
    sum_map_lanes::<T, A, 16>(row, f)
}

/// The largest element of a row (−∞ for an empty row), 16 lanes. NaN elements are skipped
/// here, which keeps the loop a plain vector max; they still poison the row through the sum
/// of exponentials that follows in every caller.
#[inline(always)]
pub(crate) fn max_row<T: FloatElement>(row: &[T]) -> T::Acc {
    let mut acc = [<T::Acc as AccFloat>::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for k in 0..16 {
            let v = c[k].to_acc();
            acc[k] = if v > acc[k] { v } else { acc[k] };
        }
    }
    let mut w = 8;
    while w > 0 {
        for k in 0..w {
            acc[k] = if acc[k + w] > acc[k] {
                acc[k + w]
            } else {
                acc[k]
            };
        }
        w /= 2;
    }
    rem.iter().fold(acc[0], |m, &v| {
        let v = v.to_acc();
        if v > m { v } else { m }
    })
}

/// Σ f(a_i, b_i) over two rows of equal length with 16 lanes (fixed order).
#[inline(always)]
pub(crate) fn sum_map2<T: Copy, U: Copy, A: AccFloat>(
    a: &[T],
    b: &[U],
    f: impl Fn(T, U) -> A,
) -> A {
    let mut acc = [A::ZERO; 16];
    let n16 = a.len().min(b.len()) / 16 * 16;
    for (ca, cb) in a[..n16].chunks_exact(16).zip(b[..n16].chunks_exact(16)) {
        for k in 0..16 {
            acc[k] += f(ca[k], cb[k]);
        }
    }
    let mut s = sum16(acc);
    for (&x, &y) in a[n16..].iter().zip(&b[n16..]) {
        s += f(x, y);
    }
    s
}

/// Writes `e^(x_i - m)` into `scratch` (the row's length) and returns their sum. Two simple
/// loops (an element-wise map, then a 16-lane sum) rather than one fused loop: both
/// vectorize reliably, and the scratch row stays in L1.
#[inline(always)]
pub(crate) fn exp_sum<T: FloatElement>(x: &[T], m: T::Acc, scratch: &mut [T::Acc]) -> T::Acc
where
    T::Acc: VecExp,
{
    for (s, &v) in scratch.iter_mut().zip(x) {
        *s = (v.to_acc() - m).vexp();
    }
    sum_map(&scratch[..x.len()], |e: T::Acc| e)
}

/// Softmax's shared arithmetic for one row: writes `e^(x_i - max)` into `scratch` and returns
/// `1 / Σ`, which the caller multiplies them by (one definition, so every softmax kernel
/// gives the same bits).
#[inline(always)]
fn exp_row<T: FloatElement>(x: &[T], scratch: &mut [T::Acc]) -> T::Acc
where
    T::Acc: VecExp,
{
    let m = max_row(x);
    <T::Acc as AccFloat>::ONE / exp_sum(x, m, scratch)
}

/// A tensor seen as contiguous rows along one dim (the dim made innermost).
pub(crate) struct Rows<'a, T: Clone> {
    /// The elements, rows of `len` one after another.
    pub data: Cow<'a, [T]>,
    /// Row length (the size of the dim).
    pub len: usize,
    /// When the dim was not last: the permuted dims and the permutation back.
    perm: Option<(Shape, Vec<usize>)>,
}

impl<'a, T: Copy + Send + Sync> Rows<'a, T> {
    /// The rows of `src` seen through `layout` along `dim`: borrowed when already contiguous
    /// rows, gathered otherwise.
    pub fn new(src: &'a [T], layout: &Layout, dim: usize) -> Result<Self> {
        let dims = layout.dims();
        let rank = dims.len();
        let len = dims.get(dim).copied().unwrap_or(1);
        if rank == 0 || dim + 1 == rank {
            let data = match layout.contiguous_range() {
                Some((a, b)) => Cow::Borrowed(&src[a..b]),
                None => Cow::Owned(gather_layout(src, layout)),
            };
            return Ok(Rows {
                data,
                len,
                perm: None,
            });
        }
        let perm: Vec<usize> = (0..rank)
            .filter(|&d| d != dim)
            .chain(std::iter::once(dim))
            .collect();
        let p = layout.permute(&perm)?;
        let mut inv = vec![0; rank];
        for (i, &d) in perm.iter().enumerate() {
            inv[d] = i;
        }
        Ok(Rows {
            data: Cow::Owned(gather_layout(src, &p)),
            len,
            perm: Some((p.shape().clone(), inv)),
        })
    }

    /// The last dim's rows of `src` (the layout of a norm's or a loss's input).
    pub fn last(src: &'a [T], layout: &Layout) -> Result<Self> {
        Self::new(src, layout, layout.dims().len().saturating_sub(1))
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.len).unwrap_or(0)
    }

    /// Row `r`.
    #[inline(always)]
    pub fn row(&self, r: usize) -> &[T] {
        &self.data[r * self.len..(r + 1) * self.len]
    }

    /// Puts a row-ordered result (same element count) back in the original dim order.
    pub fn restore<U: Copy + Send + Sync>(&self, out: Vec<U>) -> Result<Vec<U>> {
        match &self.perm {
            None => Ok(out),
            Some((shape, inv)) => Ok(gather_layout(
                &out,
                &Layout::contiguous(shape.clone()).permute(inv)?,
            )),
        }
    }
}

/// The accumulator dtype of a float dtype (f32 for the 16-bit types).
pub(crate) fn acc_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Boxes a typed vector as device storage.
pub(crate) fn boxed<T: CpuElement>(v: Vec<T>) -> Box<dyn DeviceStorage> {
    Box::new(T::wrap(v))
}

// ----- kernels -----

/// softmax / log-softmax over rows.
struct SoftmaxRows<'r, 'a, T: FloatElement> {
    x: &'r Rows<'a, T>,
    log: bool,
}

impl<T: FloatElement> RowKernel for SoftmaxRows<'_, '_, T>
where
    T::Acc: VecExp,
{
    type Out = T;
    type State = Vec<T::Acc>;
    fn out_len(&self) -> usize {
        self.x.len
    }
    fn work_len(&self) -> usize {
        self.x.len
    }
    fn state(&self) -> Vec<T::Acc> {
        vec![<T::Acc as AccFloat>::ZERO; self.x.len]
    }
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], scratch: &mut Vec<T::Acc>) {
        let x = self.x.row(r);
        if self.log {
            let m = max_row(x);
            let sum = exp_sum(x, m, scratch);
            // (x - max) - ln Σ: x - max is exact near the max, where (max + ln Σ) would round.
            let ln_sum = sum.ln();
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(T::from_acc((v.to_acc() - m) - ln_sum));
            }
        } else {
            let inv = exp_row(x, scratch);
            for (o, &e) in out.iter_mut().zip(scratch.iter()) {
                o.write(T::from_acc(e * inv));
            }
        }
    }
}

fn softmax_fwd<T: FloatElement + CpuElement>(
    src: &[T],
    layout: &Layout,
    dim: usize,
    log: bool,
) -> Result<Vec<T>>
where
    T::Acc: VecExp,
{
    let x = Rows::new(src, layout, dim)?;
    let (out, _) = run_rows(&SoftmaxRows { x: &x, log }, x.rows());
    x.restore(out)
}

/// Softmax over contiguous rows of `len`, written over them ([`exp_row`], as [`SoftmaxRows`]:
/// the same bits), for a kernel's own temporary (the attention scores) that no one else reads.
struct SoftmaxInPlace<'a, T: FloatElement> {
    rows: &'a mut [T],
    len: usize,
}

impl<T: FloatElement> SimdTask for SoftmaxInPlace<'_, T>
where
    T::Acc: VecExp,
{
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let mut scratch = vec![<T::Acc as AccFloat>::ZERO; self.len];
        for row in self.rows.chunks_mut(self.len) {
            let inv = exp_row(row, &mut scratch);
            for (o, &e) in row.iter_mut().zip(scratch.iter()) {
                *o = T::from_acc(e * inv);
            }
        }
    }
}

/// Softmax over the contiguous rows of `len` elements of `data`, in place.
pub(crate) fn softmax_rows_in_place<T: FloatElement>(data: &mut [T], len: usize)
where
    T::Acc: VecExp,
{
    if len == 0 {
        return;
    }
    let parallel = data.len() >= PAR_MIN;
    for_chunks(data, rows_per_chunk(len) * len, parallel, |_, rows| {
        simd_task(SoftmaxInPlace { rows, len })
    });
}

/// The fused backward over rows: `(g - Σ g·y) · y`, or `g - e^y · Σ g` for log-softmax.
struct SoftmaxGradRows<'r, 'a, T: FloatElement> {
    y: &'r Rows<'a, T>,
    g: &'r Rows<'a, T>,
    log: bool,
}

impl<T: FloatElement> RowKernel for SoftmaxGradRows<'_, '_, T>
where
    T::Acc: VecExp,
{
    type Out = T;
    type State = ();
    fn out_len(&self) -> usize {
        self.y.len
    }
    fn work_len(&self) -> usize {
        2 * self.y.len
    }
    fn state(&self) {}
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], _: &mut ()) {
        let (y, g) = (self.y.row(r), self.g.row(r));
        if self.log {
            let s = sum_map(g, |b: T| b.to_acc());
            for ((o, &a), &b) in out.iter_mut().zip(y).zip(g) {
                o.write(T::from_acc(b.to_acc() - a.to_acc().vexp() * s));
            }
        } else {
            let s = sum_map2(y, g, |a: T, b: T| a.to_acc() * b.to_acc());
            for ((o, &a), &b) in out.iter_mut().zip(y).zip(g) {
                o.write(T::from_acc((b.to_acc() - s) * a.to_acc()));
            }
        }
    }
}

fn softmax_bwd<'a, T: FloatElement + CpuElement>(
    y: &'a [T],
    yl: &Layout,
    g: &'a [T],
    gl: &Layout,
    dim: usize,
    log: bool,
) -> Result<Vec<T>>
where
    T::Acc: VecExp,
{
    let (yr, gr) = (Rows::new(y, yl, dim)?, Rows::new(g, gl, dim)?);
    let k = SoftmaxGradRows {
        y: &yr,
        g: &gr,
        log,
    };
    let (out, _) = run_rows(&k, yr.rows());
    yr.restore(out)
}

// ----- CUDA -----

/// Helpers the row-wise families (softmax, norms, cross-entropy) put before their kernels:
/// −∞, 16-byte vector loads and stores, and the chunk loader of the register-resident rows.
/// (Each family is its own NVRTC module, so each carries a copy.)
macro_rules! cuda_row_helpers {
    () => {
        r#"
template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double((long long)0xfff0000000000000ULL);
}

// Elements per 16-byte vector.
#define VEC (16 / (int)sizeof(scalar))

__device__ __forceinline__ void vload(float* d, const float* s) {
    float4 v = *reinterpret_cast<const float4*>(s);
    d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
}
__device__ __forceinline__ void vload(double* d, const double* s) {
    double2 v = *reinterpret_cast<const double2*>(s);
    d[0] = v.x; d[1] = v.y;
}
__device__ __forceinline__ void vstore(float* d, const float* s) {
    *reinterpret_cast<float4*>(d) = make_float4(s[0], s[1], s[2], s[3]);
}
__device__ __forceinline__ void vstore(double* d, const double* s) {
    *reinterpret_cast<double2*>(d) = make_double2(s[0], s[1]);
}
// 16-bit data: eight elements per 16 bytes, widened to f32 in registers (rounded on store).
__device__ __forceinline__ float bits16(u32 b, h16*) { h16 h; h.x = (unsigned short)b; return h2f(h); }
__device__ __forceinline__ float bits16(u32 b, b16*) { return __uint_as_float(b << 16); }
template <typename H> __device__ __forceinline__ void vload(float* d, const H* s) {
    uint4 v = *reinterpret_cast<const uint4*>(s);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        d[2 * i] = bits16(w[i] & 0xffffu, (H*)0);
        d[2 * i + 1] = bits16(w[i] >> 16, (H*)0);
    }
}
template <typename H> __device__ __forceinline__ void vstore(H* d, const float* s) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        w[i] = (u32)to_elem(s[2 * i], (H*)0).x | ((u32)to_elem(s[2 * i + 1], (H*)0).x << 16);
    *reinterpret_cast<uint4*>(d) = make_uint4(w[0], w[1], w[2], w[3]);
}

// `at` for a strided view, out of line (keeps the unrolled register-row kernels small).
__device__ __noinline__ i64 at_strided(Strided s, i64 i) { return at(s, i); }

// Loads the V elements j..j+V of the row starting at logical index `base` (pad past `len`),
// widened to `acc`. V > 1: one 16-byte load from a contiguous, aligned view (the host
// checks); V == 1: any layout through `at`.
template <int V>
__device__ __forceinline__ bool ld(acc (&d)[V], const scalar* p, const Strided& s, i64 base,
                                   i64 j, i64 len, acc pad) {
    if (j >= len) {
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] = pad;
        return false;
    }
    if constexpr (V > 1) {
        vload(d, p + s.offset + base + j);
    } else {
        d[0] = ld(p[s.contiguous ? s.offset + base + j : at_strided(s, base + j)]);
    }
    return true;
}

// Stores V elements at contiguous index `i` (aligned when V > 1), rounded to `scalar`.
template <int V>
__device__ __forceinline__ void st(scalar* p, i64 i, const acc (&d)[V]) {
    if constexpr (V > 1) {
        vstore(p + i, d);
    } else {
        p[i] = st(d[0]);
    }
}

// 16-bit data has eight elements per 16-byte chunk: its warp plans stop at four chunks per
// lane (32 elements, as f32's eight chunks; `RowPlan::new`), so its `_wv8` is never launched
// and traps if it is (eight would need 64 registers per row array and spill).
#ifdef DYNN_HALF
#define WV8(BODY, ARGS) __trap();
#else
#define WV8(BODY, ARGS) BODY<VEC, 8> ARGS;
#endif

// A kernel `NAME` for each register-resident warp plan: 16-byte chunks (`_wv<IT>`) or single
// elements (`_ws<IT>`), IT chunks per lane. BODY is a template taking <V, IT>.
#define WARP_PLANS(NAME, BODY, PARAMS, ARGS) \
    extern "C" __global__ void __launch_bounds__(128) NAME##_wv1 PARAMS { BODY<VEC, 1> ARGS; } \
    extern "C" __global__ void __launch_bounds__(128) NAME##_wv2 PARAMS { BODY<VEC, 2> ARGS; } \
    extern "C" __global__ void __launch_bounds__(128) NAME##_wv4 PARAMS { BODY<VEC, 4> ARGS; } \
    extern "C" __global__ void __launch_bounds__(128) NAME##_wv8 PARAMS { WV8(BODY, ARGS) } \
    extern "C" __global__ void __launch_bounds__(128) NAME##_ws1 PARAMS { BODY<1, 1> ARGS; } \
    extern "C" __global__ void __launch_bounds__(128) NAME##_ws2 PARAMS { BODY<1, 2> ARGS; } \
    extern "C" __global__ void __launch_bounds__(128) NAME##_ws4 PARAMS { BODY<1, 4> ARGS; } \
    extern "C" __global__ void __launch_bounds__(128) NAME##_ws8 PARAMS { BODY<1, 8> ARGS; }

// The two block plans (one block per row): 16-byte chunks (`_bv`) or single elements (`_bs`).
#define BLOCK_PLANS(NAME, BODY, PARAMS, ARGS) \
    extern "C" __global__ void NAME##_bv PARAMS { BODY<VEC> ARGS; } \
    extern "C" __global__ void NAME##_bs PARAMS { BODY<1> ARGS; }
"#
    };
}
pub(crate) use cuda_row_helpers;

/// The kernels of one row-wise operation, one per [`RowPlan`] (see `WARP_PLANS` and
/// `BLOCK_PLANS` in the CUDA helpers).
pub(crate) struct RowKernels {
    /// Warp plans with 16-byte chunks, for 1, 2, 4, 8 chunks per lane.
    pub warp_vec: [&'static str; WARP_PLAN_ITS],
    /// Warp plans with single elements, for 1, 2, 4, 8 per lane.
    pub warp: [&'static str; WARP_PLAN_ITS],
    /// Block plan with 16-byte chunks.
    pub block_vec: &'static str,
    /// Block plan with single elements.
    pub block: &'static str,
}

/// Names the kernels that `WARP_PLANS(NAME, …)` and `BLOCK_PLANS(NAME, …)` define.
macro_rules! row_kernels {
    ($name:literal) => {
        crate::ops::softmax::RowKernels {
            warp_vec: [
                concat!($name, "_wv1"),
                concat!($name, "_wv2"),
                concat!($name, "_wv4"),
                concat!($name, "_wv8"),
            ],
            warp: [
                concat!($name, "_ws1"),
                concat!($name, "_ws2"),
                concat!($name, "_ws4"),
                concat!($name, "_ws8"),
            ],
            block_vec: concat!($name, "_bv"),
            block: concat!($name, "_bs"),
        }
    };
}
pub(crate) use row_kernels;

/// Warp plans hold 1, 2, 4 or 8 chunks per lane: rows of up to 8 × 32 chunks (1024 f32 or
/// 512 f64 elements with 16-byte chunks, 256 elements otherwise; 16-bit data stops at four
/// 16-byte chunks, 1024 elements, see [`WARP_PLAN_ELEMS`]) live in registers.
pub(crate) const WARP_PLAN_ITS: usize = 4;

/// Elements per lane a warp plan holds at most (f32's eight 16-byte chunks): 16-bit rows,
/// eight elements per chunk, stop at four chunks (1024 elements).
const WARP_PLAN_ELEMS: usize = 32;

/// True when a warp plan of `it` chunks of `chunk` elements per lane stays within
/// [`WARP_PLAN_ELEMS`] (single elements always do).
fn warp_holds(it: usize, chunk: usize) -> bool {
    it * chunk <= WARP_PLAN_ELEMS.max(chunk)
}

/// Rows (warps) per block of a warp plan.
pub(crate) const WARPS_PER_BLOCK: usize = 4;

/// How a row-wise CUDA kernel covers rows of `len` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowPlan {
    /// One warp per row with the row in registers: `it` chunks per lane, each 16 bytes
    /// (`vec`) or one element.
    Warp {
        /// 16-byte chunks.
        vec: bool,
        /// Chunks per lane (a power of two).
        it: usize,
    },
    /// One block of `threads` per row, passes over memory.
    Block {
        /// 16-byte chunks.
        vec: bool,
        /// Threads per block.
        threads: u32,
    },
}

/// Elements per 16-byte vector of `dtype`.
pub(crate) fn vec_width(dtype: DType) -> usize {
    16 / dtype.size_in_bytes().max(1)
}

/// True when rows of `len` elements in each of `layouts` can be read with aligned 16-byte
/// loads (contiguous, offset and row length multiples of the vector width). Device buffers
/// are at least 256-byte aligned.
pub(crate) fn vec_ok(dtype: DType, len: usize, layouts: &[&Layout]) -> bool {
    let w = vec_width(dtype);
    len % w == 0
        && layouts
            .iter()
            .all(|l| l.is_contiguous() && l.offset() % w == 0)
}

impl RowPlan {
    /// The plan for rows of `len` elements (`vec` from [`vec_ok`]).
    pub(crate) fn new(dtype: DType, len: usize, vec: bool) -> RowPlan {
        let chunk = if vec { vec_width(dtype) } else { 1 };
        let it = len.div_ceil(32 * chunk).max(1).next_power_of_two();
        if it < 1 << WARP_PLAN_ITS && warp_holds(it, chunk) {
            RowPlan::Warp { vec, it }
        } else {
            RowPlan::Block {
                vec,
                threads: crate::cuda::row_threads(len),
            }
        }
    }

    /// The kernel of this plan among `k` (for `dtype` data).
    pub(crate) fn kernel(
        self,
        op: &'static str,
        dtype: DType,
        k: &RowKernels,
    ) -> Result<&'static str> {
        if let RowPlan::Warp { vec: true, it } = self
            && !warp_holds(it, vec_width(dtype))
        {
            return Err(Error::invalid(
                op,
                format!("no CUDA row kernel for plan {self:?} on {dtype}"),
            ));
        }
        let name = match self {
            RowPlan::Warp { vec: true, it } => k.warp_vec.get(it.trailing_zeros() as usize),
            RowPlan::Warp { vec: false, it } => k.warp.get(it.trailing_zeros() as usize),
            RowPlan::Block { vec: true, .. } => Some(&k.block_vec),
            RowPlan::Block { vec: false, .. } => Some(&k.block),
        };
        name.copied()
            .ok_or_else(|| Error::invalid(op, format!("no CUDA row kernel for plan {self:?}")))
    }

    /// The launch shape for `rows` rows.
    pub(crate) fn cfg(self, rows: usize) -> LaunchConfig {
        match self {
            RowPlan::Warp { .. } => LaunchConfig {
                grid_dim: (rows.div_ceil(WARPS_PER_BLOCK).max(1) as u32, 1, 1),
                block_dim: (32 * WARPS_PER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            RowPlan::Block { threads, .. } => crate::cuda::rows(rows, threads),
        }
    }
}

/// `(outer, len, inner)`: the dims before `dim`, `dim` itself, the dims after it.
pub(crate) fn split_at_dim(dims: &[usize], dim: usize) -> (usize, usize, usize) {
    let len = dims.get(dim).copied().unwrap_or(1);
    let outer = dims[..dim.min(dims.len())].iter().product();
    let inner = dims.get(dim + 1..).map_or(1, |d| d.iter().product());
    (outer, len, inner)
}

/// Softmax / log-softmax forward and backward along any dim: when the dim is innermost (all
/// later dims of size 1) one warp per row with the row in registers (see `RowPlan`: up to
/// 1024 f32 elements with 16-byte loads), or one block per row (three passes, max, Σ exp,
/// write); otherwise one thread per column. Reductions are warp shuffles in a fixed order:
/// deterministic.
pub const CUDA: CudaSource = CudaSource {
    name: "softmax",
    code: concat!(
        cuda_row_helpers!(),
        r#"
// ---- forward ----

template <int V, int IT>
__device__ __forceinline__ void sm_fwd_warp(const scalar* x, Strided xs, scalar* y, i64 rows,
                                            i64 len, int is_log) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const acc ninf = neg_inf<acc>();
    const i64 base = row * len;
    acc v[IT][V];
    acc m = ninf;
#pragma unroll
    for (int k = 0; k < IT; ++k) {
        ld<V>(v[k], x, xs, base, ((i64)k * 32 + lane) * V, len, ninf);
#pragma unroll
        for (int e = 0; e < V; ++e) m = max(m, v[k][e]);
    }
    m = warp_max(m);
    acc s = 0;
    if (is_log) {
#pragma unroll
        for (int k = 0; k < IT; ++k) {
            if (((i64)k * 32 + lane) * V < len) {
#pragma unroll
                for (int e = 0; e < V; ++e) s += dexp(v[k][e] - m);
            }
        }
        s = warp_sum(s);
        const acc ls = log(s);
#pragma unroll
        for (int k = 0; k < IT; ++k) {
            const i64 j = ((i64)k * 32 + lane) * V;
            if (j < len) {
#pragma unroll
                for (int e = 0; e < V; ++e) v[k][e] = (v[k][e] - m) - ls;
                st<V>(y, base + j, v[k]);
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < IT; ++k) {
            if (((i64)k * 32 + lane) * V < len) {
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    v[k][e] = dexp(v[k][e] - m);
                    s += v[k][e];
                }
            }
        }
        s = warp_sum(s);
        const acc inv = (acc)1 / s;
#pragma unroll
        for (int k = 0; k < IT; ++k) {
            const i64 j = ((i64)k * 32 + lane) * V;
            if (j < len) {
#pragma unroll
                for (int e = 0; e < V; ++e) v[k][e] *= inv;
                st<V>(y, base + j, v[k]);
            }
        }
    }
}

template <int V>
__device__ __forceinline__ void sm_fwd_block(const scalar* x, Strided xs, scalar* y, i64 rows,
                                             i64 len, int is_log) {
    const i64 row = blockIdx.x;
    if (row >= rows) return;
    const acc ninf = neg_inf<acc>();
    const i64 base = row * len, step = (i64)blockDim.x * V;
    acc d[V];
    acc m = ninf;
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(d, x, xs, base, j, len, ninf);
#pragma unroll
        for (int e = 0; e < V; ++e) m = max(m, d[e]);
    }
    m = block_max(m, ninf);
    acc s = 0;
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(d, x, xs, base, j, len, ninf);
#pragma unroll
        for (int e = 0; e < V; ++e) s += dexp(d[e] - m);
    }
    s = block_sum(s);
    const acc ls = log(s), inv = (acc)1 / s;
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(d, x, xs, base, j, len, ninf);
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] = is_log ? (d[e] - m) - ls : dexp(d[e] - m) * inv;
        st<V>(y, base + j, d);
    }
}

#define SM_FWD_PARAMS (const scalar* x, Strided xs, scalar* y, i64 rows, i64 len, int is_log)
#define SM_FWD_ARGS (x, xs, y, rows, len, is_log)
WARP_PLANS(softmax_fwd, sm_fwd_warp, SM_FWD_PARAMS, SM_FWD_ARGS)
BLOCK_PLANS(softmax_fwd, sm_fwd_block, SM_FWD_PARAMS, SM_FWD_ARGS)

// The dim is not innermost: one thread per (outer, inner) column, `len` elements `inner` apart.
extern "C" __global__ void softmax_fwd_cols(const scalar* x, Strided xs, scalar* y, i64 outer,
                                            i64 len, i64 inner, int is_log) {
    GRID_LOOP(t, outer * inner) {
        const i64 o = t / inner, i = t - o * inner, base = o * len * inner + i;
        acc m = neg_inf<acc>();
        for (i64 r = 0; r < len; ++r) m = max(m, ld(x[at(xs, base + r * inner)]));
        acc s = 0;
        for (i64 r = 0; r < len; ++r) s += dexp(ld(x[at(xs, base + r * inner)]) - m);
        const acc ls = log(s), inv = (acc)1 / s;
        for (i64 r = 0; r < len; ++r) {
            const acc v = ld(x[at(xs, base + r * inner)]);
            y[base + r * inner] = st(is_log ? (v - m) - ls : dexp(v - m) * inv);
        }
    }
}

// ---- backward: (g - Σ g·y)·y, or g - e^y·Σ g for log-softmax ----

template <int V, int IT>
__device__ __forceinline__ void sm_bwd_warp(const scalar* y, Strided ys, const scalar* g,
                                            Strided gs, scalar* out, i64 rows, i64 len,
                                            int is_log) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const i64 base = row * len;
    acc a[IT][V], b[IT][V];
    acc s = 0;
#pragma unroll
    for (int k = 0; k < IT; ++k) {
        const i64 j = ((i64)k * 32 + lane) * V;
        ld<V>(a[k], y, ys, base, j, len, (acc)0);
        ld<V>(b[k], g, gs, base, j, len, (acc)0);
#pragma unroll
        for (int e = 0; e < V; ++e) s += is_log ? b[k][e] : a[k][e] * b[k][e];
    }
    s = warp_sum(s);
#pragma unroll
    for (int k = 0; k < IT; ++k) {
        const i64 j = ((i64)k * 32 + lane) * V;
        if (j < len) {
#pragma unroll
            for (int e = 0; e < V; ++e)
                a[k][e] = is_log ? b[k][e] - dexp(a[k][e]) * s : (b[k][e] - s) * a[k][e];
            st<V>(out, base + j, a[k]);
        }
    }
}

template <int V>
__device__ __forceinline__ void sm_bwd_block(const scalar* y, Strided ys, const scalar* g,
                                             Strided gs, scalar* out, i64 rows, i64 len,
                                             int is_log) {
    const i64 row = blockIdx.x;
    if (row >= rows) return;
    const i64 base = row * len, step = (i64)blockDim.x * V;
    acc a[V], b[V];
    acc s = 0;
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(a, y, ys, base, j, len, (acc)0);
        ld<V>(b, g, gs, base, j, len, (acc)0);
#pragma unroll
        for (int e = 0; e < V; ++e) s += is_log ? b[e] : a[e] * b[e];
    }
    s = block_sum(s);
    for (i64 j = (i64)threadIdx.x * V; j < len; j += step) {
        ld<V>(a, y, ys, base, j, len, (acc)0);
        ld<V>(b, g, gs, base, j, len, (acc)0);
#pragma unroll
        for (int e = 0; e < V; ++e) a[e] = is_log ? b[e] - dexp(a[e]) * s : (b[e] - s) * a[e];
        st<V>(out, base + j, a);
    }
}

#define SM_BWD_PARAMS (const scalar* y, Strided ys, const scalar* g, Strided gs, scalar* out, \
                       i64 rows, i64 len, int is_log)
#define SM_BWD_ARGS (y, ys, g, gs, out, rows, len, is_log)
WARP_PLANS(softmax_bwd, sm_bwd_warp, SM_BWD_PARAMS, SM_BWD_ARGS)
BLOCK_PLANS(softmax_bwd, sm_bwd_block, SM_BWD_PARAMS, SM_BWD_ARGS)

extern "C" __global__ void softmax_bwd_cols(const scalar* y, Strided ys, const scalar* g,
                                            Strided gs, scalar* out, i64 outer, i64 len,
                                            i64 inner, int is_log) {
    GRID_LOOP(t, outer * inner) {
        const i64 o = t / inner, i = t - o * inner, base = o * len * inner + i;
        acc s = 0;
        for (i64 r = 0; r < len; ++r) {
            const i64 l = base + r * inner;
            s += is_log ? ld(g[at(gs, l)]) : ld(y[at(ys, l)]) * ld(g[at(gs, l)]);
        }
        for (i64 r = 0; r < len; ++r) {
            const i64 l = base + r * inner;
            const acc a = ld(y[at(ys, l)]), b = ld(g[at(gs, l)]);
            out[l] = st(is_log ? b - dexp(a) * s : (b - s) * a);
        }
    }
}
"#
    ),
    half: true,
};

const FWD_KERNELS: RowKernels = row_kernels!("softmax_fwd");
const BWD_KERNELS: RowKernels = row_kernels!("softmax_bwd");

fn cuda_forward(op: Softmax, x: &KernelArg<'_>) -> Result<Box<dyn DeviceStorage>> {
    let name = op.name();
    let xs = cuda::storage(name, x)?;
    let dev = xs.dev();
    let dtype = x.dtype();
    let (outer, len, inner) = split_at_dim(x.layout.dims(), op.dim);
    let n = outer * len * inner;
    let mut out = CudaStorage::alloc(dev, dtype, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let view = Strided::of(name, x.layout)?;
    let (outer64, len64, inner64, is_log) = (outer as i64, len as i64, inner as i64, op.log as i32);
    if inner == 1 {
        let plan = RowPlan::new(dtype, len, vec_ok(dtype, len, &[x.layout]));
        let f = dev.function(&CUDA, dtype, plan.kernel(name, dtype, &FWD_KERNELS)?)?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            plan.cfg(outer),
            [
                xs.slice(),
                &view,
                out.slice_mut(),
                &outer64,
                &len64,
                &is_log
            ]
        )?;
    } else {
        let f = dev.function(&CUDA, dtype, "softmax_fwd_cols")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            cuda::grid(outer * inner),
            [
                xs.slice(),
                &view,
                out.slice_mut(),
                &outer64,
                &len64,
                &inner64,
                &is_log
            ]
        )?;
    }
    Ok(Box::new(out))
}

fn cuda_backward(
    op: SoftmaxBackward,
    y: &KernelArg<'_>,
    g: &KernelArg<'_>,
) -> Result<Box<dyn DeviceStorage>> {
    let name = op.name();
    let (ys, gs) = (cuda::storage(name, y)?, cuda::storage(name, g)?);
    let dev = ys.dev();
    let dtype = y.dtype();
    let (outer, len, inner) = split_at_dim(y.layout.dims(), op.0.dim);
    let n = outer * len * inner;
    let mut out = CudaStorage::alloc(dev, dtype, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let (yv, gv) = (Strided::of(name, y.layout)?, Strided::of(name, g.layout)?);
    let (outer64, len64, inner64, is_log) =
        (outer as i64, len as i64, inner as i64, op.0.log as i32);
    if inner == 1 {
        let plan = RowPlan::new(dtype, len, vec_ok(dtype, len, &[y.layout, g.layout]));
        let f = dev.function(&CUDA, dtype, plan.kernel(name, dtype, &BWD_KERNELS)?)?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            plan.cfg(outer),
            [
                ys.slice(),
                &yv,
                gs.slice(),
                &gv,
                out.slice_mut(),
                &outer64,
                &len64,
                &is_log
            ]
        )?;
    } else {
        let f = dev.function(&CUDA, dtype, "softmax_bwd_cols")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            cuda::grid(outer * inner),
            [
                ys.slice(),
                &yv,
                gs.slice(),
                &gv,
                out.slice_mut(),
                &outer64,
                &len64,
                &inner64,
                &is_log
            ]
        )?;
    }
    Ok(Box::new(out))
}

// ----- ops -----

/// Softmax (or log-softmax) along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Softmax {
    /// The dim normalized over.
    pub dim: usize,
    /// True for log-softmax.
    pub log: bool,
}

impl Softmax {
    /// Idioms of the forward: two row reductions (max, Σ exp) and one element-wise map
    /// (exp and scale). The paper's table has no softmax row; this follows its counting.
    pub const IDIOMS: Idioms = Idioms([0, 0, 0, 2, 1, 0]);
    /// Idioms of the fused backward: one row reduction and one map, as the table's
    /// "sigmoid backward, tanh backward" row `[0,0,0,1,1,0]`.
    pub const BACKWARD_IDIOMS: Idioms = Idioms([0, 0, 0, 1, 1, 0]);

    fn check_dim(&self, op: &'static str, x: &Tensor) -> Result<()> {
        if self.dim >= x.rank() {
            return Err(Error::DimOutOfRange {
                op,
                dim: self.dim as i64,
                rank: x.rank(),
                shape: x.shape().clone(),
            });
        }
        Ok(())
    }
}

impl Op for Softmax {
    fn name(&self) -> &'static str {
        if self.log { "log_softmax" } else { "softmax" }
    }
    fn idioms(&self) -> Idioms {
        Self::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let [x] = inputs else {
            return Err(Error::invalid(
                self.name(),
                format!("expects 1 input, got {}", inputs.len()),
            ));
        };
        if !x.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name(), x.dtype()));
        }
        self.check_dim(self.name(), x)?;
        Ok(smallvec![TensorSpec::new(x.shape().clone(), x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], _: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        let b = inputs[0].dtype().size_in_bytes() as u64;
        // max, subtract, exp (counted as one), add, scale.
        Cost {
            flops: 5 * n,
            bytes_read: n * b,
            bytes_written: n * b,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_forward(*self, &x)?]);
        }
        let out = float_dispatch!(name, x.cpu(name)?, |v| boxed(softmax_fwd(
            v, x.layout, self.dim, self.log
        )?));
        Ok(smallvec![out])
    }
    fn save(&self) -> Save {
        Save::OUTPUT
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g = execute1(SoftmaxBackward(*self), &[ctx.output(0)?, ctx.grad(0)?])?;
        Ok(smallvec![Some(g)])
    }
}

/// The fused backward of [`Softmax`]: inputs `(y, grad)`, output the input gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftmaxBackward(pub Softmax);

impl Op for SoftmaxBackward {
    fn name(&self) -> &'static str {
        if self.0.log {
            "log_softmax_backward"
        } else {
            "softmax_backward"
        }
    }
    fn idioms(&self) -> Idioms {
        Softmax::BACKWARD_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = self.name();
        let [y, g] = inputs else {
            return Err(Error::invalid(
                name,
                format!("expects 2 inputs (y, grad), got {}", inputs.len()),
            ));
        };
        if y.shape() != g.shape() {
            return Err(Error::shape_mismatch(name, y.shape(), g.shape()));
        }
        if y.dtype() != g.dtype() {
            return Err(Error::DTypeMismatch {
                op: name,
                expected: y.dtype(),
                got: g.dtype(),
            });
        }
        if !y.dtype().is_float() {
            return Err(Error::unsupported_dtype(name, y.dtype()));
        }
        self.0.check_dim(name, y)?;
        Ok(smallvec![TensorSpec::new(y.shape().clone(), y.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], _: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        let b = inputs[0].dtype().size_in_bytes() as u64;
        Cost {
            flops: 4 * n,
            bytes_read: 2 * n * b,
            bytes_written: n * b,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let (y, g) = (inputs[0], inputs[1]);
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_backward(*self, &y, &g)?]);
        }
        let gs = g.cpu(name)?;
        let out = float_dispatch!(name, y.cpu(name)?, |v| boxed(softmax_bwd(
            v,
            y.layout,
            gs.as_slice(name)?,
            g.layout,
            self.0.dim,
            self.0.log
        )?));
        Ok(smallvec![out])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// Softmax and log-softmax on tensors.
pub trait SoftmaxOps {
    /// `e^x / Σ e^x` along `dim` (any dim; negative counts from the back). Float dtypes only;
    /// the 16-bit types are computed in f32.
    fn softmax<D: Dim>(&self, dim: D) -> Result<Tensor>;
    /// `x - ln Σ e^x` along `dim`, computed without forming the softmax (stable for large
    /// logits).
    fn log_softmax<D: Dim>(&self, dim: D) -> Result<Tensor>;
}

impl SoftmaxOps for Tensor {
    fn softmax<D: Dim>(&self, dim: D) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "softmax")?;
        execute1(Softmax { dim, log: false }, &[self])
    }
    fn log_softmax<D: Dim>(&self, dim: D) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "log_softmax")?;
        execute1(Softmax { dim, log: true }, &[self])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name, idioms, differentiable| OpInfo {
        name,
        idioms,
        differentiable,
        family: "softmax",
    };
    vec![
        f("softmax", Softmax::IDIOMS, true),
        f("log_softmax", Softmax::IDIOMS, true),
        f("softmax_backward", Softmax::BACKWARD_IDIOMS, false),
        f("log_softmax_backward", Softmax::BACKWARD_IDIOMS, false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warp_plans_hold_at_most_32_elements_per_lane() {
        let warp = |it| RowPlan::Warp { vec: true, it };
        assert_eq!(RowPlan::new(DType::F32, 1024, true), warp(8));
        assert_eq!(RowPlan::new(DType::F64, 512, true), warp(8));
        assert_eq!(RowPlan::new(DType::BF16, 1024, true), warp(4));
        assert_eq!(RowPlan::new(DType::F16, 129, true), warp(1));
        assert!(matches!(
            RowPlan::new(DType::F16, 1032, true),
            RowPlan::Block { vec: true, .. }
        ));
        assert_eq!(
            RowPlan::new(DType::F16, 256, false),
            RowPlan::Warp { vec: false, it: 8 }
        );
        let k = row_kernels!("softmax_fwd");
        assert_eq!(
            warp(8).kernel("softmax", DType::F32, &k).ok(),
            Some("softmax_fwd_wv8")
        );
        assert!(warp(8).kernel("softmax", DType::BF16, &k).is_err());
    }

    struct ExpSweep(Vec<f32>);

    impl SimdTask for ExpSweep {
        type Out = Vec<f32>;
        #[inline(always)]
        fn run(self) -> Vec<f32> {
            self.0.iter().map(|&x| x.vexp()).collect()
        }
    }

    #[test]
    fn vexp_is_accurate_on_both_paths() {
        let xs: Vec<f32> = (0..250_000).map(|i| -87.0 + i as f32 * 0.0007).collect();
        let fast = simd_task(ExpSweep(xs.clone()));
        let plain = ExpSweep(xs.clone()).run();
        for (i, &x) in xs.iter().enumerate() {
            let want = (x as f64).exp();
            for got in [fast[i], plain[i]] {
                let rel = ((got as f64 - want) / want).abs();
                assert!(rel < 1.5e-7, "vexp({x}) = {got}, want {want} (rel {rel:e})");
            }
        }
        assert_eq!(0f32.vexp(), 1.0);
        assert_eq!(f32::NEG_INFINITY.vexp(), 0.0);
        assert_eq!((-100f32).vexp(), 0.0);
        assert!(f32::NAN.vexp().is_nan());
    }

    #[test]
    fn vexp_term_equals_vexp_on_its_domain() {
        for i in 0..200_000 {
            let x = -87.3 + i as f32 * (87.3 / 200_000.0);
            assert_eq!(x.vexp_term().to_bits(), x.vexp().to_bits(), "x = {x}");
        }
        assert_eq!(0f32.vexp_term(), 1.0);
        assert!(f32::NEG_INFINITY.vexp_term() < 1.3e-38);
        assert!((-1000f32).vexp_term() < 1.3e-38);
        assert!(f32::NAN.vexp_term().is_nan());
    }

    #[test]
    fn max_row_and_sums() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        assert_eq!(max_row(&v), 6.0);
        assert_eq!(max_row::<f32>(&[]), f32::NEG_INFINITY);
        assert_eq!(sum_map(&v, |x: f32| x), v.iter().sum::<f32>());
        let rows = Rows::new(
            &v[..36],
            &Layout::contiguous([4, 9]).transpose(0, 1).unwrap(),
            0,
        )
        .unwrap();
        assert_eq!((rows.len, rows.rows()), (9, 4));
    }
}
