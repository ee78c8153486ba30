//! Matrix multiply with numpy batch broadcasting: `(..., m, k) @ (..., k, n)`, and the GEMM
//! kernels behind it (with a broadcast addend, for `linear` and `attention_probs`). Kernels
//! come from the `gemm` crate, which reads any row/column strides, so transposed operands (as
//! in every backward) are never copied. f16/bf16 are computed in f32.

use crate::cpu::map_layout;
use crate::cuda::{self, CudaStorage};
use crate::ops::reduce::ReduceOps;
use crate::ops::same_float_dtype;
use crate::ops::views::ViewOps;
use crate::registry::OpInfo;
use dynn_core::{
    BackwardCtx, Cost, CpuStorage, DType, Error, Idioms, InputGrads, KernelArg, Layout, Op,
    Outputs, Result, Save, Shape, Specs, Tensor, TensorSpec, execute1, smallvec::smallvec,
    vec_from_fill,
};
use gemm::Parallelism;
use rayon::prelude::*;

/// `a @ b` over the last two dims, broadcasting the leading (batch) dims.
#[derive(Debug, Clone, Copy)]
pub struct Matmul;

/// A multiply-accumulate: element-wise products reduced over k (no row of PyTorch's table).
const IDIOMS: Idioms = Idioms([0, 0, 0, 1, 1, 0]);

/// The broadcast problem: batch shape, m, n, k.
pub(crate) struct Problem {
    pub(crate) batch: Shape,
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl Problem {
    /// The output's dims: the batch, then `(m, n)`.
    pub(crate) fn out_dims(&self) -> Vec<usize> {
        let mut dims = self.batch.to_vec();
        dims.extend([self.m, self.n]);
        dims
    }

    /// The multiply-accumulates' FLOPs.
    pub(crate) fn flops(&self) -> u64 {
        (2 * self.batch.elem_count() * self.m * self.n * self.k) as u64
    }
}

pub(crate) fn problem(op: &'static str, a: &Shape, b: &Shape) -> Result<Problem> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() < 2 || bd.len() < 2 {
        return Err(Error::invalid(
            op,
            format!("operands need rank >= 2, got {a} and {b}"),
        ));
    }
    let (m, k) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let (k2, n) = (bd[bd.len() - 2], bd[bd.len() - 1]);
    if k != k2 {
        return Err(Error::shape_mismatch(op, a, b));
    }
    let batch =
        Shape::new(&ad[..ad.len() - 2]).broadcast_with(&Shape::new(&bd[..bd.len() - 2]), op)?;
    Ok(Problem { batch, m, n, k })
}

/// Per-batch element offsets of an operand whose layout is broadcast to `batch` + its matrix dims.
fn batch_offsets(l: &Layout, batch: &Shape) -> Result<Vec<usize>> {
    let r = l.dims().len();
    let mat = Layout::from_parts(
        Shape::new(&l.dims()[..r - 2]),
        l.strides()[..r - 2].into(),
        l.offset(),
    );
    Ok(mat.broadcast_as(batch)?.indices().collect())
}

struct Operand<'a, T> {
    data: &'a [T],
    offsets: Vec<usize>,
    rs: isize,
    cs: isize,
}

fn operand<'a, T>(data: &'a [T], l: &Layout, batch: &Shape) -> Result<Operand<'a, T>> {
    let s = l.strides();
    let r = s.len();
    Ok(Operand {
        data,
        offsets: batch_offsets(l, batch)?,
        rs: s[r - 2] as isize,
        cs: s[r - 1] as isize,
    })
}

/// Runs gemm for every batch entry into a contiguous `(batch, m, n)` output, the products
/// scaled by `scale`. With `init` (the whole output's starting values, e.g. a broadcast bias)
/// the scaled products accumulate into it.
fn gemm_batched<T: 'static + Copy + Send + Sync + Default>(
    a: &Operand<'_, T>,
    b: &Operand<'_, T>,
    p: &Problem,
    (one, scale): (T, T),
    init: Option<Vec<T>>,
) -> Vec<T> {
    let len = p.batch.elem_count() * p.m * p.n;
    match init {
        Some(mut out) => {
            if p.k > 0 && len > 0 {
                // SAFETY: `T` and `MaybeUninit<T>` have the same layout, and the slice only
                // gets initialised values written through it.
                let uninit =
                    unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len()) };
                gemm_into(uninit, a, b, p, (one, scale), true);
            }
            out
        }
        None => vec_from_fill(len, |out| {
            if len == 0 {
                return;
            }
            if p.k == 0 {
                out.iter_mut().for_each(|o| {
                    o.write(T::default());
                });
                return;
            }
            gemm_into(out, a, b, p, (one, scale), false);
        }),
    }
}

