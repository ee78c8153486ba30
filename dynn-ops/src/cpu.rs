//! Shared CPU kernel machinery: parallel element loops over (possibly strided, broadcast)
//! layouts, and dtype dispatch. Op files use these; they hold no op of their own.

use dynn_core::smallvec::{SmallVec, smallvec};
use dynn_core::{Layout, Shape, vec_from_fill};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Builds rayon's global pool, which runs every CPU kernel, with the calling thread as one of
/// its threads (index 0, beside `available_parallelism() - 1` spawned ones). Call it first
/// thing in `main`, before any kernel runs: kernels launched from this thread then run partly
/// on it, instead of waking a pool thread and sleeping until it is done. On a 2-core machine
/// that halves a training step made of many small ops (`train_moe`: 28–37 → 18–20 ms).
/// Returns `false`, changing nothing, when the pool already exists.
pub fn init_threads() -> bool {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
        .is_ok()
}

/// Elements below which a loop runs on the calling thread (parallel overhead dominates).
pub const PAR_MIN: usize = 1 << 15;

/// Chunk length for parallel element loops (a multiple of 64 for vector alignment).
pub fn chunk_len(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (n.div_ceil(threads * 4))
        .max(PAR_MIN / 2)
        .next_multiple_of(64)
}

/// Applies `f` to every element of a contiguous slice, in parallel for large inputs.
#[inline]
pub fn map_slice<T: Copy + Sync, U: Copy + Send>(src: &[T], f: impl Fn(T) -> U + Sync) -> Vec<U> {
    let n = src.len();
    let f = &f;
    vec_from_fill(n, |out| {
        if n < PAR_MIN {
            simd_task(Map { out, src, f });
        } else {
            let c = chunk_len(n);
            out.par_chunks_mut(c)
                .zip(src.par_chunks(c))
                .for_each(|(out, src)| simd_task(Map { out, src, f }));
        }
    })
}

/// `out[i] = f(src[i])` over one chunk, compiled by [`simd_task`] so that the loop, with
/// `f` inlined into it, vectorizes as wide as the CPU allows.
struct Map<'a, 'f, T, U, F> {
    out: &'a mut [MaybeUninit<U>],
    src: &'a [T],
    f: &'f F,
}

impl<T: Copy, U, F: Fn(T) -> U> SimdTask for Map<'_, '_, T, U, F> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        for (o, &s) in self.out.iter_mut().zip(self.src) {
            o.write((self.f)(s));
        }
    }
}

/// `out[i] = f(lhs[i], rhs[i])` over one chunk (see [`Map`]).
struct Zip<'a, 'f, T, U, F> {
    out: &'a mut [MaybeUninit<U>],
    lhs: &'a [T],
    rhs: &'a [T],
    f: &'f F,
}

impl<T: Copy, U, F: Fn(T, T) -> U> SimdTask for Zip<'_, '_, T, U, F> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        for ((o, &x), &y) in self.out.iter_mut().zip(self.lhs).zip(self.rhs) {
            o.write((self.f)(x, y));
        }
    }
}

/// Where the rows of a broadcast zip start in its two operands: the outer dims (all but the
/// last) stepped like an odometer, from any row (found by division), so that each parallel
/// chunk starts its own and no list of offsets is built first.
#[derive(Debug, Clone)]
struct RowCursor<'a> {
    dims: &'a [usize],
    lstrides: &'a [usize],
    rstrides: &'a [usize],
    index: SmallVec<[usize; 6]>,
    /// The current row's first element in `lhs` and in `rhs`.
    at: (usize, usize),
}

impl<'a> RowCursor<'a> {
    /// The cursor at row `row` of outer dims `dims`, whose operands start at `base` and step
    /// `lstrides` and `rstrides`.
    fn new(
        dims: &'a [usize],
        lstrides: &'a [usize],
        rstrides: &'a [usize],
        base: (usize, usize),
        row: usize,
    ) -> Self {
        let (mut index, mut at, mut rest) = (smallvec![0; dims.len()], base, row);
        for d in (0..dims.len()).rev() {
            let i = rest % dims[d];
            rest /= dims[d];
            index[d] = i;
            at.0 += i * lstrides[d];
            at.1 += i * rstrides[d];
        }
        RowCursor {
            dims,
            lstrides,
            rstrides,
            index,
            at,
        }
    }

