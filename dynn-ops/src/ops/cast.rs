//! `to_dtype`: conversion between all seven dtypes. Float to float rounds to nearest (even);
//! float to integer truncates toward zero like PyTorch (saturating at the integer's range, NaN
//! to 0); integer to float rounds to nearest; a narrower integer wraps (i64 to u32, u32 to u8). Casting to the tensor's own
//! dtype returns the same tensor without a copy. Differentiable between float dtypes: the
//! gradient is cast back.

use crate::cpu::map_layout;
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::binary::{coalesce, cuda_elementwise_helpers, elementwise_grid, index32};
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, CpuStorage, DType, DeviceStorage, Error, Idioms, InputGrads, KernelArg, Op,
    Outputs, Result, Specs, Tensor, TensorSpec, execute1,
    half::{bf16, f16},
    smallvec::smallvec,
    with_cpu_storage,
};

/// Idioms of `to_dtype`: one element-wise map, as PyTorch's table gives for element-wise
/// ops ("maximum, elu, dropout" `[0,0,0,0,1,0]`).
pub const CAST_IDIOMS: Idioms = Idioms::MAP;

/// Conversion of one element to each dtype's element type.
trait CastElem: Copy + Send + Sync {
    fn c_f32(self) -> f32;
    fn c_f64(self) -> f64;
    fn c_f16(self) -> f16;
    fn c_bf16(self) -> bf16;
    fn c_i64(self) -> i64;
    fn c_u32(self) -> u32;
    fn c_u8(self) -> u8;
}

impl CastElem for f32 {
    fn c_f32(self) -> f32 {
        self
    }
    fn c_f64(self) -> f64 {
        self as f64
    }
    fn c_f16(self) -> f16 {
        dynn_core::f32_to_f16(self)
    }
    fn c_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
    fn c_i64(self) -> i64 {
        self as i64
    }
    fn c_u32(self) -> u32 {
        self as u32
    }
    fn c_u8(self) -> u8 {
        self as u8
    }
}

impl CastElem for f64 {
    fn c_f32(self) -> f32 {
        self as f32
    }
    fn c_f64(self) -> f64 {
        self
    }
    fn c_f16(self) -> f16 {
        f16::from_f64(self)
    }
    fn c_bf16(self) -> bf16 {
        bf16::from_f64(self)
    }
    fn c_i64(self) -> i64 {
        self as i64
    }
    fn c_u32(self) -> u32 {
        self as u32
    }
    fn c_u8(self) -> u8 {
        self as u8
    }
}

impl CastElem for f16 {
    fn c_f32(self) -> f32 {
        dynn_core::f16_to_f32(self)
    }
    fn c_f64(self) -> f64 {
        dynn_core::f16_to_f32(self) as f64
    }
    fn c_f16(self) -> f16 {
        self
    }
    fn c_bf16(self) -> bf16 {
        // f16 → f32 is exact, so this rounds once.
        bf16::from_f32(dynn_core::f16_to_f32(self))
    }
    fn c_i64(self) -> i64 {
        dynn_core::f16_to_f32(self) as i64
    }
    fn c_u32(self) -> u32 {
        dynn_core::f16_to_f32(self) as u32
    }
    fn c_u8(self) -> u8 {
        dynn_core::f16_to_f32(self) as u8
    }
}

impl CastElem for bf16 {
    fn c_f32(self) -> f32 {
        self.to_f32()
    }
    fn c_f64(self) -> f64 {
        self.to_f64()
    }
    fn c_f16(self) -> f16 {
        dynn_core::f32_to_f16(self.to_f32())
    }
    fn c_bf16(self) -> bf16 {
        self
    }
    fn c_i64(self) -> i64 {
        self.to_f32() as i64
    }
    fn c_u32(self) -> u32 {
        self.to_f32() as u32
    }
    fn c_u8(self) -> u8 {
        self.to_f32() as u8
    }
}

impl CastElem for i64 {
    fn c_f32(self) -> f32 {
        self as f32
    }
    fn c_f64(self) -> f64 {
        self as f64
    }
    fn c_f16(self) -> f16 {
        f16::from_f64(self as f64)
    }
    fn c_bf16(self) -> bf16 {
        bf16::from_f64(self as f64)
    }
    fn c_i64(self) -> i64 {
        self
    }
    fn c_u32(self) -> u32 {
        self as u32
    }
    fn c_u8(self) -> u8 {
        self as u8
    }
}

