//! Matrix multiply with numpy batch broadcasting: `(..., m, k) @ (..., k, n)`. Kernels come
//! from the `gemm` crate, which reads any row/column strides, so transposed operands (as in
//! every backward) are never copied. f16/bf16 are computed in f32.

use crate::ops::reduce::ReduceOps;
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
struct Problem {
    batch: Shape,
    m: usize,
    n: usize,
    k: usize,
}

fn problem(a: &Shape, b: &Shape) -> Result<Problem> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() < 2 || bd.len() < 2 {
        return Err(Error::invalid(
            "matmul",
            format!("operands need rank >= 2, got {a} and {b}"),
        ));
    }
    let (m, k) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let (k2, n) = (bd[bd.len() - 2], bd[bd.len() - 1]);
    if k != k2 {
        return Err(Error::shape_mismatch("matmul", a, b));
    }
    let batch = Shape::new(&ad[..ad.len() - 2])
        .broadcast_with(&Shape::new(&bd[..bd.len() - 2]), "matmul")?;
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

/// Runs gemm for every batch entry into a contiguous `(batch, m, n)` output.
fn gemm_batched<T: 'static + Copy + Send + Sync + Default>(
    a: &Operand<'_, T>,
    b: &Operand<'_, T>,
    p: &Problem,
    one: T,
) -> Vec<T> {
    let (m, n, k) = (p.m, p.n, p.k);
    let nb = p.batch.elem_count();
    let threads = rayon::current_num_threads();
    vec_from_fill(nb * m * n, |out| {
        if m * n == 0 {
            return;
        }
        if k == 0 {
            out.iter_mut().for_each(|o| {
                o.write(T::default());
            });
            return;
        }
        let run = |dst: *mut T, ao: usize, bo: usize, m: usize, par: Parallelism| {
            // SAFETY: `dst` points at m*n writable elements (one output matrix, or the folded
            // block); the operand offsets and strides come from layouts validated against their
            // buffers, so every element gemm reads is in bounds. read_dst = false: dst is only
            // written, never read, so it may be uninitialised.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst,
                    1,
                    n as isize,
                    false,
                    a.data.as_ptr().add(ao),
                    a.cs,
                    a.rs,
                    b.data.as_ptr().add(bo),
                    b.cs,
                    b.rs,
                    one,
                    one,
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
    })
}

fn to_f32(s: &CpuStorage) -> Vec<f32> {
    match s {
        CpuStorage::F16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
        _ => Vec::new(),
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
        if a.dtype() != b.dtype() {
            return Err(Error::DTypeMismatch {
                op: "matmul",
                expected: a.dtype(),
                got: b.dtype(),
            });
        }
        if !a.dtype().is_float() {
            return Err(Error::unsupported_dtype("matmul", a.dtype()));
        }
        let p = problem(a.shape(), b.shape())?;
        let mut dims = p.batch.to_vec();
        dims.extend([p.m, p.n]);
        Ok(smallvec![TensorSpec::new(dims, a.dtype())])
    }
    fn cost(&self, inputs: &[&Tensor], outputs: &[TensorSpec]) -> Cost {
        let read: usize = inputs
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let (flops, written) = match problem(inputs[0].shape(), inputs[1].shape()) {
            Ok(p) => (
                2 * p.batch.elem_count() * p.m * p.n * p.k,
                outputs[0].size_in_bytes(),
            ),
            Err(_) => (0, 0),
        };
        Cost {
            flops: flops as u64,
            bytes_read: read as u64,
            bytes_written: written as u64,
        }
    }
    fn forward(&self, inputs: &[KernelArg<'_>], _: &[TensorSpec]) -> Result<Outputs> {
        let (a, b) = (inputs[0], inputs[1]);
        let p = problem(a.shape(), b.shape())?;
        let (sa, sb) = (a.cpu("matmul")?, b.cpu("matmul")?);
        let out = match (sa, sb) {
            (CpuStorage::F32(x), CpuStorage::F32(y)) => CpuStorage::F32(gemm_batched(
                &operand(x, a.layout, &p.batch)?,
                &operand(y, b.layout, &p.batch)?,
                &p,
                1.0,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(y)) => CpuStorage::F64(gemm_batched(
                &operand(x, a.layout, &p.batch)?,
                &operand(y, b.layout, &p.batch)?,
                &p,
                1.0,
            )),
            (CpuStorage::F16(_), CpuStorage::F16(_))
            | (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                let (x, y) = (to_f32(sa), to_f32(sb));
                let r = gemm_batched(
                    &operand(&x, a.layout, &p.batch)?,
                    &operand(&y, b.layout, &p.batch)?,
                    &p,
                    1.0f32,
                );
                match sa.dtype() {
                    DType::F16 => {
                        CpuStorage::F16(r.par_iter().map(|&v| half::f16::from_f32(v)).collect())
                    }
                    _ => CpuStorage::BF16(r.par_iter().map(|&v| half::bf16::from_f32(v)).collect()),
                }
            }
            _ => return Err(Error::unsupported_dtype("matmul", sa.dtype())),
        };
        Ok(crate::cpu::one(out))
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
            .then(|| {
                let (ad, gd) = (a.dims(), g.dims());
                if b.rank() == 2 && a.rank() > 2 {
                    // A batch times one weight (`x W` in a layer): fold the batch into the rows,
                    // `Σ_b a_bᵀ g_b = [a]ᵀ [g]`, one matmul instead of a per-batch gradient
                    // the size of the weight times the batch, summed.
                    let rows: usize = ad[..ad.len() - 1].iter().product();
                    let a2 = a.contiguous()?.reshape((rows, ad[ad.len() - 1]))?;
                    let g2 = g.contiguous()?.reshape((rows, gd[gd.len() - 1]))?;
                    a2.t()?.matmul(&g2)
                } else {
                    a.t()?.matmul(g)?.sum_to(&ctx.input_specs[1].shape)
                }
            })
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
