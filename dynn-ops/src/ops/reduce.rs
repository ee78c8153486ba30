//! Reductions over dims with `keepdim`: sum (any set of dims), max and min (one dim at a
//! time; several dims reduce in turn), argmax, and the composites mean, var and `sum_to`.
//! Summation order depends only on the shape, never on thread timing.

use crate::cpu::{PAR_MIN, gather_layout};
use crate::math::simd;
use crate::ops::binary::BinaryOps;
use crate::ops::unary::UnaryOps;
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, CpuElement, DType, Dim, Error, FloatElement, Idioms, InputGrads,
    KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec, execute1,
    smallvec::SmallVec, smallvec::smallvec, vec_from_fill,
};
use rayon::prelude::*;

/// Which reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceKind {
    /// Σ
    Sum,
    /// max
    Max,
    /// min
    Min,
}

/// A reduction over `dims` (sorted, unique).
#[derive(Debug, Clone)]
pub struct Reduce {
    /// Which reduction.
    pub kind: ReduceKind,
    /// The reduced dims.
    pub dims: SmallVec<[usize; 4]>,
    /// Keep reduced dims as size 1.
    pub keepdim: bool,
}

fn out_shape(shape: &Shape, dims: &[usize], keepdim: bool) -> Shape {
    let d: Vec<usize> = shape
        .dims()
        .iter()
        .enumerate()
        .filter_map(|(i, &s)| {
            if dims.contains(&i) {
                keepdim.then_some(1)
            } else {
                Some(s)
            }
        })
        .collect();
    Shape::from(d)
}

/// The input as a contiguous `(outer, red, inner)` block: copies (permuting reduced dims last)
/// unless the input is contiguous and the reduced dims are one run.
fn as_blocks<'a, T: Copy + Send + Sync>(
    src: &'a [T],
    layout: &Layout,
    dims: &[usize],
) -> Result<(std::borrow::Cow<'a, [T]>, usize, usize, usize)> {
    let d = layout.dims();
    let run = dims.windows(2).all(|w| w[1] == w[0] + 1);
    let (first, last) = (
        dims.first().copied().unwrap_or(0),
        dims.last().map_or(0, |l| l + 1),
    );
    if run && let Some((a, b)) = layout.contiguous_range() {
        let outer = d[..first].iter().product();
        let red = d[first..last].iter().product();
        let inner = d[last..].iter().product();
        return Ok((std::borrow::Cow::Borrowed(&src[a..b]), outer, red, inner));
    }
    if run {
        let outer = d[..first].iter().product();
        let red = d[first..last].iter().product();
        let inner = d[last..].iter().product();
        return Ok((
            std::borrow::Cow::Owned(gather_layout(src, layout)),
            outer,
            red,
            inner,
        ));
    }
    let kept: Vec<usize> = (0..d.len()).filter(|i| !dims.contains(i)).collect();
    let perm: Vec<usize> = kept.iter().chain(dims.iter()).copied().collect();
    let p = layout.permute(&perm)?;
    let outer = kept.iter().map(|&i| d[i]).product();
    let red = dims.iter().map(|&i| d[i]).product();
    Ok((
        std::borrow::Cow::Owned(gather_layout(src, &p)),
        outer,
        red,
        1,
    ))
}

#[inline(always)]
fn combine<A: AccFloat>(kind: ReduceKind, a: A, b: A) -> A {
    match kind {
        ReduceKind::Sum => a + b,
        ReduceKind::Max => {
            if b > a || b.is_nan() {
                b
            } else {
                a
            }
        }
        ReduceKind::Min => {
            if b < a || b.is_nan() {
                b
            } else {
                a
            }
        }
    }
}

fn init<A: AccFloat>(kind: ReduceKind) -> A {
    match kind {
        ReduceKind::Sum => A::ZERO,
        ReduceKind::Max => A::NEG_INFINITY,
        ReduceKind::Min => A::INFINITY,
    }
}

/// Reduces a contiguous row with 16 independent lanes (vectorizes; fixed order).
#[inline(always)]
pub(crate) fn reduce_row<T: FloatElement>(kind: ReduceKind, row: &[T]) -> T::Acc {
    let mut acc = [init::<T::Acc>(kind); 16];
    let chunks = row.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for k in 0..16 {
            acc[k] = combine(kind, acc[k], c[k].to_acc());
        }
    }
    let mut w = 8;
    while w > 0 {
        for k in 0..w {
            acc[k] = combine(kind, acc[k], acc[k + w]);
        }
        w /= 2;
    }
    rem.iter()
        .fold(acc[0], |a, &x| combine(kind, a, x.to_acc()))
}