impl CastElem for u32 {
    fn c_f32(self) -> f32 {
        self as f32
    }
    fn c_f64(self) -> f64 {
        self as f64
    }
    fn c_f16(self) -> f16 {
        f16::from_f64(self as f64)
    }
    fn c_bf16(self) -> bf16 {
        bf16::from_f64(self as f64)
    }
    fn c_i64(self) -> i64 {
        self as i64
    }
    fn c_u32(self) -> u32 {
        self
    }
    fn c_u8(self) -> u8 {
        self as u8
    }
}

impl CastElem for u8 {
    fn c_f32(self) -> f32 {
        self as f32
    }
    fn c_f64(self) -> f64 {
        self as f64
    }
    fn c_f16(self) -> f16 {
        dynn_core::f32_to_f16(self as f32)
    }
    fn c_bf16(self) -> bf16 {
        bf16::from_f32(self as f32)
    }
    fn c_i64(self) -> i64 {
        self as i64
    }
    fn c_u32(self) -> u32 {
        self as u32
    }
    fn c_u8(self) -> u8 {
        self
    }
}

fn cast_slice<T: CastElem>(v: &[T], layout: &dynn_core::Layout, to: DType) -> CpuStorage {
    match to {
        DType::F32 => CpuStorage::F32(map_layout(v, layout, T::c_f32)),
        DType::F64 => CpuStorage::F64(map_layout(v, layout, T::c_f64)),
        DType::F16 => CpuStorage::F16(map_layout(v, layout, T::c_f16)),
        DType::BF16 => CpuStorage::BF16(map_layout(v, layout, T::c_bf16)),
        DType::I64 => CpuStorage::I64(map_layout(v, layout, T::c_i64)),
        DType::U32 => CpuStorage::U32(map_layout(v, layout, T::c_u32)),
        DType::U8 => CpuStorage::U8(map_layout(v, layout, T::c_u8)),
    }
}