/// [`gemm_batched`]'s products into `out`: read first (`read_dst`, then every element is
/// initialised) or only written.
fn gemm_into<T: 'static + Copy + Send + Sync + Default>(
    out: &mut [std::mem::MaybeUninit<T>],
    a: &Operand<'_, T>,
    b: &Operand<'_, T>,
    p: &Problem,
    (one, scale): (T, T),
    read_dst: bool,
) {
    let (m, n, k) = (p.m, p.n, p.k);
    let nb = p.batch.elem_count();
    let threads = rayon::current_num_threads();
    let run = |dst: *mut T, ao: usize, bo: usize, m: usize, par: Parallelism| {
        // SAFETY: `dst` points at m*n writable elements (one output matrix, or the folded
        // block); the operand offsets and strides come from layouts validated against their
        // buffers, so every element gemm reads is in bounds. Without read_dst, dst is only
        // written, never read, so it may be uninitialised; with it, the caller initialised it.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                n as isize,
                read_dst,
                a.data.as_ptr().add(ao),
                a.cs,
                a.rs,
                b.data.as_ptr().add(bo),
                b.cs,
                b.rs,
                one,
                scale,
                false,
                false,
                false,
                par,
            )
        }
    };
    // One big problem when b is shared across a batch of row-contiguous a matrices.
    let b_shared = b.offsets.iter().all(|&o| o == b.offsets[0]);
    let a_folds = a
        .offsets
        .windows(2)
        .all(|w| w[1] == w[0] + m * a.rs as usize)
        && a.rs > 0;
    let par_all = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    if nb == 1 || (b_shared && a_folds) {
        run(
            out.as_mut_ptr().cast(),
            a.offsets[0],
            b.offsets[0],
            m * nb,
            par_all,
        );
    } else if nb >= threads && m * n * k <= 256 * 256 * 256 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| {
            run(
                o.as_mut_ptr().cast(),
                a.offsets[i],
                b.offsets[i],
                m,
                Parallelism::None,
            )
        });
    } else {
        for (i, o) in out.chunks_mut(m * n).enumerate() {
            run(
                o.as_mut_ptr().cast(),
                a.offsets[i],
                b.offsets[i],
                m,
                par_all,
            );
        }
    }
}

fn to_f32(s: &CpuStorage) -> Vec<f32> {
    match s {
        CpuStorage::F16(v) => v.par_iter().map(|&x| dynn_core::f16_to_f32(x)).collect(),
        CpuStorage::BF16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
        _ => Vec::new(),
    }
}

/// How cuBLAS reads one operand: transposed or not, its leading dimension, the element offset
/// of its first matrix and the stride between batch entries.
struct BlasOperand {
    trans: bool,
    ld: i64,
    offset: i64,
    batch_stride: i64,
}

/// The batch stride of evenly spaced offsets (0 for one entry or a broadcast operand).
fn even_stride(offsets: &[usize]) -> Option<i64> {
    match offsets {
        [] | [_] => Some(0),
        [a, b, ..] => {
            let d = *b as i64 - *a as i64;
            (d >= 0 && offsets.windows(2).all(|w| w[1] as i64 - w[0] as i64 == d)).then_some(d)
        }
    }
}

/// An operand of logical shape (rows, cols) per batch entry, read as cuBLAS's first operand of
/// `Cᵀ = Bᵀ·Aᵀ` (column-major): row-major memory is the transpose already (`N`), column-major
/// memory needs `T`. `None` when cuBLAS cannot read the layout directly.
fn blas_operand(
    l: &Layout,
    batch: &Shape,
    rows: usize,
    cols: usize,
) -> Result<Option<BlasOperand>> {
    let st = l.strides();
    let r = st.len();
    let (rs, cs) = (st[r - 2] as i64, st[r - 1] as i64);
    let (rows, cols) = (rows as i64, cols as i64);
    let offsets = batch_offsets(l, batch)?;
    let Some(batch_stride) = even_stride(&offsets) else {
        return Ok(None);
    };
    let offset = offsets.first().copied().unwrap_or(0) as i64;
    let row_major = (cs == 1 || cols == 1) && (rows == 1 || rs >= cols.max(1));
    let col_major = (rs == 1 || rows == 1) && (cols == 1 || cs >= rows.max(1));
    Ok(if row_major {
        Some(BlasOperand {
            trans: false,
            ld: if rows == 1 { cols.max(1) } else { rs },
            offset,
            batch_stride,
        })
    } else if col_major {
        Some(BlasOperand {
            trans: true,
            ld: if cols == 1 { rows.max(1) } else { cs },
            offset,
            batch_stride,
        })
    } else {
        None
    })
}

