//! Tests of the indexing ops (embedding, index_select, gather, scatter_add, index_add) and
//! their backward kernels: gradient checks in f64 on contiguous and strided inputs, candle
//! oracles in f32 and bf16 (forward and backward, including sizes above the parallel
//! threshold), typed errors for out-of-range indices, and determinism of the scatter-adds.

use crate::common::*;
use candle_core as cc;
use dynn_core::{DType, Device, Error, Result, Tensor};
use dynn_ops::prelude::*;

/// An i64 index tensor.
fn ids(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, Device::Cpu).expect("ids")
}

/// Random indices in `0..n` of `shape` and `dtype` (i64 or u32).
fn rand_ids(shape: &[usize], n: usize, seed: u64, dtype: DType) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f64> = (0..shape.iter().product::<usize>()).map(|_| (r.next_u64() % n as u64) as f64).collect();
    from_f64(&v, shape, dtype).expect("rand_ids")
}

// ----- gradient checks -----

fn grad_embedding() -> Result<()> {
    let table = randn(&[6, 4], 1);
    let id = ids(&[5, 0, 5, 2, 3, 5], &[2, 3]);
    gradcheck_some(&[table.clone(), id.clone()], &[true, false], |v| v[0].embedding(&v[1])).ctx("(6,4) table, (2,3) ids")?;
    // Strided tables: transposed (rows not contiguous) and narrowed (rows contiguous, offset).
    let tt = randn(&[4, 6], 2).t()?;
    gradcheck_some(&[tt, id.clone()], &[true, false], |v| v[0].embedding(&v[1])).ctx("transposed table")?;
    let tn = randn(&[7, 9], 3).narrow(1, 2, 4)?.narrow(0, 1, 6)?;
    gradcheck_some(&[tn, id], &[true, false], |v| v[0].embedding(&v[1])?.tanh()).ctx("narrowed table, then tanh")?;
    let u = rand_ids(&[5], 6, 4, DType::U32);
    gradcheck_some(&[table, u], &[true, false], |v| v[0].embedding(&v[1])).ctx("u32 ids")?;
    Ok(())
}

fn grad_index_select() -> Result<()> {
    let x = randn(&[4, 5, 3], 10);
    for dim in 0..3 {
        let n = x.dims()[dim];
        let id = rand_ids(&[7], n, 11 + dim as u64, DType::I64);
        gradcheck_some(&[x.clone(), id], &[true, false], move |v| v[0].index_select(dim, &v[1])).ctx(format!("dim {dim}"))?;
    }
    let xt = randn(&[5, 4], 12).t()?;
    gradcheck_some(&[xt, ids(&[4, 1, 1], &[3])], &[true, false], |v| v[0].index_select(1, &v[1])).ctx("transposed x")?;
    Ok(())
}

fn grad_gather() -> Result<()> {
    let x = randn(&[4, 5], 20);
    gradcheck_some(&[x.clone(), rand_ids(&[4, 7], 5, 21, DType::I64)], &[true, false], |v| v[0].gather(1, &v[1])).ctx("dim 1")?;
    gradcheck_some(&[x.clone(), rand_ids(&[6, 5], 4, 22, DType::I64)], &[true, false], |v| v[0].gather(0, &v[1])).ctx("dim 0")?;
    // An index smaller than x in the other dims (torch semantics).
    gradcheck_some(&[x.clone(), rand_ids(&[2, 3], 5, 23, DType::U32)], &[true, false], |v| v[0].gather(1, &v[1]))
        .ctx("smaller index")?;
    let x3 = randn(&[3, 4, 5], 24).permute(&[2, 0, 1])?; // (5,3,4), strided
    gradcheck_some(&[x3, rand_ids(&[4, 6, 3], 3, 25, DType::I64)], &[true, false], |v| v[0].gather(-2i32, &v[1]))
        .ctx("permuted x, dim -2, smaller outer/inner")?;
    Ok(())
}

