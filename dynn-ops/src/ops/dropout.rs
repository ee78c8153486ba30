//! Dropout with a counter-based mask: element `i` (row-major index) is kept when the `i`-th
//! draw of the stream keyed by the seed is at least `p`, and kept values are scaled by
//! `1/(1-p)`. The mask is a pure function of `(seed, p, shape)`: independent of threading and
//! of the input's layout, so `dropout_backward` regenerates it from the seed the op struct
//! (and so the tape node) records instead of saving it, and a recomputed activation is
//! bit-identical to the original.

use crate::cpu::gather_layout;
use crate::cpu::{SimdTask, simd_task};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::float_dispatch;
use crate::ops::random::{counter_hash, counter_hash_cuda, fill_indexed, stream_key};
use crate::ops::softmax::boxed;
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, DeviceStorage, Error, FloatElement, Idioms,
    InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Specs, Tensor, TensorSpec, execute1,
    smallvec::smallvec,
};
use std::borrow::Cow;
use std::mem::MaybeUninit;

const DROPOUT_SALT: u64 = 0x6472_6F70_6F75_7400; // "dropout"

/// Dropout with drop probability `p` and mask seed `seed` (training mode; evaluation mode is
/// the identity and runs no op).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element, in [0, 1].
    pub p: f64,
    /// The mask's seed.
    pub seed: u64,
}

impl Dropout {
    /// Idioms: one element-wise map (the paper's table: "maximum, elu, dropout" `[0,0,0,0,1,0]`).
    pub const IDIOMS: Idioms = Idioms::MAP;

    /// True when element `i` is kept: draw `i` of the stream is 32 random bits (the low or high
    /// half of hash `i / 2`), kept when at least `ceil(p · 2³²)`.
    pub fn keeps(&self, i: usize) -> bool {
        let h = counter_hash(stream_key(self.seed, DROPOUT_SALT), (i / 2) as u64);
        let bits = if i % 2 == 0 { h & 0xFFFF_FFFF } else { h >> 32 };
        bits >= threshold(self.p)
    }

    fn check(&self, op: &'static str, x: &Tensor) -> Result<()> {
        if !x.dtype().is_float() {
            return Err(Error::unsupported_dtype(op, x.dtype()));
        }
        if !(0.0..=1.0).contains(&self.p) {
            return Err(Error::invalid(
                op,
                format!("drop probability must be in [0, 1], got {}", self.p),
            ));
        }
        Ok(())
    }
}

fn threshold(p: f64) -> u64 {
    (p * 4_294_967_296.0).ceil() as u64
}

/// One chunk of dropout as a [`SimdTask`]: element `start + k` of the output.
struct DropoutChunk<'a, 'o, T: FloatElement> {
    x: &'a [T],
    out: &'o mut [MaybeUninit<T>],
    start: usize,
    key: u64,
    thr: u64,
    scale: T::Acc,
}

impl<T: FloatElement> SimdTask for DropoutChunk<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let (thr, scale, zero) = (self.thr, self.scale, T::zero());
        let pick = |bits: u64, v: T| {
            if bits >= thr {
                T::from_acc(v.to_acc() * scale)
            } else {
                zero
            }
        };
        // Chunks start at even indices, so pair k of the chunk is hash (start / 2 + k).
        let mut pairs = self.out.chunks_exact_mut(2);
        let mut xp = self.x.chunks_exact(2);
        for (k, (o2, x2)) in (&mut pairs).zip(&mut xp).enumerate() {
            let h = counter_hash(self.key, (self.start / 2 + k) as u64);
            o2[0].write(pick(h & 0xFFFF_FFFF, x2[0]));
            o2[1].write(pick(h >> 32, x2[1]));
        }
        if let (Some(o), Some(&v)) = (pairs.into_remainder().first_mut(), xp.remainder().first()) {
            let h = counter_hash(self.key, ((self.start + self.x.len()) / 2) as u64);
            o.write(pick(h & 0xFFFF_FFFF, v));
        }
    }
}

/// `x · mask / (1 - p)` over the elements of `src` seen through `layout`.
fn dropout_kernel<T: FloatElement + CpuElement>(src: &[T], layout: &Layout, d: &Dropout) -> Vec<T> {
    let x: Cow<'_, [T]> = match layout.contiguous_range() {
        Some((a, b)) => Cow::Borrowed(&src[a..b]),
        None => Cow::Owned(gather_layout(src, layout)),
    };
    let key = stream_key(d.seed, DROPOUT_SALT);
    let thr = threshold(d.p);
    let scale = <T::Acc as AccFloat>::of(if d.p < 1.0 { 1.0 / (1.0 - d.p) } else { 0.0 });
    fill_indexed(x.len(), |start, out| {
        let x = &x[start..start + out.len()];
        simd_task(DropoutChunk {
            x,
            out,
            start,
            key,
            thr,
            scale,
        })
    })
}

