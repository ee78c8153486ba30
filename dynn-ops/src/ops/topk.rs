//! `topk`: the `k` largest (or smallest) entries along a dim, sorted, with their i64 indices.
//! Ties go to the lower index, NaN counts as larger than every number, so the result depends
//! only on the values. The values are differentiable: `topk_backward` scatters their gradient
//! into zeros at the indices.

use crate::cpu::{PAR_MIN, gather_layout};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::indexing::ScatterAddZeros;
use crate::registry::OpInfo;
use cudarc::driver::LaunchConfig;
use dynn_core::{
    BackwardCtx, Cost, CpuElement, CpuStorage, DType, DeviceStorage, Dim, Element, Error, Idioms,
    InputGrads, KernelArg, Op, Outputs, Result, Save, Specs, Tensor, TensorSpec, execute, execute1,
    smallvec::smallvec, with_cpu_storage,
};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Idioms of `topk`: a selection along one dim, counted as one reduction — PyTorch's table
/// gives "max pool1d, max pool2d (with indices)", the nearest op that reduces and returns
/// indices, `[0,0,0,1,0,0]`.
pub const TOPK_IDIOMS: Idioms = Idioms::REDUCE;
/// Idioms of `topk_backward`: a scatter into zeros at the indices — PyTorch's "gather backward"
/// row `[0,1,1,1,0,0]` without the reduction, since the indices of one line are distinct.
pub const TOPK_BACKWARD_IDIOMS: Idioms = Idioms([0, 1, 1, 0, 0, 0]);

/// The `k` largest (`largest`) or smallest entries of dim `dim`, sorted (descending, or
/// ascending when not `largest`). Outputs `(values, indices)`, indices i64.
#[derive(Debug, Clone, Copy)]
pub struct TopK {
    /// How many entries.
    pub k: usize,
    /// The dim.
    pub dim: usize,
    /// Largest (descending) or smallest (ascending).
    pub largest: bool,
}

