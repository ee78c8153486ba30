//! Element-wise binary ops with numpy broadcasting: add, sub, mul, div, pow, maximum, minimum.
//! Backward reduces each gradient back to its input's shape (`sum_to`).

use crate::cpu::zip_layouts;
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::reduce::ReduceOps;
use crate::ops::unary::UnaryOps;
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, CpuElement, CpuStorage, DeviceStorage, Error, FloatElement, Idioms,
    InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec,
    execute1, smallvec::smallvec,
};

/// Which binary function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b
    Div,
    /// a ^ b
    Pow,
    /// max(a, b) (gradient to `a` on ties)
    Maximum,
    /// min(a, b) (gradient to `a` on ties)
    Minimum,
}

impl Binary {
    /// Every kind.
    pub const ALL: [Binary; 7] = [
        Binary::Add,
        Binary::Sub,
        Binary::Mul,
        Binary::Div,
        Binary::Pow,
        Binary::Maximum,
        Binary::Minimum,
    ];

    /// The op name.
    pub fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Pow => "pow",
            Binary::Maximum => "maximum",
            Binary::Minimum => "minimum",
        }
    }

    /// Idioms: one element-wise map (`maximum` in PyTorch's table: `[0,0,0,0,1,0]`).
    pub const IDIOMS: Idioms = Idioms::MAP;

    /// The kind's number in the CUDA kernels (`bop<K>`).
    fn cuda_kind(self) -> i32 {
        match self {
            Binary::Add => 0,
            Binary::Sub => 1,
            Binary::Mul => 2,
            Binary::Div => 3,
            Binary::Pow => 4,
            Binary::Maximum => 5,
            Binary::Minimum => 6,
        }
    }

    #[inline(always)]
    fn f<A: AccFloat>(self, a: A, b: A) -> A {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
            Binary::Pow => a.powf(b),
            Binary::Maximum => {
                if a >= b {
                    a
                } else {
                    b
                }
            }
            Binary::Minimum => {
                if a <= b {
                    a
                } else {
                    b
                }
            }
        }
    }
}

