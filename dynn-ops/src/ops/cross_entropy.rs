//! Cross-entropy loss on logits with integer class targets, fused: the forward computes each
//! row's log-sum-exp and loss in one sweep over the logits from memory (in L1-sized blocks:
//! the block's max, then its Σ exp against the running max, an "online" log-sum-exp), with
//! label smoothing and an ignored target value; the backward writes
//! `(softmax - smoothed one-hot) · scale` in one pass from the saved log-sum-exp.
//!
//! Logits have shape `(..., C)`: every leading dim is flattened into rows (so `(N, C)` and
//! `(B, T, C)` both work), and the targets have the leading shape (`(N,)`, `(B, T)`), dtype
//! i64 or u32.

use crate::cpu::gather_layout;
use crate::float_dispatch;
use crate::ops::softmax::{RowKernel, Rows, VecExp, acc_dtype, boxed, max_row, run_rows, sum_map};
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, CpuStorage, DType, Error, FloatElement, Idioms,
    InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec,
    execute, execute1, smallvec::smallvec,
};
use std::mem::MaybeUninit;

/// How per-row losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossReduction {
    /// The mean over rows whose target is not ignored (NaN when every row is ignored, as
    /// PyTorch).
    #[default]
    Mean,
    /// The sum over rows.
    Sum,
    /// No reduction: one loss per row, shaped like the targets (0 for ignored rows).
    None,
}

/// Options of [`CrossEntropyOps::cross_entropy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyOpts {
    /// Rows whose target equals this value contribute no loss and no gradient, and are not
    /// counted by the mean.
    pub ignore_index: Option<i64>,
    /// ε in [0, 1]: the target distribution is `(1 - ε)·onehot + ε/C` (PyTorch's
    /// `label_smoothing`).
    pub label_smoothing: f64,
    /// How per-row losses are combined.
    pub reduction: LossReduction,
}

impl Default for CrossEntropyOpts {
    fn default() -> Self {
        CrossEntropyOpts {
            ignore_index: None,
            label_smoothing: 0.0,
            reduction: LossReduction::Mean,
        }
    }
}

/// Fused cross-entropy. Inputs `(logits, targets)`; outputs the loss (logits' dtype) and the
/// per-row log-sum-exp (accumulator dtype, saved for the backward).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropy {
    /// The options.
    pub opts: CrossEntropyOpts,
}

impl CrossEntropy {
    /// Idioms of the forward: an indirect read (the target's logit), two row reductions (max,
    /// Σ exp; the reduction over rows rides on the second) and one map (exp).
    pub const IDIOMS: Idioms = Idioms([0, 0, 1, 2, 1, 0]);
    /// Idioms of the backward: the paper's "nll loss backward" row `[0,1,0,0,0,0]` (writing
    /// the one-hot gradient into a fresh buffer) plus the map that recomputes the softmax.
    pub const BACKWARD_IDIOMS: Idioms = Idioms([0, 1, 0, 0, 1, 0]);
}

/// Shapes of the rows: `(leading shape, C)`.
fn split_shape(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    opts: &CrossEntropyOpts,
) -> Result<(Shape, usize)> {
    if !logits.dtype().is_float() {
        return Err(Error::unsupported_dtype(op, logits.dtype()));
    }
    if !matches!(targets.dtype(), DType::I64 | DType::U32) {
        return Err(Error::UnsupportedDType {
            op,
            dtype: targets.dtype(),
            hint: " for targets (expected i64 or u32 class indices)".into(),
        });
    }
    let d = logits.dims();
    let Some((&c, lead)) = d.split_last() else {
        return Err(Error::invalid(
            op,
            "logits must have at least one dim (the classes)",
        ));
    };
    if c == 0 {
        return Err(Error::invalid(
            op,
            format!("logits of shape {} have no classes", logits.shape()),
        ));
    }
    let lead = Shape::new(lead);
    if targets.shape() != &lead {
        // Targets must have the logits' leading shape: lhs is what came, rhs what was expected.
        return Err(Error::shape_mismatch(op, targets.shape(), &lead));
    }
    if !(0.0..=1.0).contains(&opts.label_smoothing) {
        return Err(Error::invalid(
            op,
            format!(
                "label_smoothing must be in [0, 1], got {}",
                opts.label_smoothing
            ),
        ));
    }
    Ok((lead, c))
}