    /// Moves to the next row.
    #[inline(always)]
    fn advance(&mut self) {
        for d in (0..self.dims.len()).rev() {
            self.index[d] += 1;
            self.at.0 += self.lstrides[d];
            self.at.1 += self.rstrides[d];
            if self.index[d] < self.dims[d] {
                return;
            }
            self.index[d] = 0;
            self.at.0 -= self.dims[d] * self.lstrides[d];
            self.at.1 -= self.dims[d] * self.rstrides[d];
        }
    }
}

/// Rows of `inner` outputs of a broadcast zip, each reading `lhs` and `rhs` from where
/// `rows` says, with strides `strides` (see [`Map`]).
struct ZipRows<'a, 'f, T, U, F> {
    out: &'a mut [MaybeUninit<U>],
    lhs: &'a [T],
    rhs: &'a [T],
    rows: RowCursor<'a>,
    inner: usize,
    /// Where the chunk starts in its first row.
    first_col: usize,
    strides: (usize, usize),
    f: &'f F,
}

impl<T: Copy, U, F: Fn(T, T) -> U> SimdTask for ZipRows<'_, '_, T, U, F> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let (f, (lhs, rhs)) = (self.f, (self.lhs, self.rhs));
        let (ls, rs) = self.strides;
        let (mut rows, mut out, mut col) = (self.rows, self.out, self.first_col);
        // Row by row, as `for_row_pieces` does, inline: a closure would be compiled apart
        // from the vector features (see `SimdTask`).
        while !out.is_empty() {
            let len = (self.inner - col).min(out.len());
            let (o, rest) = std::mem::take(&mut out).split_at_mut(len);
            let (lo, ro) = (rows.at.0 + col * ls, rows.at.1 + col * rs);
            (out, col) = (rest, 0);
            rows.advance();
            match (ls, rs) {
                (1, 1) => {
                    for ((o, &x), &y) in
                        o.iter_mut().zip(&lhs[lo..lo + len]).zip(&rhs[ro..ro + len])
                    {
                        o.write(f(x, y));
                    }
                }
                (1, 0) => {
                    let y = rhs[ro];
                    for (o, &x) in o.iter_mut().zip(&lhs[lo..lo + len]) {
                        o.write(f(x, y));
                    }
                }
                (0, 1) => {
                    let x = lhs[lo];
                    for (o, &y) in o.iter_mut().zip(&rhs[ro..ro + len]) {
                        o.write(f(x, y));
                    }
                }
                (ls, rs) => {
                    for (k, o) in o.iter_mut().enumerate() {
                        o.write(f(lhs[lo + k * ls], rhs[ro + k * rs]));
                    }
                }
            }
        }
    }
}

/// Calls `piece(out_piece, first_col)` for each row's share of `out`, a run of rows of `inner`
/// elements that starts at column `first_col` of its first row (and may end mid-row).
fn for_row_pieces<U>(
    mut out: &mut [U],
    inner: usize,
    first_col: usize,
    mut piece: impl FnMut(&mut [U], usize),
) {
    let mut col = first_col;
    while !out.is_empty() {
        let len = (inner - col).min(out.len());
        let (o, rest) = std::mem::take(&mut out).split_at_mut(len);
        piece(o, col);
        (out, col) = (rest, 0);
    }
}

/// Runs `run(chunk, first_row, first_col)` over `out`, rows of `inner` elements, serially for
/// small outputs and else in parallel chunks: whole rows when rows are short, pieces of a row
/// when rows are long, so that even a single row (a broadcast scalar coalesces to one) spreads
/// over every thread.
fn for_row_chunks<U: Send>(
    out: &mut [U],
    inner: usize,
    run: impl Fn(&mut [U], usize, usize) + Sync,
) {
    let n = out.len();
    if n < PAR_MIN {
        return run(out, 0, 0);
    }
    let chunk = if inner >= PAR_MIN {
        chunk_len(n)
    } else {
        (PAR_MIN / inner).max(1) * inner
    };
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, out)| run(out, i * chunk / inner, i * chunk % inner));
}