/// CUDA helpers shared by the element-wise families (binary, compare, views, update, optim,
/// cast), as a string literal for `concat!`: `sat(view, i)` is the element offset of logical
/// index `i` in 32-bit (`u32`, when every extent fits) or 64-bit (`u64`) index math, with
/// the dims loop unrolled so the descriptor is read straight from the kernel parameters
/// (no local-memory copy) and the outermost dim needing no division; `MAP` is a grid-stride
/// loop over such indices writing `y[i]`, [`UNROLL`] elements per thread and step with their
/// loads in flight together (launch with [`elementwise_grid`]). The packed fast path:
/// `packed_map<N>(f, y, n, src...)` computes `y[i] = f(src[i]...)` over operands described by
/// `Src` (contiguous, a broadcast scalar, or periodic: see [`Source`]) moving `N` elements per
/// access (`Pack<T, N>`, 16 bytes for the widest operand) with one pack per thread and step
/// (launch with [`packed_grid`]); `packed_loop` is its skeleton for kernels with other shapes.
macro_rules! cuda_elementwise_helpers {
    () => {
        r#"
typedef unsigned long long u64;
template <typename I> __device__ __forceinline__ I sat(const Strided& s, I i) {
    if (s.contiguous) return (I)s.offset + i;
    I off = (I)s.offset;
#pragma unroll
    for (int d = DYNN_MAX_RANK - 1; d > 0; --d) {
        if (d < s.rank) {
            I n = (I)s.dims[d];
            I q = i / n;
            off += (i - q * n) * (I)s.strides[d];
            i = q;
        }
    }
    return off + i * (I)s.strides[0];
}
#define UNROLL 4
// `y[i] = (expression of i)` for every i < n, grid-stride. With 32-bit indices each thread
// computes UNROLL values before storing any, so their loads are in flight together (a store in
// between would hold later loads behind it); the rest, and 64-bit indices, go one at a time.
#define MAP(I, i, n, T, y, ...) { \
    I s_ = (I)blockDim.x * gridDim.x, b_ = (I)blockIdx.x * blockDim.x + threadIdx.x; \
    if (sizeof(I) == 4) { \
        for (; b_ + (UNROLL - 1) * s_ < (n); b_ += UNROLL * s_) { \
            T v_[UNROLL]; \
            _Pragma("unroll") for (int u_ = 0; u_ < UNROLL; ++u_) { \
                I i = b_ + (I)u_ * s_; \
                v_[u_] = (__VA_ARGS__); \
            } \
            _Pragma("unroll") for (int u_ = 0; u_ < UNROLL; ++u_) (y)[b_ + (I)u_ * s_] = v_[u_]; \
        } \
    } \
    for (I i = b_; i < (n); i += s_) (y)[i] = (__VA_ARGS__); \
}

// ---- The packed fast path (host side: `Source`, `packed_sources`, `packed_grid`) ----
// N elements of T moved as one access (a 32-byte pack goes as two 16-byte ones).
template <typename T, int N> struct __align__(sizeof(T) * N) Pack { T v[N]; };

// a % b in 32-bit math when both fit (uniform across a warp in practice), else 64-bit.
__device__ __forceinline__ u64 umod(u64 a, u64 b) {
    return ((a | b) >> 32) == 0 ? (u64)((u32)a % (u32)b) : a % b;
}

// An operand of a packed kernel: output element i reads p[i] when period is 0 (contiguous),
// else p[i % period]: period 1 is a broadcast scalar, a larger one an operand whose trailing
// dims are contiguous and which is broadcast along the leading ones (a bias row).
template <typename T> struct Src {
    const T* p;
    u64 period;
};
template <typename T> __device__ __forceinline__ Src<T> src(const T* p, i64 offset, i64 period) {
    return Src<T>{p + offset, (u64)period};
}

// True when pack v of N elements of s is one aligned pack of p (or the broadcast scalar).
template <int N, typename T> __device__ __forceinline__ bool packs(const Src<T>& s) {
    return s.period == 1 || ((size_t)s.p % (sizeof(T) * N) == 0 && s.period % N == 0);
}
template <int N, typename T> __device__ __forceinline__ bool pack_aligned(const T* y) {
    return (size_t)y % (sizeof(T) * N) == 0;
}
template <int N, typename T> __device__ __forceinline__ Pack<T, N> load_pack(const Src<T>& s, u64 v) {
    if (s.period == 1) {
        Pack<T, N> r;
        T x = s.p[0];
#pragma unroll
        for (int j = 0; j < N; ++j) r.v[j] = x;
        return r;
    }
    return ((const Pack<T, N>*)s.p)[s.period == 0 ? v : umod(v, s.period / N)];
}
template <typename T> __device__ __forceinline__ T load_one(const Src<T>& s, u64 i) {
    return s.p[s.period == 0 ? i : umod(i, s.period)];
}

// The grid-stride skeleton of the packed kernels: pack(v) for every whole pack v of N elements
// when `packed` (one pack per thread and step: launch with `packed_grid`), then one(i) for the
// elements left (all of them when not `packed`).
template <int N, typename P, typename O>
__device__ __forceinline__ void packed_loop(u64 n, bool packed, P pack, O one) {
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x, step = (u64)blockDim.x * gridDim.x;
    u64 done = 0;
    if (packed) {
        u64 nv = n / N;
        for (u64 v = t; v < nv; v += step) pack(v);
        done = nv * N;
    }
    for (u64 i = done + t; i < n; i += step) one(i);
}

template <int N, typename T, typename F, typename... X>
__device__ __forceinline__ Pack<T, N> apply_pack(F f, const Pack<X, N>&... x) {
    Pack<T, N> r;
#pragma unroll
    for (int j = 0; j < N; ++j) r.v[j] = f(x.v[j]...);
    return r;
}

// y[i] = f(x[i]...) for i < n over the sources x (see Src), N elements per access when y and
// every source allow it: the loads of a pack are all issued before its stores.
template <int N, typename T, typename F, typename... X>
__device__ __forceinline__ void packed_map(F f, T* __restrict__ y, u64 n, Src<X>... x) {
    packed_loop<N>(
        n, pack_aligned<N>(y) && (packs<N>(x) && ...),
        [&](u64 v) { ((Pack<T, N>*)y)[v] = apply_pack<N, T>(f, load_pack<N>(x, v)...); },
        [&](u64 i) { y[i] = f(load_one(x, i)...); });
}
"#
    };
}
pub(crate) use cuda_elementwise_helpers;

