//! Comparisons and selection: `eq`, `ne`, `lt`, `le`, `gt`, `ge` with broadcasting (they
//! return U8 masks of 0/1, one byte per element as PyTorch's bool), `where_cond`
//! (differentiable in the two value inputs, backward `where_backward`) and `masked_fill`
//! (differentiable in the input; its backward is `masked_fill` of the gradient with 0).
//!
//! A mask may be any dtype; an element is true when it is nonzero (NaN is nonzero).

use crate::cpu::{PAR_MIN, SimdTask, chunk_len, map_layout, simd_task};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::binary::{
    Source, coalesce, cuda_elementwise_helpers, elementwise_grid, index32, packed_grid,
    packed_sources,
};
use crate::ops::cast::CastOps;
use crate::ops::indexing::by_size;
use crate::ops::reduce::ReduceOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, CpuElement, CpuStorage, DType, DeviceStorage, Element, Error, Idioms,
    InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec,
    execute, execute1,
    half::{bf16, f16},
    smallvec::smallvec,
    vec_from_fill, with_cpu_storage,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Idioms of the comparisons, `where_cond`, `where_backward` and `masked_fill`: one element-wise
/// map, as PyTorch's table gives for "maximum, elu, dropout" `[0,0,0,0,1,0]`.
pub const COMPARE_IDIOMS: Idioms = Idioms::MAP;

/// Which comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// a == b
    Eq,
    /// a != b
    Ne,
    /// a < b
    Lt,
    /// a <= b
    Le,
    /// a > b
    Gt,
    /// a >= b
    Ge,
}

impl CmpOp {
    /// Every comparison.
    pub const ALL: [CmpOp; 6] = [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
    ];

    /// The op name.
    pub fn name(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Ne => "ne",
            CmpOp::Lt => "lt",
            CmpOp::Le => "le",
            CmpOp::Gt => "gt",
            CmpOp::Ge => "ge",
        }
    }

    #[inline(always)]
    fn f<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
        }
    }
}

/// `out[i] = f(m[i], a[i], b[i])` over one chunk, as a [`SimdTask`].
struct Zip3<'a, 'f, M, T, U, F> {
    out: &'a mut [MaybeUninit<U>],
    m: &'a [M],
    a: &'a [T],
    b: &'a [T],
    f: &'f F,
}

impl<M: Copy, T: Copy, U, F: Fn(M, T, T) -> U> SimdTask for Zip3<'_, '_, M, T, U, F> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let f = self.f;
        for (((o, &m), &x), &y) in self.out.iter_mut().zip(self.m).zip(self.a).zip(self.b) {
            o.write(f(m, x, y));
        }
    }
}

/// Applies `f` element-wise to three operands whose layouts are already broadcast to `shape`,
/// returning a contiguous output: one fused pass, parallel over chunks (contiguous inputs) or
/// rows (strided or broadcast inputs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn zip3<M: Copy + Sync, T: Copy + Sync, U: Copy + Send>(
    m: &[M],
    ml: &Layout,
    a: &[T],
    al: &Layout,
    b: &[T],
    bl: &Layout,
    shape: &Shape,
    f: impl Fn(M, T, T) -> U + Sync,
) -> Vec<U> {
    let n = shape.elem_count();
    if let (Some((m0, m1)), Some((a0, a1)), Some((b0, b1))) = (
        ml.contiguous_range(),
        al.contiguous_range(),
        bl.contiguous_range(),
    ) {
        let (m, a, b) = (&m[m0..m1], &a[a0..a1], &b[b0..b1]);
        let f = &f;
        return vec_from_fill(n, |out| {
            if n < PAR_MIN {
                simd_task(Zip3 { out, m, a, b, f });
            } else {
                let c = chunk_len(n);
                out.par_chunks_mut(c)
                    .zip(m.par_chunks(c))
                    .zip(a.par_chunks(c))
                    .zip(b.par_chunks(c))
                    .for_each(|(((out, m), a), b)| simd_task(Zip3 { out, m, a, b, f }));
            }
        });
    }
    let dims = shape.dims();
    let rank = dims.len();
    let inner = dims.last().copied().unwrap_or(1).max(1);
    let last = |l: &Layout| l.strides().last().copied().unwrap_or(0);
    let (ms, as_, bs) = (last(ml), last(al), last(bl));
    let bases = |l: &Layout| -> Vec<usize> {
        Layout::from_parts(
            Shape::new(&dims[..rank.saturating_sub(1)]),
            l.strides()[..rank.saturating_sub(1)].into(),
            l.offset(),
        )
        .indices()
        .collect()
    };
    let (mb, ab, bb) = (bases(ml), bases(al), bases(bl));
    vec_from_fill(n, |out| {
        if n == 0 {
            return;
        }
        let body = |(r, o): (usize, &mut [MaybeUninit<U>])| {
            let (mo, ao, bo) = (mb[r], ab[r], bb[r]);
            for (k, o) in o.iter_mut().enumerate() {
                o.write(f(m[mo + k * ms], a[ao + k * as_], b[bo + k * bs]));
            }
        };
        if n < PAR_MIN {
            out.chunks_mut(inner).enumerate().for_each(body);
        } else {
            out.par_chunks_mut(inner)
                .enumerate()
                .with_min_len((PAR_MIN / 2 / inner).max(1))
                .for_each(body);
        }
    })
}