fn grad_scatter_add() -> Result<()> {
    let x = randn(&[4, 5], 30);
    let idx = rand_ids(&[4, 3], 5, 31, DType::I64);
    let src = randn(&[4, 3], 32);
    gradcheck_some(&[x.clone(), idx, src], &[true, false, true], |v| v[0].scatter_add(1, &v[1], &v[2])).ctx("dim 1")?;
    let idx0 = rand_ids(&[7, 5], 4, 33, DType::I64);
    gradcheck_some(&[x.clone(), idx0, randn(&[7, 5], 34)], &[true, false, true], |v| v[0].scatter_add(0, &v[1], &v[2])).ctx("dim 0")?;
    // src larger than the index (only the covered part is used), index smaller than x.
    let idx_s = rand_ids(&[2, 3], 5, 35, DType::U32);
    gradcheck_some(&[x.clone(), idx_s, randn(&[3, 4], 36)], &[true, false, true], |v| v[0].scatter_add(1, &v[1], &v[2]))
        .ctx("larger src, smaller index")?;
    let xt = randn(&[5, 4], 37).t()?;
    let st = randn(&[3, 4], 38).t()?;
    gradcheck_some(&[xt, rand_ids(&[4, 3], 5, 39, DType::I64), st], &[true, false, true], |v| v[0].scatter_add(1, &v[1], &v[2])?.sqr())
        .ctx("transposed x and src, then sqr")?;
    Ok(())
}

fn grad_index_add() -> Result<()> {
    let x = randn(&[5, 3], 40);
    let id = ids(&[4, 0, 4, 2], &[4]);
    gradcheck_some(&[x.clone(), id.clone(), randn(&[4, 3], 41)], &[true, false, true], |v| v[0].index_add(0, &v[1], &v[2])).ctx("dim 0")?;
    let x1 = randn(&[3, 5], 42);
    gradcheck_some(&[x1, id.clone(), randn(&[3, 4], 43)], &[true, false, true], |v| v[0].index_add(1, &v[1], &v[2])).ctx("dim 1")?;
    let xt = randn(&[3, 5], 44).t()?;
    let st = randn(&[3, 4], 45).t()?;
    gradcheck_some(&[xt, id, st], &[true, false, true], |v| v[0].index_add(0, &v[1], &v[2])?.exp()).ctx("transposed, then exp")?;
    Ok(())
}

// ----- candle oracles -----

fn oracle_embedding() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let t = tol(dtype);
        let table = rand_dtype(&[7, 5], 50, dtype);
        let id = ids(&[6, 0, 6, 3, 2, 6], &[2, 3]);
        oracle(
            &[table.clone(), id],
            |v| v[0].embedding(&v[1]),
            |v| v[0].index_select(&v[1].flatten_all()?, 0)?.reshape((2, 3, 5)),
            t,
        )
        .ctx(format!("{dtype} (2,3) ids"))?;
        let u = rand_ids(&[9], 7, 51, DType::U32);
        oracle(&[table, u], |v| v[0].embedding(&v[1]), |v| cc::Tensor::embedding(&v[0], &v[1]), t).ctx(format!("{dtype} u32 ids"))?;
    }
    let tt = rand_f32(&[5, 7], 52).t()?;
    oracle(&[tt, rand_ids(&[4], 7, 53, DType::I64)], |v| v[0].embedding(&v[1]), |v| v[0].embedding(&v[1]), tol(DType::F32))
        .ctx("transposed table")?;
    // Above the parallel thresholds, with many repeated ids (candle_nn's Embedding module).
    let big = rand_f32(&[300, 96], 54);
    let bid = rand_ids(&[40, 25], 300, 55, DType::I64);
    oracle(
        &[big, bid],
        |v| v[0].embedding(&v[1]),
        |v| {
            use candle_nn::Module;
            candle_nn::Embedding::new(v[0].clone(), 96).forward(&v[1])
        },
        tol(DType::F32),
    )
    .ctx("large")?;
    Ok(())
}

