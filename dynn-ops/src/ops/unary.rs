//! Element-wise unary ops: neg, abs, exp, log, sqrt, rsqrt, tanh, sigmoid, relu, gelu
//! (tanh approximation), gelu_erf, silu, sin, cos, sqr, recip, and the scalar maps
//! `affine` (x * mul + add) and `powf` (x ^ e). Each backward is one fused kernel
//! (`<name>_backward`: grad * f'(x)).

use crate::cpu::map_layout;
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::float_dispatch;
use crate::math::FastMath;
use crate::ops::binary::{
    coalesce, cuda_elementwise_helpers, elementwise_grid, index32, packed_grid, packed_sources,
};
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, CpuElement, Error, FloatElement, Idioms, InputGrads, KernelArg, Layout,
    Op, Outputs, Result, Save, Specs, Tensor, TensorSpec, execute1, smallvec::smallvec,
};

/// Which unary function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    /// -x
    Neg,
    /// |x|
    Abs,
    /// e^x
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// 1/√x
    Rsqrt,
    /// tanh x
    Tanh,
    /// 1/(1+e^-x)
    Sigmoid,
    /// max(x, 0)
    Relu,
    /// GELU, tanh approximation.
    Gelu,
    /// GELU with the exact error function.
    GeluErf,
    /// x·sigmoid(x)
    Silu,
    /// sin x
    Sin,
    /// cos x
    Cos,
    /// x²
    Sqr,
    /// 1/x
    Recip,
    /// x·mul + add
    Affine {
        /// Multiplier.
        mul: f64,
        /// Offset.
        add: f64,
    },
    /// x^e
    Powf(f64),
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh-approximated GELU.
const GELU_C: f64 = 0.044715;

/// `2u = 2·√(2/π)·(x + 0.044715·x³)`, the argument of the σ in the tanh-approximated GELU.
#[inline(always)]
fn gelu_2u<A: FastMath>(x: A) -> A {
    A::of(2.0 * SQRT_2_OVER_PI) * (x + A::of(GELU_C) * x * x * x)
}

impl Unary {
    /// Every kind (parameterised kinds with sample parameters), for the op table and tests.
    pub const ALL: [Unary; 18] = [
        Unary::Neg,
        Unary::Abs,
        Unary::Exp,
        Unary::Log,
        Unary::Sqrt,
        Unary::Rsqrt,
        Unary::Tanh,
        Unary::Sigmoid,
        Unary::Relu,
        Unary::Gelu,
        Unary::GeluErf,
        Unary::Silu,
        Unary::Sin,
        Unary::Cos,
        Unary::Sqr,
        Unary::Recip,
        Unary::Affine {
            mul: 1.5,
            add: -0.25,
        },
        Unary::Powf(2.5),
    ];