/// The mask as bytes (nonzero is true) with its layout broadcast to `shape`: a U8 mask as it
/// is, any other dtype converted to contiguous 0/1 bytes first.
pub(crate) fn mask_bytes<'a>(
    op: &'static str,
    arg: &KernelArg<'a>,
    shape: &Shape,
) -> Result<(std::borrow::Cow<'a, [u8]>, Layout)> {
    let storage = arg.cpu(op)?;
    if let CpuStorage::U8(v) = storage {
        return Ok((v.as_slice().into(), arg.layout.broadcast_as(shape)?));
    }
    let bytes = with_cpu_storage!(storage, v => mask_of(v, arg.layout));
    let layout = Layout::contiguous(arg.shape().clone()).broadcast_as(shape)?;
    Ok((bytes.into(), layout))
}

fn mask_of<T: Element>(v: &[T], layout: &Layout) -> Vec<u8> {
    let zero = T::zero();
    map_layout(v, layout, |x| u8::from(x != zero))
}

pub(crate) fn elem_cost(inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
    // One pass: every input read once, the output written once, one operation per element.
    let flops: usize = outputs.iter().map(|s| s.shape.elem_count()).sum();
    Cost::streaming(inputs, outputs, flops as u64)
}

// ----- CUDA -----

/// The CUDA kernels. They move elements without arithmetic, so one module (compiled for the
/// f32 scalar) serves every dtype: comparisons have one entry point per operand dtype
/// (`compare_<dtype>`, 16-bit floats widened to float exactly), selections one per element
/// size (`_1`, `_2`, `_4`, `_8`: values are copied as bits). Comparisons write u8 0/1 masks
/// and selections read u8 masks (nonzero is true); a mask of another dtype goes through
/// `nonzero_<bytes>` first (`u8_mask`). Each comparison and
/// selection also has a `_packed_` twin for operands the packed helpers serve (contiguous,
/// broadcast scalars, broadcast row blocks: see `Source`), moving 16 bytes of values per
/// access; the strided kernels take the rest.
pub const CUDA: CudaSource = CudaSource {
    name: "compare",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
__device__ __forceinline__ float val(h16 v) { return h2f(v); }
__device__ __forceinline__ float val(b16 v) { return b2f(v); }
__device__ __forceinline__ float val(float v) { return v; }
__device__ __forceinline__ double val(double v) { return v; }
__device__ __forceinline__ i64 val(i64 v) { return v; }
__device__ __forceinline__ u32 val(u32 v) { return v; }
__device__ __forceinline__ u32 val(u8 v) { return v; }

// A comparison is a truth table over the four outcomes (bit 0: x < z, 1: x == z, 2: x > z,
// 3: unordered, i.e. a NaN), so every comparison runs the same branch-free code.
template <typename V> __device__ __forceinline__ u8 cmp(u32 truth, V x, V z) {
    u32 outcome = x < z ? 0u : x == z ? 1u : x > z ? 2u : 3u;
    return (u8)((truth >> outcome) & 1u);
}

template <typename I, typename T>
__device__ void cmp_t(u32 truth, const T* __restrict__ a, const Strided& as,
                      const T* __restrict__ b, const Strided& bs, u8* __restrict__ y, I n) {
    MAP(I, i, n, u8, y, cmp(truth, val(a[sat<I>(as, i)]), val(b[sat<I>(bs, i)])));
}

// Packed: 16 bytes of each operand per access (16 / sizeof(T) bytes of output).
template <typename T>
__device__ __forceinline__ void cmp_packed(u32 truth, Src<T> a, Src<T> b, u8* __restrict__ y,
                                           u64 n) {
    packed_map<(int)(16 / sizeof(T))>([=](T x, T z) { return cmp(truth, val(x), val(z)); }, y, n, a, b);
}

#define COMPARE(NAME, T) \
extern "C" __global__ void compare_##NAME(u32 truth, const T* a, Strided as, const T* b, \
                                          Strided bs, u8* y, i64 n, int small) { \
    if (small) cmp_t<u32, T>(truth, a, as, b, bs, y, (u32)n); \
    else cmp_t<u64, T>(truth, a, as, b, bs, y, (u64)n); \
} \
extern "C" __global__ void compare_packed_##NAME(u32 truth, const T* __restrict__ a, i64 ao, \
                                                 i64 ap, const T* __restrict__ b, i64 bo, \
                                                 i64 bp, u8* __restrict__ y, i64 n) { \
    cmp_packed<T>(truth, src(a, ao, ap), src(b, bo, bp), y, (u64)n); \
}
COMPARE(f32, float)
COMPARE(f64, double)
COMPARE(f16, h16)
COMPARE(bf16, b16)
COMPARE(i64, i64)
COMPARE(u32, u32)
COMPARE(u8, u8)

// Masks reach the selections as u8 (comparisons make them); a mask of another dtype is
// first turned into one by `nonzero_<bytes>`: an element is true when its bits outside `keep`'s
// zeros are not all zero (`keep` drops the sign bit of float masks, so -0.0 is false and NaN
// true).
template <typename I, typename T>
__device__ void nonzero_t(const T* __restrict__ x, const Strided& xs, u64 keep, u8* __restrict__ y,
                          I n) {
    MAP(I, i, n, u8, y, (u8)((((u64)x[sat<I>(xs, i)]) & keep) != 0 ? 1 : 0));
}

template <typename T> __device__ __forceinline__ T select_(bool c, T x, T z) { return c ? x : z; }

// Both values are loaded (no branch), then one is selected.
template <typename I, typename T>
__device__ void where_t(const u8* __restrict__ m, const Strided& ms, const T* __restrict__ a,
                        const Strided& as, const T* __restrict__ b, const Strided& bs,
                        T* __restrict__ y, I n) {
    MAP(I, i, n, T, y, select_(m[sat<I>(ms, i)] != 0, a[sat<I>(as, i)], b[sat<I>(bs, i)]));
}

