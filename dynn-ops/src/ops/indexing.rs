//! Indexing ops: `embedding`, `index_select`, `gather` (torch semantics), `scatter_add` and
//! `index_add`, with their backward kernels (`embedding_backward`, `index_select_backward`,
//! `gather_backward`). Index tensors are i64 or u32; an index outside its dim is an
//! [`Error::IndexOutOfRange`] naming the op, the index, the size and its position.
//!
//! Every accumulating kernel is deterministic: each destination element is owned by exactly one
//! task, and the contributions to it are added in increasing source order, whatever the thread
//! count or timing.

use crate::cpu::{PAR_MIN, gather_layout, map_layout};
use crate::math::simd;
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, CpuStorage, Dim, Error, FloatElement, Idioms,
    InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec,
    execute1, smallvec::smallvec, vec_from_fill, with_cpu_storage,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Idioms of the forward indexing ops (`embedding`, `index_select`, `gather`): one indirect
/// access (a gather through an index tensor). PyTorch's table has no forward row for them;
/// the indirect idiom is the one access they perform.
pub const GATHER_IDIOMS: Idioms = Idioms([0, 0, 1, 0, 0, 0]);
/// Idioms of the row scatter-adds (`embedding_backward`, `index_select_backward`,
/// `index_add`): PyTorch's table row "embedding backward" `[0,1,1,1,1,0]`.
pub const EMBEDDING_BACKWARD_IDIOMS: Idioms = Idioms([0, 1, 1, 1, 1, 0]);
/// Idioms of the element scatter-adds (`gather_backward`, `scatter_add`): PyTorch's table
/// row "gather backward" `[0,1,1,1,0,0]`.
pub const GATHER_BACKWARD_IDIOMS: Idioms = Idioms([0, 1, 1, 1, 0, 0]);

// ----- shared helpers -----

/// `pos` as a multi-index of `dims` (row-major).
fn unravel(mut pos: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (i, &d) in dims.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = pos % d;
            pos /= d;
        }
    }
    idx
}

/// Checks that an index tensor has an index dtype.
fn check_index_dtype(op: &'static str, t: &Tensor, what: &str) -> Result<()> {
    if t.dtype().is_int() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType {
            op,
            dtype: t.dtype(),
            hint: format!(" for {what} (expected i64 or u32)"),
        })
    }
}

/// Reads an index tensor (i64 or u32, any layout) as row-major `usize`s, checking each is
/// below `size`; the error names the first offending index and its position.
pub(crate) fn read_indices(
    op: &'static str,
    arg: &KernelArg<'_>,
    size: usize,
    what: &str,
) -> Result<Vec<usize>> {
    const BAD: usize = usize::MAX;
    let s = arg.cpu(op)?;
    let v = match s {
        CpuStorage::I64(v) => map_layout(v, arg.layout, |x| {
            if x >= 0 && (x as u64) < size as u64 {
                x as usize
            } else {
                BAD
            }
        }),
        CpuStorage::U32(v) => map_layout(v, arg.layout, |x| {
            if (x as u64) < size as u64 {
                x as usize
            } else {
                BAD
            }
        }),
        other => {
            return Err(Error::UnsupportedDType {
                op,
                dtype: other.dtype(),
                hint: format!(" for {what} (expected i64 or u32)"),
            });
        }
    };
    if let Some(pos) = v.iter().position(|&x| x == BAD) {
        let at = arg.layout.indices().nth(pos).unwrap_or(0);
        let index = match s {
            CpuStorage::I64(v) => v.get(at).copied().unwrap_or(-1),
            CpuStorage::U32(v) => v.get(at).map_or(-1, |&x| x as i64),
            _ => -1,
        };
        return Err(Error::IndexOutOfRange {
            op,
            index,
            size,
            context: format!(
                " at position {pos} {:?} of {what} of shape {}",
                unravel(pos, arg.shape().dims()),
                arg.shape()
            ),
        });
    }
    Ok(v)
}

/// Copies `src` into the uninitialised `dst` (same length).
#[inline(always)]
pub(crate) fn write_row<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    let n = dst.len().min(src.len());
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, both ranges hold `n` elements, and they cannot
    // overlap (`dst` is exclusively borrowed, `src` shared).
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<T>(), n) }
}

