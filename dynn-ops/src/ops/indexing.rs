//! Indexing ops: `embedding`, `index_select`, `gather` (torch semantics), `scatter_add` and
//! `index_add`, with their backward kernels (`embedding_backward`, `index_select_backward`,
//! `gather_backward`). Index tensors are i64 or u32; an index outside its dim is an
//! [`Error::IndexOutOfRange`] naming the op, the index, the size and its position.
//!
//! Every accumulating kernel is deterministic: each destination element is owned by exactly one
//! task, and the contributions to it are added in increasing source order, whatever the thread
//! count or timing.

use crate::cpu::{PAR_MIN, SimdTask, gather_layout, map_layout, simd_task};
use crate::cuda::{self, CudaSource, CudaStorage, Strided};
use crate::ops::same_float_dtype;
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use cudarc::driver::{CudaView, LaunchConfig};
use dynn_core::{
    AccFloat, BackwardCtx, Cost, CpuElement, CpuStorage, DType, DeviceStorage, Dim, Error,
    FloatElement, Idioms, InputGrads, KernelArg, Layout, Op, Outputs, Result, Save, Shape, Specs,
    Tensor, TensorSpec, execute1, smallvec::smallvec, vec_from_fill, with_cpu_storage,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

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

/// Checks what `index_select` and `index_add` need of their ids and dim: `ids` a 1-D index
/// tensor, `dim` a dim of `x`.
fn check_ids_along(op: &'static str, x: &Tensor, ids: &Tensor, dim: usize) -> Result<()> {
    check_index_dtype(op, ids, "ids")?;
    if ids.rank() != 1 {
        return Err(Error::invalid(
            op,
            format!("ids must be 1-D, got shape {}", ids.shape()),
        ));
    }
    if dim >= x.rank() {
        return Err(Error::DimOutOfRange {
            op,
            dim: dim as i64,
            rank: x.rank(),
            shape: x.shape().clone(),
        });
    }
    Ok(())
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

/// One destination row plus its source rows `src[(first + j) * row.len()..]` for `j` in
/// `js`, in order, accumulated in `acc`, as a [`SimdTask`].
struct AddRows<'a, T: FloatElement> {
    acc: &'a mut Vec<T::Acc>,
    row: &'a mut [T],
    src: &'a [T],
    first: usize,
    js: &'a [usize],
}

impl<T: FloatElement> SimdTask for AddRows<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let inner = self.row.len();
        self.acc.clear();
        self.acc.extend(self.row.iter().map(|x| x.to_acc()));
        for &j in self.js {
            let from = (self.first + j) * inner;
            for (a, &x) in self.acc.iter_mut().zip(&self.src[from..from + inner]) {
                *a += x.to_acc();
            }
        }
        for (d, &a) in self.row.iter_mut().zip(self.acc.iter()) {
            *d = T::from_acc(a);
        }
    }
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
        let first = o * m;
        simd_task(AddRows {
            acc,
            row,
            src,
            first,
            js,
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

// ----- CUDA -----

/// The CUDA kernels. The gathers (`select_rows_*`, `gather_*`) move raw elements, so they come
/// in one version per element size (`b1`, `b2`, `b4`, `b8`, and `b16` for 16-byte vectors of
/// aligned rows) and index dtype, and serve every dtype. The scatter-adds are float kernels: each
/// destination is owned by one thread, which adds its sources (listed by the host from the
/// downloaded indices) in increasing source order onto the existing value, exactly like the
/// CPU, so the results are deterministic and equal the CPU's bit for bit. The indices are
/// checked on the host first, giving the CPU's error for one out of range.
pub const CUDA: CudaSource = CudaSource {
    name: "indexing",
    code: r#"
// Index j of an index tensor, clamped into 0..n (the host has already checked every index, so
// the clamp only guarantees that no kernel ever reads outside its input).
template <typename I>
__device__ __forceinline__ i64 load_index(const I* ids, const Strided& s, i64 j, i64 n) {
    i64 v = (i64)ids[at(s, j)];
    return v < 0 ? 0 : (v >= n ? n - 1 : v);
}

// The buffer offset of element i of a view whose dims are `s.dims` (row-major), with its
// coordinate along `dim` replaced by v. Ignores the contiguous flag.
__device__ __forceinline__ i64 at_replace(const Strided& s, i64 i, int dim, i64 v) {
    i64 off = s.offset;
    for (int d = s.rank - 1; d >= 0; --d) {
        i64 n = s.dims[d];
        i64 q = i / n;
        off += (d == dim ? v : i - q * n) * s.strides[d];
        i = q;
    }
    return off;
}

// out[(o, j, c)] = x[outer(o) + ids[j] * sn + inner(c)]: rows of `inner` elements, one row per
// threadIdx.y, threads along the row (coalesced). `os` places the outer index, `ins` the inner
// one (contiguous fast path). E is the element (or 16-byte vector) moved.
template <typename E, typename I>
__device__ __forceinline__ void select_rows_impl(const E* x, const Strided& os, i64 sn,
                                                 const Strided& ins, i64 n, const I* ids,
                                                 const Strided& is, E* out, i64 outer, i64 m,
                                                 i64 inner) {
    i64 rows = outer * m;
    for (i64 r = (i64)blockIdx.x * blockDim.y + threadIdx.y; r < rows;
         r += (i64)gridDim.x * blockDim.y) {
        i64 o = r / m, j = r - o * m;
        const E* src = x + at(os, o) + load_index(ids, is, j, n) * sn;
        E* dst = out + r * inner;
        if (ins.contiguous) {
            for (i64 c = threadIdx.x; c < inner; c += blockDim.x) dst[c] = src[ins.offset + c];
        } else {
            for (i64 c = threadIdx.x; c < inner; c += blockDim.x) dst[c] = src[at(ins, c)];
        }
    }
}

// Torch's gather: out[p] = x[p's coordinates with the one along dim replaced by idx[p]]; `xg`
// has the index's dims and x's strides and offset.
template <typename E, typename I>
__device__ __forceinline__ void gather_impl(const E* x, const Strided& xg, int dim, i64 n,
                                            const I* idx, const Strided& is, E* out, i64 total) {
    GRID_LOOP(p, total) out[p] = x[at_replace(xg, p, dim, load_index(idx, is, p, n))];
}

#define SELECT_ROWS(E, ES, I, IS)                                                              \
    extern "C" __global__ void select_rows_##ES##_##IS(const E* x, Strided os, i64 sn,         \
                                                      Strided ins, i64 n, const I* ids,        \
                                                      Strided is, E* out, i64 outer, i64 m,    \
                                                      i64 inner) {                             \
        select_rows_impl<E, I>(x, os, sn, ins, n, ids, is, out, outer, m, inner);              \
    }
#define GATHER(E, ES, I, IS)                                                                   \
    extern "C" __global__ void gather_##ES##_##IS(const E* x, Strided xg, int dim, i64 n,      \
                                                 const I* idx, Strided is, E* out,             \
                                                 i64 total) {                                  \
        gather_impl<E, I>(x, xg, dim, n, idx, is, out, total);                                 \
    }
#define EACH_INDEX(M, E, ES) M(E, ES, i64, i64) M(E, ES, u32, u32)
EACH_INDEX(SELECT_ROWS, u8, b1)
EACH_INDEX(SELECT_ROWS, unsigned short, b2)
EACH_INDEX(SELECT_ROWS, unsigned int, b4)
EACH_INDEX(SELECT_ROWS, unsigned long long, b8)
EACH_INDEX(SELECT_ROWS, uint4, b16)
EACH_INDEX(GATHER, u8, b1)
EACH_INDEX(GATHER, unsigned short, b2)
EACH_INDEX(GATHER, unsigned int, b4)
EACH_INDEX(GATHER, unsigned long long, b8)

// y = x made contiguous (the starting value of scatter_add and index_add).
extern "C" __global__ void copy_strided(const scalar* x, Strided xs, scalar* y, i64 n) {
    GRID_LOOP(i, n) y[i] = x[at(xs, i)];
}

// Element scatter-add: segment s adds src[pos[k]] for k in start[s]..start[s+1] (in that
// order) onto out[dest[s]], rounding after each addition as the CPU does. One thread per
// destination: no atomics, deterministic.
extern "C" __global__ void scatter_segments(const scalar* src, Strided ss, const i64* start,
                                            const i64* dest, const i64* pos, scalar* out,
                                            i64 nseg) {
    GRID_LOOP(s, nseg) {
        i64 d = dest[s];
        scalar a = out[d];
        for (i64 k = start[s], e = start[s + 1]; k < e; ++k) a = st(ld(a) + ld(src[at(ss, pos[k])]));
        out[d] = a;
    }
}

// Row scatter-add on out (outer, n, inner) from src (outer, m, inner): segment s adds source
// rows pos[start[s]..start[s+1]] (in that order) onto row key[s], for every outer index,
// summing in `acc` and rounding once, as the CPU does. One (outer, segment) row per
// threadIdx.y, threads along the row.
extern "C" __global__ void add_rows_segments(const scalar* src, Strided ss, const i64* start,
                                             const i64* key, const i64* pos, scalar* out,
                                             i64 outer, i64 n, i64 m, i64 inner, i64 nseg) {
    i64 rows = outer * nseg;
    for (i64 r = (i64)blockIdx.x * blockDim.y + threadIdx.y; r < rows;
         r += (i64)gridDim.x * blockDim.y) {
        i64 o = r / nseg, s = r - o * nseg;
        i64 k0 = start[s], k1 = start[s + 1];
        scalar* dst = out + (o * n + key[s]) * inner;
        for (i64 c = threadIdx.x; c < inner; c += blockDim.x) {
            acc a = ld(dst[c]);
            for (i64 k = k0; k < k1; ++k) a += ld(src[at(ss, (o * m + pos[k]) * inner + c)]);
            dst[c] = st(a);
        }
    }
}
"#,
    half: true,
};