/// A contiguous `(batch, rows, cols)` copy of an operand on the GPU (any dtype).
fn gather_operand(
    x: &KernelArg<'_>,
    batch: &Shape,
    rows: usize,
    cols: usize,
) -> Result<CudaStorage> {
    let mut dims = batch.to_vec();
    dims.extend([rows, cols]);
    let layout = x.layout.broadcast_as(&Shape::new(&dims))?;
    crate::ops::views::cuda_contiguous_copy(
        "matmul",
        &KernelArg {
            storage: x.storage,
            layout: &layout,
        },
    )
}

/// `scale · (a @ b) + bias` on the GPU through cuBLAS's strided-batched GEMM (`α = scale`):
/// with a bias, the output starts as the bias broadcast to its shape and cuBLAS accumulates
/// into it (`β = 1`).
pub(crate) fn cuda_matmul(
    op: &'static str,
    a: &KernelArg<'_>,
    b: &KernelArg<'_>,
    bias: Option<&KernelArg<'_>>,
    scale: f64,
) -> Result<Box<dyn dynn_core::DeviceStorage>> {
    let p = problem(op, a.shape(), b.shape())?;
    let dtype = a.dtype();
    let (sa, sb) = (cuda::storage(op, a)?, cuda::storage(op, b)?);
    let dev = sa.dev().clone();
    let nb = p.batch.elem_count();
    let mut out = match bias {
        Some(c) => gather_operand(c, &p.batch, p.m, p.n)?,
        None => CudaStorage::alloc(&dev, dtype, nb * p.m * p.n)?,
    };
    if nb * p.m * p.n == 0 || (p.k == 0 && bias.is_some()) {
        return Ok(Box::new(out));
    }
    if p.k == 0 {
        return Ok(Box::new(CudaStorage::zeros(&dev, dtype, nb * p.m * p.n)?));
    }
    let too_big = [p.m, p.n, p.k, nb].iter().any(|&d| d > i32::MAX as usize);
    if too_big {
        return Err(Error::invalid(
            "matmul",
            format!(
                "cuBLAS takes dims below 2^31, got batch {nb}, m {}, n {}, k {}",
                p.m, p.n, p.k
            ),
        ));
    }
    // Operands cuBLAS cannot read directly are gathered into contiguous copies.
    let (ga, gb);
    let (oa, da) = match blas_operand(a.layout, &p.batch, p.m, p.k)? {
        Some(o) => (o, sa),
        None => {
            ga = gather_operand(a, &p.batch, p.m, p.k)?;
            let o = blas_operand(
                &Layout::contiguous([nb, p.m, p.k]),
                &Shape::new(&[nb]),
                p.m,
                p.k,
            )?;
            (
                o.ok_or_else(|| Error::Msg("matmul: contiguous operand unreadable".into()))?,
                &ga,
            )
        }
    };
    let (ob, db) = match blas_operand(b.layout, &p.batch, p.k, p.n)? {
        Some(o) => (o, sb),
        None => {
            gb = gather_operand(b, &p.batch, p.k, p.n)?;
            let o = blas_operand(
                &Layout::contiguous([nb, p.k, p.n]),
                &Shape::new(&[nb]),
                p.k,
                p.n,
            )?;
            (
                o.ok_or_else(|| Error::Msg("matmul: contiguous operand unreadable".into()))?,
                &gb,
            )
        }
    };
    // A batch of row-major matrices times one shared matrix is one taller GEMM.
    let folds =
        nb > 1 && ob.batch_stride == 0 && !oa.trans && oa.batch_stride == p.m as i64 * oa.ld;
    let (p, nb) = if folds {
        let tall = Problem {
            batch: Shape::new(&[]),
            m: p.m * nb,
            n: p.n,
            k: p.k,
        };
        (tall, 1)
    } else {
        (p, nb)
    };
    let blas = dev.blas()?;
    let (a, b, c) = ((&oa, da), (&ob, db), &mut out);
    // Half precision goes through cuBLAS's strided-batched GemmEx computing in f32 (the CPU
    // kernel accumulates in f32 too; cuBLAS may still reduce in the output type where it
    // splits k, as PyTorch's defaults allow).
    use half::{bf16, f16};
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    match dtype {
        DType::F32 => blas_gemm(&blas, &p, nb, a, b, c, scale as f32, beta as f32),
        DType::F64 => blas_gemm(&blas, &p, nb, a, b, c, scale, beta),
        DType::F16 => blas_gemm(
            &blas,
            &p,
            nb,
            a,
            b,
            c,
            f16::from_f64(scale),
            f16::from_f64(beta),
        ),
        DType::BF16 => blas_gemm(
            &blas,
            &p,
            nb,
            a,
            b,
            c,
            bf16::from_f64(scale),
            bf16::from_f64(beta),
        ),
        other => Err(Error::Device {
            op,
            msg: format!("CUDA {op} runs on f32, f64, f16 and bf16, got {other:?}"),
        }),
    }
    .map_err(|e| match e {
        Error::Device { .. } => e,
        other => Error::Device {
            op,
            msg: other.to_string(),
        },
    })?;
    Ok(Box::new(out))
}

