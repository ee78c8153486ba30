//! `r + a ⊙ b` as one op (PyTorch's `addcmul` with `value = 1`), with numpy broadcasting.
//!
//! A gated residual update (`z + update ⊙ gate`) written as `mul` then `add` leaves the sum
//! with a recipe that reads the product, which the run releases: the memory manager can only
//! copy such a sum out. As one op, the sum's recipe reads `r`, `a` and `b`, which the backward
//! pass keeps, so the manager can drop it and compute it again. The op runs the `mul` kernel
//! then the `add` kernel, so it gives the same bits as `r.add(&a.mul(&b)?)`.

use crate::ops::binary::{Binary, BinaryOps};
use crate::ops::reduce::ReduceOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, DeviceStorage, Error, Idioms, InputGrads, KernelArg, Layout, Op, Outputs,
    Result, Save, Specs, Tensor, TensorSpec, execute1, smallvec::smallvec,
};

/// `r + a ⊙ b`; inputs `(r, a, b)`, broadcast together.
#[derive(Debug, Clone, Copy)]
pub struct AddCMul;

/// Two element-wise maps (the product, then the sum).
const IDIOMS: Idioms = Idioms([0, 0, 0, 0, 2, 0]);

impl Op for AddCMul {
    fn name(&self) -> &'static str {
        "addcmul"
    }
    fn idioms(&self) -> Idioms {
        IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        crate::ops::same_float_dtype("addcmul", inputs)?;
        let (r, a, b) = (inputs[0], inputs[1], inputs[2]);
        let shape = r
            .shape()
            .broadcast_with(&a.shape().broadcast_with(b.shape(), "addcmul")?, "addcmul")?;
        Ok(smallvec![TensorSpec::new(shape, r.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        Cost::streaming(inputs, outputs, 2 * outputs[0].shape.elem_count() as u64)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let (r, a, b) = (inputs[0], inputs[1], inputs[2]);
        let product_shape = a.shape().broadcast_with(b.shape(), "addcmul")?;
        let product_spec = TensorSpec::new(product_shape.clone(), a.dtype());
        let mut product = Binary::Mul.forward(&[a, b], std::slice::from_ref(&product_spec))?;
        let product: Box<dyn DeviceStorage> = product
            .pop()
            .ok_or_else(|| Error::Msg("addcmul: the product gave no output".into()))?;
        let layout = Layout::contiguous(product_shape);
        let p = KernelArg {
            storage: &*product,
            layout: &layout,
        };
        // `r + p`, in that order, as the separate `add` would compute it.
        Binary::Add.forward(&[r, p], specs)
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0b110,
            outputs: 0,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        // As `add` then `mul` give them where the shapes agree; each summed to its input's.
        let g = ctx.grad(0)?;
        let shape = |i: usize| &ctx.input_specs[i].shape;
        let gr = ctx.needs(0).then(|| g.sum_to(shape(0))).transpose()?;
        let ga = ctx
            .needs(1)
            .then(|| g.mul(ctx.input(2)?)?.sum_to(shape(1)))
            .transpose()?;
        let gb = ctx
            .needs(2)
            .then(|| g.mul(ctx.input(1)?)?.sum_to(shape(2)))
            .transpose()?;
        Ok(smallvec![gr, ga, gb])
    }
}

/// The fused multiply-add of tensors.
pub trait AddCMulOps {
    /// `self + a ⊙ b` in one op, broadcasting all three; the same bits as
    /// `self.add(&a.mul(b)?)`.
    fn addcmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
}

impl AddCMulOps for Tensor {
    fn addcmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        execute1(AddCMul, &[self, a, b])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![OpInfo {
        name: "addcmul",
        idioms: IDIOMS,
        differentiable: true,
        family: "binary",
    }]
}