/// The select-rows kernels by element size (1, 2, 4, 8 bytes, 16-byte vector) and index dtype.
const SELECT_ROWS: [[&str; 2]; 5] = [
    ["select_rows_b1_i64", "select_rows_b1_u32"],
    ["select_rows_b2_i64", "select_rows_b2_u32"],
    ["select_rows_b4_i64", "select_rows_b4_u32"],
    ["select_rows_b8_i64", "select_rows_b8_u32"],
    ["select_rows_b16_i64", "select_rows_b16_u32"],
];
/// The gather kernels by element size (1, 2, 4, 8 bytes) and index dtype.
const GATHER: [[&str; 2]; 4] = [
    ["gather_b1_i64", "gather_b1_u32"],
    ["gather_b2_i64", "gather_b2_u32"],
    ["gather_b4_i64", "gather_b4_u32"],
    ["gather_b8_i64", "gather_b8_u32"],
];

/// The row of the kernel tables for elements of `dtype`: 0, 1, 2, 3 for 1, 2, 4, 8 bytes.
pub(crate) fn elem_slot(op: &'static str, dtype: DType) -> Result<usize> {
    match dtype.size_in_bytes() {
        1 => Ok(0),
        2 => Ok(1),
        4 => Ok(2),
        8 => Ok(3),
        _ => Err(Error::unsupported_dtype(op, dtype)),
    }
}