fn reduce_blocks<T: FloatElement + CpuElement>(
    kind: ReduceKind,
    x: &[T],
    outer: usize,
    red: usize,
    inner: usize,
) -> Vec<T> {
    let n_out = outer * inner;
    if red == 0 || n_out == 0 {
        // An empty reduced dim gives the identity; an empty output has nothing to compute
        // (and `chunks(0)` below would panic).
        return vec![T::from_acc(init(kind)); n_out];
    }
    if inner == 1 {
        return vec_from_fill(n_out, |out| {
            let body = |(o, row): (&mut std::mem::MaybeUninit<T>, &[T])| {
                o.write(T::from_acc(reduce_row(kind, row)));
            };
            if outer * red < PAR_MIN || red == 0 {
                if red == 0 {
                    out.iter_mut().for_each(|o| {
                        o.write(T::from_acc(init(kind)));
                    });
                } else {
                    simd(|| out.iter_mut().zip(x.chunks(red)).for_each(body));
                }
            } else {
                let rows = (PAR_MIN / red).max(1);
                out.par_chunks_mut(rows)
                    .zip(x.par_chunks(rows * red))
                    .for_each(|(o, xs)| simd(|| o.iter_mut().zip(xs.chunks(red)).for_each(body)));
            }
        });
    }
    // Column-style: accumulate whole rows of `inner` elements.
    let mut out = vec![init::<T::Acc>(kind); n_out];
    let body = |(o, block): (&mut [T::Acc], &[T])| {
        simd(|| {
            for r in 0..red {
                let row = &block[r * inner..(r + 1) * inner];
                for (a, &v) in o.iter_mut().zip(row) {
                    *a = combine(kind, *a, v.to_acc());
                }
            }
        })
    };
    if outer * red * inner < PAR_MIN || red == 0 {
        out.chunks_mut(inner)
            .zip(x.chunks(red * inner).chain(std::iter::repeat(&[][..])))
            .for_each(|(o, b)| {
                if red > 0 {
                    body((o, b))
                }
            });
    } else if outer >= rayon::current_num_threads() * 2 {
        out.par_chunks_mut(inner)
            .zip(x.par_chunks(red * inner))
            .for_each(body);
    } else {
        // Few outer blocks: split each block's columns across threads instead.
        let cols = 256.min(inner);
        for (o, block) in out.chunks_mut(inner).zip(x.chunks(red * inner)) {
            o.par_chunks_mut(cols).enumerate().for_each(|(ci, oc)| {
                let c0 = ci * cols;
                simd(|| {
                    for r in 0..red {
                        let row = &block[r * inner + c0..r * inner + c0 + oc.len()];
                        for (a, &v) in oc.iter_mut().zip(row) {
                            *a = combine(kind, *a, v.to_acc());
                        }
                    }
                })
            });
        }
    }
    out.into_iter().map(T::from_acc).collect()
}

