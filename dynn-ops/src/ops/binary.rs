//! Element-wise binary ops with numpy broadcasting: add, sub, mul, div, pow, maximum, minimum.
//! Backward reduces each gradient back to its input's shape (`sum_to`).

use crate::cpu::zip_layouts;
use crate::ops::reduce::ReduceOps;
use crate::ops::unary::UnaryOps;
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, CpuElement, CpuStorage, DeviceStorage, Error, FloatElement, Idioms,
    InputGrads, KernelArg, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec, execute1,
    smallvec::smallvec,
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
        let (sa, sb) = (a.cpu(name)?, b.cpu(name)?);
        let shape = &specs[0].shape;
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
        let (sa, sb) = (a.cpu(name)?, b.cpu(name)?);
        let shape = &specs[0].shape;
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
