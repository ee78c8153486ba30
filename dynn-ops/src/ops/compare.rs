//! Comparisons and selection: `eq`, `ne`, `lt`, `le`, `gt`, `ge` with broadcasting (dynn has
//! no bool dtype: they return U32 masks of 0/1), `where_cond` (differentiable in the two value
//! inputs, backward `where_backward`) and `masked_fill` (differentiable in the input; its
//! backward is `masked_fill` of the gradient with 0).
//!
//! A mask may be any dtype; an element is true when it is nonzero (NaN is nonzero).

use crate::cpu::{PAR_MIN, chunk_len, map_layout};
use crate::math::simd;
use crate::ops::reduce::ReduceOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, CpuElement, CpuStorage, DType, Element, Error, Idioms, InputGrads,
    KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec, execute,
    execute1, smallvec::smallvec, vec_from_fill, with_cpu_storage,
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

/// Applies `f` element-wise to three operands whose layouts are already broadcast to `shape`,
/// returning a contiguous output: one fused pass, parallel over chunks (contiguous inputs) or
/// rows (strided or broadcast inputs).
#[allow(clippy::too_many_arguments)]
fn zip3<M: Copy + Sync, T: Copy + Sync, U: Copy + Send>(
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
        return vec_from_fill(n, |out| {
            type Chunk<'a, M, T, U> = (((&'a mut [MaybeUninit<U>], &'a [M]), &'a [T]), &'a [T]);
            let body = |(((o, m), a), b): Chunk<'_, M, T, U>| {
                for (((o, &m), &x), &y) in o.iter_mut().zip(m).zip(a).zip(b) {
                    o.write(f(m, x, y));
                }
            };
            if n < PAR_MIN {
                simd(|| body((((out, m), a), b)));
            } else {
                let c = chunk_len(n);
                out.par_chunks_mut(c)
                    .zip(m.par_chunks(c))
                    .zip(a.par_chunks(c))
                    .zip(b.par_chunks(c))
                    .for_each(|x| simd(|| body(x)));
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

/// The mask as contiguous 0/1 bytes in its own shape (nonzero is true).
fn mask_bytes(op: &'static str, arg: &KernelArg<'_>) -> Result<Vec<u8>> {
    Ok(with_cpu_storage!(arg.cpu(op)?, v => mask_of(v, arg.layout)))
}

fn mask_of<T: Element>(v: &[T], layout: &Layout) -> Vec<u8> {
    let zero = T::zero();
    map_layout(v, layout, |x| u8::from(x != zero))
}

fn elem_cost(inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
    // One pass: every input read once, the output written once, one operation per element.
    let read: usize = inputs
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    let written: usize = outputs.iter().map(TensorSpec::size_in_bytes).sum();
    let flops: usize = outputs.iter().map(|s| s.shape.elem_count()).sum();
    Cost {
        flops: flops as u64,
        bytes_read: read as u64,
        bytes_written: written as u64,
    }
}

// ----- comparisons -----

fn compare_kernel<T: Element>(
    k: CmpOp,
    l: &[T],
    la: &KernelArg<'_>,
    r: &[T],
    ra: &KernelArg<'_>,
    shape: &Shape,
) -> Result<Vec<u32>> {
    let (ll, rl) = (
        la.layout.broadcast_as(shape)?,
        ra.layout.broadcast_as(shape)?,
    );
    // `zip3` with the left operand as its "mask" slot keeps one generic element loop.
    Ok(match k {
        CmpOp::Eq => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u32::from(CmpOp::Eq.f(a, b))
        }),
        CmpOp::Ne => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u32::from(CmpOp::Ne.f(a, b))
        }),
        CmpOp::Lt => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u32::from(CmpOp::Lt.f(a, b))
        }),
        CmpOp::Le => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u32::from(CmpOp::Le.f(a, b))
        }),
        CmpOp::Gt => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u32::from(CmpOp::Gt.f(a, b))
        }),
        CmpOp::Ge => zip3(l, &ll, r, &rl, r, &rl, shape, |a, b, _| {
            u32::from(CmpOp::Ge.f(a, b))
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
        Ok(smallvec![TensorSpec::new(shape, DType::U32)])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        elem_cost(inputs, outputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let (a, b) = (inputs[0], inputs[1]);
        let shape = &specs[0].shape;
        let out = match (a.cpu(name)?, b.cpu(name)?) {
            (CpuStorage::F32(l), CpuStorage::F32(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::F64(l), CpuStorage::F64(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::F16(l), CpuStorage::F16(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::BF16(l), CpuStorage::BF16(r)) => {
                compare_kernel(*self, l, &a, r, &b, shape)?
            }
            (CpuStorage::I64(l), CpuStorage::I64(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (CpuStorage::U32(l), CpuStorage::U32(r)) => compare_kernel(*self, l, &a, r, &b, shape)?,
            (l, r) => {
                return Err(Error::DTypeMismatch {
                    op: name,
                    expected: l.dtype(),
                    got: r.dtype(),
                });
            }
        };
        Ok(crate::cpu::one(CpuStorage::U32(out)))
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
        let shape = &specs[0].shape;
        let mask = mask_bytes("where_cond", &m)?;
        let ml = Layout::contiguous(m.shape().clone()).broadcast_as(shape)?;
        let out: CpuStorage = match specs[0].dtype {
            DType::F32 => CpuStorage::F32(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::F64 => CpuStorage::F64(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::F16 => CpuStorage::F16(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::BF16 => CpuStorage::BF16(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::I64 => CpuStorage::I64(select(&mask, &ml, &t, &f, shape, "where_cond")?),
            DType::U32 => CpuStorage::U32(select(&mask, &ml, &t, &f, shape, "where_cond")?),
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
        let shape = &specs[0].shape;
        let mask = mask_bytes("where_backward", &m)?;
        let ml = Layout::contiguous(m.shape().clone()).broadcast_as(shape)?;
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
        let shape = &specs[0].shape;
        let mask = mask_bytes("masked_fill", &m)?;
        let ml = Layout::contiguous(m.shape().clone()).broadcast_as(shape)?;
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

/// Comparisons (returning U32 0/1 masks) and mask-driven selection.
pub trait CompareOps {
    /// Compares element-wise with broadcasting; both operands share a dtype. Returns a U32
    /// mask of 0/1. Not differentiable.
    fn compare(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor>;
    /// Compares every element with the scalar `value` (converted to this tensor's dtype).
    fn compare_scalar(&self, value: f64, op: CmpOp) -> Result<Tensor>;
    /// `self == rhs` as a U32 mask.
    fn eq(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Eq)
    }
    /// `self != rhs` as a U32 mask.
    fn ne(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Ne)
    }
    /// `self < rhs` as a U32 mask.
    fn lt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Lt)
    }
    /// `self <= rhs` as a U32 mask.
    fn le(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Le)
    }
    /// `self > rhs` as a U32 mask.
    fn gt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.compare(rhs, CmpOp::Gt)
    }
    /// `self >= rhs` as a U32 mask.
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
        let s = Tensor::full(value, Shape::scalar(), self.dtype(), self.device())?;
        execute1(op, &[self, &s])
    }
    fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        execute1(WhereCond, &[self, on_true, on_false])
    }
    fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        execute1(MaskedFill { value }, &[self, mask])
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