// Two outputs: with 32-bit indices every load of a step first, then the stores.
template <typename I, typename T>
__device__ void where_bw_t(const u8* __restrict__ m, const Strided& ms, const T* __restrict__ g,
                           const Strided& gs, T* __restrict__ yt, T* __restrict__ yf, I n) {
    I step = (I)blockDim.x * gridDim.x, base = (I)blockIdx.x * blockDim.x + threadIdx.x;
    if (sizeof(I) == 4) {
        for (; base + (UNROLL - 1) * step < n; base += UNROLL * step) {
            T v[UNROLL];
            u8 c[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                I i = base + (I)u * step;
                v[u] = g[sat<I>(gs, i)];
                c[u] = m[sat<I>(ms, i)];
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                I i = base + (I)u * step;
                yt[i] = c[u] != 0 ? v[u] : (T)0;
                yf[i] = c[u] != 0 ? (T)0 : v[u];
            }
        }
    }
    for (I i = base; i < n; i += step) {
        T v = g[sat<I>(gs, i)];
        bool c = m[sat<I>(ms, i)] != 0;
        yt[i] = c ? v : (T)0;
        yf[i] = c ? (T)0 : v;
    }
}

template <typename I, typename T>
__device__ void fill_t(const T* __restrict__ x, const Strided& xs, const u8* __restrict__ m,
                       const Strided& ms, T v, T* __restrict__ y, I n) {
    MAP(I, i, n, T, y, select_(m[sat<I>(ms, i)] != 0, v, x[sat<I>(xs, i)]));
}

// The packed selections move 16 bytes of values per access (the u8 mask alongside: 2 to 16
// bytes).
#define SELECT_PACK(T) ((int)(16 / sizeof(T)))

template <typename T>
__device__ __forceinline__ void where_packed(Src<u8> m, Src<T> a, Src<T> b, T* __restrict__ y,
                                             u64 n) {
    packed_map<SELECT_PACK(T)>([](u8 c, T x, T z) { return select_(c != 0, x, z); }, y, n, m,
                               a, b);
}

template <typename T>
__device__ __forceinline__ void fill_packed(Src<T> x, Src<u8> m, T v, T* __restrict__ y, u64 n) {
    packed_map<SELECT_PACK(T)>([=](T a, u8 c) { return select_(c != 0, v, a); }, y, n, x, m);
}

template <typename T>
__device__ __forceinline__ void where_bw_packed(Src<u8> m, Src<T> g, T* __restrict__ yt,
                                                T* __restrict__ yf, u64 n) {
    constexpr int N = SELECT_PACK(T);
    packed_loop<N>(
        n, packs<N>(m) && packs<N>(g) && pack_aligned<N>(yt) && pack_aligned<N>(yf),
        [&](u64 v) {
            Pack<u8, N> c = load_pack<N>(m, v);
            Pack<T, N> x = load_pack<N>(g, v), t, f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                t.v[j] = c.v[j] != 0 ? x.v[j] : (T)0;
                f.v[j] = c.v[j] != 0 ? (T)0 : x.v[j];
            }
            ((Pack<T, N>*)yt)[v] = t;
            ((Pack<T, N>*)yf)[v] = f;
        },
        [&](u64 i) {
            T x = load_one(g, i);
            bool c = load_one(m, i) != 0;
            yt[i] = c ? x : (T)0;
            yf[i] = c ? (T)0 : x;
        });
}

#define SELECT(SIZE, T) \
extern "C" __global__ void nonzero_##SIZE(const T* x, Strided xs, u64 keep, u8* y, i64 n, \
                                          int small) { \
    if (small) nonzero_t<u32, T>(x, xs, keep, y, (u32)n); \
    else nonzero_t<u64, T>(x, xs, keep, y, (u64)n); \
} \
extern "C" __global__ void where_cond_##SIZE(const u8* m, Strided ms, const T* a, Strided as, \
                                             const T* b, Strided bs, T* y, i64 n, int small) { \
    if (small) where_t<u32, T>(m, ms, a, as, b, bs, y, (u32)n); \
    else where_t<u64, T>(m, ms, a, as, b, bs, y, (u64)n); \
} \
extern "C" __global__ void where_backward_##SIZE(const u8* m, Strided ms, const T* g, Strided gs, \
                                                 T* yt, T* yf, i64 n, int small) { \
    if (small) where_bw_t<u32, T>(m, ms, g, gs, yt, yf, (u32)n); \
    else where_bw_t<u64, T>(m, ms, g, gs, yt, yf, (u64)n); \
} \
extern "C" __global__ void masked_fill_##SIZE(const T* x, Strided xs, const u8* m, Strided ms, \
                                              u64 bits, T* y, i64 n, int small) { \
    if (small) fill_t<u32, T>(x, xs, m, ms, (T)bits, y, (u32)n); \
    else fill_t<u64, T>(x, xs, m, ms, (T)bits, y, (u64)n); \
} \
extern "C" __global__ void where_cond_packed_##SIZE(const u8* __restrict__ m, i64 mo, i64 mp, \
                                                    const T* __restrict__ a, i64 ao, i64 ap, \
                                                    const T* __restrict__ b, i64 bo, i64 bp, \
                                                    T* __restrict__ y, i64 n) { \
    where_packed<T>(src(m, mo, mp), src(a, ao, ap), src(b, bo, bp), y, (u64)n); \
} \
extern "C" __global__ void where_backward_packed_##SIZE(const u8* __restrict__ m, i64 mo, \
                                                        i64 mp, const T* __restrict__ g, i64 go, \
                                                        i64 gp, T* __restrict__ yt, \
                                                        T* __restrict__ yf, i64 n) { \
    where_bw_packed<T>(src(m, mo, mp), src(g, go, gp), yt, yf, (u64)n); \
} \
extern "C" __global__ void masked_fill_packed_##SIZE(const T* __restrict__ x, i64 xo, i64 xp, \
                                                     const u8* __restrict__ m, i64 mo, i64 mp, \
                                                     u64 bits, T* __restrict__ y, i64 n) { \
    fill_packed<T>(src(x, xo, xp), src(m, mo, mp), (T)bits, y, (u64)n); \
}
SELECT(1, u8)
SELECT(2, unsigned short)
SELECT(4, u32)
SELECT(8, u64)
"#
    ),
    half: false,
};

