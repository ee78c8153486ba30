//! Indexing ops on the GPU: embedding, index_select, gather, scatter_add and index_add, in f32,
//! f64, f16 and bf16, with i64 and u32 indices (many repeated, so the scatter-adds accumulate), contiguous
//! and strided inputs, forward and every backward (`embedding_backward`,
//! `index_select_backward`, `gather_backward`), the 16-byte-vector row copies, the raw copies
//! of other dtypes, bit-identical repeated runs, and out-of-range indices giving the CPU's
//! error.

use crate::harness::*;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

const INDEX: [DType; 2] = [DType::I64, DType::U32];

fn tol(dtype: DType) -> f64 {
    tol_of(dtype)
}

/// The op's result on the CPU and on the GPU must be the same error, an
/// [`Error::IndexOutOfRange`].
fn same_index_error(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let on_gpu: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(dev))
        .collect::<Result<_>>()?;
    let (want, got) = (f(inputs), f(&on_gpu));
    match (want, got) {
        (Err(w @ Error::IndexOutOfRange { .. }), Err(g @ Error::IndexOutOfRange { .. })) => {
            if w.to_string() == g.to_string() {
                Ok(())
            } else {
                Err(Error::Msg(format!(
                    "{name}: the GPU error `{g}` differs from the CPU's `{w}`"
                )))
            }
        }
        (w, g) => Err(Error::Msg(format!(
            "{name}: expected IndexOutOfRange on both devices, got {:?} on the CPU and {:?} \
             on the GPU",
            w.err(),
            g.err()
        ))),
    }
}

/// An index tensor from explicit values.
fn ids_of(v: &[i64], shape: &[usize], dtype: DType) -> Tensor {
    match dtype {
        DType::U32 => Tensor::from_vec(v.iter().map(|&i| i as u32).collect(), shape, Device::Cpu),
        _ => Tensor::from_vec(v.to_vec(), shape, Device::Cpu),
    }
    .expect("ids")
}

#[test]
fn embedding() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let tl = tol(dtype);
        for it in INDEX {
            let tag = format!("{dtype:?} {it:?}");
            // Ids from 0..12 of a 50-row table: many repeats, so the backward accumulates.
            let table = rand_dtype(&[50, 16], 1, dtype);
            let ids = indices(&[3, 7], 12, 2, it);
            let f = |v: &[Tensor]| v[0].embedding(&v[1]);
            cases.push((
                format!("embedding {tag}"),
                check("embedding", &[table.clone(), ids.clone()], f, tl, true),
            ));
            // Row widths that are not a whole number of 16-byte vectors (the element path).
            let odd = rand_dtype(&[30, 7], 3, dtype);
            let ids_odd = indices(&[41], 30, 4, it);
            cases.push((
                format!("embedding odd width {tag}"),
                check("embedding", &[odd.clone(), ids_odd.clone()], f, tl, true),
            ));
            // Strided tables: transposed (rows not contiguous) and narrowed (offset rows).
            let tt = rand_dtype(&[16, 50], 5, dtype);
            let ft = |v: &[Tensor]| v[0].t()?.embedding(&v[1]);
            cases.push((
                format!("embedding transposed table {tag}"),
                check("embedding", &[tt, ids.clone()], ft, tl, true),
            ));
            let tn = rand_dtype(&[60, 24], 6, dtype);
            let fnw = |v: &[Tensor]| v[0].narrow(1, 4, 16)?.narrow(0, 3, 50)?.embedding(&v[1]);
            cases.push((
                format!("embedding narrowed table {tag}"),
                check("embedding", &[tn.clone(), ids.clone()], fnw, tl, true),
            ));
            // An offset that breaks the 16-byte alignment of the rows.
            let fmis = |v: &[Tensor]| v[0].narrow(1, 1, 16)?.narrow(0, 3, 50)?.embedding(&v[1]);
            cases.push((
                format!("embedding misaligned table {tag}"),
                check("embedding", &[tn, ids.clone()], fmis, tl, true),
            ));
            // Strided ids (forward; the backward reshapes the ids, a copy for strided ones).
            let idt = indices(&[7, 3], 50, 7, it);
            let fi = |v: &[Tensor]| v[0].embedding(&v[1].t()?);
            cases.push((
                format!("embedding transposed ids {tag}"),
                check("embedding", &[table.clone(), idt], fi, tl, false),
            ));
            // A scalar id.
            let one = ids_of(&[49], &[], it);
            cases.push((
                format!("embedding scalar id {tag}"),
                check("embedding", &[table.clone(), one], f, tl, true),
            ));
            // Then a nonlinearity, so the gradient rows differ.
            let fs = |v: &[Tensor]| v[0].embedding(&v[1])?.sqr();
            cases.push((
                format!("embedding then sqr {tag}"),
                check("embedding", &[table, ids_odd], fs, tl, true),
            ));
        }
        // The benchmark's shape, smaller: wide rows copied as 16-byte vectors.
        let table = rand_dtype(&[2000, 512], 8, dtype);
        let ids = indices(&[2048], 2000, 9, DType::I64);
        let f = |v: &[Tensor]| v[0].embedding(&v[1]);
        cases.push((
            format!("embedding 2000x512 {dtype:?}"),
            check("embedding", &[table, ids], f, tl, true),
        ));
    }
    run("embedding", cases);
}

