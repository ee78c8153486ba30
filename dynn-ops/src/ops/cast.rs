//! `to_dtype`: conversion between all six dtypes. Float to float rounds to nearest (even);
//! float to integer truncates toward zero like PyTorch (saturating at the integer's range, NaN
//! to 0); integer to float rounds to nearest; i64 to u32 wraps. Casting to the tensor's own
//! dtype returns the same tensor without a copy. Differentiable between float dtypes: the
//! gradient is cast back.

use crate::cpu::map_layout;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, CpuStorage, DType, Error, Idioms, InputGrads, KernelArg, Op, Outputs,
    Result, Specs, Tensor, TensorSpec, execute1,
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
}

impl CastElem for f32 {
    fn c_f32(self) -> f32 {
        self
    }
    fn c_f64(self) -> f64 {
        self as f64
    }
    fn c_f16(self) -> f16 {
        f16::from_f32(self)
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
}

impl CastElem for f16 {
    fn c_f32(self) -> f32 {
        self.to_f32()
    }
    fn c_f64(self) -> f64 {
        self.to_f64()
    }
    fn c_f16(self) -> f16 {
        self
    }
    fn c_bf16(self) -> bf16 {
        // f16 → f32 is exact, so this rounds once.
        bf16::from_f32(self.to_f32())
    }
    fn c_i64(self) -> i64 {
        self.to_f32() as i64
    }
    fn c_u32(self) -> u32 {
        self.to_f32() as u32
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
        f16::from_f32(self.to_f32())
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
}

fn cast_slice<T: CastElem>(v: &[T], layout: &dynn_core::Layout, to: DType) -> CpuStorage {
    match to {
        DType::F32 => CpuStorage::F32(map_layout(v, layout, T::c_f32)),
        DType::F64 => CpuStorage::F64(map_layout(v, layout, T::c_f64)),
        DType::F16 => CpuStorage::F16(map_layout(v, layout, T::c_f16)),
        DType::BF16 => CpuStorage::BF16(map_layout(v, layout, T::c_bf16)),
        DType::I64 => CpuStorage::I64(map_layout(v, layout, T::c_i64)),
        DType::U32 => CpuStorage::U32(map_layout(v, layout, T::c_u32)),
    }
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
    /// NaN → 0), integer → float rounds to nearest, i64 → u32 wraps. Differentiable between
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