/// A mask of any dtype as u8 on the GPU, for the selection kernels: `None` for a U8 mask
/// (used as it is); otherwise a fresh contiguous buffer of 0/1 in the mask's shape (nonzero is
/// true: NaN too, -0.0 not) and its layout.
pub(crate) fn u8_mask(
    op: &'static str,
    m: &KernelArg<'_>,
) -> Result<Option<(CudaStorage, Layout)>> {
    let keep: u64 = match m.dtype() {
        DType::U8 => return Ok(None),
        DType::U32 => u64::MAX,
        DType::F32 => 0x7fff_ffff,
        DType::F64 => 0x7fff_ffff_ffff_ffff,
        DType::F16 | DType::BF16 => 0x7fff,
        DType::I64 => u64::MAX,
    };
    let sm = cuda::storage(op, m)?;
    let dev = sm.dev();
    let n = m.layout.elem_count();
    let mut out = CudaStorage::alloc(dev, DType::U8, n)?;
    if n > 0 {
        let c = coalesce(m.shape(), &[m.layout]);
        let small = index32(n, &[&c[0]]);
        let view = Strided::of(op, &c[0])?;
        let kernel = by_size(
            op,
            m.dtype(),
            ["nonzero_1", "nonzero_2", "nonzero_4", "nonzero_8"],
        )?;
        let f = dev.function(&CUDA, DType::F32, kernel)?;
        let n64 = n as i64;
        crate::cuda_launch!(
            dev,
            op,
            f,
            elementwise_grid(n),
            [sm.slice(), &view, &keep, out.slice_mut(), &n64, &small]
        )?;
    }
    Ok(Some((out, Layout::contiguous(m.shape().clone()))))
}

/// The u8 mask of `m` ([`u8_mask`]'s result, or `m` itself) with its layout.
pub(crate) fn mask_view<'a>(
    op: &'static str,
    m: &KernelArg<'a>,
    converted: &'a Option<(CudaStorage, Layout)>,
) -> Result<(&'a CudaStorage, &'a Layout)> {
    match converted {
        Some((s, l)) => Ok((s, l)),
        None => Ok((cuda::storage(op, m)?, m.layout)),
    }
}

/// A fill value as the bits of one element of `dtype` (converted as `Element::from_f64`).
fn fill_bits(dtype: DType, value: f64) -> u64 {
    match dtype {
        DType::F32 => (value as f32).to_bits() as u64,
        DType::F64 => value.to_bits(),
        DType::F16 => f16::from_f64(value).to_bits() as u64,
        DType::BF16 => bf16::from_f64(value).to_bits() as u64,
        DType::I64 => (value as i64) as u64,
        DType::U32 => (value as u32) as u64,
        DType::U8 => (value as u8) as u64,
    }
}

/// Coalesced views of `layouts` broadcast to `shape`, and the kernels' `small` flag.
pub(crate) fn views(
    op: &'static str,
    shape: &Shape,
    layouts: &[&Layout],
) -> Result<(Vec<Strided>, i32)> {
    let b: Vec<Layout> = layouts
        .iter()
        .map(|l| l.broadcast_as(shape))
        .collect::<Result<_>>()?;
    let refs: Vec<&Layout> = b.iter().collect();
    let c = coalesce(shape, &refs);
    let small = index32(shape.elem_count(), &c.iter().collect::<Vec<_>>());
    let v = c
        .iter()
        .map(|l| Strided::of(op, l))
        .collect::<Result<_>>()?;
    Ok((v, small))
}

/// The packed sources of `layouts` broadcast to `shape`, `pack` elements per access, when a
/// packed kernel serves them all ([`packed_sources`]).
fn packed(shape: &Shape, layouts: &[&Layout], pack: usize) -> Result<Option<Vec<Source>>> {
    let b: Vec<Layout> = layouts
        .iter()
        .map(|l| l.broadcast_as(shape))
        .collect::<Result<_>>()?;
    Ok(packed_sources(&b.iter().collect::<Vec<_>>(), pack))
}