    /// The op name.
    pub fn name(self) -> &'static str {
        match self {
            Unary::Neg => "neg",
            Unary::Abs => "abs",
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Sqrt => "sqrt",
            Unary::Rsqrt => "rsqrt",
            Unary::Tanh => "tanh",
            Unary::Sigmoid => "sigmoid",
            Unary::Relu => "relu",
            Unary::Gelu => "gelu",
            Unary::GeluErf => "gelu_erf",
            Unary::Silu => "silu",
            Unary::Sin => "sin",
            Unary::Cos => "cos",
            Unary::Sqr => "sqr",
            Unary::Recip => "recip",
            Unary::Affine { .. } => "affine",
            Unary::Powf(_) => "powf",
        }
    }

    /// The name of the fused backward op.
    pub fn backward_name(self) -> &'static str {
        match self {
            Unary::Neg => "neg_backward",
            Unary::Abs => "abs_backward",
            Unary::Exp => "exp_backward",
            Unary::Log => "log_backward",
            Unary::Sqrt => "sqrt_backward",
            Unary::Rsqrt => "rsqrt_backward",
            Unary::Tanh => "tanh_backward",
            Unary::Sigmoid => "sigmoid_backward",
            Unary::Relu => "relu_backward",
            Unary::Gelu => "gelu_backward",
            Unary::GeluErf => "gelu_erf_backward",
            Unary::Silu => "silu_backward",
            Unary::Sin => "sin_backward",
            Unary::Cos => "cos_backward",
            Unary::Sqr => "sqr_backward",
            Unary::Recip => "recip_backward",
            Unary::Affine { .. } => "affine_backward",
            Unary::Powf(_) => "powf_backward",
        }
    }

    /// True when the derivative is computed from the output rather than the input.
    fn grad_from_output(self) -> bool {
        matches!(
            self,
            Unary::Exp | Unary::Sqrt | Unary::Rsqrt | Unary::Tanh | Unary::Sigmoid | Unary::Recip
        )
    }

    /// f(x).
    #[inline(always)]
    fn f<A: FastMath>(self, x: A) -> A {
        let half = A::of(0.5);
        match self {
            Unary::Neg => -x,
            Unary::Abs => x.abs(),
            Unary::Exp => x.fexp(),
            Unary::Log => x.ln(),
            Unary::Sqrt => x.sqrt(),
            Unary::Rsqrt => A::ONE / x.sqrt(),
            Unary::Tanh => x.ftanh(),
            Unary::Sigmoid => x.fsigmoid(),
            Unary::Relu => {
                if x > A::ZERO {
                    x
                } else {
                    A::ZERO
                }
            }
            // ½x(1 + tanh u) written as x·σ(2u): one exponential and a division, where
            // tanh's two branches cost 1.4× as much on an AVX2 host, and no cancellation in
            // 1 + tanh u for negative x (max relative error 7.7e-7 against 1.2e-5 in f32).
            Unary::Gelu => x * gelu_2u(x).fsigmoid(),
            Unary::GeluErf => {
                half * x * (A::ONE + (x * A::of(std::f64::consts::FRAC_1_SQRT_2)).ferf())
            }
            Unary::Silu => x * x.fsigmoid(),
            Unary::Sin => x.sin(),
            Unary::Cos => x.cos(),
            Unary::Sqr => x * x,
            Unary::Recip => A::ONE / x,
            Unary::Affine { mul, add } => x * A::of(mul) + A::of(add),
            Unary::Powf(e) => x.powf(A::of(e)),
        }
    }

    /// f'(x), given x (or y = f(x) when [`Self::grad_from_output`]).
    #[inline(always)]
    fn df<A: FastMath>(self, v: A) -> A {
        let half = A::of(0.5);
        match self {
            Unary::Neg => -A::ONE,
            Unary::Abs => {
                if v > A::ZERO {
                    A::ONE
                } else if v < A::ZERO {
                    -A::ONE
                } else {
                    A::ZERO
                }
            }
            Unary::Exp => v,
            Unary::Log => A::ONE / v,
            Unary::Sqrt => half / v,
            Unary::Rsqrt => A::of(-0.5) * v * v * v,
            Unary::Tanh => A::ONE - v * v,
            Unary::Sigmoid => v * (A::ONE - v),
            Unary::Relu => {
                if v > A::ZERO {
                    A::ONE
                } else {
                    A::ZERO
                }
            }
            Unary::Gelu => {
                // d/dx x·σ(2u) = σ + x·σ(1 − σ)·2u'.
                let s = gelu_2u(v).fsigmoid();
                s + v
                    * s
                    * (A::ONE - s)
                    * A::of(2.0 * SQRT_2_OVER_PI)
                    * (A::ONE + A::of(3.0 * GELU_C) * v * v)
            }
            Unary::GeluErf => {
                let cdf = half * (A::ONE + (v * A::of(std::f64::consts::FRAC_1_SQRT_2)).ferf());
                let pdf = (-half * v * v).fexp() * A::of(0.398_942_280_401_432_7);
                cdf + v * pdf
            }
            Unary::Silu => {
                let s = v.fsigmoid();
                s * (A::ONE + v * (A::ONE - s))
            }
            Unary::Sin => v.cos(),
            Unary::Cos => -v.sin(),
            Unary::Sqr => A::of(2.0) * v,
            Unary::Recip => -v * v,
            Unary::Affine { mul, .. } => A::of(mul),
            Unary::Powf(e) => A::of(e) * v.powf(A::of(e - 1.0)),
        }
    }

    /// The kind's number in the CUDA kernels' switch, and its two scalar parameters.
    fn cuda_kind(self) -> (i32, f64, f64) {
        match self {
            Unary::Neg => (0, 0.0, 0.0),
            Unary::Abs => (1, 0.0, 0.0),
            Unary::Exp => (2, 0.0, 0.0),
            Unary::Log => (3, 0.0, 0.0),
            Unary::Sqrt => (4, 0.0, 0.0),
            Unary::Rsqrt => (5, 0.0, 0.0),
            Unary::Tanh => (6, 0.0, 0.0),
            Unary::Sigmoid => (7, 0.0, 0.0),
            Unary::Relu => (8, 0.0, 0.0),
            Unary::Gelu => (9, 0.0, 0.0),
            Unary::GeluErf => (10, 0.0, 0.0),
            Unary::Silu => (11, 0.0, 0.0),
            Unary::Sin => (12, 0.0, 0.0),
            Unary::Cos => (13, 0.0, 0.0),
            Unary::Sqr => (14, 0.0, 0.0),
            Unary::Recip => (15, 0.0, 0.0),
            Unary::Affine { mul, add } => (16, mul, add),
            Unary::Powf(e) => (17, e, 0.0),
        }
    }

    /// Idioms: one element-wise map (PyTorch's table gives relu/elu/dropout `[0,0,0,0,1,0]`).
    pub const IDIOMS: Idioms = Idioms::MAP;
    /// Idioms of the fused backward: a map that also combines two streams (the table's
    /// "sigmoid/tanh/gelu backward" row, `[0,0,0,1,1,0]`).
    pub const BACKWARD_IDIOMS: Idioms = Idioms([0, 0, 0, 1, 1, 0]);
}