/// Applies `f` to every element of `src` seen through `layout`, returning a contiguous vector
/// in the layout's row-major order.
pub fn map_layout<T: Copy + Sync, U: Copy + Send>(
    src: &[T],
    layout: &Layout,
    f: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    if let Some((a, b)) = layout.contiguous_range() {
        return map_slice(&src[a..b], f);
    }
    let n = layout.elem_count();
    // Long contiguous blocks are copied as runs; anything else row by row (listing every
    // block of a transposed layout would cost an index per element).
    if layout.contiguous_block() >= 16 {
        let (offsets, block) = layout.blocks();
        return vec_from_fill(n, |out| {
            let body = |(o, &off): (&mut [MaybeUninit<U>], &usize)| {
                for (o, &s) in o.iter_mut().zip(&src[off..off + block]) {
                    o.write(f(s));
                }
            };
            if n < PAR_MIN {
                out.chunks_mut(block).zip(offsets.iter()).for_each(body);
            } else {
                out.par_chunks_mut(block)
                    .zip(offsets.par_iter())
                    .for_each(body);
            }
        });
    }
    if let Some(out) = map_transposed(src, layout, &f) {
        return out;
    }
    rows_of(
        layout,
        n,
        |row_out: &mut [MaybeUninit<U>], base: usize, stride: usize| {
            for (k, o) in row_out.iter_mut().enumerate() {
                o.write(f(src[base + k * stride]));
            }
        },
    )
}

/// Width of the column blocks [`map_transposed`] copies through, in elements.
const TILE: usize = 64;

/// Bytes of each source run [`map_transposed`] stages when its output is too large for the
/// cache: one 4 KiB page.
const STAGED_RUN_BYTES: usize = 4096;

/// [`map_layout`] of a layout whose two innermost dims are transposed (the second-to-last
/// dim has stride 1, the last one does not), any leading dims. Each `(rows, cols)` matrix is
/// copied in blocks of `TILE` columns: the block's `TILE` source runs (its columns, stride 1
/// along the rows) are copied, a window of rows at a time, into a staging buffer, and each
/// output row's `TILE` values are then gathered from it and written as one run. `None` for
/// other layouts, and for matrices under half a tile tall.
///
/// When the output is too large for the cache, each window is a 4 KiB page of every source
/// run, read whole and in order, and the output runs are streamed past the cache. Reading
/// 256 bytes of each of thousands of pages instead (tiles of `TILE × TILE`) paid a TLB miss
/// per run: 4.5–5.0 ms against 3.3–4.0 ms on a 4096 × 1024 f32 copy, 40 interleaved rounds,
/// on an AVX2 host. The buffer's rows are a cache line longer than the window, so that a
/// gather down a column does not fall into one L1 set.
fn map_transposed<T: Copy + Sync, U: Copy + Send>(
    src: &[T],
    layout: &Layout,
    f: &(impl Fn(T) -> U + Sync),
) -> Option<Vec<U>> {
    let (dims, strides) = (layout.dims(), layout.strides());
    let r = dims.len();
    if r < 2 || strides[r - 2] != 1 || strides[r - 1] == 1 || dims[r - 2] < TILE / 2 {
        return None;
    }
    let (rows, cols, col_stride) = (dims[r - 2], dims[r - 1], strides[r - 1]);
    let (lead_dims, lead_strides) = (&dims[..r - 2], &strides[..r - 2]);
    let n = layout.elem_count();
    let size = std::mem::size_of::<U>().max(1);
    let stream = n * size >= STREAM_MIN_BYTES;
    let window = if stream {
        (STAGED_RUN_BYTES / size).max(TILE)
    } else {
        TILE
    }
    .min(rows);
    let pitch = window + 64usize.div_ceil(size);
    let blocks = cols.div_ceil(TILE);
    let start = (layout.offset(), layout.offset());
    Some(vec_from_fill(n, |out| {
        if n == 0 {
            return;
        }
        let out = DisjointOut::new(out);
        // Block `b` of matrix `m`: output columns `c0..c0 + w` of every row.
        let block = |stage: &mut Vec<MaybeUninit<U>>, task: usize| {
            let (m, b) = (task / blocks, task % blocks);
            // One operand: the cursor's second offset is not read.
            let base = RowCursor::new(lead_dims, lead_strides, lead_strides, start, m)
                .at
                .0;
            let (c0, w) = (b * TILE, TILE.min(cols - b * TILE));
            for i0 in (0..rows).step_by(window) {
                let h = window.min(rows - i0);
                for (k, staged) in stage.chunks_exact_mut(pitch).take(w).enumerate() {
                    let from = base + (c0 + k) * col_stride + i0;
                    for (s, &v) in staged.iter_mut().zip(&src[from..from + h]) {
                        s.write(f(v));
                    }
                }
                let first = (m * rows + i0) * cols + c0;
                write_runs(stage, pitch, (h, w), &out, (first, cols), stream);
            }
            if stream {
                stream_fence();
            }
        };
        let stage = || vec![MaybeUninit::<U>::uninit(); TILE * pitch];
        let tasks = (n / (rows * cols)) * blocks;
        if n < PAR_MIN {
            let mut buf = stage();
            (0..tasks).for_each(|t| block(&mut buf, t));
        } else {
            (0..tasks).into_par_iter().for_each_init(stage, block);
        }
    }))
}