/// The kernel of `names` (`[1-byte, 2-byte, 4-byte, 8-byte]`) for elements of `dtype`.
pub(crate) fn by_size(
    op: &'static str,
    dtype: DType,
    names: [&'static str; 4],
) -> Result<&'static str> {
    Ok(names[elem_slot(op, dtype)?])
}

/// The column of the kernel tables for an index tensor: 0 for i64, 1 for u32.
fn index_slot(op: &'static str, ids: &KernelArg<'_>, what: &str) -> Result<usize> {
    match ids.dtype() {
        DType::I64 => Ok(0),
        DType::U32 => Ok(1),
        dtype => Err(Error::UnsupportedDType {
            op,
            dtype,
            hint: format!(" for {what} (expected i64 or u32)"),
        }),
    }
}

/// The indices of a GPU index tensor in row-major order, downloaded and checked exactly as on
/// the CPU (the same [`Error::IndexOutOfRange`] for an index outside `0..size`).
fn gpu_indices(
    op: &'static str,
    arg: &KernelArg<'_>,
    size: usize,
    what: &str,
) -> Result<Vec<usize>> {
    let host = arg.storage.to_host()?;
    let view = KernelArg {
        storage: &host,
        layout: arg.layout,
    };
    read_indices(op, &view, size, what)
}