/// Elements each thread takes per grid-stride step in `MAP` loops (`UNROLL` there).
pub(crate) const UNROLL: usize = 4;

/// The launch shape of a `MAP` kernel over `n` elements.
pub(crate) fn elementwise_grid(n: usize) -> cudarc::driver::LaunchConfig {
    cuda::grid(n.div_ceil(UNROLL))
}

/// How a packed kernel reads an operand already broadcast to the output's shape (`Src` in the
/// CUDA helpers): output element `i` reads element `offset + i` when `period` is 0 (contiguous)
/// and `offset + i % period` otherwise: period 1 is a broadcast scalar, a larger period an
/// operand whose trailing dims are contiguous and which is broadcast along its leading dims
/// (a bias row, a mask shared by every batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Source {
    /// The element offset of the operand's first element.
    pub offset: i64,
    /// 0 (contiguous), or the period of the index.
    pub period: i64,
}

impl Source {
    /// The source reading `layout` (broadcast to the output's shape), if it is one of the
    /// patterns above.
    pub(crate) fn of(layout: &Layout) -> Option<Source> {
        // The trailing dims that step through memory row-major (size-1 dims aside) make the
        // period; every dim outside them must be broadcast (stride 0).
        let mut period = 1;
        let mut trailing = true;
        for (&d, &s) in layout.dims().iter().zip(layout.strides()).rev() {
            if d == 1 {
                continue;
            }
            if trailing && s == period {
                period *= d;
            } else if s == 0 {
                trailing = false;
            } else {
                return None;
            }
        }
        let contiguous = period == layout.elem_count();
        Some(Source {
            offset: layout.offset() as i64,
            period: if contiguous { 0 } else { period as i64 },
        })
    }

    /// True when the output's packs of `pack` elements read whole aligned packs of this
    /// source (device buffers start aligned to far more than 16 bytes) or its scalar.
    fn packs(self, pack: usize) -> bool {
        let pack = pack as i64;
        self.period == 1 || (self.offset % pack == 0 && self.period % pack == 0)
    }
}

/// The sources of `layouts` (each broadcast to the output's shape) when a packed kernel moving
/// `pack` elements per access serves them all, else `None` (use the strided kernel).
pub(crate) fn packed_sources(layouts: &[&Layout], pack: usize) -> Option<Vec<Source>> {
    layouts
        .iter()
        .map(|l| Source::of(l).filter(|s| s.packs(pack)))
        .collect()
}

/// The launch shape of a packed kernel over `n` elements, `pack` per access: one pack per
/// thread (grid-stride beyond the block cap).
pub(crate) fn packed_grid(n: usize, pack: usize) -> cudarc::driver::LaunchConfig {
    cuda::grid(n.div_ceil(pack))
}