/// The CUDA kernels: `cast_<from>_<to>` for every pair of the seven dtypes, each element
/// converted as the CPU converts it (`cv` below). They use no `scalar`, so one module
/// (compiled for the f32 scalar) serves all. f16 converts with the PTX `cvt` instructions
/// (round to nearest even); bf16 in integer arithmetic: from f32 round to nearest even, from
/// f64 through an f32 rounded to odd, which then rounds to nearest even exactly once.
pub const CUDA: CudaSource = CudaSource {
    name: "cast",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
// float -> integer: truncate toward zero, saturate, NaN -> 0 (Rust's `as`).
__device__ __forceinline__ i64 f2ll(float v) { return v != v ? 0 : __float2ll_rz(v); }
__device__ __forceinline__ i64 d2ll(double v) { return v != v ? 0 : __double2ll_rz(v); }
__device__ __forceinline__ u32 f2u(float v) { return v != v ? 0u : __float2uint_rz(v); }
__device__ __forceinline__ u32 d2u(double v) { return v != v ? 0u : __double2uint_rz(v); }
__device__ __forceinline__ u8 f2b8(float v) { return (u8)min(f2u(v), 255u); }
__device__ __forceinline__ u8 d2b8(double v) { return (u8)min(d2u(v), 255u); }

// cv(v, (To*)0): one element converted; the null pointer only selects the overload.
__device__ __forceinline__ float cv(float v, float*) { return v; }
__device__ __forceinline__ float cv(double v, float*) { return (float)v; }
__device__ __forceinline__ float cv(h16 v, float*) { return h2f(v); }
__device__ __forceinline__ float cv(b16 v, float*) { return b2f(v); }
__device__ __forceinline__ float cv(i64 v, float*) { return (float)v; }
__device__ __forceinline__ float cv(u32 v, float*) { return (float)v; }
__device__ __forceinline__ float cv(u8 v, float*) { return (float)v; }

__device__ __forceinline__ double cv(float v, double*) { return (double)v; }
__device__ __forceinline__ double cv(double v, double*) { return v; }
__device__ __forceinline__ double cv(h16 v, double*) { return (double)h2f(v); }
__device__ __forceinline__ double cv(b16 v, double*) { return (double)b2f(v); }
__device__ __forceinline__ double cv(i64 v, double*) { return (double)v; }
__device__ __forceinline__ double cv(u32 v, double*) { return (double)v; }
__device__ __forceinline__ double cv(u8 v, double*) { return (double)v; }

__device__ __forceinline__ h16 cv(float v, h16*) { return f2h(v); }
__device__ __forceinline__ h16 cv(double v, h16*) { return d2h(v); }
__device__ __forceinline__ h16 cv(h16 v, h16*) { return v; }
__device__ __forceinline__ h16 cv(b16 v, h16*) { return f2h(b2f(v)); }
__device__ __forceinline__ h16 cv(i64 v, h16*) { return d2h((double)v); }
__device__ __forceinline__ h16 cv(u32 v, h16*) { return d2h((double)v); }
__device__ __forceinline__ h16 cv(u8 v, h16*) { return f2h((float)v); }

__device__ __forceinline__ b16 cv(float v, b16*) { return f2b(v); }
__device__ __forceinline__ b16 cv(double v, b16*) { return d2b(v); }
__device__ __forceinline__ b16 cv(h16 v, b16*) { return f2b(h2f(v)); }
__device__ __forceinline__ b16 cv(b16 v, b16*) { return v; }
__device__ __forceinline__ b16 cv(i64 v, b16*) { return d2b((double)v); }
__device__ __forceinline__ b16 cv(u32 v, b16*) { return d2b((double)v); }
__device__ __forceinline__ b16 cv(u8 v, b16*) { return f2b((float)v); }

__device__ __forceinline__ i64 cv(float v, i64*) { return f2ll(v); }
__device__ __forceinline__ i64 cv(double v, i64*) { return d2ll(v); }
__device__ __forceinline__ i64 cv(h16 v, i64*) { return f2ll(h2f(v)); }
__device__ __forceinline__ i64 cv(b16 v, i64*) { return f2ll(b2f(v)); }
__device__ __forceinline__ i64 cv(i64 v, i64*) { return v; }
__device__ __forceinline__ i64 cv(u32 v, i64*) { return (i64)v; }
__device__ __forceinline__ i64 cv(u8 v, i64*) { return (i64)v; }

__device__ __forceinline__ u32 cv(float v, u32*) { return f2u(v); }
__device__ __forceinline__ u32 cv(double v, u32*) { return d2u(v); }
__device__ __forceinline__ u32 cv(h16 v, u32*) { return f2u(h2f(v)); }
__device__ __forceinline__ u32 cv(b16 v, u32*) { return f2u(b2f(v)); }
__device__ __forceinline__ u32 cv(i64 v, u32*) { return (u32)v; }
__device__ __forceinline__ u32 cv(u32 v, u32*) { return v; }
__device__ __forceinline__ u32 cv(u8 v, u32*) { return (u32)v; }

__device__ __forceinline__ u8 cv(float v, u8*) { return f2b8(v); }
__device__ __forceinline__ u8 cv(double v, u8*) { return d2b8(v); }
__device__ __forceinline__ u8 cv(h16 v, u8*) { return f2b8(h2f(v)); }
__device__ __forceinline__ u8 cv(b16 v, u8*) { return f2b8(b2f(v)); }
__device__ __forceinline__ u8 cv(i64 v, u8*) { return (u8)v; }
__device__ __forceinline__ u8 cv(u32 v, u8*) { return (u8)v; }
__device__ __forceinline__ u8 cv(u8 v, u8*) { return v; }

template <typename I, typename S, typename D>
__device__ void cast_t(const S* __restrict__ x, const Strided& xs, D* __restrict__ y, I n) {
    MAP(I, i, n, D, y, cv(x[sat<I>(xs, i)], (D*)0));
}

#define CAST(SN, S, DN, D) \
extern "C" __global__ void cast_##SN##_##DN(const S* x, Strided xs, D* y, i64 n, int small) { \
    if (small) cast_t<u32, S, D>(x, xs, y, (u32)n); \
    else cast_t<u64, S, D>(x, xs, y, (u64)n); \
}
#define CAST_FROM(SN, S) \
    CAST(SN, S, f32, float) CAST(SN, S, f64, double) CAST(SN, S, f16, h16) \
    CAST(SN, S, bf16, b16) CAST(SN, S, i64, i64) CAST(SN, S, u32, u32) CAST(SN, S, u8, u8)
CAST_FROM(f32, float)
CAST_FROM(f64, double)
CAST_FROM(f16, h16)
CAST_FROM(bf16, b16)
CAST_FROM(i64, i64)
CAST_FROM(u32, u32)
CAST_FROM(u8, u8)
"#
    ),
    half: false,
};