fn oracle_index_select() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let x = rand_dtype(&[4, 5, 3], 60, dtype);
        for dim in 0..3 {
            let id = rand_ids(&[6], x.dims()[dim], 61 + dim as u64, DType::I64);
            oracle(&[x.clone(), id], move |v| v[0].index_select(dim, &v[1]), move |v| v[0].index_select(&v[1], dim), tol(dtype))
                .ctx(format!("{dtype} dim {dim}"))?;
        }
    }
    let xt = rand_f32(&[6, 4], 64).t()?;
    oracle(&[xt, ids(&[5, 5, 0], &[3])], |v| v[0].index_select(1, &v[1]), |v| v[0].index_select(&v[1], 1), tol(DType::F32))
        .ctx("transposed")?;
    let big = rand_f32(&[64, 300, 4], 65);
    oracle(
        &[big, rand_ids(&[500], 300, 66, DType::U32)],
        |v| v[0].index_select(1, &v[1]),
        |v| v[0].index_select(&v[1], 1),
        tol(DType::F32),
    )
    .ctx("large")?;
    Ok(())
}

fn oracle_gather() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let t = tol(dtype);
        let x = rand_dtype(&[4, 5], 70, dtype);
        oracle(&[x.clone(), rand_ids(&[4, 7], 5, 71, DType::I64)], |v| v[0].gather(1, &v[1]), |v| v[0].gather(&v[1], 1), t)
            .ctx(format!("{dtype} dim 1"))?;
        oracle(&[x, rand_ids(&[6, 5], 4, 72, DType::I64)], |v| v[0].gather(0, &v[1]), |v| v[0].gather(&v[1], 0), t)
            .ctx(format!("{dtype} dim 0"))?;
    }
    let x3 = rand_f32(&[3, 4, 5], 73);
    oracle(&[x3, rand_ids(&[3, 6, 5], 4, 74, DType::U32)], |v| v[0].gather(1, &v[1]), |v| v[0].gather(&v[1], 1), tol(DType::F32))
        .ctx("3-d, dim 1")?;
    let xt = rand_f32(&[5, 4], 75).t()?;
    oracle(&[xt, rand_ids(&[4, 3], 5, 76, DType::I64)], |v| v[0].gather(1, &v[1]), |v| v[0].gather(&v[1], 1), tol(DType::F32))
        .ctx("transposed x")?;
    let big = rand_f32(&[200, 300], 77);
    oracle(&[big.clone(), rand_ids(&[200, 400], 300, 78, DType::I64)], |v| v[0].gather(1, &v[1]), |v| v[0].gather(&v[1], 1), tol(DType::F32))
        .ctx("large dim 1")?;
    oracle(&[big, rand_ids(&[250, 300], 200, 79, DType::I64)], |v| v[0].gather(0, &v[1]), |v| v[0].gather(&v[1], 0), tol(DType::F32))
        .ctx("large dim 0")?;
    Ok(())
}

/// candle's scatter_add forward, and an independent differentiable reference for the
/// gradients (candle's own scatter_add backward applies scatter's rule to `x` and fails when
/// the index is smaller than `x`): `x + Σ_j src[.., j, ..] * onehot(index[.., j, ..])`.
fn candle_scatter_add(v: &[cc::Tensor], dim: usize) -> cc::Result<cc::Tensor> {
    let (x, idx, src) = (&v[0], &v[1], &v[2]);
    let n = x.dims()[dim];
    let mut shape = vec![1usize; idx.rank() + 1];
    shape[dim + 1] = n;
    let range = cc::Tensor::arange(0i64, n as i64, x.device())?.reshape(shape)?;
    let onehot = idx.to_dtype(cc::DType::I64)?.unsqueeze(dim + 1)?.broadcast_eq(&range)?.to_dtype(src.dtype())?;
    let reference = x.add(&src.unsqueeze(dim + 1)?.broadcast_mul(&onehot)?.sum(dim)?)?;
    // The forward value is candle's kernel (on detached inputs), the gradient the reference's.
    let direct = x.detach().scatter_add(idx, &src.detach(), dim)?;
    reference.add(&direct.sub(&reference.detach())?)
}

