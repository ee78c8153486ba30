//! The dense layer as one op: `x W + b` (PyTorch's `addmm`), optionally followed by an
//! activation (`act(x W + b)`) or added to a residual (`r + x W + b`).
//!
//! One op instead of two or three matters to the memory manager more than to the clock: the
//! output's recipe reads only the layer's input, its parameters and the residual, which the
//! backward pass keeps anyway, so the manager can drop the output and compute it again. A
//! separate `relu` or `add` after a `linear` reads the `linear`'s output, which the run
//! releases; such a recipe cannot run again, and its output can only be copied out.
//!
//! The epilogue runs the very kernel the separate op would (`relu`, `sigmoid`, `tanh`,
//! `add`) on the product before it becomes a tensor, so the fused op gives the same bits as
//! `linear` then the activation or the addition.

use crate::cuda;
use crate::ops::binary::Binary;
use crate::ops::matmul::{MatmulOps, cpu_matmul, cuda_matmul, problem, weight_grad};
use crate::ops::reduce::ReduceOps;
use crate::ops::same_float_dtype;
use crate::ops::unary::{Unary, UnaryBackward};
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, DeviceStorage, Error, Idioms, InputGrads, KernelArg, Layout, Op, Outputs,
    Result, Save, Specs, Tensor, TensorSpec, execute1, smallvec::smallvec,
};

/// An activation a [`Linear`] can apply to its output: one whose derivative follows from
/// the output alone, so the backward pass needs no pre-activation tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// max(x, 0)
    Relu,
    /// 1 / (1 + e⁻ˣ)
    Sigmoid,
    /// tanh(x)
    Tanh,
}

impl Activation {
    /// Every activation.
    pub const ALL: [Activation; 3] = [Activation::Relu, Activation::Sigmoid, Activation::Tanh];

    /// The element-wise op it is.
    fn unary(self) -> Unary {
        match self {
            Activation::Relu => Unary::Relu,
            Activation::Sigmoid => Unary::Sigmoid,
            Activation::Tanh => Unary::Tanh,
        }
    }
}

/// What a [`Linear`] does to `x W + b` before storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// Nothing: `x W + b`.
    None,
    /// `act(x W + b)`.
    Act(Activation),
    /// `r + x W + b`, `r` (the fourth input) of the output's shape.
    Residual,
}

/// `x W + b` over the last dim of `x` (`W` is `(in, out)`, `b` is `(out,)`), as one kernel,
/// then its [`Epilogue`]. The output starts as the bias rows and the product accumulates
/// into it, so no product without the bias is stored and no second pass adds it.
#[derive(Debug, Clone, Copy)]
pub struct Linear(pub Epilogue);

/// A multiply-accumulate, then the bias: a second element-wise map.
const IDIOMS: Idioms = Idioms([0, 0, 0, 1, 2, 0]);
/// The same, then the activation or the residual: a third map.
const EPILOGUE_IDIOMS: Idioms = Idioms([0, 0, 0, 1, 3, 0]);

impl Linear {
    /// Every variant, one per op name.
    pub const ALL: [Linear; 5] = [
        Linear(Epilogue::None),
        Linear(Epilogue::Act(Activation::Relu)),
        Linear(Epilogue::Act(Activation::Sigmoid)),
        Linear(Epilogue::Act(Activation::Tanh)),
        Linear(Epilogue::Residual),
    ];

    /// The op name.
    pub fn name(self) -> &'static str {
        match self.0 {
            Epilogue::None => "linear",
            Epilogue::Act(Activation::Relu) => "linear_relu",
            Epilogue::Act(Activation::Sigmoid) => "linear_sigmoid",
            Epilogue::Act(Activation::Tanh) => "linear_tanh",
            Epilogue::Residual => "add_linear",
        }
    }

    /// The idiom counts.
    fn idioms(self) -> Idioms {
        match self.0 {
            Epilogue::None => IDIOMS,
            _ => EPILOGUE_IDIOMS,
        }
    }

    /// How many inputs the op takes.
    fn arity(self) -> usize {
        if self.0 == Epilogue::Residual { 4 } else { 3 }
    }

    /// Applies the epilogue to the product `z` (contiguous, of `spec`'s shape).
    fn epilogue(
        self,
        z: Box<dyn DeviceStorage>,
        inputs: &[KernelArg<'_>],
        spec: &TensorSpec,
    ) -> Result<Box<dyn DeviceStorage>> {
        let layout = Layout::contiguous(spec.shape.clone());
        let z_arg = KernelArg {
            storage: &*z,
            layout: &layout,
        };
        let specs = std::slice::from_ref(spec);
        let mut out = match self.0 {
            Epilogue::None => return Ok(z),
            Epilogue::Act(a) => a.unary().forward(&[z_arg], specs)?,
            // `r + z`, in that order, as the separate `add` would compute it.
            Epilogue::Residual => Binary::Add.forward(&[inputs[3], z_arg], specs)?,
        };
        out.pop()
            .ok_or_else(|| Error::Msg(format!("{}: the epilogue gave no output", self.name())))
    }
}

