//! Logic on masks: `logical_and`, `logical_or`, `logical_xor` (with broadcasting) and
//! `logical_not`. Inputs may be any dtype (nonzero is true, NaN too, -0.0 not); the result is
//! a U8 mask of 0/1, as the comparisons return. Not differentiable.

use crate::cuda::{self, CudaSource, CudaStorage};
use crate::ops::binary::{cuda_elementwise_helpers, elementwise_grid};
use crate::ops::compare::{COMPARE_IDIOMS, elem_cost, mask_bytes, mask_view, u8_mask, views, zip3};
use crate::registry::OpInfo;
use dynn_core::{
    Cost, CpuStorage, DType, DeviceStorage, Idioms, KernelArg, Op, Outputs, Result, Specs, Tensor,
    TensorSpec, execute1, smallvec::smallvec,
};

/// Which logical op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logic {
    /// Both true.
    And,
    /// Either true.
    Or,
    /// Exactly one true.
    Xor,
    /// Not true (one input).
    Not,
}

impl Logic {
    /// Every logical op.
    pub const ALL: [Logic; 4] = [Logic::And, Logic::Or, Logic::Xor, Logic::Not];

    /// The op name.
    pub fn name(self) -> &'static str {
        match self {
            Logic::And => "logical_and",
            Logic::Or => "logical_or",
            Logic::Xor => "logical_xor",
            Logic::Not => "logical_not",
        }
    }

    /// The truth of `a op b` (`b` is ignored by `Not`).
    #[inline(always)]
    fn f(self, a: bool, b: bool) -> u8 {
        u8::from(match self {
            Logic::And => a && b,
            Logic::Or => a || b,
            Logic::Xor => a != b,
            Logic::Not => !a,
        })
    }

    /// Its number in the CUDA kernel.
    fn code(self) -> i32 {
        self as i32
    }
}

/// The CUDA kernel: both operands arrive as u8 masks (another dtype is first turned into one
/// by the comparison family's `nonzero_*`), read through broadcast views.
pub const CUDA: CudaSource = CudaSource {
    name: "logical",
    code: concat!(
        cuda_elementwise_helpers!(),
        r#"
__device__ __forceinline__ u8 logic(int kind, u8 a, u8 b) {
    bool x = a != 0, y = b != 0;
    return (u8)(kind == 0 ? (x && y) : kind == 1 ? (x || y) : kind == 2 ? (x != y) : !x);
}

template <typename I>
__device__ void logical_t(int kind, const u8* __restrict__ a, const Strided& as,
                          const u8* __restrict__ b, const Strided& bs, u8* __restrict__ y, I n) {
    MAP(I, i, n, u8, y, logic(kind, a[sat<I>(as, i)], b[sat<I>(bs, i)]));
}

extern "C" __global__ void logical(int kind, const u8* a, Strided as, const u8* b, Strided bs,
                                   u8* y, i64 n, int small) {
    if (small) logical_t<u32>(kind, a, as, b, bs, y, (u32)n);
    else logical_t<u64>(kind, a, as, b, bs, y, (u64)n);
}
"#
    ),
    half: false,
};

fn cuda_logical(
    k: Logic,
    inputs: &[KernelArg<'_>],
    shape: &dynn_core::Shape,
) -> Result<CudaStorage> {
    let name = k.name();
    let a = &inputs[0];
    let ca = u8_mask(name, a)?;
    let (sa, la) = mask_view(name, a, &ca)?;
    // `logical_not` reads its one mask as both operands.
    let cb = match inputs.get(1) {
        Some(b) => Some((b, u8_mask(name, b)?)),
        None => None,
    };
    let (sb, lb) = match &cb {
        Some((b, c)) => mask_view(name, b, c)?,
        None => (sa, la),
    };
    let dev = sa.dev();
    let n = shape.elem_count();
    let mut out = CudaStorage::alloc(dev, DType::U8, n)?;
    if n == 0 {
        return Ok(out);
    }
    let (v, small) = views(name, shape, &[la, lb])?;
    let f = dev.function(&CUDA, DType::F32, "logical")?;
    let (kind, n64) = (k.code(), n as i64);
    crate::cuda_launch!(
        dev,
        name,
        f,
        elementwise_grid(n),
        [
            &kind,
            sa.slice(),
            &v[0],
            sb.slice(),
            &v[1],
            out.slice_mut(),
            &n64,
            &small
        ]
    )?;
    Ok(out)
}

impl Op for Logic {
    fn name(&self) -> &'static str {
        Logic::name(*self)
    }
    fn idioms(&self) -> Idioms {
        COMPARE_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let shape = match inputs {
            [a] => a.shape().clone(),
            [a, b] => a.shape().broadcast_with(b.shape(), self.name())?,
            _ => {
                return Err(dynn_core::Error::invalid(
                    self.name(),
                    format!("takes 1 or 2 masks, got {}", inputs.len()),
                ));
            }
        };
        Ok(smallvec![TensorSpec::new(shape, DType::U8)])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        elem_cost(inputs, outputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let shape = &specs[0].shape;
        if cuda::on_cuda(inputs) {
            let out: Box<dyn DeviceStorage> = Box::new(cuda_logical(*self, inputs, shape)?);
            return Ok(smallvec![out]);
        }
        let name = self.name();
        let (a, al) = mask_bytes(name, &inputs[0], shape)?;
        let k = *self;
        let out = match inputs.get(1) {
            Some(b) => {
                let (b, bl) = mask_bytes(name, b, shape)?;
                zip3(&a, &al, &b, &bl, &b, &bl, shape, |x, y, _| {
                    k.f(x != 0, y != 0)
                })
            }
            None => zip3(&a, &al, &a, &al, &a, &al, shape, |x, _, _| {
                k.f(x != 0, false)
            }),
        };
        Ok(crate::cpu::one(CpuStorage::U8(out)))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// Logic on masks (any dtype, nonzero is true), returning U8 masks of 0/1.
pub trait LogicalOps {
    /// `self && rhs` element-wise, with broadcasting.
    fn logical_and(&self, rhs: &Tensor) -> Result<Tensor>;
    /// `self || rhs` element-wise, with broadcasting.
    fn logical_or(&self, rhs: &Tensor) -> Result<Tensor>;
    /// `self != rhs` (as truths) element-wise, with broadcasting.
    fn logical_xor(&self, rhs: &Tensor) -> Result<Tensor>;
    /// `!self` element-wise.
    fn logical_not(&self) -> Result<Tensor>;
}

impl LogicalOps for Tensor {
    fn logical_and(&self, rhs: &Tensor) -> Result<Tensor> {
        execute1(Logic::And, &[self, rhs])
    }
    fn logical_or(&self, rhs: &Tensor) -> Result<Tensor> {
        execute1(Logic::Or, &[self, rhs])
    }
    fn logical_xor(&self, rhs: &Tensor) -> Result<Tensor> {
        execute1(Logic::Xor, &[self, rhs])
    }
    fn logical_not(&self) -> Result<Tensor> {
        execute1(Logic::Not, &[self])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    Logic::ALL
        .iter()
        .map(|k| OpInfo {
            name: k.name(),
            idioms: COMPARE_IDIOMS,
            differentiable: false,
            family: "logical",
        })
        .collect()
}