/// `layouts` (each already broadcast to `shape`) with size-1 dims dropped and adjacent dims
/// merged wherever every layout steps through them as one dim, so kernels divide by as few
/// dims as possible. Index `i` of the result is index `i` of `shape` in row-major order.
pub(crate) fn coalesce(shape: &Shape, layouts: &[&Layout]) -> Vec<Layout> {
    let dims = shape.dims();
    let mut merged: Vec<usize> = Vec::with_capacity(dims.len());
    let mut strides: Vec<Vec<usize>> = vec![Vec::with_capacity(dims.len()); layouts.len()];
    for d in (0..dims.len()).rev() {
        let n = dims[d];
        if n == 1 {
            continue;
        }
        let fuse = match merged.last() {
            Some(&m) => layouts
                .iter()
                .zip(&strides)
                .all(|(l, s)| s.last().is_some_and(|&inner| l.strides()[d] == inner * m)),
            None => false,
        };
        match merged.last_mut() {
            Some(m) if fuse => *m *= n,
            _ => {
                merged.push(n);
                for (l, s) in layouts.iter().zip(strides.iter_mut()) {
                    s.push(l.strides()[d]);
                }
            }
        }
    }
    merged.reverse();
    let shape = Shape::new(&merged);
    layouts
        .iter()
        .zip(strides)
        .map(|(l, mut s)| {
            s.reverse();
            Layout::from_parts(shape.clone(), s.as_slice().into(), l.offset())
        })
        .collect()
}

/// 1 when `n` indices and every layout's extent fit 32-bit index math (with room for the
/// grid-stride step), else 0: the `small` argument of the element-wise kernels.
pub(crate) fn index32(n: usize, layouts: &[&Layout]) -> i32 {
    const LIMIT: usize = i32::MAX as usize;
    (n <= LIMIT && layouts.iter().all(|l| l.max_extent() <= LIMIT)) as i32
}

/// The CUDA kernels: `binary_packed` (each operand contiguous, a broadcast scalar or a
/// broadcast row block, see `Source`: 16-byte packs per access, the kind a template
/// parameter) and `binary_strided` (any layouts, broadcast included, dims coalesced on the
/// host). `kind` numbers the op as `Binary::cuda_kind`; 7 and 8 are the `maximum_mask` /
/// `minimum_mask` selections.
pub const CUDA: CudaSource = CudaSource {
    name: "binary",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
template <int K> __device__ __forceinline__ acc bop(acc a, acc b) {
    if (K == 0) return a + b;
    if (K == 1) return a - b;
    if (K == 2) return a * b;
    if (K == 3) return a / b;
    if (K == 4) return pow(a, b);
    if (K == 5) return a >= b ? a : b;
    if (K == 6) return a <= b ? a : b;
    if (K == 7) return a >= b ? (acc)1 : (acc)0;
    return a <= b ? (acc)1 : (acc)0;
}

#define VEC (16 / (int)sizeof(scalar))

template <int K>
__device__ __forceinline__ void bin_packed(Src<scalar> a, Src<scalar> b, scalar* __restrict__ y,
                                          u64 n) {
    packed_map<VEC>([](scalar x, scalar z) { return st(bop<K>(ld(x), ld(z))); }, y, n, a, b);
}

// The strided kernel takes the kind at run time (one instantiation per index width): its loads
// come first for UNROLL elements, then the uniform switch and the stores.
__device__ __forceinline__ acc bop_rt(int kind, acc a, acc b) {
    switch (kind) {
    case 0: return bop<0>(a, b);
    case 1: return bop<1>(a, b);
    case 2: return bop<2>(a, b);
    case 3: return bop<3>(a, b);
    case 4: return bop<4>(a, b);
    case 5: return bop<5>(a, b);
    case 6: return bop<6>(a, b);
    case 7: return bop<7>(a, b);
    default: return bop<8>(a, b);
    }
}

template <typename I>
__device__ void bin_strided(int kind, const scalar* __restrict__ a, const Strided& as,
                            const scalar* __restrict__ b, const Strided& bs,
                            scalar* __restrict__ y, I n) {
    I step = (I)blockDim.x * gridDim.x, base = (I)blockIdx.x * blockDim.x + threadIdx.x;
    if (sizeof(I) == 4) {
        for (; base + (UNROLL - 1) * step < n; base += UNROLL * step) {
            scalar x[UNROLL], z[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                I i = base + (I)u * step;
                x[u] = a[sat<I>(as, i)];
                z[u] = b[sat<I>(bs, i)];
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
                y[base + (I)u * step] = st(bop_rt(kind, ld(x[u]), ld(z[u])));
        }
    }
    for (I i = base; i < n; i += step)
        y[i] = st(bop_rt(kind, ld(a[sat<I>(as, i)]), ld(b[sat<I>(bs, i)])));
}

extern "C" __global__ void binary_packed(int kind, const scalar* __restrict__ a, i64 ao, i64 ap,
                                         const scalar* __restrict__ b, i64 bo, i64 bp,
                                         scalar* __restrict__ y, i64 n) {
    Src<scalar> sa = src(a, ao, ap), sb = src(b, bo, bp);
    switch (kind) {
    case 0: bin_packed<0>(sa, sb, y, n); break;
    case 1: bin_packed<1>(sa, sb, y, n); break;
    case 2: bin_packed<2>(sa, sb, y, n); break;
    case 3: bin_packed<3>(sa, sb, y, n); break;
    case 4: bin_packed<4>(sa, sb, y, n); break;
    case 5: bin_packed<5>(sa, sb, y, n); break;
    case 6: bin_packed<6>(sa, sb, y, n); break;
    case 7: bin_packed<7>(sa, sb, y, n); break;
    default: bin_packed<8>(sa, sb, y, n); break;
    }
}

extern "C" __global__ void binary_strided(int kind, const scalar* a, Strided as, const scalar* b,
                                          Strided bs, scalar* y, i64 n, int small) {
    if (small) bin_strided<u32>(kind, a, as, b, bs, y, (u32)n);
    else bin_strided<u64>(kind, a, as, b, bs, y, (u64)n);
}
"#
    ),
    half: true,
};