/// One strided-batched GEMM: `Cᵀ (n×m) = Bᵀ (n×k) · Aᵀ (k×m)` in cuBLAS's column-major terms,
/// which is the row-major `C = A·B` dynn stores.
#[allow(clippy::too_many_arguments)]
fn blas_gemm<T>(
    blas: &cudarc::cublas::CudaBlas,
    p: &Problem,
    nb: usize,
    a: (&BlasOperand, &CudaStorage),
    b: (&BlasOperand, &CudaStorage),
    out: &mut CudaStorage,
    alpha: T,
    beta: T,
) -> Result<()>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
    fn view<'s, T>(o: &BlasOperand, s: &'s CudaStorage) -> Result<cudarc::driver::CudaView<'s, T>> {
        // SAFETY: the storage holds `s.len()` elements of T (its dtype is T's, checked by the
        // caller's match), so the bytes are valid as that many T.
        let all = unsafe { s.slice().transmute::<T>(s.len()) };
        all.and_then(|v| v.try_slice(o.offset as usize..))
            .ok_or_else(|| Error::Msg("matmul: operand view out of range".into()))
    }
    let (oa, sa) = a;
    let (ob, sb) = b;
    let (va, vb) = (view::<T>(oa, sa)?, view::<T>(ob, sb)?);
    let len = out.len();
    let dev = out.dev().clone();
    // SAFETY: as above, the output holds `len` elements of T.
    let mut vc = unsafe { out.slice_mut().transmute_mut::<T>(len) }
        .ok_or_else(|| Error::Msg("matmul: output view out of range".into()))?;
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(ob.trans),
            transb: op(oa.trans),
            m: p.n as i32,
            n: p.m as i32,
            k: p.k as i32,
            alpha,
            lda: ob.ld as i32,
            ldb: oa.ld as i32,
            beta,
            ldc: p.n as i32,
        },
        batch_size: nb as i32,
        stride_a: ob.batch_stride,
        stride_b: oa.batch_stride,
        stride_c: (p.m * p.n) as i64,
    };
    // SAFETY: the problem dims, leading dimensions and batch strides describe only elements
    // inside each operand's layout (validated against its buffer) and the (nb, m, n) output.
    unsafe { blas.gemm_strided_batched(cfg, &vb, &va, &mut vc) }.map_err(dev.err("matmul"))
}