/// The targets as i64 in row order.
fn targets_i64(op: &'static str, t: &KernelArg<'_>) -> Result<Vec<i64>> {
    Ok(match t.cpu(op)? {
        CpuStorage::I64(v) => gather_layout(v, t.layout),
        CpuStorage::U32(v) => gather_layout(v, t.layout)
            .into_iter()
            .map(i64::from)
            .collect(),
        other => return Err(Error::unsupported_dtype(op, other.dtype())),
    })
}

/// Checks every non-ignored target is a class index; returns how many rows count.
fn check_targets(
    op: &'static str,
    targets: &[i64],
    c: usize,
    ignore: Option<i64>,
) -> Result<usize> {
    let mut count = 0;
    for (r, &t) in targets.iter().enumerate() {
        if Some(t) == ignore {
            continue;
        }
        if t < 0 || t as u64 >= c as u64 {
            return Err(Error::IndexOutOfRange {
                op,
                index: t,
                size: c,
                context: format!(" (target of row {r})"),
            });
        }
        count += 1;
    }
    Ok(count)
}

/// Elements per block of the forward's sweep: a block of logits (8 KiB in f32) stays in L1
/// between the block's two passes (its max, then its fused Σ exp).
const LSE_BLOCK: usize = 512;

/// The forward over rows: each row's `(lse, loss)`, `(0, 0)` for ignored rows.
struct CeRows<'r, 'a, T: FloatElement> {
    x: &'r Rows<'a, T>,
    targets: &'r [i64],
    ignore: Option<i64>,
    eps: f64,
}

impl<T: FloatElement> RowKernel for CeRows<'_, '_, T>
where
    T::Acc: VecExp,
{
    type Out = (T::Acc, T::Acc);
    type State = ();
    fn out_len(&self) -> usize {
        1
    }
    fn work_len(&self) -> usize {
        self.x.len
    }
    fn state(&self) {}
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<(T::Acc, T::Acc)>], _: &mut ()) {
        let zero = <T::Acc as AccFloat>::ZERO;
        let t = self.targets[r];
        if Some(t) == self.ignore {
            out[0].write((zero, zero));
            return;
        }
        let x = self.x.row(r);
        // One sweep over the row in blocks that stay in L1: each block's max, then its Σ exp
        // against the running max, rescaling the running sum when the max grows (the
        // "online" log-sum-exp). Blocks are fixed, so the order is too.
        let (mut m, mut s, mut sx) = (
            <T::Acc as AccFloat>::NEG_INFINITY,
            <T::Acc as AccFloat>::ZERO,
            <T::Acc as AccFloat>::ZERO,
        );
        for blk in x.chunks(LSE_BLOCK) {
            if self.eps > 0.0 {
                sx += sum_map(blk, |v: T| v.to_acc());
            }
            let mb = max_row(blk);
            if mb > m {
                s = s * (m - mb).vexp();
                m = mb;
            }
            if m == <T::Acc as AccFloat>::NEG_INFINITY {
                // Only -inf so far: those terms are 0 (and x - m would be NaN).
                continue;
            }
            s += sum_map(blk, |v: T| (v.to_acc() - m).vexp());
        }
        let ln_s = s.ln();
        // Targets are checked before the kernel runs: 0 <= t < C.
        let xt = x[t as usize].to_acc();
        // lse - x_t as ln Σ + (max - x_t): no rounding of lse when the max is large.
        let loss = if self.eps > 0.0 {
            let eps = <T::Acc as AccFloat>::of(self.eps);
            let mean_x = sx / <T::Acc as AccFloat>::of(x.len() as f64);
            ln_s + (<T::Acc as AccFloat>::ONE - eps) * (m - xt) + eps * (m - mean_x)
        } else {
            ln_s + (m - xt)
        };
        out[0].write((m + ln_s, loss));
    }
}

fn ce_fwd<T: FloatElement + CpuElement>(
    op: &CrossEntropy,
    x: &[T],
    xl: &Layout,
    targets: &[i64],
    count: usize,
) -> Result<Outputs>
where
    T::Acc: VecExp + CpuElement,
{
    let x = Rows::last(x, xl)?;
    let k = CeRows {
        x: &x,
        targets,
        ignore: op.opts.ignore_index,
        eps: op.opts.label_smoothing,
    };
    let (per_row, _) = run_rows(&k, targets.len());
    let lse: Vec<T::Acc> = per_row.iter().map(|p| p.0).collect();
    let loss: Vec<T> = match op.opts.reduction {
        LossReduction::None => per_row.iter().map(|p| T::from_acc(p.1)).collect(),
        red => {
            // Rows summed in order, in f64: deterministic and accurate.
            let total: f64 = per_row.iter().map(|p| p.1.f64()).sum();
            let v = if red == LossReduction::Mean {
                total / count as f64
            } else {
                total
            };
            vec![T::from_f64(v)]
        }
    };
    Ok(smallvec![boxed(loss), boxed(lse)])
}