/// Writes `h` output runs of `w` values from [`map_transposed`]'s staging buffer: run `i`,
/// at `first + i * cols` in `out`, gathers element `i` of each of the first `w` staged rows
/// (`pitch` apart). Four runs at a time through 4 × 4 SSE transposes where the values are
/// 4 bytes wide, one value at a time otherwise (3.7 against 4.3–4.5 ms on the bench's
/// 4096 × 1024 f32 copy, interleaved).
fn write_runs<U: Copy>(
    stage: &[MaybeUninit<U>],
    pitch: usize,
    (h, w): (usize, usize),
    out: &DisjointOut<U>,
    (first, cols): (usize, usize),
    stream: bool,
) {
    let put = |i: usize, run: &[MaybeUninit<U>]| {
        // SAFETY: the caller staged rows `0..h` of the first `w` runs, and `run` holds `w`
        // of them.
        let run = unsafe { &*(run as *const [MaybeUninit<U>] as *const [U]) };
        // SAFETY: `first + i * cols + w` is inside the output, and only this task writes
        // these columns of these rows (the contract of `map_transposed`'s tasks).
        let dst = unsafe { out.run(first + i * cols, w) };
        if stream {
            stream_copy(dst, run);
        } else {
            for (d, &v) in dst.iter_mut().zip(run) {
                d.write(v);
            }
        }
    };
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of::<U>() == 4 && w % 4 == 0 {
        use std::arch::x86_64::{_MM_TRANSPOSE4_PS, _mm_loadu_ps, _mm_storeu_ps};
        let mut runs = [[MaybeUninit::<U>::uninit(); TILE]; 4];
        while i + 4 <= h {
            for k in (0..w).step_by(4) {
                let at = k * pitch + i;
                // SAFETY: `k + 3 < w <= TILE` rows of `pitch` values each and `i + 3 < h <=
                // pitch`, so the four 4-value loads are inside `stage` and the four stores
                // inside `runs`; `U` is 4 bytes wide and `Copy`, so its bits move as `f32`s.
                unsafe {
                    let p = stage.as_ptr().add(at).cast::<f32>();
                    let mut r0 = _mm_loadu_ps(p);
                    let mut r1 = _mm_loadu_ps(p.add(pitch));
                    let mut r2 = _mm_loadu_ps(p.add(2 * pitch));
                    let mut r3 = _mm_loadu_ps(p.add(3 * pitch));
                    _MM_TRANSPOSE4_PS(&mut r0, &mut r1, &mut r2, &mut r3);
                    for (run, r) in runs.iter_mut().zip([r0, r1, r2, r3]) {
                        _mm_storeu_ps(run.as_mut_ptr().add(k).cast::<f32>(), r);
                    }
                }
            }
            for (r, run) in runs.iter().enumerate() {
                put(i + r, &run[..w]);
            }
            i += 4;
        }
    }
    for i in i..h {
        let mut run = [MaybeUninit::<U>::uninit(); TILE];
        for (o, staged) in run[..w].iter_mut().zip(stage.chunks_exact(pitch)) {
            *o = staged[i];
        }
        put(i, &run[..w]);
    }
}

/// An output whose parallel tasks each write their own, not contiguous, part of it.
struct DisjointOut<U> {
    ptr: *mut MaybeUninit<U>,
    len: usize,
}

// SAFETY: the tasks sharing a `DisjointOut` write disjoint elements (the contract of
// `DisjointOut::run`), so sharing it is as safe as sending each task its own `&mut` part.
unsafe impl<U: Send> Send for DisjointOut<U> {}
unsafe impl<U: Send> Sync for DisjointOut<U> {}

impl<U> DisjointOut<U> {
    fn new(out: &mut [MaybeUninit<U>]) -> Self {
        DisjointOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Elements `at..at + len` of the output.
    ///
    /// # Safety
    /// No other task may read or write these elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn run(&self, at: usize, len: usize) -> &mut [MaybeUninit<U>] {
        debug_assert!(at + len <= self.len, "DisjointOut::run out of bounds");
        // SAFETY: in bounds (every caller computes `at` inside its own part of the output);
        // exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) }
    }
}