/// The CUDA kernels: f(x) and grad·f'(v) (`v` is the output where `grad_from_output`), the
/// kind numbered by `Unary::cuda_kind`. `unary_packed_{forward,backward}_<kind>` (one entry
/// point per kind: `PACKED_FORWARD`, `PACKED_BACKWARD`) take contiguous operands starting
/// on a 16-byte boundary: the packed helpers with every period 0 (a constant, so each loop is
/// one straight path), one 16-byte pack per access. `unary_strided_*` take any layout (dims
/// coalesced on the host) and switch on the kind at run time (uniform across the grid).
pub const CUDA: CudaSource = CudaSource {
    name: "unary",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
__device__ __forceinline__ acc sigm(acc x) { return (acc)1 / ((acc)1 + exp(-x)); }
#define GELU_K ((acc)0.7978845608028654)
#define GELU_C ((acc)0.044715)

template <int K> __device__ __forceinline__ acc unary_f(acc x, acc p0, acc p1) {
    if (K == 0) return -x;
    if (K == 1) return fabs(x);
    if (K == 2) return exp(x);
    if (K == 3) return log(x);
    if (K == 4) return sqrt(x);
    if (K == 5) return rsqrt(x);
    if (K == 6) return tanh(x);
    if (K == 7) return sigm(x);
    if (K == 8) return x > (acc)0 ? x : (acc)0;
    if (K == 9) return x * sigm((acc)2 * GELU_K * (x + GELU_C * x * x * x));
    if (K == 10) return (acc)0.5 * x * ((acc)1 + erf(x * (acc)0.7071067811865476));
    if (K == 11) return x * sigm(x);
    if (K == 12) return sin(x);
    if (K == 13) return cos(x);
    if (K == 14) return x * x;
    if (K == 15) return (acc)1 / x;
    if (K == 16) return x * p0 + p1;
    return pow(x, p0);
}

template <int K> __device__ __forceinline__ acc unary_df(acc v, acc p0) {
    if (K == 0) return (acc)-1;
    if (K == 1) return v > (acc)0 ? (acc)1 : (v < (acc)0 ? (acc)-1 : (acc)0);
    if (K == 2) return v;
    if (K == 3) return (acc)1 / v;
    if (K == 4) return (acc)0.5 / v;
    if (K == 5) return (acc)-0.5 * v * v * v;
    if (K == 6) return (acc)1 - v * v;
    if (K == 7) return v * ((acc)1 - v);
    if (K == 8) return v > (acc)0 ? (acc)1 : (acc)0;
    if (K == 9) {
        acc s = sigm((acc)2 * GELU_K * (v + GELU_C * v * v * v));
        return s + v * s * ((acc)1 - s) * (acc)2 * GELU_K * ((acc)1 + (acc)3 * GELU_C * v * v);
    }
    if (K == 10) {
        acc cdf = (acc)0.5 * ((acc)1 + erf(v * (acc)0.7071067811865476));
        return cdf + v * exp((acc)-0.5 * v * v) * (acc)0.3989422804014327;
    }
    if (K == 11) { acc s = sigm(v); return s * ((acc)1 + v * ((acc)1 - s)); }
    if (K == 12) return cos(v);
    if (K == 13) return -sin(v);
    if (K == 14) return (acc)2 * v;
    if (K == 15) return -v * v;
    if (K == 16) return p0;
    return p0 * pow(v, p0 - (acc)1);
}

#define VEC (16 / (int)sizeof(scalar))

template <int K>
__device__ __forceinline__ void fwd_packed(Src<scalar> x, acc p0, acc p1,
                                          scalar* __restrict__ y, u64 n) {
    packed_map<VEC>([=](scalar v) { return st(unary_f<K>(ld(v), p0, p1)); }, y, n, x);
}

template <int K>
__device__ __forceinline__ void bwd_packed(Src<scalar> v, Src<scalar> g, acc p0,
                                          scalar* __restrict__ y, u64 n) {
    packed_map<VEC>([=](scalar a, scalar b) { return st(ld(b) * unary_df<K>(ld(a), p0)); }, y, n,
                    v, g);
}

// One entry point per kind and direction, so each gets the registers its own math needs
// (one kernel for every kind would run all of them at the heaviest one's count). Operands
// are contiguous (period 0 as a constant: the other sources' branches fold away).
#define UNARY_PACKED(K) \
extern "C" __global__ void unary_packed_forward_##K(double p0, double p1, \
                                                    const scalar* __restrict__ x, i64 xo, \
                                                    scalar* __restrict__ y, i64 n) { \
    fwd_packed<K>(src(x, xo, 0), (acc)p0, (acc)p1, y, (u64)n); \
} \
extern "C" __global__ void unary_packed_backward_##K(double p0, const scalar* __restrict__ v, \
                                                     i64 vo, const scalar* __restrict__ g, \
                                                     i64 go, scalar* __restrict__ y, i64 n) { \
    bwd_packed<K>(src(v, vo, 0), src(g, go, 0), (acc)p0, y, (u64)n); \
}
UNARY_PACKED(0) UNARY_PACKED(1) UNARY_PACKED(2) UNARY_PACKED(3) UNARY_PACKED(4)
UNARY_PACKED(5) UNARY_PACKED(6) UNARY_PACKED(7) UNARY_PACKED(8) UNARY_PACKED(9)
UNARY_PACKED(10) UNARY_PACKED(11) UNARY_PACKED(12) UNARY_PACKED(13) UNARY_PACKED(14)
UNARY_PACKED(15) UNARY_PACKED(16) UNARY_PACKED(17)