/// The CUDA kernel, shared by `dropout` and `dropout_backward`: the CPU's mask bit for bit
/// (the same counter hash, one per pair of elements, low half for the even element), and the
/// same `x · scale` for kept elements (in f32 for 16-bit data, rounded once).
pub const CUDA: CudaSource = CudaSource {
    name: "dropout",
    code: concat!(
        counter_hash_cuda!(),
        r#"
extern "C" __global__ void dropout_forward(unsigned long long key, unsigned long long thr,
                                           double scale, const scalar* x, Strided xs,
                                           scalar* y, i64 n) {
    const acc s = (acc)scale;
    const scalar zero = st((acc)0);
    GRID_LOOP(q, (n + 1) / 2) {
        unsigned long long h = counter_hash(key, (unsigned long long)q);
        i64 i = 2 * q;
        y[i] = (h & 0xFFFFFFFFull) >= thr ? st(ld(x[at(xs, i)]) * s) : zero;
        if (i + 1 < n) y[i + 1] = (h >> 32) >= thr ? st(ld(x[at(xs, i + 1)]) * s) : zero;
    }
}
"#
    ),
    half: true,
};

/// `x · mask / (1 - p)` on the GPU (`op` names the caller).
fn cuda_dropout(
    op: &'static str,
    x: &KernelArg<'_>,
    d: &Dropout,
) -> Result<Box<dyn DeviceStorage>> {
    let xs = cuda::storage(op, x)?;
    let dev = xs.dev();
    let n = x.layout.elem_count();
    let mut out = CudaStorage::alloc(dev, x.dtype(), n)?;
    if n == 0 {
        return Ok(Box::new(out));
    }
    let f = dev.function(&CUDA, x.dtype(), "dropout_forward")?;
    let key = stream_key(d.seed, DROPOUT_SALT);
    let thr = threshold(d.p);
    // The CPU's scale: `1/(1-p)` in f64, rounded to the dtype (the kernel rounds it the same way).
    let scale = if d.p < 1.0 { 1.0 / (1.0 - d.p) } else { 0.0 };
    let (view, n64) = (Strided::of(op, x.layout)?, n as i64);
    crate::cuda_launch!(
        dev,
        op,
        f,
        cuda::grid(n.div_ceil(2)),
        [&key, &thr, &scale, xs.slice(), &view, out.slice_mut(), &n64]
    )?;
    Ok(Box::new(out))
}

impl Op for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }
    fn idioms(&self) -> Idioms {
        Self::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let [x] = inputs else {
            return Err(Error::invalid(
                "dropout",
                format!("expects 1 input, got {}", inputs.len()),
            ));
        };
        self.check("dropout", x)?;
        Ok(smallvec![TensorSpec::new(x.shape().clone(), x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], _: &[TensorSpec]) -> Cost {
        let n = inputs[0].elem_count() as u64;
        let b = inputs[0].dtype().size_in_bytes() as u64;
        // Half a hash (about 4 integer ops), a compare and a multiply per element.
        Cost {
            flops: 6 * n,
            bytes_read: n * b,
            bytes_written: n * b,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_dropout("dropout", &x, self)?]);
        }
        Ok(smallvec![float_dispatch!(
            "dropout",
            x.cpu("dropout")?,
            |v| boxed(dropout_kernel(v, x.layout, self))
        )])
    }
    fn save(&self) -> Save {
        Save::NONE
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        Ok(smallvec![Some(execute1(
            DropoutBackward(*self),
            &[ctx.grad(0)?]
        )?)])
    }
}

/// The backward of [`Dropout`]: the same mask, regenerated from the seed, applied to the
/// gradient (`g · mask / (1 - p)`). Saves nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutBackward(pub Dropout);

impl Op for DropoutBackward {
    fn name(&self) -> &'static str {
        "dropout_backward"
    }
    fn idioms(&self) -> Idioms {
        Dropout::IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let [g] = inputs else {
            return Err(Error::invalid(
                "dropout_backward",
                format!("expects 1 input, got {}", inputs.len()),
            ));
        };
        self.0.check("dropout_backward", g)?;
        Ok(smallvec![TensorSpec::new(g.shape().clone(), g.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        self.0.cost(inputs, outputs)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let g = inputs[0];
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_dropout("dropout_backward", &g, &self.0)?]);
        }
        Ok(smallvec![float_dispatch!(
            "dropout_backward",
            g.cpu("dropout_backward")?,
            |v| boxed(dropout_kernel(v, g.layout, &self.0))
        )])
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// Dropout on tensors.
pub trait DropoutOps {
    /// Zeroes each element with probability `p` and scales the rest by `1/(1-p)` when `train`;
    /// the identity (no op, same tensor) when `!train` or `p == 0`. The mask depends only on
    /// `seed` and the element's row-major index, so the same seed gives the same mask on any
    /// thread count and layout. `p` must be in [0, 1].
    fn dropout(&self, p: f64, seed: u64, train: bool) -> Result<Tensor>;
}

impl DropoutOps for Tensor {
    fn dropout(&self, p: f64, seed: u64, train: bool) -> Result<Tensor> {
        let op = Dropout { p, seed };
        op.check("dropout", self)?;
        if !train || p == 0.0 {
            return Ok(self.clone());
        }
        execute1(op, &[self])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![
        OpInfo {
            name: "dropout",
            idioms: Dropout::IDIOMS,
            differentiable: true,
            family: "dropout",
        },
        OpInfo {
            name: "dropout_backward",
            idioms: Dropout::IDIOMS,
            differentiable: false,
            family: "dropout",
        },
    ]
}