/// Elements per access of the packed selections on `dtype` values (16 bytes of them).
fn select_pack(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

fn cuda_compare(
    k: CmpOp,
    a: &KernelArg<'_>,
    b: &KernelArg<'_>,
    shape: &Shape,
) -> Result<Box<dyn DeviceStorage>> {
    let name = k.name();
    let (sa, sb) = (cuda::storage(name, a)?, cuda::storage(name, b)?);
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op: name,
            expected: a.dtype(),
            got: b.dtype(),
        });
    }
    let dev = sa.dev();
    let n = shape.elem_count();
    let mut out = CudaStorage::alloc(dev, DType::U8, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let names = match a.dtype() {
        DType::F32 => ["compare_f32", "compare_packed_f32"],
        DType::F64 => ["compare_f64", "compare_packed_f64"],
        DType::F16 => ["compare_f16", "compare_packed_f16"],
        DType::BF16 => ["compare_bf16", "compare_packed_bf16"],
        DType::I64 => ["compare_i64", "compare_packed_i64"],
        DType::U32 => ["compare_u32", "compare_packed_u32"],
        DType::U8 => ["compare_u8", "compare_packed_u8"],
    };
    // The comparison's truth table over (less, equal, greater, unordered): bits 0 to 3.
    let truth: u32 = match k {
        CmpOp::Eq => 0b0010,
        CmpOp::Ne => 0b1101,
        CmpOp::Lt => 0b0001,
        CmpOp::Le => 0b0011,
        CmpOp::Gt => 0b0100,
        CmpOp::Ge => 0b0110,
    };
    let n64 = n as i64;
    // 16 bytes of each operand per access (`cmp_packed`).
    let pack = 16 / a.dtype().size_in_bytes();
    if let Some(src) = packed(shape, &[a.layout, b.layout], pack)? {
        let f = dev.function(&CUDA, DType::F32, names[1])?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            packed_grid(n, pack),
            [
                &truth,
                sa.slice(),
                &src[0].offset,
                &src[0].period,
                sb.slice(),
                &src[1].offset,
                &src[1].period,
                out.slice_mut(),
                &n64
            ]
        )?;
        return Ok(Box::new(out));
    }
    let f = dev.function(&CUDA, DType::F32, names[0])?;
    let (v, small) = views(name, shape, &[a.layout, b.layout])?;
    crate::cuda_launch!(
        dev,
        name,
        f,
        elementwise_grid(n),
        [
            &truth,
            sa.slice(),
            &v[0],
            sb.slice(),
            &v[1],
            out.slice_mut(),
            &n64,
            &small
        ]
    )?;
    Ok(Box::new(out))
}