// The strided kernels switch on the kind per element (uniform, so the branch is cheap), which
// keeps them to one instantiation per index width.
__device__ __forceinline__ acc unary_f_rt(int kind, acc x, acc p0, acc p1) {
    switch (kind) {
    case 0: return unary_f<0>(x, p0, p1);
    case 1: return unary_f<1>(x, p0, p1);
    case 2: return unary_f<2>(x, p0, p1);
    case 3: return unary_f<3>(x, p0, p1);
    case 4: return unary_f<4>(x, p0, p1);
    case 5: return unary_f<5>(x, p0, p1);
    case 6: return unary_f<6>(x, p0, p1);
    case 7: return unary_f<7>(x, p0, p1);
    case 8: return unary_f<8>(x, p0, p1);
    case 9: return unary_f<9>(x, p0, p1);
    case 10: return unary_f<10>(x, p0, p1);
    case 11: return unary_f<11>(x, p0, p1);
    case 12: return unary_f<12>(x, p0, p1);
    case 13: return unary_f<13>(x, p0, p1);
    case 14: return unary_f<14>(x, p0, p1);
    case 15: return unary_f<15>(x, p0, p1);
    case 16: return unary_f<16>(x, p0, p1);
    default: return unary_f<17>(x, p0, p1);
    }
}