#[test]
fn embedding_of_other_dtypes() {
    // The lookup moves raw elements: every dtype works (forward).
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16, DType::I64, DType::U32, DType::U8] {
        let table = randn(&[40, 12], 1).affine(8.0, 0.0).expect("scale");
        let table = table.to_dtype(dtype).expect("cast");
        let ids = indices(&[5, 9], 40, 2, DType::I64);
        let f = |v: &[Tensor]| v[0].embedding(&v[1]);
        cases.push((
            format!("embedding {dtype:?}"),
            check("embedding", &[table.clone(), ids.clone()], f, 0.0, false),
        ));
        let ft = |v: &[Tensor]| v[0].t()?.t()?.narrow(1, 1, 9)?.embedding(&v[1]);
        cases.push((
            format!("embedding narrowed {dtype:?}"),
            check("embedding", &[table, ids.clone()], ft, 0.0, false),
        ));
        // Rows of 32 elements (a 16-byte multiple in every dtype): the vector copy.
        let wide = randn(&[40, 32], 3).affine(8.0, 0.0).expect("scale");
        let wide = wide.to_dtype(dtype).expect("cast");
        cases.push((
            format!("embedding 16-byte rows {dtype:?}"),
            check("embedding", &[wide, ids], f, 0.0, false),
        ));
    }
    run("embedding_of_other_dtypes", cases);
}

#[test]
fn index_select() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let tl = tol(dtype);
        for it in INDEX {
            let tag = format!("{dtype:?} {it:?}");
            let x = rand_dtype(&[4, 5, 6], 10, dtype);
            for dim in 0..3 {
                let n = x.dims()[dim];
                let ids = indices(&[9], n, 11 + dim as u64, it);
                let f = move |v: &[Tensor]| v[0].index_select(dim, &v[1]);
                cases.push((
                    format!("index_select dim {dim} {tag}"),
                    check("index_select", &[x.clone(), ids.clone()], f, tl, true),
                ));
                // A permuted x: neither the outer nor the inner block is contiguous.
                let fp = move |v: &[Tensor]| v[0].permute(&[2, 0, 1])?.index_select(dim, &v[1]);
                let np = [6, 4, 5][dim];
                let idp = indices(&[9], np, 21 + dim as u64, it);
                cases.push((
                    format!("index_select permuted dim {dim} {tag}"),
                    check("index_select", &[x.clone(), idp], fp, tl, true),
                ));
            }
            // Aligned rows (16-byte vectors) in the middle dim, with an outer dim.
            let xa = rand_dtype(&[3, 10, 32], 12, dtype);
            let ids = indices(&[17], 10, 13, it);
            let f = |v: &[Tensor]| v[0].index_select(1, &v[1])?.tanh();
            cases.push((
                format!("index_select aligned rows {tag}"),
                check("index_select", &[xa, ids.clone()], f, tl, true),
            ));
            // Strided ids.
            let xs = rand_dtype(&[10, 8], 14, dtype);
            let idw = indices(&[9, 2], 10, 15, it);
            let fi = |v: &[Tensor]| v[0].index_select(0, &v[1].narrow(1, 1, 1)?.squeeze(1)?);
            cases.push((
                format!("index_select strided ids {tag}"),
                check("index_select", &[xs.clone(), idw], fi, tl, false),
            ));
            // No ids.
            let none = ids_of(&[], &[0], it);
            let f0 = |v: &[Tensor]| v[0].index_select(0, &v[1]);
            cases.push((
                format!("index_select no ids {tag}"),
                check("index_select", &[xs, none], f0, tl, false),
            ));
        }
    }
    run("index_select", cases);
}