/// Runs `row(out_row, base_offset, last_dim_stride)` for every row (last dim) of `layout`,
/// in parallel over rows, producing a contiguous output of `n` elements.
fn rows_of<U: Copy + Send>(
    layout: &Layout,
    n: usize,
    row: impl Fn(&mut [MaybeUninit<U>], usize, usize) + Sync,
) -> Vec<U> {
    let dims = layout.dims();
    let inner = dims.last().copied().unwrap_or(1).max(1);
    let stride = layout.strides().last().copied().unwrap_or(0);
    let outer = dims.len().saturating_sub(1);
    let (outer_dims, strides) = (&dims[..outer], &layout.strides()[..outer]);
    let base = (layout.offset(), layout.offset());
    vec_from_fill(n, |out| {
        if n == 0 {
            return;
        }
        for_row_chunks(out, inner, |out, first_row, first_col| {
            // One operand: the cursor's second offset is not read.
            let mut rows = RowCursor::new(outer_dims, strides, strides, base, first_row);
            for_row_pieces(out, inner, first_col, |o, col| {
                row(o, rows.at.0 + col * stride, stride);
                rows.advance();
            });
        });
    })
}

/// Applies `f` element-wise to two operands whose layouts are already broadcast to `shape`,
/// returning a contiguous output. Fast paths: both contiguous; either side constant along the
/// last dim (a broadcast row or column).
pub fn zip_layouts<T: Copy + Sync, U: Copy + Send>(
    lhs: &[T],
    ll: &Layout,
    rhs: &[T],
    rl: &Layout,
    shape: &Shape,
    f: impl Fn(T, T) -> U + Sync,
) -> Vec<U> {
    let n = shape.elem_count();
    if let (Some((a, b)), Some((c, d))) = (ll.contiguous_range(), rl.contiguous_range()) {
        let (l, r, f) = (&lhs[a..b], &rhs[c..d], &f);
        return vec_from_fill(n, |out| {
            if n < PAR_MIN {
                simd_task(Zip {
                    out,
                    lhs: l,
                    rhs: r,
                    f,
                });
            } else {
                let ch = chunk_len(n);
                out.par_chunks_mut(ch)
                    .zip(l.par_chunks(ch))
                    .zip(r.par_chunks(ch))
                    .for_each(|((out, lhs), rhs)| simd_task(Zip { out, lhs, rhs, f }));
            }
        });
    }
    // Dims both operands step through as one are merged: longer rows, fewer row offsets.
    let merged = crate::ops::binary::coalesce(shape, &[ll, rl]);
    let (ll, rl) = (&merged[0], &merged[1]);
    let dims = ll.dims();
    let rank = dims.len();
    let inner = dims.last().copied().unwrap_or(1).max(1);
    let (ls, rs) = (
        ll.strides().last().copied().unwrap_or(0),
        rl.strides().last().copied().unwrap_or(0),
    );
    let outer = rank.saturating_sub(1);
    let (outer_dims, lstrides, rstrides) = (
        &dims[..outer],
        &ll.strides()[..outer],
        &rl.strides()[..outer],
    );
    let base = (ll.offset(), rl.offset());
    vec_from_fill(n, |out| {
        if n == 0 {
            return;
        }
        let (f, strides) = (&f, (ls, rs));
        for_row_chunks(out, inner, |out, first_row, first_col| {
            simd_task(ZipRows {
                out,
                lhs,
                rhs,
                rows: RowCursor::new(outer_dims, lstrides, rstrides, base, first_row),
                inner,
                first_col,
                strides,
                f,
            })
        });
    })
}

/// Wraps one host storage as a kernel's single output.
pub fn one(s: dynn_core::CpuStorage) -> dynn_core::Outputs {
    dynn_core::smallvec::smallvec![Box::new(s) as Box<dyn dynn_core::DeviceStorage>]
}

/// Copies the elements seen through `layout` into a contiguous vector.
pub fn gather_layout<T: Copy + Send + Sync>(src: &[T], layout: &Layout) -> Vec<T> {
    map_layout(src, layout, |x| x)
}

/// Dispatches on a [`dynn_core::CpuStorage`] holding a float dtype, binding the typed slice
/// to `$v` (with element type `$T` in scope as a generic); other dtypes give an
/// `UnsupportedDType` error naming `$op`.
#[macro_export]
macro_rules! float_dispatch {
    ($op:expr, $s:expr, |$v:ident| $body:expr) => {
        match $s {
            dynn_core::CpuStorage::F32($v) => $body,
            dynn_core::CpuStorage::F64($v) => $body,
            dynn_core::CpuStorage::F16($v) => $body,
            dynn_core::CpuStorage::BF16($v) => $body,
            other => return Err(dynn_core::Error::unsupported_dtype($op, other.dtype())),
        }
    };
}