__device__ __forceinline__ acc unary_df_rt(int kind, acc v, acc p0) {
    switch (kind) {
    case 0: return unary_df<0>(v, p0);
    case 1: return unary_df<1>(v, p0);
    case 2: return unary_df<2>(v, p0);
    case 3: return unary_df<3>(v, p0);
    case 4: return unary_df<4>(v, p0);
    case 5: return unary_df<5>(v, p0);
    case 6: return unary_df<6>(v, p0);
    case 7: return unary_df<7>(v, p0);
    case 8: return unary_df<8>(v, p0);
    case 9: return unary_df<9>(v, p0);
    case 10: return unary_df<10>(v, p0);
    case 11: return unary_df<11>(v, p0);
    case 12: return unary_df<12>(v, p0);
    case 13: return unary_df<13>(v, p0);
    case 14: return unary_df<14>(v, p0);
    case 15: return unary_df<15>(v, p0);
    case 16: return unary_df<16>(v, p0);
    default: return unary_df<17>(v, p0);
    }
}

template <typename I>
__device__ void fwd_strided(int kind, acc p0, acc p1, const scalar* __restrict__ x,
                            const Strided& xs, scalar* __restrict__ y, I n) {
    MAP(I, i, n, scalar, y, st(unary_f_rt(kind, ld(x[sat<I>(xs, i)]), p0, p1)));
}

template <typename I>
__device__ void bwd_strided(int kind, acc p0, const scalar* __restrict__ v, const Strided& vs,
                            const scalar* __restrict__ g, const Strided& gs,
                            scalar* __restrict__ y, I n) {
    MAP(I, i, n, scalar, y,
        st(ld(g[sat<I>(gs, i)]) * unary_df_rt(kind, ld(v[sat<I>(vs, i)]), p0)));
}

extern "C" __global__ void unary_strided_forward(int kind, double p0, double p1, const scalar* x,
                                                 Strided xs, scalar* y, i64 n, int small) {
    if (small) fwd_strided<u32>(kind, (acc)p0, (acc)p1, x, xs, y, (u32)n);
    else fwd_strided<u64>(kind, (acc)p0, (acc)p1, x, xs, y, (u64)n);
}

extern "C" __global__ void unary_strided_backward(int kind, double p0, const scalar* v,
                                                  Strided vs, const scalar* g, Strided gs,
                                                  scalar* y, i64 n, int small) {
    if (small) bwd_strided<u32>(kind, (acc)p0, v, vs, g, gs, y, (u32)n);
    else bwd_strided<u64>(kind, (acc)p0, v, vs, g, gs, y, (u64)n);
}
"#
    ),
    half: true,
};

/// The element offsets of `layouts` when every one is contiguous and starts on a
/// `pack`-element boundary (the packed kernels' operands), else `None`.
fn packed_offsets(layouts: &[&Layout], pack: usize) -> Option<Vec<i64>> {
    let sources = packed_sources(layouts, pack)?;
    sources
        .iter()
        .map(|s| (s.period == 0).then_some(s.offset))
        .collect()
}

/// `[concat!(prefix, "0"), .., concat!(prefix, "17")]`: a name for each `Unary::cuda_kind`.
macro_rules! by_kind {
    ($prefix:literal) => {
        [
            concat!($prefix, "0"),
            concat!($prefix, "1"),
            concat!($prefix, "2"),
            concat!($prefix, "3"),
            concat!($prefix, "4"),
            concat!($prefix, "5"),
            concat!($prefix, "6"),
            concat!($prefix, "7"),
            concat!($prefix, "8"),
            concat!($prefix, "9"),
            concat!($prefix, "10"),
            concat!($prefix, "11"),
            concat!($prefix, "12"),
            concat!($prefix, "13"),
            concat!($prefix, "14"),
            concat!($prefix, "15"),
            concat!($prefix, "16"),
            concat!($prefix, "17"),
        ]
    };
}