impl Op for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn idioms(&self) -> Idioms {
        Self::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let [logits, targets] = inputs else {
            return Err(Error::invalid(
                "cross_entropy",
                format!("expects 2 inputs (logits, targets), got {}", inputs.len()),
            ));
        };
        let (lead, _) = split_shape("cross_entropy", logits, targets, &self.opts)?;
        let loss_shape = if self.opts.reduction == LossReduction::None {
            lead.clone()
        } else {
            Shape::scalar()
        };
        Ok(smallvec![
            TensorSpec::new(loss_shape, logits.dtype()),
            TensorSpec::new(lead, acc_dtype(logits.dtype()))
        ])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        let read: usize = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let written: usize = outputs.iter().map(TensorSpec::size_in_bytes).sum();
        // max, subtract, exp, add (plus a sum for label smoothing).
        Cost {
            flops: 5 * n,
            bytes_read: read as u64,
            bytes_written: written as u64,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = "cross_entropy";
        let (x, t) = (inputs[0], inputs[1]);
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let targets = targets_i64(name, &t)?;
        let count = check_targets(name, &targets, c, self.opts.ignore_index)?;
        Ok(float_dispatch!(name, x.cpu(name)?, |v| ce_fwd(
            self, v, x.layout, &targets, count
        )?))
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0b11,
            outputs: 0b10,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        if !ctx.needs(0) {
            return Ok(smallvec![None, None]);
        }
        let g = execute1(
            CrossEntropyBackward { opts: self.opts },
            &[ctx.input(0)?, ctx.input(1)?, ctx.output(1)?, ctx.grad(0)?],
        )?;
        Ok(smallvec![Some(g), None])
    }
}

/// The fused backward of [`CrossEntropy`]. Inputs `(logits, targets, lse, grad of the loss)`;
/// output the logits' gradient `(softmax - (1-ε)·onehot - ε/C) · scale` per row, where the
/// scale is the loss gradient (divided by the count of non-ignored rows for the mean), and
/// zero on ignored rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyBackward {
    /// The forward's options.
    pub opts: CrossEntropyOpts,
}

/// The backward over rows: `(e^(x - lse) - ε/C - (1-ε)·[j = t]) · scale`, zero on ignored
/// rows.
struct CeGradRows<'r, 'a, T: FloatElement> {
    x: &'r Rows<'a, T>,
    targets: &'r [i64],
    lse: &'r [T::Acc],
    /// Per-row scale of the gradient.
    scale: &'r [T::Acc],
    ignore: Option<i64>,
    eps: f64,
}

impl<T: FloatElement> RowKernel for CeGradRows<'_, '_, T>
where
    T::Acc: VecExp,
{
    type Out = T;
    type State = ();
    fn out_len(&self) -> usize {
        self.x.len
    }
    fn work_len(&self) -> usize {
        self.x.len
    }
    fn state(&self) {}
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [MaybeUninit<T>], _: &mut ()) {
        let t = self.targets[r];
        if Some(t) == self.ignore {
            for o in out.iter_mut() {
                o.write(T::zero());
            }
            return;
        }
        let x = self.x.row(r);
        let (lse, scale) = (self.lse[r], self.scale[r]);
        let off = <T::Acc as AccFloat>::of(self.eps / x.len() as f64);
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(T::from_acc(((v.to_acc() - lse).vexp() - off) * scale));
        }
        // Targets were checked before the kernel runs: 0 <= t < C.
        let ti = t as usize;
        let p = (x[ti].to_acc() - lse).vexp() - off - <T::Acc as AccFloat>::of(1.0 - self.eps);
        out[ti].write(T::from_acc(p * scale));
    }
}

#[allow(clippy::too_many_arguments)]
fn ce_bwd<T: FloatElement + CpuElement>(
    op: &CrossEntropyBackward,
    x: &[T],
    xl: &Layout,
    targets: &[i64],
    lse: &[T::Acc],
    g: &[f64],
    count: usize,
) -> Result<Vec<T>>
where
    T::Acc: VecExp,
{
    let x = Rows::last(x, xl)?;
    let scale: Vec<T::Acc> = (0..targets.len())
        .map(|r| {
            <T::Acc as AccFloat>::of(match op.opts.reduction {
                LossReduction::None => g[r],
                LossReduction::Sum => g[0],
                LossReduction::Mean => g[0] / count as f64,
            })
        })
        .collect();
    let k = CeGradRows {
        x: &x,
        targets,
        lse,
        scale: &scale,
        ignore: op.opts.ignore_index,
        eps: op.opts.label_smoothing,
    };
    Ok(run_rows(&k, targets.len()).0)
}