/// A launch over `rows` rows of `units` elements: threads along a row (a power of two up to
/// 256), the rest of the 256-thread block on further rows.
fn row_launch(rows: usize, units: usize) -> LaunchConfig {
    let tx = units.next_power_of_two().clamp(1, 256) as u32;
    let ty = 256 / tx;
    let blocks = rows.div_ceil(ty as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (tx, ty, 1),
        shared_mem_bytes: 0,
    }
}

/// `Layout::from_parts` with every stride and the offset divided by `f` (16-byte vectors).
fn scaled(dims: &[usize], strides: &[usize], offset: usize, f: usize) -> Layout {
    let s: Vec<usize> = strides.iter().map(|&s| s / f).collect();
    Layout::from_parts(Shape::new(dims), s.as_slice().into(), offset / f)
}

/// `out[o, j, :] = x[o, ids[j], :]` along `dim` on the GPU (embedding and index_select): rows
/// copied by threads along the row, as 16-byte vectors when the rows are contiguous and
/// aligned. Works for every dtype.
fn cuda_select(
    op: &'static str,
    x: &KernelArg<'_>,
    ids: &KernelArg<'_>,
    dim: usize,
) -> Result<Box<dyn DeviceStorage>> {
    let (xs, is) = (cuda::storage(op, x)?, cuda::storage(op, ids)?);
    let dev = xs.dev();
    let dims = x.shape().dims();
    let n = dims[dim];
    gpu_indices(op, ids, n, "ids")?;
    let (outer, inner): (usize, usize) = (
        dims[..dim].iter().product(),
        dims[dim + 1..].iter().product(),
    );
    let m = ids.layout.elem_count();
    let total = outer * m * inner;
    let mut out = CudaStorage::alloc(dev, x.dtype(), total)?;
    if total == 0 {
        return Ok(Box::new(out));
    }
    let (strides, offset) = (x.layout.strides(), x.layout.offset());
    let esize = x.dtype().size_in_bytes();
    let slot = elem_slot(op, x.dtype())?;
    let f = 16 / esize;
    let inner_layout =
        Layout::from_parts(Shape::new(&dims[dim + 1..]), strides[dim + 1..].into(), 0);
    let aligned = |d: usize, s: usize| d <= 1 || s % f == 0;
    let vec = inner_layout.is_contiguous()
        && inner % f == 0
        && offset % f == 0
        && aligned(n, strides[dim])
        && dims[..dim]
            .iter()
            .zip(&strides[..dim])
            .all(|(&d, &s)| aligned(d, s));
    let (name, unit, ins) = if vec {
        (SELECT_ROWS[4], f, Layout::contiguous(inner / f))
    } else {
        (SELECT_ROWS[slot], 1, inner_layout)
    };
    let name = name[index_slot(op, ids, "ids")?];
    let f_ = dev.function(&CUDA, DType::F32, name)?;
    let os = Strided::of(op, &scaled(&dims[..dim], &strides[..dim], offset, unit))?;
    let ins = Strided::of(op, &ins)?;
    let idv = Strided::of(op, ids.layout)?;
    let (sn, n64, outer64, m64, inner64) = (
        (strides[dim] / unit) as i64,
        n as i64,
        outer as i64,
        m as i64,
        (inner / unit) as i64,
    );
    crate::cuda_launch!(
        dev,
        op,
        f_,
        row_launch(outer * m, inner / unit),
        [
            xs.slice(),
            &os,
            &sn,
            &ins,
            &n64,
            is.slice(),
            &idv,
            out.slice_mut(),
            &outer64,
            &m64,
            &inner64
        ]
    )?;
    Ok(Box::new(out))
}