/// Output bytes above which row copies bypass the cache with non-temporal stores: such an
/// output does not fit in cache anyway, and streaming stores skip the read-for-ownership of
/// every destination line (a third of the memory traffic of a copy).
pub const STREAM_MIN_BYTES: usize = 4 << 20;

/// Hints the cache to load `src` (up to 16 KiB of it) into L2 ahead of its use. Into L2, not
/// L1: the loads that follow bring each line on into L1 themselves, and a prefetch into L1
/// holds one of the core's few line-fill buffers per line, which the copy's loads and
/// streamed stores need (a gather prefetching into L1 ran about 15% slower here).
#[inline(always)]
pub fn prefetch<T>(src: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(src).min(16 << 10);
        let p = src.as_ptr().cast::<i8>();
        for off in (0..bytes).step_by(64) {
            // SAFETY: `off < size_of_val(src)`, so the address is inside `src`; prefetching
            // never faults and has no architectural effect.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.add(off))
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = src;
}

/// Hints the cache to load the line holding `x` into L1: for a few scattered lines that are
/// read right after, such as the pilot's lookups after a kernel evicted them. (Into L2, as
/// [`prefetch`] does, the pilot's share of a `moe_full` step at 25% rose from 4.1% to 4.5%,
/// means of twelve interleaved runs of `scripts/pilot-ab.sh`.)
#[inline(always)]
pub fn prefetch_l1<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching never faults and has no architectural effect; SSE, the only
    // feature it needs, is part of every x86-64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (x as *const T).cast(),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Copies `src` into the uninitialised `dst` (same length) with non-temporal stores where the
/// target supports them. Call [`stream_fence`] before another thread reads `dst`.
#[inline(always)]
pub fn stream_copy<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    let n = dst.len().min(src.len()) * std::mem::size_of::<T>();
    let (d, s) = (dst.as_mut_ptr().cast::<u8>(), src.as_ptr().cast::<u8>());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        // Bytes until `d` is 16-byte aligned, copied normally (as is the tail).
        let head = (d.align_offset(16)).min(n);
        let body = (n - head) / 16 * 16;
        // SAFETY: every access is within the first `n` bytes of `dst` and `src`, which do not
        // overlap (`dst` is exclusively borrowed); the streamed stores are 16-byte aligned.
        unsafe {
            std::ptr::copy_nonoverlapping(s, d, head);
            let mut i = head;
            while i < head + body {
                let v = _mm_loadu_si128(s.add(i).cast::<__m128i>());
                _mm_stream_si128(d.add(i).cast::<__m128i>(), v);
                i += 16;
            }
            std::ptr::copy_nonoverlapping(s.add(i), d.add(i), n - i);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: as above, without streaming.
    unsafe {
        std::ptr::copy_nonoverlapping(s, d, n)
    }
}

/// Orders the non-temporal stores of [`stream_copy`] before later stores (a no-op where
/// there are none).
#[inline(always)]
pub fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` only orders stores.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}

/// A unit of kernel work compiled three times: for AVX-512, for AVX2+FMA and for the baseline
/// target.
///
/// Implementations mark `run` `#[inline(always)]` (and everything it calls): [`simd_task`]
/// then compiles the whole body inside a `#[target_feature(enable = ...)]` function, where
/// the loops vectorize 16 (AVX-512) or eight (AVX2) f32 lanes wide. Every CPU kernel loop
/// that should vectorize is written as one. (A closure run inside such a function is a
/// separate function, which LLVM may decline to inline into it when the closure is called
/// from two places, leaving the loop scalar.)
pub trait SimdTask {
    /// What the task returns.
    type Out;
    /// The work.
    fn run(self) -> Self::Out;
}

/// Runs `task` with AVX-512 or AVX2+FMA code when the CPU has them, else with baseline
/// code. The kernels' lane counts and operation order are fixed in the source, so every path
/// gives the same bits.
#[inline(always)]
pub fn simd_task<K: SimdTask>(task: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            fn avx512<K: SimdTask>(task: K) -> K::Out {
                task.run()
            }
            // SAFETY: the CPU supports these features, checked just above.
            return unsafe { avx512(task) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            #[target_feature(enable = "avx2,fma")]
            fn avx2<K: SimdTask>(task: K) -> K::Out {
                task.run()
            }
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { avx2(task) };
        }
    }
    task.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_layout_strided_matches_indices() {
        let src: Vec<f32> = (0..60).map(|v| v as f32).collect();
        let l = Layout::contiguous([3, 4, 5]).transpose(0, 2).unwrap();
        let want: Vec<f32> = l.indices().map(|i| src[i] * 2.0).collect();
        assert_eq!(map_layout(&src, &l, |x| x * 2.0), want);
        let n = Layout::contiguous([3, 4, 5]).narrow(2, 1, 3).unwrap();
        let want: Vec<f32> = n.indices().map(|i| src[i]).collect();
        assert_eq!(map_layout(&src, &n, |x| x), want);
        // Parallel rows, each chunk starting mid-tensor.
        let big: Vec<f32> = (0..60_000).map(|v| v as f32).collect();
        let t = Layout::contiguous([40, 30, 50]).transpose(0, 2).unwrap();
        let want: Vec<f32> = t.indices().map(|i| big[i] + 1.0).collect();
        assert_eq!(map_layout(&big, &t, |x| x + 1.0), want);
        // The innermost two dims transposed, in tiles: sizes that are not multiples of the
        // tile, leading dims, an offset, serial and parallel.
        for (dims, narrow) in [([2, 45, 37], 0), ([3, 70, 300], 5), ([1, 33, 1000], 1)] {
            let n: usize = dims.iter().product::<usize>() + narrow;
            let src: Vec<f32> = (0..n).map(|v| v as f32).collect();
            let l = Layout::from_parts(
                Shape::new(&[dims[0], dims[2], dims[1]]),
                vec![dims[1] * dims[2], 1, dims[2]].into(),
                narrow,
            );
            assert!(map_transposed(&src, &l, &|x: f32| x).is_some());
            let want: Vec<f32> = l.indices().map(|i| src[i] * 0.5).collect();
            assert_eq!(map_layout(&src, &l, |x| x * 0.5), want, "{dims:?}");
        }
    }

    #[test]
    fn large_transposed_copies_stream_every_element_into_place() {
        // Above STREAM_MIN_BYTES (staged page-long windows, streamed rows), with a partial
        // window, a partial column block and a leading dim, from an offset view.
        let (lead, rows, cols) = (2, 1030, 1031);
        assert!(lead * rows * cols * 4 >= STREAM_MIN_BYTES);
        let src: Vec<f32> = (0..lead * rows * cols + 7).map(|v| v as f32).collect();
        let l = Layout::contiguous([lead * rows * cols + 7])
            .narrow(0, 7, lead * rows * cols)
            .unwrap()
            .reshape(&Shape::from((lead, cols, rows)))
            .unwrap()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let want: Vec<f32> = l.indices().map(|i| src[i] + 1.0).collect();
        assert_eq!(map_layout(&src, &l, |x| x + 1.0), want);
        // Wider outputs stage shorter windows (512 rows for f64): three, the last partial.
        let want: Vec<f64> = l.indices().map(|i| f64::from(src[i]) * 0.5).collect();
        assert_eq!(map_layout(&src, &l, |x| f64::from(x) * 0.5), want);
    }

    #[test]
    fn vector_paths_give_the_scalar_bits() {
        use crate::math::{exp_f32, tanh_f32};
        // Long enough for the parallel chunks; values across tanh's two branches.
        let n = PAR_MIN * 3 + 17;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let y: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let gelu = |v: f32| 0.5 * v * (1.0 + tanh_f32(0.797_884_6 * (v + 0.044_715 * v * v * v)));
        let want: Vec<u32> = x.iter().map(|&v| gelu(v).to_bits()).collect();
        let got: Vec<u32> = map_slice(&x, gelu).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
        let f = |a: f32, b: f32| b * exp_f32(-a);
        let want: Vec<u32> = x.iter().zip(&y).map(|(&a, &b)| f(a, b).to_bits()).collect();
        let l = Layout::contiguous([n]);
        let got = zip_layouts(&x, &l, &y, &l, &Shape::new(&[n]), f);
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
    }

    #[test]
    fn strided_zips_start_every_chunk_at_its_own_row() {
        // Serial and parallel (more than PAR_MIN elements), with outer dims that do not merge:
        // a transposed left operand, a right one broadcast along two dims, a narrowed one.
        for dims in [[3usize, 5, 7, 40], [6, 50, 7, 30]] {
            let n: usize = dims.iter().product();
            let shape = Shape::new(&dims);
            let (a, b, c) = (dims[0], dims[1], dims[2]);
            let lhs: Vec<f32> = (0..n).map(|v| v as f32).collect();
            let ll = Layout::contiguous([b, a, c, dims[3]])
                .transpose(0, 1)
                .unwrap();
            let rhs: Vec<f32> = (0..b * dims[3] + 3).map(|v| 0.5 * v as f32).collect();
            let rl = Layout::contiguous([b * dims[3] + 3])
                .narrow(0, 3, b * dims[3])
                .unwrap();
            let rl = Layout::from_parts(
                Shape::new(&[1, b, 1, dims[3]]),
                vec![0, dims[3], 0, 1].into(),
                rl.offset(),
            )
            .broadcast_as(&shape)
            .unwrap();
            let want: Vec<f32> = ll
                .indices()
                .zip(rl.indices())
                .map(|(i, j)| lhs[i] * 3.0 - rhs[j])
                .collect();
            let got = zip_layouts(&lhs, &ll, &rhs, &rl, &shape, |x, y| x * 3.0 - y);
            assert_eq!(got, want, "{dims:?}");
        }
    }

    #[test]
    fn long_rows_split_across_chunks() {
        // Rows longer than PAR_MIN are cut into pieces that start and end mid-row: a scalar
        // broadcast over everything (one coalesced row), three long rows with a strided side,
        // and a map over a single strided row.
        let n = 3 * PAR_MIN + 77;
        let x: Vec<f32> = (0..2 * n).map(|v| (v as f32).sin()).collect();
        let one = Shape::new(&[n]);
        let scalar = Layout::contiguous([1]).broadcast_as(&one).unwrap();
        let lx = Layout::contiguous([n]);
        let want: Vec<f32> = x[..n].iter().map(|v| v * 2.5 - 1.0).collect();
        assert_eq!(
            zip_layouts(&x, &lx, &[2.5], &scalar, &one, |a, b| a * b - 1.0),
            want
        );
        assert_eq!(
            zip_layouts(&[2.5], &scalar, &x, &lx, &one, |b, a| a * b - 1.0),
            want
        );
        let inner = PAR_MIN + 1000;
        let shape = Shape::new(&[3, inner]);
        let strided = Layout::from_parts(shape.clone(), vec![inner / 2, 2].into(), 5);
        let dense = Layout::contiguous([3, inner]);
        let want: Vec<f32> = strided
            .indices()
            .zip(dense.indices())
            .map(|(i, j)| x[i] - 3.0 * x[j])
            .collect();
        let got = zip_layouts(&x, &strided, &x, &dense, &shape, |a, b| a - 3.0 * b);
        assert_eq!(got, want);
        let row = Layout::from_parts(Shape::new(&[1, n / 2]), vec![0, 3].into(), 1);
        let want: Vec<f32> = row.indices().map(|i| x[i] + 1.0).collect();
        assert_eq!(map_layout(&x, &row, |v| v + 1.0), want);
    }

    #[test]
    fn zip_broadcast_paths() {
        let a: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let b = vec![10.0f32, 20.0, 30.0];
        let s = Shape::new(&[2, 3]);
        let la = Layout::contiguous([2, 3]);
        let lb = Layout::contiguous([3]).broadcast_as(&s).unwrap();
        assert_eq!(
            zip_layouts(&a, &la, &b, &lb, &s, |x, y| x + y),
            vec![10., 21., 32., 13., 24., 35.]
        );
        // Dims that merge ([2, 3, 4] + [3, 4] is two rows of 12) and a size-1 dim that drops.
        let big: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let small: Vec<f32> = (0..12).map(|v| 100.0 * v as f32).collect();
        let s3 = Shape::new(&[2, 1, 3, 4]);
        let lr = Layout::contiguous([2, 1, 3, 4]);
        let ls = Layout::contiguous([3, 4]).broadcast_as(&s3).unwrap();
        let want: Vec<f32> = (0..24).map(|i| big[i] + small[i % 12]).collect();
        assert_eq!(zip_layouts(&big, &lr, &small, &ls, &s3, |x, y| x + y), want);
        let col = vec![1.0f32, 2.0];
        let lc = Layout::contiguous([2, 1]).broadcast_as(&s).unwrap();
        assert_eq!(
            zip_layouts(&a, &la, &col, &lc, &s, |x, y| x * y),
            vec![0., 1., 2., 6., 8., 10.]
        );
    }
}
