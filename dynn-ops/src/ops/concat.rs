//! Joining and splitting: `cat` (an op with N inputs), `stack` (unsqueeze + cat), and the
//! zero-copy `split` and `chunk` (narrow views of the input).

use crate::cpu::{PAR_MIN, chunk_len};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::indexing::{elem_slot, write_row};
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, CpuElement, DType, DeviceStorage, Dim, Error, Idioms, InputGrads, KernelArg,
    Layout, Op, Outputs, Result, Shape, Specs, Tensor, TensorSpec, execute1, smallvec::smallvec,
    vec_from_fill, with_cpu_storage,
};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

/// Concatenation of its inputs along `dim` (all inputs share dtype, rank and every other dim).
#[derive(Debug, Clone, Copy)]
pub struct Cat {
    /// The joined dim.
    pub dim: usize,
}

/// Idioms of `cat`: PyTorch's table row "cat, clone, diag" `[0,0,0,0,0,0]` (a pure copy).
pub const CAT_IDIOMS: Idioms = Idioms::NONE;

fn contiguous<'a, T: Copy + Send + Sync>(src: &'a [T], layout: &Layout) -> Cow<'a, [T]> {
    match layout.contiguous_range() {
        Some((a, b)) => Cow::Borrowed(&src[a..b]),
        None => Cow::Owned(crate::cpu::gather_layout(src, layout)),
    }
}

/// Copies `src` into `dst` (same length), in parallel chunks when large.
fn copy_into<T: Copy + Send + Sync>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    if dst.len() < PAR_MIN {
        write_row(dst, src);
    } else {
        let c = chunk_len(dst.len());
        dst.par_chunks_mut(c)
            .zip(src.par_chunks(c))
            .for_each(|(d, s)| write_row(d, s));
    }
}

/// Joins contiguous parts `(outer, n_k * inner)` into one `(outer, Σ n_k * inner)` vector.
fn cat_kernel<T: Copy + Send + Sync>(
    parts: &[Cow<'_, [T]>],
    segs: &[usize],
    outer: usize,
) -> Vec<T> {
    let row: usize = segs.iter().sum();
    let total = outer * row;
    vec_from_fill(total, |out| {
        if total == 0 {
            return;
        }
        if outer == 1 || row >= PAR_MIN {
            // Few long rows: copy each part's segment of each row, each copy parallel inside.
            let mut rest = out;
            for o in 0..outer {
                for (p, &seg) in parts.iter().zip(segs) {
                    let (head, tail) = rest.split_at_mut(seg);
                    copy_into(head, &p[o * seg..(o + 1) * seg]);
                    rest = tail;
                }
            }
            return;
        }
        let body = |(o, r): (usize, &mut [MaybeUninit<T>])| {
            let mut at = 0;
            for (p, &seg) in parts.iter().zip(segs) {
                write_row(&mut r[at..at + seg], &p[o * seg..(o + 1) * seg]);
                at += seg;
            }
        };
        if total < PAR_MIN {
            out.chunks_mut(row).enumerate().for_each(body);
        } else {
            out.par_chunks_mut(row)
                .enumerate()
                .with_min_len((PAR_MIN / 2 / row).max(1))
                .for_each(body);
        }
    })
}

/// The CUDA kernels: one launch per input copies it (read through its layout) into its slice
/// of every output row. Raw element moves, one kernel per element size (`b16`: 16-byte
/// vectors, for contiguous aligned inputs), so every dtype is served.
pub const CUDA: CudaSource = CudaSource {
    name: "concat",
    code: r#"
// Element e of the input (outer, seg) goes to out[o * row + at0 + r]; all counts in units of E.
template <typename E>
__device__ __forceinline__ void cat_copy_impl(const E* x, const Strided& xs, E* out, i64 seg,
                                              i64 row, i64 at0, i64 total) {
    GRID_LOOP(e, total) {
        i64 o = e / seg;
        out[o * row + at0 + (e - o * seg)] = x[at(xs, e)];
    }
}

#define CAT_COPY(E, ES)                                                                        \
    extern "C" __global__ void cat_copy_##ES(const E* x, Strided xs, E* out, i64 seg, i64 row, \
                                            i64 at0, i64 total) {                              \
        cat_copy_impl<E>(x, xs, out, seg, row, at0, total);                                    \
    }
CAT_COPY(u8, b1)
CAT_COPY(unsigned short, b2)
CAT_COPY(unsigned int, b4)
CAT_COPY(unsigned long long, b8)
CAT_COPY(uint4, b16)
"#,
    half: false,
};

