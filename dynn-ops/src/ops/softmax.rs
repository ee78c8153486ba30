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
//! This file also holds the row machinery (`Rows`, `RowKernel`, `run_rows`, `SimdTask`,
//! `VecExp`) that the other row-wise families (norms, cross-entropy, dropout) reuse.

use crate::cpu::{PAR_MIN, gather_layout};
use crate::float_dispatch;
use crate::math::FastMath;
use crate::registry::OpInfo;
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

/// A unit of kernel work compiled twice: for AVX2+FMA and for the baseline target.
///
/// Implementations mark `run` `#[inline(always)]` (and everything it calls): [`simd_task`]
/// then compiles the whole body inside a `#[target_feature(enable = "avx2,fma")]` function,
/// where the loops vectorize eight f32 lanes wide. (A closure passed to
/// [`crate::math::simd`] is a separate function called from two places, which LLVM may
/// decline to inline into the AVX2 wrapper, leaving it scalar.)
pub(crate) trait SimdTask {
    /// What the task returns.
    type Out;
    /// The work.
    fn run(self) -> Self::Out;
}

/// Runs `task` with AVX-512 or AVX2+FMA code when the CPU has them, else with baseline
/// code. The kernels' lane counts and operation order are fixed in the source, so every path
/// gives the same bits.
#[inline(always)]
pub(crate) fn simd_task<K: SimdTask>(task: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            fn avx512<K: SimdTask>(task: K) -> K::Out {
                task.run()
            }
            // SAFETY: the CPU supports these features, checked just above.
            return unsafe { avx512(task) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx2,fma")]
            fn avx2<K: SimdTask>(task: K) -> K::Out {
                task.run()
            }
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { avx2(task) };
        }
    }
    task.run()
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
}

impl VecExp for f32 {
    /// Range reduction `x = n·ln2 + r`, |r| <= ln2/2 (two-constant Cody–Waite with fused
    /// multiply-adds), a degree-6 minimax polynomial for e^r (relative error 1.9e-9, fitted by
    /// Remez exchange), and 2^n built with integer operations on the rounding constant's bits
    /// (a float-to-int conversion would not vectorize). Within 1 ulp of e^x for
    /// -87.3 <= x <= 88.3; 0 below -87.33, NaN for NaN, saturating at e^88.37 above (the row
    /// kernels only take arguments <= 0). On x86 CPUs without FMA, `mul_add` is a library
    /// call: correct, slower.
    #[inline(always)]
    fn vexp(self) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer.
        let x = self;
        // Comparisons rather than max/min, so NaN passes through.
        let xc = if x < -87.3 { -87.3 } else { x };
        let xc = if xc > 88.37 { 88.37 } else { xc };
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
        let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
        let v = p * scale;
        if x < -87.33 { 0.0 } else { v }
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
        let m = max_row(x);
        let sum = exp_sum(x, m, scratch);
        if self.log {
            // (x - max) - ln Σ: x - max is exact near the max, where (max + ln Σ) would round.
            let ln_sum = sum.ln();
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(T::from_acc((v.to_acc() - m) - ln_sum));
            }
        } else {
            let inv = <T::Acc as AccFloat>::ONE / sum;
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
