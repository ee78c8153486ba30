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
/// loads in flight together (launch with [`elementwise_grid`]).
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

/// The CUDA kernels: `binary_contiguous` (both operands contiguous in the output's shape: no
/// index math, 16-byte vector loads when aligned) and `binary_strided` (any layouts,
/// broadcast included, dims coalesced on the host). `kind` numbers the op as
/// [`Binary::cuda_kind`]; 7 and 8 are the `maximum_mask` / `minimum_mask` selections.
pub const CUDA: CudaSource = CudaSource {
    name: "binary",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
template <int K> __device__ __forceinline__ scalar bop(scalar a, scalar b) {
    if (K == 0) return a + b;
    if (K == 1) return a - b;
    if (K == 2) return a * b;
    if (K == 3) return a / b;
    if (K == 4) return pow(a, b);
    if (K == 5) return a >= b ? a : b;
    if (K == 6) return a <= b ? a : b;
    if (K == 7) return a >= b ? (scalar)1 : (scalar)0;
    return a <= b ? (scalar)1 : (scalar)0;
}

#define VEC (16 / (int)sizeof(scalar))
struct __align__(16) Pack { scalar v[VEC]; };

template <int K>
__device__ void bin_contig(const scalar* __restrict__ a, const scalar* __restrict__ b,
                           scalar* __restrict__ y, i64 n) {
    i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x, step = (i64)blockDim.x * gridDim.x;
    if ((((size_t)a | (size_t)b | (size_t)y) & 15) == 0) {
        i64 nv = n / VEC;
        const Pack* pa = (const Pack*)a;
        const Pack* pb = (const Pack*)b;
        Pack* py = (Pack*)y;
        for (i64 v = t; v < nv; v += step) {
            Pack x = pa[v], z = pb[v], r;
#pragma unroll
            for (int j = 0; j < VEC; ++j) r.v[j] = bop<K>(x.v[j], z.v[j]);
            py[v] = r;
        }
        for (i64 i = nv * VEC + t; i < n; i += step) y[i] = bop<K>(a[i], b[i]);
    } else {
        for (i64 i = t; i < n; i += step) y[i] = bop<K>(a[i], b[i]);
    }
}

// The strided kernel takes the kind at run time (one instantiation per index width): its loads
// come first for UNROLL elements, then the uniform switch and the stores.
__device__ __forceinline__ scalar bop_rt(int kind, scalar a, scalar b) {
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
            for (int u = 0; u < UNROLL; ++u) y[base + (I)u * step] = bop_rt(kind, x[u], z[u]);
        }
    }
    for (I i = base; i < n; i += step) y[i] = bop_rt(kind, a[sat<I>(as, i)], b[sat<I>(bs, i)]);
}

extern "C" __global__ void binary_contiguous(int kind, const scalar* a, i64 ao, const scalar* b,
                                             i64 bo, scalar* y, i64 n) {
    a += ao;
    b += bo;
    switch (kind) {
    case 0: bin_contig<0>(a, b, y, n); break;
    case 1: bin_contig<1>(a, b, y, n); break;
    case 2: bin_contig<2>(a, b, y, n); break;
    case 3: bin_contig<3>(a, b, y, n); break;
    case 4: bin_contig<4>(a, b, y, n); break;
    case 5: bin_contig<5>(a, b, y, n); break;
    case 6: bin_contig<6>(a, b, y, n); break;
    case 7: bin_contig<7>(a, b, y, n); break;
    default: bin_contig<8>(a, b, y, n); break;
    }
}

extern "C" __global__ void binary_strided(int kind, const scalar* a, Strided as, const scalar* b,
                                          Strided bs, scalar* y, i64 n, int small) {
    if (small) bin_strided<u32>(kind, a, as, b, bs, y, (u32)n);
    else bin_strided<u64>(kind, a, as, b, bs, y, (u64)n);
}
"#
    ),
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
    if la.is_contiguous() && lb.is_contiguous() {
        let f = dev.function(&CUDA, dtype, "binary_contiguous")?;
        let (ao, bo) = (la.offset() as i64, lb.offset() as i64);
        let per_thread = 16 / dtype.size_in_bytes();
        crate::cuda_launch!(
            dev,
            name,
            f,
            cuda::grid(n.div_ceil(per_thread)),
            [
                &kind,
                sa.slice(),
                &ao,
                sb.slice(),
                &bo,
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
                $($kind => zip_layouts(l, &ll, r, &rl, shape, |a, b| T::from_acc($kind.f(a.to_acc(), b.to_acc()))),)*
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