/// The copy kernels by element size: 1, 2, 4, 8 bytes, then 16-byte vectors.
const CAT_COPY: [&str; 5] = [
    "cat_copy_b1",
    "cat_copy_b2",
    "cat_copy_b4",
    "cat_copy_b8",
    "cat_copy_b16",
];

/// `cat` on the GPU: each input copied into its slice of the output rows by one launch.
fn cuda_cat(
    inputs: &[KernelArg<'_>],
    dim: usize,
    spec: &TensorSpec,
) -> Result<Box<dyn DeviceStorage>> {
    const OP: &str = "cat";
    let dev = cuda::device_of(OP, inputs)?;
    let dims = spec.shape.dims();
    let outer: usize = dims[..dim].iter().product();
    let inner: usize = dims[dim + 1..].iter().product();
    let row = dims[dim] * inner;
    let mut out = CudaStorage::alloc(&dev, spec.dtype, spec.shape.elem_count())?;
    let slot = elem_slot(OP, spec.dtype)?;
    let f = 16 / spec.dtype.size_in_bytes();
    let mut at = 0;
    for a in inputs {
        let xs = cuda::storage(OP, a)?;
        let seg = a.shape().dims()[dim] * inner;
        let total = outer * seg;
        if total > 0 {
            let vec = a.layout.is_contiguous()
                && a.layout.offset() % f == 0
                && seg % f == 0
                && row % f == 0
                && at % f == 0;
            let (name, unit, view) = if vec {
                let l = Layout::from_parts(
                    Shape::from(total / f),
                    [1].as_slice().into(),
                    a.layout.offset() / f,
                );
                (CAT_COPY[4], f, Strided::of(OP, &l)?)
            } else {
                (CAT_COPY[slot], 1, Strided::of(OP, a.layout)?)
            };
            let func = dev.function(&CUDA, DType::F32, name)?;
            let (seg64, row64, at64, total64) = (
                (seg / unit) as i64,
                (row / unit) as i64,
                (at / unit) as i64,
                (total / unit) as i64,
            );
            crate::cuda_launch!(
                dev,
                OP,
                func,
                cuda::grid(total / unit),
                [
                    xs.slice(),
                    &view,
                    out.slice_mut(),
                    &seg64,
                    &row64,
                    &at64,
                    &total64
                ]
            )?;
        }
        at += seg;
    }
    Ok(Box::new(out))
}

impl Op for Cat {
    fn name(&self) -> &'static str {
        "cat"
    }
    fn idioms(&self) -> Idioms {
        CAT_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let Some(first) = inputs.first() else {
            return Err(Error::invalid("cat", "needs at least one tensor"));
        };
        if self.dim >= first.rank() {
            return Err(Error::DimOutOfRange {
                op: "cat",
                dim: self.dim as i64,
                rank: first.rank(),
                shape: first.shape().clone(),
            });
        }
        let mut dims = first.dims().to_vec();
        for (k, t) in inputs.iter().enumerate().skip(1) {
            if t.dtype() != first.dtype() {
                return Err(Error::DTypeMismatch {
                    op: "cat",
                    expected: first.dtype(),
                    got: t.dtype(),
                });
            }
            let same = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(d, (a, b))| d == self.dim || a == b);
            if !same {
                return Err(Error::invalid(
                    "cat",
                    format!(
                        "tensor {k} of shape {} does not match tensor 0 of shape {} outside dim {}",
                        t.shape(),
                        first.shape(),
                        self.dim
                    ),
                ));
            }
            dims[self.dim] += t.dims()[self.dim];
        }
        Ok(smallvec![TensorSpec::new(dims, first.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        Cost::streaming(inputs, outputs, 0)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_cat(inputs, self.dim, &specs[0])?]);
        }
        let dims = specs[0].shape.dims();
        let outer: usize = dims[..self.dim].iter().product();
        let inner: usize = dims[self.dim + 1..].iter().product();
        let segs: Vec<usize> = inputs
            .iter()
            .map(|a| a.shape().dims()[self.dim] * inner)
            .collect();
        let Some(first) = inputs.first() else {
            return Err(Error::invalid("cat", "needs at least one tensor"));
        };
        Ok(with_cpu_storage!(first.cpu("cat")?, v => {
            let mut parts = Vec::with_capacity(inputs.len());
            parts.push(contiguous(v, first.layout));
            for a in &inputs[1..] {
                parts.push(contiguous(a.cpu("cat")?.as_slice("cat")?, a.layout));
            }
            crate::cpu::one(CpuElement::wrap(cat_kernel(&parts, &segs, outer)))
        }))
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g = ctx.grad(0)?;
        let mut at = 0;
        let mut grads: InputGrads = smallvec![];
        for (i, spec) in ctx.input_specs.iter().enumerate() {
            let n = spec.shape.dims()[self.dim];
            grads.push(if ctx.needs(i) {
                Some(g.narrow(self.dim, at, n)?)
            } else {
                None
            });
            at += n;
        }
        Ok(grads)
    }
}