fn cuda_where(
    m: &KernelArg<'_>,
    t: &KernelArg<'_>,
    f: &KernelArg<'_>,
    spec: &TensorSpec,
) -> Result<Box<dyn DeviceStorage>> {
    const NAME: &str = "where_cond";
    let (st, sf) = (cuda::storage(NAME, t)?, cuda::storage(NAME, f)?);
    if t.dtype() != f.dtype() || t.dtype() != spec.dtype {
        return Err(Error::DTypeMismatch {
            op: NAME,
            expected: spec.dtype,
            got: if t.dtype() != spec.dtype {
                t.dtype()
            } else {
                f.dtype()
            },
        });
    }
    let dev = st.dev();
    let n = spec.shape.elem_count();
    let mut out = CudaStorage::alloc(dev, spec.dtype, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let converted = u8_mask(NAME, m)?;
    let (sm, ml) = mask_view(NAME, m, &converted)?;
    let n64 = n as i64;
    let pack = select_pack(spec.dtype);
    if let Some(src) = packed(&spec.shape, &[ml, t.layout, f.layout], pack)? {
        let kernel = by_size(
            NAME,
            spec.dtype,
            [
                "where_cond_packed_1",
                "where_cond_packed_2",
                "where_cond_packed_4",
                "where_cond_packed_8",
            ],
        )?;
        let func = dev.function(&CUDA, DType::F32, kernel)?;
        crate::cuda_launch!(
            dev,
            NAME,
            func,
            packed_grid(n, pack),
            [
                sm.slice(),
                &src[0].offset,
                &src[0].period,
                st.slice(),
                &src[1].offset,
                &src[1].period,
                sf.slice(),
                &src[2].offset,
                &src[2].period,
                out.slice_mut(),
                &n64
            ]
        )?;
        return Ok(Box::new(out));
    }
    let kernel = by_size(
        NAME,
        spec.dtype,
        [
            "where_cond_1",
            "where_cond_2",
            "where_cond_4",
            "where_cond_8",
        ],
    )?;
    let func = dev.function(&CUDA, DType::F32, kernel)?;
    let (v, small) = views(NAME, &spec.shape, &[ml, t.layout, f.layout])?;
    crate::cuda_launch!(
        dev,
        NAME,
        func,
        elementwise_grid(n),
        [
            sm.slice(),
            &v[0],
            st.slice(),
            &v[1],
            sf.slice(),
            &v[2],
            out.slice_mut(),
            &n64,
            &small
        ]
    )?;
    Ok(Box::new(out))
}

fn cuda_where_backward(m: &KernelArg<'_>, g: &KernelArg<'_>, spec: &TensorSpec) -> Result<Outputs> {
    const NAME: &str = "where_backward";
    let sg = cuda::storage(NAME, g)?;
    let dev = sg.dev();
    let n = spec.shape.elem_count();
    let mut yt = CudaStorage::alloc(dev, g.dtype(), n)?;
    let mut yf = CudaStorage::alloc(dev, g.dtype(), n)?;
    if n == 0 {
        return Ok(smallvec![
            Box::new(yt) as Box<dyn DeviceStorage>,
            Box::new(yf) as Box<dyn DeviceStorage>
        ]);
    }
    let converted = u8_mask(NAME, m)?;
    let (sm, ml) = mask_view(NAME, m, &converted)?;
    let n64 = n as i64;
    let pack = select_pack(g.dtype());
    if let Some(src) = packed(&spec.shape, &[ml, g.layout], pack)? {
        let kernel = by_size(
            NAME,
            g.dtype(),
            [
                "where_backward_packed_1",
                "where_backward_packed_2",
                "where_backward_packed_4",
                "where_backward_packed_8",
            ],
        )?;
        let func = dev.function(&CUDA, DType::F32, kernel)?;
        crate::cuda_launch!(
            dev,
            NAME,
            func,
            packed_grid(n, pack),
            [
                sm.slice(),
                &src[0].offset,
                &src[0].period,
                sg.slice(),
                &src[1].offset,
                &src[1].period,
                yt.slice_mut(),
                yf.slice_mut(),
                &n64
            ]
        )?;
    } else {
        let kernel = by_size(
            NAME,
            g.dtype(),
            [
                "where_backward_1",
                "where_backward_2",
                "where_backward_4",
                "where_backward_8",
            ],
        )?;
        let func = dev.function(&CUDA, DType::F32, kernel)?;
        let (v, small) = views(NAME, &spec.shape, &[ml, g.layout])?;
        crate::cuda_launch!(
            dev,
            NAME,
            func,
            elementwise_grid(n),
            [
                sm.slice(),
                &v[0],
                sg.slice(),
                &v[1],
                yt.slice_mut(),
                yf.slice_mut(),
                &n64,
                &small
            ]
        )?;
    }
    Ok(smallvec![
        Box::new(yt) as Box<dyn DeviceStorage>,
        Box::new(yf) as Box<dyn DeviceStorage>
    ])
}

fn cuda_masked_fill(
    x: &KernelArg<'_>,
    m: &KernelArg<'_>,
    value: f64,
    spec: &TensorSpec,
) -> Result<Box<dyn DeviceStorage>> {
    const NAME: &str = "masked_fill";
    let sx = cuda::storage(NAME, x)?;
    let dev = sx.dev();
    let n = spec.shape.elem_count();
    let mut out = CudaStorage::alloc(dev, x.dtype(), n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let converted = u8_mask(NAME, m)?;
    let (sm, ml) = mask_view(NAME, m, &converted)?;
    let (bits, n64) = (fill_bits(x.dtype(), value), n as i64);
    let pack = select_pack(x.dtype());
    if let Some(src) = packed(&spec.shape, &[x.layout, ml], pack)? {
        let kernel = by_size(
            NAME,
            x.dtype(),
            [
                "masked_fill_packed_1",
                "masked_fill_packed_2",
                "masked_fill_packed_4",
                "masked_fill_packed_8",
            ],
        )?;
        let func = dev.function(&CUDA, DType::F32, kernel)?;
        crate::cuda_launch!(
            dev,
            NAME,
            func,
            packed_grid(n, pack),
            [
                sx.slice(),
                &src[0].offset,
                &src[0].period,
                sm.slice(),
                &src[1].offset,
                &src[1].period,
                &bits,
                out.slice_mut(),
                &n64
            ]
        )?;
        return Ok(Box::new(out));
    }
    let kernel = by_size(
        NAME,
        x.dtype(),
        [
            "masked_fill_1",
            "masked_fill_2",
            "masked_fill_4",
            "masked_fill_8",
        ],
    )?;
    let func = dev.function(&CUDA, DType::F32, kernel)?;
    let (v, small) = views(NAME, &spec.shape, &[x.layout, ml])?;
    crate::cuda_launch!(
        dev,
        NAME,
        func,
        elementwise_grid(n),
        [
            sx.slice(),
            &v[0],
            sm.slice(),
            &v[1],
            &bits,
            out.slice_mut(),
            &n64,
            &small
        ]
    )?;
    Ok(Box::new(out))
}

// ----- comparisons -----

fn compare_kernel<T: Element>(
    k: CmpOp,
    l: &[T],
    la: &KernelArg<'_>,
    r: &[T],
    ra: &KernelArg<'_>,
    shape: &Shape,
) -> Result<Vec<u8>> {
    let (ll, rl) = (
        la.layout.broadcast_as(shape)?,
        ra.layout.broadcast_as(shape)?,
    );
    // `zip3` with the left operand as its "mask" slot keeps one generic element loop.
    Ok(match k {
        CmpOp::Eq => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u8::from(CmpOp::Eq.f(a, b))
        }),
        CmpOp::Ne => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u8::from(CmpOp::Ne.f(a, b))
        }),
        CmpOp::Lt => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u8::from(CmpOp::Lt.f(a, b))
        }),
        CmpOp::Le => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u8::from(CmpOp::Le.f(a, b))
        }),
        CmpOp::Gt => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u8::from(CmpOp::Gt.f(a, b))
        }),
        CmpOp::Ge => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u8::from(CmpOp::Ge.f(a, b))
        }),
    })
}