/// The packed forward kernels, indexed by `Unary::cuda_kind`.
const PACKED_FORWARD: [&str; 18] = by_kind!("unary_packed_forward_");
/// The packed backward kernels, indexed by `Unary::cuda_kind`.
const PACKED_BACKWARD: [&str; 18] = by_kind!("unary_packed_backward_");

fn cuda_forward(k: Unary, x: &KernelArg<'_>) -> Result<Box<dyn dynn_core::DeviceStorage>> {
    let name = k.name();
    let xs = cuda::storage(name, x)?;
    let dev = xs.dev();
    let dtype = x.dtype();
    let n = x.layout.elem_count();
    let mut out = CudaStorage::alloc(dev, dtype, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let (kind, p0, p1) = k.cuda_kind();
    let n64 = n as i64;
    let pack = 16 / dtype.size_in_bytes();
    if let Some(o) = packed_offsets(&[x.layout], pack) {
        let f = dev.function(&CUDA, dtype, PACKED_FORWARD[kind as usize])?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            packed_grid(n, pack),
            [&p0, &p1, xs.slice(), &o[0], out.slice_mut(), &n64]
        )?;
    } else {
        let c = coalesce(x.layout.shape(), &[x.layout]);
        let small = index32(n, &[&c[0]]);
        let view = Strided::of(name, &c[0])?;
        let f = dev.function(&CUDA, dtype, "unary_strided_forward")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            elementwise_grid(n),
            [
                &kind,
                &p0,
                &p1,
                xs.slice(),
                &view,
                out.slice_mut(),
                &n64,
                &small
            ]
        )?;
    }
    Ok(Box::new(out))
}

fn cuda_backward(
    k: Unary,
    v: &KernelArg<'_>,
    g: &KernelArg<'_>,
) -> Result<Box<dyn dynn_core::DeviceStorage>> {
    let name = k.backward_name();
    let (vs, gs) = (cuda::storage(name, v)?, cuda::storage(name, g)?);
    let dev = vs.dev();
    let dtype = v.dtype();
    let shape = v.layout.shape();
    let n = shape.elem_count();
    let mut out = CudaStorage::alloc(dev, dtype, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let (kind, p0, _) = k.cuda_kind();
    let n64 = n as i64;
    let pack = 16 / dtype.size_in_bytes();
    if let Some(o) = packed_offsets(&[v.layout, g.layout], pack) {
        let f = dev.function(&CUDA, dtype, PACKED_BACKWARD[kind as usize])?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            packed_grid(n, pack),
            [
                &p0,
                vs.slice(),
                &o[0],
                gs.slice(),
                &o[1],
                out.slice_mut(),
                &n64
            ]
        )?;
    } else {
        let c = coalesce(shape, &[v.layout, g.layout]);
        let small = index32(n, &[&c[0], &c[1]]);
        let (vv, gv) = (Strided::of(name, &c[0])?, Strided::of(name, &c[1])?);
        let f = dev.function(&CUDA, dtype, "unary_strided_backward")?;
        crate::cuda_launch!(
            dev,
            name,
            f,
            elementwise_grid(n),
            [
                &kind,
                &p0,
                vs.slice(),
                &vv,
                gs.slice(),
                &gv,
                out.slice_mut(),
                &n64,
                &small
            ]
        )?;
    }
    Ok(Box::new(out))
}

