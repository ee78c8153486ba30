//! Layer normalization and RMS normalization over the last dim, each one fused kernel
//! forward and one fused kernel backward.
//!
//! Forward outputs the normalized tensor and, as small extra outputs, the per-row statistics
//! the backward needs (mean and 1/std for layer norm, 1/rms for RMS norm; in the accumulator
//! dtype: f64 for f64 inputs, f32 otherwise). Backward (`layer_norm_backward`,
//! `rms_norm_backward`) produces dx, dweight and dbias in one op. The weight and bias
//! gradients are sums over rows: each fixed chunk of rows (the chunking depends only on the
//! shape) produces a partial sum, and the partials are added in chunk order, so the result
//! never depends on thread timing.

use crate::float_dispatch;
use crate::math::FastMath;
use crate::ops::softmax::{RowKernel, Rows, acc_dtype, boxed, run_rows, sum_map, sum_map2};
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, Error, FloatElement, Idioms, InputGrads, KernelArg,
    Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec, execute,
    smallvec::SmallVec, smallvec::smallvec,
};
use std::mem::MaybeUninit;

/// Which normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) · w + b`.
    Layer,
    /// `x / sqrt(mean(x²) + eps) · w`.
    Rms,
}

/// A normalization over the last dim. Inputs: `x`, then the weight when `has_weight`, then
/// the bias when `has_bias` (both of shape `(C,)`, C the last dim of x, same dtype as x).
/// Outputs: `y`, then (layer norm only) the per-row mean, then the per-row 1/std.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    /// Which normalization.
    pub kind: NormKind,
    /// Added to the variance (mean square) before the square root.
    pub eps: f64,
    /// Whether a weight (scale) input follows x.
    pub has_weight: bool,
    /// Whether a bias input follows (layer norm only).
    pub has_bias: bool,
}

impl Norm {
    /// Idioms of layer norm: two row reductions (mean, variance) and one element-wise map
    /// (normalize, scale, shift). The paper's table has only batch norm
    /// (`[0,1,1,1,1,0]`, in place with running stats); dynn's norms write fresh outputs.
    pub const LAYER_IDIOMS: Idioms = Idioms([0, 0, 0, 2, 1, 0]);
    /// Idioms of layer norm backward: two row reductions (Σ dxhat, Σ dxhat·xhat), the
    /// column reduction for dweight/dbias, and one map.
    pub const LAYER_BACKWARD_IDIOMS: Idioms = Idioms([0, 0, 0, 3, 1, 0]);
    /// Idioms of RMS norm: one row reduction (mean square) and one map.
    pub const RMS_IDIOMS: Idioms = Idioms([0, 0, 0, 1, 1, 0]);
    /// Idioms of RMS norm backward: one row reduction, the column reduction for dweight, one map.
    pub const RMS_BACKWARD_IDIOMS: Idioms = Idioms([0, 0, 0, 2, 1, 0]);

    fn stats(&self) -> usize {
        match self.kind {
            NormKind::Layer => 2,
            NormKind::Rms => 1,
        }
    }
}

/// The shape of the per-row statistics: x's shape without its last dim.
fn stat_shape(x: &Shape) -> Shape {
    let d = x.dims();
    Shape::new(&d[..d.len().saturating_sub(1)])
}

/// Checks x (float, rank ≥ 1, non-empty last dim) and a `(C,)` parameter of x's dtype.
fn check_x(op: &'static str, x: &Tensor) -> Result<usize> {
    if !x.dtype().is_float() {
        return Err(Error::unsupported_dtype(op, x.dtype()));
    }
    let c = match x.dims().last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(Error::invalid(
                op,
                format!(
                    "normalizes the last dim, which must be non-empty; got shape {}",
                    x.shape()
                ),
            ));
        }
    };
    Ok(c)
}

fn check_param(op: &'static str, what: &str, x: &Tensor, p: &Tensor, c: usize) -> Result<()> {
    if p.dims() != [c] {
        return Err(Error::invalid(
            op,
            format!(
                "{what} must have shape [{c}] (the last dim of x {}), got {}",
                x.shape(),
                p.shape()
            ),
        ));
    }
    if p.dtype() != x.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            expected: x.dtype(),
            got: p.dtype(),
        });
    }
    Ok(())
}