/// Runs binary kernel `kind` (see [`CUDA`]) on GPU operands broadcast to `shape`.
fn cuda_binary(
    name: &'static str,
    kind: i32,
    a: &KernelArg<'_>,
    b: &KernelArg<'_>,
    shape: &Shape,
) -> Result<Box<dyn DeviceStorage>> {
    let (sa, sb) = (cuda::storage(name, a)?, cuda::storage(name, b)?);
    let dtype = a.dtype();
    if b.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            op: name,
            expected: dtype,
            got: b.dtype(),
        });
    }
    let dev = sa.dev();
    let n = shape.elem_count();
    let mut out = CudaStorage::alloc(dev, dtype, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let (la, lb) = (a.layout.broadcast_as(shape)?, b.layout.broadcast_as(shape)?);
    let n64 = n as i64;
    if let Some(src) = packed_sources(&[&la, &lb], 16 / dtype.size_in_bytes()) {
        let f = dev.function(&CUDA, dtype, "binary_packed")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            packed_grid(n, 16 / dtype.size_in_bytes()),
            [
                &kind,
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
    } else {
        let c = coalesce(shape, &[&la, &lb]);
        let small = index32(n, &[&c[0], &c[1]]);
        let (va, vb) = (Strided::of(name, &c[0])?, Strided::of(name, &c[1])?);
        let f = dev.function(&CUDA, dtype, "binary_strided")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            elementwise_grid(n),
            [
                &kind,
                sa.slice(),
                &va,
                sb.slice(),
                &vb,
                out.slice_mut(),
                &n64,
                &small
            ]
        )?;
    }
    Ok(Box::new(out))
}