/// Where the rows of `x` along `dim` start: `x` as `(outer, n, inner)` where each row of
/// `inner` elements is contiguous in the buffer. Borrows the input when its inner block is
/// contiguous (any outer strides, offset or row stride), else copies it contiguous.
struct Rows<'a, T: Clone> {
    data: std::borrow::Cow<'a, [T]>,
    /// Buffer offset of `(o, 0, 0)` for each outer index.
    bases: Vec<usize>,
    /// Buffer distance between consecutive rows along `dim`.
    stride: usize,
    inner: usize,
}

impl<'a, T: Copy + Send + Sync> Rows<'a, T> {
    fn new(src: &'a [T], layout: &Layout, dim: usize) -> Self {
        let dims = layout.dims();
        let strides = layout.strides();
        let inner: usize = dims[dim + 1..].iter().product();
        let inner_contig =
            Layout::from_parts(Shape::new(&dims[dim + 1..]), strides[dim + 1..].into(), 0)
                .is_contiguous();
        if inner_contig {
            let outer = Layout::from_parts(
                Shape::new(&dims[..dim]),
                strides[..dim].into(),
                layout.offset(),
            );
            Rows {
                data: std::borrow::Cow::Borrowed(src),
                bases: outer.indices().collect(),
                stride: strides[dim],
                inner,
            }
        } else {
            let c = gather_layout(src, layout);
            let n = dims[dim];
            let outer: usize = dims[..dim].iter().product();
            Rows {
                data: std::borrow::Cow::Owned(c),
                bases: (0..outer).map(|o| o * n * inner).collect(),
                stride: inner,
                inner,
            }
        }
    }

    #[inline(always)]
    fn row(&self, o: usize, v: usize) -> &[T] {
        let s = self.bases[o] + v * self.stride;
        &self.data[s..s + self.inner]
    }
}

/// `out[o, j, :] = x[o, ids[j], :]` for every outer `o`: rows copied with one memcpy each, in
/// parallel over output rows.
fn select_rows<T: Copy + Send + Sync>(rows: &Rows<'_, T>, ids: &[usize]) -> Vec<T> {
    let (outer, m, inner) = (rows.bases.len(), ids.len(), rows.inner);
    let total = outer * m * inner;
    vec_from_fill(total, |out| {
        if total == 0 {
            return;
        }
        let body =
            |(r, row): (usize, &mut [MaybeUninit<T>])| write_row(row, rows.row(r / m, ids[r % m]));
        if total * std::mem::size_of::<T>() >= crate::cpu::STREAM_MIN_BYTES && inner >= 64 {
            // Large gathers are bound by memory latency and traffic: fetch a row a few ahead
            // while copying this one, and stream the output past the cache.
            const AHEAD: usize = 8;
            let per_task = (out.len() / inner)
                .div_ceil(rayon::current_num_threads() * 8)
                .max(1);
            out.par_chunks_mut(inner * per_task)
                .enumerate()
                .for_each(|(t, chunk)| {
                    let first = t * per_task;
                    for (k, row) in chunk.chunks_mut(inner).enumerate() {
                        let r = first + k;
                        if r + AHEAD < outer * m {
                            crate::cpu::prefetch(rows.row((r + AHEAD) / m, ids[(r + AHEAD) % m]));
                        }
                        crate::cpu::stream_copy(row, rows.row(r / m, ids[r % m]));
                    }
                    crate::cpu::stream_fence();
                });
        } else if total < PAR_MIN {
            out.chunks_mut(inner).enumerate().for_each(body);
        } else {
            let min_rows = (PAR_MIN / 2 / inner).max(1);
            out.par_chunks_mut(inner)
                .enumerate()
                .with_min_len(min_rows)
                .for_each(body);
        }
    })
}