/// Torch's gather on the GPU: one thread per output element. Works for every dtype.
fn cuda_gather(
    x: &KernelArg<'_>,
    index: &KernelArg<'_>,
    dim: usize,
) -> Result<Box<dyn DeviceStorage>> {
    const OP: &str = "gather";
    let (xs, is) = (cuda::storage(OP, x)?, cuda::storage(OP, index)?);
    let dev = xs.dev();
    let n = x.shape().dims()[dim];
    gpu_indices(OP, index, n, "index")?;
    let total = index.layout.elem_count();
    let mut out = CudaStorage::alloc(dev, x.dtype(), total)?;
    if total == 0 {
        return Ok(Box::new(out));
    }
    let name = GATHER[elem_slot(OP, x.dtype())?][index_slot(OP, index, "index")?];
    let f = dev.function(&CUDA, DType::F32, name)?;
    let xg = Strided::of(
        OP,
        &Layout::from_parts(
            index.shape().clone(),
            x.layout.strides().into(),
            x.layout.offset(),
        ),
    )?;
    let iv = Strided::of(OP, index.layout)?;
    let (dim32, n64, total64) = (dim as i32, n as i64, total as i64);
    crate::cuda_launch!(
        dev,
        OP,
        f,
        cuda::grid(total),
        [
            xs.slice(),
            &xg,
            &dim32,
            &n64,
            is.slice(),
            &iv,
            out.slice_mut(),
            &total64
        ]
    )?;
    Ok(Box::new(out))
}

/// Sources grouped by destination, for the deterministic GPU scatter-adds: segment `s` adds
/// the sources `pos[start[s]..start[s + 1]]`, in increasing order, onto destination `key[s]`.
/// Only destinations with sources have a segment. Packed as one i64 buffer
/// `[start (nseg + 1) | key (nseg) | pos (npos)]` so it is one upload.
struct Segments {
    packed: Vec<i64>,
    nseg: usize,
}

impl Segments {
    /// Groups source `j` under destination row `ids[j]` (`ids` below `n`): a stable counting
    /// sort.
    fn by_row(ids: &[usize], n: usize) -> Self {
        let mut count = vec![0usize; n + 1];
        for &v in ids {
            count[v + 1] += 1;
        }
        let nseg = count.iter().filter(|&&c| c > 0).count();
        let mut packed = Vec::with_capacity(2 * nseg + 1 + ids.len());
        // Segment starts, then keys; `fill[v]` becomes where row v's sources go in `pos`.
        let mut fill = vec![0usize; n];
        let mut at = 0usize;
        let mut keys = Vec::with_capacity(nseg);
        for v in 0..n {
            let c = count[v + 1];
            if c > 0 {
                packed.push(at as i64);
                keys.push(v as i64);
                fill[v] = at;
                at += c;
            }
        }
        packed.push(at as i64);
        packed.extend_from_slice(&keys);
        let base = packed.len();
        packed.resize(base + ids.len(), 0);
        for (j, &v) in ids.iter().enumerate() {
            packed[base + fill[v]] = j as i64;
            fill[v] += 1;
        }
        Segments { packed, nseg }
    }