/// A `(C,)` parameter as accumulator values, or `fill` when absent.
fn param_acc<T: FloatElement + CpuElement>(
    op: &'static str,
    p: Option<&KernelArg<'_>>,
    c: usize,
    fill: f64,
) -> Result<Vec<T::Acc>> {
    match p {
        None => Ok(vec![<T::Acc as AccFloat>::of(fill); c]),
        Some(a) => {
            let s = a.cpu(op)?.as_slice::<T>(op)?;
            Ok(a.layout.indices().map(|i| s[i].to_acc()).collect())
        }
    }
}

// ----- forward -----

/// Normalizes one row; returns `(mean, rstd)` (mean is 0 for RMS norm).
#[inline(always)]
fn norm_row<T: FloatElement>(
    kind: NormKind,
    eps: T::Acc,
    x: &[T],
    w: &[T::Acc],
    b: &[T::Acc],
    out: &mut [MaybeUninit<T>],
) -> (T::Acc, T::Acc)
where
    T::Acc: FastMath,
{
    {
        let c = <T::Acc as AccFloat>::of(x.len() as f64);
        let one = <T::Acc as AccFloat>::ONE;
        match kind {
            NormKind::Layer => {
                let mean = sum_map(x, |v: T| v.to_acc()) / c;
                let var = sum_map(x, |v: T| {
                    let d = v.to_acc() - mean;
                    d * d
                }) / c;
                let rstd = one / (var + eps).sqrt();
                for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                    o.write(T::from_acc((v.to_acc() - mean) * rstd * w + b));
                }
                (mean, rstd)
            }
            NormKind::Rms => {
                let ms = sum_map(x, |v: T| {
                    let a = v.to_acc();
                    a * a
                }) / c;
                let rstd = one / (ms + eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                    o.write(T::from_acc(v.to_acc() * rstd * w));
                }
                (<T::Acc as AccFloat>::ZERO, rstd)
            }
        }
    }
}

type NormOut<T, A> = (Vec<T>, Vec<A>, Vec<A>);

/// The forward over rows; each chunk's state collects its rows' `(mean, rstd)`.
struct NormRows<'r, 'a, T: FloatElement> {
    kind: NormKind,
    eps: T::Acc,
    x: &'r Rows<'a, T>,
    w: &'r [T::Acc],
    b: &'r [T::Acc],
}

impl<T: FloatElement> RowKernel for NormRows<'_, '_, T>
where
    T::Acc: FastMath,
{
    type Out = T;
    type State = Vec<(T::Acc, T::Acc)>;
    fn out_len(&self) -> usize {
        self.x.len
    }
    fn work_len(&self) -> usize {
        self.x.len
    }
    fn state(&self) -> Self::State {
        Vec::new()
    }
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], stats: &mut Self::State) {
        stats.push(norm_row(
            self.kind,
            self.eps,
            self.x.row(r),
            self.w,
            self.b,
            out,
        ));
    }
}

fn norm_fwd<T: FloatElement + CpuElement>(
    norm: &Norm,
    x: &[T],
    xl: &Layout,
    w: &[T::Acc],
    b: &[T::Acc],
) -> Result<NormOut<T, T::Acc>>
where
    T::Acc: FastMath,
{
    let x = Rows::last(x, xl)?;
    let k = NormRows {
        kind: norm.kind,
        eps: <T::Acc as AccFloat>::of(norm.eps),
        x: &x,
        w,
        b,
    };
    let (y, stats) = run_rows(&k, x.rows());
    let (mean, rstd) = stats.into_iter().flatten().unzip();
    Ok((y, mean, rstd))
}