#[test]
fn gather() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let tl = tol(dtype);
        for it in INDEX {
            let tag = format!("{dtype:?} {it:?}");
            let x = rand_dtype(&[4, 5], 20, dtype);
            let f1 = |v: &[Tensor]| v[0].gather(1, &v[1]);
            cases.push((
                format!("gather dim 1 {tag}"),
                check(
                    "gather",
                    &[x.clone(), indices(&[4, 7], 5, 21, it)],
                    f1,
                    tl,
                    true,
                ),
            ));
            let f0 = |v: &[Tensor]| v[0].gather(0, &v[1]);
            cases.push((
                format!("gather dim 0 {tag}"),
                check(
                    "gather",
                    &[x.clone(), indices(&[6, 5], 4, 22, it)],
                    f0,
                    tl,
                    true,
                ),
            ));
            // An index smaller than x in the other dims (torch semantics).
            cases.push((
                format!("gather smaller index {tag}"),
                check(
                    "gather",
                    &[x.clone(), indices(&[2, 3], 5, 23, it)],
                    f1,
                    tl,
                    true,
                ),
            ));
            // A permuted 3-d x, dim -2, index smaller in the outer and inner dims.
            let x3 = rand_dtype(&[3, 4, 5], 24, dtype);
            let fp = |v: &[Tensor]| v[0].permute(&[2, 0, 1])?.gather(-2i32, &v[1]);
            cases.push((
                format!("gather permuted {tag}"),
                check(
                    "gather",
                    &[x3, indices(&[4, 6, 3], 3, 25, it)],
                    fp,
                    tl,
                    true,
                ),
            ));
            // Transposed index.
            let ft = |v: &[Tensor]| v[0].gather(1, &v[1].t()?);
            cases.push((
                format!("gather transposed index {tag}"),
                check(
                    "gather",
                    &[x.clone(), indices(&[7, 4], 5, 26, it)],
                    ft,
                    tl,
                    false,
                ),
            ));
            // Larger, with many repeats along the gathered dim (the backward accumulates).
            let xl = rand_dtype(&[64, 300], 27, dtype);
            let fl = |v: &[Tensor]| v[0].gather(1, &v[1])?.sqr();
            cases.push((
                format!("gather 64x300 {tag}"),
                check(
                    "gather",
                    &[xl, indices(&[64, 500], 37, 28, it)],
                    fl,
                    tl,
                    true,
                ),
            ));
        }
    }
    // Raw copies: other dtypes (forward).
    for dtype in [DType::F16, DType::BF16, DType::I64, DType::U32, DType::U8] {
        let x = indices(&[6, 9], 100, 29, DType::I64)
            .to_dtype(dtype)
            .expect("cast");
        let f = |v: &[Tensor]| v[0].gather(1, &v[1]);
        cases.push((
            format!("gather {dtype:?}"),
            check(
                "gather",
                &[x, indices(&[6, 4], 9, 30, DType::U32)],
                f,
                0.0,
                false,
            ),
        ));
    }
    run("gather", cases);
}

#[test]
fn scatter_add() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let tl = tol(dtype);
        for it in INDEX {
            let tag = format!("{dtype:?} {it:?}");
            let x = rand_dtype(&[4, 5], 30, dtype);
            let f1 = |v: &[Tensor]| v[0].scatter_add(1, &v[1], &v[2]);
            let (idx, src) = (indices(&[4, 9], 5, 31, it), rand_dtype(&[4, 9], 32, dtype));
            cases.push((
                format!("scatter_add dim 1 {tag}"),
                check("scatter_add", &[x.clone(), idx, src], f1, tl, true),
            ));
            let f0 = |v: &[Tensor]| v[0].scatter_add(0, &v[1], &v[2]);
            let (idx, src) = (indices(&[7, 5], 4, 33, it), rand_dtype(&[7, 5], 34, dtype));
            cases.push((
                format!("scatter_add dim 0 {tag}"),
                check("scatter_add", &[x.clone(), idx, src], f0, tl, true),
            ));
            // src larger than the index (only the covered part is used), index smaller than x.
            let (idx, src) = (indices(&[2, 3], 5, 35, it), rand_dtype(&[3, 4], 36, dtype));
            cases.push((
                format!("scatter_add larger src, smaller index {tag}"),
                check("scatter_add", &[x.clone(), idx, src], f1, tl, true),
            ));
            // Transposed x and src, then a nonlinearity.
            let (xt, st) = (
                rand_dtype(&[5, 4], 37, dtype),
                rand_dtype(&[3, 4], 38, dtype),
            );
            let ft = |v: &[Tensor]| v[0].t()?.scatter_add(1, &v[1], &v[2].t()?)?.sqr();
            cases.push((
                format!("scatter_add transposed {tag}"),
                check(
                    "scatter_add",
                    &[xt, indices(&[4, 3], 5, 39, it), st],
                    ft,
                    tl,
                    true,
                ),
            ));
            // Larger, heavy accumulation: 2000 sources into 16 destinations per row.
            let xl = rand_dtype(&[32, 16], 40, dtype);
            let (idx, src) = (
                indices(&[32, 2000], 16, 41, it),
                rand_dtype(&[32, 2000], 42, dtype),
            );
            cases.push((
                format!("scatter_add heavy {tag}"),
                check("scatter_add", &[xl, idx, src], f1, tl, true),
            ));
        }
    }
    run("scatter_add", cases);
}