/// Expands `$run!(kind)` in an arm per kind, with the kind written out as a constant (its
/// data, if any, bound by value): a closure that `$run` builds around it then applies one
/// function, with no per-element `match`, and its loop vectorizes.
macro_rules! with_kind {
    ($k:expr, $run:ident) => {
        match $k {
            Unary::Neg => $run!(Unary::Neg),
            Unary::Abs => $run!(Unary::Abs),
            Unary::Exp => $run!(Unary::Exp),
            Unary::Log => $run!(Unary::Log),
            Unary::Sqrt => $run!(Unary::Sqrt),
            Unary::Rsqrt => $run!(Unary::Rsqrt),
            Unary::Tanh => $run!(Unary::Tanh),
            Unary::Sigmoid => $run!(Unary::Sigmoid),
            Unary::Relu => $run!(Unary::Relu),
            Unary::Gelu => $run!(Unary::Gelu),
            Unary::GeluErf => $run!(Unary::GeluErf),
            Unary::Silu => $run!(Unary::Silu),
            Unary::Sin => $run!(Unary::Sin),
            Unary::Cos => $run!(Unary::Cos),
            Unary::Sqr => $run!(Unary::Sqr),
            Unary::Recip => $run!(Unary::Recip),
            Unary::Affine { mul, add } => $run!(Unary::Affine { mul, add }),
            Unary::Powf(e) => $run!(Unary::Powf(e)),
        }
    };
}

fn run_forward<T: FloatElement + CpuElement>(k: Unary, src: &[T], arg: &KernelArg<'_>) -> Vec<T>
where
    T::Acc: FastMath,
{
    macro_rules! apply {
        ($c:expr) => {
            // Inlined into the vector loop even where `f` is long (gelu_erf): a closure
            // compiled apart from it runs without the vector features (see `SimdTask`).
            map_layout(
                src,
                arg.layout,
                #[inline(always)]
                move |x| T::from_acc(($c).f(x.to_acc())),
            )
        };
    }
    with_kind!(k, apply)
}

impl Op for Unary {
    fn name(&self) -> &'static str {
        Unary::name(*self)
    }
    fn idioms(&self) -> Idioms {
        Unary::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        if !x.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name(), x.dtype()));
        }
        Ok(smallvec![TensorSpec::new(x.shape().clone(), x.dtype())])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let k = *self;
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_forward(k, &x)?]);
        }
        let out = float_dispatch!(self.name(), x.cpu(self.name())?, |v| T_wrap(run_forward(
            k, v, &x
        )));
        Ok(smallvec![out])
    }
    fn save(&self) -> Save {
        if self.grad_from_output() {
            Save::OUTPUT
        } else {
            Save::INPUTS
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let v = if self.grad_from_output() {
            ctx.output(0)?
        } else {
            ctx.input(0)?
        };
        let g = execute1(UnaryBackward(*self), &[v, ctx.grad(0)?])?;
        Ok(smallvec![Some(g)])
    }
}

fn grad_kernel<T: FloatElement + CpuElement>(
    k: Unary,
    v: &[T],
    va: &KernelArg<'_>,
    g: &[T],
    ga: &KernelArg<'_>,
    shape: &dynn_core::Shape,
) -> Vec<T>
where
    T::Acc: FastMath,
{
    macro_rules! apply {
        ($c:expr) => {
            crate::cpu::zip_layouts(
                v,
                va.layout,
                g,
                ga.layout,
                shape,
                #[inline(always)]
                move |a, b| T::from_acc(b.to_acc() * ($c).df(a.to_acc())),
            )
        };
    }
    with_kind!(k, apply)
}

/// Boxes a typed vector as device storage.
#[allow(non_snake_case)]
fn T_wrap<T: CpuElement>(v: Vec<T>) -> Box<dyn dynn_core::DeviceStorage> {
    Box::new(T::wrap(v))
}

/// The fused backward of a [`Unary`]: inputs `(x or y, grad)`, output `grad * f'(·)`.
#[derive(Debug, Clone, Copy)]
pub struct UnaryBackward(pub Unary);