impl Op for Linear {
    fn name(&self) -> &'static str {
        Linear::name(*self)
    }
    fn idioms(&self) -> Idioms {
        Linear::idioms(*self)
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = self.name();
        if inputs.len() != self.arity() {
            return Err(Error::invalid(
                name,
                format!("takes {} inputs, got {}", self.arity(), inputs.len()),
            ));
        }
        let (x, w, b) = (inputs[0], inputs[1], inputs[2]);
        same_float_dtype(name, inputs)?;
        if w.rank() != 2 {
            return Err(Error::invalid(
                name,
                format!("the weight must be (in, out), got {}", w.shape()),
            ));
        }
        let p = problem(name, x.shape(), w.shape())?;
        if b.dims() != [p.n] {
            return Err(Error::invalid(
                name,
                format!(
                    "the bias must be (out,) = ({},) for weight {}, got {}",
                    p.n,
                    w.shape(),
                    b.shape()
                ),
            ));
        }
        let dims = p.out_dims();
        if let Some(r) = inputs.get(3)
            && r.dims() != dims.as_slice()
        {
            return Err(Error::invalid(
                name,
                format!(
                    "the residual must have the output's shape {:?}, got {}",
                    dims,
                    r.shape()
                ),
            ));
        }
        Ok(smallvec![TensorSpec::new(dims, x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let product =
            problem(self.name(), inputs[0].shape(), inputs[1].shape()).map_or(0, |p| p.flops());
        // The bias, then the epilogue's map: one or two operations per output element.
        let maps = if self.0 == Epilogue::None { 1 } else { 2 };
        let n = outputs[0].shape.elem_count() as u64;
        Cost::streaming(inputs, outputs, product + maps * n)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let (x, w, b) = (&inputs[0], &inputs[1], &inputs[2]);
        let z: Box<dyn DeviceStorage> = if cuda::on_cuda(inputs) {
            cuda_matmul(name, x, w, Some(b), 1.0)?
        } else {
            Box::new(cpu_matmul(name, x, w, Some(b), 1.0)?)
        };
        Ok(smallvec![self.epilogue(z, inputs, &specs[0])?])
    }
    fn save(&self) -> Save {
        // The input and the weight; the bias's and the residual's gradients need only the
        // output's, and an activation's derivative reads its output.
        let outputs = if matches!(self.0, Epilogue::Act(_)) {
            1
        } else {
            0
        };
        Save {
            inputs: 0b011,
            outputs,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g_out = ctx.grad(0)?;
        // The gradient of `x W + b`.
        let act_grad;
        let g = match self.0 {
            Epilogue::Act(a) => {
                act_grad = execute1(UnaryBackward(a.unary()), &[ctx.output(0)?, g_out])?;
                &act_grad
            }
            _ => g_out,
        };
        let gx = ctx
            .needs(0)
            .then(|| g.matmul(&ctx.input(1)?.t()?))
            .transpose()?;
        let gw = ctx
            .needs(1)
            .then(|| weight_grad(ctx.input(0)?, &ctx.input_specs[1].shape, g))
            .transpose()?;
        let gb = ctx
            .needs(2)
            .then(|| g.sum_to(&ctx.input_specs[2].shape))
            .transpose()?;
        let mut grads = smallvec![gx, gw, gb];
        if self.0 == Epilogue::Residual {
            grads.push(ctx.needs(3).then(|| g_out.clone()));
        }
        Ok(grads)
    }
}

/// The dense layer's ops.
pub trait LinearOps {
    /// `self @ weight + bias` in one kernel (PyTorch's `addmm`): `self` is `(..., in)` (rank
    /// at least 2), `weight` is `(in, out)`, `bias` is `(out,)`; the result is `(..., out)`.
    fn linear(&self, weight: &Tensor, bias: &Tensor) -> Result<Tensor>;
    /// `act(self @ weight + bias)` in one op, with the same bits as [`Self::linear`] then
    /// the activation; shapes as in [`Self::linear`].
    fn linear_act(&self, weight: &Tensor, bias: &Tensor, act: Activation) -> Result<Tensor>;
    /// `self + x @ weight + bias` in one op, with the same bits as `self.add(&x.linear(..))`;
    /// `self` must have the result's shape `(..., out)`.
    fn add_linear(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor>;
}

impl LinearOps for Tensor {
    fn linear(&self, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        execute1(Linear(Epilogue::None), &[self, weight, bias])
    }
    fn linear_act(&self, weight: &Tensor, bias: &Tensor, act: Activation) -> Result<Tensor> {
        execute1(Linear(Epilogue::Act(act)), &[self, weight, bias])
    }
    fn add_linear(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        execute1(Linear(Epilogue::Residual), &[x, weight, bias, self])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    Linear::ALL
        .iter()
        .map(|l| OpInfo {
            name: l.name(),
            idioms: l.idioms(),
            differentiable: true,
            family: "matmul",
        })
        .collect()
}