impl Op for CmpOp {
    fn name(&self) -> &'static str {
        CmpOp::name(*self)
    }
    fn idioms(&self) -> Idioms {
        COMPARE_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (a, b) = (inputs[0], inputs[1]);
        if a.dtype() != b.dtype() {
            return Err(Error::DTypeMismatch {
                op: self.name(),
                expected: a.dtype(),
                got: b.dtype(),
            });
        }
        let shape = a.shape().broadcast_with(b.shape(), self.name())?;
        Ok(smallvec![TensorSpec::new(shape, DType::U8)])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        elem_cost(inputs, outputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let (a, b) = (inputs[0], inputs[1]);
        let shape = &specs[0].shape;
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_compare(*self, &a, &b, shape)?]);
        }
        let out = match (a.cpu(name)?, b.cpu(name)?) {
            (CpuStorage::F32(l), CpuStorage::F32(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::F64(l), CpuStorage::F64(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::F16(l), CpuStorage::F16(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::BF16(l), CpuStorage::BF16(r)) => {
                compare_kernel(*self, l, &a, r, &b, shape)?
            }
            (CpuStorage::I64(l), CpuStorage::I64(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::U32(l), CpuStorage::U32(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::U8(l), CpuStorage::U8(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (l, r) => {
                return Err(Error::DTypeMismatch {
                    op: name,
                    expected: l.dtype(),
                    got: r.dtype(),
                });
            }
        };
        Ok(crate::cpu::one(CpuStorage::U8(out)))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

// ----- where_cond -----

/// `mask ? on_true : on_false` element-wise with broadcasting: inputs `(mask, on_true, on_false)`.
#[derive(Debug, Clone, Copy)]
pub struct WhereCond;

fn select<T: CpuElement>(
    mask: &[u8],
    ml: &Layout,
    t: &KernelArg<'_>,
    f: &KernelArg<'_>,
    shape: &Shape,
    op: &'static str,
) -> Result<Vec<T>> {
    let (tv, fv) = (t.cpu(op)?.as_slice::<T>(op)?, f.cpu(op)?.as_slice::<T>(op)?);
    let (tl, fl) = (t.layout.broadcast_as(shape)?, f.layout.broadcast_as(shape)?);
    Ok(zip3(mask, ml, tv, &tl, fv, &fl, shape, |m, a, b| {
        if m != 0 { a } else { b }
    }))
}

impl Op for WhereCond {
    fn name(&self) -> &'static str {
        "where_cond"
    }
    fn idioms(&self) -> Idioms {
        COMPARE_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (m, t, f) = (inputs[0], inputs[1], inputs[2]);
        if t.dtype() != f.dtype() {
            return Err(Error::DTypeMismatch {
                op: "where_cond",
                expected: t.dtype(),
                got: f.dtype(),
            });
        }
        let shape = m
            .shape()
            .broadcast_with(t.shape(), "where_cond")?
            .broadcast_with(f.shape(), "where_cond")?;
        Ok(smallvec![TensorSpec::new(shape, t.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        elem_cost(inputs, outputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let (m, t, f) = (inputs[0], inputs[1], inputs[2]);
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_where(&m, &t, &f, &specs[0])?]);
        }
        let shape = &specs[0].shape;
        let (mask, ml) = mask_bytes("where_cond", &m, shape)?;
        let out: CpuStorage = match specs[0].dtype {
            DType::F32 => CpuStorage::F32(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::F64 => CpuStorage::F64(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::F16 => CpuStorage::F16(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::BF16 => CpuStorage::BF16(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::I64 => CpuStorage::I64(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::U32 => CpuStorage::U32(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::U8 => CpuStorage::U8(select(&mask, &ml, &t, &f, shape, "where_cond")?),
        };
        Ok(crate::cpu::one(out))
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0b001,
            outputs: 0,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        if !ctx.needs(1) && !ctx.needs(2) {
            return Ok(smallvec![None, None, None]);
        }
        let g = ctx.grad(0)?;
        let mut outs = execute(WhereBackward, &[ctx.input(0)?, g])?.into_iter();
        let (gt, gf) = (outs.next(), outs.next());
        let reduce = |g: Option<Tensor>, i: usize| -> Result<Option<Tensor>> {
            match g {
                Some(g) if ctx.needs(i) => Ok(Some(g.sum_to(&ctx.input_specs[i].shape)?)),
                _ => Ok(None),
            }
        };
        Ok(smallvec![None, reduce(gt, 1)?, reduce(gf, 2)?])
    }
}

/// Backward of `where_cond`: inputs `(mask, grad)`, outputs `(mask ? grad : 0, mask ? 0 : grad)`
/// in the gradient's shape.
#[derive(Debug, Clone, Copy)]
pub struct WhereBackward;

fn split_grad<T: CpuElement>(
    mask: &[u8],
    ml: &Layout,
    g: &[T],
    gl: &Layout,
    shape: &Shape,
) -> (CpuStorage, CpuStorage) {
    let z = T::zero();
    let t = zip3(
        mask,
        ml,
        g,
        gl,
        g,
        gl,
        shape,
        |m, x, _| if m != 0 { x } else { z },
    );
    let f = zip3(
        mask,
        ml,
        g,
        gl,
        g,
        gl,
        shape,
        |m, x, _| if m != 0 { z } else { x },
    );
    (T::wrap(t), T::wrap(f))
}

impl Op for WhereBackward {
    fn name(&self) -> &'static str {
        "where_backward"
    }
    fn idioms(&self) -> Idioms {
        COMPARE_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (m, g) = (inputs[0], inputs[1]);
        if m.shape().broadcast_with(g.shape(), "where_backward")? != *g.shape() {
            return Err(Error::shape_mismatch(
                "where_backward",
                m.shape(),
                g.shape(),
            ));
        }
        let s = TensorSpec::new(g.shape().clone(), g.dtype());
        Ok(smallvec![s.clone(), s])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        elem_cost(inputs, outputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let (m, g) = (inputs[0], inputs[1]);
        if cuda::on_cuda(inputs) {
            return cuda_where_backward(&m, &g, &specs[0]);
        }
        let shape = &specs[0].shape;
        let (mask, ml) = mask_bytes("where_backward", &m, shape)?;
        let (t, f) = with_cpu_storage!(g.cpu("where_backward")?, v => split_grad(&mask, &ml, v, g.layout, shape));
        Ok(smallvec![
            Box::new(t) as Box<dyn dynn_core::DeviceStorage>,
            Box::new(f) as Box<dyn dynn_core::DeviceStorage>
        ])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

// ----- masked_fill -----

/// `x` with `value` where `mask` (broadcast to `x`'s shape) is nonzero: inputs `(x, mask)`.
#[derive(Debug, Clone, Copy)]
pub struct MaskedFill {
    /// The fill value (converted to `x`'s dtype).
    pub value: f64,
}

fn fill<T: CpuElement>(
    mask: &[u8],
    ml: &Layout,
    x: &[T],
    xl: &Layout,
    shape: &Shape,
    value: f64,
) -> CpuStorage {
    let v = T::from_f64(value);
    T::wrap(zip3(mask, ml, x, xl, x, xl, shape, |m, a, _| {
        if m != 0 { v } else { a }
    }))
}

impl Op for MaskedFill {
    fn name(&self) -> &'static str {
        "masked_fill"
    }
    fn idioms(&self) -> Idioms {
        COMPARE_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (x, m) = (inputs[0], inputs[1]);
        if x.shape().broadcast_with(m.shape(), "masked_fill")? != *x.shape() {
            return Err(Error::invalid(
                "masked_fill",
                format!(
                    "mask of shape {} does not broadcast to the input's shape {}",
                    m.shape(),
                    x.shape()
                ),
            ));
        }
        Ok(smallvec![TensorSpec::new(x.shape().clone(), x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        elem_cost(inputs, outputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let (x, m) = (inputs[0], inputs[1]);
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_masked_fill(&x, &m, self.value, &specs[0])?]);
        }
        let shape = &specs[0].shape;
        let (mask, ml) = mask_bytes("masked_fill", &m, shape)?;
        let out = with_cpu_storage!(x.cpu("masked_fill")?, v => fill(&mask, &ml, v, x.layout, shape, self.value));
        Ok(crate::cpu::one(out))
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0b10,
            outputs: 0,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        if !ctx.needs(0) {
            return Ok(smallvec![None, None]);
        }
        let gx = execute1(MaskedFill { value: 0.0 }, &[ctx.grad(0)?, ctx.input(1)?])?;
        Ok(smallvec![Some(gx), None])
    }
}

// ----- the tensor methods -----

/// Comparisons (returning U8 0/1 masks) and mask-driven selection.
pub trait CompareOps {
    /// Compares element-wise with broadcasting; both operands share a dtype. Returns a U8
    /// mask of 0/1. Not differentiable.
    fn compare(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor>;
    /// Compares every element with the scalar `value`: converted to this tensor's dtype, except
    /// that an integer tensor is compared in f64 when `value` is not one of its values
    /// (`x < 2.5` or `x < 256` on U8), so the answer is the mathematical one, as PyTorch's type
    /// promotion gives.
    fn compare_scalar(&self, value: f64, op: CmpOp) -> Result<Tensor>;
    /// `self == rhs` as a U8 mask.
    fn eq(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Eq)
    }
    /// `self != rhs` as a U8 mask.
    fn ne(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Ne)
    }
    /// `self < rhs` as a U8 mask.
    fn lt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Lt)
    }
    /// `self <= rhs` as a U8 mask.
    fn le(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Le)
    }
    /// `self > rhs` as a U8 mask.
    fn gt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Gt)
    }
    /// `self >= rhs` as a U8 mask.
    fn ge(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Ge)
    }
    /// With `self` as the mask (any dtype; nonzero is true): `on_true` where set, else
    /// `on_false`, all three broadcast together. Differentiable in `on_true` and `on_false`.
    fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor>;
    /// `self` with `value` where `mask` (broadcast to `self`'s shape; nonzero is true) is set.
    /// Differentiable in `self` (the gradient is zero at filled positions).
    fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor>;
}

impl CompareOps for Tensor {
    fn compare(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        execute1(op, &[self, rhs])
    }
    fn compare_scalar(&self, value: f64, op: CmpOp) -> Result<Tensor> {
        let dtype = self.dtype();
        if dtype.is_float() || holds(dtype, value) {
            let s = Tensor::full(value, Shape::scalar(), dtype, self.device())?;
            return execute1(op, &[self, &s]);
        }
        let s = Tensor::full(value, Shape::scalar(), DType::F64, self.device())?;
        execute1(op, &[&self.to_dtype(DType::F64)?, &s])
    }
    fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        execute1(WhereCond, &[self, on_true, on_false])
    }
    fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        execute1(MaskedFill { value }, &[self, mask])
    }
}

/// True when `value` is exactly one of the values of the integer dtype `dtype`.
fn holds(dtype: DType, value: f64) -> bool {
    match dtype {
        DType::U8 => value as u8 as f64 == value,
        DType::U32 => value as u32 as f64 == value,
        // 2^63 saturates to i64::MAX, whose f64 is 2^63 again: excluded by the bound.
        DType::I64 => value as i64 as f64 == value && value.abs() < 9.223_372_036_854_776e18,
        _ => true,
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name, differentiable| OpInfo {
        name,
        idioms: COMPARE_IDIOMS,
        differentiable,
        family: "compare",
    };
    let mut v: Vec<OpInfo> = CmpOp::ALL.iter().map(|k| f(k.name(), false)).collect();
    v.extend([
        f("where_cond", true),
        f("where_backward", false),
        f("masked_fill", true),
    ]);
    v
}