#[test]
fn index_add() {
    let mut cases = Vec::new();
    for dtype in FLOATS {
        let tl = tol(dtype);
        for it in INDEX {
            let tag = format!("{dtype:?} {it:?}");
            let f0 = |v: &[Tensor]| v[0].index_add(0, &v[1], &v[2]);
            let (x, ids, src) = (
                rand_dtype(&[5, 4], 50, dtype),
                indices(&[9], 5, 51, it),
                rand_dtype(&[9, 4], 52, dtype),
            );
            cases.push((
                format!("index_add dim 0 {tag}"),
                check("index_add", &[x, ids, src], f0, tl, true),
            ));
            let f1 = |v: &[Tensor]| v[0].index_add(1, &v[1], &v[2]);
            let (x, ids, src) = (
                rand_dtype(&[3, 6, 2], 53, dtype),
                indices(&[11], 6, 54, it),
                rand_dtype(&[3, 11, 2], 55, dtype),
            );
            cases.push((
                format!("index_add dim 1 {tag}"),
                check("index_add", &[x, ids, src], f1, tl, true),
            ));
            // Transposed x and src.
            let ft = |v: &[Tensor]| v[0].t()?.index_add(1, &v[1], &v[2].t()?)?.sqr();
            let (x, ids, src) = (
                rand_dtype(&[6, 3], 56, dtype),
                indices(&[8], 6, 57, it),
                rand_dtype(&[8, 3], 58, dtype),
            );
            cases.push((
                format!("index_add transposed {tag}"),
                check("index_add", &[x, ids, src], ft, tl, true),
            ));
            // Wide rows, many repeats.
            let (x, ids, src) = (
                rand_dtype(&[40, 300], 59, dtype),
                indices(&[1000], 40, 60, it),
                rand_dtype(&[1000, 300], 61, dtype),
            );
            cases.push((
                format!("index_add wide {tag}"),
                check("index_add", &[x, ids, src], f0, tl, true),
            ));
        }
    }
    run("index_add", cases);
}

/// The embedding gradient of the benchmark's kind of batch (many repeated ids) is the CPU's,
/// and two GPU runs agree bit for bit.
#[test]
fn embedding_backward_is_deterministic() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let table = randn(&[5000, 256], 70);
    let ids = indices(&[4096], 100, 71, DType::I64);
    check(
        "embedding",
        &[table.clone(), ids.clone()],
        |v| v[0].embedding(&v[1]),
        TOL_F32,
        true,
    )?;
    let seed = randn(&[4096, 256], 72).to_device(dev)?;
    let grad = || -> Result<Vec<f64>> {
        let t = table.to_device(dev)?.set_requires_grad(true);
        t.embedding(&ids.to_device(dev)?)?
            .backward_with(seed.clone())?;
        t.grad()
            .ok_or_else(|| Error::Msg("no gradient".into()))?
            .to_f64_vec()
    };
    let (a, b) = (grad()?, grad()?);
    if a.iter().zip(&b).any(|(x, y)| x.to_bits() != y.to_bits()) {
        return Err(Error::Msg("two GPU embedding backwards differ".into()));
    }
    Ok(())
}

#[test]
fn out_of_range_indices_are_errors() {
    let mut cases = Vec::new();
    for it in INDEX {
        let x = randn(&[4, 3], 80);
        let bad = ids_of(&[0, 1, 2, 3, 1, 4], &[2, 3], it);
        cases.push((
            format!("embedding {it:?}"),
            same_index_error("embedding", &[x.clone(), bad], |v| v[0].embedding(&v[1])),
        ));
        let bad = ids_of(&[0, 3], &[2], it);
        cases.push((
            format!("index_select {it:?}"),
            same_index_error("index_select", &[x.clone(), bad.clone()], |v| {
                v[0].index_select(1, &v[1])
            }),
        ));
        let src = randn(&[4, 2], 81);
        cases.push((
            format!("index_add {it:?}"),
            same_index_error("index_add", &[x.clone(), bad, src], |v| {
                v[0].index_add(1, &v[1], &v[2])
            }),
        ));
        let bad = ids_of(&[0, 1, 2, 1, 7, 0], &[3, 2], it);
        cases.push((
            format!("gather {it:?}"),
            same_index_error("gather", &[x.clone(), bad.clone()], |v| {
                v[0].gather(1, &v[1])
            }),
        ));
        let src = randn(&[3, 2], 82);
        cases.push((
            format!("scatter_add {it:?}"),
            same_index_error("scatter_add", &[x.clone(), bad, src], |v| {
                v[0].scatter_add(1, &v[1], &v[2])
            }),
        ));
    }
    let neg = ids_of(&[2, -1], &[2], DType::I64);
    cases.push((
        "embedding negative id".into(),
        same_index_error("embedding", &[randn(&[4, 3], 83), neg], |v| {
            v[0].embedding(&v[1])
        }),
    ));
    run("out_of_range_indices", cases);
}