impl Op for Reduce {
    fn name(&self) -> &'static str {
        match self.kind {
            ReduceKind::Sum => "sum",
            ReduceKind::Max => "max",
            ReduceKind::Min => "min",
        }
    }
    fn idioms(&self) -> Idioms {
        Idioms::REDUCE
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        if !x.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name(), x.dtype()));
        }
        if self.kind != ReduceKind::Sum && self.dims.len() != 1 {
            return Err(Error::invalid(
                self.name(),
                "max/min kernels reduce exactly one dim",
            ));
        }
        Ok(smallvec![TensorSpec::new(
            out_shape(x.shape(), &self.dims, self.keepdim),
            x.dtype()
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        let name = self.name();
        let kind = self.kind;
        let out = crate::float_dispatch!(name, x.cpu(name)?, |v| {
            let (data, outer, red, inner) = as_blocks(v, x.layout, &self.dims)?;
            Box::new(CpuElement::wrap(reduce_blocks(
                kind, &data, outer, red, inner,
            ))) as Box<dyn dynn_core::DeviceStorage>
        });
        Ok(smallvec![out])
    }
    fn save(&self) -> Save {
        match self.kind {
            ReduceKind::Sum => Save::NONE,
            _ => Save {
                inputs: 1,
                outputs: 1,
            },
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let in_shape = &ctx.input_specs[0].shape;
        let keep = out_shape(in_shape, &self.dims, true);
        let g = ctx.grad(0)?.reshape(keep.clone())?;
        match self.kind {
            ReduceKind::Sum => Ok(smallvec![Some(g.broadcast_as(in_shape.clone())?)]),
            _ => {
                let y = ctx.output(0)?.reshape(keep)?;
                let gx = execute1(
                    ExtremumBackward {
                        dim: self.dims[0],
                        kind: self.kind,
                    },
                    &[ctx.input(0)?, &y, &g],
                )?;
                Ok(smallvec![Some(gx)])
            }
        }
    }
}

/// Backward of max/min over one dim: the gradient goes to the extreme elements, split evenly
/// between ties. Inputs `(x, y_keepdim, grad_keepdim)`.
#[derive(Debug, Clone, Copy)]
struct ExtremumBackward {
    dim: usize,
    kind: ReduceKind,
}

impl Op for ExtremumBackward {
    fn name(&self) -> &'static str {
        if self.kind == ReduceKind::Min {
            "min_backward"
        } else {
            "max_backward"
        }
    }
    fn idioms(&self) -> Idioms {
        Idioms([0, 0, 1, 1, 1, 0])
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        Ok(smallvec![TensorSpec::new(
            inputs[0].shape().clone(),
            inputs[0].dtype()
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let (x, y, g) = (inputs[0], inputs[1], inputs[2]);
        let (ys, gs) = (y.cpu(name)?, g.cpu(name)?);
        let dim = self.dim;
        let out = crate::float_dispatch!(name, x.cpu(name)?, |xv| {
            let yv = gather_layout(ys.as_slice(name)?, y.layout);
            let gv = gather_layout(gs.as_slice(name)?, g.layout);
            Box::new(CpuElement::wrap(extremum_grad(
                xv,
                x.layout,
                &yv,
                &gv,
                dim,
                specs[0].shape.elem_count(),
            )?)) as Box<dyn dynn_core::DeviceStorage>
        });
        Ok(smallvec![out])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

fn extremum_grad<T: FloatElement + CpuElement>(
    xv: &[T],
    layout: &Layout,
    yv: &[T],
    gv: &[T],
    dim: usize,
    n: usize,
) -> Result<Vec<T>> {
    let (xb, outer, red, inner) = as_blocks(xv, layout, &[dim])?;
    let mut out = vec![T::from_acc(AccFloat::ZERO); n];
    for o in 0..outer {
        for i in 0..inner {
            let yy = yv[o * inner + i].to_acc();
            let idx = |r: usize| o * red * inner + r * inner + i;
            let ties = (0..red)
                .filter(|&r| xb[idx(r)].to_acc() == yy)
                .count()
                .max(1);
            let share = gv[o * inner + i].to_acc() / AccFloat::of(ties as f64);
            for r in 0..red {
                if xb[idx(r)].to_acc() == yy {
                    out[idx(r)] = T::from_acc(share);
                }
            }
        }
    }
    Ok(out)
}

/// Index of the largest element along one dim, as i64 (first on ties).
#[derive(Debug, Clone, Copy)]
pub struct Argmax {
    /// The dim.
    pub dim: usize,
    /// Keep the dim as size 1.
    pub keepdim: bool,
}

impl Op for Argmax {
    fn name(&self) -> &'static str {
        "argmax"
    }
    fn idioms(&self) -> Idioms {
        Idioms::REDUCE
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        if !x.dtype().is_float() {
            return Err(Error::unsupported_dtype("argmax", x.dtype()));
        }
        Ok(smallvec![TensorSpec::new(
            out_shape(x.shape(), &[self.dim], self.keepdim),
            DType::I64
        )])
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        let out = crate::float_dispatch!("argmax", x.cpu("argmax")?, |v| {
            let (b, outer, red, inner) = as_blocks(v, x.layout, &[self.dim])?;
            let mut out = vec![0i64; outer * inner];
            for o in 0..outer {
                for i in 0..inner {
                    let mut best = 0;
                    for r in 1..red {
                        let (c, m) = (
                            b[o * red * inner + r * inner + i].to_acc(),
                            b[o * red * inner + best * inner + i].to_acc(),
                        );
                        if c > m || (c.is_nan() && !m.is_nan()) {
                            best = r;
                        }
                    }
                    out[o * inner + i] = best as i64;
                }
            }
            dynn_core::CpuStorage::I64(out)
        });
        Ok(crate::cpu::one(out))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

fn resolve_dims<D: Dim>(x: &Tensor, dims: &[D], op: &'static str) -> Result<SmallVec<[usize; 4]>> {
    let mut v: SmallVec<[usize; 4]> = dims
        .iter()
        .map(|d| d.index(x.shape(), op))
        .collect::<Result<_>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Reductions over dims.
pub trait ReduceOps {
    /// Σ over `dims`.
    fn sum_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Σ over one dim, keeping it as size 1.
    fn sum_keepdim<D: Dim>(&self, dim: D) -> Result<Tensor>;
    /// Σ of all elements (a scalar).
    fn sum_all(&self) -> Result<Tensor>;
    /// Mean over `dims`.
    fn mean_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Mean of all elements (a scalar).
    fn mean_all(&self) -> Result<Tensor>;
    /// Max over `dims` (reduced one dim at a time).
    fn max_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Min over `dims`.
    fn min_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor>;
    /// Index of the max along `dim` (i64).
    fn argmax<D: Dim>(&self, dim: D, keepdim: bool) -> Result<Tensor>;
    /// Variance over `dims` with Bessel's correction when `unbiased`.
    fn var_dims<D: Dim>(&self, dims: &[D], keepdim: bool, unbiased: bool) -> Result<Tensor>;
    /// Sums broadcast dims away so the result has `shape` (the backward of broadcasting).
    fn sum_to(&self, shape: &Shape) -> Result<Tensor>;
}

fn extremum<D: Dim>(
    x: &Tensor,
    dims: &[D],
    keepdim: bool,
    kind: ReduceKind,
    op: &'static str,
) -> Result<Tensor> {
    let dims = resolve_dims(x, dims, op)?;
    let mut t = x.clone();
    for &d in dims.iter().rev() {
        t = execute1(
            Reduce {
                kind,
                dims: smallvec![d],
                keepdim: true,
            },
            &[&t],
        )?;
    }
    if keepdim {
        Ok(t)
    } else {
        t.reshape(out_shape(x.shape(), &dims, false))
    }
}

impl ReduceOps for Tensor {
    fn sum_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        let dims = resolve_dims(self, dims, "sum")?;
        execute1(
            Reduce {
                kind: ReduceKind::Sum,
                dims,
                keepdim,
            },
            &[self],
        )
    }
    fn sum_keepdim<D: Dim>(&self, dim: D) -> Result<Tensor> {
        self.sum_dims(&[dim], true)
    }
    fn sum_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.sum_dims(&dims, false)
    }
    fn mean_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        let r = resolve_dims(self, dims, "mean")?;
        let n: usize = r.iter().map(|&d| self.dims()[d]).product();
        self.sum_dims(&r, keepdim)?.scale(1.0 / n.max(1) as f64)
    }
    fn mean_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.mean_dims(&dims, false)
    }
    fn max_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        extremum(self, dims, keepdim, ReduceKind::Max, "max")
    }
    fn min_dims<D: Dim>(&self, dims: &[D], keepdim: bool) -> Result<Tensor> {
        extremum(self, dims, keepdim, ReduceKind::Min, "min")
    }
    fn argmax<D: Dim>(&self, dim: D, keepdim: bool) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "argmax")?;
        execute1(Argmax { dim, keepdim }, &[self])
    }
    fn var_dims<D: Dim>(&self, dims: &[D], keepdim: bool, unbiased: bool) -> Result<Tensor> {
        let r = resolve_dims(self, dims, "var")?;
        let n: usize = r.iter().map(|&d| self.dims()[d]).product();
        let dev = self.sub(&self.mean_dims(&r, true)?)?;
        let denom = if unbiased {
            n.saturating_sub(1).max(1)
        } else {
            n.max(1)
        };
        dev.sqr()?.sum_dims(&r, keepdim)?.scale(1.0 / denom as f64)
    }
    fn sum_to(&self, shape: &Shape) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let (src, dst) = (self.dims(), shape.dims());
        if dst.len() > src.len() {
            return Err(Error::shape_mismatch("sum_to", self.shape(), shape));
        }
        let lead = src.len() - dst.len();
        let mut dims: Vec<usize> = (0..lead).collect();
        for (i, &d) in dst.iter().enumerate() {
            if d == 1 && src[lead + i] != 1 {
                dims.push(lead + i);
            } else if d != src[lead + i] {
                return Err(Error::shape_mismatch("sum_to", self.shape(), shape));
            }
        }
        self.sum_dims(&dims, true)?.reshape(shape.clone())
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name, idioms, differentiable| OpInfo {
        name,
        idioms,
        differentiable,
        family: "reduce",
    };
    vec![
        f("sum", Idioms::REDUCE, true),
        f("max", Idioms::REDUCE, true),
        f("min", Idioms::REDUCE, true),
        f("max_backward", Idioms([0, 0, 1, 1, 1, 0]), false),
        f("min_backward", Idioms([0, 0, 1, 1, 1, 0]), false),
        f("argmax", Idioms::REDUCE, false),
    ]
}