/// Concatenates `tensors` along `dim` (every other dim, the rank and the dtype must agree).
/// Differentiable: each input's gradient is its slice (a narrow view) of the output's.
pub fn cat<D: Dim>(tensors: &[&Tensor], dim: D) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::invalid(
            "cat",
            "needs at least one tensor, got an empty list",
        ));
    };
    let dim = dim.index(first.shape(), "cat")?;
    execute1(Cat { dim }, tensors)
}

/// Stacks equally shaped `tensors` along a new dim `dim` (`0..=rank`): each is unsqueezed at
/// `dim`, then they are concatenated.
pub fn stack<D: Dim>(tensors: &[&Tensor], dim: D) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::invalid(
            "stack",
            "needs at least one tensor, got an empty list",
        ));
    };
    let dim = dim.index_for_insert(first.shape(), "stack")?;
    for t in &tensors[1..] {
        if t.shape() != first.shape() {
            return Err(Error::shape_mismatch("stack", first.shape(), t.shape()));
        }
    }
    let parts: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.unsqueeze(dim))
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = parts.iter().collect();
    execute1(Cat { dim }, &refs)
}

/// Splitting a tensor into zero-copy views, and concatenation as a method.
pub trait ConcatOps {
    /// Views of consecutive slices of `dim` with the given `sizes`, which must add up to the
    /// dim's size. No copy.
    fn split<D: Dim>(&self, sizes: &[usize], dim: D) -> Result<Vec<Tensor>>;
    /// Splits `dim` into `n` views of `ceil(size / n)` entries (the last one smaller), as in
    /// PyTorch: fewer than `n` chunks when the size does not allow `n`. No copy.
    fn chunk<D: Dim>(&self, n: usize, dim: D) -> Result<Vec<Tensor>>;
    /// `self` followed by `others` along `dim` (see [`cat`]).
    fn cat_with<D: Dim>(&self, others: &[&Tensor], dim: D) -> Result<Tensor>;
}

impl ConcatOps for Tensor {
    fn split<D: Dim>(&self, sizes: &[usize], dim: D) -> Result<Vec<Tensor>> {
        let dim = dim.index(self.shape(), "split")?;
        let size = self.dims()[dim];
        let total: usize = sizes.iter().sum();
        if total != size {
            return Err(Error::invalid(
                "split",
                format!(
                    "sizes {sizes:?} add up to {total}, but dim {dim} of shape {} has {size}",
                    self.shape()
                ),
            ));
        }
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                let v = self.narrow(dim, at, n);
                at += n;
                v
            })
            .collect()
    }
    fn chunk<D: Dim>(&self, n: usize, dim: D) -> Result<Vec<Tensor>> {
        let dim = dim.index(self.shape(), "chunk")?;
        if n == 0 {
            return Err(Error::invalid(
                "chunk",
                "the number of chunks must be positive",
            ));
        }
        let size = self.dims()[dim];
        if size == 0 {
            return Ok(vec![self.narrow(dim, 0, 0)?]);
        }
        let step = size.div_ceil(n);
        (0..size)
            .step_by(step)
            .map(|at| self.narrow(dim, at, step.min(size - at)))
            .collect()
    }
    fn cat_with<D: Dim>(&self, others: &[&Tensor], dim: D) -> Result<Tensor> {
        let mut all: Vec<&Tensor> = Vec::with_capacity(others.len() + 1);
        all.push(self);
        all.extend_from_slice(others);
        cat(&all, dim)
    }
}

/// This file's entries in the op table (`stack`, `split` and `chunk` are compositions of
/// `cat`, `unsqueeze` and `narrow`).
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![OpInfo {
        name: "cat",
        idioms: CAT_IDIOMS,
        differentiable: true,
        family: "concat",
    }]
}