/// A total order on elements with NaN above every number.
#[inline(always)]
fn total_cmp<T: Element>(a: T, b: T) -> Ordering {
    #[allow(clippy::eq_op)]
    match (a != a, b != b) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// Top-k of each contiguous line of `n` elements; results in line order, `k` per line.
fn topk_lines<T: Element>(lines: &[T], n: usize, k: usize, largest: bool) -> (Vec<T>, Vec<i64>) {
    let count = lines.len().checked_div(n).unwrap_or(0);
    let mut vals = vec![T::zero(); count * k];
    let mut idxs = vec![0i64; count * k];
    if k == 0 || count == 0 {
        return (vals, idxs);
    }
    let cmp = |line: &[T], a: &u32, b: &u32| {
        let (va, vb) = (line[*a as usize], line[*b as usize]);
        let o = if largest {
            total_cmp(vb, va)
        } else {
            total_cmp(va, vb)
        };
        o.then(a.cmp(b))
    };
    let body = |scratch: &mut Vec<u32>, (l, (v, i)): (usize, (&mut [T], &mut [i64]))| {
        let line = &lines[l * n..(l + 1) * n];
        scratch.clear();
        scratch.extend(0..n as u32);
        if k < n {
            scratch.select_nth_unstable_by(k - 1, |a, b| cmp(line, a, b));
        }
        let top = &mut scratch[..k];
        top.sort_unstable_by(|a, b| cmp(line, a, b));
        for ((v, i), &j) in v.iter_mut().zip(i.iter_mut()).zip(top.iter()) {
            *v = line[j as usize];
            *i = j as i64;
        }
    };
    if lines.len() < PAR_MIN {
        let mut scratch = Vec::with_capacity(n);
        vals.chunks_mut(k)
            .zip(idxs.chunks_mut(k))
            .enumerate()
            .for_each(|x| body(&mut scratch, x));
    } else {
        vals.par_chunks_mut(k)
            .zip(idxs.par_chunks_mut(k))
            .enumerate()
            .with_min_len((PAR_MIN / 4 / n.max(1)).max(1))
            .for_each_init(|| Vec::with_capacity(n), body);
    }
    (vals, idxs)
}

/// `(outer, inner, k)` → `(outer, k, inner)`.
fn to_dim_order<T: Copy + Default>(v: Vec<T>, outer: usize, inner: usize, k: usize) -> Vec<T> {
    if inner <= 1 || k <= 1 {
        return v;
    }
    let mut out = vec![T::default(); v.len()];
    for o in 0..outer {
        for i in 0..inner {
            for r in 0..k {
                out[(o * k + r) * inner + i] = v[(o * inner + i) * k + r];
            }
        }
    }
    out
}

/// The CUDA kernel: one group of threads per line (a warp, with eight lines per block, for
/// short lines; up to a 1024-thread block for long ones). Pick `r` is the first element, in
/// the output order (values ordered with NaN above every number, ties to the lower index), that comes after pick
/// `r - 1`: each pick is a scan of the line and a group reduction, so `k` picks cost `k`
/// scans — made for the common small `k` (MoE routing). `topk_backward` is the indexing
/// family's scatter into zeros.
pub const CUDA: CudaSource = CudaSource {
    name: "topk",
    code: r#"
// A total order with NaN above every number: -1, 0 or 1.
__device__ __forceinline__ int total_cmp(acc a, acc b) {
    bool an = a != a, bn = b != b;
    if (an || bn) return (an && bn) ? 0 : (an ? 1 : -1);
    return a < b ? -1 : (a > b ? 1 : 0);
}

// True when (va, ia) comes before (vb, ib) in the output order; an index < 0 is "none",
// which comes after everything.
__device__ __forceinline__ bool topk_before(acc va, i64 ia, acc vb, i64 ib, int largest) {
    if (ia < 0) return false;
    if (ib < 0) return true;
    int c = total_cmp(va, vb);
    if (largest) c = -c;
    return c < 0 || (c == 0 && ia < ib);
}

__device__ __forceinline__ void topk_warp_best(acc& bv, i64& bi, int largest) {
    for (int o = 16; o > 0; o >>= 1) {
        acc ov = __shfl_xor_sync(0xffffffffu, bv, o);
        i64 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (topk_before(ov, oi, bv, bi, largest)) { bv = ov; bi = oi; }
    }
}

// Line l of x (through xs: the lines are the last dim of its permuted view, n long) has its k
// picks written to vals/idxs at ((o * k + r) * inner + i) where l = o * inner + i.
extern "C" __global__ void topk_lines(const scalar* x, Strided xs, scalar* vals, i64* idxs,
                                      i64 lines, i64 n, i64 k, i64 inner, int largest) {
    __shared__ acc sv[32];
    __shared__ i64 si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    // With blockDim.x > 32 there is one line per block, so every thread of the block takes the
    // same path through the loops (the block reduction synchronises).
    for (i64 l = (i64)blockIdx.x * blockDim.y + threadIdx.y; l < lines;
         l += (i64)gridDim.x * blockDim.y) {
        i64 o = l / inner, i = l - o * inner;
        acc pv = (acc)0;
        i64 pi = -1;
        for (i64 r = 0; r < k; ++r) {
            acc bv = (acc)0;
            i64 bi = -1;
            for (i64 q = threadIdx.x; q < n; q += blockDim.x) {
                acc v = ld(x[at(xs, l * n + q)]);
                if ((pi < 0 || topk_before(pv, pi, v, q, largest)) &&
                    topk_before(v, q, bv, bi, largest)) {
                    bv = v;
                    bi = q;
                }
            }
            topk_warp_best(bv, bi, largest);
            if (blockDim.x > 32) {
                __syncthreads();
                if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
                __syncthreads();
                bv = lane < nwarps ? sv[lane] : (acc)0;
                bi = lane < nwarps ? si[lane] : -1;
                topk_warp_best(bv, bi, largest);
            }
            if (threadIdx.x == 0) {
                i64 at_ = (o * k + r) * inner + i;
#ifdef DYNN_HALF
                // The element itself (rounding its f32 copy back could change a NaN's bits).
                vals[at_] = bi >= 0 ? x[at(xs, l * n + bi)] : st(bv);
#else
                vals[at_] = bv;
#endif
                idxs[at_] = bi;
            }
            pv = bv;
            pi = bi;
        }
    }
}
"#,
    half: true,
};

/// `topk` on the GPU: outputs `(values, i64 indices)` in the CPU's layout.
fn cuda_topk(t: &TopK, x: &KernelArg<'_>) -> Result<Outputs> {
    const OP: &str = "topk";
    let xs = cuda::storage(OP, x)?;
    let dev = xs.dev();
    let dims = x.shape().dims();
    let n = dims[t.dim];
    let outer: usize = dims[..t.dim].iter().product();
    let inner: usize = dims[t.dim + 1..].iter().product();
    let lines = outer * inner;
    let total = lines * t.k;
    let mut vals = CudaStorage::alloc(dev, x.dtype(), total)?;
    let mut idxs = CudaStorage::alloc(dev, DType::I64, total)?;
    if total > 0 {
        let f = dev.function(&CUDA, x.dtype(), "topk_lines")?;
        let mut perm: Vec<usize> = (0..dims.len()).filter(|&d| d != t.dim).collect();
        perm.push(t.dim);
        let view = Strided::of(OP, &x.layout.permute(&perm)?)?;
        // A warp per line (eight lines per block) up to 256 elements, then wider groups.
        let group = n.div_ceil(8).next_power_of_two().clamp(32, 1024) as u32;
        let per_block = if group == 32 { 8 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (lines.div_ceil(per_block).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (group, per_block as u32, 1),
            shared_mem_bytes: 0,
        };
        let (lines64, n64, k64, inner64, largest) = (
            lines as i64,
            n as i64,
            t.k as i64,
            inner as i64,
            t.largest as i32,
        );
        crate::cuda_launch!(
            dev,
            OP,
            f,
            cfg,
            [
                xs.slice(),
                &view,
                vals.slice_mut(),
                idxs.slice_mut(),
                &lines64,
                &n64,
                &k64,
                &inner64,
                &largest
            ]
        )?;
    }
    Ok(smallvec![
        Box::new(vals) as Box<dyn DeviceStorage>,
        Box::new(idxs) as Box<dyn DeviceStorage>
    ])
}

impl Op for TopK {
    fn name(&self) -> &'static str {
        "topk"
    }
    fn idioms(&self) -> Idioms {
        TOPK_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let x = inputs[0];
        if self.dim >= x.rank() {
            return Err(Error::DimOutOfRange {
                op: "topk",
                dim: self.dim as i64,
                rank: x.rank(),
                shape: x.shape().clone(),
            });
        }
        let n = x.dims()[self.dim];
        if self.k > n {
            return Err(Error::invalid(
                "topk",
                format!(
                    "k = {} exceeds the size {n} of dim {} of shape {}",
                    self.k,
                    self.dim,
                    x.shape()
                ),
            ));
        }
        if n > u32::MAX as usize {
            return Err(Error::invalid(
                "topk",
                format!("dim {} of shape {} is too long", self.dim, x.shape()),
            ));
        }
        let mut dims = x.dims().to_vec();
        dims[self.dim] = self.k;
        Ok(smallvec![
            TensorSpec::new(dims.clone(), x.dtype()),
            TensorSpec::new(dims, DType::I64)
        ])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        // A selection (about n comparisons) plus a sort of k per line.
        let x = inputs[0];
        let n = x.dims()[self.dim].max(1);
        let lines = x.elem_count() / n;
        let k = self.k.max(1);
        let flops = lines * (n + k * (usize::BITS - k.leading_zeros()) as usize);
        let written: usize = outputs.iter().map(TensorSpec::size_in_bytes).sum();
        Cost {
            flops: flops as u64,
            bytes_read: (x.elem_count() * x.dtype().size_in_bytes()) as u64,
            bytes_written: written as u64,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let x = inputs[0];
        if cuda::on_cuda(inputs) {
            return cuda_topk(self, &x);
        }
        let dims = x.shape().dims();
        let rank = dims.len();
        let n = dims[self.dim];
        let outer: usize = dims[..self.dim].iter().product();
        let inner: usize = dims[self.dim + 1..].iter().product();
        // Lines along `dim`, contiguous: move `dim` last.
        let mut perm: Vec<usize> = (0..rank).filter(|&d| d != self.dim).collect();
        perm.push(self.dim);
        let lay = x.layout.permute(&perm)?;
        let (k, largest) = (self.k, self.largest);
        let (vals, idxs): (CpuStorage, Vec<i64>) = with_cpu_storage!(x.cpu("topk")?, v => {
            let lines = match lay.contiguous_range() {
                Some((a, b)) => std::borrow::Cow::Borrowed(&v[a..b]),
                None => std::borrow::Cow::Owned(gather_layout(v, &lay)),
            };
            let (vals, idxs) = topk_lines(&lines, n, k, largest);
            (CpuElement::wrap(to_dim_order(vals, outer, inner, k)), to_dim_order(idxs, outer, inner, k))
        });
        Ok(smallvec![
            Box::new(vals) as Box<dyn dynn_core::DeviceStorage>,
            Box::new(CpuStorage::I64(idxs)) as Box<dyn dynn_core::DeviceStorage>
        ])
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0,
            outputs: 0b10,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let Some(Some(g)) = ctx.grads.first() else {
            return Ok(smallvec![None]);
        };
        let op = ScatterAddZeros {
            name: "topk_backward",
            idioms: TOPK_BACKWARD_IDIOMS,
            dim: self.dim,
            shape: ctx.input_specs[0].shape.clone(),
        };
        Ok(smallvec![Some(execute1(op, &[g, ctx.output(1)?])?)])
    }
}

/// Top-k selection.
pub trait TopKOps {
    /// The `k` largest entries of dim `dim` (or the smallest when `largest` is false), sorted
    /// descending (ascending), with their positions as i64: `(values, indices)`, both of the
    /// input's shape with `k` entries along `dim`. Ties go to the lower index; NaN is larger
    /// than every number. Differentiable in the values.
    fn topk<D: Dim>(&self, k: usize, dim: D, largest: bool) -> Result<(Tensor, Tensor)>;
}

impl TopKOps for Tensor {
    fn topk<D: Dim>(&self, k: usize, dim: D, largest: bool) -> Result<(Tensor, Tensor)> {
        let dim = dim.index(self.shape(), "topk")?;
        let mut outs = execute(TopK { k, dim, largest }, &[self])?.into_iter();
        match (outs.next(), outs.next()) {
            // The indices carry no gradient: cut them from the tape.
            (Some(v), Some(i)) => Ok((v, i.detach())),
            _ => Err(Error::Msg("topk produced fewer than two outputs".into())),
        }
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![
        OpInfo {
            name: "topk",
            idioms: TOPK_IDIOMS,
            differentiable: true,
            family: "topk",
        },
        OpInfo {
            name: "topk_backward",
            idioms: TOPK_BACKWARD_IDIOMS,
            differentiable: false,
            family: "topk",
        },
    ]
}