/// `out[o, ids[j], :] += src[o, j, :]` on contiguous `out (outer, n, inner)` and
/// `src (outer, m, inner)`. Deterministic without atomics: the source rows are bucketed by
/// destination (a stable counting sort), then each destination row is owned by one task that
/// adds its sources in increasing `j`, accumulating in `T::Acc`.
fn add_rows<T: FloatElement + CpuElement>(
    out: &mut [T],
    n: usize,
    inner: usize,
    src: &[T],
    ids: &[usize],
) {
    let m = ids.len();
    if out.is_empty() || inner == 0 || m == 0 || n == 0 {
        return;
    }
    let mut start = vec![0usize; n + 1];
    for &v in ids {
        start[v + 1] += 1;
    }
    for v in 0..n {
        start[v + 1] += start[v];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; m];
    for (j, &v) in ids.iter().enumerate() {
        order[fill[v]] = j;
        fill[v] += 1;
    }
    let body = |acc: &mut Vec<T::Acc>, (r, row): (usize, &mut [T])| {
        let (o, v) = (r / n, r % n);
        let js = &order[start[v]..start[v + 1]];
        if js.is_empty() {
            return;
        }
        simd(|| {
            acc.clear();
            acc.extend(row.iter().map(|x| x.to_acc()));
            for &j in js {
                let s = &src[(o * m + j) * inner..(o * m + j + 1) * inner];
                for (a, &x) in acc.iter_mut().zip(s) {
                    *a += x.to_acc();
                }
            }
            for (d, &a) in row.iter_mut().zip(acc.iter()) {
                *d = T::from_acc(a);
            }
        })
    };
    if out.len() + src.len() < PAR_MIN {
        let mut acc = Vec::with_capacity(inner);
        out.chunks_mut(inner)
            .enumerate()
            .for_each(|x| body(&mut acc, x));
    } else {
        let min_rows = (PAR_MIN / 4 / inner).max(1);
        out.par_chunks_mut(inner)
            .enumerate()
            .with_min_len(min_rows)
            .for_each_init(|| Vec::with_capacity(inner), body);
    }
}

/// Offsets for the element-wise gather/scatter along `dim`: the index tensor (shape `idx_dims`,
/// every dim but `dim` no larger than `x`'s) seen as `(outer, m, inner)`, and the buffer
/// offsets of `x` (strides `strides`, offset `offset`) for each outer and inner position.
struct ElemGeometry {
    outer_base: Vec<usize>,
    inner_off: Vec<usize>,
    stride: usize,
    m: usize,
}

impl ElemGeometry {
    fn new(idx_dims: &[usize], dim: usize, strides: &[usize], offset: usize) -> Self {
        let outer = Layout::from_parts(Shape::new(&idx_dims[..dim]), strides[..dim].into(), offset);
        let inner = Layout::from_parts(
            Shape::new(&idx_dims[dim + 1..]),
            strides[dim + 1..].into(),
            0,
        );
        ElemGeometry {
            outer_base: outer.indices().collect(),
            inner_off: inner.indices().collect(),
            stride: strides[dim],
            m: idx_dims[dim],
        }
    }
}

/// `out[o, j, i] = x[o, idx[o, j, i], i]` (torch's gather) reading `x` through its layout.
fn gather_elems<T: Copy + Send + Sync>(x: &[T], g: &ElemGeometry, idx: &[usize]) -> Vec<T> {
    let ni = g.inner_off.len();
    let total = idx.len();
    vec_from_fill(total, |out| {
        if total == 0 || ni == 0 {
            return;
        }
        let body = |(r, row): (usize, &mut [MaybeUninit<T>])| {
            let base = g.outer_base[r / g.m];
            let ids = &idx[r * ni..(r + 1) * ni];
            for ((o, &v), &off) in row.iter_mut().zip(ids).zip(&g.inner_off) {
                o.write(x[base + v * g.stride + off]);
            }
        };
        if total < PAR_MIN {
            out.chunks_mut(ni).enumerate().for_each(body);
        } else {
            out.par_chunks_mut(ni)
                .enumerate()
                .with_min_len((PAR_MIN / 4 / ni).max(1))
                .for_each(body);
        }
    })
}

