//! Attention weights `softmax(scale · q kᵀ + bias)` over the last dim, as one op. The scores
//! are a temporary of the kernel, never a tensor: the weights' recipe reads `q`, `k` and the
//! bias, which the backward pass keeps, so the memory manager can drop the weights and compute
//! them again (with the scores a tensor of their own, released once the softmax has run, it
//! could not). The kernels are matmul's (the scale and the bias folded into the GEMM) and
//! softmax's (on the CPU written over the scores, so the op needs no buffer beyond its
//! output); the backward rule is softmax's, then matmul's.

use crate::cuda;
use crate::float_dispatch;
use crate::ops::matmul::{MatmulOps, cpu_matmul, cuda_matmul};
use crate::ops::reduce::ReduceOps;
use crate::ops::same_float_dtype;
use crate::ops::softmax::{Softmax, SoftmaxBackward, softmax_rows_in_place};
use crate::ops::unary::UnaryOps;
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, Error, Idioms, InputGrads, KernelArg, Layout, Op, Outputs, Result, Save,
    Shape, Specs, Tensor, TensorSpec, execute1, smallvec::smallvec,
};

/// `softmax(scale · q kᵀ + bias)` over the last dim: `q` is `(..., seq_q, d)`, `k` is
/// `(..., seq_k, d)` (batch dims broadcasting), the optional third input a bias that
/// broadcasts to the scores `(..., seq_q, seq_k)` (an attention mask, a pair bias).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionProbs {
    /// The factor on `q kᵀ` (usually `1 / √d`).
    pub scale: f64,
}

/// k's transpose (a layout idiom), the multiply-accumulate (a reduction and a map), the scale
/// and bias (a map), then softmax's two row reductions and its map.
const IDIOMS: Idioms = Idioms([1, 0, 0, 3, 3, 0]);

const NAME: &str = "attention_probs";

/// The scores' shape: the broadcast batch dims, then `(seq_q, seq_k)`.
fn scores_shape(q: &Shape, k: &Shape) -> Result<Shape> {
    let (qd, kd) = (q.dims(), k.dims());
    if qd.len() < 2 || kd.len() < 2 {
        return Err(Error::invalid(
            NAME,
            format!("q and k need rank >= 2, got {q} and {k}"),
        ));
    }
    if qd[qd.len() - 1] != kd[kd.len() - 1] {
        return Err(Error::shape_mismatch(NAME, q, k));
    }
    let batch =
        Shape::new(&qd[..qd.len() - 2]).broadcast_with(&Shape::new(&kd[..kd.len() - 2]), NAME)?;
    let mut dims = batch.to_vec();
    dims.extend([qd[qd.len() - 2], kd[kd.len() - 2]]);
    Ok(Shape::new(&dims))
}

impl AttentionProbs {
    fn softmax(rank: usize) -> Softmax {
        Softmax {
            dim: rank - 1,
            log: false,
        }
    }
}

impl Op for AttentionProbs {
    fn name(&self) -> &'static str {
        NAME
    }
    fn idioms(&self) -> Idioms {
        IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (q, k) = match inputs {
            [q, k] | [q, k, _] => (*q, *k),
            _ => {
                return Err(Error::invalid(
                    NAME,
                    format!(
                        "expects q, k and an optional bias, got {} inputs",
                        inputs.len()
                    ),
                ));
            }
        };
        same_float_dtype(NAME, inputs)?;
        let shape = scores_shape(q.shape(), k.shape())?;
        if let Some(bias) = inputs.get(2)
            && bias.layout().broadcast_as(&shape).is_err()
        {
            return Err(Error::invalid(
                NAME,
                format!(
                    "the bias {} does not broadcast to the scores {shape}",
                    bias.shape()
                ),
            ));
        }
        Ok(smallvec![TensorSpec::new(shape, q.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let n = outputs[0].shape.elem_count() as u64;
        let d = inputs[0].dims().last().copied().unwrap_or(0) as u64;
        // The products, the scale and bias, softmax's five per element.
        Cost::streaming(inputs, outputs, 2 * n * d + 2 * n + 5 * n)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let (q, k, bias) = (inputs[0], inputs[1], inputs.get(2));
        let kt_layout = k.layout.transpose(-2, -1)?;
        let kt = KernelArg {
            storage: k.storage,
            layout: &kt_layout,
        };
        let shape = &specs[0].shape;
        if !cuda::on_cuda(inputs) {
            // The weights are written over the scores: no second buffer.
            let mut scores = cpu_matmul(NAME, &q, &kt, bias, self.scale)?;
            let len = shape.dims().last().copied().unwrap_or(1);
            float_dispatch!(NAME, &mut scores, |v| softmax_rows_in_place(v, len));
            return Ok(crate::cpu::one(scores));
        }
        let scores = cuda_matmul(NAME, &q, &kt, bias, self.scale)?;
        let layout = Layout::contiguous(shape.clone());
        let scores = KernelArg {
            storage: &*scores,
            layout: &layout,
        };
        Self::softmax(shape.rank()).forward(&[scores], specs)
    }
    fn save(&self) -> Save {
        // q and k for their gradients, the weights for the softmax's; the bias's gradient
        // needs neither.
        Save {
            inputs: 0b011,
            outputs: 1,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let probs = ctx.output(0)?;
        let softmax = Self::softmax(probs.rank());
        // The gradient of the scale · scores + bias that went into the softmax.
        let ds = execute1(SoftmaxBackward(softmax), &[probs, ctx.grad(0)?])?;
        let dqk = (ctx.needs(0) || ctx.needs(1))
            .then(|| ds.scale(self.scale))
            .transpose()?;
        let gq = match &dqk {
            Some(d) if ctx.needs(0) => {
                Some(d.matmul(ctx.input(1)?)?.sum_to(&ctx.input_specs[0].shape)?)
            }
            _ => None,
        };
        let gk = match &dqk {
            Some(d) if ctx.needs(1) => Some(
                d.t()?
                    .matmul(ctx.input(0)?)?
                    .sum_to(&ctx.input_specs[1].shape)?,
            ),
            _ => None,
        };
        let mut grads = smallvec![gq, gk];
        if let Some(spec) = ctx.input_specs.get(2) {
            grads.push(ctx.needs(2).then(|| ds.sum_to(&spec.shape)).transpose()?);
        }
        Ok(grads)
    }
}

/// Attention weights.
pub trait AttentionOps {
    /// `softmax(scale · self kᵀ + bias)` over the last dim, in one op: `self` (the queries) is
    /// `(..., seq_q, d)`, `k` is `(..., seq_k, d)`, batch dims broadcasting; `bias`, when
    /// given, broadcasts to the scores `(..., seq_q, seq_k)`. Float dtypes; the 16-bit types
    /// accumulate in f32.
    fn attention_probs(&self, k: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor>;
}

impl AttentionOps for Tensor {
    fn attention_probs(&self, k: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
        let op = AttentionProbs { scale };
        match bias {
            Some(b) => execute1(op, &[self, k, b]),
            None => execute1(op, &[self, k]),
        }
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![OpInfo {
        name: NAME,
        idioms: IDIOMS,
        differentiable: true,
        family: "attention",
    }]
}