impl Op for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy_backward"
    }
    fn idioms(&self) -> Idioms {
        CrossEntropy::BACKWARD_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let name = "cross_entropy_backward";
        let [logits, targets, lse, g] = inputs else {
            return Err(Error::invalid(
                name,
                format!(
                    "expects 4 inputs (logits, targets, lse, grad), got {}",
                    inputs.len()
                ),
            ));
        };
        let (lead, _) = split_shape(name, logits, targets, &self.opts)?;
        if lse.shape() != &lead || lse.dtype() != acc_dtype(logits.dtype()) {
            return Err(Error::invalid(
                name,
                format!(
                    "lse must be {} of shape {lead}, got {} of shape {}",
                    acc_dtype(logits.dtype()),
                    lse.dtype(),
                    lse.shape()
                ),
            ));
        }
        let g_shape = if self.opts.reduction == LossReduction::None {
            lead
        } else {
            Shape::scalar()
        };
        if g.shape() != &g_shape {
            return Err(Error::shape_mismatch(name, g.shape(), &g_shape));
        }
        if !g.dtype().is_float() {
            return Err(Error::unsupported_dtype(name, g.dtype()));
        }
        Ok(smallvec![TensorSpec::new(
            logits.shape().clone(),
            logits.dtype()
        )])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        let read: usize = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let written: usize = outputs.iter().map(TensorSpec::size_in_bytes).sum();
        // subtract, exp, subtract, scale.
        Cost {
            flops: 4 * n,
            bytes_read: read as u64,
            bytes_written: written as u64,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let name = "cross_entropy_backward";
        let (x, t, l, g) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        let c = x.shape().dims().last().copied().unwrap_or(1);
        let targets = targets_i64(name, &t)?;
        let count = check_targets(name, &targets, c, self.opts.ignore_index)?;
        let gv: Vec<f64> = float_dispatch!(name, g.cpu(name)?, |v| g
            .layout
            .indices()
            .map(|i| dynn_core::Element::to_f64(v[i]))
            .collect());
        let ls = l.cpu(name)?;
        Ok(smallvec![float_dispatch!(name, x.cpu(name)?, |v| boxed(
            bwd_typed(self, v, x.layout, &targets, ls, l.layout, &gv, count)?
        ))])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

#[allow(clippy::too_many_arguments)]
fn bwd_typed<T: FloatElement + CpuElement>(
    op: &CrossEntropyBackward,
    x: &[T],
    xl: &Layout,
    targets: &[i64],
    ls: &CpuStorage,
    ll: &Layout,
    g: &[f64],
    count: usize,
) -> Result<Vec<T>>
where
    T::Acc: VecExp + CpuElement,
{
    let lse = gather_layout(ls.as_slice::<T::Acc>("cross_entropy_backward")?, ll);
    ce_bwd(op, x, xl, targets, &lse, g, count)
}

/// Cross-entropy on logits.
pub trait CrossEntropyOps {
    /// Cross-entropy between `self`, logits of shape `(..., C)` (leading dims flattened into
    /// rows), and `targets`, class indices (i64 or u32) of the leading shape. With the default
    /// options this is the mean over rows of `logsumexp(x) - x[target]`. A target outside
    /// `0..C` (other than `ignore_index`) is an [`Error::IndexOutOfRange`] naming the row.
    fn cross_entropy(&self, targets: &Tensor, opts: CrossEntropyOpts) -> Result<Tensor>;
}

impl CrossEntropyOps for Tensor {
    fn cross_entropy(&self, targets: &Tensor, opts: CrossEntropyOpts) -> Result<Tensor> {
        execute(CrossEntropy { opts }, &[self, targets])?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Msg("cross_entropy produced no output".into()))
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![
        OpInfo {
            name: "cross_entropy",
            idioms: CrossEntropy::IDIOMS,
            differentiable: true,
            family: "cross_entropy",
        },
        OpInfo {
            name: "cross_entropy_backward",
            idioms: CrossEntropy::BACKWARD_IDIOMS,
            differentiable: false,
            family: "cross_entropy",
        },
    ]
}