/// The kernel converting `from` to `to`.
fn cuda_kernel(from: DType, to: DType) -> &'static str {
    #[rustfmt::skip]
    const NAMES: [[&str; 7]; 7] = [
        ["cast_f32_f32", "cast_f32_f64", "cast_f32_f16", "cast_f32_bf16", "cast_f32_i64", "cast_f32_u32", "cast_f32_u8"],
        ["cast_f64_f32", "cast_f64_f64", "cast_f64_f16", "cast_f64_bf16", "cast_f64_i64", "cast_f64_u32", "cast_f64_u8"],
        ["cast_f16_f32", "cast_f16_f64", "cast_f16_f16", "cast_f16_bf16", "cast_f16_i64", "cast_f16_u32", "cast_f16_u8"],
        ["cast_bf16_f32", "cast_bf16_f64", "cast_bf16_f16", "cast_bf16_bf16", "cast_bf16_i64", "cast_bf16_u32", "cast_bf16_u8"],
        ["cast_i64_f32", "cast_i64_f64", "cast_i64_f16", "cast_i64_bf16", "cast_i64_i64", "cast_i64_u32", "cast_i64_u8"],
        ["cast_u32_f32", "cast_u32_f64", "cast_u32_f16", "cast_u32_bf16", "cast_u32_i64", "cast_u32_u32", "cast_u32_u8"],
        ["cast_u8_f32", "cast_u8_f64", "cast_u8_f16", "cast_u8_bf16", "cast_u8_i64", "cast_u8_u32", "cast_u8_u8"],
    ];
    let index = |d: DType| match d {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::I64 => 4,
        DType::U32 => 5,
        DType::U8 => 6,
    };
    NAMES[index(from)][index(to)]
}

/// `x` converted to `to` on the GPU (also used to round f32 results to a 16-bit output).
pub(crate) fn cuda_cast(x: &KernelArg<'_>, to: DType) -> Result<Box<dyn DeviceStorage>> {
    const NAME: &str = "to_dtype";
    let sx = cuda::storage(NAME, x)?;
    let dev = sx.dev();
    let n = x.layout.elem_count();
    let mut out = CudaStorage::alloc(dev, to, n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let c = coalesce(x.shape(), &[x.layout]);
    let small = index32(n, &[&c[0]]);
    let view = Strided::of(NAME, &c[0])?;
    let f = dev.function(&CUDA, DType::F32, cuda_kernel(x.dtype(), to))?;
    let n64 = n as i64;
    crate::cuda_launch!(
        dev,
        NAME,
        f,
        elementwise_grid(n),
        [sx.slice(), &view, out.slice_mut(), &n64, &small]
    )?;
    Ok(Box::new(out))
}

/// Converts from dtype `from` to dtype `to`.
#[derive(Debug, Clone, Copy)]
pub struct Cast {
    /// The input's dtype.
    pub from: DType,
    /// The output's dtype.
    pub to: DType,
}

impl Op for Cast {
    fn name(&self) -> &'static str {
        "to_dtype"
    }
    fn idioms(&self) -> Idioms {
        CAST_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        if x.dtype() != self.from {
            return Err(Error::DTypeMismatch {
                op: "to_dtype",
                expected: self.from,
                got: x.dtype(),
            });
        }
        Ok(smallvec![TensorSpec::new(x.shape().clone(), self.to)])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let x = inputs[0];
        Cost {
            flops: x.elem_count() as u64,
            bytes_read: (x.elem_count() * x.dtype().size_in_bytes()) as u64,
            bytes_written: outputs[0].size_in_bytes() as u64,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            if x.dtype() != self.from {
                return Err(Error::DTypeMismatch {
                    op: "to_dtype",
                    expected: self.from,
                    got: x.dtype(),
                });
            }
            return Ok(smallvec![cuda_cast(&x, self.to)?]);
        }
        let out = with_cpu_storage!(x.cpu("to_dtype")?, v => cast_slice(v, x.layout, self.to));
        Ok(crate::cpu::one(out))
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        Ok(smallvec![Some(ctx.grad(0)?.to_dtype(self.from)?)])
    }
    fn differentiable(&self) -> bool {
        self.from.is_float() && self.to.is_float()
    }
}

/// Dtype conversion.
pub trait CastOps {
    /// This tensor converted to `dtype` (the same tensor, no copy, when it already has it).
    /// Float → float rounds to nearest, float → integer truncates toward zero (saturating;
    /// NaN → 0), integer → float rounds to nearest, a narrower integer wraps. Differentiable between
    /// float dtypes.
    fn to_dtype(&self, dtype: DType) -> Result<Tensor>;
}

impl CastOps for Tensor {
    fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        execute1(
            Cast {
                from: self.dtype(),
                to: dtype,
            },
            &[self],
        )
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![OpInfo {
        name: "to_dtype",
        idioms: CAST_IDIOMS,
        differentiable: true,
        family: "cast",
    }]
}