fn oracle_scatter_add() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let t = tol(dtype);
        let x = rand_dtype(&[4, 5], 80, dtype);
        let (i1, s1) = (rand_ids(&[4, 3], 5, 81, DType::I64), rand_dtype(&[4, 3], 82, dtype));
        oracle(&[x.clone(), i1, s1], |v| v[0].scatter_add(1, &v[1], &v[2]), |v| candle_scatter_add(v, 1), t).ctx(format!("{dtype} dim 1"))?;
        let (i0, s0) = (rand_ids(&[7, 5], 4, 83, DType::I64), rand_dtype(&[7, 5], 84, dtype));
        oracle(&[x, i0, s0], |v| v[0].scatter_add(0, &v[1], &v[2]), |v| candle_scatter_add(v, 0), t).ctx(format!("{dtype} dim 0"))?;
    }
    let x = rand_f32(&[128, 300], 85);
    let (i, s) = (rand_ids(&[128, 500], 300, 86, DType::I64), rand_f32(&[128, 500], 87));
    oracle(&[x, i, s], |v| v[0].scatter_add(1, &v[1], &v[2]), |v| candle_scatter_add(v, 1), tol(DType::F32)).ctx("large")?;
    Ok(())
}

fn oracle_index_add() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        let t = tol(dtype);
        let id = ids(&[4, 0, 4, 2], &[4]);
        let x = rand_dtype(&[5, 3], 90, dtype);
        oracle(&[x, id.clone(), rand_dtype(&[4, 3], 91, dtype)], |v| v[0].index_add(0, &v[1], &v[2]), |v| v[0].index_add(&v[1], &v[2], 0), t)
            .ctx(format!("{dtype} dim 0"))?;
        let x1 = rand_dtype(&[2, 5, 3], 92, dtype);
        oracle(&[x1, id, rand_dtype(&[2, 4, 3], 93, dtype)], |v| v[0].index_add(1, &v[1], &v[2]), |v| v[0].index_add(&v[1], &v[2], 1), t)
            .ctx(format!("{dtype} dim 1"))?;
    }
    let x = rand_f32(&[300, 128], 94);
    let id = rand_ids(&[700], 300, 95, DType::U32);
    oracle(&[x, id, rand_f32(&[700, 128], 96)], |v| v[0].index_add(0, &v[1], &v[2]), |v| v[0].index_add(&v[1], &v[2], 0), tol(DType::F32))
        .ctx("large")?;
    Ok(())
}

pub const GRAD_CASES: &[Case] = &[
    (&["embedding"], grad_embedding),
    (&["index_select"], grad_index_select),
    (&["gather"], grad_gather),
    (&["scatter_add"], grad_scatter_add),
    (&["index_add"], grad_index_add),
];

pub const ORACLE_CASES: &[Case] = &[
    (&["embedding", "embedding_backward"], oracle_embedding),
    (&["index_select", "index_select_backward"], oracle_index_select),
    (&["gather", "gather_backward"], oracle_gather),
    (&["scatter_add", "gather"], oracle_scatter_add),
    (&["index_add", "index_select"], oracle_index_add),
];

// ----- errors, determinism, speed -----

fn expect_index_error(r: Result<Tensor>, op: &str, index: i64, size: usize, pos: &str) {
    match r {
        Err(e @ Error::IndexOutOfRange { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(op) && msg.contains(&format!("index {index}")) && msg.contains(&format!("size {size}")) && msg.contains(pos),
                "unexpected message: {msg}"
            );
        }
        other => panic!("{op}: expected IndexOutOfRange, got {other:?}"),
    }
}

#[test]
fn out_of_range_indices_are_typed_errors() {
    let table = randn(&[4, 3], 1);
    expect_index_error(table.embedding(&ids(&[0, 1, 2, 3, 1, 4], &[2, 3])), "embedding", 4, 4, "position 5 [1, 2]");
    expect_index_error(table.embedding(&ids(&[0, -1], &[2])), "embedding", -1, 4, "position 1");
    let u = Tensor::from_vec(vec![0u32, 9], 2, Device::Cpu).unwrap();
    expect_index_error(table.index_select(1, &u), "index_select", 9, 3, "position 1");
    expect_index_error(table.gather(0, &ids(&[0, 1, 7], &[1, 3])), "gather", 7, 4, "position 2");
    expect_index_error(table.scatter_add(1, &ids(&[3], &[1, 1]), &randn(&[1, 1], 2)), "scatter_add", 3, 3, "position 0");
    expect_index_error(table.index_add(0, &ids(&[5], &[1]), &randn(&[1, 3], 3)), "index_add", 5, 4, "position 0");
}