fn fwd_kernel<T: FloatElement + CpuElement>(
    norm: &Norm,
    v: &[T],
    xl: &Layout,
    wa: Option<&KernelArg<'_>>,
    ba: Option<&KernelArg<'_>>,
    c: usize,
) -> Result<Outputs>
where
    T::Acc: FastMath + CpuElement,
{
    let name = norm.name();
    let w = param_acc::<T>(name, wa, c, 1.0)?;
    let b = param_acc::<T>(name, ba, c, 0.0)?;
    let (y, mean, rstd) = norm_fwd(norm, v, xl, &w, &b)?;
    Ok(match norm.kind {
        NormKind::Layer => smallvec![boxed(y), boxed(mean), boxed(rstd)],
        NormKind::Rms => smallvec![boxed(y), boxed(rstd)],
    })
}

impl Op for Norm {
    fn name(&self) -> &'static str {
        match self.kind {
            NormKind::Layer => "layer_norm",
            NormKind::Rms => "rms_norm",
        }
    }
    fn idioms(&self) -> Idioms {
        match self.kind {
            NormKind::Layer => Self::LAYER_IDIOMS,
            NormKind::Rms => Self::RMS_IDIOMS,
        }
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = self.name();
        let want = 1 + self.has_weight as usize + self.has_bias as usize;
        if inputs.len() != want {
            return Err(Error::invalid(
                name,
                format!("expects {want} inputs, got {}", inputs.len()),
            ));
        }
        if self.kind == NormKind::Rms && self.has_bias {
            return Err(Error::invalid(name, "RMS norm takes no bias"));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(
                name,
                format!("eps must be finite and >= 0, got {}", self.eps),
            ));
        }
        let x = inputs[0];
        let c = check_x(name, x)?;
        let mut i = 1;
        if self.has_weight {
            check_param(name, "weight", x, inputs[i], c)?;
            i += 1;
        }
        if self.has_bias {
            check_param(name, "bias", x, inputs[i], c)?;
        }
        let st = TensorSpec::new(stat_shape(x.shape()), acc_dtype(x.dtype()));
        let mut specs: Specs = smallvec![TensorSpec::new(x.shape().clone(), x.dtype())];
        for _ in 0..self.stats() {
            specs.push(st.clone());
        }
        Ok(specs)
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        let read: usize = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let written: usize = outputs.iter().map(TensorSpec::size_in_bytes).sum();
        // Layer: mean (1), variance (3), normalize + affine (4). RMS: square-sum (2), scale (2).
        let per = if self.kind == NormKind::Layer { 8 } else { 4 };
        Cost {
            flops: per * n,
            bytes_read: read as u64,
            bytes_written: written as u64,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let x = inputs[0];
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let wa = self.has_weight.then(|| &inputs[1]);
        let ba = self.has_bias.then(|| &inputs[1 + self.has_weight as usize]);
        Ok(float_dispatch!(name, x.cpu(name)?, |v| fwd_kernel(
            self, v, x.layout, wa, ba, c
        )?))
    }
    fn save(&self) -> Save {
        let inputs = if self.has_weight { 0b11 } else { 0b1 };
        let outputs = match self.kind {
            NormKind::Layer => 0b110,
            NormKind::Rms => 0b10,
        };
        Save { inputs, outputs }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let x = ctx.input(0)?;
        let mut ins: SmallVec<[&Tensor; 5]> = smallvec![x];
        if self.has_weight {
            ins.push(ctx.input(1)?);
        }
        for i in 0..self.stats() {
            ins.push(ctx.output(1 + i)?);
        }
        ins.push(ctx.grad(0)?);
        let wi = 1;
        let bi = 1 + self.has_weight as usize;
        let op = NormBackward {
            kind: self.kind,
            has_weight: self.has_weight,
            want_dw: self.has_weight && ctx.needs(wi),
            want_db: self.has_bias && ctx.needs(bi),
        };
        let mut outs = execute(op, &ins)?.into_iter();
        let dx = outs.next();
        let dw = if op.want_dw { outs.next() } else { None };
        let db = if op.want_db { outs.next() } else { None };
        let mut grads: InputGrads = smallvec![if ctx.needs(0) { dx } else { None }];
        if self.has_weight {
            grads.push(dw);
        }
        if self.has_bias {
            grads.push(db);
        }
        Ok(grads)
    }
}