/// `out[o, idx[o, j, i], i] += src[o, j, i]` (torch's scatter_add) on a contiguous `out` of
/// shape `out_dims`. Parallel over the outer blocks of `out` (each owned by one task); inside
/// a block the sources are added in row-major order, so the result is deterministic.
fn scatter_add_elems<T: FloatElement>(
    out: &mut [T],
    out_dims: &[usize],
    dim: usize,
    idx_dims: &[usize],
    idx: &[usize],
    src: &[T],
) {
    let strides = Shape::new(out_dims).contiguous_strides();
    let g = ElemGeometry::new(idx_dims, dim, &strides, 0);
    let ni = g.inner_off.len();
    let block_len: usize = out_dims[dim..].iter().product();
    if out.is_empty() || idx.is_empty() || block_len == 0 || ni == 0 {
        return;
    }
    let (x_outer, i_outer) = (&out_dims[..dim], &idx_dims[..dim]);
    let body = |(b, block): (usize, &mut [T])| {
        // The index's outer position that lands in this block of `out`, if any.
        let coords = unravel(b, x_outer);
        if coords.iter().zip(i_outer).any(|(&c, &d)| c >= d) {
            return;
        }
        let o = coords
            .iter()
            .zip(i_outer)
            .fold(0, |acc, (&c, &d)| acc * d + c);
        for j in 0..g.m {
            let r = o * g.m + j;
            let (ids, s) = (&idx[r * ni..(r + 1) * ni], &src[r * ni..(r + 1) * ni]);
            for ((&v, &x), &off) in ids.iter().zip(s).zip(&g.inner_off) {
                let d = &mut block[v * g.stride + off];
                *d = T::from_acc(d.to_acc() + x.to_acc());
            }
        }
    };
    let blocks = out.len() / block_len;
    if blocks < 2 || out.len() + idx.len() < PAR_MIN {
        out.chunks_mut(block_len).enumerate().for_each(body);
    } else {
        out.par_chunks_mut(block_len).enumerate().for_each(body);
    }
}

fn wrap<T: CpuElement>(v: Vec<T>) -> Outputs {
    crate::cpu::one(T::wrap(v))
}

fn bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn spec_bytes(s: &TensorSpec) -> u64 {
    s.size_in_bytes() as u64
}

fn same_float_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            expected: a.dtype(),
            got: b.dtype(),
        });
    }
    if !a.dtype().is_float() {
        return Err(Error::unsupported_dtype(op, a.dtype()));
    }
    Ok(())
}

// ----- embedding -----

/// Rows of a `(V, D)` table at `ids` (any shape, i64 or u32): output `ids.shape + [D]`.
#[derive(Debug, Clone, Copy)]
pub struct Embedding;