/// `scale · (a @ b) + bias` on the CPU, `bias` broadcast to the output's shape. The dtypes
/// were checked to agree by the op's `infer`.
pub(crate) fn cpu_matmul(
    op: &'static str,
    a: &KernelArg<'_>,
    b: &KernelArg<'_>,
    bias: Option<&KernelArg<'_>>,
    scale: f64,
) -> Result<CpuStorage> {
    let p = problem(op, a.shape(), b.shape())?;
    let (sa, sb) = (a.cpu(op)?, b.cpu(op)?);
    // The output's starting values: the bias broadcast, in the type the product accumulates in.
    let out_layout = bias
        .map(|c| c.layout.broadcast_as(&Shape::new(&p.out_dims())))
        .transpose()?;
    let (mut init32, mut init64) = (None, None);
    if let (Some(c), Some(l)) = (bias, &out_layout) {
        match c.cpu(op)? {
            CpuStorage::F32(v) => init32 = Some(map_layout(v, l, |x| x)),
            CpuStorage::F64(v) => init64 = Some(map_layout(v, l, |x| x)),
            CpuStorage::F16(v) => init32 = Some(map_layout(v, l, dynn_core::f16_to_f32)),
            CpuStorage::BF16(v) => init32 = Some(map_layout(v, l, |x| x.to_f32())),
            other => return Err(Error::unsupported_dtype(op, other.dtype())),
        }
    }
    Ok(match (sa, sb) {
        (CpuStorage::F32(x), CpuStorage::F32(y)) => CpuStorage::F32(gemm_batched(
            &operand(x, a.layout, &p.batch)?,
            &operand(y, b.layout, &p.batch)?,
            &p,
            (1.0, scale as f32),
            init32,
        )),
        (CpuStorage::F64(x), CpuStorage::F64(y)) => CpuStorage::F64(gemm_batched(
            &operand(x, a.layout, &p.batch)?,
            &operand(y, b.layout, &p.batch)?,
            &p,
            (1.0, scale),
            init64,
        )),
        (CpuStorage::F16(_), CpuStorage::F16(_)) | (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
            let (x, y) = (to_f32(sa), to_f32(sb));
            let r = gemm_batched(
                &operand(&x, a.layout, &p.batch)?,
                &operand(&y, b.layout, &p.batch)?,
                &p,
                (1.0, scale as f32),
                init32,
            );
            match sa.dtype() {
                DType::F16 => {
                    CpuStorage::F16(r.par_iter().map(|&v| dynn_core::f32_to_f16(v)).collect())
                }
                _ => CpuStorage::BF16(r.par_iter().map(|&v| half::bf16::from_f32(v)).collect()),
            }
        }
        _ => return Err(Error::unsupported_dtype(op, sa.dtype())),
    })
}

/// The gradient of a weight `b` in `a @ b` for the output gradient `g`. A batch times one
/// weight (`x W` in a layer) folds the batch into the rows, `Σ_b a_bᵀ g_b = [a]ᵀ [g]`: one
/// matmul instead of a per-batch gradient the size of the weight times the batch, summed.
pub(crate) fn weight_grad(a: &Tensor, b_shape: &Shape, g: &Tensor) -> Result<Tensor> {
    let (ad, gd) = (a.dims(), g.dims());
    if b_shape.rank() == 2 && a.rank() > 2 {
        let rows: usize = ad[..ad.len() - 1].iter().product();
        let a2 = a.contiguous()?.reshape((rows, ad[ad.len() - 1]))?;
        let g2 = g.contiguous()?.reshape((rows, gd[gd.len() - 1]))?;
        a2.t()?.matmul(&g2)
    } else {
        a.t()?.matmul(g)?.sum_to(b_shape)
    }
}

impl Op for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn idioms(&self) -> Idioms {
        IDIOMS
    }
    fn infer(&self, inputs: &[&Tensor]) -> Result<Specs> {
        let (a, b) = (inputs[0], inputs[1]);
        same_float_dtype("matmul", inputs)?;
        let p = problem("matmul", a.shape(), b.shape())?;
        Ok(smallvec![TensorSpec::new(p.out_dims(), a.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let flops =
            problem("matmul", inputs[0].shape(), inputs[1].shape()).map_or(0, |p| p.flops());
        Cost::streaming(inputs, outputs, flops)
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (a, b) = (inputs[0], inputs[1]);
        if cuda::on_cuda(inputs) {
            return Ok(smallvec![cuda_matmul("matmul", &a, &b, None, 1.0)?]);
        }
        Ok(crate::cpu::one(cpu_matmul("matmul", &a, &b, None, 1.0)?))
    }
    fn save(&self) -> Save {
        Save::INPUTS
    }
    fn backward(&self, ctx: &BackwardCtx<'_>) -> Result<InputGrads> {
        let g = ctx.grad(0)?;
        let (a, b) = (ctx.input(0)?, ctx.input(1)?);
        let ga = ctx
            .needs(0)
            .then(|| g.matmul(&b.t()?)?.sum_to(&ctx.input_specs[0].shape))
            .transpose()?;
        let gb = ctx
            .needs(1)
            .then(|| weight_grad(a, &ctx.input_specs[1].shape, g))
            .transpose()?;
        Ok(smallvec![ga, gb])
    }
}

/// Matrix multiplication.
pub trait MatmulOps {
    /// `self @ rhs` over the last two dims, broadcasting batch dims (numpy `matmul`).
    fn matmul(&self, rhs: &Tensor) -> Result<Tensor>;
}

impl MatmulOps for Tensor {
    fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        execute1(Matmul, &[self, rhs])
    }
}

/// This file's entries in the op table.
pub(crate) fn ops() -> Vec<OpInfo> {
    vec![OpInfo {
        name: "matmul",
        idioms: IDIOMS,
        differentiable: true,
        family: "matmul",
    }]
}