    /// Groups the elements of an index (row-major, values `idx`, seen as `(outer, m, inner)`
    /// by `g`) under the element of a contiguous tensor each lands on (`g` holds that tensor's
    /// offsets): line by line (fixed outer and inner position), sorting the line's `m` entries
    /// by (index, position), so the cost is `O(N log m)`.
    fn by_lines(g: &ElemGeometry, idx: &[usize]) -> Self {
        let (m, ni) = (g.m, g.inner_off.len());
        let mut starts = Vec::new();
        let mut keys = Vec::new();
        let mut pos = Vec::with_capacity(idx.len());
        let mut line: Vec<(usize, usize)> = Vec::with_capacity(m);
        for (o, &ob) in g.outer_base.iter().enumerate() {
            for (i, &ib) in g.inner_off.iter().enumerate() {
                line.clear();
                line.extend((0..m).map(|j| {
                    let p = (o * m + j) * ni + i;
                    (idx[p], p)
                }));
                line.sort_unstable();
                for (k, &(v, p)) in line.iter().enumerate() {
                    if k == 0 || line[k - 1].0 != v {
                        starts.push(pos.len() as i64);
                        keys.push((ob + ib + v * g.stride) as i64);
                    }
                    pos.push(p as i64);
                }
            }
        }
        let nseg = keys.len();
        let mut packed = Vec::with_capacity(2 * nseg + 1 + pos.len());
        packed.extend_from_slice(&starts);
        packed.push(pos.len() as i64);
        packed.extend_from_slice(&keys);
        packed.extend_from_slice(&pos);
        Segments { packed, nseg }
    }