// ----- backward -----

/// The fused backward of [`Norm`]. Inputs: `x`, the weight (when `has_weight`), the saved
/// statistics (mean and rstd for layer norm, rstd for RMS norm), the gradient of y.
/// Outputs: dx, then dweight when `want_dw`, then dbias when `want_db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormBackward {
    /// Which normalization.
    pub kind: NormKind,
    /// Whether the weight is an input.
    pub has_weight: bool,
    /// Whether to output the weight gradient.
    pub want_dw: bool,
    /// Whether to output the bias gradient.
    pub want_db: bool,
}

/// Per-chunk state of the backward: partial sums of the weight and bias gradients (empty
/// when not wanted) and two scratch rows.
struct GradState<A> {
    dw: Vec<A>,
    db: Vec<A>,
    xhat: Vec<A>,
    dxhat: Vec<A>,
}

/// dx of one row; adds `g·xhat` and `g` into the partial dweight and dbias. Simple loops
/// over scratch rows in L1 (each vectorizes on its own) rather than one fused loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn norm_bwd_row<T: FloatElement>(
    kind: NormKind,
    x: &[T],
    g: &[T],
    w: &[T::Acc],
    mean: T::Acc,
    rstd: T::Acc,
    out: &mut [MaybeUninit<T>],
    st: &mut GradState<T::Acc>,
) {
    let c = <T::Acc as AccFloat>::of(x.len() as f64);
    let (xh, d) = (&mut st.xhat[..x.len()], &mut st.dxhat[..x.len()]);
    for (((xh, d), &v), (&gv, &wv)) in xh.iter_mut().zip(d.iter_mut()).zip(x).zip(g.iter().zip(w)) {
        *xh = (v.to_acc() - mean) * rstd;
        *d = gv.to_acc() * wv;
    }
    // Σ dxhat and Σ dxhat·xhat, 16 lanes in a fixed order.
    let m1 = match kind {
        NormKind::Layer => sum_map(d, |v: T::Acc| v) / c,
        NormKind::Rms => <T::Acc as AccFloat>::ZERO,
    };
    let m2 = sum_map2(d, xh, |a: T::Acc, b: T::Acc| a * b) / c;
    for ((o, &dv), &xv) in out.iter_mut().zip(d.iter()).zip(xh.iter()) {
        o.write(T::from_acc(rstd * (dv - m1 - xv * m2)));
    }
    for ((p, &xv), &gv) in st.dw.iter_mut().zip(xh.iter()).zip(g) {
        *p += gv.to_acc() * xv;
    }
    for (p, &gv) in st.db.iter_mut().zip(g) {
        *p += gv.to_acc();
    }
}

type GradOut<T> = (Vec<T>, Option<Vec<T>>, Option<Vec<T>>);

/// The backward over rows; each chunk's state holds its partial dweight and dbias.
struct NormGradRows<'r, 'a, T: FloatElement> {
    op: &'r NormBackward,
    x: &'r Rows<'a, T>,
    g: &'r Rows<'a, T>,
    w: &'r [T::Acc],
    mean: &'r [T::Acc],
    rstd: &'r [T::Acc],
}