#[test]
fn bad_shapes_and_dtypes_are_typed_errors() {
    let table = randn(&[4, 3], 1);
    let f = randn(&[2], 2);
    assert!(matches!(table.embedding(&f), Err(Error::UnsupportedDType { op: "embedding", .. })));
    assert!(matches!(randn(&[4], 3).embedding(&ids(&[0], &[1])), Err(Error::InvalidArgument { op: "embedding", .. })));
    assert!(matches!(table.index_select(0, &ids(&[0, 1], &[1, 2])), Err(Error::InvalidArgument { op: "index_select", .. })));
    assert!(matches!(table.index_select(2, &ids(&[0], &[1])), Err(Error::DimOutOfRange { .. })));
    assert!(matches!(table.gather(0, &ids(&[0; 5], &[1, 5])), Err(Error::InvalidArgument { op: "gather", .. })));
    assert!(matches!(table.gather(0, &ids(&[0; 3], &[3])), Err(Error::InvalidArgument { op: "gather", .. })));
    let e = table.index_add(0, &ids(&[0, 1], &[2]), &randn(&[3, 3], 4)).unwrap_err().to_string();
    assert!(e.contains("index_add") && e.contains("[3, 3]"), "{e}");
    let e = table.scatter_add(0, &ids(&[0, 1], &[2, 1]), &randn(&[1, 1], 5)).unwrap_err().to_string();
    assert!(e.contains("scatter_add"), "{e}");
    let f32s = rand_f32(&[2, 3], 6);
    assert!(matches!(table.index_add(0, &ids(&[0, 1], &[2]), &f32s), Err(Error::DTypeMismatch { op: "index_add", .. })));
}

/// The scatter-adds give bit-identical results run after run, and equal a sequential sum in
/// index order (so thread timing never changes a bit).
#[test]
fn scatter_adds_are_deterministic() -> Result<()> {
    // Few distinct ids, many repeats, above the parallel threshold.
    let g = rand_f32(&[4000, 64], 7);
    let id = rand_ids(&[4000], 13, 8, DType::I64);
    let table = rand_f32(&[13, 64], 9).set_requires_grad(true);
    let run = || -> Result<Vec<f32>> {
        table.zero_grad();
        table.embedding(&id)?.backward_with(g.clone())?;
        table.grad().ok_or_else(|| Error::Msg("no grad".into()))?.to_vec::<f32>()
    };
    let first = run()?;
    for _ in 0..3 {
        assert_eq!(run()?, first);
    }
    let (gv, iv) = (g.to_vec::<f32>()?, id.to_vec::<i64>()?);
    let mut want = vec![0f32; 13 * 64];
    for (j, &v) in iv.iter().enumerate() {
        for k in 0..64 {
            want[v as usize * 64 + k] += gv[j * 64 + k];
        }
    }
    assert_eq!(first, want);
    // scatter_add (gather's backward) along dim 0: one block, in order.
    let x = rand_f32(&[5, 3000], 10);
    let idx = rand_ids(&[40, 3000], 5, 11, DType::I64);
    let src = rand_f32(&[40, 3000], 12);
    let a = x.scatter_add(0, &idx, &src)?.to_vec::<f32>()?;
    assert_eq!(a, x.scatter_add(0, &idx, &src)?.to_vec::<f32>()?);
    let (mut want, iv, sv) = (x.to_vec::<f32>()?, idx.to_vec::<i64>()?, src.to_vec::<f32>()?);
    for j in 0..40 {
        for k in 0..3000 {
            want[iv[j * 3000 + k] as usize * 3000 + k] += sv[j * 3000 + k];
        }
    }
    assert_eq!(a, want);
    Ok(())
}

/// Embedding throughput on the target size, (50,000 x 512) f32 table and 8,192 ids; bytes
/// are the rows read plus the output written. Run with `--ignored` in a release build.
#[test]
#[ignore]
fn embedding_throughput() -> Result<()> {
    let table = Tensor::zeros((50_000, 512), DType::F32, Device::Cpu)?;
    let id = rand_ids(&[8192], 50_000, 1, DType::I64);
    let bytes = 2.0 * 8192.0 * 512.0 * 4.0;
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let y = table.embedding(&id)?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(y);
    }
    println!("embedding (50000x512 f32, 8192 ids): {:.3} ms, {:.1} GB/s", best * 1e3, bytes / best / 1e9);
    Ok(())
}