fn zip<T: FloatElement + CpuElement>(
    k: Binary,
    l: &[T],
    la: &KernelArg<'_>,
    r: &[T],
    ra: &KernelArg<'_>,
    shape: &Shape,
) -> Result<CpuStorage> {
    let ll = la.layout.broadcast_as(shape)?;
    let rl = ra.layout.broadcast_as(shape)?;
    macro_rules! go {
        ($($kind:path),*) => {
            match k {
                $($kind => zip_layouts(l, &ll, r, &rl, shape, #[inline(always)] |a, b| T::from_acc($kind.f(a.to_acc(), b.to_acc()))),)*
            }
        };
    }
    Ok(T::wrap(go!(
        Binary::Add,
        Binary::Sub,
        Binary::Mul,
        Binary::Div,
        Binary::Pow,
        Binary::Maximum,
        Binary::Minimum
    )))
}

impl Op for Binary {
    fn name(&self) -> &'static str {
        Binary::name(*self)
    }
    fn idioms(&self) -> Idioms {
        Binary::IDIOMS
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
        if !a.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name(), a.dtype()));
        }
        let shape = a.shape().broadcast_with(b.shape(), self.name())?;
        Ok(smallvec![TensorSpec::new(shape, a.dtype())])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let (a, b) = (inputs[0], inputs[1]);
        let shape = &specs[0].shape;
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_binary(
                name,
                self.cuda_kind(),
                &a,
                &b,
                shape
            )?]);
        }
        let (sa, sb) = (a.cpu(name)?, b.cpu(name)?);
        let out = match (sa, sb) {
            (CpuStorage::F32(l), CpuStorage::F32(r)) => zip(*self, l, &a, r, &b, shape)?,
            (CpuStorage::F64(l), CpuStorage::F64(r)) => zip(*self, l, &a, r, &b, shape)?,
            (CpuStorage::F16(l), CpuStorage::F16(r)) => zip(*self, l, &a, r, &b, shape)?,
            (CpuStorage::BF16(l), CpuStorage::BF16(r)) => zip(*self, l, &a, r, &b, shape)?,
            _ => return Err(Error::unsupported_dtype(name, sa.dtype())),
        };
        Ok(smallvec![Box::new(out) as Box<dyn DeviceStorage>])
    }
    fn save(&self) -> Save {
        match self {
            Binary::Add | Binary::Sub => Save::NONE,
            Binary::Pow => Save {
                inputs: 0b11,
                outputs: 1,
            },
            _ => Save::INPUTS,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g = ctx.grad(0)?;
        let (sa, sb) = (&ctx.input_specs[0].shape, &ctx.input_specs[1].shape);
        let (ga, gb) = match self {
            Binary::Add => (Some(g.clone()), Some(g.clone())),
            Binary::Sub => (Some(g.clone()), ctx.needs(1).then(|| g.neg()).transpose()?),
            Binary::Mul => {
                let (a, b) = (ctx.input(0)?, ctx.input(1)?);
                (
                    ctx.needs(0).then(|| g.mul(b)).transpose()?,
                    ctx.needs(1).then(|| g.mul(a)).transpose()?,
                )
            }
            Binary::Div => {
                let (a, b) = (ctx.input(0)?, ctx.input(1)?);
                let ga = ctx.needs(0).then(|| g.div(b)).transpose()?;
                // d(a/b)/db = -a / b²
                let gb = ctx
                    .needs(1)
                    .then(|| g.mul(a)?.div(&b.sqr()?)?.neg())
                    .transpose()?;
                (ga, gb)
            }
            Binary::Pow => {
                let (a, b, y) = (ctx.input(0)?, ctx.input(1)?, ctx.output(0)?);
                // d(a^b)/da = b a^(b-1) = b y / a ; d/db = y ln a
                let ga = ctx
                    .needs(0)
                    .then(|| g.mul(&b.mul(&a.powf_t(b, -1.0)?)?))
                    .transpose()?;
                let gb = ctx
                    .needs(1)
                    .then(|| g.mul(&y.mul(&a.log()?)?))
                    .transpose()?;
                (ga, gb)
            }
            Binary::Maximum | Binary::Minimum => {
                let (a, b) = (ctx.input(0)?, ctx.input(1)?);
                let pick_a = execute1(Select(*self), &[a, b])?;
                let ga = ctx.needs(0).then(|| g.mul(&pick_a)).transpose()?;
                let gb = ctx
                    .needs(1)
                    .then(|| g.mul(&pick_a.affine(-1.0, 1.0)?))
                    .transpose()?;
                (ga, gb)
            }
        };
        let reduce = |g: Option<Tensor>, s: &Shape| g.map(|g| g.sum_to(s)).transpose();
        Ok(smallvec![reduce(ga, sa)?, reduce(gb, sb)?])
    }
}