impl<T: FloatElement> RowKernel for NormGradRows<'_, '_, T> {
    type Out = T;
    type State = GradState<T::Acc>;
    fn out_len(&self) -> usize {
        self.x.len
    }
    fn work_len(&self) -> usize {
        2 * self.x.len
    }
    fn state(&self) -> Self::State {
        let zeros = |on: bool| vec![<T::Acc as AccFloat>::ZERO; if on { self.x.len } else { 0 }];
        GradState {
            dw: zeros(self.op.want_dw),
            db: zeros(self.op.want_db),
            xhat: zeros(true),
            dxhat: zeros(true),
        }
    }
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], part: &mut Self::State) {
        let m = match self.op.kind {
            NormKind::Layer => self.mean[r],
            NormKind::Rms => <T::Acc as AccFloat>::ZERO,
        };
        norm_bwd_row(
            self.op.kind,
            self.x.row(r),
            self.g.row(r),
            self.w,
            m,
            self.rstd[r],
            out,
            part,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn norm_bwd<T: FloatElement + CpuElement>(
    op: &NormBackward,
    x: &[T],
    xl: &Layout,
    w: &[T::Acc],
    mean: &[T::Acc],
    rstd: &[T::Acc],
    g: &[T],
    gl: &Layout,
) -> Result<GradOut<T>> {
    let (xr, gr) = (Rows::last(x, xl)?, Rows::last(g, gl)?);
    let len = xr.len;
    let zero = <T::Acc as AccFloat>::ZERO;
    let k = NormGradRows {
        op,
        x: &xr,
        g: &gr,
        w,
        mean,
        rstd,
    };
    let (dx, parts) = run_rows(&k, xr.rows());
    // Partials combined in chunk order: deterministic.
    let combine = |pick: fn(&GradState<T::Acc>) -> &Vec<T::Acc>| -> Vec<T> {
        let mut acc = vec![zero; len];
        for p in &parts {
            for (a, &v) in acc.iter_mut().zip(pick(p)) {
                *a += v;
            }
        }
        acc.into_iter().map(T::from_acc).collect()
    };
    let dw = op.want_dw.then(|| combine(|p| &p.dw));
    let db = op.want_db.then(|| combine(|p| &p.db));
    Ok((dx, dw, db))
}

/// Reads a per-row statistic input as accumulator values.
fn stat_acc<A: CpuElement + Copy>(op: &'static str, a: &KernelArg<'_>) -> Result<Vec<A>> {
    let s = a.cpu(op)?.as_slice::<A>(op)?;
    Ok(match a.layout.contiguous_range() {
        Some((lo, hi)) => s[lo..hi].to_vec(),
        None => a.layout.indices().map(|i| s[i]).collect(),
    })
}

#[allow(clippy::too_many_arguments)]
fn bwd_kernel<T: FloatElement + CpuElement>(
    op: &NormBackward,
    v: &[T],
    xl: &Layout,
    wa: Option<&KernelArg<'_>>,
    mean: Option<&KernelArg<'_>>,
    rstd: &KernelArg<'_>,
    gs: &dynn_core::CpuStorage,
    gl: &Layout,
    c: usize,
) -> Result<Outputs>
where
    T::Acc: CpuElement,
{
    let name = op.name();
    let w = param_acc::<T>(name, wa, c, 1.0)?;
    let mean = match mean {
        Some(m) => stat_acc::<T::Acc>(name, m)?,
        None => Vec::new(),
    };
    let rstd = stat_acc::<T::Acc>(name, rstd)?;
    let (dx, dw, db) = norm_bwd(op, v, xl, &w, &mean, &rstd, gs.as_slice::<T>(name)?, gl)?;
    let mut o: Outputs = smallvec![boxed(dx)];
    o.extend(dw.map(boxed));
    o.extend(db.map(boxed));
    Ok(o)
}

impl Op for NormBackward {
    fn name(&self) -> &'static str {
        match self.kind {
            NormKind::Layer => "layer_norm_backward",
            NormKind::Rms => "rms_norm_backward",
        }
    }
    fn idioms(&self) -> Idioms {
        match self.kind {
            NormKind::Layer => Norm::LAYER_BACKWARD_IDIOMS,
            NormKind::Rms => Norm::RMS_BACKWARD_IDIOMS,
        }
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = self.name();
        let stats = if self.kind == NormKind::Layer { 2 } else { 1 };
        let want = 2 + self.has_weight as usize + stats;
        if inputs.len() != want {
            return Err(Error::invalid(
                name,
                format!("expects {want} inputs, got {}", inputs.len()),
            ));
        }
        if (self.want_dw && !self.has_weight) || (self.want_db && self.kind == NormKind::Rms) {
            return Err(Error::invalid(
                name,
                "asked for a gradient of a parameter the norm does not have",
            ));
        }
        let x = inputs[0];
        let c = check_x(name, x)?;
        if self.has_weight {
            check_param(name, "weight", x, inputs[1], c)?;
        }
        let s0 = 1 + self.has_weight as usize;
        let st = stat_shape(x.shape());
        for s in &inputs[s0..s0 + stats] {
            if s.shape() != &st {
                return Err(Error::shape_mismatch(name, s.shape(), &st));
            }
            if s.dtype() != acc_dtype(x.dtype()) {
                return Err(Error::DTypeMismatch {
                    op: name,
                    expected: acc_dtype(x.dtype()),
                    got: s.dtype(),
                });
            }
        }
        let g = inputs[want - 1];
        if g.shape() != x.shape() {
            return Err(Error::shape_mismatch(name, g.shape(), x.shape()));
        }
        if g.dtype() != x.dtype() {
            return Err(Error::DTypeMismatch {
                op: name,
                expected: x.dtype(),
                got: g.dtype(),
            });
        }
        let mut specs: Specs = smallvec![TensorSpec::new(x.shape().clone(), x.dtype())];
        for _ in 0..(self.want_dw as usize + self.want_db as usize) {
            specs.push(TensorSpec::new([c], x.dtype()));
        }
        Ok(specs)
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        let read: usize = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let written: usize = outputs.iter().map(TensorSpec::size_in_bytes).sum();
        // xhat (2), dxhat (1), two row sums (3), dx (4), dweight/dbias sums (3).
        Cost {
            flops: 13 * n,
            bytes_read: read as u64,
            bytes_written: written as u64,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = self.name();
        let x = inputs[0];
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let wa = self.has_weight.then(|| &inputs[1]);
        let s0 = 1 + self.has_weight as usize;
        let layer = self.kind == NormKind::Layer;
        let g = inputs[inputs.len() - 1];
        let gs = g.cpu(name)?;
        let mean = layer.then(|| &inputs[s0]);
        let rstd = &inputs[s0 + layer as usize];
        Ok(float_dispatch!(name, x.cpu(name)?, |v| bwd_kernel(
            self, v, x.layout, wa, mean, rstd, gs, g.layout, c
        )?))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// Layer and RMS normalization on tensors.
pub trait NormOps {
    /// Layer normalization over the last dim: `(x - mean) / sqrt(var + eps) · weight + bias`
    /// (biased variance, as PyTorch). `weight` and `bias`, when given, have shape `(C,)` for
    /// a last dim of size C and x's dtype. One fused kernel forward and backward.
    fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor>;
    /// RMS normalization over the last dim: `x / sqrt(mean(x²) + eps) · weight`.
    fn rms_norm(&self, weight: Option<&Tensor>, eps: f64) -> Result<Tensor>;
}

fn first(op: &'static str, outs: dynn_core::Tensors) -> Result<Tensor> {
    outs.into_iter()
        .next()
        .ok_or_else(|| Error::Msg(format!("{op} produced no output")))
}

impl NormOps for Tensor {
    fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let op = Norm {
            kind: NormKind::Layer,
            eps,
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
        };
        let ins: SmallVec<[&Tensor; 3]> = std::iter::once(self).chain(weight).chain(bias).collect();
        first("layer_norm", execute(op, &ins)?)
    }
    fn rms_norm(&self, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let op = Norm {
            kind: NormKind::Rms,
            eps,
            has_weight: weight.is_some(),
            has_bias: false,
        };
        let ins: SmallVec<[&Tensor; 3]> = std::iter::once(self).chain(weight).collect();
        first("rms_norm", execute(op, &ins)?)
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name, idioms, differentiable| OpInfo {
        name,
        idioms,
        differentiable,
        family: "norm",
    };
    vec![
        f("layer_norm", Norm::LAYER_IDIOMS, true),
        f("rms_norm", Norm::RMS_IDIOMS, true),
        f("layer_norm_backward", Norm::LAYER_BACKWARD_IDIOMS, false),
        f("rms_norm_backward", Norm::RMS_BACKWARD_IDIOMS, false),
    ]
}