    /// Uploads the segments; `launch` gets views of `start`, `key` and `pos`.
    fn launch(
        self,
        dev: &Arc<cuda::CudaDevice>,
        launch: impl FnOnce(&CudaView<'_, u8>, &CudaView<'_, u8>, &CudaView<'_, u8>) -> Result<()>,
    ) -> Result<()> {
        if self.nseg == 0 {
            return Ok(());
        }
        let buf = CudaStorage::upload(dev, &CpuStorage::I64(self.packed))?;
        let s = buf.slice();
        let (a, b) = ((self.nseg + 1) * 8, (2 * self.nseg + 1) * 8);
        launch(&s.slice(..a), &s.slice(a..b), &s.slice(b..))
    }
}

/// A contiguous GPU copy of `x` (the starting value of `scatter_add` and `index_add`).
fn cuda_copy(op: &'static str, x: &KernelArg<'_>) -> Result<CudaStorage> {
    let xs = cuda::storage(op, x)?;
    let dev = xs.dev();
    let n = x.layout.elem_count();
    let mut out = CudaStorage::alloc(dev, x.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let f = dev.function(&CUDA, x.dtype(), "copy_strided")?;
    let (view, n64) = (Strided::of(op, x.layout)?, n as i64);
    crate::cuda_launch!(
        dev,
        op,
        f,
        cuda::grid(n),
        [xs.slice(), &view, out.slice_mut(), &n64]
    )?;
    Ok(out)
}

/// Adds the rows of `src` (`(outer, m, inner)` through its layout) at rows `ids` of dim `dim`
/// of `out` (contiguous `(outer, n, inner)`), deterministically: the rows of each destination
/// are summed in increasing source order by one thread per column.
fn cuda_add_rows(
    op: &'static str,
    out: &mut CudaStorage,
    out_dims: &[usize],
    dim: usize,
    src: &KernelArg<'_>,
    ids: &KernelArg<'_>,
) -> Result<()> {
    let ss = cuda::storage(op, src)?;
    let dev = ss.dev().clone();
    let n = out_dims[dim];
    let ids = gpu_indices(op, ids, n, "ids")?;
    let (outer, inner): (usize, usize) = (
        out_dims[..dim].iter().product(),
        out_dims[dim + 1..].iter().product(),
    );
    if outer * inner == 0 {
        return Ok(());
    }
    let f = dev.function(&CUDA, src.dtype(), "add_rows_segments")?;
    let view = Strided::of(op, src.layout)?;
    let seg = Segments::by_row(&ids, n);
    let (outer64, n64, m64, inner64, nseg64) = (
        outer as i64,
        n as i64,
        ids.len() as i64,
        inner as i64,
        seg.nseg as i64,
    );
    let cfg = row_launch(outer * seg.nseg, inner);
    seg.launch(&dev, |start, key, pos| {
        crate::cuda_launch!(
            dev,
            op,
            f,
            cfg,
            [
                ss.slice(),
                &view,
                start,
                key,
                pos,
                out.slice_mut(),
                &outer64,
                &n64,
                &m64,
                &inner64,
                &nseg64
            ]
        )
    })
}

/// Torch's scatter-add on the GPU into `out` (contiguous, of `out_dims`): `src` (the index's
/// shape, through its layout) added at `index` along `dim`, one thread per destination adding
/// its sources in increasing order.
fn cuda_scatter_elems(
    op: &'static str,
    out: &mut CudaStorage,
    out_dims: &[usize],
    dim: usize,
    src: &KernelArg<'_>,
    index: &KernelArg<'_>,
) -> Result<()> {
    let ss = cuda::storage(op, src)?;
    let dev = ss.dev().clone();
    let idx = gpu_indices(op, index, out_dims[dim], "index")?;
    let f = dev.function(&CUDA, src.dtype(), "scatter_segments")?;
    let view = Strided::of(op, src.layout)?;
    let strides = Shape::new(out_dims).contiguous_strides();
    let geometry = ElemGeometry::new(index.shape().dims(), dim, &strides, 0);
    let seg = Segments::by_lines(&geometry, &idx);
    let (nseg, nseg64) = (seg.nseg, seg.nseg as i64);
    seg.launch(&dev, |start, dest, pos| {
        crate::cuda_launch!(
            dev,
            op,
            f,
            cuda::grid(nseg),
            [
                ss.slice(),
                &view,
                start,
                dest,
                pos,
                out.slice_mut(),
                &nseg64
            ]
        )
    })
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
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_select("embedding", &table, &ids, 0)?]);
        }
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
        check_ids_along("index_select", x, ids, self.dim)?;
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
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_select("index_select", &x, &ids, self.dim)?]);
        }
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
        let out_dims = specs[0].shape.dims();
        let n_out = specs[0].shape.elem_count();
        if cuda::on_cuda(inputs) {
            let dev = cuda::storage(self.name, &g)?.dev();
            let mut out = CudaStorage::zeros(dev, g.dtype(), n_out)?;
            cuda_add_rows(self.name, &mut out, out_dims, self.dim, &g, &ids)?;
            return Ok(smallvec![Box::new(out) as Box<dyn DeviceStorage>]);
        }
        let ids = read_indices(self.name, &ids, self.size, "ids")?;
        let inner: usize = out_dims[self.dim + 1..].iter().product();
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
        same_float_dtype("index_add", &[x, src])?;
        check_ids_along("index_add", x, ids, self.dim)?;
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
        if cuda::on_cuda(inputs) {
            let mut out = cuda_copy("index_add", &x)?;
            cuda_add_rows("index_add", &mut out, dims, self.dim, &src, &ids)?;
            return Ok(smallvec![Box::new(out) as Box<dyn DeviceStorage>]);
        }
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
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_gather(&x, &index, self.dim)?]);
        }
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
        same_float_dtype("scatter_add", &[x, src])?;
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
        if cuda::on_cuda(inputs) {
            let mut out = cuda_copy("scatter_add", &x)?;
            cuda_scatter_elems("scatter_add", &mut out, dims, self.dim, &src, &index)?;
            return Ok(smallvec![Box::new(out) as Box<dyn DeviceStorage>]);
        }
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
        if cuda::on_cuda(inputs) {
            let dev = cuda::storage(self.name, &src)?.dev();
            let mut out = CudaStorage::zeros(dev, src.dtype(), specs[0].shape.elem_count())?;
            cuda_scatter_elems(self.name, &mut out, dims, self.dim, &src, &index)?;
            return Ok(smallvec![Box::new(out) as Box<dyn DeviceStorage>]);
        }
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