/// 1 where `maximum`/`minimum` took `a`, else 0 (a float mask for their backward).
#[derive(Debug, Clone, Copy)]
struct Select(Binary);

impl Op for Select {
    fn name(&self) -> &'static str {
        match self.0 {
            Binary::Minimum => "minimum_mask",
            _ => "maximum_mask",
        }
    }
    fn idioms(&self) -> Idioms {
        Binary::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        Binary::Add.infer(inputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        // Reuse the binary kernels: (a >= b) as 1/0 is max(sign(a - b + 0) ...) – computed directly.
        let k = self.0;
        let name = self.name();
        let (a, b) = (inputs[0], inputs[1]);
        let shape = &specs[0].shape;
        if cuda::on_cuda(inputs) {
            let kind = if k == Binary::Minimum { 8 } else { 7 };
            return Ok(smallvec![cuda_binary(name, kind, &a, &b, shape)?]);
        }
        let (sa, sb) = (a.cpu(name)?, b.cpu(name)?);
        fn mask<T: FloatElement + CpuElement>(
            k: Binary,
            l: &[T],
            la: &KernelArg<'_>,
            r: &[T],
            ra: &KernelArg<'_>,
            s: &Shape,
        ) -> Result<CpuStorage> {
            let (ll, rl) = (la.layout.broadcast_as(s)?, ra.layout.broadcast_as(s)?);
            let one = T::from_f64(1.0);
            let zero = T::from_f64(0.0);
            Ok(T::wrap(match k {
                Binary::Minimum => zip_layouts(l, &ll, r, &rl, s, |x, y| {
                    if x.to_acc() <= y.to_acc() { one } else { zero }
                }),
                _ => zip_layouts(l, &ll, r, &rl, s, |x, y| {
                    if x.to_acc() >= y.to_acc() { one } else { zero }
                }),
            }))
        }
        let out = match (sa, sb) {
            (CpuStorage::F32(l), CpuStorage::F32(r)) => mask(k, l, &a, r, &b, shape)?,
            (CpuStorage::F64(l), CpuStorage::F64(r)) => mask(k, l, &a, r, &b, shape)?,
            (CpuStorage::F16(l), CpuStorage::F16(r)) => mask(k, l, &a, r, &b, shape)?,
            (CpuStorage::BF16(l), CpuStorage::BF16(r)) => mask(k, l, &a, r, &b, shape)?,
            _ => return Err(Error::unsupported_dtype(name, sa.dtype())),
        };
        Ok(smallvec![Box::new(out) as Box<dyn DeviceStorage>])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// Broadcasting element-wise arithmetic on tensors.
pub trait BinaryOps {
    /// Applies `kind` element-wise with broadcasting.
    fn binary(&self, rhs: &Tensor, kind: Binary) -> Result<Tensor>;
    /// a + b
    fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, Binary::Add)
    }
    /// a - b
    fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, Binary::Sub)
    }
    /// a * b
    fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, Binary::Mul)
    }
    /// a / b
    fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, Binary::Div)
    }
    /// a ^ b
    fn pow(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, Binary::Pow)
    }
    /// max(a, b)
    fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, Binary::Maximum)
    }
    /// min(a, b)
    fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, Binary::Minimum)
    }
}

impl BinaryOps for Tensor {
    fn binary(&self, rhs: &Tensor, kind: Binary) -> Result<Tensor> {
        execute1(kind, &[self, rhs])
    }
}