impl Op for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn idioms(&self) -> Idioms {
        GATHER_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (table, ids) = (inputs[0], inputs[1]);
        if table.rank() != 2 {
            return Err(Error::invalid(
                "embedding",
                format!(
                    "the table must be (vocab, dim), got shape {}",
                    table.shape()
                ),
            ));
        }
        check_index_dtype("embedding", ids, "ids")?;
        let mut dims = ids.dims().to_vec();
        dims.push(table.dims()[1]);
        Ok(smallvec![TensorSpec::new(dims, table.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        // Reads the ids and one table row per id; writes the output.
        let out = spec_bytes(&outputs[0]);
        Cost {
            flops: 0,
            bytes_read: bytes(inputs[1]) + out,
            bytes_written: out,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (table, ids) = (inputs[0], inputs[1]);
        let ids = read_indices("embedding", &ids, table.shape().dims()[0], "ids")?;
        Ok(
            with_cpu_storage!(table.cpu("embedding")?, v => wrap(select_rows(&Rows::new(v, table.layout, 0), &ids))),
        )
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
        let table = &ctx.input_specs[0].shape;
        let ids = ctx.input(1)?;
        let (v, d) = (table.dims()[0], table.dims()[1]);
        let ids = ids.reshape(ids.elem_count())?;
        let g = ctx.grad(0)?.reshape((ids.elem_count(), d))?;
        let gt = execute1(
            IndexAddZeros {
                name: "embedding_backward",
                dim: 0,
                size: v,
            },
            &[&g, &ids],
        )?;
        Ok(smallvec![Some(gt), None])
    }
}

// ----- index_select -----

/// `x` restricted to the entries `ids` (1-D, i64 or u32) of dim `dim`.
#[derive(Debug, Clone, Copy)]
pub struct IndexSelect {
    /// The indexed dim.
    pub dim: usize,
}

impl Op for IndexSelect {
    fn name(&self) -> &'static str {
        "index_select"
    }
    fn idioms(&self) -> Idioms {
        GATHER_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (x, ids) = (inputs[0], inputs[1]);
        check_index_dtype("index_select", ids, "ids")?;
        if ids.rank() != 1 {
            return Err(Error::invalid(
                "index_select",
                format!("ids must be 1-D, got shape {}", ids.shape()),
            ));
        }
        if self.dim >= x.rank() {
            return Err(Error::DimOutOfRange {
                op: "index_select",
                dim: self.dim as i64,
                rank: x.rank(),
                shape: x.shape().clone(),
            });
        }
        let mut dims = x.dims().to_vec();
        dims[self.dim] = ids.elem_count();
        Ok(smallvec![TensorSpec::new(dims, x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let out = spec_bytes(&outputs[0]);
        Cost {
            flops: 0,
            bytes_read: bytes(inputs[1]) + out,
            bytes_written: out,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (x, ids) = (inputs[0], inputs[1]);
        let ids = read_indices("index_select", &ids, x.shape().dims()[self.dim], "ids")?;
        Ok(
            with_cpu_storage!(x.cpu("index_select")?, v => wrap(select_rows(&Rows::new(v, x.layout, self.dim), &ids))),
        )
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
        let size = ctx.input_specs[0].shape.dims()[self.dim];
        let gx = execute1(
            IndexAddZeros {
                name: "index_select_backward",
                dim: self.dim,
                size,
            },
            &[ctx.grad(0)?, ctx.input(1)?],
        )?;
        Ok(smallvec![Some(gx), None])
    }
}

/// Backward of `embedding` and `index_select`: a zero tensor whose dim `dim` has `size`
/// entries, with gradient rows added at `ids`. Inputs `(grad, ids)` (ids 1-D).
#[derive(Debug, Clone, Copy)]
pub struct IndexAddZeros {
    /// The op-table name (`embedding_backward` or `index_select_backward`).
    pub name: &'static str,
    /// The indexed dim.
    pub dim: usize,
    /// The size of that dim in the result.
    pub size: usize,
}

impl Op for IndexAddZeros {
    fn name(&self) -> &'static str {
        self.name
    }
    fn idioms(&self) -> Idioms {
        EMBEDDING_BACKWARD_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (g, ids) = (inputs[0], inputs[1]);
        check_index_dtype(self.name, ids, "ids")?;
        if !g.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name, g.dtype()));
        }
        if ids.rank() != 1 || self.dim >= g.rank() || g.dims()[self.dim] != ids.elem_count() {
            return Err(Error::shape_mismatch(self.name, g.shape(), ids.shape()));
        }
        let mut dims = g.dims().to_vec();
        dims[self.dim] = self.size;
        Ok(smallvec![TensorSpec::new(dims, g.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        // Zero-fills the result, then adds each gradient row into it.
        let g = bytes(inputs[0]);
        Cost {
            flops: inputs[0].elem_count() as u64,
            bytes_read: g + bytes(inputs[1]) + g,
            bytes_written: spec_bytes(&outputs[0]) + g,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let (g, ids) = (inputs[0], inputs[1]);
        let ids = read_indices(self.name, &ids, self.size, "ids")?;
        let out_dims = specs[0].shape.dims();
        let inner: usize = out_dims[self.dim + 1..].iter().product();
        let n_out = specs[0].shape.elem_count();
        Ok(crate::float_dispatch!(self.name, g.cpu(self.name)?, |v| {
            let src = contiguous(v, g.layout);
            let mut out = vec![zero_of(v); n_out];
            add_rows(&mut out, self.size, inner, &src, &ids);
            wrap(out)
        }))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

/// The zero of a slice's element type (a type witness for generic dispatch).
fn zero_of<T: FloatElement>(_: &[T]) -> T {
    T::from_acc(<T::Acc as AccFloat>::ZERO)
}

/// The elements of `src` seen through `layout`, borrowed when already contiguous.
fn contiguous<'a, T: Copy + Send + Sync>(
    src: &'a [T],
    layout: &Layout,
) -> std::borrow::Cow<'a, [T]> {
    match layout.contiguous_range() {
        Some((a, b)) => std::borrow::Cow::Borrowed(&src[a..b]),
        None => std::borrow::Cow::Owned(gather_layout(src, layout)),
    }
}

// ----- index_add -----

/// `x` with `src`'s slices along `dim` added at the entries `ids` (1-D): inputs `(x, ids, src)`.
#[derive(Debug, Clone, Copy)]
pub struct IndexAdd {
    /// The indexed dim.
    pub dim: usize,
}

impl Op for IndexAdd {
    fn name(&self) -> &'static str {
        "index_add"
    }
    fn idioms(&self) -> Idioms {
        EMBEDDING_BACKWARD_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (x, ids, src) = (inputs[0], inputs[1], inputs[2]);
        same_float_dtype("index_add", x, src)?;
        check_index_dtype("index_add", ids, "ids")?;
        if ids.rank() != 1 {
            return Err(Error::invalid(
                "index_add",
                format!("ids must be 1-D, got shape {}", ids.shape()),
            ));
        }
        if self.dim >= x.rank() {
            return Err(Error::DimOutOfRange {
                op: "index_add",
                dim: self.dim as i64,
                rank: x.rank(),
                shape: x.shape().clone(),
            });
        }
        let mut want = x.dims().to_vec();
        want[self.dim] = ids.elem_count();
        if src.dims() != want.as_slice() {
            return Err(Error::invalid(
                "index_add",
                format!(
                    "src of shape {} must be {} (x {} with dim {} sized like ids {})",
                    src.shape(),
                    Shape::from(want),
                    x.shape(),
                    self.dim,
                    ids.shape()
                ),
            ));
        }
        Ok(smallvec![TensorSpec::new(x.shape().clone(), x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let src = bytes(inputs[2]);
        Cost {
            flops: inputs[2].elem_count() as u64,
            bytes_read: bytes(inputs[0]) + bytes(inputs[1]) + 2 * src,
            bytes_written: spec_bytes(&outputs[0]) + src,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (x, ids, src) = (inputs[0], inputs[1], inputs[2]);
        let dims = x.shape().dims();
        let (n, inner) = (dims[self.dim], dims[self.dim + 1..].iter().product());
        let ids = read_indices("index_add", &ids, n, "ids")?;
        let ss = src.cpu("index_add")?;
        Ok(crate::float_dispatch!(
            "index_add",
            x.cpu("index_add")?,
            |v| {
                let mut out = gather_layout(v, x.layout);
                let s = contiguous(ss.as_slice("index_add")?, src.layout);
                add_rows(&mut out, n, inner, &s, &ids);
                wrap(out)
            }
        ))
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0b010,
            outputs: 0,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g = ctx.grad(0)?;
        let gs = if ctx.needs(2) {
            Some(g.index_select(self.dim, ctx.input(1)?)?)
        } else {
            None
        };
        Ok(smallvec![ctx.needs(0).then(|| g.clone()), None, gs])
    }
}

// ----- gather / scatter_add -----

fn check_elem_shapes(op: &'static str, x: &Shape, index: &Tensor, dim: usize) -> Result<()> {
    check_index_dtype(op, index, "index")?;
    if dim >= x.rank() {
        return Err(Error::DimOutOfRange {
            op,
            dim: dim as i64,
            rank: x.rank(),
            shape: x.clone(),
        });
    }
    let ok = index.rank() == x.rank()
        && x.dims()
            .iter()
            .zip(index.dims())
            .enumerate()
            .all(|(d, (&a, &b))| d == dim || b <= a);
    if !ok {
        return Err(Error::invalid(
            op,
            format!(
                "index of shape {} must have the rank of x {x} and no larger size in any dim but {dim}",
                index.shape()
            ),
        ));
    }
    Ok(())
}

/// Torch's gather: `out[.., j, ..] = x[.., index[.., j, ..], ..]` along `dim`; the output has
/// the index's shape (whose dims other than `dim` are no larger than `x`'s).
#[derive(Debug, Clone, Copy)]
pub struct Gather {
    /// The gathered dim.
    pub dim: usize,
}

impl Op for Gather {
    fn name(&self) -> &'static str {
        "gather"
    }
    fn idioms(&self) -> Idioms {
        GATHER_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (x, index) = (inputs[0], inputs[1]);
        check_elem_shapes("gather", x.shape(), index, self.dim)?;
        Ok(smallvec![TensorSpec::new(index.shape().clone(), x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let out = spec_bytes(&outputs[0]);
        Cost {
            flops: 0,
            bytes_read: bytes(inputs[1]) + out,
            bytes_written: out,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (x, index) = (inputs[0], inputs[1]);
        let idx = read_indices("gather", &index, x.shape().dims()[self.dim], "index")?;
        let g = ElemGeometry::new(
            index.shape().dims(),
            self.dim,
            x.layout.strides(),
            x.layout.offset(),
        );
        Ok(with_cpu_storage!(x.cpu("gather")?, v => wrap(gather_elems(v, &g, &idx))))
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
        let op = ScatterAddZeros {
            name: "gather_backward",
            idioms: GATHER_BACKWARD_IDIOMS,
            dim: self.dim,
            shape: ctx.input_specs[0].shape.clone(),
        };
        Ok(smallvec![
            Some(execute1(op, &[ctx.grad(0)?, ctx.input(1)?])?),
            None
        ])
    }
}

/// Torch's scatter_add: `x` with `src[.., j, ..]` added at `[.., index[.., j, ..], ..]` along
/// `dim`. Inputs `(x, index, src)` with `src` of the index's shape.
#[derive(Debug, Clone, Copy)]
pub struct ScatterAdd {
    /// The scattered dim.
    pub dim: usize,
}

impl Op for ScatterAdd {
    fn name(&self) -> &'static str {
        "scatter_add"
    }
    fn idioms(&self) -> Idioms {
        GATHER_BACKWARD_IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (x, index, src) = (inputs[0], inputs[1], inputs[2]);
        same_float_dtype("scatter_add", x, src)?;
        check_elem_shapes("scatter_add", x.shape(), index, self.dim)?;
        if src.shape() != index.shape() {
            return Err(Error::shape_mismatch(
                "scatter_add (src vs index)",
                src.shape(),
                index.shape(),
            ));
        }
        Ok(smallvec![TensorSpec::new(x.shape().clone(), x.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let src = bytes(inputs[2]);
        Cost {
            flops: inputs[2].elem_count() as u64,
            bytes_read: bytes(inputs[0]) + bytes(inputs[1]) + 2 * src,
            bytes_written: spec_bytes(&outputs[0]) + src,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (x, index, src) = (inputs[0], inputs[1], inputs[2]);
        let dims = x.shape().dims();
        let idx = read_indices("scatter_add", &index, dims[self.dim], "index")?;
        let ss = src.cpu("scatter_add")?;
        Ok(crate::float_dispatch!(
            "scatter_add",
            x.cpu("scatter_add")?,
            |v| {
                let mut out = gather_layout(v, x.layout);
                let s = contiguous(ss.as_slice("scatter_add")?, src.layout);
                scatter_add_elems(&mut out, dims, self.dim, index.shape().dims(), &idx, &s);
                wrap(out)
            }
        ))
    }
    fn save(&self) -> Save {
        Save {
            inputs: 0b010,
            outputs: 0,
        }
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g = ctx.grad(0)?;
        let gs = if ctx.needs(2) {
            Some(execute1(Gather { dim: self.dim }, &[g, ctx.input(1)?])?)
        } else {
            None
        };
        Ok(smallvec![ctx.needs(0).then(|| g.clone()), None, gs])
    }
}

/// A zero tensor of `shape` with `src` scatter-added along `dim` at `index` (inputs
/// `(src, index)`, same shape): the backward of `gather` (and, named `topk_backward`, of
/// `topk`).
#[derive(Debug, Clone)]
pub struct ScatterAddZeros {
    /// The op-table name.
    pub name: &'static str,
    /// The idioms reported for it.
    pub idioms: Idioms,
    /// The scattered dim.
    pub dim: usize,
    /// The result's shape.
    pub shape: Shape,
}

impl Op for ScatterAddZeros {
    fn name(&self) -> &'static str {
        self.name
    }
    fn idioms(&self) -> Idioms {
        self.idioms
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (src, index) = (inputs[0], inputs[1]);
        if !src.dtype().is_float() {
            return Err(Error::unsupported_dtype(self.name, src.dtype()));
        }
        if src.shape() != index.shape() {
            return Err(Error::shape_mismatch(self.name, src.shape(), index.shape()));
        }
        check_elem_shapes(self.name, &self.shape, index, self.dim)?;
        Ok(smallvec![TensorSpec::new(self.shape.clone(), src.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let src = bytes(inputs[0]);
        Cost {
            flops: inputs[0].elem_count() as u64,
            bytes_read: bytes(inputs[1]) + 2 * src,
            bytes_written: spec_bytes(&outputs[0]) + src,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], specs: &[TensorSpec]) -> Result<Outputs> {
        let (src, index) = (inputs[0], inputs[1]);
        let dims = specs[0].shape.dims();
        let idx = read_indices(self.name, &index, dims[self.dim], "index")?;
        Ok(crate::float_dispatch!(
            self.name,
            src.cpu(self.name)?,
            |v| {
                let s = contiguous(v, src.layout);
                let mut out = vec![zero_of(v); specs[0].shape.elem_count()];
                scatter_add_elems(&mut out, dims, self.dim, index.shape().dims(), &idx, &s);
                wrap(out)
            }
        ))
    }
    fn differentiable(&self) -> bool {
        false
    }
}

// ----- the tensor methods -----

/// Indexing on tensors: embedding lookups, index selection, gather and the scatter-adds.
pub trait IndexingOps {
    /// Rows of this `(V, D)` table at `ids` (any shape, i64 or u32): shape `ids.shape + [D]`.
    /// Differentiable in the table (`embedding_backward` adds the gradient rows into a zero
    /// table, deterministically).
    fn embedding(&self, ids: &Tensor) -> Result<Tensor>;
    /// The entries `ids` (1-D, i64 or u32) of dim `dim`: the result's dim `dim` has `ids.len()`
    /// entries, the others are unchanged.
    fn index_select<D: Dim>(&self, dim: D, ids: &Tensor) -> Result<Tensor>;
    /// Torch's gather along `dim`: `out[i][j][k] = self[i][index[i][j][k]][k]` (for dim 1). The
    /// output has `index`'s shape; `index` has `self`'s rank and no larger size in any other dim.
    fn gather<D: Dim>(&self, dim: D, index: &Tensor) -> Result<Tensor>;
    /// Torch's scatter_add along `dim`: a copy of `self` with `src[i][j][k]` added at
    /// `[i][index[i][j][k]][k]` (for dim 1). `src` is at least `index`'s size in every dim
    /// (only the part `index` covers is used).
    fn scatter_add<D: Dim>(&self, dim: D, index: &Tensor, src: &Tensor) -> Result<Tensor>;
    /// A copy of `self` with `src`'s entry `j` along `dim` added at entry `ids[j]` (ids 1-D);
    /// `src` has `self`'s shape except `ids.len()` entries along `dim`.
    fn index_add<D: Dim>(&self, dim: D, ids: &Tensor, src: &Tensor) -> Result<Tensor>;
}

impl IndexingOps for Tensor {
    fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        execute1(Embedding, &[self, ids])
    }
    fn index_select<D: Dim>(&self, dim: D, ids: &Tensor) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "index_select")?;
        execute1(IndexSelect { dim }, &[self, ids])
    }
    fn gather<D: Dim>(&self, dim: D, index: &Tensor) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "gather")?;
        execute1(Gather { dim }, &[self, index])
    }
    fn scatter_add<D: Dim>(&self, dim: D, index: &Tensor, src: &Tensor) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "scatter_add")?;
        let mut s = src.clone();
        if src.shape() != index.shape() {
            if src.rank() != index.rank()
                || src.dims().iter().zip(index.dims()).any(|(&a, &b)| a < b)
            {
                return Err(Error::invalid(
                    "scatter_add",
                    format!(
                        "src of shape {} must be at least as large as index {} in every dim",
                        src.shape(),
                        index.shape()
                    ),
                ));
            }
            for (d, &n) in index.dims().iter().enumerate() {
                if s.dims()[d] != n {
                    s = s.narrow(d, 0, n)?;
                }
            }
        }
        execute1(ScatterAdd { dim }, &[self, index, &s])
    }
    fn index_add<D: Dim>(&self, dim: D, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
        let dim = dim.index(self.shape(), "index_add")?;
        execute1(IndexAdd { dim }, &[self, ids, src])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    let f = |name, idioms, differentiable| OpInfo {
        name,
        idioms,
        differentiable,
        family: "indexing",
    };
    vec![
        f("embedding", GATHER_IDIOMS, true),
        f("embedding_backward", EMBEDDING_BACKWARD_IDIOMS, false),
        f("index_select", GATHER_IDIOMS, true),
        f("index_select_backward", EMBEDDING_BACKWARD_IDIOMS, false),
        f("gather", GATHER_IDIOMS, true),
        f("gather_backward", GATHER_BACKWARD_IDIOMS, false),
        f("scatter_add", GATHER_BACKWARD_IDIOMS, true),
        f("index_add", EMBEDDING_BACKWARD_IDIOMS, true),
    ]
}