impl Op for UnaryBackward {
    fn name(&self) -> &'static str {
        self.0.backward_name()
    }
    fn idioms(&self) -> Idioms {
        Unary::BACKWARD_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (v, g) = (inputs[0], inputs[1]);
        if v.shape() != g.shape() {
            return Err(Error::shape_mismatch(self.name(), v.shape(), g.shape()));
        }
        if v.dtype() != g.dtype() {
            return Err(Error::DTypeMismatch {
                op: self.name(),
                expected: v.dtype(),
                got: g.dtype(),
            });
        }
        Ok(smallvec![TensorSpec::new(v.shape().clone(), v.dtype())])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let k = self.0;
        let name = self.name();
        let (v, g) = (inputs[0], inputs[1]);
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_backward(k, &v, &g)?]);
        }
        let out = float_dispatch!(name, v.cpu(name)?, |vv| T_wrap(grad_kernel(
            k,
            vv,
            &v,
            g.cpu(name)?.as_slice(name)?,
            &g,
            &specs[0].shape
        )));
        Ok(smallvec![out])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// Element-wise unary math on tensors.
pub trait UnaryOps {
    /// Applies `kind` element-wise.
    fn unary(&self, kind: Unary) -> Result<Tensor>;
    /// -x
    fn neg(&self) -> Result<Tensor> {
        self.unary(Unary::Neg)
    }
    /// |x|
    fn abs(&self) -> Result<Tensor> {
        self.unary(Unary::Abs)
    }
    /// e^x
    fn exp(&self) -> Result<Tensor> {
        self.unary(Unary::Exp)
    }
    /// ln x
    fn log(&self) -> Result<Tensor> {
        self.unary(Unary::Log)
    }
    /// √x
    fn sqrt(&self) -> Result<Tensor> {
        self.unary(Unary::Sqrt)
    }
    /// 1/√x
    fn rsqrt(&self) -> Result<Tensor> {
        self.unary(Unary::Rsqrt)
    }
    /// tanh x
    fn tanh(&self) -> Result<Tensor> {
        self.unary(Unary::Tanh)
    }
    /// 1/(1+e^-x)
    fn sigmoid(&self) -> Result<Tensor> {
        self.unary(Unary::Sigmoid)
    }
    /// max(x, 0)
    fn relu(&self) -> Result<Tensor> {
        self.unary(Unary::Relu)
    }
    /// GELU (tanh approximation, as in GPT-2 and candle's `gelu`).
    fn gelu(&self) -> Result<Tensor> {
        self.unary(Unary::Gelu)
    }
    /// GELU with the exact error function (PyTorch's default).
    fn gelu_erf(&self) -> Result<Tensor> {
        self.unary(Unary::GeluErf)
    }
    /// x·sigmoid(x)
    fn silu(&self) -> Result<Tensor> {
        self.unary(Unary::Silu)
    }
    /// sin x
    fn sin(&self) -> Result<Tensor> {
        self.unary(Unary::Sin)
    }
    /// cos x
    fn cos(&self) -> Result<Tensor> {
        self.unary(Unary::Cos)
    }
    /// x²
    fn sqr(&self) -> Result<Tensor> {
        self.unary(Unary::Sqr)
    }
    /// 1/x
    fn recip(&self) -> Result<Tensor> {
        self.unary(Unary::Recip)
    }
    /// x·mul + add
    fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        self.unary(Unary::Affine { mul, add })
    }
    /// x·s
    fn scale(&self, s: f64) -> Result<Tensor> {
        self.unary(Unary::Affine { mul: s, add: 0.0 })
    }
    /// x + s
    fn add_scalar(&self, s: f64) -> Result<Tensor> {
        self.unary(Unary::Affine { mul: 1.0, add: s })
    }
    /// x^e
    fn powf(&self, e: f64) -> Result<Tensor> {
        self.unary(Unary::Powf(e))
    }
}

impl UnaryOps for Tensor {
    fn unary(&self, kind: Unary) -> Result<Tensor> {
        execute1(kind, &[self])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    Unary::ALL
        .iter()
        .flat_map(|k| {
            [
                OpInfo {
                    name: k.name(),
                    idioms: Unary::IDIOMS,
                    differentiable: true,
                    family: "unary",
                },
                OpInfo {
                    name: k.backward_name(),
                    idioms: Unary::BACKWARD_IDIOMS,
                    differentiable: false,
                    family: "unary",
                },
            ]
        })
        .collect()
}

// Keep `AccFloat` in scope for the generic math above.
const _: fn(f32) -> f32 = <f32 as AccFloat>::sqrt;