trait PowHelper {
    fn powf_t(&self, exponent: &Tensor, delta: f64) -> Result<Tensor>;
}
impl PowHelper for Tensor {
    /// a ^ (b + delta)
    fn powf_t(&self, exponent: &Tensor, delta: f64) -> Result<Tensor> {
        self.pow(&exponent.add_scalar(delta)?)
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let mut v: Vec<OpInfo> = Binary::ALL
        .iter()
        .map(|k| OpInfo {
            name: k.name(),
            idioms: Binary::IDIOMS,
            differentiable: true,
            family: "binary",
        })
        .collect();
    for name in ["maximum_mask", "minimum_mask"] {
        v.push(OpInfo {
            name,
            idioms: Binary::IDIOMS,
            differentiable: false,
            family: "binary",
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(layout: &Layout) -> Option<(i64, i64)> {
        Source::of(layout).map(|s| (s.offset, s.period))
    }

    fn bcast(l: &Layout, dims: &[usize]) -> Layout {
        l.broadcast_as(&Shape::new(dims)).expect("broadcast")
    }

    #[test]
    fn sources_of_layouts() {
        let x = Layout::contiguous(Shape::new(&[4, 6]));
        assert_eq!(source(&x), Some((0, 0)));
        // A bias row, a mask shared by every batch, a scalar: periodic.
        let row = Layout::contiguous(Shape::new(&[6]));
        assert_eq!(source(&bcast(&row, &[4, 6])), Some((0, 6)));
        let mask = Layout::contiguous(Shape::new(&[3, 8]));
        assert_eq!(source(&bcast(&mask, &[2, 5, 3, 8])), Some((0, 24)));
        let scalar = Layout::contiguous(Shape::new(&[]));
        assert_eq!(source(&bcast(&scalar, &[4, 6])), Some((0, 1)));
        assert_eq!(source(&bcast(&scalar, &[1])), Some((0, 0)));
        // Size-1 dims are skipped wherever they are.
        let r = Layout::contiguous(Shape::new(&[1, 6, 1]));
        assert_eq!(source(&bcast(&r, &[4, 1, 6, 1])), Some((0, 6)));
        // A contiguous narrow keeps its offset.
        let n = Layout::contiguous(Shape::new(&[10]))
            .narrow(0, 2, 8)
            .expect("narrow");
        assert_eq!(source(&n), Some((2, 0)));
        // Column broadcasts, transposes, narrowed rows and broadcasts in the middle are not.
        let col = Layout::contiguous(Shape::new(&[4, 1]));
        assert_eq!(source(&bcast(&col, &[4, 6])), None);
        assert_eq!(source(&x.transpose(0, 1).expect("t")), None);
        assert_eq!(source(&x.narrow(1, 1, 4).expect("narrow")), None);
        let mid = Layout::contiguous(Shape::new(&[2, 1, 6]));
        assert_eq!(source(&bcast(&mid, &[2, 3, 6])), None);
    }

    #[test]
    fn packed_sources_need_whole_aligned_packs() {
        let x = Layout::contiguous(Shape::new(&[4, 8]));
        let row = bcast(&Layout::contiguous(Shape::new(&[8])), &[4, 8]);
        let odd = bcast(&Layout::contiguous(Shape::new(&[6])), &[4, 6]);
        let scalar = bcast(&Layout::contiguous(Shape::new(&[])), &[4, 8]);
        let shifted = Layout::contiguous(Shape::new(&[34]))
            .narrow(0, 2, 32)
            .expect("narrow");
        let got = packed_sources(&[&x, &row, &scalar], 4).expect("packed");
        let periods: Vec<i64> = got.iter().map(|s| s.period).collect();
        assert_eq!(periods, [0, 8, 1]);
        assert!(packed_sources(&[&x, &odd], 4).is_none());
        assert!(packed_sources(&[&odd], 2).is_some());
        assert!(packed_sources(&[&shifted], 4).is_none());
        assert!(packed_sources(&[&shifted], 2).is_some());
    }
}
